//! The spool's writer: one OS thread that owns the active segment file and group-commits.
//!
//! It takes the first waiting append, then every other append already queued, writes them with
//! one `pwrite` and one `fdatasync`, and only then answers each of them. Appends arriving during
//! an fsync wait for the next one, so many concurrent webhooks share each disk flush and the
//! async runtime never blocks on the disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::recover::create_segment;
use super::{Position, Shared, SpoolError, segment};

/// Appends queued before the writer pushes back on callers.
const QUEUE: usize = 1024;
/// Upper bound on bytes gathered into one write (memory bound of a group commit).
const GROUP_BYTES: usize = 16 << 20;

/// Work for the writer thread.
pub(super) enum Request {
    /// Frames of one webhook, written whole or not at all.
    Append {
        /// Encoded frames.
        frames: Vec<u8>,
        /// How many records they hold.
        events: u64,
        /// Their spool time.
        first_ms: u64,
        /// Answered after the fsync.
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Start a new segment and delete the current one if everything in it has been drained.
    RollIfIdle,
    /// After a failed write: try `bytes` past the committed end (then cut them off again),
    /// to learn whether the disk has room again.
    Probe {
        /// How much to try.
        bytes: u64,
    },
    /// Finish what is queued, then stop and let go of the spool (its lock included).
    Close(oneshot::Sender<()>),
    /// Panics in the writer thread (a test of what a bug there does to the bridge).
    #[cfg(test)]
    Panic,
}

/// Starts the writer thread on `file` (the empty active segment).
pub(super) fn start(
    shared: Arc<Shared>,
    file: File,
    segment_bytes: u64,
) -> Result<mpsc::Sender<Request>, SpoolError> {
    let (tx, rx) = mpsc::channel(QUEUE);
    // Weak: the spool (its directory lock included) is let go at `Close`, before the thread
    // ends, so the directory can be opened again at once.
    let watched = Arc::downgrade(&shared);
    let w = Writer {
        shared,
        file,
        len: 0,
        segment_bytes,
        broken: false,
    };
    std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || {
            // A panic here is a bug, and the thread cannot be started again over a state it
            // left half-way: it is said once, the appends waiting and every later one fail as
            // `Closed`, readiness turns red, and the bridge stops with an error so that its
            // orchestrator starts it again (what was committed is read back at start).
            let run = std::panic::AssertUnwindSafe(|| w.run(rx));
            if let Err(panic) = std::panic::catch_unwind(run) {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %why, "the spool writer panicked; the spool takes no more events: the bridge stops");
                if let Some(shared) = watched.upgrade() {
                    shared.set_writer_stopped(why);
                }
            }
        })
        .map_err(|e| SpoolError::Io {
            what: "cannot start the spool writer".into(),
            source: Arc::new(e),
        })?;
    Ok(tx)
}

struct Writer {
    shared: Arc<Shared>,
    file: File,
    /// Bytes written to the active segment.
    len: u64,
    segment_bytes: u64,
    /// A write failed: the next append goes to a new segment.
    broken: bool,
}

