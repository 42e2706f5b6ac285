//! Dead-letter tooling behind `pusher-bridge dlq list`, `dlq replay` and `dlq purge`.
//!
//! Both brokers store a dead letter the same way: the body is the event's message body (for a
//! `malformed` event the raw event JSON) and the headers of [`crate::broker::headers`] say where
//! it was going and why it did not get there. [`DeadLetterRecord`] is one letter read back from
//! those headers (on the ground floor, `crate::message`, beside the code that writes them;
//! `record` adds what the tools ask of it); `format` writes records for people (`write_table_header`,
//! `write_table_row`) and machines (`write_json_array`); `held` keeps a listing's output until
//! the listing succeeded; this module lists, `replay` replays and `purge` removes, over the
//! configured broker's store of letters (`LetterStore`: [`nats`] for JetStream, [`amqp`] for
//! RabbitMQ).
//!
//! Listing never removes a letter. Replaying publishes each replayable letter to its original
//! subject / routing key with its original message id and removes it only after the broker
//! acknowledged the publish; purging removes the letters its filter matches; everything else
//! stays where it is.

pub mod amqp;
mod format;
mod held;
#[cfg(test)]
mod list_store;
pub mod nats;
mod purge;
mod record;
mod replay;

use std::io::Write;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;

pub(crate) use self::format::{
    format_utc_ms, write_json_array, write_table_header, write_table_row,
};
pub use self::purge::{FilterError, PurgeError, PurgeFilter, purge, purge_line};
pub use self::replay::{LeftLetter, ReplaySummary, replay};
use crate::broker::{BoxError, BrokerError, cause};
use crate::config::{BrokerKind, Settings};
pub use crate::message::DeadLetterRecord;

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

/// A broker's dead letters as [`list`] and [`replay()`] walk them: in order, only the letters
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

/// `dlq list`: the dead letters as a table (with a count at the end) or, with `json`, as one
/// JSON array, printed on stdout once the listing succeeded. The output is written as the
/// letters are read, but held (`held`: in memory, beyond `held::MEMORY_LIMIT` in a temporary
/// file) until the end, so a listing that fails prints nothing on stdout: not the "0 dead
/// letters" of a broker it could not reach, nor half a table. Output is written on blocking
/// threads so the runtime never waits on a disk, a slow terminal or a pipe. Returns how many
/// letters were listed.
pub async fn print_list(settings: &Settings, json: bool) -> Result<u64, DlqError> {
    let (tx, mut rx) = mpsc::channel::<DeadLetterRecord>(256);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<held::Held> {
        let mut out = held::Held::new(held::MEMORY_LIMIT);
        let mut n = 0u64;
        let mut blocked = 0u64;
        if json {
            write_json_array(&mut out, std::iter::from_fn(|| rx.blocking_recv()))?;
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
        Ok(out)
    });
    let listed = list(settings, tx).await;
    let written = writer
        .await
        .map_err(|e| DlqError::Output(std::io::Error::other(e.to_string())))?;
    // A failed listing is the error to report; what it wrote is dropped unprinted.
    let n = listed?;
    let held = written?;
    let printed = tokio::task::spawn_blocking(move || {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        held.write_to(&mut out)
    })
    .await
    .map_err(|e| DlqError::Output(std::io::Error::other(e.to_string())))?;
    match printed {
        // The reader went away (`dlq list | head`): not an error of the listing.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(n),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(n),
    }
}

/// The benchmark-only null broker stores nothing, dead letters included.
#[cfg(feature = "bench-null-broker")]
fn null_broker() -> DlqError {
    BrokerError::connect_msg("the benchmark-only null broker keeps no dead letters").into()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::format::short_detail;
    use super::*;
    use crate::message::DlqReason;
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
