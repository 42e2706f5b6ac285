//! `pusher-bridge send-test`: a smoke test after a deployment. It signs one sample webhook per
//! Pusher event type with the first configured app's key and secret, exactly as Pusher would,
//! posts each to the bridge and reports every answer.
//!
//! The samples use channels named `*send-test` so their events are easy to spot (and filter)
//! downstream; `time_ms` is the current time, so a repeated run is never taken for a duplicate.
//!
//! `all` posts them in the order of one session on `presence-send-test` ([`SESSION`]), each
//! webhook a millisecond or more after the one before: the channel is occupied, the member
//! joins, ..., the member leaves, the channel is vacated. So the channel state (`[state]`),
//! which hides the members of a channel that is not occupied, stays consistent at every step
//! and ends as it began: nothing occupied, nobody present. One event at a time
//! (`--event channel_occupied`, then `--event member_added`) shows the member present.
//!
//! When events were only spooled (or refused with 503), the bridge's answer says why its broker
//! did not take them (`"broker"`, `"broker_error"`: [`BrokerStatus`]), and `send-test` names
//! the cause and what to do: connecting, JetStream off, unreachable, refused, not declared,
//! blocked, or draining (the broker is up, the events queued behind earlier spooled ones).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::Method;

use crate::broker::BrokerStatus;
use crate::config::{BrokerKind, Settings};
use crate::probe::{self, HttpAnswer, ProbeError};
use crate::webhook::AppRegistry;

pub(crate) use crate::message::EVENT_TYPES;

/// How long one post may take before it counts as failed.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `send-test` could not run at all (individual failed posts are in [`SendResult`]).
#[derive(Debug, thiserror::Error)]
pub enum SendTestError {
    /// `[[apps]]` is empty: there is no key to sign with.
    #[error("no [[apps]] configured: send-test signs with the first app's key and secret")]
    NoApps,
    /// `--event` names no known event type.
    #[error("unknown event `{0}`; use `all` or one of: {list}", list = EVENT_TYPES.join(", "))]
    UnknownEvent(String),
    /// The target URL is unusable.
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

/// The event types in the order `all` posts them: one session on the presence channel, so
/// that the channel state is consistent after each webhook (a member joins an occupied channel,
/// leaves it before it is vacated) and empty again at the end.
pub const SESSION: [&str; 7] = [
    "channel_occupied",
    "member_added",
    "client_event",
    "cache_miss",
    "subscription_count",
    "member_removed",
    "channel_vacated",
];

/// Which sample webhooks to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// One webhook per event type, in the order of [`SESSION`].
    All,
    /// Only this event type.
    One(&'static str),
}

impl std::str::FromStr for Selection {
    type Err = SendTestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            return Ok(Self::All);
        }
        EVENT_TYPES
            .iter()
            .find(|name| **name == s)
            .map(|name| Self::One(name))
            .ok_or_else(|| SendTestError::UnknownEvent(s.to_string()))
    }
}

impl Selection {
    /// The event types this selection sends, in order.
    pub fn events(&self) -> Vec<&'static str> {
        match self {
            Self::All => SESSION.to_vec(),
            Self::One(name) => vec![name],
        }
    }
}

/// The sample event object (JSON text) of `name`, with the fields Pusher sends for it. The
/// channel existence and member events are about one presence channel, so that the member
/// joins a channel the state counts as occupied; `subscription_count` is for non-presence
/// channels only (Pusher sends none for presence channels), so its channel is `send-test`.
pub(crate) fn sample_event(name: &str) -> Option<&'static str> {
    Some(match name {
        "channel_occupied" => r#"{"name":"channel_occupied","channel":"presence-send-test"}"#,
        "channel_vacated" => r#"{"name":"channel_vacated","channel":"presence-send-test"}"#,
        "member_added" => {
            r#"{"name":"member_added","channel":"presence-send-test","user_id":"send-test-user"}"#
        }
        "member_removed" => {
            r#"{"name":"member_removed","channel":"presence-send-test","user_id":"send-test-user"}"#
        }
        "client_event" => {
            r#"{"name":"client_event","channel":"private-send-test","event":"client-send-test","data":"{\"hello\":\"world\"}","socket_id":"123.456"}"#
        }
        "cache_miss" => r#"{"name":"cache_miss","channel":"cache-send-test"}"#,
        "subscription_count" => {
            r#"{"name":"subscription_count","channel":"send-test","subscription_count":1}"#
        }
        _ => return None,
    })
}

