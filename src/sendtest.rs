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

/// Every event type Pusher sends, in the order `send-test` posts them.
pub const EVENT_TYPES: [&str; 7] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
];

/// How long one post may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
pub fn sample_event(name: &str) -> Option<&'static str> {
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
pub fn sample_webhook(name: &str, time_ms: u128) -> Option<String> {
    sample_event(name).map(|event| format!(r#"{{"time_ms":{time_ms},"events":[{event}]}}"#))
}

/// The URL `send-test` posts to by default: the configured listen address (unspecified mapped
/// to loopback) and webhook path.
pub fn default_url(settings: &Settings) -> Result<String, SendTestError> {
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

impl std::fmt::Display for SendResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.answer {
            Ok(a) => write!(f, "{:<18} {} {}", self.event, a.status, a.body.trim_end()),
            Err(e) => write!(f, "{:<18} error: {e}", self.event),
        }
    }
}

/// Signs and posts the selected sample webhooks to `url` (default [`default_url`]) one after
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
            let hook = parse(body.as_bytes()).unwrap();
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

    #[tokio::test]
    async fn no_app_means_no_run() {
        let s = Settings::default();
        let err = send_test(&s, None, &Selection::All).await.unwrap_err();
        assert!(matches!(err, SendTestError::NoApps));
    }
}
