//! Typed settings: defaults < TOML file < `PUSHER_BRIDGE_*` environment (figment).
//!
//! Every key of `shared/docs/interface.md` lives here with its documented default. Unknown keys
//! are an error, so a typo never silently falls back to a default. Secrets are wrapped in
//! [`Secret`] / [`SecretUrl`], whose `Debug` and `Serialize` never show the value, so neither a log
//! line nor `check-config` can leak them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize, Serializer};

mod secret_files;
pub(crate) mod servers;
pub(crate) mod url_auth;
mod validate;

use url_auth::{Reading, split_user_info};
pub(crate) use validate::usable_traces_url;

/// Prefix of the environment variables that override file keys.
pub(crate) const ENV_PREFIX: &str = "PUSHER_BRIDGE_";
/// Environment variable naming the config file (not itself a config key).
pub(crate) const CONFIG_ENV: &str = "PUSHER_BRIDGE_CONFIG";
/// The config file used when neither `--config` nor `$PUSHER_BRIDGE_CONFIG` names one.
pub(crate) const DEFAULT_CONFIG_PATH: &str = "config/pusher-bridge.toml";

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

/// A secret string (an app secret, a password). Shown as `***` everywhere but [`Secret::expose`].
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value; used by tests and by code that builds settings by hand.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The real value, for the one place that needs it (signing, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A broker URL that may carry a password (`amqp://user:pass@host`). Shown with the password
/// replaced by `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The URL with its password, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`, for logs and `check-config`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

/// Replaces the password of every `[scheme://]user:password@host` in `url` (comma-separated
/// server lists included) with `***`, `token@host` with `***@host`; read greedily
/// ([`Reading::Mask`]), so a password holding `/`, `?` or `@` is hidden whole.
pub(crate) fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| match split_user_info(part, Reading::Mask) {
            Some((before, userinfo, rest)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{before}{user}:***{rest}"),
                // A lone token (`nats://token@host`) is itself the secret.
                None => format!("{before}***{rest}"),
            },
            None => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
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

/// `[tracing]`: spans over OTLP/HTTP, so a consumer's trace continues the webhook's.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// OTLP/HTTP base URL (`http://otel-collector:4318`): spans go to `<it>/v1/traces`.
    /// Unset: `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) when the
    /// environment sets it, else tracing is off.
    /// A password, token or key in it is shown as `***` (check-config, logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<SecretUrl>,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Share of new traces recorded (0 to 1); a request's own `traceparent` decides for it.
    pub sample_ratio: f64,
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: the OTLP base URL (spans go to `<it>/v1/traces`), honoured
/// when `tracing.otlp_endpoint` is unset, as every OpenTelemetry SDK does.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the full traces URL, used as it is.
pub const OTLP_TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// `OTEL_EXPORTER_OTLP_PROTOCOL` / `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`: the exporter speaks
/// `http/json` (and a Collector's OTLP/HTTP port takes it beside `http/protobuf`); `grpc`
/// names a port it cannot talk to.
const OTLP_PROTOCOL_ENVS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
];

impl TracingSettings {
    /// Where spans go: `otlp_endpoint` + `/v1/traces`, else the environment's OpenTelemetry
    /// variables; `None`: tracing is off.
    pub fn traces_url(&self) -> Option<String> {
        self.traces_url_from().map(|(url, _)| url)
    }

    /// [`TracingSettings::traces_url`] and what set it: the key, or the variable's name. The
    /// environment counts only while it does not turn OpenTelemetry off
    /// (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`) or name gRPC.
    pub fn traces_url_from(&self) -> Option<(String, &'static str)> {
        let base = |b: &str| format!("{}/v1/traces", b.trim_end_matches('/'));
        if let Some(e) = &self.otlp_endpoint {
            return Some((base(e.expose()), "tracing.otlp_endpoint"));
        }
        let env = |k| {
            std::env::var(k)
                .ok()
                .filter(|v: &String| !v.trim().is_empty())
        };
        let off = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"))
            || OTLP_PROTOCOL_ENVS
                .iter()
                .find_map(|k| env(k))
                .is_some_and(|p| p.trim().eq_ignore_ascii_case("grpc"));
        if off {
            return None;
        }
        env(OTLP_TRACES_ENDPOINT_ENV)
            .map(|u| (u, OTLP_TRACES_ENDPOINT_ENV))
            .or_else(|| env(OTLP_ENDPOINT_ENV).map(|b| (base(&b), OTLP_ENDPOINT_ENV)))
    }
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "pusher-bridge".into(),
            sample_ratio: 1.0,
        }
    }
}

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

