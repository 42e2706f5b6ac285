//! Dead letters on NATS JetStream: they are the messages of the stream `broker.nats.dlq_stream`
//! (subjects `<prefix>_dlq.<app>.<reason>`), read in sequence order with the stream's message
//! get API (which removes nothing). Replay publishes each letter to its original subject with
//! `Nats-Msg-Id` = the original id, so JetStream drops it if the event did get through after all,
//! and deletes the letter by sequence only after the publish ack. The publishing is the bridge's
//! own publisher's ([`crate::broker::Broker`]), so a replayed event carries the headers of a live
//! one.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self, ErrorCode, context::GetStreamErrorKind, stream::RawMessageErrorKind,
};
use indicatif::ProgressBar;
use tokio::sync::mpsc;

use super::{DeadLetterRecord, DlqError, REPLAY_WINDOW, ReplaySummary};
use crate::broker::{Broker, nats};
use crate::config::Settings;

/// How long the tools wait for the first connection to NATS before giving up.
pub(crate) const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Connects with the bridge's options (auth, TLS) and waits until connected, so a wrong URL is
/// an error instead of a hang.
pub async fn connect(settings: &Settings) -> Result<jetstream::Context, DlqError> {
    let s = &settings.broker.nats;
    let client = nats::connect_client(s, "pusher-bridge dlq").await?;
    nats::wait_connected(&client, s, CONNECT_WAIT).await?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(settings.broker.publish_timeout)
        .max_ack_inflight(REPLAY_WINDOW * 2)
        .build(client))
}

/// Reads the DLQ stream in sequence order, from its first message to the last one that existed
/// when the cursor opened (letters dead-lettered meanwhile wait for the next run).
struct Cursor {
    stream: jetstream::stream::Stream,
    next: u64,
    last: u64,
    /// Messages in the stream when the cursor opened (the progress bar's length).
    count: u64,
}

impl Cursor {
    async fn open(js: &jetstream::Context, name: &str) -> Result<Self, DlqError> {
        let mut stream = js.get_stream(name).await.map_err(|e| match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                DlqError::Missing {
                    kind: "stream",
                    name: name.to_string(),
                }
            }
            _ => DlqError::op(format!("cannot read stream {name}"), e),
        })?;
        let state = stream
            .info()
            .await
            .map_err(|e| DlqError::op(format!("cannot read stream {name}"), e))?
            .state
            .clone();
        Ok(Self {
            stream,
            next: state.first_sequence.max(1),
            last: if state.messages == 0 {
                0
            } else {
                state.last_sequence
            },
            count: state.messages,
        })
    }

    /// The next letter, or `None` at the end. Sequences deleted meanwhile (replayed, swept) are
    /// skipped by asking for the first message at or after the next sequence.
    async fn next(&mut self) -> Result<Option<DeadLetterRecord>, DlqError> {
        if self.next > self.last {
            return Ok(None);
        }
        let m = match self
            .stream
            .get_first_raw_message_by_subject(">", self.next)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => {
                return Err(DlqError::op(
                    format!("cannot read dead letter at sequence {}", self.next),
                    e,
                ));
            }
        };
        if m.sequence > self.last {
            return Ok(None);
        }
        self.next = m.sequence + 1;
        Ok(Some(record(m.sequence, &m.headers, m.payload)))
    }
}

/// Value of a header, names compared without regard to case.
fn header_value(h: &HeaderMap, name: &str) -> Option<String> {
    h.iter()
        .find(|(k, _)| AsRef::<str>::as_ref(k).eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str().to_string())
}

/// Builds the record of one stored message.
fn record(seq: u64, h: &HeaderMap, body: bytes::Bytes) -> DeadLetterRecord {
    let stored_id = header_value(h, async_nats::header::NATS_MESSAGE_ID.as_ref());
    DeadLetterRecord::from_headers(seq, |n| header_value(h, n), stored_id.as_deref(), body)
}

/// See [`super::list`].
pub async fn list(
    settings: &Settings,
    tx: mpsc::Sender<DeadLetterRecord>,
) -> Result<u64, DlqError> {
    let js = connect(settings).await?;
    let mut cursor = Cursor::open(&js, &settings.broker.nats.dlq_stream).await?;
    let mut n = 0;
    while let Some(r) = cursor.next().await? {
        if tx.send(r).await.is_err() {
            break;
        }
        n += 1;
    }
    Ok(n)
}

