//! Every Prometheus metric of the bridge, registered in one place with its name.
//!
//! Names are constants here so the dashboard, the alert rules and the tests can refer to the same
//! strings; counters are registered without `_total`, which the text encoder appends.
//!
//! Every series whose labels are known at start-up is created at 0 by
//! `Metrics::init_known_series` (apps, reasons, sweeper targets, the broker), so that
//! `increase(...)` alerts see the first event and a dashboard never shows "No data" for
//! something that simply has not happened yet. `process` adds the `process_*` families.

pub(crate) mod exposition;
mod process;

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub(crate) use self::process::ProcessCollector;

/// `pusher_bridge_webhooks_received_total{app_id, outcome}`.
pub(crate) const WEBHOOKS_RECEIVED: &str = "pusher_bridge_webhooks_received";
/// `pusher_bridge_events_published_total{app_id, event}`.
pub(crate) const EVENTS_PUBLISHED: &str = "pusher_bridge_events_published";
/// `pusher_bridge_events_dead_lettered_total{app_id, reason}`.
pub(crate) const EVENTS_DEAD_LETTERED: &str = "pusher_bridge_events_dead_lettered";
/// `pusher_bridge_publish_duration_seconds` histogram (one webhook's publishing, all acks).
pub(crate) const PUBLISH_DURATION: &str = "pusher_bridge_publish_duration_seconds";
/// `pusher_bridge_webhook_duration_seconds` histogram (request received to answer).
pub(crate) const WEBHOOK_DURATION: &str = "pusher_bridge_webhook_duration_seconds";
/// `pusher_bridge_broker_up` gauge, 1 or 0.
pub(crate) const BROKER_UP: &str = "pusher_bridge_broker_up";
/// `pusher_bridge_spool_events` gauge: events waiting on the local spool.
pub(crate) const SPOOL_EVENTS: &str = "pusher_bridge_spool_events";
/// `pusher_bridge_spool_bytes` gauge: bytes the spool holds on disk.
pub(crate) const SPOOL_BYTES: &str = "pusher_bridge_spool_bytes";
/// `pusher_bridge_spool_oldest_age_seconds` gauge: age of the oldest spooled event.
pub(crate) const SPOOL_OLDEST_AGE: &str = "pusher_bridge_spool_oldest_age_seconds";
/// `pusher_bridge_spool_written_total`: events written to the spool.
pub(crate) const SPOOL_WRITTEN: &str = "pusher_bridge_spool_written";
/// `pusher_bridge_spool_drained_total`: spooled events the broker acknowledged.
pub(crate) const SPOOL_DRAINED: &str = "pusher_bridge_spool_drained";
/// `pusher_bridge_sweeper_runs_total{target, outcome}`; outcome `success`, `failure`, `skipped`.
pub(crate) const SWEEPER_RUNS: &str = "pusher_bridge_sweeper_runs";
/// `pusher_bridge_sweeper_purged_total{target, app_id, rule}`: messages the sweeper purged, by
/// the rule that purged them.
pub(crate) const SWEEPER_PURGED: &str = "pusher_bridge_sweeper_purged";
/// `pusher_bridge_sweeper_last_success_timestamp_seconds{target}`.
pub(crate) const SWEEPER_LAST_SUCCESS: &str =
    "pusher_bridge_sweeper_last_success_timestamp_seconds";