/// A webhook body carrying the sample event of `name`, stamped `time_ms`.
pub(crate) fn sample_webhook(name: &str, time_ms: u128) -> Option<String> {
    sample_event(name).map(|event| format!(r#"{{"time_ms":{time_ms},"events":[{event}]}}"#))
}

/// The URL `send-test` posts to by default: the configured listen address (unspecified mapped
/// to loopback) and webhook path.
pub(crate) fn default_url(settings: &Settings) -> Result<String, SendTestError> {
    let base = probe::local_base_url(settings).map_err(ProbeError::from)?;
    Ok(format!("{base}{}", settings.server.webhook_path))
}

/// What happened to one sample webhook.
#[derive(Debug)]
pub struct SendResult {
    /// The event type it carried.
    pub event: &'static str,
    /// The bridge's answer, or why there was none.
    pub answer: Result<HttpAnswer, ProbeError>,
}

impl SendResult {
    /// Whether the bridge answered 2xx (the webhook's events are durable).
    pub fn accepted(&self) -> bool {
        self.answer.as_ref().is_ok_and(|a| a.status.is_success())
    }
}

/// Where an accepted webhook's events went, from the bridge's `200` answer
/// (`{"published":n,"dead_lettered":n,"spooled":n}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Delivery {
    /// Acknowledged by the broker.
    pub published: u64,
    /// Put on the dead-letter queue.
    pub dead_lettered: u64,
    /// Held on the local spool (the broker did not take them in time).
    pub spooled: u64,
}

/// Why the bridge's broker did not take the events, as an answer says it: the `"broker"` and
/// `"broker_error"` keys of a `200` with spooled events or of a `503`.
#[derive(Debug, Default, serde::Deserialize)]
struct BrokerKeys {
    broker: Option<String>,
    broker_error: Option<String>,
}

impl SendResult {
    /// Where the events went, when the bridge accepted the webhook and said so.
    pub fn delivery(&self) -> Option<Delivery> {
        let a = self.answer.as_ref().ok()?;
        if !a.status.is_success() {
            return None;
        }
        serde_json::from_str(&a.body).ok()
    }

    /// Why the bridge's broker did not take this webhook's events, when the answer says so
    /// (bridges before issue 21 do not; an unknown token is left out too).
    pub fn broker_status(&self) -> Option<BrokerStatus> {
        let a = self.answer.as_ref().ok()?;
        let keys: BrokerKeys = serde_json::from_str(&a.body).ok()?;
        BrokerStatus::from_token(keys.broker.as_deref()?, keys.broker_error.as_deref())
    }
}

/// The broker `send-test`'s explanation names: its kind and, when `send-test` posted to the
/// bridge of its own configuration, the configured address (password redacted).
#[derive(Debug, Clone)]
pub struct BrokerContext {
    /// NATS or RabbitMQ.
    pub kind: BrokerKind,
    /// `broker.nats.url` / `broker.amqp.url` redacted; `None` with `--url` (another bridge,
    /// whose broker this configuration may not name).
    pub address: Option<String>,
}

impl BrokerContext {
    /// The broker of `settings`; its address only when `url_given` is false.
    pub fn of(settings: &Settings, url_given: bool) -> Self {
        let kind = settings.broker.kind;
        let address = (!url_given).then(|| match kind {
            BrokerKind::Amqp => settings.broker.amqp.url.redacted(),
            // NATS (and the benchmark's null broker, which never spools).
            _ => settings.broker.nats.url.redacted(),
        });
        Self { kind, address }
    }

    /// `why: <label>: <what it means and what to do>`, and when to run `send-test` again where
    /// waiting is the remedy.
    fn why(&self, status: &BrokerStatus) -> String {
        let (label, again) = match status {
            BrokerStatus::Up => (
                "draining",
                "; run send-test again once pusher_bridge_spool_events is 0",
            ),
            BrokerStatus::Connecting => ("connecting", "; run send-test again in a few seconds"),
            BrokerStatus::JetStreamOff(_) => ("JetStream off", ""),
            BrokerStatus::Unreachable(_) => ("unreachable", ""),
            BrokerStatus::Refused(_) => ("refused", ""),
            BrokerStatus::NotDeclared(_) => ("not declared", ""),
            BrokerStatus::Blocked => ("blocked", ""),
        };
        let describe = status.describe(self.kind, self.address.as_deref());
        format!("why: {label}: {describe}{again}")
    }
}

/// Exit code of `send-test` when every webhook was accepted but not every event reached the
/// broker's stream (some were spooled or dead-lettered). 1 stays for refused webhooks and
/// errors, and 2 is the argument parser's.
pub(crate) const EXIT_NOT_PUBLISHED: u8 = 3;

/// The outcome of a whole `send-test` run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every webhook accepted and every event published (exit 0).
    Published,
    /// Every webhook accepted, but events only spooled or dead-lettered
    /// (exit `EXIT_NOT_PUBLISHED`).
    NotPublished {
        /// Where the events went, summed over the answers.
        delivery: Delivery,
        /// Why the broker did not take the spooled ones, as the last answer that said so
        /// put it.
        broker: Option<BrokerStatus>,
    },
    /// Some webhooks were not accepted (exit 1).
    Refused {
        /// Why the broker did not take the events of a `503` (no spool room either), as the
        /// last such answer put it.
        broker: Option<BrokerStatus>,
    },
}

