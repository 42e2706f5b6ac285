//! The retention sweeper: trims the events stream / queue and the dead-letter stream / queue of
//! messages older than their retention, like the seed component's trim timers.
//!
//! - [`policy`]: the rules (default `max_age`, per event and per app overrides, most specific
//!   first) as pure functions.
//! - `nats`: purges by subject filter below the first young sequence; `nats_lease`: the KV
//!   lease and the scan cursor.
//! - `amqp`: reads the queue head and acks what is too old; the lease is an exclusive queue.
//!
//! [`Sweeper::sweep_once`] is one run (the tests and `pusher-bridge sweep --once` call it);
//! [`run_loop`] runs it every `interval` per target until shutdown. Only the replica holding the
//! lease sweeps; the others count the run as `skipped`. A failed run is logged and counted, and
//! the next interval tries again: the sweeper never stops the server.

mod amqp;
mod nats;
mod nats_lease;
pub mod policy;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

pub use self::nats_lease::{cursor_bucket, lease_bucket};
pub use self::policy::{RuleKind, Target};
use crate::broker::{BoxError, BrokerError, cause};
use crate::config::{BrokerKind, RetentionMethod, RetentionTarget, Settings};
use crate::metrics::{Metrics, SweepLabels, SweepPurgeLabels, SweepRunLabels};
use crate::shutdown::Shutdown;

/// After a run that stopped at its per-run budget, the next run of that target starts this soon
/// instead of a whole interval later.
const BACKLOG_PAUSE: Duration = Duration::from_secs(1);
/// The first run waits at most this long after start-up (the broker topology comes up first).
const FIRST_RUN_DELAY: Duration = Duration::from_secs(10);

/// A sweep could not run or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The broker cannot be reached.
    #[error(transparent)]
    Connect(#[from] BrokerError),
    /// The broker refused or failed an operation (missing stream / queue, timeout).
    #[error("{what}{}", cause(.source))]
    Broker {
        /// What was being done, or what went wrong.
        what: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The lease ended during the run; the run stopped so two replicas never sweep at once.
    #[error("the sweeper lease was lost during the run")]
    LeaseLost,
}

/// A failed broker request: `what` was being done, `e` is the broker's answer.
fn op_err(what: impl fmt::Display, e: impl Into<BoxError>) -> SweepError {
    SweepError::Broker {
        what: what.to_string(),
        source: Some(e.into()),
    }
}

/// A broker request that failed without a client error (no answer in time, a refusal).
fn broker_msg(what: impl Into<String>) -> SweepError {
    SweepError::Broker {
        what: what.into(),
        source: None,
    }
}

/// Whether this replica may sweep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    /// This replica holds the lease.
    Held,
    /// Another replica (named, when the broker tells) holds it.
    Elsewhere(Option<String>),
}

/// One line of a report: messages of one app and scope purged under one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurgeLine {
    /// The app id, `*` (every app) or `other` (app ids that are not in `[[apps]]`).
    pub app: String,
    /// `*` (every message of `app`) or an event name.
    pub scope: String,
    /// Which rule purged them.
    pub rule: RuleKind,
    /// The retention applied.
    pub max_age: Duration,
    /// Messages purged (or, in a dry run, that would be).
    pub purged: u64,
}

/// What one run did to one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetReport {
    /// Which target.
    pub target: Target,
    /// `stream NAME` or `queue NAME`.
    pub location: String,
    /// Nothing was removed; counts say what would have been.
    pub dry_run: bool,
    /// Per scope counts, in the order the purges ran.
    pub lines: Vec<PurgeLine>,
    /// False when the run stopped at its per-run budget; the next run goes on.
    pub complete: bool,
    /// Apps whose messages are never purged (`enabled = false`).
    pub untouched: Vec<String>,
}

impl TargetReport {
    fn new(target: Target, location: String, dry_run: bool) -> Self {
        Self {
            target,
            location,
            dry_run,
            lines: Vec::new(),
            complete: true,
            untouched: Vec::new(),
        }
    }

    /// Adds `purged` to the line of (app, scope, max_age, rule), creating it at the end.
    fn push(&mut self, app: &str, scope: &str, max_age: Duration, rule: RuleKind, purged: u64) {
        if let Some(line) = self
            .lines
            .iter_mut()
            .find(|l| l.app == app && l.scope == scope && l.max_age == max_age && l.rule == rule)
        {
            line.purged += purged;
            return;
        }
        self.lines.push(PurgeLine {
            app: app.to_string(),
            scope: scope.to_string(),
            rule,
            max_age,
            purged,
        });
    }

