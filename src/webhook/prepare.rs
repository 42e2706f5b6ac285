//! What the events become: messages on their subjects, with the body spliced from the event's
//! own text (never re-serialised), and `malformed` dead letters for the events that have no
//! subject.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{AppKey, EventHead, Webhook, event_head};
use crate::message::{DeadLetter, DlqReason, Message, now_ms};
use crate::routing;

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
                trace: None,
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
                    trace: None,
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