impl Verdict {
    /// The verdict of `results`.
    pub fn of(results: &[SendResult]) -> Self {
        // The last answer is the most recent word on the connection (a first webhook may
        // have found it connecting, a later one refused).
        let broker = results.iter().rev().find_map(SendResult::broker_status);
        if results.iter().any(|r| !r.accepted()) {
            // Only a 503's own words explain a refusal (a 200 before it may have spooled for
            // another reason).
            let broker = results
                .iter()
                .rev()
                .filter(|r| {
                    r.answer
                        .as_ref()
                        .is_ok_and(|a| a.status == hyper::StatusCode::SERVICE_UNAVAILABLE)
                })
                .find_map(SendResult::broker_status);
            return Self::Refused { broker };
        }
        let mut total = Delivery::default();
        for d in results.iter().filter_map(SendResult::delivery) {
            total.published += d.published;
            total.dead_lettered += d.dead_lettered;
            total.spooled += d.spooled;
        }
        if total.spooled > 0 || total.dead_lettered > 0 {
            Self::NotPublished {
                delivery: total,
                broker: (total.spooled > 0).then_some(broker).flatten(),
            }
        } else {
            Self::Published
        }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Published => 0,
            Self::NotPublished { .. } => EXIT_NOT_PUBLISHED,
            Self::Refused { .. } => 1,
        }
    }

    /// What to tell the operator beyond the count of accepted webhooks, if anything: where
    /// the events went and, for spooled (or 503) ones, why the broker of `context` did not take
    /// them and what to do.
    pub fn explanation(&self, context: &BrokerContext) -> Option<String> {
        let (d, broker) = match self {
            Self::Published => return None,
            Self::Refused { broker: None } => return None,
            Self::Refused {
                broker: Some(status),
            } => {
                return Some(format!(
                    "the bridge could not make events durable: the broker did not take them, \
                     and it could not write them to its spool\n{}",
                    context.why(status)
                ));
            }
            Self::NotPublished { delivery, broker } => (delivery, broker),
        };
        let mut parts = Vec::new();
        if d.spooled > 0 {
            parts.push(format!(
                "{} event(s) only spooled (published once the broker takes them)",
                d.spooled
            ));
        }
        if d.dead_lettered > 0 {
            parts.push(format!(
                "{} event(s) dead-lettered: see `pusher-bridge dlq list`",
                d.dead_lettered
            ));
        }
        let mut text = format!(
            "not delivered to the broker: {} of {} event(s) published; {}",
            d.published,
            d.published + d.spooled + d.dead_lettered,
            parts.join("; ")
        );
        if d.spooled > 0 {
            text.push('\n');
            match broker {
                Some(status) => text.push_str(&context.why(status)),
                None => text.push_str(
                    "why: the bridge did not say (a version before send-test named the cause): \
                     see its log and /readyz",
                ),
            }
        }
        Some(text)
    }
}