    /// Messages purged in total.
    pub fn purged(&self) -> u64 {
        self.lines.iter().map(|l| l.purged).sum()
    }

    /// Messages purged of one scope (0 when absent).
    pub fn purged_of(&self, scope: &str) -> u64 {
        self.lines
            .iter()
            .filter(|l| l.scope == scope)
            .map(|l| l.purged)
            .sum()
    }

    /// Messages purged of one app label (`*`: by purges of every app) and rule.
    pub fn purged_by(&self, app: &str, rule: RuleKind) -> u64 {
        self.lines
            .iter()
            .filter(|l| l.app == app && l.rule == rule)
            .map(|l| l.purged)
            .sum()
    }
}

impl fmt::Display for TargetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would purge"
        } else {
            "purged"
        };
        write!(
            f,
            "{} ({}): {verb} {} message(s)",
            self.target.as_str(),
            self.location,
            self.purged()
        )?;
        for line in &self.lines {
            let app = match line.app.as_str() {
                policy::ANY_APP => "any app".to_string(),
                policy::OTHER_APP => "apps not in [[apps]]".to_string(),
                id => format!("app {id}"),
            };
            let scope = if line.scope == "*" {
                "any message"
            } else {
                line.scope.as_str()
            };
            write!(
                f,
                "\n  {app}, {scope} older than {} ({} rule): {}",
                humantime::format_duration(line.max_age),
                line.rule.as_str(),
                line.purged
            )?;
        }
        for app in &self.untouched {
            write!(f, "\n  app {app}: disabled, untouched")?;
        }
        if !self.complete {
            write!(
                f,
                "\n  (stopped at the per-run limit; the next run goes on)"
            )?;
        }
        Ok(())
    }
}

/// How one target's run ended.
#[derive(Debug)]
pub enum TargetOutcome {
    /// The run finished (or, dry, counted).
    Swept(TargetReport),
    /// `enabled = false`: nothing was touched.
    Disabled,
    /// `method = "message_ttl"`: the server expires the target's messages; nothing to sweep.
    MessageTtl,
    /// Another replica holds the lease.
    Skipped(Option<String>),
    /// The run failed; the next interval tries again.
    Failed(SweepError),
}

impl TargetOutcome {
    /// A one-paragraph description for the command line.
    pub fn describe(&self, target: Target) -> String {
        let t = target.as_str();
        match self {
            TargetOutcome::Swept(report) => report.to_string(),
            TargetOutcome::Disabled => format!("{t}: disabled, nothing done"),
            TargetOutcome::MessageTtl => {
                format!("{t}: retention by message TTL, the server expires messages; nothing done")
            }
            TargetOutcome::Skipped(Some(holder)) => {
                format!("{t}: skipped, the sweeper lease is held by {holder}")
            }
            TargetOutcome::Skipped(None) => {
                format!("{t}: skipped, another sweeper holds the lease")
            }
            TargetOutcome::Failed(e) => format!("{t}: failed: {e}"),
        }
    }
}

/// `[retention.<target>]`.
fn target_settings(settings: &Settings, target: Target) -> &RetentionTarget {
    match target {
        Target::Events => &settings.retention.events,
        Target::Dlq => &settings.retention.dlq,
    }
}

/// Whether the sweeper trims `target`: enabled and `method = "sweep"` (with `message_ttl` the
/// server expires the messages by their `Nats-TTL`).
pub(crate) fn swept(settings: &Settings, target: Target) -> bool {
    let t = target_settings(settings, target);
    t.enabled && t.method == RetentionMethod::Sweep
}

/// Every label set of `pusher_bridge_sweeper_purged_total` the configuration can produce
/// (enabled targets; app labels: the ids of `[[apps]]`, `*`, `other`; rule kinds), so the series
/// can exist at 0 from start-up. [`Sweeper::new`] creates them.
pub(crate) fn purged_label_sets(settings: &Settings) -> Vec<SweepPurgeLabels> {
    let apps: std::collections::BTreeSet<String> =
        settings.apps.iter().map(|a| a.id.clone()).collect();
    let mut out = Vec::new();
    for target in Target::ALL {
        if !swept(settings, target) {
            continue;
        }
        let rules = policy::Retention::for_target(settings, target);
        for (app_id, rule) in rules.label_sets(&apps) {
            out.push(SweepPurgeLabels {
                target: target.as_str().into(),
                app_id,
                rule: rule.as_str(),
            });
        }
    }
    out
}

enum Backend {
    Nats(Box<nats::NatsSweeper>),
    Amqp(Box<amqp::AmqpSweeper>),
}