/// `[retention]`: one trim schedule for the events stream / queue, one for the dead letters.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Trim of the events stream / queue.
    #[serde(deserialize_with = "target_with_default::events")]
    pub events: RetentionTarget,
    /// Trim of the dead-letter stream / queue.
    #[serde(deserialize_with = "target_with_default::dlq")]
    pub dlq: RetentionTarget,
    /// How long a replica's sweeper lease lasts without renewal (a crashed holder's lease expires).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

mod target_with_default {
    //! A `[retention.<target>]` table without `max_age` gets that target's default (30 days for
    //! the dead letters), not the events' 7 days that `RetentionTarget::default` carries.
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    use super::{RetentionSettings, RetentionTarget};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Partial {
        enabled: Option<bool>,
        method: Option<super::RetentionMethod>,
        #[serde(default, with = "humantime_serde")]
        max_age: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        interval: Option<Duration>,
        #[serde(default, with = "super::duration_map")]
        overrides: std::collections::BTreeMap<String, Duration>,
        #[serde(default)]
        apps: std::collections::BTreeMap<String, super::AppRetention>,
    }

    fn fill(p: Partial, d: RetentionTarget) -> RetentionTarget {
        RetentionTarget {
            enabled: p.enabled.unwrap_or(d.enabled),
            method: p.method.unwrap_or(d.method),
            max_age: p.max_age.unwrap_or(d.max_age),
            interval: p.interval.unwrap_or(d.interval),
            overrides: p.overrides,
            apps: p.apps,
        }
    }

    /// `[retention.events]`, defaults from the events' target.
    pub(super) fn events<'de, D: Deserializer<'de>>(d: D) -> Result<RetentionTarget, D::Error> {
        Ok(fill(
            Partial::deserialize(d)?,
            RetentionSettings::default().events,
        ))
    }

    /// `[retention.dlq]`, defaults from the dead letters' target (30 days).
    pub(super) fn dlq<'de, D: Deserializer<'de>>(d: D) -> Result<RetentionTarget, D::Error> {
        Ok(fill(
            Partial::deserialize(d)?,
            RetentionSettings::default().dlq,
        ))
    }
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            events: RetentionTarget {
                max_age: Duration::from_secs(7 * 86_400),
                ..RetentionTarget::default()
            },
            dlq: RetentionTarget {
                max_age: Duration::from_secs(30 * 86_400),
                ..RetentionTarget::default()
            },
            lease_ttl: Duration::from_secs(60),
        }
    }
}

/// `retention.<target>.method`: who removes a target's old messages.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RetentionMethod {
    /// The sweeper purges them every `interval` (both brokers, any server).
    #[default]
    Sweep,
    /// Every message carries `Nats-TTL` from the same rules and the server expires it (NATS
    /// 2.11 or newer): no sweep runs for the target, but a changed rule applies to new messages
    /// only.
    MessageTtl,
}

