//! Dead letters on NATS JetStream: they are the messages of the stream `broker.nats.dlq_stream`
//! (subjects `<prefix>_dlq.<app>.<reason>`), read in sequence order with the stream's message
//! get API (which removes nothing). Replay (`super::replay`, through the bridge's own publisher)
//! sends each letter to its original subject with `Nats-Msg-Id` = the original id, so JetStream
//! drops it if the event did get through after all; the letter is deleted by sequence only
//! after the publish ack. Purge (`super::purge`) deletes the letters it matches by sequence, or,
//! when the subject says everything its filter asks, with filtered purges of the stream
//! (`purge_subject`).

use std::time::Duration;

use super::purge::PurgeError;
use super::{DeadLetterRecord, DlqError, LetterStore, REPLAY_WINDOW};
use crate::broker::{BoxError, nats};
use crate::config::Settings;
use crate::message::{DlqReason, is_subject_token};
use crate::routing;
use async_nats::HeaderMap;
use async_nats::jetstream::{
    self, ErrorCode,
    context::GetStreamErrorKind,
    stream::{RawMessageErrorKind, State},
};

/// How long the tools wait for the first connection to NATS before giving up.
pub(crate) const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Connects with the bridge's options (auth, TLS) and waits until connected, so a wrong URL is
/// an error instead of a hang.
pub async fn connect(settings: &Settings) -> Result<jetstream::Context, DlqError> {
    connect_with(settings, settings.broker.publish_timeout).await
}

/// [`connect`] with `request_timeout` for every JetStream request instead of
/// `broker.publish_timeout`.
async fn connect_with(
    settings: &Settings,
    request_timeout: Duration,
) -> Result<jetstream::Context, DlqError> {
    let s = &settings.broker.nats;
    let client = nats::connect_client(s, "pusher-bridge dlq").await?;
    nats::wait_connected(&client, s, CONNECT_WAIT).await?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(request_timeout)
        .max_ack_inflight(REPLAY_WINDOW * 2)
        .build(client))
}

/// Opens `broker.nats.dlq_stream` and reads its state (first and last sequence, messages).
async fn open_stream(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<(jetstream::stream::Stream, State), DlqError> {
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
    Ok((stream, state))
}

/// Timeout of one purge request: a filtered purge deletes message by message on the server,
/// which takes longer than the publish timeout the letter-by-letter requests get.
const PURGE_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Sequences one filtered purge request covers, so that each stays well inside
/// [`PURGE_REQUEST_TIMEOUT`] however large the stream (the sweeper's chunk, too).
const PURGE_CHUNK: u64 = 10_000;

/// The subject filter of the letters of `app` and `reason` in the DLQ stream:
/// `<prefix>_dlq.<app>.<reason>` as the bridge files them, `*` for the one not given, `>` (the
/// whole stream, every letter `dlq list` shows) for neither. `None` when the app id cannot be
/// one subject token (a wildcard, white space): such a filter must not become a wildcard, so
/// its letters are looked for one by one.
pub(super) fn letters_subject(
    prefix: &str,
    app: Option<&str>,
    reason: Option<DlqReason>,
) -> Option<String> {
    if app.is_none() && reason.is_none() {
        return Some(">".into());
    }
    let app = match app {
        Some(id) => {
            let token = routing::escape_token(id);
            if !is_subject_token(&token) {
                return None;
            }
            token.into_owned()
        }
        None => "*".into(),
    };
    let reason = reason.map_or("*", DlqReason::as_str);
    Some(format!("{}.{app}.{reason}", routing::dlq_prefix(prefix)))
}

/// Removes the letters on `subject` (from [`letters_subject`]; `>`: every letter) that were in
/// the stream when it was opened, and returns how many: filtered purges of [`PURGE_CHUNK`]
/// sequences each (a filtered purge is one atomic request on the server that leaves every other
/// message where it is), or for `>` one purge below the last sequence.
pub(super) async fn purge_subject(settings: &Settings, subject: &str) -> Result<u64, PurgeError> {
    let js = connect_with(settings, PURGE_REQUEST_TIMEOUT).await?;
    let (stream, state) = open_stream(&js, settings).await?;
    if state.messages == 0 {
        return Ok(0);
    }
    // Letters dead-lettered from now on wait for the next purge, as a walk would leave them.
    let below = state.last_sequence.saturating_add(1);
    let stopped = |removed, e| PurgeError::Stopped {
        removed,
        source: DlqError::op(format!("cannot purge {subject}"), e),
    };
    if subject == ">" {
        return match stream.purge().sequence(below).await {
            Ok(r) => Ok(r.purged),
            Err(e) => Err(stopped(0, e)),
        };
    }
    let mut removed = 0;
    let mut upto = state.first_sequence.max(1);
    while upto < below {
        upto = upto.saturating_add(PURGE_CHUNK).min(below);
        match stream.purge().filter(subject).sequence(upto).await {
            Ok(r) => removed += r.purged,
            Err(e) => return Err(stopped(removed, e)),
        }
    }
    Ok(removed)
}

/// The DLQ stream read in sequence order, from its first message to the last one that existed
/// when it was opened (letters dead-lettered meanwhile wait for the next run).
pub(super) struct Store {
    stream: jetstream::stream::Stream,
    /// The subjects walked: `>` (every letter), or a purge's `<prefix>_dlq.<app>.<reason>`
    /// filter, so the server skips the letters of other subjects.
    subject: String,
    next: u64,
    last: u64,
    /// Messages in the stream when it was opened (the progress bar's length; all subjects).
    count: u64,
}

impl Store {
    /// Connects (see [`connect`]) and opens `broker.nats.dlq_stream`, every letter.
    pub(super) async fn open(settings: &Settings) -> Result<Self, DlqError> {
        Self::open_on(settings, ">").await
    }

    /// [`Store::open`] for the letters on `subject` only (a filter from [`letters_subject`]).
    pub(super) async fn open_on(settings: &Settings, subject: &str) -> Result<Self, DlqError> {
        let js = connect(settings).await?;
        let (stream, state) = open_stream(&js, settings).await?;
        Ok(Self {
            stream,
            subject: subject.to_string(),
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
    /// on the store's subject at or after the next sequence.
    async fn next(&mut self) -> Result<Option<(DeadLetterRecord, u64)>, DlqError> {
        if self.next > self.last {
            return Ok(None);
        }
        let m = match self
            .stream
            .get_first_raw_message_by_subject(self.subject.as_str(), self.next)
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
    fn letters_are_looked_for_on_the_subject_the_bridge_files_them_under() {
        let reason = Some(DlqReason::NoStream);
        assert_eq!(letters_subject("p", None, None).as_deref(), Some(">"));
        assert_eq!(
            letters_subject("p", Some("42"), reason).as_deref(),
            Some("p_dlq.42.no_stream")
        );
        assert_eq!(
            letters_subject("p.q", Some("42"), None).as_deref(),
            Some("p.q_dlq.42.*")
        );
        assert_eq!(
            letters_subject("p", None, Some(DlqReason::Full)).as_deref(),
            Some("p_dlq.*.full")
        );
        // As routing::dlq_subject escapes it.
        assert_eq!(
            letters_subject("p", Some("a.b%"), reason).as_deref(),
            Some(routing::dlq_subject("p", "a.b%", "no_stream").as_str())
        );
        for not_a_token in ["*", ">", "a b", "a\tb"] {
            assert_eq!(letters_subject("p", Some(not_a_token), reason), None);
        }
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