impl std::fmt::Display for SendResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.answer {
            Ok(a) => write!(f, "{:<18} {} {}", self.event, a.status, a.body.trim_end()),
            Err(e) => write!(f, "{:<18} error: {e}", self.event),
        }
    }
}

/// Signs and posts the selected sample webhooks to `url` (default `default_url`) one after
/// the other, with the first configured app's key. Returns every result; the caller decides
/// that only all-2xx is a pass.
pub async fn send_test(
    settings: &Settings,
    url: Option<&str>,
    selection: &Selection,
) -> Result<(String, Vec<SendResult>), SendTestError> {
    let app = settings.apps.first().ok_or(SendTestError::NoApps)?;
    let registry = AppRegistry::new(std::slice::from_ref(app));
    let key = registry.get(&app.key).ok_or(SendTestError::NoApps)?;
    let url = match url {
        Some(u) => u.to_string(),
        None => default_url(settings)?,
    };
    // Refuse a bad URL once, up front, instead of once per event.
    probe::parse_http_url(&url)?;
    let mut results = Vec::new();
    let mut last_ms = 0;
    for event in selection.events() {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        // Strictly increasing: the channel state orders events by `time_ms` first, and two
        // webhooks of the same millisecond (member_added, member_removed) would be ordered by
        // their digests instead of the order they were sent in.
        let time_ms = now_ms.max(last_ms + 1);
        last_ms = time_ms;
        let Some(body) = sample_webhook(event, time_ms) else {
            continue;
        };
        let signature = key.sign(body.as_bytes());
        let headers = [
            ("content-type", "application/json"),
            ("x-pusher-key", app.key.as_str()),
            ("x-pusher-signature", signature.as_str()),
        ];
        let answer = probe::send(
            Method::POST,
            &url,
            &headers,
            Bytes::from(body),
            REQUEST_TIMEOUT,
        )
        .await;
        results.push(SendResult { event, answer });
    }
    Ok((url, results))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::{event_head, parse};

    #[test]
    fn every_sample_is_a_webhook_the_bridge_parses() {
        for name in EVENT_TYPES {
            let body = sample_webhook(name, 1_700_000_000_000).unwrap();
            let hook = parse(body.as_bytes(), 100).unwrap();
            assert_eq!(hook.events.len(), 1, "{name}");
            let head = event_head(hook.events[0]).unwrap();
            assert_eq!(head.name, name);
            assert!(head.channel.ends_with("send-test"), "{}", head.channel);
        }
        assert!(sample_event("member_updated").is_none());
    }

    #[test]
    fn all_is_one_consistent_session_on_the_presence_channel() {
        let all = Selection::All.events();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        let mut types = EVENT_TYPES.to_vec();
        types.sort_unstable();
        assert_eq!(sorted, types, "every event type once");
        let at = |name: &str| all.iter().position(|e| *e == name).unwrap();
        assert_eq!(at("channel_occupied"), 0);
        assert_eq!(at("channel_vacated"), all.len() - 1);
        assert!(at("member_added") < at("member_removed"));
        let channel = |name: &str| {
            let body = sample_webhook(name, 1).unwrap();
            let hook = parse(body.as_bytes(), 100).unwrap();
            event_head(hook.events[0]).unwrap().channel.to_string()
        };
        for name in ["channel_vacated", "member_added", "member_removed"] {
            assert_eq!(channel(name), channel("channel_occupied"), "{name}");
        }
        assert!(channel("channel_occupied").starts_with("presence-"));
        assert!(!channel("subscription_count").starts_with("presence-"));
    }

    #[test]
    fn selection_parses_all_and_known_names_only() {
        assert_eq!("all".parse::<Selection>().unwrap().events().len(), 7);
        assert_eq!(
            "cache_miss".parse::<Selection>().unwrap().events(),
            vec!["cache_miss"]
        );
        let err = "cache-miss".parse::<Selection>().unwrap_err().to_string();
        assert!(
            err.contains("cache-miss") && err.contains("subscription_count"),
            "{err}"
        );
    }

    #[test]
    fn default_url_uses_listen_and_path() {
        let mut s = Settings::default();
        s.server.listen = "0.0.0.0:9090".into();
        s.server.webhook_path = "/hooks".into();
        assert_eq!(default_url(&s).unwrap(), "http://127.0.0.1:9090/hooks");
    }

    fn answered(status: u16, body: &str) -> SendResult {
        SendResult {
            event: "cache_miss",
            answer: Ok(HttpAnswer {
                status: hyper::StatusCode::from_u16(status).unwrap(),
                body: body.into(),
            }),
        }
    }

    #[test]
    fn verdict_tells_published_from_spooled_and_refused() {
        let published = answered(200, r#"{"published":1,"dead_lettered":0,"spooled":0}"#);
        let spooled = answered(200, r#"{"published":0,"dead_lettered":0,"spooled":1}"#);
        let dead = answered(200, r#"{"published":0,"dead_lettered":1,"spooled":0}"#);
        let refused = answered(401, r#"{"error":"bad signature"}"#);
        assert_eq!(Verdict::of(&[published]).exit_code(), 0);
        let v = Verdict::of(&[
            answered(200, r#"{"published":1,"dead_lettered":0,"spooled":0}"#),
            spooled,
            dead,
        ]);
        assert_eq!(
            v,
            Verdict::NotPublished {
                delivery: Delivery {
                    published: 1,
                    dead_lettered: 1,
                    spooled: 1
                },
                broker: None,
            }
        );
        assert_eq!(v.exit_code(), EXIT_NOT_PUBLISHED);
        let text = v.explanation(&nats()).unwrap();
        assert!(
            text.contains("1 of 3 event(s) published")
                && text.contains("1 event(s) only spooled")
                && text.contains("dlq list")
                && text.contains("the bridge did not say"),
            "{text}"
        );
        let v = Verdict::of(&[
            refused,
            answered(200, r#"{"published":0,"dead_lettered":0,"spooled":1}"#),
        ]);
        assert_eq!(v.exit_code(), 1);
        assert_eq!(v.explanation(&nats()), None);
    }

    fn nats() -> BrokerContext {
        BrokerContext {
            kind: BrokerKind::Nats,
            address: Some("nats://127.0.0.1:4222".into()),
        }
    }

    /// The explanation of seven webhooks whose events were spooled, each answer saying
    /// `broker` (and `broker_error`).
    fn spooled_because(broker: &str, error: Option<&str>) -> (Verdict, String) {
        let error = error
            .map(|e| format!(r#","broker_error":{}"#, serde_json::Value::from(e)))
            .unwrap_or_default();
        let body = format!(
            r#"{{"published":0,"dead_lettered":0,"spooled":1,"broker":"{broker}"{error}}}"#
        );
        let results: Vec<_> = (0..7).map(|_| answered(200, &body)).collect();
        let v = Verdict::of(&results);
        let text = v.explanation(&nats()).unwrap();
        (v, text)
    }

    #[test]
    fn spooled_events_are_explained_by_the_brokers_status() {
        let cases: [(&str, Option<&str>, &[&str]); 6] = [
            (
                "connecting",
                None,
                &[
                    "why: connecting: the bridge's connection to NATS at nats://127.0.0.1:4222 is still coming up",
                    "run send-test again",
                ],
            ),
            (
                "jetstream_off",
                Some("no responders"),
                &[
                    "why: JetStream off: NATS at nats://127.0.0.1:4222 is up but JetStream is off",
                    "-js",
                ],
            ),
            (
                "unreachable",
                Some("IO error"),
                &[
                    "why: unreachable: nothing answers at NATS at nats://127.0.0.1:4222 (IO error)",
                    "broker.nats.url",
                ],
            ),
            (
                "refused",
                Some("authorization violation"),
                &[
                    "why: refused: NATS at nats://127.0.0.1:4222 refused the bridge's connection (authorization violation)",
                    "broker.nats.password",
                ],
            ),
            (
                "not_declared",
                Some("stream X: timed out"),
                &[
                    "why: not declared: connected to NATS",
                    "streams (stream X: timed out)",
                    "log",
                ],
            ),
            (
                "up",
                None,
                &["why: draining:", "pusher_bridge_spool_events"],
            ),
        ];
        for (token, error, words) in cases {
            let (v, text) = spooled_because(token, error);
            assert_eq!(v.exit_code(), EXIT_NOT_PUBLISHED, "{token}");
            assert!(text.contains("0 of 7 event(s) published"), "{text}");
            for w in words {
                assert!(text.contains(w), "{token}: `{w}` missing in:\n{text}");
            }
            assert!(!text.contains("cannot reach the broker"), "{text}");
        }
        // The latest answer wins, and `--url` leaves the configured address out.
        let v = Verdict::of(&[
            answered(
                200,
                r#"{"published":0,"dead_lettered":0,"spooled":1,"broker":"connecting"}"#,
            ),
            answered(
                200,
                r#"{"published":0,"dead_lettered":0,"spooled":1,"broker":"refused","broker_error":"authorization violation"}"#,
            ),
        ]);
        let elsewhere = BrokerContext {
            kind: BrokerKind::Nats,
            address: None,
        };
        let text = v.explanation(&elsewhere).unwrap();
        assert!(
            text.contains("why: refused: NATS refused the bridge's connection"),
            "{text}"
        );
    }

    #[test]
    fn a_503_says_why_the_broker_did_not_take_the_events() {
        let v = Verdict::of(&[answered(
            503,
            r#"{"broker":"unreachable","broker_error":"IO error","error":"unavailable: 1 events could not be made durable: spool full"}"#,
        )]);
        assert_eq!(v.exit_code(), 1);
        let text = v.explanation(&nats()).unwrap();
        assert!(
            text.contains("could not write them to its spool")
                && text.contains("why: unreachable: nothing answers at NATS"),
            "{text}"
        );
    }

    #[test]
    fn the_configured_address_is_shown_redacted() {
        let mut s = Settings::default();
        s.broker.nats.url = crate::config::SecretUrl::new("nats://bridge:hunter2@nats:4222");
        let c = BrokerContext::of(&s, false);
        let address = c.address.unwrap();
        assert!(
            !address.contains("hunter2") && address.contains("nats:4222"),
            "{address}"
        );
        assert!(BrokerContext::of(&s, true).address.is_none());
    }

    #[tokio::test]
    async fn no_app_means_no_run() {
        let s = Settings::default();
        let err = send_test(&s, None, &Selection::All).await.unwrap_err();
        assert!(matches!(err, SendTestError::NoApps));
    }
}
