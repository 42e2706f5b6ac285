//! `pusher-bridge send-test`: a smoke test after a deployment. It signs one sample webhook per
//! Pusher event type with the first configured app's key and secret, exactly as Pusher would,
//! posts each to the bridge and reports every answer.
//!
//! The samples use channels named `*send-test` so their events are easy to spot (and filter)
//! downstream; `time_ms` is the current time, so a repeated run is never taken for a duplicate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::Method;

use crate::config::Settings;
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

/// Which sample webhooks to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// One webhook per entry of [`EVENT_TYPES`].
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
            Self::All => EVENT_TYPES.to_vec(),
            Self::One(name) => vec![name],
        }
    }
}

/// The sample event object (JSON text) of `name`, with the fields Pusher sends for it.
pub(crate) fn sample_event(name: &str) -> Option<&'static str> {
    Some(match name {
        "channel_occupied" => r#"{"name":"channel_occupied","channel":"send-test"}"#,
        "channel_vacated" => r#"{"name":"channel_vacated","channel":"send-test"}"#,
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

impl SendResult {
    /// Where the events went, when the bridge accepted the webhook and said so.
    pub fn delivery(&self) -> Option<Delivery> {
        let a = self.answer.as_ref().ok()?;
        if !a.status.is_success() {
            return None;
        }
        serde_json::from_str(&a.body).ok()
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
    NotPublished(Delivery),
    /// Some webhooks were not accepted (exit 1).
    Refused,
}

impl Verdict {
    /// The verdict of `results`.
    pub fn of(results: &[SendResult]) -> Self {
        if results.iter().any(|r| !r.accepted()) {
            return Self::Refused;
        }
        let mut total = Delivery::default();
        for d in results.iter().filter_map(SendResult::delivery) {
            total.published += d.published;
            total.dead_lettered += d.dead_lettered;
            total.spooled += d.spooled;
        }
        if total.spooled > 0 || total.dead_lettered > 0 {
            Self::NotPublished(total)
        } else {
            Self::Published
        }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Published => 0,
            Self::NotPublished(_) => EXIT_NOT_PUBLISHED,
            Self::Refused => 1,
        }
    }

    /// What to tell the operator beyond the count of accepted webhooks, if anything.
    pub fn explanation(&self) -> Option<String> {
        let Self::NotPublished(d) = self else {
            return None;
        };
        let mut parts = Vec::new();
        if d.spooled > 0 {
            parts.push(format!(
                "{} event(s) only spooled: the bridge cannot reach the broker (see its log and \
                 /readyz); they are published once it is back",
                d.spooled
            ));
        }
        if d.dead_lettered > 0 {
            parts.push(format!(
                "{} event(s) dead-lettered: see `pusher-bridge dlq list`",
                d.dead_lettered
            ));
        }
        Some(format!(
            "not delivered to the broker: {} of {} event(s) published; {}",
            d.published,
            d.published + d.spooled + d.dead_lettered,
            parts.join("; ")
        ))
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
    for event in selection.events() {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
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
            Verdict::NotPublished(Delivery {
                published: 1,
                dead_lettered: 1,
                spooled: 1
            })
        );
        assert_eq!(v.exit_code(), EXIT_NOT_PUBLISHED);
        let text = v.explanation().unwrap();
        assert!(
            text.contains("1 of 3 event(s) published")
                && text.contains("1 event(s) only spooled")
                && text.contains("dlq list"),
            "{text}"
        );
        let v = Verdict::of(&[
            refused,
            answered(200, r#"{"published":0,"dead_lettered":0,"spooled":1}"#),
        ]);
        assert_eq!(v.exit_code(), 1);
        assert_eq!(v.explanation(), None);
    }

    #[tokio::test]
    async fn no_app_means_no_run() {
        let s = Settings::default();
        let err = send_test(&s, None, &Selection::All).await.unwrap_err();
        assert!(matches!(err, SendTestError::NoApps));
    }
}