/// `pusher_bridge_build_info{version}`, the gauge 1: a gauge rather than an OpenMetrics
/// `info`, which the text format and `promtool` do not know (`unknown metric type "info"`).
pub(crate) const BUILD_INFO: &str = "pusher_bridge_build_info";
/// `pusher_bridge_spool_max_bytes` gauge: `spool.max_bytes`, for "spool nearly full" alerts.
pub(crate) const SPOOL_MAX_BYTES: &str = "pusher_bridge_spool_max_bytes";
/// `pusher_bridge_spool_quarantined` gauge: records in the spool's `quarantine.log` (dead
/// letters the dead-letter queue refused, frames this version cannot decode), taken back onto
/// the spool at the next start.
pub(crate) const SPOOL_QUARANTINED: &str = "pusher_bridge_spool_quarantined";
/// `pusher_bridge_spool_drain_stalled` gauge: 1 while records wait, the broker is up and the
/// drainer has handled none of them for a minute (`/readyz` answers 503 meanwhile).
pub(crate) const SPOOL_DRAIN_STALLED: &str = "pusher_bridge_spool_drain_stalled";
/// `pusher_bridge_broker_reconnects_total{broker}`: connections re-established after a loss.
pub(crate) const BROKER_RECONNECTS: &str = "pusher_bridge_broker_reconnects";
/// `pusher_bridge_state_updates_total{outcome}`: state events applied (`applied`), ignored as
/// older than the stored state (`stale`), or whose KV write failed (`failed`, retried later).
pub(crate) const STATE_UPDATES: &str = "pusher_bridge_state_updates";
/// `pusher_bridge_state_lag_seconds` gauge: age (now minus the webhook's `time_ms`) of the
/// last event the state applier processed.
pub(crate) const STATE_LAG: &str = "pusher_bridge_state_lag_seconds";
/// `pusher_bridge_task_restarts_total{task}`: background tasks (the supervisor's) that ended or
/// panicked while the bridge ran and were started again.
pub(crate) const TASK_RESTARTS: &str = "pusher_bridge_task_restarts";

/// `pusher_bridge_config_reloads_total{outcome}`: reloads on SIGHUP, `success` or `failure`
/// (named as Prometheus names its own).
pub(crate) const CONFIG_RELOADS: &str = "pusher_bridge_config_reloads";
/// `pusher_bridge_config_last_reload_successful`: 1 while the last reload (or the start)
/// loaded, 0 after one that did not.
pub(crate) const CONFIG_LAST_RELOAD_OK: &str = "pusher_bridge_config_last_reload_successful";
/// `pusher_bridge_trace_spans_exported_total`: spans the OTLP collector accepted.
pub(crate) const TRACE_EXPORTED: &str = "pusher_bridge_trace_spans_exported";
/// `pusher_bridge_trace_spans_dropped_total{reason}`: spans not exported, `queue_full` (the
/// collector is away or slow and the bounded queue filled) or `export_failed`.
pub(crate) const TRACE_DROPPED: &str = "pusher_bridge_trace_spans_dropped";
/// The `task` label values of `task_restarts_total`: the supervised background tasks.
pub(crate) mod task {
    /// The spool drainer.
    pub(crate) const SPOOL_DRAINER: &str = "spool_drainer";
    /// The retention sweeper.
    pub(crate) const RETENTION_SWEEPER: &str = "retention_sweeper";
    /// The channel state's applier and tombstone sweep.
    pub(crate) const CHANNEL_STATE: &str = "channel_state";
    /// The NATS broker's topology loop (declares the streams on every connect).
    pub(crate) const NATS_TOPOLOGY: &str = "nats_topology";
    /// The RabbitMQ broker's recovery loop (connects, declares, replaces lost sessions).
    pub(crate) const AMQP_RECOVERY: &str = "amqp_recovery";
    /// The span export (`[tracing]`).
    pub(crate) const TRACE_EXPORT: &str = "trace_export";
    /// The tasks events need to become durable and move on: while one is down (between a
    /// crash and its restart) `/readyz` answers 503. The sweeper, the channel state and the
    /// span export are only counted: a load balancer must not take every replica out for them.
    pub(crate) const DURABILITY: [&str; 3] = [SPOOL_DRAINER, NATS_TOPOLOGY, AMQP_RECOVERY];
    /// All of them (their series exist from start-up).
    pub(crate) const ALL: [&str; 6] = [
        SPOOL_DRAINER,
        RETENTION_SWEEPER,
        CHANNEL_STATE,
        NATS_TOPOLOGY,
        AMQP_RECOVERY,
        TRACE_EXPORT,
    ];
}

