//! The local durable spool: events the broker could not take in time are appended here, flushed
//! to disk (fsync) before the webhook gets its 200, and published later by the drainer
//! ([`drain`]) in arrival order with their original message ids.
//!
//! Storage is an append-only log of segment files (`segment`) holding checksummed frames
//! ([`record`]). One writer thread appends and group-commits: every append waiting while an
//! fsync runs goes into the next write and shares the next fsync. The drainer reads from a
//! persisted cursor (`cursor` file) and deletes a segment once it is past its end; `recover`
//! opens the directory after a restart. See `docs/spool.md` for the design, guarantees and
//! limits.

pub mod drain;
pub mod record;
mod recover;
pub(crate) mod segment;
mod writer;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::SpoolSettings;
use crate::message::now_ms;
use crate::metrics::Metrics;
pub use record::{Record, Spooled};

/// Records the drainer reads (and publishes with acks awaited together) per batch.
pub const DRAIN_BATCH: usize = 512;
/// File holding records the drainer set aside so they do not block the records behind them
/// (dead letters the DLQ refused, frames this version cannot decode); read by
/// `pusher-bridge quarantine`, taken back onto the spool at every start.
pub const QUARANTINE_FILE: &str = "quarantine.log";

/// Why the spool could not take or give records.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// `spool.max_bytes` would be exceeded: nothing of the append was written.
    #[error("spool is full: {needed} bytes needed, {free} of spool.max_bytes free")]
    Full {
        /// Bytes the append needed.
        needed: u64,
        /// Bytes still free.
        free: u64,
    },
    /// Reading or writing the spool directory failed.
    #[error("spool I/O error: {what}: {source}")]
    Io {
        /// What was being done, and to which file.
        what: String,
        /// The operating system's error (shared: one failed group commit fails every append
        /// waiting in it).
        #[source]
        source: Arc<io::Error>,
    },
    /// A blocking-pool task of the spool (recovery, a read, a cursor or quarantine write) did
    /// not finish.
    #[error("{what} stopped: {source}")]
    Stopped {
        /// Which task.
        what: &'static str,
        /// Why it ended (a panic, the runtime shutting down).
        #[source]
        source: Arc<tokio::task::JoinError>,
    },
    /// Another process holds the spool directory.
    #[error("spool directory {0} is in use by another process")]
    Locked(PathBuf),
    /// The writer thread has stopped (shutdown).
    #[error("the spool writer has stopped")]
    Closed,
    /// The writer thread panicked (a bug): nothing can be made durable any more, so the bridge
    /// stops with this error and its orchestrator starts it again.
    #[error("the spool writer panicked ({0}): no event can be made durable any more")]
    WriterPanicked(String),
}

fn io_err(what: &str, path: &Path, e: io::Error) -> SpoolError {
    SpoolError::Io {
        what: format!("{what} {}", path.display()),
        source: Arc::new(e),
    }
}

/// The error of a spool task on the blocking pool that did not finish.
fn stopped(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> SpoolError {
    move |e| SpoolError::Stopped {
        what,
        source: Arc::new(e),
    }
}

/// A place in the spool: a segment and a byte offset (a frame boundary) in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    /// Segment id.
    pub segment: u64,
    /// Byte offset in the segment.
    pub offset: u64,
}

/// How often a refusing disk is probed (see [`Spool::write_refused`]).
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What a probe of a refusing disk writes: enough to say the disk takes writes again, small
/// enough to try every second.
const PROBE_BYTES: u64 = 64 * 1024;

/// In-memory index of the spool, shared by the writer thread and the drainer.
#[derive(Debug, Default)]
struct State {
    /// Segments on disk, oldest first: id -> end of the whole, fsynced frames.
    segments: BTreeMap<u64, u64>,
    /// The segment appended to.
    active: u64,
    /// Where the drainer goes on.
    cursor: Position,
    /// Records not yet drained.
    events: u64,
    /// Bytes of all segment files.
    disk_bytes: u64,
    /// Spool time of the oldest undrained record (approximate between batches).
    oldest_ms: Option<u64>,
}

impl State {
    /// Whether the drainer is at the end of everything written.
    fn drained(&self) -> bool {
        self.cursor.segment == self.active
            && self.cursor.offset >= self.segments.get(&self.active).copied().unwrap_or(0)
    }
}

struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    room_min: u64,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    /// Wakes the drainer after an append.
    appended: Notify,
    /// Serialises cursor writes and quarantine appends.
    files: Mutex<()>,
    /// The drainer makes no progress although it could (see [`drain::StallWatch`]).
    stalled: std::sync::atomic::AtomicBool,
    /// The disk's answer when the writer's last write (or new segment) failed; `None` once a
    /// write or a probe got through. `spool.max_bytes` says nothing of a disk that is full of
    /// other files: readiness asks this too.
    refused: Mutex<Option<String>>,
    /// When readiness last asked the writer to probe a refusing disk.
    probed_at: Mutex<Option<std::time::Instant>>,
    /// The writer thread panicked (with its message): the spool takes nothing any more.
    writer_stopped: tokio::sync::watch::Sender<Option<String>>,
    /// Held for the life of the spool: one process per directory.
    _lock: File,
}

impl Shared {
    /// Notes the disk's answer to the last write (`None`: it went through).
    fn set_refused(&self, why: Option<String>) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Notes that the writer thread panicked.
    fn set_writer_stopped(&self, panic: String) {
        self.writer_stopped.send_replace(Some(panic));
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain numbers behind; keep going with them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_gauges(&self, st: &State) {
        let m = &self.metrics;
        m.spool_events.set(st.events as i64);
        m.spool_bytes.set(st.disk_bytes as i64);
        let age = st
            .oldest_ms
            .filter(|_| st.events > 0)
            .map(|t| now_ms().saturating_sub(t) as f64 / 1000.0)
            .unwrap_or(0.0);
        m.spool_oldest_age.set(age);
    }
}

/// One read of the drainer: records in order, each with the position just past it.
#[derive(Debug, Default)]
pub struct Batch {
    /// The records, oldest first.
    pub items: Vec<Item>,
    ends: Vec<Position>,
}

/// One frame read back.
#[derive(Debug)]
pub enum Item {
    /// A record to publish.
    Record(Spooled),
    /// A frame whose checksum matched but which this version cannot decode (kept aside).
    Undecodable {
        /// The payload as stored.
        payload: Vec<u8>,
        /// What is wrong with it.
        error: record::DecodeError,
    },
}

impl Batch {
    /// Whether nothing was read.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The spool of one bridge process.
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<writer::Request>,
}

impl Spool {
    /// Opens (or creates) the spool in `settings.dir`: locks it, finds where the drainer stopped,
    /// counts what is left, and starts a new segment for appends. `room_min` is the free space
    /// below which the spool no longer counts as able to take a webhook (for `/readyz`).
    pub async fn open(
        settings: &SpoolSettings,
        room_min: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SpoolError> {
        let settings = settings.clone();
        let (file, shared) = tokio::task::spawn_blocking(move || {
            let (lock, state, file) = recover::recover(&settings.dir)?;
            let shared = Arc::new(Shared {
                dir: settings.dir.clone(),
                max_bytes: settings.max_bytes,
                room_min,
                state: Mutex::new(state),
                metrics,
                appended: Notify::new(),
                files: Mutex::new(()),
                stalled: std::sync::atomic::AtomicBool::new(false),
                refused: Mutex::new(None),
                probed_at: Mutex::new(None),
                writer_stopped: tokio::sync::watch::Sender::new(None),
                _lock: lock,
            });
            shared.update_gauges(&shared.state());
            Ok::<_, SpoolError>((file, shared))
        })
        .await
        .map_err(stopped("spool recovery"))??;
        let tx = writer::start(shared.clone(), file, settings.segment_bytes)?;
        let spool = Self { shared, tx };
        spool.take_back_quarantine().await;
        Ok(spool)
    }

    /// Puts the records of `quarantine.log` back on the spool, behind what waits there, and
    /// removes the file: the drainer tries them again (a dead letter the dead-letter queue
    /// refused goes there again once it takes it; a frame an older version could not decode is
    /// decoded by this one). This is the quarantine's replay, run at every start; a record the
    /// dead-letter queue still refuses comes back to the file. If the spool has no room the file
    /// stays and the gauge says how many records it holds.
    async fn take_back_quarantine(&self) {
        let path = self.shared.dir.join(QUARANTINE_FILE);
        let kept = match read_quarantine(&self.shared.dir) {
            Ok(kept) => kept,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the spool's quarantine file");
                return;
            }
        };
        if kept.is_empty() {
            let _ = std::fs::remove_file(&path);
            self.shared.metrics.spool_quarantined.set(0);
            return;
        }
        let n = kept.len();
        let frames: Vec<u8> = kept.into_iter().flat_map(|q| q.frame).collect();
        let (reply, answer) = oneshot::channel();
        let sent = self
            .tx
            .send(writer::Request::Append {
                frames,
                events: n as u64,
                first_ms: now_ms(),
                reply,
            })
            .await;
        let written = match sent {
            Ok(()) => answer.await.unwrap_or(Err(SpoolError::Closed)),
            Err(_) => Err(SpoolError::Closed),
        };
        match written.and_then(|()| {
            std::fs::remove_file(&path).map_err(|e| io_err("cannot remove", &path, e))
        }) {
            Ok(()) => {
                self.shared.metrics.spool_quarantined.set(0);
                tracing::warn!(
                    records = n,
                    "took the records of the spool's quarantine file back onto the spool"
                );
            }
            Err(e) => {
                self.shared.metrics.spool_quarantined.set(n as i64);
                tracing::error!(records = n, error = %e, "cannot take the quarantined records back onto the spool; they stay in {}", path.display());
            }
        }
    }