/// One trim timer: enable flag, retention period and schedule.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionTarget {
    /// Whether the sweeper trims this target at all.
    pub enabled: bool,
    /// How old messages go: the sweeper's purges (any server), or each message's own `Nats-TTL`
    /// (NATS 2.11 or newer), which the server expires without a sweep.
    pub method: RetentionMethod,
    /// Messages older than this are purged.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How often the sweep runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Per event name retention, e.g. `client_event = "1d"` (events target only).
    #[serde(with = "duration_map")]
    pub overrides: BTreeMap<String, Duration>,
    /// Per app (tenant) rules, keyed by an app id of `[[apps]]`: the seed's trim timers are
    /// configured per tenant, so one bridge can keep one customer's events 30 days and another's
    /// one day. The most specific rule wins: app + event, app, event, then `max_age`.
    pub apps: BTreeMap<String, AppRetention>,
}

/// `[retention.<target>.apps."<app_id>"]`: one app's retention on one target.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AppRetention {
    /// `false`: this app's messages are never purged (a tenant that keeps everything).
    pub enabled: bool,
    /// This app's default retention; unset, the target's event overrides and `max_age` apply.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// Per event name retention of this app (events target only), above every other rule.
    #[serde(with = "duration_map", skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, Duration>,
}

impl Default for AppRetention {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age: None,
            overrides: BTreeMap::new(),
        }
    }
}

impl Default for RetentionTarget {
    fn default() -> Self {
        Self {
            enabled: true,
            method: RetentionMethod::Sweep,
            max_age: Duration::from_secs(7 * 86_400),
            interval: Duration::from_secs(3600),
            overrides: BTreeMap::new(),
            apps: BTreeMap::new(),
        }
    }
}

mod duration_map {
    //! humantime durations as map values.
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeMap};

    /// Each duration as humantime text (`1h 30m`).
    pub(super) fn serialize<S: Serializer>(
        map: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut out = s.serialize_map(Some(map.len()))?;
        for (k, v) in map {
            out.serialize_entry(k, &humantime::format_duration(*v).to_string())?;
        }
        out.end()
    }

    /// Each value as humantime text.
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                humantime::parse_duration(&v)
                    .map(|d| (k, d))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

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