/// The sweeper of one bridge process (its own broker connection and lease).
pub struct Sweeper {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    backend: Backend,
}

/// A name for this replica's lease: host, process id and start time.
async fn holder_id() -> String {
    let host = match std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()) {
        Some(h) => h,
        None => tokio::fs::read_to_string("/etc/hostname")
            .await
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".into()),
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{host}/{}/{nanos:09}", std::process::id())
}

impl Sweeper {
    /// Builds the sweeper for `settings.broker.kind`. NATS connects in the background, AMQP at the
    /// first run; an unreachable broker shows as failed runs, not as an error here.
    pub async fn new(settings: Arc<Settings>, metrics: Arc<Metrics>) -> Result<Self, SweepError> {
        let backend = match settings.broker.kind {
            BrokerKind::Nats => Backend::Nats(Box::new(
                nats::NatsSweeper::new(settings.clone(), holder_id().await).await?,
            )),
            BrokerKind::Amqp => Backend::Amqp(Box::new(amqp::AmqpSweeper::new(settings.clone()))),
            #[cfg(feature = "bench-null-broker")]
            BrokerKind::Null => {
                return Err(broker_msg(
                    "the benchmark-only null broker stores nothing to sweep",
                ));
            }
        };
        for labels in purged_label_sets(&settings) {
            let _ = metrics.sweeper_purged.get_or_create(&labels);
        }
        Ok(Self {
            settings,
            metrics,
            backend,
        })
    }

    /// Whether `target` is enabled.
    pub fn enabled(&self, target: Target) -> bool {
        target_settings(&self.settings, target).enabled
    }

    /// Whether the sweeper trims `target`: enabled, and not left to message TTLs.
    pub fn sweeps(&self, target: Target) -> bool {
        swept(&self.settings, target)
    }

    /// Whether this replica holds the lease right now.
    pub fn holds_lease(&self) -> bool {
        match &self.backend {
            Backend::Nats(b) => b.holds_lease(),
            Backend::Amqp(b) => b.holds_lease(),
        }
    }

    /// Takes or renews the lease.
    pub async fn acquire_lease(&mut self) -> Result<LeaseStatus, SweepError> {
        match &mut self.backend {
            Backend::Nats(b) => b.acquire().await,
            Backend::Amqp(b) => b.acquire().await,
        }
    }

    /// Renews the lease if it is due (between runs, so the holder stays the holder).
    pub async fn keep_lease(&mut self) -> Result<(), SweepError> {
        match &mut self.backend {
            Backend::Nats(b) => b.keep_lease().await,
            Backend::Amqp(b) => b.keep_lease(),
        }
    }

    /// Gives the lease up and closes the sweeper's connection.
    pub async fn release(&mut self) {
        match &mut self.backend {
            Backend::Nats(b) => b.release().await,
            Backend::Amqp(b) => b.release().await,
        }
    }

    /// One run over `targets`: disabled ones are left alone; the others are swept if this
    /// replica holds (or takes) the lease. A dry run needs no lease and changes nothing.
    /// Metrics count every run but dry ones.
    pub async fn sweep_once(
        &mut self,
        targets: &[Target],
        dry_run: bool,
    ) -> Vec<(Target, TargetOutcome)> {
        let mut out = Vec::with_capacity(targets.len());
        let wanted: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|t| self.sweeps(*t))
            .collect();
        for t in targets.iter().filter(|t| !self.sweeps(**t)) {
            out.push((
                *t,
                if self.enabled(*t) {
                    TargetOutcome::MessageTtl
                } else {
                    TargetOutcome::Disabled
                },
            ));
        }
        if wanted.is_empty() {
            return out;
        }
        if !dry_run {
            match self.acquire_lease().await {
                Ok(LeaseStatus::Held) => {}
                Ok(LeaseStatus::Elsewhere(holder)) => {
                    for t in wanted {
                        self.count(t, "skipped");
                        out.push((t, TargetOutcome::Skipped(holder.clone())));
                    }
                    return out;
                }
                Err(e) => {
                    for t in wanted {
                        self.count(t, "failure");
                        out.push((t, TargetOutcome::Failed(broker_msg(e.to_string()))));
                    }
                    return out;
                }
            }
        }
        for t in wanted {
            let result = match &mut self.backend {
                Backend::Nats(b) => b.sweep(t, dry_run, !dry_run).await,
                Backend::Amqp(b) => b.sweep(t, dry_run).await,
            };
            let outcome = match result {
                Ok(report) => {
                    if !dry_run {
                        self.count(t, "success");
                        let labels = SweepLabels {
                            target: t.as_str().into(),
                        };
                        for line in &report.lines {
                            self.metrics
                                .sweeper_purged
                                .get_or_create(&SweepPurgeLabels {
                                    target: t.as_str().into(),
                                    app_id: line.app.clone(),
                                    rule: line.rule.as_str(),
                                })
                                .inc_by(line.purged);
                        }
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or(0.0);
                        self.metrics
                            .sweeper_last_success
                            .get_or_create(&labels)
                            .set(now);
                    }
                    TargetOutcome::Swept(report)
                }
                Err(e) => {
                    if !dry_run {
                        self.count(t, "failure");
                    }
                    TargetOutcome::Failed(e)
                }
            };
            out.push((t, outcome));
        }
        out.sort_by_key(|(t, _)| *t);
        out
    }

    fn count(&self, target: Target, outcome: &'static str) {
        self.metrics
            .sweeper_runs
            .get_or_create(&SweepRunLabels {
                target: target.as_str().into(),
                outcome,
            })
            .inc();
    }

    fn interval(&self, target: Target) -> Duration {
        match target {
            Target::Events => self.settings.retention.events.interval,
            Target::Dlq => self.settings.retention.dlq.interval,
        }
    }
}

