//! What an AMQP message of the bridge looks like: routing key, properties and headers of events
//! and dead letters. Pure functions, so the exact wire shape is unit-tested without a broker.
//!
//! Header names and values are the NATS broker's (see [`crate::broker::headers`]): every header
//! is a string (AMQP long string), so a consumer reads the same thing from either broker.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::broker::{DeadLetter, DlqReason, Message, PublishError, cloudevents, dead_letter_id};

/// `content_type` of every message: the body is the event's JSON.
pub(crate) const CONTENT_TYPE: &str = "application/json";
/// `delivery_mode` 2: RabbitMQ writes the message to disk in a durable queue.
pub(crate) const PERSISTENT: u8 = 2;
/// Longest AMQP short string (routing keys, message ids, exchange names).
pub(crate) const MAX_SHORT_STRING: usize = 255;

/// The routing key of a subject, or a refusal when it cannot be sent: AMQP routing keys are
/// short strings of at most 255 bytes, NATS subjects are not limited that way.
pub fn routing_key(subject: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(subject).map_err(|_| PublishError::Refused {
        reason: DlqReason::TooLarge,
        detail: format!(
            "routing key is {} bytes; AMQP allows at most {MAX_SHORT_STRING}",
            subject.len()
        ),
    })
}

/// A message id as an AMQP short string. The bridge's ids are short (hex digest plus index);
/// anything longer is cut at a character boundary rather than failing the publish.
fn short(value: &str) -> ShortString {
    let mut end = value.len().min(MAX_SHORT_STRING);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(&value[..end]).unwrap_or_default()
}

fn put(table: &mut FieldTable, name: &str, value: &str) {
    table.insert(
        short(name),
        AMQPValue::LongString(LongString::from(value.as_bytes())),
    );
}

/// The headers of an event message ([`Message::headers`]) as an AMQP table.
fn message_headers(msg: &Message) -> FieldTable {
    let mut h = FieldTable::default();
    for (name, value) in msg.headers() {
        put(&mut h, name, value);
    }
    h
}

/// Adds the CloudEvents binary-mode headers of `msg` ([`cloudevents::Attributes`]); the
/// `datacontenttype` is the `content_type` property, as the RabbitMQ binding maps it.
fn cloudevents_headers(h: &mut FieldTable, msg: &Message) {
    for (name, value) in cloudevents::Attributes::of(msg).headers() {
        put(h, name, value);
    }
}

fn base_properties(message_id: &str, headers: FieldTable, now_secs: u64) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(short(CONTENT_TYPE))
        .with_delivery_mode(PERSISTENT)
        .with_message_id(short(message_id))
        .with_timestamp(now_secs)
        .with_headers(headers)
}

/// Properties of an event: persistent, JSON, `message_id` = the deterministic id, `timestamp` =
/// publish time (unix seconds), headers as on NATS (with `cloudevents`, the `ce-` ones too).
pub(crate) fn event_properties(msg: &Message, now_secs: u64, cloudevents: bool) -> BasicProperties {
    let mut h = message_headers(msg);
    if cloudevents {
        cloudevents_headers(&mut h, msg);
    }
    base_properties(&msg.msg_id, h, now_secs)
}

/// Properties of a dead letter: the event's headers plus where it was going, why, how often it
/// was tried and when it first failed (the NATS broker's DLQ headers).
pub(crate) fn dead_letter_properties(dl: &DeadLetter, now_secs: u64) -> BasicProperties {
    let m = &dl.message;
    let mut h = message_headers(m);
    for (name, value) in dl.headers() {
        put(&mut h, name, &value);
    }
    base_properties(&dead_letter_id(&m.msg_id), h, now_secs)
}

/// A header of a message read back (the `dlq` tools, the sweeper) as text, its name compared
/// without regard to case (other tools that move letters may change it).
pub(crate) fn header(table: Option<&FieldTable>, name: &str) -> Option<String> {
    let table = table?.inner();
    let value = match table.get(name) {
        Some(v) => v,
        None => {
            table
                .iter()
                .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))?
                .1
        }
    };
    header_text(value)
}

