//! The brokers behind one small enum: NATS JetStream ([`nats`]) and RabbitMQ ([`amqp`]).
//!
//! The webhook pipeline ([`crate::bridge`]) only sees [`Broker`], [`Message`], [`DeadLetter`] and
//! [`PublishError`]; each broker folder holds its connection, topology, publishing and
//! dead-letter storage. Errors say whether the failure is transient ([`PublishError::Unavailable`])
//! or the broker's lasting answer ([`PublishError::Refused`]); what to do about it (retry, spool,
//! dead-letter) is the delivery policy's call (`crate::delivery`). Unit tests put the scripted
//! in-memory [`fake`] broker behind the same enum, so the bridge and the drainer are tested for
//! every outcome without a server.

pub mod amqp;
pub mod cloudevents;
pub(crate) mod connection_log;
#[cfg(test)]
pub mod fake;
pub mod nats;
#[cfg(feature = "bench-null-broker")]
pub mod null;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::{BrokerKind, Settings};
use crate::metrics::Metrics;

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
}

/// Why an event went to the dead-letter queue (the `reason` label and header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DlqReason {
    /// The event has no string `name` / `channel` or is not an object.
    Malformed,
    /// NATS: no stream takes the subject.
    NoStream,
    /// The message is larger than the broker accepts.
    TooLarge,
    /// The broker refused the message for another lasting reason.
    Rejected,
    /// AMQP: the broker nacked the message, even after retries.
    Nacked,
    /// AMQP: no queue is bound for the routing key (returned by `mandatory`).
    Unroutable,
}

