//! The Pusher webhook itself: which app sent it (key lookup), whether it is authentic
//! (HMAC-SHA256 over the raw body, compared in constant time), what events it carries, and the
//! messages and dead letters they become (`prepare`). [`crate::http`] calls the lookup and the
//! signature check (`AppRegistry::app_of`, [`AppKey::check`]); [`crate::bridge`] calls the
//! rest.
//!
//! Parsing borrows from the raw body: each event's JSON text is kept byte for byte (key order,
//! unknown fields, value types) and only `name` and `channel` are looked at. The message body is
//! then that text with `"app_id"` and `"time_ms"` spliced in, never a re-serialisation.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use sha2::Sha256;

use crate::config::AppSettings;
use crate::message::{DeadLetter, DlqReason, Message, now_ms};
use crate::routing;

type HmacSha256 = Hmac<Sha256>;

/// One configured app key, with its HMAC state keyed once at start-up.
pub struct AppKey {
    /// The app id the key belongs to (several keys may share one id while rotating).
    pub app_id: Arc<str>,
    /// The key (token), for logs and metrics.
    pub key: String,
    /// HMAC-SHA256 already keyed with the secret; cloned per request.
    mac: HmacSha256,
    /// `,"app_id":"<id>","time_ms":` as JSON text, built once.
    pub(crate) body_suffix_head: String,
}

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppKey")
            .field("app_id", &self.app_id)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl AppKey {
    /// Whether `signature` (hex, as sent in `X-Pusher-Signature`) is HMAC-SHA256 of `body` under
    /// this key's secret. Never panics; compares in constant time.
    pub(crate) fn verify(&self, body: &[u8], signature: &[u8]) -> bool {
        let mut expected = [0u8; 32];
        if signature.len() != 64 || hex::decode_to_slice(signature, &mut expected).is_err() {
            return false;
        }
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    }

    /// Checks `X-Pusher-Signature` (surrounding whitespace ignored) over the raw body.
    pub fn check(&self, signature: Option<&[u8]>, body: &[u8]) -> Result<(), AuthError> {
        let signature = signature.ok_or(AuthError::SignatureMissing)?;
        if self.verify(body, signature.trim_ascii()) {
            Ok(())
        } else {
            Err(AuthError::SignatureMismatch)
        }
    }

    /// The hex signature Pusher would send for `body` (used by `send-test` and tests).
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }
}

/// All configured keys, looked up by `X-Pusher-Key`.
#[derive(Debug, Default)]
pub struct AppRegistry {
    by_key: HashMap<String, Arc<AppKey>>,
}

impl AppRegistry {
    /// Builds the registry from `[[apps]]`.
    pub fn new(apps: &[AppSettings]) -> Self {
        let by_key = apps
            .iter()
            .map(|a| {
                let app_id: Arc<str> = Arc::from(a.id.as_str());
                let mac = <HmacSha256 as KeyInit>::new_from_slice(a.secret.expose().as_bytes())
                    // HMAC accepts keys of any length; this cannot fail.
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any size"));
                let body_suffix_head = format!(
                    ",\"app_id\":{},\"time_ms\":",
                    serde_json::Value::String(a.id.clone())
                );
                let key = AppKey {
                    app_id,
                    key: a.key.clone(),
                    mac,
                    body_suffix_head,
                };
                (a.key.clone(), Arc::new(key))
            })
            .collect();
        Self { by_key }
    }

    /// The key entry for `X-Pusher-Key`, if configured.
    pub fn get(&self, key: &str) -> Option<&Arc<AppKey>> {
        self.by_key.get(key)
    }

    /// The app of `X-Pusher-Key` (surrounding whitespace ignored), before its signature is
    /// checked: a refused webhook of a known key is counted under its app id.
    pub(crate) fn app_of(&self, key: Option<&[u8]>) -> Result<&Arc<AppKey>, AuthError> {
        let key = key.ok_or(AuthError::KeyMissing)?;
        std::str::from_utf8(key)
            .ok()
            .and_then(|k| self.get(k.trim()))
            .ok_or(AuthError::UnknownKey)
    }