    /// Appends `records` as one unit and returns once they are on disk (fsynced). Either all of
    /// them are written or none ([`SpoolError::Full`] when `spool.max_bytes` would be exceeded).
    pub async fn append(&self, records: &[Record]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut frames = Vec::new();
        for r in records {
            record::encode_into(&mut frames, now, r);
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(writer::Request::Append {
                frames,
                events: records.len() as u64,
                first_ms: now,
                reply,
            })
            .await
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)??;
        self.shared
            .metrics
            .spool_written
            .inc_by(records.len() as u64);
        Ok(())
    }

    /// Stops the writer thread after what is queued; later appends fail with
    /// [`SpoolError::Closed`]. The directory lock goes with the last handle to the spool.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(writer::Request::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Whether the drainer is stuck: records wait, the broker is up, and none was handled for
    /// [`drain::STALL_AFTER`] (`/readyz` answers 503, so traffic goes to other replicas).
    pub(crate) fn is_stalled(&self) -> bool {
        self.shared
            .stalled
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_stalled(&self, stalled: bool) {
        self.shared
            .stalled
            .store(stalled, std::sync::atomic::Ordering::Relaxed);
        self.shared
            .metrics
            .spool_drain_stalled
            .set(i64::from(stalled));
    }

    /// Records waiting to be drained.
    pub fn events(&self) -> u64 {
        self.shared.state().events
    }

    /// Whether no record waits (new webhooks may then publish directly).
    pub fn is_empty(&self) -> bool {
        self.events() == 0
    }

    /// Bytes the segment files take on disk (what `spool.max_bytes` limits).
    pub fn disk_bytes(&self) -> u64 {
        self.shared.state().disk_bytes
    }

    /// Whether a webhook of the largest allowed size would still fit (and the writer runs, and
    /// the disk did not refuse its last write).
    pub(crate) fn has_room(&self) -> bool {
        !self.tx.is_closed()
            && self.write_refused().is_none()
            && self.disk_bytes() + self.shared.room_min <= self.shared.max_bytes
    }

    /// The writer thread's panic message, when it panicked: the spool takes no more events,
    /// `/readyz` says so, and the bridge stops ([`Spool::writer_lost`]).
    pub(crate) fn writer_stopped(&self) -> Option<String> {
        self.shared.writer_stopped.borrow().clone()
    }

    /// Resolves once the writer thread panicked, with the error the bridge stops with; pending
    /// for ever otherwise.
    pub(crate) async fn writer_lost(&self) -> SpoolError {
        let mut stopped = self.shared.writer_stopped.subscribe();
        // The spool itself gone (only at the very end) is nothing to report.
        let panic = match stopped.wait_for(Option::is_some).await {
            Ok(panic) => panic.clone(),
            Err(_) => None,
        };
        match panic {
            Some(panic) => SpoolError::WriterPanicked(panic),
            None => std::future::pending().await,
        }
    }

    /// Makes the writer thread panic, and waits until it has (tests of what a bug there does).
    #[cfg(test)]
    pub(crate) async fn panic_writer(&self) {
        let _ = self.tx.send(writer::Request::Panic).await;
        while self.writer_stopped().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// The disk's answer when the spool's last write failed (a full disk, say), else `None`.
    /// While it is refused, each call asks the writer (at most once a second) to probe the
    /// disk with a write of [`PROBE_BYTES`], so readiness turns green again once
    /// there is room, without waiting for a webhook that a load balancer no longer sends.
    pub(crate) fn write_refused(&self) -> Option<String> {
        let why = self
            .shared
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let mut probed = self
            .shared
            .probed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if probed.is_none_or(|at| at.elapsed() >= PROBE_EVERY) {
            *probed = Some(std::time::Instant::now());
            let _ = self
                .tx
                .try_send(writer::Request::Probe { bytes: PROBE_BYTES });
        }
        Some(why)
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Waits until an append lands (the drainer's wake-up).
    pub async fn appended(&self) {
        self.shared.appended.notified().await;
    }

    /// Refreshes the spool gauges (the oldest age moves with time).
    pub(crate) fn update_gauges(&self) {
        self.shared.update_gauges(&self.shared.state());
    }

    /// Asks the writer to start a fresh segment and delete the current one when everything has
    /// been drained, so an idle spool takes no disk space.
    pub(crate) async fn roll_if_idle(&self) {
        let worth_it = {
            let st = self.shared.state();
            st.drained() && st.segments.get(&st.active).copied().unwrap_or(0) > 0
        };
        if worth_it {
            let _ = self.tx.send(writer::Request::RollIfIdle).await;
        }
    }

    /// Reads up to `max` records from the cursor on, in order. Passes (and deletes) segments
    /// that are fully drained; skips damaged bytes with an error log.
    pub async fn read_batch(&self, max: usize) -> Result<Batch, SpoolError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || read_batch(&shared, max))
            .await
            .map_err(stopped("spool read"))?
    }

    /// Marks the first `n` records of `batch` as drained: moves the cursor past them and
    /// persists it, so a restart does not publish them again.
    pub async fn commit(&self, batch: &Batch, n: usize) -> Result<(), SpoolError> {
        let n = n.min(batch.ends.len());
        let Some(&pos) = n.checked_sub(1).and_then(|i| batch.ends.get(i)) else {
            return Ok(());
        };
        {
            let mut st = self.shared.state();
            if pos > st.cursor {
                st.cursor = pos;
            }
            st.events = st.events.saturating_sub(n as u64);
            if st.drained() {
                st.events = 0;
            }
            st.oldest_ms = match batch.items.get(n) {
                _ if st.events == 0 => None,
                Some(Item::Record(s)) => Some(s.spooled_at_ms),
                _ => st.oldest_ms,
            };
            self.shared.update_gauges(&st);
        }
        self.shared.metrics.spool_drained.inc_by(n as u64);
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || recover::write_cursor(&shared, pos))
            .await
            .map_err(stopped("cursor write"))?
    }

    /// Keeps `records` frames the drainer could not hand to any broker destination in
    /// `quarantine.log` (fsynced), outside the spool's accounting, so the records behind them
    /// go on; `pusher-bridge quarantine` lists them and the next start takes them back.
    pub async fn quarantine(&self, frames: Vec<u8>, records: usize) -> Result<(), SpoolError> {
        self.shared
            .metrics
            .spool_quarantined
            .inc_by(i64::try_from(records).unwrap_or(i64::MAX));
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = shared.files.lock().unwrap_or_else(|p| p.into_inner());
            let path = shared.dir.join(QUARANTINE_FILE);
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_err("cannot open", &path, e))?;
            f.write_all(&frames)
                .and_then(|()| f.sync_data())
                .map_err(|e| io_err("cannot write", &path, e))
        })
        .await
        .map_err(stopped("quarantine write"))?
    }
}

