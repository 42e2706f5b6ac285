//! What the `dlq` tools ask of a dead letter read back ([`DeadLetterRecord`], on the ground
//! floor with the header codec that writes it): its reason, whether it can be replayed, the
//! event to replay, its time for people.

use super::format_utc_ms;
use crate::message::{DeadLetterRecord, DlqReason, Message};

impl DeadLetterRecord {
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