    /// Whether no app is configured (every webhook would be refused).
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Why a webhook is not authentic (answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `X-Pusher-Key` header.
    #[error("X-Pusher-Key missing")]
    KeyMissing,
    /// `X-Pusher-Key` is not a configured key.
    #[error("unknown X-Pusher-Key")]
    UnknownKey,
    /// No `X-Pusher-Signature` header.
    #[error("X-Pusher-Signature missing")]
    SignatureMissing,
    /// The signature is not the HMAC of the body under the key's secret.
    #[error("X-Pusher-Signature does not match")]
    SignatureMismatch,
    /// `time_ms` is older than `server.max_webhook_age` (a replayed capture).
    #[error("webhook time_ms is too old")]
    TooOld,
}

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
    if value
        .chars()
        .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "event `{field}` contains a wildcard, whitespace or control character"
        ));
    }
    Ok(())
}

/// Refuses a webhook whose `time_ms` is older than `max_age` (`server.max_webhook_age`).
pub(crate) fn check_age(hook: &Webhook<'_>, max_age: Option<Duration>) -> Result<(), AuthError> {
    let Some(max_age) = max_age else {
        return Ok(());
    };
    let sent = hook.time_ms.parse::<f64>().unwrap_or(0.0) as u64;
    if now_ms().saturating_sub(sent) > max_age.as_millis() as u64 {
        return Err(AuthError::TooOld);
    }
    Ok(())
}

/// Turns the webhook's events into messages on `prefix`'s subjects; unroutable events become
/// `malformed` dead letters carrying their raw JSON text.
pub(crate) fn prepare(
    prefix: &str,
    app: &AppKey,
    hook: &Webhook<'_>,
    body: &[u8],
) -> (Vec<Message>, Vec<DeadLetter>) {
    let digest = routing::webhook_digest(&app.app_id, body);
    let suffix = body_suffix(app, hook.time_ms);
    let mut messages = Vec::with_capacity(hook.events.len());
    let mut dead = Vec::new();
    for (i, event) in hook.events.iter().enumerate() {
        let msg_id = routing::message_id(&digest, i);
        match event_head(event) {
            Ok(head) => messages.push(Message {
                subject: routing::subject(prefix, &app.app_id, &head.name, &head.channel),
                msg_id,
                body: Bytes::from(message_body(event, &head, &suffix)),
                app_id: app.app_id.clone(),
                event: head.name.into_owned(),
                channel: head.channel.into_owned(),
                time_ms: hook.time_ms.to_string(),
            }),
            Err(detail) => dead.push(DeadLetter {
                message: Message {
                    subject: String::new(),
                    msg_id,
                    body: Bytes::copy_from_slice(event.get().as_bytes()),
                    app_id: app.app_id.clone(),
                    event: String::new(),
                    channel: String::new(),
                    time_ms: hook.time_ms.to_string(),
                },
                reason: DlqReason::Malformed,
                detail,
                attempts: 0,
                first_failure_ms: now_ms(),
            }),
        }
    }
    (messages, dead)
}

/// The per-webhook tail of every message body: `,"app_id":"<id>","time_ms":<n>}`.
pub fn body_suffix(app: &AppKey, time_ms: &str) -> String {
    let mut s = String::with_capacity(app.body_suffix_head.len() + time_ms.len() + 1);
    s.push_str(&app.body_suffix_head);
    s.push_str(time_ms);
    s.push('}');
    s
}

/// The message body of one event: its JSON text with `app_id` and `time_ms` added.
pub fn message_body(event: &RawValue, head: &EventHead<'_>, suffix: &str) -> Vec<u8> {
    let text = event.get();
    if head.has_reserved_keys {
        return rebuilt_body(text, suffix);
    }
    // `text` is an object (checked by `event_head`): drop its closing brace and splice.
    let open = text.trim_end();
    let inner = &open[..open.len() - 1];
    let mut out = Vec::with_capacity(text.len() + suffix.len());
    out.extend_from_slice(inner.as_bytes());
    if inner[1..].trim().is_empty() {
        // `{}`: no comma before the first key.
        out.truncate(1);
        out.extend_from_slice(&suffix.as_bytes()[1..]);
    } else {
        out.extend_from_slice(suffix.as_bytes());
    }
    out
}