/// Which file the settings come from: `--config`, else `$PUSHER_BRIDGE_CONFIG`, else
/// `config/pusher-bridge.toml` when it exists, else none (built-in defaults).
pub fn resolve_path(cli: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = cli {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let default = PathBuf::from(DEFAULT_CONFIG_PATH);
    default.exists().then_some(default)
}

/// A figment error as [`ConfigError::Load`], naming the key, the source (file or environment
/// variable) and, for syntax errors, the line and column, but never the value: the value may
/// be a secret (a malformed `PUSHER_BRIDGE_APPS`, a TOML line `secret = "...` missing its quote).
fn load_error(error: figment::Error) -> ConfigError {
    let described: Vec<String> = error.into_iter().map(|e| describe(&e)).collect();
    ConfigError::Load(described.join("; "))
}

fn describe(e: &figment::Error) -> String {
    use figment::error::Kind;
    let what = match &e.kind {
        Kind::Message(m) => without_source_lines(m),
        Kind::InvalidType(actual, expected) => {
            format!(
                "invalid type: found {}, expected {expected}",
                kind_of(actual)
            )
        }
        Kind::InvalidValue(actual, expected) => {
            format!(
                "invalid value: found {}, expected {expected}",
                kind_of(actual)
            )
        }
        Kind::Unsupported(actual) => format!("unsupported type {}", kind_of(actual)),
        // Lengths, field names, integer ranges, and the value of an enum key (`broker.kind`,
        // `log.format`: a closed set of words, never a secret): shown as they help.
        other => other.to_string(),
    };
    let mut out = what;
    if !e.path.is_empty() {
        out.push_str(&format!(": `{}`", e.path.join(".")));
    }
    match &e.metadata {
        // figment names the provider `PUSHER_BRIDGE_` environment variable(s): name the one.
        Some(m) if m.name.contains("environment") => {
            let var: Vec<String> = e
                .path
                .iter()
                .take_while(|p| !p.chars().all(|c| c.is_ascii_digit()))
                .map(|p| p.to_ascii_uppercase())
                .collect();
            out.push_str(&format!(
                " in environment variable {ENV_PREFIX}{}",
                var.join("__")
            ));
            if let Some(hint) = env_toml_hint(e) {
                out.push_str(": ");
                out.push_str(&hint);
            }
        }
        Some(m) => {
            out.push_str(&format!(" in {}", m.name));
            if let Some(source) = &m.source {
                out.push_str(&format!(" {source}"));
            }
        }
        None => {}
    }
    out
}

/// What to write instead, for an environment value that should have been a list or a table:
/// figment reads environment values as TOML and takes one that does not parse (JSON's
/// `"id":"1"`, say) as a plain string, so the error alone ("found a string") does not say why.
/// Names the format with an example, never the value (`PUSHER_BRIDGE_APPS` holds secrets).
fn env_toml_hint(e: &figment::Error) -> Option<String> {
    use figment::error::{Actual, Kind};
    let Kind::InvalidType(Actual::Str(_), expected) = &e.kind else {
        return None;
    };
    if !["sequence", "map", "struct"]
        .iter()
        .any(|w| expected.contains(w))
    {
        return None;
    }
    let example = if e.path.first().is_some_and(|p| p == "apps") {
        r#"PUSHER_BRIDGE_APPS='[{id="123456",key="app-key",secret="app-secret"}]'"#
    } else {
        r#"a list as ["a","b"], a table as {key="value"}"#
    };
    Some(format!(
        "the value is read as TOML, not JSON (inline tables: key = value, not \"key\": value), \
         e.g. {example}"
    ))
}

/// A TOML syntax error without the excerpt of the file it quotes (`3 | secret = "...`,
/// `  |   ^`): the position (`line 3, column 10`) and the reason stay.
fn without_source_lines(message: &str) -> String {
    message
        .lines()
        .filter(|line| {
            let t = line
                .trim_start()
                .trim_start_matches(|c: char| c.is_ascii_digit());
            !t.trim_start().starts_with('|') && !line.trim().is_empty()
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// What kind of value was found, without the value.
fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) => "a character",
        Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit => "unit",
        Actual::Option => "an option",
        Actual::Seq => "a sequence",
        Actual::Map => "a map",
        _ => "another type",
    }
}

impl Settings {
    /// Loads defaults < `file` < environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .split("__")
                // `PUSHER_BRIDGE_CONFIG` names the file and is no key; the name arrives in the
                // environment's case, so compare without it.
                .filter(|k| !k.as_str().eq_ignore_ascii_case("config")),
        );
        let mut settings: Settings = figment.extract().map_err(load_error)?;
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses a TOML string (no environment): for tests and embedded configs.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut settings: Settings = Figment::from(Toml::string(text))
            .extract()
            .map_err(load_error)?;
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

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
    fn zero_overrides_are_rejected() {
        let err = Settings::from_toml("[retention.events.overrides]\nclient_event = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("retention.events.overrides.client_event"),
            "{err}"
        );
    }

    #[test]
    fn a_partial_retention_table_keeps_its_targets_defaults() {
        let s = Settings::from_toml(
            "[retention.dlq]\ninterval = \"2h\"\n[retention.events]\nenabled = false\n",
        )
        .unwrap();
        assert_eq!(s.retention.dlq.max_age, Duration::from_secs(30 * 86_400));
        assert_eq!(s.retention.dlq.interval, Duration::from_secs(7200));
        assert_eq!(s.retention.events.max_age, Duration::from_secs(7 * 86_400));
        assert!(!s.retention.events.enabled && s.retention.dlq.enabled);
        let err = Settings::from_toml("[retention.dlq]\nmaxage = \"1d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("maxage"), "{err}");
    }

    #[test]
    fn per_app_retention_parses_and_names_unknown_apps() {
        let s = Settings::from_toml(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n\
             [retention.events.apps.\"1\"]\nmax_age = \"1d\"\n\
             [retention.events.apps.\"1\".overrides]\nclient_event = \"1h\"\n\
             [retention.dlq.apps.\"1\"]\nenabled = false\n",
        )
        .unwrap();
        let app = &s.retention.events.apps["1"];
        assert!(app.enabled);
        assert_eq!(app.max_age, Some(Duration::from_secs(86_400)));
        assert_eq!(app.overrides["client_event"], Duration::from_secs(3600));
        assert!(!s.retention.dlq.apps["1"].enabled);
        assert_eq!(s.retention.dlq.apps["1"].max_age, None);
        // And back: check-config's output is a config.
        let back = Settings::from_toml(&s.to_redacted_toml()).unwrap();
        assert_eq!(back.retention.events.apps, s.retention.events.apps);

        let err = Settings::from_toml("[retention.events.apps.\"9\"]\nmax_age = \"1d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retention.events.apps.\"9\""), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nlistn = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Settings::from_toml("[broker.nats]\nstream = \"a.b\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.nats.stream"), "{err}");
        let err = Settings::from_toml("[server]\nlisten = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn a_nats_server_list_is_checked_without_showing_its_password() {
        let ok = Settings::from_toml(
            "[broker.nats]\nurl = \"nats://a:1, nats://b:2,nats://c:3\"\nreplicas = 3\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
        let err = Settings::from_toml("[broker.nats]\nurl = \"nats://u:hunter2@a:1,nats://b:x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.nats.url"), "{err}");
        assert!(err.contains("server 2"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(Settings::from_toml("[broker.nats]\nreplicas = 0\n").is_err());
        assert!(Settings::from_toml("[broker.nats]\nreplicas = 7\n").is_err());
        let q = Settings::from_toml("[broker.amqp]\nqueue_type = \"quorum\"\n").unwrap();
        assert_eq!(q.broker.amqp.queue_type, QueueType::Quorum);
        assert!(Settings::from_toml("[broker.amqp]\nqueue_type = \"mirrored\"\n").is_err());
    }

    #[test]
    fn an_amqp_node_list_is_checked_at_load_without_showing_its_password() {
        let amqp = |url: &str| {
            Settings::from_toml(&format!(
                "[broker]\nkind = \"amqp\"\n[broker.amqp]\nurl = \"{url}\"\n"
            ))
        };
        let s = amqp("amqp://u:pw1@h1:5672/%2f, amqp://u:pw2@h2:5672/%2f,amqps://u:pw3@h3/%2f")
            .expect("a list of three nodes");
        let shown = s.to_redacted_toml();
        assert!(
            shown.contains(
                "url = \"amqp://u:***@h1:5672/%2f, amqp://u:***@h2:5672/%2f,amqps://u:***@h3/%2f\""
            ),
            "{shown}"
        );
        for pw in ["pw1", "pw2", "pw3"] {
            assert!(
                !shown.contains(pw) && !format!("{s:?}").contains(pw),
                "{shown}"
            );
        }
        for (bad, words) in [
            ("amqp://u:hunter2@h1/%2f,nats://u:hunter2@h2:4222", "URL 2"),
            (
                "amqp://u:hunter2@h1/%2f,amqp://u:hunter2@h2/prod",
                "same vhost",
            ),
            (
                "amqp://u:hunter2@h1/%2f,amqp://u:hunter2@h1/%2f",
                "same node",
            ),
            (" , ", "names no URL"),
        ] {
            let e = amqp(bad).unwrap_err().to_string();
            assert!(e.contains("broker.amqp.url") && e.contains(words), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        // Only the broker in use is checked (as for broker.nats.url).
        assert!(Settings::from_toml("[broker.amqp]\nurl = \"nats://h\"\n").is_ok());
    }

    #[test]
    fn the_state_nats_url_is_checked_at_load_like_the_brokers() {
        let err = Settings::from_toml(
            "[state]\nenabled = true\nnats_url = \"nats://u:hunter2@a:1,nats://b:x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("state.nats_url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(Settings::from_toml("[state]\nnats_url = \"nats://a:1,nats://b:2\"\n").is_ok());
    }

    #[test]
    fn nats_user_needs_a_password() {
        let err = Settings::from_toml("[broker.nats]\nuser = \"bridge\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.nats.password"), "{err}");
        assert!(Settings::from_toml("[broker.nats]\nuser = \"u\"\npassword = \"p\"\n").is_ok());
    }

    #[test]
    fn durations_and_overrides_parse() {
        let s = Settings::from_toml(
            "[retention.events]\nmax_age = \"2d\"\ninterval = \"5m\"\n[retention.events.overrides]\nclient_event = \"1d\"\n",
        )
        .unwrap();
        assert_eq!(s.retention.events.max_age, Duration::from_secs(2 * 86400));
        assert_eq!(
            s.retention.events.overrides["client_event"],
            Duration::from_secs(86400)
        );
    }

    #[test]
    fn override_names_must_be_event_names() {
        let err = Settings::from_toml("[retention.events.overrides]\n\">\" = \"1d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retention.events.overrides"), "{err}");
    }

    #[test]
    fn secrets_never_show() {
        let s = Settings::from_toml(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"hunter2\"\n[broker.amqp]\nurl = \"amqp://u:pw123@h:5672/%2f\"\n[broker.nats]\nuser = \"u\"\npassword = \"natspw\"\n",
        )
        .unwrap();
        for text in [format!("{s:?}"), s.to_redacted_toml()] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains("pw123"), "{text}");
            assert!(!text.contains("natspw"), "{text}");
        }
        assert!(s.to_redacted_toml().contains("amqp://u:***@h:5672/%2f"));
        assert_eq!(s.apps[0].secret.expose(), "hunter2");
    }

    #[test]
    fn redact_url_handles_tokens_and_lists() {
        assert_eq!(redact_url("nats://tok@h:1"), "nats://***@h:1");
        assert_eq!(
            redact_url("nats://a:b@h:1,nats://h2:2"),
            "nats://a:***@h:1,nats://h2:2"
        );
        assert_eq!(redact_url("nats://h:1"), "nats://h:1");
        assert_eq!(redact_url("u:p4ss@h:1"), "u:***@h:1");
        assert_eq!(redact_url("tok3n@h:1, v:pw@h2"), "***@h:1, v:***@h2");
        assert_eq!(redact_url("amqp://u:pa/ss@h/%2f"), "amqp://u:***@h/%2f");
        assert_eq!(redact_url("amqp://u:p@ss@h"), "amqp://u:***@h");
        // A `://` that follows no scheme is part of the password or the path.
        assert_eq!(redact_url("u:p@h/?r=http://x"), "u:***@h/?r=http://x");
        assert_eq!(redact_url("u:a://b@h"), "u:***@h");
        assert_eq!(redact_url(" nats+tls://u:p@h"), " nats+tls://u:***@h");
    }

    #[test]
    fn load_errors_name_the_key_but_never_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"hunter2-secret\nx = 1\n",
        )
        .unwrap();
        let e = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("line 4"), "{e}");
        std::fs::write(
            &path,
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = 12345678\n",
        )
        .unwrap();
        let e = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(!e.contains("12345678"), "{e}");
        assert!(e.contains("apps") && e.contains("secret"), "{e}");
        let e = Settings::from_toml("[server]\nmax_body_bytes = \"hunter2\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("hunter2") && e.contains("server.max_body_bytes"),
            "{e}"
        );
    }

    #[test]
    fn redacted_toml_parses_back() {
        let s = Settings::from_toml("[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n").unwrap();
        let text = s.to_redacted_toml();
        let back = Settings::from_toml(&text).unwrap();
        assert_eq!(back.apps[0].key, "k");
        assert_eq!(back.server.listen, s.server.listen);
    }

    #[test]
    fn null_broker_exists_only_in_the_benchmark_build() {
        let parsed = Settings::from_toml("[broker]\nkind = \"null\"\n");
        assert_eq!(parsed.is_ok(), cfg!(feature = "bench-null-broker"));
    }
}
