//! CloudEvents 1.0 in binary content mode (`broker.cloudevents = true`): the attributes of an
//! event message, which each broker's header builder adds as `ce-` headers. The body stays the
//! event's JSON (the CloudEvent's `data`) and its content type is the `datacontenttype`, so
//! Knative, Dapr and Argo Events consumers (and the CloudEvents SDKs' NATS, RabbitMQ and HTTP
//! bindings, which share the `ce-` header mapping) read the stream as it is.
//!
//! | attribute | value |
//! |---|---|
//! | `ce-specversion` | `1.0` |
//! | `ce-id` | the message id (`Nats-Msg-Id` / `message_id`): a redelivered webhook's events keep it |
//! | `ce-type` | `com.pusher.` + the event name, e.g. `com.pusher.channel_occupied` |
//! | `ce-source` | `/apps/<app_id>` (the app, as Pusher's HTTP API names it) |
//! | `ce-subject` | the channel |
//! | `ce-time` | the webhook's `time_ms` in RFC 3339, UTC, milliseconds (absent when unusable) |

use std::time::{Duration, UNIX_EPOCH};

use super::Message;
use crate::message::parse_time_ms;

/// `ce-specversion`.
pub(crate) const SPECVERSION: &str = "ce-specversion";
/// `ce-id`.
pub(crate) const ID: &str = "ce-id";
/// `ce-type`.
pub const TYPE: &str = "ce-type";
/// `ce-source`.
pub(crate) const SOURCE: &str = "ce-source";
/// `ce-subject`.
pub const SUBJECT: &str = "ce-subject";
/// `ce-time`.
pub(crate) const TIME: &str = "ce-time";
/// The CloudEvents version the headers follow.
pub(crate) const SPEC_VERSION: &str = "1.0";
/// What `ce-type` starts with: reverse DNS of the event's origin, then Pusher's event name.
pub(crate) const TYPE_PREFIX: &str = "com.pusher.";
/// What `ce-source` starts with, followed by the app id.
pub(crate) const SOURCE_PREFIX: &str = "/apps/";

/// Last millisecond RFC 3339 can write (the end of year 9999).
const MAX_TIME_MS: u64 = 253_402_300_800_000 - 1;

/// The CloudEvents attributes of one event message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attributes<'a> {
    /// `ce-id`.
    pub id: &'a str,
    /// `ce-type`.
    pub kind: String,
    /// `ce-source`.
    pub source: String,
    /// `ce-subject`.
    pub subject: &'a str,
    /// `ce-time`, when `time_ms` is a usable time.
    pub time: Option<String>,
}

impl<'a> Attributes<'a> {
    /// The attributes of `msg`.
    pub fn of(msg: &'a Message) -> Self {
        Self {
            id: &msg.msg_id,
            kind: format!("{TYPE_PREFIX}{}", msg.event),
            source: format!("{SOURCE_PREFIX}{}", msg.app_id),
            subject: &msg.channel,
            time: rfc3339(&msg.time_ms),
        }
    }

    /// Every `(header name, value)` pair, `ce-specversion` first.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            Some((SPECVERSION, SPEC_VERSION)),
            Some((ID, self.id)),
            Some((TYPE, self.kind.as_str())),
            Some((SOURCE, self.source.as_str())),
            Some((SUBJECT, self.subject)),
            self.time.as_deref().map(|t| (TIME, t)),
        ]
        .into_iter()
        .flatten()
    }
}

/// `time_ms` (the webhook's number as sent: digits, or a JSON number with a fraction or an
/// exponent) as RFC 3339 with milliseconds; `None` for a negative, non-numeric or out-of-range
/// value, since `time` is an optional attribute and a wrong one is worse than none.
pub(crate) fn rfc3339(time_ms: &str) -> Option<String> {
    let ms = parse_time_ms(time_ms)?;
    if ms > MAX_TIME_MS {
        return None;
    }
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    Some(humantime::format_rfc3339_millis(at).to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn msg(time_ms: &str) -> Message {
        Message {
            subject: "pusher.123.member_added.presence-a%2Eb".into(),
            msg_id: "0f3a-2".into(),
            body: Bytes::from_static(b"{}"),
            app_id: Arc::from("123"),
            event: "member_added".into(),
            channel: "presence-a.b".into(),
            time_ms: time_ms.into(),
            trace: None,
        }
    }

    #[test]
    fn attributes_of_an_event() {
        let m = msg("1700000000123");
        let a = Attributes::of(&m);
        let h: Vec<(&str, &str)> = a.headers().collect();
        assert_eq!(
            h,
            [
                ("ce-specversion", "1.0"),
                ("ce-id", "0f3a-2"),
                ("ce-type", "com.pusher.member_added"),
                ("ce-source", "/apps/123"),
                ("ce-subject", "presence-a.b"),
                ("ce-time", "2023-11-14T22:13:20.123Z"),
            ]
        );
    }

    #[test]
    fn time_is_left_out_when_unusable() {
        assert_eq!(rfc3339("0").as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(
            rfc3339("1.7e12").as_deref(),
            Some("2023-11-14T22:13:20.000Z")
        );
        assert_eq!(
            rfc3339("1700000000123.9").as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        for bad in ["-1", "abc", "", "NaN", "1e300", "253402300800000"] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
        let m = msg("-5");
        assert!(Attributes::of(&m).headers().all(|(n, _)| n != TIME));
    }
}
