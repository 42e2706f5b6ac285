//! Output held back until the command knows it succeeded: `dlq list` prints nothing on stdout
//! when it fails, so a script that reads its stdout never takes a half listing, or the "0 dead
//! letters" of a broker it could not reach, for the answer.
//!
//! A listing can be far larger than memory should hold (every letter's body, with `--json`),
//! so the output stays in memory up to [`MEMORY_LIMIT`] and goes on in an unnamed temporary file
//! (in `$TMPDIR`, removed by the system when closed) beyond.

use std::fs::File;
use std::io::{self, BufWriter, Seek, Write};

/// Bytes of output held in memory before the rest goes to a temporary file (about 60,000 table
/// rows).
pub(super) const MEMORY_LIMIT: usize = 16 << 20;

/// A writer that keeps what it is given until [`Held::write_to`] passes it on; dropped, it
/// passes on nothing.
pub(super) struct Held {
    memory: Vec<u8>,
    spill: Option<BufWriter<File>>,
    limit: usize,
}

impl Held {
    /// Holds up to `limit` bytes in memory, the rest in a temporary file.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            memory: Vec::new(),
            spill: None,
            limit,
        }
    }

    /// Writes everything held to `out`, in the order it was written, and flushes `out`.
    pub(super) fn write_to(self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(&self.memory)?;
        if let Some(spill) = self.spill {
            let mut file = spill.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.rewind()?;
            io::copy(&mut file, out)?;
        }
        out.flush()
    }

    /// The temporary file that takes the output beyond the memory limit.
    fn spill_file(&mut self) -> io::Result<&mut BufWriter<File>> {
        match &mut self.spill {
            Some(file) => Ok(file),
            spill => {
                let file = tempfile::tempfile().map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "the listing is larger than {} MiB and no temporary file can be made to hold it (set TMPDIR to a writable directory): {e}",
                            MEMORY_LIMIT >> 20
                        ),
                    )
                })?;
                Ok(spill.insert(BufWriter::new(file)))
            }
        }
    }
}

impl Write for Held {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Once the memory is full everything after goes to the file, which `write_to` copies
        // after the memory: the order is kept.
        if self.spill.is_none() && self.memory.len() + buf.len() <= self.limit {
            self.memory.extend_from_slice(buf);
            return Ok(buf.len());
        }
        self.spill_file()?.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.spill {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_output_is_passed_on_whole_from_memory() {
        let mut held = Held::new(1024);
        writeln!(held, "one").unwrap();
        held.write_all(b"two\n").unwrap();
        assert!(held.spill.is_none());
        let mut out = Vec::new();
        held.write_to(&mut out).unwrap();
        assert_eq!(out, b"one\ntwo\n");
    }

    #[test]
    fn a_large_output_goes_on_in_a_file_and_keeps_its_order() {
        let mut held = Held::new(10);
        let mut want = Vec::new();
        for i in 0..1000 {
            let line = format!("line {i}\n");
            held.write_all(line.as_bytes()).unwrap();
            want.extend_from_slice(line.as_bytes());
        }
        assert!(held.spill.is_some(), "spilled to a file");
        assert!(held.memory.len() <= 10);
        let mut out = Vec::new();
        held.write_to(&mut out).unwrap();
        assert_eq!(out, want);
    }
}