/// Runs the sweeper until `shutdown`: each swept target every `interval` (sooner after a run
/// that stopped at its budget), the lease renewed every `lease_ttl / 3` while held, and released
/// at the end. Returns at once when no target is swept (both disabled or left to message TTLs).
pub async fn run_loop(mut sweeper: Sweeper, mut shutdown: Shutdown) {
    let enabled: Vec<Target> = Target::ALL
        .into_iter()
        .filter(|t| sweeper.sweeps(*t))
        .collect();
    if enabled.is_empty() {
        return;
    }
    let start = Instant::now();
    let mut due: Vec<(Target, Instant)> = enabled
        .iter()
        .map(|t| (*t, start + sweeper.interval(*t).min(FIRST_RUN_DELAY)))
        .collect();
    let renew_every = (sweeper.settings.retention.lease_ttl / 3).max(Duration::from_millis(100));
    let mut renew = tokio::time::interval(renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = due.iter().map(|(_, at)| *at).min().unwrap_or(start);
        tokio::select! {
            () = shutdown.wait() => break,
            _ = renew.tick(), if sweeper.holds_lease() => {
                if let Err(e) = sweeper.keep_lease().await {
                    tracing::warn!(error = %e, "sweeper lease not renewed");
                }
            }
            () = tokio::time::sleep_until(next) => {
                let now = Instant::now();
                let targets: Vec<Target> =
                    due.iter().filter(|(_, at)| *at <= now).map(|(t, _)| *t).collect();
                let results = tokio::select! {
                    () = shutdown.wait() => break,
                    r = sweeper.sweep_once(&targets, false) => r,
                };
                let finished = Instant::now();
                for (target, outcome) in &results {
                    let pause = match outcome {
                        TargetOutcome::Swept(report) => {
                            tracing::info!(
                                target = target.as_str(),
                                purged = report.purged(),
                                complete = report.complete,
                                "retention sweep done"
                            );
                            if report.complete { sweeper.interval(*target) } else { BACKLOG_PAUSE }
                        }
                        TargetOutcome::Skipped(holder) => {
                            tracing::debug!(target = target.as_str(), holder = ?holder, "retention sweep skipped: another replica holds the lease");
                            sweeper.interval(*target)
                        }
                        TargetOutcome::Failed(e) => {
                            tracing::warn!(target = target.as_str(), error = %e, "retention sweep failed; retrying at the next interval");
                            sweeper.interval(*target)
                        }
                        TargetOutcome::Disabled | TargetOutcome::MessageTtl => sweeper.interval(*target),
                    };
                    for (t, at) in due.iter_mut() {
                        if t == target {
                            *at = finished + pause;
                        }
                    }
                }
            }
        }
    }
    sweeper.release().await;
}

/// The server's sweeper: connects, then sweeps every swept target until `shutdown`. Runs
/// under the supervisor ([`crate::supervisor`]), which starts it only when some target is
/// swept (`swept`) and again if it returns early (a sweeper that cannot connect yet).
pub async fn run(settings: Arc<Settings>, metrics: Arc<Metrics>, shutdown: Shutdown) {
    match Sweeper::new(settings, metrics).await {
        Ok(sweeper) => run_loop(sweeper, shutdown).await,
        Err(e) => tracing::error!(error = %e, "the retention sweeper cannot start"),
    }
}