impl DlqReason {
    /// Every reason (the metrics create a dead-letter series for each at start-up).
    pub const ALL: [DlqReason; 6] = [
        DlqReason::Malformed,
        DlqReason::NoStream,
        DlqReason::TooLarge,
        DlqReason::Rejected,
        DlqReason::Nacked,
        DlqReason::Unroutable,
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

/// A publish that did not get an ack.
#[derive(Debug, Clone, thiserror::Error)]
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

/// A client library's error (async-nats, lapin, std::io), kept as a [`BrokerError`]'s source.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A broker could not be set up (bad URL, unreachable, topology refused).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Connecting failed, or a connection setting (URL, TLS CA file, creds file) is unusable.
    #[error("cannot connect to the broker: {what}{}", cause(.source))]
    Connect {
        /// What failed, with the URL redacted.
        what: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker cannot do what the configuration asks (per-message TTLs on a NATS server
    /// older than 2.11, or on a stream that does not allow them): the bridge stops.
    #[error("the broker cannot do what the configuration asks: {0}")]
    Unsupported(String),
    /// Declaring streams / exchanges / queues failed, or a name is too long to declare.
    #[error("cannot declare the broker topology: {what}{}", cause(.source))]
    Topology {
        /// What was being declared.
        what: String,
        /// The broker's answer, when there is one.
        #[source]
        source: Option<BoxError>,
    },
}

impl BrokerError {
    /// A connection failure of `what`, caused by `source`.
    pub(crate) fn connect(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        BrokerError::Connect {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// A connection setting or answer that has no client error behind it.
    pub(crate) fn connect_msg(what: impl Into<String>) -> Self {
        BrokerError::Connect {
            what: what.into(),
            source: None,
        }
    }

    /// A declaration of `what` the broker refused with `source`.
    pub(crate) fn topology(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        BrokerError::Topology {
            what: what.into(),
            source: Some(source.into()),
        }
    }
}

/// `: <source>` for a message that shows its cause, or nothing: the log lines keep the client's
/// words although the error also keeps the source itself (`main` prints each cause once).
pub(crate) fn cause<E: std::fmt::Display>(source: &Option<E>) -> String {
    source
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default()
}

/// The configured broker.
pub enum Broker {
    /// NATS JetStream.
    Nats(Box<nats::NatsBroker>),
    /// RabbitMQ.
    Amqp(Box<amqp::AmqpBroker>),
    /// Benchmark only: acknowledges everything, stores nothing.
    #[cfg(feature = "bench-null-broker")]
    Null(null::NullBroker),
    /// Unit tests only: the scripted in-memory broker ([`fake`]).
    #[cfg(test)]
    Fake(Box<fake::FakeBroker>),
}

impl Broker {
    /// Connects the broker of `settings.broker.kind`. Does not wait for the broker to be
    /// reachable: the connection (and topology) comes up in the background and reconnects.
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self, BrokerError> {
        Ok(match settings.broker.kind {
            BrokerKind::Nats => Broker::Nats(Box::new(
                nats::NatsBroker::connect(settings, metrics).await?,
            )),
            BrokerKind::Amqp => Broker::Amqp(Box::new(
                amqp::AmqpBroker::connect(settings, metrics).await?,
            )),
            #[cfg(feature = "bench-null-broker")]
            BrokerKind::Null => {
                metrics.set_broker_up(true);
                Broker::Null(null::NullBroker)
            }
        })
    }

    /// Whether the broker is connected (and its topology declared) right now.
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Nats(b) => b.is_up(),
            Broker::Amqp(b) => b.is_up(),
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(b) => b.is_up(),
            #[cfg(test)]
            Broker::Fake(b) => b.is_up(),
        }
    }

    /// Publishes one event and waits up to `timeout` for the broker's ack.
    pub async fn publish(&self, msg: &Message, timeout: Duration) -> Result<(), PublishError> {
        match self {
            Broker::Nats(b) => b.publish(msg, timeout).await,
            Broker::Amqp(b) => b.publish(msg, timeout).await,
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(b) => b.publish(msg, timeout).await,
            #[cfg(test)]
            Broker::Fake(b) => b.publish(msg, timeout).await,
        }
    }

    /// Publishes `msgs` so that the broker stores them in this order, acks awaited together
    /// (the spool drainer's batches). After the first one that cannot be sent, the rest are not
    /// sent. RabbitMQ publishes them one after the other, each confirm awaited before the next.
    pub(crate) async fn publish_in_order(
        &self,
        msgs: &[&Message],
        timeout: Duration,
    ) -> Vec<Result<(), PublishError>> {
        match self {
            Broker::Nats(b) => b.publish_in_order(msgs, timeout).await,
            Broker::Amqp(b) => b.publish_in_order(msgs, timeout).await,
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(_) => msgs.iter().map(|_| Ok(())).collect(),
            #[cfg(test)]
            Broker::Fake(b) => b.publish_in_order(msgs, timeout).await,
        }
    }

    /// Publishes one dead letter to the dead-letter stream / queue and waits for the ack.
    pub async fn publish_dead_letter(
        &self,
        dl: &DeadLetter,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        match self {
            Broker::Nats(b) => b.publish_dead_letter(dl, timeout).await,
            Broker::Amqp(b) => b.publish_dead_letter(dl, timeout).await,
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(b) => b.publish_dead_letter(dl, timeout).await,
            #[cfg(test)]
            Broker::Fake(b) => b.publish_dead_letter(dl, timeout).await,
        }
    }

    /// Waits until the broker's streams have been declared once (NATS; at once otherwise), so a
    /// side task that reads them does not race the declaration at start-up.
    pub(crate) async fn streams_ready(&self) {
        if let Broker::Nats(b) = self {
            b.streams_ready().await;
        }
    }

    /// Resolves when the broker finds it cannot do what the configuration asks; the bridge
    /// then stops with this error. Pending for ever otherwise.
    pub(crate) async fn fatal(&self) -> BrokerError {
        match self {
            Broker::Nats(b) => b.fatal().await,
            _ => std::future::pending().await,
        }
    }

    /// Waits until the broker is up or `timeout` passes; true when up.
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_up() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Flushes and closes the connection (on shutdown).
    pub async fn close(&self) {
        match self {
            Broker::Nats(b) => b.close().await,
            Broker::Amqp(b) => b.close().await,
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(b) => b.close().await,
            #[cfg(test)]
            Broker::Fake(_) => {}
        }
    }
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
