//! The ground floor: what every layer hands to every other, importing nothing of the crate.
//!
//! - [`Message`]: one event ready to publish; [`DeadLetter`]: one that could not be, with
//!   [`DlqReason`]; the dead-letter headers both brokers write (`DeadLetter::headers`) and
//!   the `dlq` tools read back ([`DeadLetterRecord`]).
//! - [`PublishError`]: how a publish failed, transient or the broker's lasting answer
//!   ([`PublishError::is_transient`]); the brokers sort their answers into it, the delivery
//!   policy decides what to do about it.
//! - [`EVENT_TYPES`]: the event names Pusher sends; [`now_ms`].

use std::sync::Arc;

use bytes::Bytes;

/// Every event type Pusher sends (`send-test` posts them in its own order, `SESSION`); also the
/// `event` label values of the metrics (any other name is `other`).
pub const EVENT_TYPES: [&str; 7] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
];

/// One event, ready to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// NATS subject and AMQP routing key (`<prefix>.<app>.<event>.<channel>`, escaped).
    pub subject: String,
    /// Deterministic id (`Nats-Msg-Id` / AMQP `message_id`).
    pub msg_id: String,
    /// JSON body: the event plus `app_id` and `time_ms`.
    pub body: Bytes,
    /// App id, also sent as a header.
    pub app_id: Arc<str>,
    /// Event name, also sent as a header (and the metric label).
    pub event: String,
    /// Channel, also sent as a header.
    pub channel: String,
    /// The webhook's `time_ms` as sent.
    pub time_ms: String,
    /// The W3C trace context the message carries in its headers (`[tracing]` on and the
    /// webhook sampled): its producer span's, so a consumer continues the trace. Boxed: most
    /// messages have none, and a message is moved often.
    pub trace: Option<Box<TraceContext>>,
}

/// A W3C trace context as a message carries it: `traceparent` and, when the caller sent one,
/// `tracestate`, both as header values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-<trace id>-<span id>-<flags>`.
    pub traceparent: String,
    /// The vendors' `tracestate`, passed on unchanged.
    pub tracestate: Option<String>,
}

/// Why an event went to the dead-letter queue (the `reason` label and header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DlqReason {
    /// The event has no string `name` / `channel` or is not an object.
    Malformed,
    /// NATS: no stream takes the subject (the JetStream API confirmed it); RabbitMQ: the
    /// events exchange does not exist (`broker.declare = false`).
    NoStream,
    /// The message is larger than the broker accepts.
    TooLarge,
    /// The broker refused the message for another lasting reason.
    Rejected,
    /// AMQP: the broker nacked the message, even after retries.
    Nacked,
    /// AMQP: no queue is bound for the routing key (returned by `mandatory`).
    Unroutable,
    /// NATS: the stream is full: its limits (`max_msgs`, `max_bytes`, `max_msgs_per_subject`
    /// with `discard = new`) refuse new messages. Named apart from
    /// `rejected` because retrying within a webhook's answer cannot change it, and because
    /// the operator's remedy is plain: raise the limit or let retention make room.
    Full,
}

impl DlqReason {
    /// Every reason (the metrics create a dead-letter series for each at start-up).
    pub const ALL: [DlqReason; 7] = [
        DlqReason::Malformed,
        DlqReason::NoStream,
        DlqReason::TooLarge,
        DlqReason::Rejected,
        DlqReason::Nacked,
        DlqReason::Unroutable,
        DlqReason::Full,
    ];

    /// Label / header value.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::Malformed => "malformed",
            DlqReason::NoStream => "no_stream",
            DlqReason::TooLarge => "too_large",
            DlqReason::Rejected => "rejected",
            DlqReason::Nacked => "nacked",
            DlqReason::Unroutable => "unroutable",
            DlqReason::Full => "full",
        }
    }

    /// Parses a label / header value back.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "malformed" => DlqReason::Malformed,
            "no_stream" => DlqReason::NoStream,
            "too_large" => DlqReason::TooLarge,
            "rejected" => DlqReason::Rejected,
            "nacked" => DlqReason::Nacked,
            "unroutable" => DlqReason::Unroutable,
            "full" => DlqReason::Full,
            _ => return None,
        })
    }
}

/// An event that could not be delivered to its subject, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event. For a malformed event `subject` is empty (none could be made) and `body` is the
    /// event's raw JSON text; otherwise both are what would have been published.
    pub message: Message,
    /// Why it is here.
    pub reason: DlqReason,
    /// Human-readable detail (a parse error, the broker's answer).
    pub detail: String,
    /// Publish attempts made before giving up (0 for malformed events).
    pub attempts: u32,
    /// Unix milliseconds of the first failure.
    pub first_failure_ms: u64,
}

