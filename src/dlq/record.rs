//! One dead letter read back from the headers both brokers write.

use bytes::Bytes;

use super::format_utc_ms;
use crate::message::{DlqReason, LetterHeaders, Message, TraceContext};

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
    /// The trace context the event carried (`traceparent` / `tracestate` headers), if any:
    /// replay publishes the event with it, so a consumer still joins the webhook's trace.
    pub trace: Option<Box<TraceContext>>,
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
            trace: h.trace,
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
            trace: self.trace.clone(),
        }
    }

    /// The first failure as human-readable UTC.
    pub fn first_failure(&self) -> String {
        format_utc_ms(self.first_failure_ms)
    }
}
