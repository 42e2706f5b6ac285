//! `[broker]`: which broker runs ([`BrokerKind`]), the common publishing settings, and
//! `[broker.nats]` / `[broker.amqp]`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Secret, SecretUrl};

/// Which broker implementation runs. Displayed as the configuration spells it (`nats`, `amqp`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// NATS JetStream.
    #[default]
    Nats,
    /// RabbitMQ (AMQP 0-9-1).
    Amqp,
    /// Benchmark only: acknowledges every event at once and stores nothing. Exists only in
    /// builds with the `bench-null-broker` cargo feature (never in a normal build), so the
    /// benchmark can measure the HTTP path's ceiling.
    #[cfg(feature = "bench-null-broker")]
    Null,
}

impl BrokerKind {
    /// The value of `broker.kind` that selects this broker.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nats => "nats",
            Self::Amqp => "amqp",
            #[cfg(feature = "bench-null-broker")]
            Self::Null => "null",
        }
    }
}

impl std::fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[broker]`: common publishing settings plus one section per broker.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSettings {
    /// `nats` or `amqp`.
    pub kind: BrokerKind,
    /// First token(s) of every subject / routing key.
    pub subject_prefix: String,
    /// Create or update streams / exchanges / queues at start-up. Off for operators who manage
    /// the topology themselves.
    pub declare: bool,
    /// How long one publish may wait for the broker's ack before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Total time a webhook may spend publishing (retries included) before its remaining events
    /// go to the spool; well inside Pusher's ~4 s answer budget.
    #[serde(with = "humantime_serde")]
    pub response_budget: Duration,
    /// Upper bound on publishes awaiting an ack across all webhooks (memory bound).
    pub max_in_flight: usize,
    /// Add CloudEvents 1.0 binary-mode `ce-` headers to every event message, so CloudEvents
    /// consumers (Knative, Dapr, Argo Events) take the stream as it is. Off by default: it adds
    /// about 220 bytes to each message.
    pub cloudevents: bool,
    /// NATS JetStream settings.
    pub nats: NatsSettings,
    /// RabbitMQ settings.
    pub amqp: AmqpSettings,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            kind: BrokerKind::Nats,
            subject_prefix: "pusher".into(),
            declare: true,
            publish_timeout: Duration::from_millis(1500),
            response_budget: Duration::from_secs(3),
            max_in_flight: 4096,
            cloudevents: false,
            nats: NatsSettings::default(),
            amqp: AmqpSettings::default(),
        }
    }
}

/// `[broker.nats]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated.
    pub url: SecretUrl,
    /// JetStream stream holding the events (subjects `<subject_prefix>.>`).
    pub stream: String,
    /// JetStream stream holding dead letters (subjects `<subject_prefix>_dlq.>`).
    pub dlq_stream: String,
    /// The stream's duplicate window; covers Pusher's 5-minute retry span.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Replicas of the events and dead-letter streams and of the sweeper's KV buckets (1 for a
    /// single server, 3 for a 3-node cluster): used when the bridge creates them, and raised to
    /// on an existing stream that has fewer; never lowered.
    pub replicas: usize,
    /// User name for user/password authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password for user/password authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// A file holding `password` (a mounted Kubernetes Secret), read at start-up and on reload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Token authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A file holding `token`, read at start-up and on reload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A `.creds` file (JWT + nkey seed) for decentralised auth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// PEM file of the CA that signs the server's certificate; enables TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// Require TLS even without a custom CA.
    pub tls_required: bool,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("nats://127.0.0.1:4222"),
            stream: "PUSHER_EVENTS".into(),
            dlq_stream: "PUSHER_DLQ".into(),
            duplicate_window: Duration::from_secs(10 * 60),
            replicas: 1,
            user: None,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            creds_file: None,
            tls_ca_file: None,
            tls_required: false,
        }
    }
}

/// `[broker.amqp]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// `amqp://` or `amqps://` URL, vhost included; or several, comma-separated (the nodes of
    /// a cluster, all with the same vhost): the bridge connects to the first that answers and,
    /// when the connection is lost, tries the others in turn (`servers::amqp_nodes`).
    pub url: SecretUrl,
    /// A file holding the password of `url`'s user (a mounted Kubernetes Secret), put into
    /// the URL when the configuration is loaded; the URL then names the user only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Durable topic exchange events are published to.
    pub exchange: String,
    /// Durable queue bound to `exchange` with `#`, so nothing is unroutable.
    pub queue: String,
    /// Exchange dead letters are published to.
    pub dlq_exchange: String,
    /// Durable queue bound to `dlq_exchange` with `#`.
    pub dlq_queue: String,
    /// The type of the events and dead-letter queues the bridge declares: `classic`, or
    /// `quorum` (replicated across a RabbitMQ cluster, the replacement for mirrored queues).
    pub queue_type: QueueType,
    /// PEM file of the CA that signs the server's certificate (for `amqps://`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// Channels used for publishing (publishes are pipelined on each).
    pub channels: usize,
    /// The `connection_name` client property, shown by the management UI and
    /// `rabbitmqctl list_connections`, so operators (and tests) can tell this bridge's
    /// connection apart from others on the same broker.
    pub connection_name: String,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            password_file: None,
            exchange: "pusher.events".into(),
            queue: "pusher.events".into(),
            dlq_exchange: "pusher.dlq".into(),
            dlq_queue: "pusher.dlq".into(),
            queue_type: QueueType::Classic,
            tls_ca_file: None,
            channels: 2,
            connection_name: "pusher-bridge".into(),
        }
    }
}

/// `broker.amqp.queue_type`: how RabbitMQ stores the events and dead-letter queues.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A classic queue on one node (declared without `x-queue-type`, as before this setting).
    #[default]
    Classic,
    /// A quorum queue (`x-queue-type = quorum`): Raft-replicated across the cluster's nodes, so
    /// the queue survives the loss of a minority of them.
    Quorum,
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    #[test]
    fn null_broker_exists_only_in_the_benchmark_build() {
        let parsed = Settings::from_toml("[broker]\nkind = \"null\"\n");
        assert_eq!(parsed.is_ok(), cfg!(feature = "bench-null-broker"));
    }
}