/// Every exported family name as it appears in the text output, for tests and deploy checks.
pub const EXPORTED_NAMES: &[&str] = &[
    "pusher_bridge_webhooks_received_total",
    "pusher_bridge_events_published_total",
    "pusher_bridge_events_dead_lettered_total",
    "pusher_bridge_publish_duration_seconds",
    "pusher_bridge_webhook_duration_seconds",
    "pusher_bridge_broker_up",
    "pusher_bridge_spool_events",
    "pusher_bridge_spool_bytes",
    "pusher_bridge_spool_oldest_age_seconds",
    "pusher_bridge_spool_written_total",
    "pusher_bridge_spool_drained_total",
    "pusher_bridge_sweeper_runs_total",
    "pusher_bridge_sweeper_purged_total",
    "pusher_bridge_sweeper_last_success_timestamp_seconds",
    "pusher_bridge_build_info",
    "pusher_bridge_spool_max_bytes",
    "pusher_bridge_spool_quarantined",
    "pusher_bridge_spool_drain_stalled",
    "pusher_bridge_broker_reconnects_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "pusher_bridge_state_updates_total",
    "pusher_bridge_state_lag_seconds",
    "pusher_bridge_task_restarts_total",
    "pusher_bridge_config_reloads_total",
    "pusher_bridge_config_last_reload_successful",
    "pusher_bridge_trace_spans_exported_total",
    "pusher_bridge_trace_spans_dropped_total",
];

/// Outcome label of `webhooks_received_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered 200.
    Accepted,
    /// Answered 401.
    Unauthorized,
    /// Answered 400 (or 405 / 408 for requests that are not webhooks at all).
    BadRequest,
    /// Answered 413.
    TooLarge,
    /// Answered 415.
    UnsupportedMediaType,
    /// Answered 503.
    Unavailable,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Unauthorized => "unauthorized",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::UnsupportedMediaType => "unsupported_media_type",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// Outcome label of `state_updates_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StateOutcome {
    /// The update changed the state and was written.
    Applied,
    /// Older than (or the same as) what the state holds: nothing written.
    Stale,
    /// The KV write failed (retried), or the event could not be read (dropped).
    Failed,
}

impl StateOutcome {
    /// Every outcome, so the series exist from start-up.
    pub const ALL: [StateOutcome; 3] = [Self::Applied, Self::Stale, Self::Failed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Stale => "stale",
            Self::Failed => "failed",
        }
    }
}

/// Labels of `trace_spans_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full` or `export_failed`.
    pub reason: &'static str,
}

/// Labels of `config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `failure`.
    pub outcome: &'static str,
}

/// Labels of `task_restarts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    /// The task's name (`spool_drainer`, `retention_sweeper`, `channel_state`, ...).
    pub task: &'static str,
}

/// Labels of `state_updates_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// See `StateOutcome`.
    pub outcome: &'static str,
}

/// Labels of `webhooks_received_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// The app id, or `unknown`.
    pub app_id: String,
    /// See [`Outcome`].
    pub outcome: &'static str,
}

/// Labels of `events_published_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// The app id.
    pub app_id: String,
    /// The event name if Pusher documents it (`KNOWN_EVENTS`), else `OTHER_EVENT`.
    pub event: &'static str,
}

/// The event names Pusher sends ([`crate::message::EVENT_TYPES`]), each its own `event` label
/// value.
pub(crate) const KNOWN_EVENTS: [&str; 7] = crate::message::EVENT_TYPES;

/// The `event` label of every other name: names come from the webhook body, and one series
/// per name sent would let a sender grow `/metrics` without bound (the subject keeps the name).
pub(crate) const OTHER_EVENT: &str = "other";

/// The `event` label value of an event named `name`.
pub(crate) fn event_label(name: &str) -> &'static str {
    KNOWN_EVENTS
        .iter()
        .find(|known| **known == name)
        .copied()
        .unwrap_or(OTHER_EVENT)
}

