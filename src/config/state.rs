//! `[state]`: channel state kept in a NATS JetStream KV bucket.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SecretUrl;

/// `[state]`: channel state kept from the webhooks in a NATS JetStream KV bucket and served
/// with Pusher's HTTP API paths (see [`crate::state`]).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSettings {
    /// Keep channel state and serve `GET /apps/{app_id}/channels...`. Off by default.
    pub enabled: bool,
    /// NATS holding the KV bucket; default `broker.nats.url` (needed with `broker.kind = "amqp"`
    /// unless NATS runs at that default). Uses the auth / TLS settings of `[broker.nats]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<SecretUrl>,
    /// The KV bucket (its stream is `KV_<bucket>`); replicas follow `broker.nats.replicas`.
    pub bucket: String,
    /// Name of the durable consumers (NATS: `<durable>_<event>` on the events stream) or the
    /// durable queue suffix (AMQP: `<broker.amqp.queue>.<durable>`) the state is applied from.
    pub durable: String,
    /// Vacated channels and removed members stay as tombstones this long after the tombstone
    /// was written (not after the event's `time_ms`: an event that waited in a spool still
    /// gets the whole span), so a late older event (Pusher retries for 5 minutes) cannot bring
    /// them back; then they are dropped.
    #[serde(with = "humantime_serde")]
    pub tombstone_ttl: Duration,
    /// How often each replica drops tombstones written more than `tombstone_ttl` ago.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            nats_url: None,
            bucket: "PUSHER_STATE".into(),
            durable: "state".into(),
            tombstone_ttl: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(600),
        }
    }
}