/// Text of a header value: strings as sent, numbers (as some tools write them) as digits;
/// other types have no text.
fn header_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// Unix seconds now (the `timestamp` property).
pub fn now_secs() -> u64 {
    crate::broker::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::message::header_safe;

    fn msg() -> Message {
        Message {
            subject: "pusher.1.member_added.presence-a%2Eb".into(),
            msg_id: "abc-3".into(),
            body: Bytes::from_static(b"{}"),
            app_id: Arc::from("1"),
            event: "member_added".into(),
            channel: "presence-a.b".into(),
            time_ms: "1700000000123".into(),
            trace: None,
        }
    }

    fn header(p: &BasicProperties, name: &str) -> Option<String> {
        super::header(p.headers().as_ref(), name)
    }

    #[test]
    fn event_properties_are_persistent_json_with_id_time_and_headers() {
        let p = event_properties(&msg(), 1_700_000_001, false);
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("abc-3"));
        assert_eq!(p.timestamp(), &Some(1_700_000_001));
        assert_eq!(header(&p, "Pusher-App-Id").as_deref(), Some("1"));
        assert_eq!(header(&p, "Pusher-Event").as_deref(), Some("member_added"));
        assert_eq!(
            header(&p, "Pusher-Channel").as_deref(),
            Some("presence-a.b")
        );
        assert_eq!(
            header(&p, "Pusher-Time-Ms").as_deref(),
            Some("1700000000123")
        );
        assert_eq!(p.headers().as_ref().unwrap().inner().len(), 4);
    }

    #[test]
    fn cloudevents_adds_the_ce_headers_only_when_asked() {
        let p = event_properties(&msg(), 1_700_000_001, true);
        assert_eq!(header(&p, "ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(header(&p, "ce-id").as_deref(), Some("abc-3"));
        assert_eq!(
            header(&p, "ce-type").as_deref(),
            Some("com.pusher.member_added")
        );
        assert_eq!(header(&p, "ce-source").as_deref(), Some("/apps/1"));
        assert_eq!(header(&p, "ce-subject").as_deref(), Some("presence-a.b"));
        assert_eq!(
            header(&p, "ce-time").as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(p.headers().as_ref().unwrap().inner().len(), 10);
        let dl = DeadLetter {
            message: msg(),
            reason: DlqReason::Nacked,
            detail: String::new(),
            attempts: 1,
            first_failure_ms: 1,
        };
        assert_eq!(header(&dead_letter_properties(&dl, 7), "ce-id"), None);
    }

    #[test]
    fn dead_letter_properties_carry_the_nats_dlq_headers() {
        let dl = DeadLetter {
            message: msg(),
            reason: DlqReason::Unroutable,
            detail: "312 NO_ROUTE\nsecond line".into(),
            attempts: 3,
            first_failure_ms: 42,
        };
        let p = dead_letter_properties(&dl, 7);
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some("dlq-abc-3")
        );
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.timestamp(), &Some(7));
        assert_eq!(
            header(&p, "Pusher-Bridge-Subject").as_deref(),
            Some("pusher.1.member_added.presence-a%2Eb")
        );
        assert_eq!(header(&p, "Pusher-Bridge-Msg-Id").as_deref(), Some("abc-3"));
        assert_eq!(
            header(&p, "Pusher-Bridge-Reason").as_deref(),
            Some("unroutable")
        );
        assert_eq!(
            header(&p, "Pusher-Bridge-Detail").as_deref(),
            Some("312 NO_ROUTE second line")
        );
        assert_eq!(header(&p, "Pusher-Bridge-Attempts").as_deref(), Some("3"));
        assert_eq!(
            header(&p, "Pusher-Bridge-First-Failure-Ms").as_deref(),
            Some("42")
        );
        assert_eq!(header(&p, "Pusher-App-Id").as_deref(), Some("1"));
    }

    #[test]
    fn long_routing_keys_are_refused_not_panicked_on() {
        assert!(routing_key(&"a".repeat(255)).is_ok());
        match routing_key(&"a".repeat(256)) {
            Err(PublishError::Refused { reason, detail }) => {
                assert_eq!(reason, DlqReason::TooLarge);
                assert!(detail.contains("256"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn over_long_ids_are_cut_on_a_char_boundary() {
        let id = "é".repeat(200);
        let s = short(&id);
        assert!(s.as_str().len() <= 255);
        assert!(id.starts_with(s.as_str()));
        assert_eq!(header_safe(&"x".repeat(600)).len(), 512);
    }

    #[test]
    fn header_text_reads_strings_and_numbers_only() {
        let text = |v: AMQPValue| header_text(&v);
        assert_eq!(
            text(AMQPValue::LongString("ev".into())).as_deref(),
            Some("ev")
        );
        assert_eq!(
            text(AMQPValue::ShortString("ev".into())).as_deref(),
            Some("ev")
        );
        assert_eq!(text(AMQPValue::LongLongInt(-5)).as_deref(), Some("-5"));
        assert_eq!(text(AMQPValue::LongUInt(7)).as_deref(), Some("7"));
        assert_eq!(text(AMQPValue::Boolean(true)), None);
        assert_eq!(text(AMQPValue::FieldTable(FieldTable::default())), None);
    }
}
