//! Dead-letter tooling behind `pusher-bridge dlq list` and `pusher-bridge dlq replay`.
//!
//! Both brokers store a dead letter the same way: the body is the event's message body (for a
//! `malformed` event the raw event JSON) and the headers of [`crate::broker::headers`] say where
//! it was going and why it did not get there. [`DeadLetterRecord`] is one letter read back from
//! those headers; this module formats records for people (`write_table_header`,
//! `write_table_row`) and machines (`write_json_array`), and drives listing and replaying over
//! the configured broker's store of letters (`LetterStore`: [`nats`] for JetStream, [`amqp`] for
//! RabbitMQ).
//!
//! Listing never removes a letter. Replaying publishes each replayable letter to its original
//! subject / routing key with its original message id and removes it only after the broker
//! acknowledged the publish; everything else stays where it is.

pub mod amqp;
pub mod nats;

use std::io::Write;

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::broker::{BoxError, Broker, BrokerError, cause};
use crate::config::{BrokerKind, Settings};
use crate::delivery::{Deliverer, Fate, Pending, Policy};
use crate::message::{DlqReason, LetterHeaders, Message};

/// How many publishes replay keeps awaiting an ack at once (memory bound, pipelining).
pub const REPLAY_WINDOW: usize = 64;
/// How many of the letters a replay left behind are kept in [`ReplaySummary::left_letters`];
/// the rest are only counted, so a huge dead-letter queue cannot exhaust memory.
pub(crate) const MAX_LEFT_DETAILS: usize = 100;
/// How many "left:" lines [`ReplaySummary::report`] prints; `dlq list` shows them all.
pub(crate) const REPORT_LINES: usize = 20;
/// Width of the detail column of the table; longer details are cut.
pub(crate) const DETAIL_WIDTH: usize = 60;

/// Listing or replaying dead letters failed as a whole (single letters that cannot be replayed
/// are not errors: they are counted in [`ReplaySummary`]).
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The broker cannot be reached or refused the login.
    #[error(transparent)]
    Connect(#[from] BrokerError),
    /// The dead-letter stream / queue of the configuration does not exist.
    #[error(
        "the dead-letter {kind} `{name}` does not exist (has the bridge run with this configuration?)"
    )]
    Missing {
        /// `stream` or `queue`.
        kind: &'static str,
        /// Its configured name.
        name: String,
    },
    /// A broker request failed midway.
    #[error("broker operation failed: {what}{}", cause(.source))]
    Operation {
        /// What was being done.
        what: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// Writing the listing failed.
    #[error("cannot write the listing: {0}")]
    Output(#[from] std::io::Error),
}

impl DlqError {
    /// A broker request for `what` that failed with `source`.
    fn op(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        DlqError::Operation {
            what: what.into(),
            source: Some(source.into()),
        }
    }
}

/// One stored dead letter, read back from its headers and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterRecord {
    /// Where the letter sits: the JetStream sequence in the DLQ stream, or the 1-based position
    /// in the AMQP dead-letter queue at the time it was read.
    pub position: u64,
    /// The subject / routing key the event was meant for (empty for malformed events).
    pub subject: String,
    /// The event's original message id (`Nats-Msg-Id` / AMQP `message_id` on replay).
    pub msg_id: String,
    /// Why it was dead-lettered (`malformed`, `no_stream`, ...; kept verbatim if unknown).
    pub reason: String,
    /// The failure's detail (a parse error, the broker's answer).
    pub detail: String,
    /// Publish attempts made before giving up.
    pub attempts: u32,
    /// Unix milliseconds of the first failure (0 when the header is missing).
    pub first_failure_ms: u64,
    /// The app id.
    pub app_id: String,
    /// The event name (empty for malformed events).
    pub event: String,
    /// The channel (empty for malformed events).
    pub channel: String,
    /// The webhook's `time_ms` as sent.
    pub time_ms: String,
    /// The stored body: the message body to replay, or the raw event JSON of a malformed event.
    pub body: Bytes,
}