/// One record of `quarantine.log`: its frame as stored and what it decodes to.
#[derive(Debug)]
pub(crate) struct Quarantined {
    /// The whole frame (header and payload), as the spool stores it.
    pub frame: Vec<u8>,
    /// The record, or why this version cannot decode it.
    pub record: Result<Spooled, record::DecodeError>,
}

/// The records of the quarantine file in `dir` (none when it does not exist). Reading stops at
/// the first frame that is not whole (the tail of a write a crash cut short).
pub(crate) fn read_quarantine(dir: &Path) -> Result<Vec<Quarantined>, SpoolError> {
    let path = dir.join(QUARANTINE_FILE);
    let buf = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("cannot read", &path, e)),
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while let record::Parsed::Frame { payload, next } = record::parse_at(&buf, pos) {
        out.push(Quarantined {
            frame: buf[pos..next].to_vec(),
            record: record::decode(&buf[payload]),
        });
        pos = next;
    }
    if pos < buf.len() {
        tracing::warn!(
            bytes = buf.len() - pos,
            "the end of the spool's quarantine file is not a whole record (a cut-short write); ignored"
        );
    }
    Ok(out)
}

/// One line per record of the quarantine file in `dir`, for `pusher-bridge quarantine`:
/// `event|dead_letter subject=.. msg_id=.. [reason=.. detail=..]`, or `undecodable: <why>`.
pub fn quarantine_lines(dir: &Path) -> Result<Vec<String>, SpoolError> {
    Ok(read_quarantine(dir)?
        .into_iter()
        .map(|q| match q.record {
            Ok(s) => match &s.record {
                Record::Event(m) => {
                    format!("event subject={} msg_id={}", m.subject, m.msg_id)
                }
                Record::DeadLetter(dl) => format!(
                    "dead_letter subject={} msg_id={} reason={} detail={}",
                    dl.message.subject,
                    dl.message.msg_id,
                    dl.reason.as_str(),
                    dl.detail
                ),
            },
            Err(e) => format!("undecodable: {e}"),
        })
        .collect())
}