/// Labels of `events_dead_lettered_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    /// The app id, or `unknown`.
    pub app_id: String,
    /// The dead-letter reason.
    pub reason: String,
}

/// Labels of the sweeper families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SweepLabels {
    /// `events` or `dlq`.
    pub target: String,
}

/// Labels of `sweeper_purged_total`: all bounded by the configuration (never channels).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SweepPurgeLabels {
    /// `events` or `dlq`.
    pub target: String,
    /// An app id of `[[apps]]`, `*` (a purge of every app) or `other` (ids not in `[[apps]]`).
    pub app_id: String,
    /// `longest`, `app_event`, `app`, `event` or `default` (`sweeper::RuleKind`).
    pub rule: &'static str,
}

/// Labels of `sweeper_runs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SweepRunLabels {
    /// `events` or `dlq`.
    pub target: String,
    /// `success`, `failure` or `skipped` (another replica holds the lease).
    pub outcome: &'static str,
}

/// Labels of `broker_reconnects_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerLabels {
    /// `nats` or `amqp`.
    pub broker: &'static str,
}

/// Outcomes a webhook can have before its app is known (`app_id="unknown"`).
const UNKNOWN_APP_OUTCOMES: [Outcome; 4] = [
    Outcome::Unauthorized,
    Outcome::BadRequest,
    Outcome::TooLarge,
    Outcome::UnsupportedMediaType,
];

/// Every [`Outcome`].
const ALL_OUTCOMES: [Outcome; 6] = [
    Outcome::Accepted,
    Outcome::Unauthorized,
    Outcome::BadRequest,
    Outcome::TooLarge,
    Outcome::UnsupportedMediaType,
    Outcome::Unavailable,
];

/// Outcomes of `sweeper_runs_total`.
const SWEEP_OUTCOMES: [&str; 3] = ["success", "failure", "skipped"];

