//! What a signed body carries: the borrowed parse of `{"time_ms": ..., "events": [...]}` (each
//! event's JSON text kept byte for byte) and the head of each event (`name`, `channel`, with
//! Pusher's limits).

use std::borrow::Cow;
use std::cell::Cell;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Why a signed body is not a webhook (answered 400, or 413 for [`PayloadError::TooManyEvents`]).
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Not JSON, or not an object with `time_ms` and `events`.
    #[error("body is not {{\"time_ms\": number, \"events\": [...]}}: {0}")]
    Shape(String),
    /// `time_ms` is present but not a number.
    #[error("time_ms is not a number")]
    TimeNotNumber,
    /// `events` holds more than `server.max_events_per_webhook` entries (parsing stopped there).
    #[error("more than {max} events in one webhook (server.max_events_per_webhook)")]
    TooManyEvents {
        /// The configured limit.
        max: usize,
    },
}

/// The longest channel name accepted, in characters. Pusher allows 164; its server SDKs accept
/// up to 200, so 200 it is: longer names are no channel Pusher could have sent.
pub const MAX_CHANNEL_CHARS: usize = 200;
/// The longest presence `user_id` accepted, in characters (Pusher allows 128; 200 as for
/// channels, so ids any SDK lets through are not refused here).
pub(crate) const MAX_USER_ID_CHARS: usize = 200;

/// A parsed webhook, borrowing from the raw body.
#[derive(Debug)]
pub struct Webhook<'a> {
    /// `time_ms` exactly as sent (a JSON number).
    pub time_ms: &'a str,
    /// Each event's JSON text, exactly as sent.
    pub events: Vec<&'a RawValue>,
}

/// Parses the body of a webhook (after its signature was checked), with at most `max_events`
/// events: the events array is read element by element and parsing stops at the first one over
/// the limit, so a packed body costs no more than `max_events` events (time and memory).
pub fn parse(body: &[u8], max_events: usize) -> Result<Webhook<'_>, PayloadError> {
    let over = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = de
        .deserialize_map(ShapeVisitor {
            max_events,
            over: &over,
        })
        .and_then(|shape| de.end().map(|()| shape));
    let (time_ms, events) = match parsed {
        Ok(shape) => shape,
        Err(_) if over.get() => return Err(PayloadError::TooManyEvents { max: max_events }),
        Err(e) => return Err(PayloadError::Shape(e.to_string())),
    };
    let time_ms = time_ms.get();
    if !time_ms.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(PayloadError::TimeNotNumber);
    }
    Ok(Webhook { time_ms, events })
}

/// The top-level object: `time_ms` and `events` kept (borrowed), every other key skipped.
struct ShapeVisitor<'c> {
    max_events: usize,
    over: &'c Cell<bool>,
}

impl<'de> Visitor<'de> for ShapeVisitor<'_> {
    type Value = (&'de RawValue, Vec<&'de RawValue>);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object with `time_ms` and `events`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut time_ms = None;
        let mut events = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "time_ms" if time_ms.is_some() => {
                    return Err(de::Error::duplicate_field("time_ms"));
                }
                "events" if events.is_some() => return Err(de::Error::duplicate_field("events")),
                "time_ms" => time_ms = Some(map.next_value::<&'de RawValue>()?),
                "events" => {
                    events = Some(map.next_value_seed(EventsSeed {
                        max: self.max_events,
                        over: self.over,
                    })?)
                }
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        let time_ms = time_ms.ok_or_else(|| de::Error::missing_field("time_ms"))?;
        let events = events.ok_or_else(|| de::Error::missing_field("events"))?;
        Ok((time_ms, events))
    }
}

/// The `events` array, at most `max` elements; `over` tells the caller why it stopped.
struct EventsSeed<'c> {
    max: usize,
    over: &'c Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for EventsSeed<'_> {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EventsSeed<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // The size hint is the sender's word (serde_json gives none): never trust it for memory.
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max).min(64));
        while let Some(event) = seq.next_element::<&'de RawValue>()? {
            if events.len() == self.max {
                self.over.set(true);
                return Err(de::Error::custom("too many events"));
            }
            events.push(event);
        }
        Ok(events)
    }
}

/// Deepest nesting of objects and arrays accepted in one event. Pusher's events are flat (their
/// `data` is a string); the JSON parsers of consumers stop at about 128 levels (serde_json), so a
/// deeper event would be published as a message nobody can read.
pub(crate) const MAX_EVENT_DEPTH: usize = 32;

/// Whether `json` nests objects / arrays more than `max` deep: one pass over the bytes, strings
/// skipped (`json` is valid JSON, so brackets balance).
fn nested_deeper_than(json: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The routing-relevant fields of one event.
#[derive(Debug, PartialEq, Eq)]
pub struct EventHead<'a> {
    /// Event name (`channel_occupied`, `client_event`, or any future name).
    pub name: Cow<'a, str>,
    /// Channel name.
    pub channel: Cow<'a, str>,
    /// Whether the event already has an `app_id` or `time_ms` key (then the body is rebuilt
    /// rather than spliced, so no key appears twice).
    pub has_reserved_keys: bool,
}

#[derive(Deserialize)]
struct HeadShape<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    app_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    time_ms: Option<&'a RawValue>,
    /// Any JSON type: only a string is checked (its length), other types pass as they are.
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
}

/// Reads `name` and `channel` of one event, or says why it cannot be routed (the reason goes
/// with the event to the dead-letter queue).
pub fn event_head(event: &RawValue) -> Result<EventHead<'_>, String> {
    if !event.get().starts_with('{') {
        return Err("event is not a JSON object".into());
    }
    if nested_deeper_than(event.get(), MAX_EVENT_DEPTH) {
        return Err(format!(
            "event is nested deeper than {MAX_EVENT_DEPTH} levels"
        ));
    }
    let head: HeadShape<'_> = serde_json::from_str(event.get())
        .map_err(|e| format!("event has a non-string name or channel: {e}"))?;
    let name = head.name.ok_or("event has no `name`")?;
    let channel = head.channel.ok_or("event has no `channel`")?;
    check_token("name", &name)?;
    check_token("channel", &channel)?;
    if channel.chars().count() > MAX_CHANNEL_CHARS {
        return Err(format!(
            "event `channel` is longer than {MAX_CHANNEL_CHARS} characters"
        ));
    }
    if let Some(user_id) = head.user_id
        && let Ok(user_id) = serde_json::from_str::<Cow<'_, str>>(user_id.get())
        && user_id.chars().count() > MAX_USER_ID_CHARS
    {
        return Err(format!(
            "event `user_id` is longer than {MAX_USER_ID_CHARS} characters"
        ));
    }
    Ok(EventHead {
        name,
        channel,
        has_reserved_keys: head.app_id.is_some() || head.time_ms.is_some(),
    })
}

/// A name that cannot become one subject token: empty, wildcards, whitespace or control
/// characters (never sent by a correct server, but a subject must never become a wildcard).
fn check_token(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("event `{field}` is empty"));
    }
    if !crate::message::is_subject_token(value) {
        return Err(format!(
            "event `{field}` contains a wildcard, whitespace or control character"
        ));
    }
    Ok(())
}
