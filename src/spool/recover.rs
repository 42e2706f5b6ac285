//! Opening a spool directory: the lock, the persisted drain cursor, counting what is left after a
//! restart (skipping torn writes), and creating segment files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{DRAIN_BATCH, Position, Shared, SpoolError, State, io_err, record, segment};

/// File of the drain cursor inside `spool.dir`.
const CURSOR_FILE: &str = "cursor";
/// File whose lock marks the directory as in use.
const LOCK_FILE: &str = "LOCK";

/// Locks `dir`, reads the cursor, drops segments already drained, counts the rest, and creates
/// the segment new appends go to.
pub(super) fn recover(dir: &Path) -> Result<(File, State, File), SpoolError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_err("cannot open", &lock_path, e))?;
    lock.try_lock()
        .map_err(|_| SpoolError::Locked(dir.to_path_buf()))?;
    let ids = segment::list(dir).map_err(|e| io_err("cannot list", dir, e))?;
    let saved = read_cursor(dir);
    // The cursor's segment, or the first one after it when that one was deleted.
    let cursor = match saved {
        Some(c) if ids.contains(&c.segment) => c,
        Some(c) => Position {
            segment: ids.iter().copied().find(|&i| i > c.segment).unwrap_or(0),
            offset: 0,
        },
        None => Position {
            segment: ids.first().copied().unwrap_or(0),
            offset: 0,
        },
    };
    let mut st = State {
        cursor,
        ..State::default()
    };
    for &id in &ids {
        let path = segment::path(dir, id);
        if id < st.cursor.segment {
            // Drained before the last stop; its deletion was not reached.
            std::fs::remove_file(&path).map_err(|e| io_err("cannot delete", &path, e))?;
            continue;
        }
        let file = File::open(&path).map_err(|e| io_err("cannot open", &path, e))?;
        let end = file
            .metadata()
            .map_err(|e| io_err("cannot stat", &path, e))?
            .len();
        let mut pos = if id == st.cursor.segment {
            st.cursor.offset.min(end)
        } else {
            0
        };
        while pos < end {
            let read = segment::read_frames(&file, pos, end, DRAIN_BATCH)
                .map_err(|e| io_err("cannot read", &path, e))?;
            if read.skipped > 0 {
                tracing::warn!(segment = %path.display(), bytes = read.skipped, "skipping damaged spool bytes (torn write)");
            }
            if st.oldest_ms.is_none()
                && let Some(Ok(s)) = read.frames.first().map(|(p, _)| record::decode(p))
            {
                st.oldest_ms = Some(s.spooled_at_ms);
            }
            st.events += read.frames.len() as u64;
            pos = read.next;
        }
        st.segments.insert(id, end);
        st.disk_bytes += end;
    }
    if st.events == 0 {
        // Everything was drained (or only damaged bytes are left): start clean.
        for &id in st.segments.keys() {
            let path = segment::path(dir, id);
            std::fs::remove_file(&path).map_err(|e| io_err("cannot delete", &path, e))?;
        }
        st.segments.clear();
        st.disk_bytes = 0;
        st.oldest_ms = None;
    } else {
        tracing::info!(events = st.events, bytes = st.disk_bytes, dir = %dir.display(), "spool holds events from before the restart; draining them");
    }
    st.active = ids.last().copied().unwrap_or(0).max(st.cursor.segment) + 1;
    let file = create_segment(dir, st.active)?;
    st.segments.insert(st.active, 0);
    if st.events == 0 {
        st.cursor = Position {
            segment: st.active,
            offset: 0,
        };
    }
    Ok((lock, st, file))
}

/// Creates segment `id` and makes its directory entry durable.
pub(super) fn create_segment(dir: &Path, id: u64) -> Result<File, SpoolError> {
    let path = segment::path(dir, id);
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io_err("cannot create", &path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("cannot sync", dir, e))?;
    Ok(file)
}

fn read_cursor(dir: &Path) -> Option<Position> {
    let b = std::fs::read(dir.join(CURSOR_FILE)).ok()?;
    if b.len() != 20 {
        return None;
    }
    let sum = u32::from_le_bytes(b[16..20].try_into().ok()?);
    if crc32fast::hash(&b[..16]) != sum {
        return None;
    }
    Some(Position {
        segment: u64::from_le_bytes(b[..8].try_into().ok()?),
        offset: u64::from_le_bytes(b[8..16].try_into().ok()?),
    })
}

/// Writes the cursor atomically (temp file, fsync, rename). Losing the latest one only means a
/// few records are published again, which the message ids deduplicate.
///
/// A full disk has no block for a new file: then the existing cursor file is overwritten in
/// place (its block is already allocated). Its 20 bytes sit in one sector, and a torn write
/// fails the checksum, which reads as no cursor (everything left is published again and
/// deduplicated), never as a wrong position.
pub(super) fn write_cursor(shared: &Shared, pos: Position) -> Result<(), SpoolError> {
    let _guard = shared.files.lock().unwrap_or_else(|p| p.into_inner());
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&pos.segment.to_le_bytes());
    b.extend_from_slice(&pos.offset.to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
    let tmp = shared.dir.join("cursor.tmp");
    let path = shared.dir.join(CURSOR_FILE);
    let renamed = File::create(&tmp)
        .and_then(|mut f| f.write_all(&b).and_then(|()| f.sync_data()))
        .map_err(|e| io_err("cannot write", &tmp, e))
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| io_err("cannot rename", &tmp, e)));
    let Err(failed) = renamed else {
        return Ok(());
    };
    let _ = std::fs::remove_file(&tmp);
    let in_place = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.write_all_at(&b, 0).and_then(|()| f.sync_data()));
    match in_place {
        Ok(()) => {
            tracing::debug!(error = %failed, "spool cursor written in place");
            Ok(())
        }
        // No cursor file to overwrite (nothing was drained yet): the first failure says why.
        Err(_) => Err(failed),
    }
}
