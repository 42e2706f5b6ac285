//! `[log]`: the log format and level.

use serde::{Deserialize, Serialize};

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `pusher_bridge=debug,warn`); `RUST_LOG` overrides it.
    pub level: String,
}

/// The default `log.level`: `info`, but async-nats at `warn`. async-nats logs every failed
/// connection attempt of each of the bridge's NATS clients at `info` (`event: client error`),
/// two lines every few hundred milliseconds while NATS is away, beside the bridge's own
/// rate-limited `cannot connect to NATS` warning, which says the same with the address.
pub const DEFAULT_LOG_LEVEL: &str = "info,async_nats=warn";

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: DEFAULT_LOG_LEVEL.into(),
        }
    }
}