/// Header names the bridge sets on messages and dead letters (NATS headers, AMQP headers).
pub mod headers {
    /// The app id.
    pub const APP_ID: &str = "Pusher-App-Id";
    /// The event name.
    pub const EVENT: &str = "Pusher-Event";
    /// The channel.
    pub const CHANNEL: &str = "Pusher-Channel";
    /// The webhook's `time_ms`.
    pub const TIME_MS: &str = "Pusher-Time-Ms";
    /// Dead letters: the subject / routing key the event was meant for.
    pub const DLQ_SUBJECT: &str = "Pusher-Bridge-Subject";
    /// Dead letters: the event's message id.
    pub const DLQ_MSG_ID: &str = "Pusher-Bridge-Msg-Id";
    /// Dead letters: the reason.
    pub const DLQ_REASON: &str = "Pusher-Bridge-Reason";
    /// Dead letters: the detail.
    pub const DLQ_DETAIL: &str = "Pusher-Bridge-Detail";
    /// Dead letters: attempts made.
    pub const DLQ_ATTEMPTS: &str = "Pusher-Bridge-Attempts";
    /// Dead letters: unix ms of the first failure.
    pub const DLQ_FIRST_FAILURE: &str = "Pusher-Bridge-First-Failure-Ms";
    /// W3C Trace Context's header of the producer span (lower case, as the spec and the
    /// OpenTelemetry propagators write it).
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C Trace Context's vendor state.
    pub const TRACESTATE: &str = "tracestate";
}

/// What a dead letter's own message id starts with (`dlq-<msg_id>`, docs/dlq.md). The id is
/// derived from the event's, so a webhook delivered twice yields one letter per event; the
/// `dlq` tools strip the prefix to find the original id when its header is missing.
pub(crate) const DEAD_LETTER_ID_PREFIX: &str = "dlq-";

/// The message id of the dead letter of the event `msg_id` (`dlq-<msg_id>`), on both brokers.
pub(crate) fn dead_letter_id(msg_id: &str) -> String {
    format!("{DEAD_LETTER_ID_PREFIX}{msg_id}")
}

/// Longest `Pusher-Bridge-Detail` header, in characters.
pub(crate) const MAX_DETAIL_CHARS: usize = 512;

/// The detail of a dead letter as a header value, the same on both brokers: control characters
/// (line breaks, which NATS headers cannot hold) become spaces and the text is cut at
/// [`MAX_DETAIL_CHARS`] characters, so a long broker answer cannot bloat every dead letter.
pub(crate) fn header_safe(detail: &str) -> String {
    detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_DETAIL_CHARS)
        .collect()
}

/// A publish that did not get an ack: transient (retry, then keep) or the broker's lasting answer
/// (dead-letter); see [`PublishError::is_transient`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The broker is unreachable or did not answer in time: retry, then spool.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered and refused the message for good: dead-letter it.
    #[error("broker refused the message ({}): {detail}", reason.as_str())]
    Refused {
        /// Which kind of refusal.
        reason: DlqReason,
        /// The broker's words.
        detail: String,
    },
}

impl PublishError {
    /// Whether the failure is transient: the same publish may succeed once the broker is back
    /// (a publish in order stops at such a failure, so nothing behind it overtakes it).
    pub fn is_transient(&self) -> bool {
        matches!(self, PublishError::Unavailable(_))
    }
}

impl DeadLetter {
    /// The headers a dead letter carries beside its event's, the same on both brokers: where
    /// the event was going, its id, why, the broker's words, the attempts and the first failure.
    pub(crate) fn headers(&self) -> [(&'static str, String); 6] {
        let m = &self.message;
        [
            (headers::DLQ_SUBJECT, m.subject.clone()),
            (headers::DLQ_MSG_ID, m.msg_id.clone()),
            (headers::DLQ_REASON, self.reason.as_str().to_string()),
            (headers::DLQ_DETAIL, header_safe(&self.detail)),
            (headers::DLQ_ATTEMPTS, self.attempts.to_string()),
            (
                headers::DLQ_FIRST_FAILURE,
                self.first_failure_ms.to_string(),
            ),
        ]
    }
}

/// One stored dead letter, read back from its headers (`DeadLetter::headers` and the event
/// headers wrote them) and its body: what the `dlq` tools list, replay and purge. Missing or
/// unreadable values are empty or 0: letters from other tools are listed as far as they go.
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
    /// The trace context the event carried (`traceparent` / `tracestate` headers), if any:
    /// replay publishes the event with it, so a consumer still joins the webhook's trace.
    pub trace: Option<Box<TraceContext>>,
}