/// The registry and handles to every metric; shared by all components.
pub struct Metrics {
    registry: Registry,
    /// See `WEBHOOKS_RECEIVED`.
    pub webhooks_received: Family<WebhookLabels, Counter>,
    /// See `EVENTS_PUBLISHED`.
    pub events_published: Family<EventLabels, Counter>,
    /// See `EVENTS_DEAD_LETTERED`.
    pub events_dead_lettered: Family<DeadLetterLabels, Counter>,
    /// See `PUBLISH_DURATION`.
    pub publish_duration: Histogram,
    /// See `WEBHOOK_DURATION`.
    pub webhook_duration: Histogram,
    /// See `BROKER_UP`.
    pub broker_up: Gauge,
    /// See `SPOOL_EVENTS`.
    pub spool_events: Gauge,
    /// See `SPOOL_BYTES`.
    pub spool_bytes: Gauge,
    /// See `SPOOL_OLDEST_AGE`.
    pub spool_oldest_age: Gauge<f64, AtomicU64>,
    /// See `SPOOL_WRITTEN`.
    pub spool_written: Counter,
    /// See `SPOOL_DRAINED`.
    pub spool_drained: Counter,
    /// See `SWEEPER_RUNS`.
    pub sweeper_runs: Family<SweepRunLabels, Counter>,
    /// See `SWEEPER_PURGED`.
    pub sweeper_purged: Family<SweepPurgeLabels, Counter>,
    /// See `SWEEPER_LAST_SUCCESS`.
    pub sweeper_last_success: Family<SweepLabels, Gauge<f64, AtomicU64>>,
    /// See `SPOOL_MAX_BYTES`.
    pub spool_max_bytes: Gauge,
    /// See `SPOOL_QUARANTINED`.
    pub spool_quarantined: Gauge,
    /// See `SPOOL_DRAIN_STALLED`.
    pub spool_drain_stalled: Gauge,
    /// See `BROKER_RECONNECTS`.
    pub broker_reconnects: Family<BrokerLabels, Counter>,
    /// See `STATE_UPDATES`.
    pub state_updates: Family<StateLabels, Counter>,
    /// See `STATE_LAG`.
    pub state_lag: Gauge<f64, AtomicU64>,
    /// Background tasks restarted by the supervisor, by task.
    pub task_restarts: Family<TaskLabels, Counter>,
    /// See `CONFIG_RELOADS`.
    pub config_reloads: Family<ReloadLabels, Counter>,
    /// See `CONFIG_LAST_RELOAD_OK`.
    pub config_last_reload_ok: Gauge,
    /// See `TRACE_EXPORTED`.
    pub trace_exported: Counter,
    /// See `TRACE_DROPPED`.
    pub trace_dropped: Family<DropLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ]
    .into_iter()
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            webhooks_received: Family::default(),
            events_published: Family::default(),
            events_dead_lettered: Family::default(),
            publish_duration: Histogram::new(latency_buckets()),
            webhook_duration: Histogram::new(latency_buckets()),
            broker_up: Gauge::default(),
            spool_events: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_oldest_age: Gauge::default(),
            spool_written: Counter::default(),
            spool_drained: Counter::default(),
            sweeper_runs: Family::default(),
            sweeper_purged: Family::default(),
            sweeper_last_success: Family::default(),
            spool_max_bytes: Gauge::default(),
            spool_quarantined: Gauge::default(),
            spool_drain_stalled: Gauge::default(),
            broker_reconnects: Family::default(),
            state_updates: Family::default(),
            state_lag: Gauge::default(),
            task_restarts: Family::default(),
            config_reloads: Family::default(),
            config_last_reload_ok: Gauge::default(),
            trace_exported: Counter::default(),
            trace_dropped: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            WEBHOOKS_RECEIVED,
            "Webhook requests received, by app and outcome",
            m.webhooks_received.clone(),
        );
        registry.register(
            EVENTS_PUBLISHED,
            "Events acknowledged by the broker, by app and event name",
            m.events_published.clone(),
        );
        registry.register(
            EVENTS_DEAD_LETTERED,
            "Events sent to the dead-letter queue, by app and reason",
            m.events_dead_lettered.clone(),
        );
        registry.register(
            PUBLISH_DURATION,
            "Time to publish one webhook's events and receive every ack",
            m.publish_duration.clone(),
        );
        registry.register(
            WEBHOOK_DURATION,
            "Time from a webhook's arrival to its answer",
            m.webhook_duration.clone(),
        );
        registry.register(
            BROKER_UP,
            "1 while the broker connection is up, else 0",
            m.broker_up.clone(),
        );
        registry.register(
            SPOOL_EVENTS,
            "Events waiting on the local spool",
            m.spool_events.clone(),
        );
        registry.register(
            SPOOL_BYTES,
            "Bytes held by the local spool",
            m.spool_bytes.clone(),
        );
        registry.register(
            SPOOL_OLDEST_AGE,
            "Age in seconds of the oldest spooled event (0 when empty)",
            m.spool_oldest_age.clone(),
        );
        registry.register(
            SPOOL_WRITTEN,
            "Events written to the local spool",
            m.spool_written.clone(),
        );
        registry.register(
            SPOOL_DRAINED,
            "Spooled events the broker acknowledged",
            m.spool_drained.clone(),
        );
        registry.register(
            SWEEPER_RUNS,
            "Retention sweeps, by target and outcome",
            m.sweeper_runs.clone(),
        );
        registry.register(
            SWEEPER_PURGED,
            "Messages purged by the retention sweeper, by target, app and rule",
            m.sweeper_purged.clone(),
        );
        registry.register(
            SWEEPER_LAST_SUCCESS,
            "Unix time of the last successful sweep, by target",
            m.sweeper_last_success.clone(),
        );
        registry.register(BUILD_INFO, "The running build; always 1", {
            let build: Family<Vec<(&'static str, &'static str)>, Gauge> = Family::default();
            build
                .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
                .set(1);
            build
        });
        registry.register(
            SPOOL_MAX_BYTES,
            "spool.max_bytes: what pusher_bridge_spool_bytes may reach before webhooks get 503",
            m.spool_max_bytes.clone(),
        );
        registry.register(
            SPOOL_QUARANTINED,
            "Records in the spool's quarantine.log (the dead-letter queue refused them); taken back onto the spool at the next start",
            m.spool_quarantined.clone(),
        );
        registry.register(
            SPOOL_DRAIN_STALLED,
            "1 while spooled records wait, the broker is up and none was handled for a minute",
            m.spool_drain_stalled.clone(),
        );
        registry.register(
            BROKER_RECONNECTS,
            "Broker connections re-established after a loss, by broker",
            m.broker_reconnects.clone(),
        );
        registry.register(
            STATE_UPDATES,
            "Channel-state events by outcome: applied, stale (ignored), failed",
            m.state_updates.clone(),
        );
        registry.register(
            STATE_LAG,
            "Seconds between the last state event's webhook time and its processing",
            m.state_lag.clone(),
        );
        registry.register(
            TASK_RESTARTS,
            "Background tasks that ended or panicked while the bridge ran and were started again",
            m.task_restarts.clone(),
        );
        for task in task::ALL {
            let _ = m.task_restarts.get_or_create(&TaskLabels { task });
        }
        registry.register(
            CONFIG_RELOADS,
            "Configuration reloads on SIGHUP, by outcome",
            m.config_reloads.clone(),
        );
        for outcome in ["success", "failure"] {
            let _ = m.config_reloads.get_or_create(&ReloadLabels { outcome });
        }
        registry.register(
            CONFIG_LAST_RELOAD_OK,
            "1 while the configuration in force is the last one loaded (at start or on SIGHUP), 0 after a reload that failed",
            m.config_last_reload_ok.clone(),
        );
        m.config_last_reload_ok.set(1);
        registry.register(
            TRACE_EXPORTED,
            "Spans the OTLP collector accepted ([tracing])",
            m.trace_exported.clone(),
        );
        registry.register(
            TRACE_DROPPED,
            "Spans not exported, by reason: queue_full (the collector is away or slow) or export_failed",
            m.trace_dropped.clone(),
        );
        for reason in ["queue_full", "export_failed"] {
            let _ = m.trace_dropped.get_or_create(&DropLabels { reason });
        }
        for outcome in StateOutcome::ALL {
            let _ = m.state_updates.get_or_create(&StateLabels {
                outcome: outcome.as_str(),
            });
        }
        registry.register_collector(Box::new(ProcessCollector::new()));
        Self { registry, ..m }
    }

    /// Creates at 0 the series of `apps` (also for the apps a reload adds).
    pub(crate) fn init_app_series(&self, apps: &[crate::config::AppSettings]) {
        for app in apps {
            for outcome in ALL_OUTCOMES {
                self.init_webhook(&app.id, outcome);
            }
            for event in KNOWN_EVENTS.iter().copied().chain([OTHER_EVENT]) {
                self.events_published
                    .get_or_create(&EventLabels {
                        app_id: app.id.clone(),
                        event,
                    })
                    .inc_by(0);
            }
            for reason in crate::message::DlqReason::ALL {
                self.events_dead_lettered
                    .get_or_create(&DeadLetterLabels {
                        app_id: app.id.clone(),
                        reason: reason.as_str().to_string(),
                    })
                    .inc_by(0);
            }
        }
    }

    /// Counts spans the collector accepted.
    pub(crate) fn trace_spans_exported(&self, n: u64) {
        self.trace_exported.inc_by(n);
    }

    /// Counts spans dropped for `reason`.
    pub(crate) fn trace_spans_dropped(&self, reason: &'static str, n: u64) {
        self.trace_dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(n);
    }

    /// Counts a reload on SIGHUP and whether it loaded.
    pub(crate) fn config_reloaded(&self, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ReloadLabels { outcome })
            .inc();
        self.config_last_reload_ok.set(i64::from(ok));
    }

    /// Creates at 0 every series whose labels the settings tell: webhook outcomes of each
    /// configured app (and of `unknown`), dead letters of each app and reason, the broker's
    /// reconnects, published events of each app and event label, `spool_max_bytes`, and the
    /// sweeper series of each enabled target.
    pub(crate) fn init_known_series(&self, settings: &crate::config::Settings) {
        for outcome in UNKNOWN_APP_OUTCOMES {
            self.init_webhook("unknown", outcome);
        }
        self.init_app_series(&settings.apps);
        let broker = match settings.broker.kind {
            crate::config::BrokerKind::Nats => Some("nats"),
            crate::config::BrokerKind::Amqp => Some("amqp"),
            #[cfg(feature = "bench-null-broker")]
            crate::config::BrokerKind::Null => None,
        };
        if let Some(broker) = broker {
            self.broker_reconnects
                .get_or_create(&BrokerLabels { broker })
                .inc_by(0);
        }
        self.spool_max_bytes
            .set(i64::try_from(settings.spool.max_bytes).unwrap_or(i64::MAX));
        for (target, retention) in [
            ("events", &settings.retention.events),
            ("dlq", &settings.retention.dlq),
        ] {
            if retention.enabled {
                self.init_sweeper_target(target);
            }
        }
    }

    fn init_webhook(&self, app_id: &str, outcome: Outcome) {
        self.webhooks_received
            .get_or_create(&WebhookLabels {
                app_id: app_id.to_string(),
                outcome: outcome.as_str(),
            })
            .inc_by(0);
    }

    /// Creates the sweeper series of `target` (`events`, `dlq`): runs of every outcome at 0
    /// (purged per app and rule comes from the sweeper), last success = now, so "stale" means "no success for that long since
    /// start-up" and fires for a sweeper that never succeeds.
    pub(crate) fn init_sweeper_target(&self, target: &str) {
        for outcome in SWEEP_OUTCOMES {
            self.sweeper_runs
                .get_or_create(&SweepRunLabels {
                    target: target.to_string(),
                    outcome,
                })
                .inc_by(0);
        }
        let labels = SweepLabels {
            target: target.to_string(),
        };
        // `sweeper_purged` series (per app and rule) are created by `sweeper::Sweeper::new`.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.sweeper_last_success.get_or_create(&labels).set(now);
    }

    /// Counts one re-established connection of `broker` (`nats`, `amqp`).
    pub(crate) fn broker_reconnected(&self, broker: &'static str) {
        self.broker_reconnects
            .get_or_create(&BrokerLabels { broker })
            .inc();
    }

    /// Counts one state event's outcome.
    pub(crate) fn state_update(&self, outcome: StateOutcome) {
        self.state_updates
            .get_or_create(&StateLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Counts one webhook answer.
    pub fn webhook(&self, app_id: &str, outcome: Outcome) {
        self.webhooks_received
            .get_or_create(&WebhookLabels {
                app_id: app_id.to_string(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Counts one event the broker acknowledged (directly or from the spool), under its
    /// `event_label`.
    pub fn published(&self, app_id: &str, event: &str) {
        self.events_published
            .get_or_create(&EventLabels {
                app_id: app_id.to_string(),
                event: event_label(event),
            })
            .inc();
    }

    /// Counts one dead-lettered event.
    pub fn dead_lettered(&self, app_id: &str, reason: &str) {
        self.events_dead_lettered
            .get_or_create(&DeadLetterLabels {
                app_id: app_id.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Sets `broker_up`.
    pub(crate) fn set_broker_up(&self, up: bool) {
        self.broker_up.set(i64::from(up));
    }

    /// Every family in the Prometheus text format (0.0.4), what `/metrics` answers by default.
    pub fn encode(&self) -> String {
        exposition::to_text(&self.encode_openmetrics())
    }

    /// Every family in OpenMetrics 1.0, for a scraper that asks for it.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Every family in `format`.
    pub(crate) fn encode_as(&self, format: exposition::Format) -> String {
        match format {
            exposition::Format::Text => self.encode(),
            exposition::Format::OpenMetrics => self.encode_openmetrics(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_labels_are_the_known_names_and_other() {
        let m = Metrics::new();
        for i in 0..500 {
            m.published("1", &format!("made_up_{i}"));
        }
        for name in KNOWN_EVENTS {
            m.published("1", name);
        }
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("pusher_bridge_events_published_total{"))
            .count();
        assert_eq!(series, KNOWN_EVENTS.len() + 1, "{text}");
        assert!(text.contains(r#"event="other"} 500"#), "{text}");
        assert_eq!(event_label("member_added"), "member_added");
        assert_eq!(event_label("Member_added"), OTHER_EVENT);
    }

    #[test]
    fn every_exported_name_appears() {
        let m = Metrics::new();
        m.webhook("1", Outcome::Accepted);
        m.dead_lettered("1", "malformed");
        m.events_published
            .get_or_create(&EventLabels {
                app_id: "1".into(),
                event: "channel_occupied",
            })
            .inc();
        m.sweeper_runs
            .get_or_create(&SweepRunLabels {
                target: "events".into(),
                outcome: "success",
            })
            .inc();
        m.sweeper_purged
            .get_or_create(&SweepPurgeLabels {
                target: "events".into(),
                app_id: "1".into(),
                rule: "app",
            })
            .inc();
        m.sweeper_last_success
            .get_or_create(&SweepLabels {
                target: "events".into(),
            })
            .set(1.0);
        m.broker_reconnected("nats");
        let text = m.encode();
        for name in EXPORTED_NAMES {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} missing from:\n{text}"
            );
        }
        assert!(
            text.contains(
                r#"pusher_bridge_webhooks_received_total{app_id="1",outcome="accepted"} 1"#
            )
        );
    }

    #[test]
    fn known_series_exist_from_start_up() {
        let mut settings = crate::config::Settings {
            apps: vec![crate::config::AppSettings {
                id: "42".into(),
                key: "k".into(),
                secret: crate::config::Secret::new("s"),
                secret_file: None,
            }],
            ..Default::default()
        };
        settings.retention.dlq.enabled = false;
        let m = Metrics::new();
        m.init_known_series(&settings);
        let text = m.encode();
        for line in [
            r#"pusher_bridge_events_dead_lettered_total{app_id="42",reason="no_stream"} 0"#,
            r#"pusher_bridge_events_dead_lettered_total{app_id="42",reason="malformed"} 0"#,
            r#"pusher_bridge_webhooks_received_total{app_id="42",outcome="accepted"} 0"#,
            r#"pusher_bridge_webhooks_received_total{app_id="42",outcome="unavailable"} 0"#,
            r#"pusher_bridge_webhooks_received_total{app_id="unknown",outcome="unauthorized"} 0"#,
            r#"pusher_bridge_sweeper_runs_total{target="events",outcome="success"} 0"#,
            r#"pusher_bridge_sweeper_runs_total{target="events",outcome="failure"} 0"#,
            r#"pusher_bridge_broker_reconnects_total{broker="nats"} 0"#,
            "pusher_bridge_spool_max_bytes 1073741824",
            r#"pusher_bridge_build_info{version=""#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // Last success starts as the start time; the disabled target has no series.
        let started: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    r#"pusher_bridge_sweeper_last_success_timestamp_seconds{target="events"} "#,
                )
            })
            .expect("last success of events")
            .parse()
            .unwrap();
        assert!(started > 1.7e9, "{started}");
        assert!(!text.contains(r#"target="dlq""#), "{text}");
        // Event names are not known before the events arrive; the purged series (per app and
        // rule) are created by the sweeper from the config (tests/it/ops.rs sees them at 0).
        for name in EXPORTED_NAMES.iter().filter(|n| {
            **n != "pusher_bridge_events_published_total"
                && **n != "pusher_bridge_sweeper_purged_total"
        }) {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} missing without any traffic:\n{text}"
            );
        }
    }
}