impl DeadLetterRecord {
    /// Builds a record from a stored letter. `header` looks a header up by its name (the names of
    /// [`crate::broker::headers`]); `stored_id` is the letter's own message id (`dlq-<msg_id>`),
    /// used for the original id when the `Pusher-Bridge-Msg-Id` header is missing.
    pub(crate) fn from_headers(
        position: u64,
        header: impl Fn(&str) -> Option<String>,
        stored_id: Option<&str>,
        body: Bytes,
    ) -> Self {
        let h = LetterHeaders::read(header, stored_id);
        Self {
            position,
            subject: h.subject,
            msg_id: h.msg_id,
            reason: h.reason,
            detail: h.detail,
            attempts: h.attempts,
            first_failure_ms: h.first_failure_ms,
            app_id: h.app_id,
            event: h.event,
            channel: h.channel,
            time_ms: h.time_ms,
            body,
        }
    }

    /// The reason as the bridge's enum, when it is one the bridge knows.
    pub(crate) fn reason_kind(&self) -> Option<DlqReason> {
        DlqReason::parse(&self.reason)
    }

    /// Why this letter cannot be replayed, or `None` when it can be.
    pub fn replay_blocker(&self) -> Option<&'static str> {
        if self.reason_kind() == Some(DlqReason::Malformed) {
            Some("malformed event: there is no subject to replay it to")
        } else if self.subject.is_empty() {
            Some("the letter has no original subject")
        } else if self.msg_id.is_empty() {
            Some("the letter has no original message id")
        } else {
            None
        }
    }

    /// The event message this letter was dead-lettered from: what replay publishes, through
    /// the broker's own publisher, so it gets exactly the headers / properties of a live event
    /// (also the `ce-` ones of `broker.cloudevents`).
    pub(crate) fn to_message(&self) -> Message {
        Message {
            subject: self.subject.clone(),
            msg_id: self.msg_id.clone(),
            body: self.body.clone(),
            app_id: self.app_id.as_str().into(),
            event: self.event.clone(),
            channel: self.channel.clone(),
            time_ms: self.time_ms.clone(),
        }
    }

    /// The first failure as human-readable UTC.
    pub fn first_failure(&self) -> String {
        format_utc_ms(self.first_failure_ms)
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm UTC`; `-` for 0 (unknown).
pub(crate) fn format_utc_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    // `2023-11-14T22:13:20.123Z` -> `2023-11-14 22:13:20.123 UTC`
    let s = humantime::format_rfc3339_millis(t).to_string();
    format!("{} UTC", s.trim_end_matches('Z').replacen('T', " ", 1))
}

/// `detail` on one line, cut to `max` characters (with `…` when cut).
pub(crate) fn short_detail(detail: &str, max: usize) -> String {
    let one_line: String = detail.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Shows `-` for an empty value in the table.
fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// The table's column titles (see [`write_table_row`]).
pub(crate) fn write_table_header(out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>8}  {:<27}  {:<10}  {:>3}  {:<10}  {:<56}  {:<36}  DETAIL",
        "POSITION", "FIRST FAILURE", "REASON", "TRY", "APP", "SUBJECT", "MESSAGE ID"
    )
}

/// One letter as a table row: position, first failure (UTC), reason, attempts, app, original
/// subject, message id, short detail. Columns have fixed widths (a longer value pushes the rest
/// of its row right) so rows can be written as they are read, without holding the whole queue.
pub(crate) fn write_table_row(out: &mut impl Write, r: &DeadLetterRecord) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>8}  {:<27}  {:<10}  {:>3}  {:<10}  {:<56}  {:<36}  {}",
        r.position,
        r.first_failure(),
        or_dash(&r.reason),
        r.attempts,
        or_dash(&r.app_id),
        or_dash(&r.subject),
        or_dash(&r.msg_id),
        short_detail(&r.detail, DETAIL_WIDTH),
    )
}

/// The JSON form of a record (`dlq list --json`): every field, the body as its exact text.
#[derive(Serialize)]
struct JsonRecord<'a> {
    position: u64,
    subject: &'a str,
    msg_id: &'a str,
    reason: &'a str,
    detail: &'a str,
    attempts: u32,
    first_failure_ms: u64,
    first_failure: String,
    app_id: &'a str,
    event: &'a str,
    channel: &'a str,
    time_ms: &'a str,
    replayable: bool,
    body: std::borrow::Cow<'a, str>,
}

/// One record as a single line of JSON.
pub(crate) fn record_json(r: &DeadLetterRecord) -> String {
    let j = JsonRecord {
        position: r.position,
        subject: &r.subject,
        msg_id: &r.msg_id,
        reason: &r.reason,
        detail: &r.detail,
        attempts: r.attempts,
        first_failure_ms: r.first_failure_ms,
        first_failure: r.first_failure(),
        app_id: &r.app_id,
        event: &r.event,
        channel: &r.channel,
        time_ms: &r.time_ms,
        replayable: r.replay_blocker().is_none(),
        body: String::from_utf8_lossy(&r.body),
    };
    // Serializing plain strings and numbers cannot fail.
    serde_json::to_string(&j).unwrap_or_default()
}

/// Writes records as one JSON array, one record per line, as they arrive (`[]` when empty).
pub(crate) fn write_json_array(
    out: &mut impl Write,
    records: impl IntoIterator<Item = DeadLetterRecord>,
) -> std::io::Result<()> {
    let mut first = true;
    for r in records {
        out.write_all(if first { b"[\n" } else { b",\n" })?;
        out.write_all(record_json(&r).as_bytes())?;
        first = false;
    }
    out.write_all(if first { b"[]\n" } else { b"\n]\n" })
}

/// A letter a replay left in the dead-letter queue, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftLetter {
    /// Its position (see [`DeadLetterRecord::position`]).
    pub position: u64,
    /// Its original message id.
    pub msg_id: String,
    /// Its original subject.
    pub subject: String,
    /// Why it stays: not replayable, or the broker's refusal.
    pub why: String,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Letters in the dead-letter queue when the replay started (the ones it works on).
    pub total: u64,
    /// Letters looked at.
    pub seen: u64,
    /// Letters published, acknowledged and removed from the dead-letter queue.
    pub replayed: u64,
    /// Letters looked at that stay in the dead-letter queue.
    pub left: u64,
    /// The first `MAX_LEFT_DETAILS` (100) letters that stay, with why.
    pub left_letters: Vec<LeftLetter>,
    /// Why the replay stopped before the end of the queue (the broker went away, the events
    /// exchange is missing); letters not reached stay too.
    pub stopped: Option<String>,
}

impl ReplaySummary {
    /// Whether every letter went and nothing stopped the replay (exit 0).
    pub fn all_replayed(&self) -> bool {
        self.left == 0 && self.stopped.is_none()
    }

    /// Letters of the run that are still in the dead-letter queue: those left plus, when the
    /// replay stopped early, those it did not reach.
    pub fn left_total(&self) -> u64 {
        self.left + self.unreached()
    }

    /// Letters a replay that stopped early did not reach (0 for a complete run: letters that
    /// vanished meanwhile, swept by retention, are not counted).
    fn unreached(&self) -> u64 {
        if self.stopped.is_some() {
            self.total.saturating_sub(self.seen)
        } else {
            0
        }
    }

    /// Counts one letter that stays.
    pub fn leave(&mut self, r: &DeadLetterRecord, why: impl Into<String>) {
        self.left += 1;
        if self.left_letters.len() < MAX_LEFT_DETAILS {
            self.left_letters.push(LeftLetter {
                position: r.position,
                msg_id: r.msg_id.clone(),
                subject: r.subject.clone(),
                why: why.into(),
            });
        }
    }

    /// The one-line summary printed at the end of a replay.
    pub fn line(&self) -> String {
        let mut s = format!(
            "replayed {} of {} dead letters; {} left in the dead-letter queue",
            self.replayed,
            self.seen + self.unreached(),
            self.left_total()
        );
        if let Some(why) = &self.stopped {
            s.push_str(&format!("; stopped early: {why}"));
        }
        s
    }

    /// The summary line followed by one line per letter left (at most `REPORT_LINES`, 20).
    pub fn report(&self) -> String {
        let mut s = self.line();
        s.push('\n');
        for l in self.left_letters.iter().take(REPORT_LINES) {
            s.push_str(&format!(
                "left: position {} msg id {} subject {}: {}\n",
                l.position,
                or_dash(&l.msg_id),
                or_dash(&l.subject),
                l.why
            ));
        }
        let shown = self.left_letters.len().min(REPORT_LINES) as u64;
        if self.left > shown {
            s.push_str(&format!(
                "left: ... and {} more (`pusher-bridge dlq list` shows every letter)\n",
                self.left - shown
            ));
        }
        s
    }
}

/// The replay progress bar: drawn on stdout when stdout is a terminal, hidden otherwise (pipes,
/// logs and tests then see only the summary).
pub fn progress_bar() -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
    if let Ok(style) =
        ProgressStyle::with_template("replaying {bar:40} {pos}/{len} dead letters ({eta} left)")
    {
        bar.set_style(style);
    }
    bar
}

/// Sends every dead letter of the configured broker to `tx`, in queue order, and returns how
/// many were sent. Removes nothing. Stops early (without error) when the receiver is dropped.
/// AMQP: the letters are held unacknowledged by this connection while it runs and return to
/// their places when it ends, so another reader of the DLQ queue does not see them meanwhile.
pub async fn list(
    settings: &Settings,
    tx: mpsc::Sender<DeadLetterRecord>,
) -> Result<u64, DlqError> {
    match settings.broker.kind {
        BrokerKind::Nats => list_store(nats::Store::open(settings).await?, &tx).await,
        BrokerKind::Amqp => list_store(amqp::Store::open(settings).await?, &tx).await,
        #[cfg(feature = "bench-null-broker")]
        BrokerKind::Null => Err(null_broker()),
    }
}

/// A broker's dead letters as [`list`] and [`replay`] walk them: in order, only the letters
/// present when the store was opened, each one removed (after its replay was acknowledged) or
/// kept in its place. [`nats::Store`] and [`amqp::Store`] are the two.
trait LetterStore {
    /// What removes one fetched letter.
    type Handle;
    /// `stream` or `queue`, for messages.
    const KIND: &'static str;
    /// Letters present when the store was opened (the progress bar's length).
    fn count(&self) -> u64;
    /// The next letter, or `None` after the last one present when opened.
    async fn next(&mut self) -> Result<Option<(DeadLetterRecord, Self::Handle)>, DlqError>;
    /// Why this broker cannot take the letter back although its headers are whole.
    fn blocker(&self, _r: &DeadLetterRecord) -> Option<&'static str> {
        None
    }
    /// Removes a letter whose replay the broker acknowledged.
    async fn remove(&mut self, handle: Self::Handle) -> Result<(), BoxError>;
    /// Keeps a letter in its place.
    fn keep(&mut self, handle: Self::Handle);
    /// Ends the walk: every kept letter is back in its place, the connection closed.
    async fn close(self);
}

/// Sends every letter of `store` to `tx` and removes none.
async fn list_store<S: LetterStore>(
    mut store: S,
    tx: &mpsc::Sender<DeadLetterRecord>,
) -> Result<u64, DlqError> {
    let mut n = 0;
    let result = loop {
        match store.next().await {
            Ok(Some((r, handle))) => {
                store.keep(handle);
                if tx.send(r).await.is_err() {
                    break Ok(n);
                }
                n += 1;
            }
            Ok(None) => break Ok(n),
            Err(e) => break Err(e),
        }
    };
    store.close().await;
    result
}

/// Replays the letters of `store` through `publisher`: a window of letters published in their
/// order with all acks awaited together, then settled in order, so the events stream / queue
/// gets them in the DLQ's order. A letter is removed after its ack and kept otherwise.
async fn replay_store<S: LetterStore>(
    mut store: S,
    publisher: &Deliverer,
    progress: &ProgressBar,
) -> ReplaySummary {
    progress.set_length(store.count());
    let mut summary = ReplaySummary {
        total: store.count(),
        ..Default::default()
    };
    let mut batch: Vec<(DeadLetterRecord, S::Handle)> = Vec::with_capacity(REPLAY_WINDOW);
    loop {
        let next = store.next().await.unwrap_or_else(|e| {
            summary.stopped = Some(e.to_string());
            None
        });
        let done = next.is_none();
        if let Some((r, handle)) = next {
            summary.seen += 1;
            match r.replay_blocker().or_else(|| store.blocker(&r)) {
                Some(why) => {
                    summary.leave(&r, why);
                    store.keep(handle);
                    progress.inc(1);
                }
                None => batch.push((r, handle)),
            }
        }
        if done || batch.len() >= REPLAY_WINDOW {
            let results = republish(publisher, batch.iter().map(|(r, _)| r)).await;
            for ((r, handle), result) in batch.drain(..).zip(results) {
                match result {
                    Err(e) => {
                        summary.leave(&r, format!("refused again: {e}"));
                        store.keep(handle);
                    }
                    Ok(()) => match store.remove(handle).await {
                        Ok(()) => summary.replayed += 1,
                        Err(e) => summary.leave(
                            &r,
                            format!(
                                "published, but could not be removed from the dead-letter {}: {e}",
                                S::KIND
                            ),
                        ),
                    },
                }
                progress.inc(1);
            }
        }
        if done {
            break;
        }
    }
    store.close().await;
    progress.finish_and_clear();
    summary
}

/// Every dead letter in queue order, collected in memory (for tests and small queues; the CLI
/// streams with [`print_list`]).
pub async fn list_all(settings: &Settings) -> Result<Vec<DeadLetterRecord>, DlqError> {
    let (tx, mut rx) = mpsc::channel(256);
    let collect = async {
        let mut all = Vec::new();
        while let Some(r) = rx.recv().await {
            all.push(r);
        }
        all
    };
    let (listed, all) = tokio::join!(list(settings, tx), collect);
    listed?;
    Ok(all)
}

/// `dlq list`: writes the dead letters to stdout as they are read, as a table (with a count at
/// the end) or, with `json`, as one JSON array. Stdout is written on a blocking thread so the
/// runtime never waits on a slow terminal or pipe. Returns how many letters were listed.
pub async fn print_list(settings: &Settings, json: bool) -> Result<u64, DlqError> {
    let (tx, mut rx) = mpsc::channel::<DeadLetterRecord>(256);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let mut n = 0u64;
        let mut blocked = 0u64;
        if json {
            let records = std::iter::from_fn(|| rx.blocking_recv()).inspect(|_| n += 1);
            write_json_array(&mut out, records)?;
        } else {
            while let Some(r) = rx.blocking_recv() {
                if n == 0 {
                    write_table_header(&mut out)?;
                }
                n += 1;
                if r.replay_blocker().is_some() {
                    blocked += 1;
                }
                write_table_row(&mut out, &r)?;
            }
            writeln!(
                out,
                "{n} dead letter{} ({blocked} cannot be replayed)",
                if n == 1 { "" } else { "s" }
            )?;
        }
        out.flush()?;
        Ok(n)
    });
    let listed = list(settings, tx).await;
    let written = writer
        .await
        .map_err(|e| DlqError::Output(std::io::Error::other(e.to_string())))?;
    let n = listed?;
    match written {
        // The reader went away (`dlq list | head`): not an error of the listing.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(n),
        Err(e) => Err(e.into()),
        Ok(_) => Ok(n),
    }
}

/// The benchmark-only null broker stores nothing, dead letters included.
#[cfg(feature = "bench-null-broker")]
fn null_broker() -> DlqError {
    BrokerError::connect_msg("the benchmark-only null broker keeps no dead letters").into()
}

/// Publishes `letters` as their event messages, in this order, all acks awaited together, as
/// the deliverer does for every path (with replay's policy: a refusal that may pass is tried a
/// few times; nothing is dead-lettered again, the letter stays): one result per letter.
async fn republish<'a>(
    publisher: &Deliverer,
    letters: impl Iterator<Item = &'a DeadLetterRecord>,
) -> Vec<Result<(), String>> {
    let messages: Vec<Message> = letters.map(DeadLetterRecord::to_message).collect();
    let pending: Vec<Pending<'_>> = messages
        .iter()
        .map(|message| Pending {
            message,
            failed_since_ms: None,
        })
        .collect();
    publisher
        .events(&pending, Policy::replay())
        .await
        .into_iter()
        .map(|fate| match fate {
            Fate::Published => Ok(()),
            Fate::Kept { why, .. } => Err(why.to_string()),
            // Replay's policy dead-letters nothing.
            Fate::DeadLettered(_) | Fate::Unplaceable(_) => Err("dead-lettered again".into()),
        })
        .collect()
}

/// How long replay waits for the broker's publisher to connect (and declare, with
/// `broker.declare`) before giving up.
const PUBLISHER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `dlq replay`: publishes every replayable dead letter to its original subject / routing key
/// with its original message id and removes each one once the broker acknowledged it. Letters
/// that cannot be replayed or are refused again stay. `progress` gets the total and one tick per
/// letter handled.
///
/// The letters are read (and removed) by the broker's `LetterStore`; they are published by the
/// bridge's own [`Broker`], the publisher of live events: the same headers and properties, the
/// same confirm handling, and on RabbitMQ the same attribution of `basic.return`s to the message
/// they belong to (a confirm's attached return may be another message's when several are in
/// flight, which once left letters in neither the queue nor the DLQ).
pub async fn replay(
    settings: &Settings,
    progress: &ProgressBar,
) -> Result<ReplaySummary, DlqError> {
    #[cfg(feature = "bench-null-broker")]
    if settings.broker.kind == BrokerKind::Null {
        return Err(null_broker());
    }
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    // Replay publishes into the topology as it is: a letter that no queue or stream takes now
    // stays a letter, rather than the tool creating the bridge's catch-all queue for it.
    let mut publishing = settings.clone();
    publishing.broker.declare = false;
    let broker = std::sync::Arc::new(Broker::connect(&publishing, metrics.clone()).await?);
    if !broker.wait_up(PUBLISHER_WAIT).await {
        broker.close().await;
        return Err(BrokerError::connect_msg(format!(
            "the broker's publisher was not up within {PUBLISHER_WAIT:?}"
        ))
        .into());
    }
    let publisher = Deliverer::new(
        broker.clone(),
        metrics,
        settings.broker.publish_timeout,
        REPLAY_WINDOW,
    );
    let result = match settings.broker.kind {
        BrokerKind::Nats => match nats::Store::open(settings).await {
            Ok(store) => Ok(replay_store(store, &publisher, progress).await),
            Err(e) => Err(e),
        },
        BrokerKind::Amqp => match amqp::Store::open(settings).await {
            Ok(store) => Ok(replay_store(store, &publisher, progress).await),
            Err(e) => Err(e),
        },
        #[cfg(feature = "bench-null-broker")]
        BrokerKind::Null => Err(null_broker()),
    };
    broker.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn full() -> DeadLetterRecord {
        DeadLetterRecord::from_headers(
            7,
            lookup(&[
                ("Pusher-App-Id", "123456"),
                ("Pusher-Event", "member_added"),
                ("Pusher-Channel", "presence-a.b"),
                ("Pusher-Time-Ms", "1700000000123"),
                (
                    "Pusher-Bridge-Subject",
                    "pusher.123456.member_added.presence-a%2Eb",
                ),
                ("Pusher-Bridge-Msg-Id", "abc-0"),
                ("Pusher-Bridge-Reason", "no_stream"),
                ("Pusher-Bridge-Detail", "no stream found for\n subject"),
                ("Pusher-Bridge-Attempts", "3"),
                ("Pusher-Bridge-First-Failure-Ms", "1700000000123"),
            ]),
            Some("dlq-abc-0"),
            Bytes::from_static(br#"{"name":"member_added"}"#),
        )
    }

    #[test]
    fn every_header_lands_in_its_field() {
        let r = full();
        assert_eq!(r.position, 7);
        assert_eq!(r.app_id, "123456");
        assert_eq!(r.event, "member_added");
        assert_eq!(r.channel, "presence-a.b");
        assert_eq!(r.time_ms, "1700000000123");
        assert_eq!(r.subject, "pusher.123456.member_added.presence-a%2Eb");
        assert_eq!(r.msg_id, "abc-0");
        assert_eq!(r.reason, "no_stream");
        assert_eq!(r.reason_kind(), Some(DlqReason::NoStream));
        assert_eq!(r.attempts, 3);
        assert_eq!(r.first_failure_ms, 1_700_000_000_123);
        assert_eq!(r.replay_blocker(), None);
    }

    #[test]
    fn missing_or_bad_headers_give_defaults_and_block_replay() {
        let r = DeadLetterRecord::from_headers(
            1,
            lookup(&[("Pusher-Bridge-Attempts", "many")]),
            None,
            Bytes::new(),
        );
        assert_eq!(r.attempts, 0);
        assert_eq!(r.first_failure_ms, 0);
        assert_eq!(r.first_failure(), "-");
        assert_eq!(r.reason_kind(), None);
        assert!(r.replay_blocker().is_some());
    }

    #[test]
    fn message_id_falls_back_to_the_stored_id() {
        let r = DeadLetterRecord::from_headers(
            1,
            lookup(&[("Pusher-Bridge-Subject", "p.1.e.c")]),
            Some("dlq-xyz-4"),
            Bytes::new(),
        );
        assert_eq!(r.msg_id, "xyz-4");
        assert_eq!(r.replay_blocker(), None);
        let no_prefix = DeadLetterRecord::from_headers(1, lookup(&[]), Some("xyz-4"), Bytes::new());
        assert_eq!(no_prefix.msg_id, "");
    }

    #[test]
    fn malformed_letters_cannot_be_replayed() {
        let r = DeadLetterRecord::from_headers(
            2,
            lookup(&[
                ("Pusher-Bridge-Reason", "malformed"),
                ("Pusher-Bridge-Subject", ""),
                ("Pusher-Bridge-Msg-Id", "abc-1"),
            ]),
            None,
            Bytes::from_static(b"{\"name\":1}"),
        );
        assert!(r.replay_blocker().unwrap().contains("malformed"));
        let mut with_subject = r.clone();
        with_subject.subject = "p.1.e.c".into();
        assert!(
            with_subject.replay_blocker().is_some(),
            "malformed stays malformed"
        );
    }

    #[test]
    fn times_are_utc_and_readable() {
        assert_eq!(
            format_utc_ms(1_700_000_000_123),
            "2023-11-14 22:13:20.123 UTC"
        );
        assert_eq!(format_utc_ms(86_400_000), "1970-01-02 00:00:00.000 UTC");
        assert_eq!(format_utc_ms(0), "-");
    }

    #[test]
    fn details_are_one_short_line() {
        assert_eq!(short_detail("a\n  b\tc", 60), "a b c");
        let long = "x".repeat(100);
        let cut = short_detail(&long, 10);
        assert_eq!(cut.chars().count(), 10);
        assert!(cut.ends_with('…'));
        assert_eq!(short_detail("ünïcödé", 4), "ünï…");
    }

    #[test]
    fn table_rows_carry_every_shown_field() {
        let mut out = Vec::new();
        write_table_header(&mut out).unwrap();
        write_table_row(&mut out, &full()).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("FIRST FAILURE") && lines[0].contains("SUBJECT"));
        for want in [
            "7",
            "2023-11-14 22:13:20.123 UTC",
            "no_stream",
            "3",
            "123456",
            "pusher.123456.member_added.presence-a%2Eb",
            "abc-0",
            "no stream found for subject",
        ] {
            assert!(lines[1].contains(want), "{want} missing in {}", lines[1]);
        }
        // Columns line up with the header.
        let h = lines[0].find("SUBJECT").unwrap();
        assert_eq!(lines[1].find("pusher.123456"), Some(h));
    }

    #[test]
    fn json_is_one_array_with_every_field_and_the_body() {
        let mut out = Vec::new();
        let mut malformed = full();
        malformed.reason = "malformed".into();
        malformed.subject.clear();
        malformed.body = Bytes::from_static(b"[1,2]");
        write_json_array(&mut out, vec![full(), malformed]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0]["subject"], "pusher.123456.member_added.presence-a%2Eb");
        assert_eq!(a[0]["msg_id"], "abc-0");
        assert_eq!(a[0]["reason"], "no_stream");
        assert_eq!(a[0]["attempts"], 3);
        assert_eq!(a[0]["first_failure_ms"], 1_700_000_000_123u64);
        assert_eq!(a[0]["first_failure"], "2023-11-14 22:13:20.123 UTC");
        assert_eq!(a[0]["app_id"], "123456");
        assert_eq!(a[0]["event"], "member_added");
        assert_eq!(a[0]["channel"], "presence-a.b");
        assert_eq!(a[0]["time_ms"], "1700000000123");
        assert_eq!(a[0]["detail"], "no stream found for\n subject");
        assert_eq!(a[0]["position"], 7);
        assert_eq!(a[0]["replayable"], true);
        assert_eq!(a[0]["body"], r#"{"name":"member_added"}"#);
        assert_eq!(a[1]["replayable"], false);
        assert_eq!(a[1]["body"], "[1,2]");
        // One record per line between the brackets.
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 4);

        let mut empty = Vec::new();
        write_json_array(&mut empty, Vec::new()).unwrap();
        assert_eq!(empty, b"[]\n");
    }

    #[test]
    fn summary_counts_and_caps_details() {
        let mut s = ReplaySummary {
            total: 3,
            seen: 3,
            replayed: 2,
            ..Default::default()
        };
        assert!(s.all_replayed());
        s.leave(&full(), "no stream");
        assert!(!s.all_replayed());
        assert_eq!(
            s.line(),
            "replayed 2 of 3 dead letters; 1 left in the dead-letter queue"
        );
        assert!(s.report().contains("left: position 7 msg id abc-0"));
        for _ in 0..MAX_LEFT_DETAILS + 5 {
            s.leave(&full(), "again");
        }
        assert_eq!(s.left_letters.len(), MAX_LEFT_DETAILS);
        assert!(s.report().contains("... and 86 more"));
        assert_eq!(s.report().lines().count(), 1 + REPORT_LINES + 1);
        let stopped = ReplaySummary {
            total: 10,
            seen: 4,
            replayed: 3,
            left: 1,
            stopped: Some("connection lost".into()),
            ..Default::default()
        };
        assert!(!stopped.all_replayed());
        assert_eq!(stopped.left_total(), 7, "the 6 not reached stay too");
        assert_eq!(
            stopped.line(),
            "replayed 3 of 10 dead letters; 7 left in the dead-letter queue; stopped early: connection lost"
        );
    }
}