struct Pending {
    frames: Vec<u8>,
    events: u64,
    first_ms: u64,
    reply: oneshot::Sender<Result<(), SpoolError>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut appends = Vec::new();
            let mut roll_if_idle = false;
            let mut probe = None;
            let mut close = None;
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    Request::Append {
                        frames,
                        events,
                        first_ms,
                        reply,
                    } => {
                        bytes += frames.len();
                        appends.push(Pending {
                            frames,
                            events,
                            first_ms,
                            reply,
                        });
                    }
                    Request::RollIfIdle => roll_if_idle = true,
                    Request::Probe { bytes } => probe = Some(bytes),
                    Request::Close(reply) => {
                        close = Some(reply);
                        break;
                    }
                    #[cfg(test)]
                    Request::Panic => panic!("a test asked the spool writer to panic"),
                }
                if bytes < GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(appends, roll_if_idle);
            if let Some(bytes) = probe {
                self.probe(bytes);
            }
            if let Some(reply) = close {
                drop(self);
                let _ = reply.send(());
                return;
            }
        }
    }

    /// One group commit.
    fn commit(&mut self, appends: Vec<Pending>, roll_if_idle: bool) {
        let idle = self.shared.state().drained();
        let want_roll = self.len > 0
            && (self.broken
                || (idle && (roll_if_idle || !appends.is_empty()))
                || (!appends.is_empty() && self.len >= self.segment_bytes));
        if want_roll && let Err(e) = self.roll(idle) {
            tracing::error!(error = %e, "cannot start a new spool segment");
            self.shared.set_refused(Some(e.to_string()));
            for p in appends {
                let _ = p.reply.send(Err(e.clone()));
            }
            return;
        }
        // Admit appends in arrival order while they fit; refuse the rest whole.
        let mut buf = Vec::new();
        let mut accepted = Vec::new();
        let mut events = 0;
        let mut first_ms = None;
        {
            let st = self.shared.state();
            for p in appends {
                let used = st.disk_bytes + buf.len() as u64;
                let needed = p.frames.len() as u64;
                if used + needed > self.shared.max_bytes {
                    let _ = p.reply.send(Err(SpoolError::Full {
                        needed,
                        free: self.shared.max_bytes.saturating_sub(used),
                    }));
                    continue;
                }
                if buf.is_empty() {
                    buf = p.frames;
                } else {
                    buf.extend_from_slice(&p.frames);
                }
                events += p.events;
                first_ms.get_or_insert(p.first_ms);
                accepted.push(p.reply);
            }
        }
        if accepted.is_empty() {
            return;
        }
        let written = self
            .file
            .write_all_at(&buf, self.len)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Drop whatever part made it; the reader never looks past the committed end anyway,
            // and the next append starts a new segment.
            let _ = self.file.set_len(self.len);
            self.broken = true;
            let err = SpoolError::Io {
                what: "cannot write the spool segment".into(),
                source: Arc::new(e),
            };
            tracing::error!(error = %err, "spool append failed");
            self.shared.set_refused(Some(err.to_string()));
            for reply in accepted {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        self.len += buf.len() as u64;
        self.shared.set_refused(None);
        {
            let mut st = self.shared.state();
            let active = st.active;
            st.segments.insert(active, self.len);
            st.disk_bytes += buf.len() as u64;
            st.events += events;
            if st.oldest_ms.is_none() {
                st.oldest_ms = first_ms;
            }
            self.shared.update_gauges(&st);
        }
        for reply in accepted {
            let _ = reply.send(Ok(()));
        }
        self.shared.appended.notify_one();
    }

    /// Whether the disk takes `bytes` again: a new segment first if the last write broke this
    /// one, then `bytes` of zeros past the committed end, fsynced and cut off (the reader never
    /// looks past the committed end). Clears the refusal when it goes through.
    fn probe(&mut self, bytes: u64) {
        if self.broken {
            let idle = self.shared.state().drained();
            if let Err(e) = self.roll(idle) {
                self.shared.set_refused(Some(e.to_string()));
                return;
            }
        }
        let zeros = vec![
            0u8;
            usize::try_from(bytes)
                .unwrap_or(usize::MAX)
                .min(GROUP_BYTES)
        ];
        let tried = self
            .file
            .write_all_at(&zeros, self.len)
            .and_then(|()| self.file.sync_data());
        let cut = self.file.set_len(self.len);
        match tried.and(cut) {
            Ok(()) => {
                tracing::info!("the spool's disk takes writes again");
                self.shared.set_refused(None);
            }
            Err(e) => self
                .shared
                .set_refused(Some(format!("cannot write the spool segment: {e}"))),
        }
    }

    /// Starts the next segment; deletes the current one when `drained`.
    fn roll(&mut self, drained: bool) -> Result<(), SpoolError> {
        let (old, next) = {
            let st = self.shared.state();
            (st.active, st.active + 1)
        };
        let file = create_segment(&self.shared.dir, next)?;
        let delete = {
            let mut st = self.shared.state();
            st.segments.insert(next, 0);
            st.active = next;
            // Re-checked under the lock: the drainer may have moved on meanwhile.
            let still_drained = drained && st.cursor.segment == old;
            if still_drained {
                if let Some(len) = st.segments.remove(&old) {
                    st.disk_bytes = st.disk_bytes.saturating_sub(len);
                }
                st.cursor = Position {
                    segment: next,
                    offset: 0,
                };
            }
            self.shared.update_gauges(&st);
            still_drained
        };
        if delete {
            let path = segment::path(&self.shared.dir, old);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(segment = %path.display(), error = %e, "cannot delete a drained spool segment");
            }
        }
        self.file = file;
        self.len = 0;
        self.broken = false;
        Ok(())
    }
}
