//! Dead letters on NATS JetStream: they are the messages of the stream `broker.nats.dlq_stream`
//! (subjects `<prefix>_dlq.<app>.<reason>`), read in sequence order with the stream's message
//! get API (which removes nothing). Replay (`super::replay`, through the bridge's own publisher)
//! sends each letter to its original subject with `Nats-Msg-Id` = the original id, so JetStream
//! drops it if the event did get through after all; the letter is deleted by sequence only
//! after the publish ack.

use std::time::Duration;

use super::{DeadLetterRecord, DlqError, LetterStore, REPLAY_WINDOW};
use crate::broker::{BoxError, nats};
use crate::config::Settings;
use async_nats::HeaderMap;
use async_nats::jetstream::{
    self, ErrorCode, context::GetStreamErrorKind, stream::RawMessageErrorKind,
};

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

/// The DLQ stream read in sequence order, from its first message to the last one that existed
/// when it was opened (letters dead-lettered meanwhile wait for the next run).
pub(super) struct Store {
    stream: jetstream::stream::Stream,
    next: u64,
    last: u64,
    /// Messages in the stream when it was opened (the progress bar's length).
    count: u64,
}

impl Store {
    /// Connects (see [`connect`]) and opens `broker.nats.dlq_stream`.
    pub(super) async fn open(settings: &Settings) -> Result<Self, DlqError> {
        let js = connect(settings).await?;
        let name = settings.broker.nats.dlq_stream.as_str();
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
}

impl LetterStore for Store {
    /// The letter's sequence in the stream.
    type Handle = u64;
    const KIND: &'static str = "stream";

    fn count(&self) -> u64 {
        self.count
    }

    /// Sequences deleted meanwhile (replayed, swept) are skipped by asking for the first message
    /// at or after the next sequence.
    async fn next(&mut self) -> Result<Option<(DeadLetterRecord, u64)>, DlqError> {
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
        Ok(Some((
            record(m.sequence, &m.headers, m.payload),
            m.sequence,
        )))
    }

    fn blocker(&self, r: &DeadLetterRecord) -> Option<&'static str> {
        subject_problem(&r.subject)
    }

    async fn remove(&mut self, sequence: u64) -> Result<(), BoxError> {
        self.stream.delete_message(sequence).await?;
        Ok(())
    }

    /// A letter that stays is simply not deleted.
    fn keep(&mut self, _sequence: u64) {}

    async fn close(self) {}
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