impl DeadLetterRecord {
    /// Reads a letter at `position` with `header` (a lookup by the names of [`headers`]);
    /// `stored_id` is the letter's own message id (`dlq-<msg_id>`), the original id when the
    /// `Pusher-Bridge-Msg-Id` header is missing.
    pub(crate) fn from_headers(
        position: u64,
        header: impl Fn(&str) -> Option<String>,
        stored_id: Option<&str>,
        body: Bytes,
    ) -> Self {
        let text = |name: &str| header(name).unwrap_or_default();
        let msg_id = header(headers::DLQ_MSG_ID)
            .filter(|id| !id.is_empty())
            .or_else(|| {
                stored_id
                    .and_then(|id| id.strip_prefix(DEAD_LETTER_ID_PREFIX))
                    .map(str::to_string)
            })
            .unwrap_or_default();
        Self {
            position,
            subject: text(headers::DLQ_SUBJECT),
            msg_id,
            reason: text(headers::DLQ_REASON),
            detail: text(headers::DLQ_DETAIL),
            attempts: text(headers::DLQ_ATTEMPTS).trim().parse().unwrap_or(0),
            first_failure_ms: text(headers::DLQ_FIRST_FAILURE).trim().parse().unwrap_or(0),
            app_id: text(headers::APP_ID),
            event: text(headers::EVENT),
            channel: text(headers::CHANNEL),
            time_ms: text(headers::TIME_MS),
            body,
            trace: header(headers::TRACEPARENT).map(|traceparent| {
                Box::new(TraceContext {
                    traceparent,
                    tracestate: header(headers::TRACESTATE),
                })
            }),
        }
    }
}

/// Whether `s` can stand as (part of) a subject token as it is: not empty, no wildcard (`*`,
/// `>`), no whitespace or control character. The one rule for the configured subject prefix's
/// tokens and the event names and channels of a webhook, so that a subject never becomes a
/// wildcard whoever wrote its parts.
pub(crate) fn is_subject_token(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_headers_read_back_as_written() {
        let dl = DeadLetter {
            message: Message {
                subject: "p.1.e.c".into(),
                msg_id: "abc-3".into(),
                body: Bytes::from_static(b"{}"),
                app_id: Arc::from("1"),
                event: "e".into(),
                channel: "c".into(),
                time_ms: "5".into(),
                trace: None,
            },
            reason: DlqReason::Nacked,
            detail: "line\nbreak".into(),
            attempts: 3,
            first_failure_ms: 42,
        };
        let written = dl.headers();
        let mut all: Vec<(&str, String)> = written.to_vec();
        all.extend([
            (headers::APP_ID, "1".to_string()),
            (headers::EVENT, "e".to_string()),
            (headers::CHANNEL, "c".to_string()),
            (headers::TIME_MS, "5".to_string()),
        ]);
        let lookup = |name: &str| all.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        let read = DeadLetterRecord::from_headers(7, lookup, None, Bytes::new());
        assert_eq!(read.subject, "p.1.e.c");
        assert_eq!(read.msg_id, "abc-3");
        assert_eq!(read.reason, "nacked");
        assert_eq!(read.detail, "line break");
        assert_eq!((read.attempts, read.first_failure_ms), (3, 42));
        assert_eq!((read.app_id.as_str(), read.event.as_str()), ("1", "e"));
        assert_eq!(read.trace, None);
        // A letter without the id header: its own id names the event's.
        let bare = DeadLetterRecord::from_headers(1, |_| None, Some("dlq-xyz-0"), Bytes::new());
        assert_eq!(bare.msg_id, "xyz-0");
        // The trace context an event carried comes back with its letter (`dlq replay`
        // publishes the event with it).
        let traced = DeadLetterRecord::from_headers(
            1,
            |name| match name {
                headers::TRACEPARENT => {
                    Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into())
                }
                headers::TRACESTATE => Some("v=1".into()),
                _ => None,
            },
            None,
            Bytes::new(),
        );
        assert_eq!(
            traced.trace.as_deref(),
            Some(&TraceContext {
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                tracestate: Some("v=1".into()),
            })
        );
        assert!(PublishError::Unavailable("x".into()).is_transient());
        assert!(
            !PublishError::Refused {
                reason: DlqReason::TooLarge,
                detail: String::new()
            }
            .is_transient()
        );
    }

    #[test]
    fn dead_letter_ids_are_prefixed() {
        assert_eq!(dead_letter_id("abc-3"), "dlq-abc-3");
    }

    #[test]
    fn header_safe_replaces_control_characters_and_cuts_by_characters() {
        assert_eq!(header_safe("a\r\nb\tc"), "a  b c");
        let long = "é".repeat(600);
        let cut = header_safe(&long);
        assert_eq!(cut.chars().count(), MAX_DETAIL_CHARS);
        assert!(long.starts_with(&cut));
    }
}