fn read_batch(shared: &Shared, max: usize) -> Result<Batch, SpoolError> {
    loop {
        let (cursor, end, next_segment) = {
            let st = shared.state();
            let end = st.segments.get(&st.cursor.segment).copied().unwrap_or(0);
            let next = st
                .segments
                .range(st.cursor.segment + 1..)
                .next()
                .map(|(&id, _)| id);
            (st.cursor, end, next)
        };
        if cursor.offset >= end {
            // At the end of a sealed segment: go on with the next one and delete this one.
            let Some(next) = next_segment else {
                let mut st = shared.state();
                if st.drained() && st.events > 0 {
                    // The count included records that turned out unreadable (damage found only
                    // now): everything readable is drained.
                    tracing::warn!(
                        events = st.events,
                        "spool count corrected: nothing readable is left"
                    );
                    st.events = 0;
                    st.oldest_ms = None;
                    shared.update_gauges(&st);
                }
                return Ok(Batch::default());
            };
            let path = segment::path(&shared.dir, cursor.segment);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot delete", &path, e)),
            }
            let mut st = shared.state();
            if st.cursor == cursor {
                st.cursor = Position {
                    segment: next,
                    offset: 0,
                };
            }
            if let Some(len) = st.segments.remove(&cursor.segment) {
                st.disk_bytes = st.disk_bytes.saturating_sub(len);
            }
            shared.update_gauges(&st);
            continue;
        }
        let path = segment::path(&shared.dir, cursor.segment);
        let file = File::open(&path).map_err(|e| io_err("cannot open", &path, e))?;
        let read = segment::read_frames(&file, cursor.offset, end, max)
            .map_err(|e| io_err("cannot read", &path, e))?;
        if read.skipped > 0 {
            tracing::error!(segment = %path.display(), bytes = read.skipped, "skipped damaged spool bytes");
        }
        if read.frames.is_empty() {
            // Only damage up to `read.next`: step over it.
            let mut st = shared.state();
            if st.cursor == cursor {
                st.cursor.offset = read.next;
            }
            continue;
        }
        let mut batch = Batch::default();
        for (payload, end) in read.frames {
            batch.ends.push(Position {
                segment: cursor.segment,
                offset: end,
            });
            batch.items.push(match record::decode(&payload) {
                Ok(s) => Item::Record(s),
                Err(error) => Item::Undecodable { payload, error },
            });
        }
        if let Some(Item::Record(s)) = batch.items.first() {
            let mut st = shared.state();
            st.oldest_ms = Some(s.spooled_at_ms);
            shared.update_gauges(&st);
        }
        return Ok(batch);
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::record::{Record, Spooled};
    use crate::broker::Message;

    /// A small event record numbered `i`.
    pub fn event(i: usize) -> Spooled {
        Spooled {
            spooled_at_ms: 1_700_000_000_000 + i as u64,
            record: Record::Event(Message {
                subject: format!("pusher.1.channel_occupied.c{i}"),
                msg_id: format!("id-{i}"),
                body: Bytes::from(format!(r#"{{"name":"channel_occupied","channel":"c{i}"}}"#)),
                app_id: Arc::from("1"),
                event: "channel_occupied".into(),
                channel: format!("c{i}"),
                time_ms: "1700000000000".into(),
                trace: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