/// Why a subject cannot be published to on NATS (empty tokens, wildcards, white space).
fn subject_problem(subject: &str) -> Option<&'static str> {
    if subject
        .split('.')
        .any(|t| t.is_empty() || t == "*" || t == ">")
    {
        Some("the original subject is not a valid NATS subject")
    } else if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("the original subject contains white space")
    } else {
        None
    }
}

/// See [`super::replay`]: letters read here, published by `publisher` (the bridge's own).
pub async fn replay(
    settings: &Settings,
    publisher: &Broker,
    progress: &ProgressBar,
) -> Result<ReplaySummary, DlqError> {
    let js = connect(settings).await?;
    let mut cursor = Cursor::open(&js, &settings.broker.nats.dlq_stream).await?;
    progress.set_length(cursor.count);
    let timeout = settings.broker.publish_timeout;
    let mut summary = ReplaySummary {
        total: cursor.count,
        ..Default::default()
    };
    // Up to a window of letters published in their order, acks awaited together, then
    // settled in order: the events stream stores them in the DLQ's order.
    let mut batch: Vec<DeadLetterRecord> = Vec::with_capacity(REPLAY_WINDOW);
    loop {
        let next = cursor.next().await.unwrap_or_else(|e| {
            summary.stopped = Some(e.to_string());
            None
        });
        let done = next.is_none();
        if let Some(r) = next {
            summary.seen += 1;
            match r.replay_blocker().or_else(|| subject_problem(&r.subject)) {
                Some(why) => {
                    summary.leave(&r, why);
                    progress.inc(1);
                }
                None => batch.push(r),
            }
        }
        if done || batch.len() >= REPLAY_WINDOW {
            let results = super::republish(publisher, batch.iter(), timeout).await;
            for (r, result) in batch.drain(..).zip(results) {
                settle(&cursor.stream, r, result, &mut summary).await;
                progress.inc(1);
            }
        }
        if done {
            break;
        }
    }
    progress.finish_and_clear();
    Ok(summary)
}

/// After the publish ack: deletes the letter; after a failure: leaves it.
async fn settle(
    dlq: &jetstream::stream::Stream,
    r: DeadLetterRecord,
    result: Result<(), String>,
    summary: &mut ReplaySummary,
) {
    match result {
        Err(e) => summary.leave(&r, format!("refused again: {e}")),
        Ok(()) => match dlq.delete_message(r.position).await {
            Ok(_) => summary.replayed += 1,
            Err(e) => summary.leave(
                &r,
                format!("published, but could not be removed from the dead-letter stream: {e}"),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::headers;

    #[test]
    fn headers_are_read_without_regard_to_case() {
        let mut h = HeaderMap::new();
        h.insert("pusher-bridge-reason", "no_stream");
        h.insert("Nats-Msg-Id", "dlq-abc-1");
        let r = record(4, &h, bytes::Bytes::from_static(b"{}"));
        assert_eq!(r.reason, "no_stream");
        assert_eq!(r.msg_id, "abc-1");
        assert_eq!(r.position, 4);
    }

    #[test]
    fn a_letter_turns_back_into_its_event_message() {
        let mut h = HeaderMap::new();
        h.insert(headers::APP_ID, "1");
        h.insert(headers::EVENT, "e");
        h.insert(headers::CHANNEL, "c");
        h.insert(headers::TIME_MS, "5");
        h.insert(headers::DLQ_MSG_ID, "id-0");
        h.insert(headers::DLQ_SUBJECT, "p.1.e.c");
        let m = record(1, &h, bytes::Bytes::from_static(b"{}")).to_message();
        assert_eq!(m.subject, "p.1.e.c");
        assert_eq!(m.msg_id, "id-0");
        assert_eq!(&*m.app_id, "1");
        assert_eq!((m.event.as_str(), m.channel.as_str()), ("e", "c"));
        assert_eq!(m.time_ms, "5");
        assert_eq!(&m.body[..], b"{}");
    }

    #[test]
    fn unpublishable_subjects_are_caught() {
        assert_eq!(subject_problem("p.1.e.c%2Ed"), None);
        assert!(subject_problem("p..e").is_some());
        assert!(subject_problem("p.*.e").is_some());
        assert!(subject_problem("p.1.>").is_some());
        assert!(subject_problem("p.1 x.e").is_some());
    }
}
