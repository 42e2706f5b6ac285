//! Segment files and reading frames out of them.
//!
//! The spool is a directory of append-only segment files named by a rising number
//! (`00000000000000000042.seg`). Only the newest one is written to; a segment is deleted as a
//! whole once the drainer is past its end. Reads are chunked (never the whole file in memory) and
//! survive damage: after a frame that is cut short or fails its checksum, the reader looks for
//! the next frame that validates, so one torn record never hides the records after it.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::record::{self, HEADER_LEN, MAGIC, MAX_PAYLOAD, Parsed};

/// Bytes read per chunk; a frame larger than this is read whole on its own.
pub(crate) const CHUNK: usize = 512 * 1024;
const SUFFIX: &str = ".seg";

/// The file of segment `id` in `dir`.
pub fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SUFFIX}"))
}

/// The ids of the segment files in `dir`, oldest first.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name
            .strip_suffix(SUFFIX)
            .and_then(|n| n.parse::<u64>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Frames found in one buffer by [`scan`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Each frame's payload range and the offset just past the frame, in order.
    pub frames: Vec<(Range<usize>, usize)>,
    /// Where reading stopped: the next read starts here.
    pub consumed: usize,
    /// Damaged bytes skipped (a torn write, garbage).
    pub skipped: usize,
    /// When the buffer ends inside a frame: that frame's total length, if known.
    pub need: Option<usize>,
}

/// Reads up to `max_frames` frames from `buf`. `complete` says nothing follows `buf` (the end of
/// the committed data), so a frame cut short there is a torn write and is skipped.
pub fn scan(buf: &[u8], complete: bool, max_frames: usize) -> Scan {
    let mut out = Scan::default();
    let mut pos = 0;
    while out.frames.len() < max_frames && pos < buf.len() {
        match record::parse_at(buf, pos) {
            Parsed::Frame { payload, next } => {
                out.frames.push((payload, next));
                pos = next;
                continue;
            }
            Parsed::Incomplete { total } if !complete => {
                out.need = total;
                break;
            }
            Parsed::Incomplete { .. } | Parsed::Corrupt => {}
        }
        // Damage at `pos`: resume at the next position where a frame validates (or may, when
        // more bytes follow).
        let resume = (pos + 1..buf.len()).find(|&q| {
            buf[q..].starts_with(&MAGIC[..MAGIC.len().min(buf.len() - q)])
                && match record::parse_at(buf, q) {
                    Parsed::Frame { .. } => true,
                    Parsed::Incomplete { .. } => !complete,
                    Parsed::Corrupt => false,
                }
        });
        let to = resume.unwrap_or(buf.len());
        out.skipped += to - pos;
        pos = to;
    }
    out.consumed = pos;
    out
}

/// Frames read from a segment by [`read_frames`].
#[derive(Debug, Default)]
pub struct Read {
    /// Each frame's payload and its end offset in the segment.
    pub frames: Vec<(Vec<u8>, u64)>,
    /// Where the next read starts (past the frames and any skipped damage).
    pub next: u64,
    /// Damaged bytes skipped.
    pub skipped: u64,
}

/// Reads up to `max_frames` frames of `file` from `from` (a frame boundary) up to `end` (the end
/// of the data known to be whole; bytes past it are never looked at).
pub(crate) fn read_frames(file: &File, from: u64, end: u64, max_frames: usize) -> io::Result<Read> {
    let mut want = CHUNK;
    loop {
        let remaining = end.saturating_sub(from);
        let len = (want as u64).min(remaining) as usize;
        let complete = len as u64 == remaining;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, from)?;
        let scan = scan(&buf, complete, max_frames);
        if scan.consumed == 0 && !complete {
            // The first frame is larger than the chunk (or damage hides a frame start): read more.
            want = scan
                .need
                .unwrap_or(want * 2)
                .max(want + 1)
                .min(HEADER_LEN + MAX_PAYLOAD + CHUNK);
            continue;
        }
        return Ok(Read {
            frames: scan
                .frames
                .into_iter()
                .map(|(payload, next)| (buf[payload].to_vec(), from + next as u64))
                .collect(),
            next: from + scan.consumed as u64,
            skipped: scan.skipped as u64,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::spool::record::{Spooled, decode, encode};
    use crate::spool::test_support::event;

    fn frames(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for i in 0..n {
            buf.extend_from_slice(&encode(&event(i)));
            ends.push(buf.len());
        }
        (buf, ends)
    }

    fn decoded(buf: &[u8], scan: &Scan) -> Vec<Spooled> {
        scan.frames
            .iter()
            .map(|(p, _)| decode(&buf[p.clone()]).unwrap())
            .collect()
    }

    #[test]
    fn whole_frames_read_in_order() {
        let (buf, ends) = frames(5);
        let s = scan(&buf, true, usize::MAX);
        assert_eq!(decoded(&buf, &s), (0..5).map(event).collect::<Vec<_>>());
        assert_eq!(s.consumed, buf.len());
        assert_eq!(s.skipped, 0);
        assert_eq!(s.frames.iter().map(|f| f.1).collect::<Vec<_>>(), ends);
        let s = scan(&buf, true, 2);
        assert_eq!(s.frames.len(), 2);
        assert_eq!(s.consumed, ends[1]);
    }

    #[test]
    fn torn_last_record_is_skipped_at_the_end() {
        let (buf, ends) = frames(3);
        for cut in ends[1] + 1..buf.len() {
            let s = scan(&buf[..cut], true, usize::MAX);
            assert_eq!(decoded(&buf, &s), vec![event(0), event(1)], "cut at {cut}");
            assert_eq!(s.consumed, cut);
            assert_eq!(s.skipped, cut - ends[1]);
        }
    }

    #[test]
    fn a_cut_short_frame_waits_for_more_when_data_follows() {
        let (buf, ends) = frames(3);
        let s = scan(&buf[..ends[1] + 20], false, usize::MAX);
        assert_eq!(s.frames.len(), 2);
        assert_eq!(s.consumed, ends[1]);
        assert_eq!(s.need, Some(ends[2] - ends[1]));
        assert_eq!(s.skipped, 0);
    }

    #[test]
    fn garbage_tail_is_skipped() {
        let (mut buf, ends) = frames(2);
        buf.extend_from_slice(b"\0\0\0\x01garbage PBsp\xff\xff\xff\x00 more garbage");
        let s = scan(&buf, true, usize::MAX);
        assert_eq!(decoded(&buf, &s), vec![event(0), event(1)]);
        assert_eq!(s.skipped, buf.len() - ends[1]);
    }

    #[test]
    fn damage_in_the_middle_loses_only_the_damaged_record() {
        let (mut buf, ends) = frames(4);
        buf[ends[1] + HEADER_LEN + 3] ^= 0x40; // inside record 2's payload
        let s = scan(&buf, true, usize::MAX);
        assert_eq!(decoded(&buf, &s), vec![event(0), event(1), event(3)]);
        assert_eq!(s.skipped, ends[2] - ends[1]);
        // A torn write followed by whole records (a crash, then new appends).
        let (good, _) = frames(2);
        let mut torn = buf[..ends[0] + 30].to_vec();
        torn.extend_from_slice(&good);
        let s = scan(&torn, true, usize::MAX);
        assert_eq!(decoded(&torn, &s), vec![event(0), event(0), event(1)]);
    }

    #[test]
    fn file_reads_in_chunks_and_big_frames() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), 1);
        let mut f = File::create(&p).unwrap();
        let mut big = event(99);
        if let crate::spool::record::Record::Event(m) = &mut big.record {
            m.body = bytes::Bytes::from(vec![b'x'; CHUNK * 3]);
        }
        let mut all = Vec::new();
        for i in 0..2000 {
            all.extend_from_slice(&encode(&event(i)));
        }
        all.extend_from_slice(&encode(&big));
        all.extend_from_slice(&encode(&event(2000)));
        all.extend_from_slice(b"torn");
        f.write_all(&all).unwrap();
        let f = File::open(&p).unwrap();
        let end = all.len() as u64;
        let mut pos = 0;
        let mut got = Vec::new();
        let mut skipped = 0;
        while pos < end {
            let r = read_frames(&f, pos, end, 700).unwrap();
            assert!(r.next > pos);
            got.extend(r.frames.iter().map(|(p, _)| decode(p).unwrap()));
            skipped += r.skipped;
            pos = r.next;
        }
        assert_eq!(got.len(), 2002);
        assert_eq!(got[2000], big);
        assert_eq!(got[2001], event(2000));
        assert_eq!(skipped, 4);
        assert_eq!(list(dir.path()).unwrap(), vec![1]);
    }
}
