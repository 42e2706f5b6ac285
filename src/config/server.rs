//! `[server]` (the HTTP listener and its limits) and `[[apps]]` (the Pusher apps accepted).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Secret;

/// `[server]`: the HTTP side.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address for webhooks, and for `/metrics`, `/healthz`, `/readyz` and the channel-state
    /// API unless `admin_listen` is set.
    pub listen: String,
    /// When set, `/metrics`, `/healthz`, `/readyz` and the channel-state API are served on this
    /// address and only there, and `listen` serves the webhook path alone: exposing the
    /// webhook to Pusher then exposes nothing else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// Path Pusher posts webhooks to (POST only).
    pub webhook_path: String,
    /// Bodies larger than this are refused with 413 while they are read.
    pub max_body_bytes: u64,
    /// A client that has not sent its request headers within this time is disconnected.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client that has not sent its whole body within this time gets 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// On SIGTERM / SIGINT, in-flight webhooks get this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Refuse (401) webhooks whose `time_ms` is older than this. Off by default: Pusher retries
    /// for 5 minutes and a freshness check cuts into that window.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_webhook_age: Option<Duration>,
    /// Threads running the bridge's async work. 1 (the default) runs everything on one thread:
    /// the least CPU per webhook and no cross-thread wake-ups, and one core carries tens of
    /// thousands of webhooks a second (docs/performance.md). 0 starts one thread per CPU core;
    /// n > 1 starts n, for machines where one core is not enough.
    pub worker_threads: usize,
    /// Webhooks carrying more events than this are refused with 413 (outcome `too_large`)
    /// before their events are looked at: Pusher's batches are small (sockudo sends at most
    /// 100), and a signed body packed with hundreds of thousands of tiny events would otherwise
    /// cost CPU and memory out of all proportion to its size.
    pub max_events_per_webhook: usize,
    /// Connections served at once. One more waits in the listen backlog (not refused) until a
    /// connection ends, and a warning says the limit was reached (at most once a minute). Keeps
    /// memory bounded and leaves file descriptors for the broker and the spool.
    pub max_connections: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: None,
            webhook_path: "/pusher/webhooks".into(),
            max_body_bytes: 1_048_576,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            max_webhook_age: None,
            worker_threads: 1,
            max_events_per_webhook: 1000,
            max_connections: 1024,
        }
    }
}

/// `[[apps]]`: one Pusher app token. Repeat an app id with a second key to rotate keys.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    /// The Pusher app id; part of every subject.
    pub id: String,
    /// The app key (token) sent in `X-Pusher-Key`.
    pub key: String,
    /// The secret that signs webhooks for this key.
    #[serde(default)]
    pub secret: Secret,
    /// A file holding `secret` (a mounted Kubernetes Secret), read at start-up and on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}
