//! `[spool]`: the local durable buffer.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[spool]`: the local durable buffer.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    /// Directory of the spool's segment files.
    pub dir: PathBuf,
    /// When the spool holds this many bytes, webhooks get 503 and Pusher retries.
    pub max_bytes: u64,
    /// A segment file is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// How often the drainer looks for spooled events when idle.
    #[serde(with = "humantime_serde")]
    pub drain_interval: Duration,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("var/spool"),
            max_bytes: 1_073_741_824,
            segment_bytes: 16 * 1024 * 1024,
            drain_interval: Duration::from_secs(1),
        }
    }
}