/// Rare path: the event carries its own `app_id` / `time_ms`; the bridge's values win.
fn rebuilt_body(text: &str, suffix: &str) -> Vec<u8> {
    let wrapped = format!("{{\"x\":0{suffix}");
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).unwrap_or_default();
    if let Ok(serde_json::Value::Object(extra)) = serde_json::from_str(&wrapped) {
        for (k, v) in extra {
            if k != "x" {
                map.insert(k, v);
            }
        }
    }
    serde_json::to_vec(&map).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn app(id: &str, secret: &str) -> AppKey {
        let reg = AppRegistry::new(&[AppSettings {
            id: id.into(),
            key: "k".into(),
            secret: Secret::new(secret),
        }]);
        let key = reg.get("k").unwrap();
        AppKey {
            app_id: key.app_id.clone(),
            key: key.key.clone(),
            mac: key.mac.clone(),
            body_suffix_head: key.body_suffix_head.clone(),
        }
    }

    #[test]
    fn signature_good_tampered_wrong_key_bad_hex() {
        let a = app("1", "app-secret");
        let body = br#"{"time_ms":1,"events":[]}"#;
        let sig = a.sign(body);
        assert!(a.verify(body, sig.as_bytes()));
        assert!(a.verify(body, sig.to_uppercase().as_bytes()));
        assert!(!a.verify(br#"{"time_ms":2,"events":[]}"#, sig.as_bytes()));
        let other = app("1", "other-secret");
        assert!(!other.verify(body, sig.as_bytes()));
        let mut non_hex = sig.clone().into_bytes();
        non_hex[0] = b'z';
        assert!(!a.verify(body, &non_hex));
        assert!(!a.verify(body, &sig.as_bytes()[..62]));
        assert!(!a.verify(body, format!("{sig}00").as_bytes()));
        assert!(!a.verify(body, b""));
        assert!(!a.verify(body, "é".repeat(32).as_bytes()));
    }

    #[test]
    fn sockudo_fixtures_verify_and_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/sockudo-webhooks");
        let mut seen = 0;
        for i in 1..=5 {
            let path = dir.join(format!("0{i}.json"));
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let a = app(v["app_id"].as_str().unwrap(), v["secret"].as_str().unwrap());
            let body = v["raw_body"].as_str().unwrap().as_bytes();
            let sig = v["headers"]["x-pusher-signature"].as_str().unwrap();
            assert!(a.verify(body, sig.as_bytes()), "fixture {i}");
            let hook = parse(body, 100).unwrap();
            for e in &hook.events {
                let head = event_head(e).unwrap();
                let out = message_body(e, &head, &body_suffix(&a, hook.time_ms));
                let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
                let orig: serde_json::Value = serde_json::from_str(e.get()).unwrap();
                for (k, val) in orig.as_object().unwrap() {
                    assert_eq!(&got[k], val);
                }
                assert_eq!(got["app_id"], "app-id");
                assert_eq!(got["time_ms"].as_u64().unwrap().to_string(), hook.time_ms);
            }
            seen += 1;
        }
        assert_eq!(seen, 5, "fixtures missing in {}", dir.display());
    }

    #[test]
    fn every_event_type_keeps_its_fields_and_types() {
        let a = app("123456", "s");
        let body = br#"{"time_ms":1700000000000,"extra":true,"events":[
            {"name":"channel_occupied","channel":"c1"},
            {"name":"channel_vacated","channel":"c1"},
            {"name":"member_added","channel":"presence-r","user_id":"u1"},
            {"name":"member_removed","channel":"presence-r","user_id":"u1"},
            {"name":"client_event","channel":"private-a.b","event":"client-x","data":"{\"a\":1}","socket_id":"1.2","user_id":"u"},
            {"name":"cache_miss","channel":"cache-x","data":"{}"},
            {"name":"subscription_count","channel":"c","subscription_count":5},
            {"name":"member_updated","channel":"presence-r","future":[1,2.5,null,{"x":false}]}
        ]}"#;
        let hook = parse(body, 100).unwrap();
        assert_eq!(hook.events.len(), 8);
        let suffix = body_suffix(&a, hook.time_ms);
        for e in &hook.events {
            let head = event_head(e).unwrap();
            let out: serde_json::Value =
                serde_json::from_slice(&message_body(e, &head, &suffix)).unwrap();
            let orig: serde_json::Value = serde_json::from_str(e.get()).unwrap();
            for (k, v) in orig.as_object().unwrap() {
                assert_eq!(&out[k], v, "{k}");
            }
            assert_eq!(out["app_id"], "123456");
            assert_eq!(out["time_ms"], 1_700_000_000_000u64);
        }
        let sc = event_head(hook.events[6]).unwrap();
        let out: serde_json::Value =
            serde_json::from_slice(&message_body(hook.events[6], &sc, &suffix)).unwrap();
        assert!(out["subscription_count"].is_number());
    }

    #[test]
    fn body_splice_keeps_bytes_and_handles_empty_objects() {
        let a = app("1", "s");
        let suffix = body_suffix(&a, "5");
        let e: &RawValue = serde_json::from_str(r#"{"channel":"c", "name":"n","x":1.50}"#).unwrap();
        let head = event_head(e).unwrap();
        assert_eq!(
            String::from_utf8(message_body(e, &head, &suffix)).unwrap(),
            r#"{"channel":"c", "name":"n","x":1.50,"app_id":"1","time_ms":5}"#
        );
        let reserved: &RawValue =
            serde_json::from_str(r#"{"channel":"c","name":"n","app_id":"evil","time_ms":0}"#)
                .unwrap();
        let head = event_head(reserved).unwrap();
        assert!(head.has_reserved_keys);
        let out: serde_json::Value =
            serde_json::from_slice(&message_body(reserved, &head, &suffix)).unwrap();
        assert_eq!(out["app_id"], "1");
        assert_eq!(out["time_ms"], 5);
    }

    #[test]
    fn malformed_payloads_and_events() {
        assert!(parse(b"not json", 100).is_err());
        assert!(parse(br#"{"events":[]}"#, 100).is_err());
        assert!(parse(br#"{"time_ms":1}"#, 100).is_err());
        assert!(parse(br#"{"time_ms":"1","events":[]}"#, 100).is_err());
        assert!(parse(br#"{"time_ms":1,"events":{}}"#, 100).is_err());
        assert!(parse(br#"[1]"#, 100).is_err());
        let hook = parse(
            br#"{"time_ms":1.5e3,"events":[1,"x",{"name":"a"},{"channel":"c"},{"name":2,"channel":"c"},{"name":"a","channel":"a b"},{"name":"a","channel":"x>"},{"name":"","channel":"c"}]}"#,
            100,
        )
        .unwrap();
        assert_eq!(hook.time_ms, "1.5e3");
        for e in hook.events {
            assert!(event_head(e).is_err(), "{}", e.get());
        }
    }

    #[test]
    fn names_longer_than_pusher_allows_and_deep_events_are_malformed() {
        let event = |channel: &str, extra: &str| {
            format!(r#"{{"name":"member_added","channel":"{channel}"{extra}}}"#)
        };
        let ok = |text: String| {
            let e: &RawValue = serde_json::from_str(Box::leak(text.into_boxed_str())).unwrap();
            event_head(e).map(|_| ())
        };
        assert!(ok(event(&"é".repeat(200), "")).is_ok());
        assert!(
            ok(event(&"c".repeat(201), ""))
                .unwrap_err()
                .contains("longer than 200")
        );
        assert!(ok(event(&".".repeat(1340), "")).is_err());
        let user = |id: &str| event("presence-r", &format!(r#","user_id":"{id}""#));
        assert!(ok(user(&"u".repeat(200))).is_ok());
        assert!(ok(user(&"u".repeat(201))).unwrap_err().contains("user_id"));
        assert!(ok(event("presence-r", r#","user_id":12345"#)).is_ok());
        let nested = |n: usize| format!(r#","x":{}"\"[{{"{}"#, "[".repeat(n), "]".repeat(n));
        assert!(ok(event("c", &nested(31))).is_ok());
        assert!(
            ok(event("c", &nested(32)))
                .unwrap_err()
                .contains("nested deeper")
        );
    }

    #[test]
    fn the_events_array_stops_at_the_limit() {
        let body = |n: usize| {
            let events = vec![r#"{"name":"a","channel":"c"}"#; n].join(",");
            format!(r#"{{"events":[{events}],"time_ms":1,"other":{{"events":1}}}}"#)
        };
        assert_eq!(parse(body(3).as_bytes(), 3).unwrap().events.len(), 3);
        assert!(matches!(
            parse(body(4).as_bytes(), 3),
            Err(PayloadError::TooManyEvents { max: 3 })
        ));
        // Syntax errors after the limit are not reached: still 413, not 400.
        assert!(matches!(
            parse(br#"{"time_ms":1,"events":[1,2,3,4,"#, 3),
            Err(PayloadError::TooManyEvents { .. })
        ));
        assert!(matches!(
            parse(br#"{"time_ms":1,"events":[],"events":[]}"#, 3),
            Err(PayloadError::Shape(_))
        ));
        assert!(matches!(
            parse(br#"{"time_ms":1,"events":[]} x"#, 3),
            Err(PayloadError::Shape(_))
        ));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let e: &RawValue =
            serde_json::from_str(r#"{"name":"client_event","channel":"private-\u0061"}"#).unwrap();
        assert_eq!(event_head(e).unwrap().channel, "private-a");
    }
}
