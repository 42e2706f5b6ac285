//! Typed settings: defaults < TOML file < `PUSHER_BRIDGE_*` environment (figment).
//!
//! Every key of `shared/docs/interface.md` lives here with its documented default. Unknown keys
//! are an error, so a typo never silently falls back to a default. Secrets are wrapped in
//! [`Secret`] / [`SecretUrl`], whose `Debug` and `Serialize` never show the value, so neither a log
//! line nor `check-config` can leak them.
//!
//! One file per concern:
//! - `mod.rs`: [`Settings`] (the whole configuration) and [`ConfigError`];
//! - `server.rs`: `[server]` ([`ServerSettings`]) and `[[apps]]` ([`AppSettings`]);
//! - `broker.rs`: `[broker]`, `[broker.nats]`, `[broker.amqp]` ([`BrokerSettings`]);
//! - `spool.rs`, `retention.rs`, `log.rs`, `state.rs`: `[spool]`, `[retention]`, `[log]`,
//!   `[state]`;
//! - `telemetry.rs`: `[tracing]` ([`TracingSettings`]) and the `OTEL_*` variables it honours;
//! - `secret.rs`: [`Secret`] and [`SecretUrl`];
//! - `url_auth.rs`: user info in URLs, read once for the clients, the redaction
//!   (`redact_url`) and the log mask;
//! - `servers.rs`: the NATS server and RabbitMQ node lists;
//! - `load.rs`: the file ([`resolve_path`]), [`Settings::load`], and load errors that never show
//!   a value;
//! - `secret_files.rs`: the `_file` twins of the secret keys, read at load;
//! - `validate.rs`: values that parse but cannot work, refused naming their key.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

mod broker;
mod load;
mod log;
mod retention;
mod secret;
mod secret_files;
mod server;
pub(crate) mod servers;
mod spool;
mod state;
mod telemetry;
pub(crate) mod url_auth;
mod validate;

pub use broker::{AmqpSettings, BrokerKind, BrokerSettings, NatsSettings, QueueType};
pub use load::resolve_path;
pub use log::{DEFAULT_LOG_LEVEL, LogFormat, LogSettings};
pub use retention::{AppRetention, RetentionMethod, RetentionSettings, RetentionTarget};
pub use secret::{Secret, SecretUrl};
pub use server::{AppSettings, ServerSettings};
pub use spool::SpoolSettings;
pub use state::StateSettings;
pub use telemetry::{OTLP_ENDPOINT_ENV, OTLP_TRACES_ENDPOINT_ENV, TracingSettings};
pub(crate) use telemetry::{OTLP_ENDPOINT_KEY, env_protocol_unusable};
pub(crate) use url_auth::redact_url;
pub(crate) use validate::usable_traces_url;

/// A configuration problem, naming the key at fault so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or did not match the schema.
    #[error("invalid configuration: {0}")]
    Load(String),
    /// A key has a value the bridge cannot run with.
    #[error("invalid configuration key `{key}`: {message}")]
    Invalid {
        /// Dotted key path, e.g. `broker.nats.stream`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration of one bridge process.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// HTTP listener and request limits.
    pub server: ServerSettings,
    /// The Pusher apps whose webhooks are accepted; one entry per key (token).
    pub apps: Vec<AppSettings>,
    /// Where events are published.
    pub broker: BrokerSettings,
    /// Local durable buffer used while the broker cannot take events.
    pub spool: SpoolSettings,
    /// The retention sweeper's schedule (the seed component's trim timers).
    pub retention: RetentionSettings,
    /// Log format and level.
    pub log: LogSettings,
    /// Channel state (occupancy, subscription counts, presence members) kept in NATS KV.
    pub state: StateSettings,
    /// OpenTelemetry tracing of webhooks and published events (off by default).
    pub tracing: TracingSettings,
}

impl Settings {
    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|e| invalid("server.listen", format!("{e}")))
    }

    /// The admin listen address, parsed (`None`: everything is served on `listen`).
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.server
            .admin_listen
            .as_deref()
            .map(|a| {
                a.parse()
                    .map_err(|e| invalid("server.admin_listen", format!("{e}")))
            })
            .transpose()
    }

    /// The effective configuration as TOML, secrets redacted (for `check-config`).
    pub fn to_redacted_toml(&self) -> String {
        // Serialising plain data cannot fail; Debug (also redacted) is the fallback.
        toml::to_string_pretty(self).unwrap_or_else(|_| format!("{self:#?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    #[test]
    fn defaults_match_the_interface() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert_eq!(s.server.webhook_path, "/pusher/webhooks");
        assert_eq!(s.server.max_body_bytes, 1_048_576);
        assert_eq!(s.broker.kind, BrokerKind::Nats);
        assert_eq!(s.broker.subject_prefix, "pusher");
        assert_eq!(s.broker.nats.url.expose(), "nats://127.0.0.1:4222");
        assert_eq!(s.broker.nats.stream, "PUSHER_EVENTS");
        assert_eq!(s.broker.nats.dlq_stream, "PUSHER_DLQ");
        assert_eq!(s.broker.amqp.exchange, "pusher.events");
        assert_eq!(s.broker.amqp.queue, "pusher.events");
        assert_eq!(s.broker.amqp.dlq_exchange, "pusher.dlq");
        assert_eq!(s.broker.amqp.dlq_queue, "pusher.dlq");
        assert_eq!(s.spool.dir, PathBuf::from("var/spool"));
        assert_eq!(s.spool.max_bytes, 1_073_741_824);
        assert!(s.retention.events.enabled && s.retention.dlq.enabled);
        assert_eq!(s.retention.events.max_age, Duration::from_secs(7 * 86400));
        assert_eq!(s.retention.dlq.max_age, Duration::from_secs(30 * 86400));
        assert_eq!(s.retention.events.interval, Duration::from_secs(3600));
    }

    #[test]
    fn redacted_toml_parses_back() {
        let s = Settings::from_toml("[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n").unwrap();
        let text = s.to_redacted_toml();
        let back = Settings::from_toml(&text).unwrap();
        assert_eq!(back.apps[0].key, "k");
        assert_eq!(back.server.listen, s.server.listen);
    }
}
