//! The sweep of a JetStream stream: purges by subject filter below the first sequence that is
//! young enough (see [`super::policy::NatsPlan`] for the order and why it is correct).
//!
//! The first young sequence of a filter comes from an ephemeral consumer with
//! `DeliverPolicy::ByStartTime` (the server finds it in its own index; NATS 2.9 has it): if the
//! consumer has nothing pending, no message of the filter is young. Purges use the JetStream purge
//! request with `filter` and `seq` ("every message of the filter below `seq`"), which is atomic
//! on the server and leaves the stream's own limits (`max_age`, `max_bytes`) working as before.

use std::collections::{BTreeMap, BTreeSet};
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, stream::Stream};
use futures::StreamExt;

use super::nats_lease::{Cursor, CursorStore, NatsLease};
use super::policy::{self, Retention, Target};
use super::{LeaseStatus, SweepError, TargetReport, op_err};
use crate::config::Settings;
use crate::routing;

/// Timeout of one JetStream API request (a filtered purge deletes message by message).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sweep waits for the connection before it counts as failed.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// Messages read per batch while scanning for event names.
const SCAN_BATCH: usize = 1000;
/// Messages scanned per run at most; the scan resumes there at the next run.
pub(super) const SCAN_BUDGET: u64 = 2_000_000;
/// Sequences covered by one filtered purge request.
const PURGE_CHUNK: u64 = 10_000;
/// Ephemeral consumers of the sweeper vanish this long after a crashed sweeper left them.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(60);

/// How long one lease request (take, renew, release) may wait: a third of the TTL (renewals are
/// due every third), between 500 ms and 5 s.
fn lease_request_timeout(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// The NATS backend: its own connection, the KV lease and the cursor store.
pub(super) struct NatsSweeper {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: Arc<Settings>,
    lease: NatsLease,
    cursor: CursorStore,
}

/// One target's stream as the sweep sees it.
struct View {
    stream: Stream,
    prefix: String,
    /// The stream holds only `<prefix>.>`, so "every event" needs no filter (NATS then drops
    /// whole blocks instead of deleting message by message).
    whole: bool,
    first: u64,
    last: u64,
    created: String,
}

impl NatsSweeper {
    /// Starts connecting (in the background, like the broker) and returns at once.
    pub(super) async fn new(settings: Arc<Settings>, holder: String) -> Result<Self, SweepError> {
        let client =
            crate::broker::nats::connect_client(&settings.broker.nats, "pusher-bridge-sweeper")
                .await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        // Lease requests wait far less than purges: a request that hangs while the bucket's
        // stream elects a leader must not outlast the TTL the other replicas are waiting out.
        let lease_js = jetstream::ContextBuilder::new()
            .timeout(lease_request_timeout(settings.retention.lease_ttl))
            .build(client.clone());
        Ok(Self {
            lease: NatsLease::new(lease_js, &settings, holder),
            cursor: CursorStore::new(js.clone(), &settings),
            client,
            js,
            settings,
        })
    }

    pub(super) async fn acquire(&mut self) -> Result<LeaseStatus, SweepError> {
        crate::broker::nats::wait_connected(&self.client, &self.settings.broker.nats, CONNECT_WAIT)
            .await?;
        self.lease.acquire().await
    }

    pub(super) fn holds_lease(&self) -> bool {
        self.lease.is_held()
    }

    pub(super) async fn keep_lease(&mut self) -> Result<(), SweepError> {
        self.lease.keep().await
    }

    pub(super) async fn release(&mut self) {
        self.lease.release().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }

    /// Sweeps one target. `guarded`: renew the lease between steps and stop if it is lost
    /// (false for dry runs, which change nothing).
    pub(super) async fn sweep(
        &mut self,
        target: Target,
        dry_run: bool,
        guarded: bool,
    ) -> Result<TargetReport, SweepError> {
        crate::broker::nats::wait_connected(&self.client, &self.settings.broker.nats, CONNECT_WAIT)
            .await?;
        let (stream_name, prefix) = match target {
            Target::Events => (
                self.settings.broker.nats.stream.clone(),
                self.settings.broker.subject_prefix.clone(),
            ),
            Target::Dlq => (
                self.settings.broker.nats.dlq_stream.clone(),
                routing::dlq_prefix(&self.settings.broker.subject_prefix),
            ),
        };
        let mut stream = self
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|e| op_err(format_args!("cannot open stream {stream_name}"), e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| op_err(format_args!("cannot read stream {stream_name}"), e))?
            .clone();
        let whole = info.config.subjects == [policy::all_filter(&prefix)];
        let view = View {
            stream,
            whole,
            prefix,
            first: info.state.first_sequence,
            last: info.state.last_sequence,
            created: info.created.to_string(),
        };
        let retention = Retention::for_target(&self.settings, target);
        let apps: BTreeSet<String> = self.settings.apps.iter().map(|a| a.id.clone()).collect();
        let plan = retention.nats_plan();
        let now = SystemTime::now();
        let mut report = TargetReport::new(target, format!("stream {stream_name}"), dry_run);
        report.untouched = disabled_apps(&retention);

        // 1. Everything older than the longest retention (not when an app keeps everything).
        let mut floor = view.first;
        if let Some(age) = plan.everything {
            let all = policy::all_filter(&view.prefix);
            let below = first_young_seq(&view, &all, now, age).await?;
            let n = self
                .purge_or_count(&view, &all, 0, below, dry_run, guarded)
                .await?;
            report.push(policy::ANY_APP, "*", age, plan.everything_rule, n);
            floor = floor.max(below);
            if guarded {
                self.lease.keep().await?;
            }
        }

        // 2. One filter per rule: apps, apps' events, events of every app.
        let mut app_floor: BTreeMap<&str, u64> = BTreeMap::new();
        for f in &plan.filters {
            let filter = f.filter(&view.prefix);
            let below = first_young_seq(&view, &filter, now, f.max_age).await?;
            let from = match (&f.app, &f.event) {
                (Some(app), Some(_)) => app_floor.get(app.as_str()).copied().unwrap_or(floor),
                _ => floor,
            };
            let n = self
                .purge_or_count(&view, &filter, from, below, dry_run, guarded)
                .await?;
            if let (Some(app), None) = (&f.app, &f.event) {
                app_floor.insert(app, below.max(floor));
            }
            let label = f.app.as_deref().map_or(policy::ANY_APP.to_string(), |a| {
                policy::app_label(&apps, Some(a))
            });
            report.push(
                &label,
                f.event.as_deref().unwrap_or("*"),
                f.max_age,
                f.rule,
                n,
            );
            if guarded {
                self.lease.keep().await?;
            }
        }

        // 3. Rules no filter can express: purge what a scan of the old messages finds.
        if !plan.scans.is_empty() {
            let stored = self.cursor.load(!dry_run).await?;
            let mut cursor = stored.unwrap_or_else(|| Cursor {
                stream_created: String::new(),
                long_names: Vec::new(),
                next_seq: 0,
                scans: BTreeMap::new(),
            });
            let fingerprint = retention.fingerprint();
            let mut others_floor = floor;
            for scan in &plan.scans {
                let key = scan_key(target, &view.created, &fingerprint, &scan.key);
                let scan_filter = scan.scan_filter(&view.prefix);
                let below = first_young_seq(&view, &scan_filter, now, scan.max_age).await?;
                let base = match &scan.within_app {
                    Some(app) => app_floor.get(app.as_str()).copied().unwrap_or(floor),
                    None => others_floor,
                };
                let resume = cursor.scans.get(&key).copied().unwrap_or(0);
                let from = resume.max(base).max(view.first);
                let found = if from < below {
                    self.scan_tokens(&view, &scan_filter, from, below, guarded)
                        .await?
                } else {
                    Scan {
                        pairs: BTreeSet::new(),
                        next: from.max(below),
                        complete: true,
                    }
                };
                for (filter, (app, scope)) in
                    scan_purges(&view.prefix, &retention, &apps, scan, &found.pairs)
                {
                    let n = self
                        .purge_or_count(&view, &filter, base, below, dry_run, guarded)
                        .await?;
                    report.push(&app, &scope, scan.max_age, scan.rule, n);
                    if guarded {
                        self.lease.keep().await?;
                    }
                }
                if scan.within_app.is_none()
                    && matches!(scan.collect, policy::Collect::Apps { .. })
                    && scan.of_event.is_none()
                    && found.complete
                {
                    // Every other app's message below this is gone (or was counted).
                    others_floor = others_floor.max(below);
                }
                report.complete &= found.complete;
                cursor.scans.insert(key, found.next);
            }
            if !dry_run {
                // Positions written under other rules or for a recreated stream are stale.
                let mine = format!("{}|", target.as_str());
                let current = scan_key(target, &view.created, &fingerprint, "");
                cursor
                    .scans
                    .retain(|k, _| !k.starts_with(&mine) || k.starts_with(&current));
                if target == Target::Events {
                    cursor.stream_created = view.created.clone();
                    cursor.long_names = retention.longer_than_default();
                    cursor.next_seq = cursor
                        .scans
                        .iter()
                        .filter(|(k, _)| k.starts_with(&current))
                        .map(|(_, v)| *v)
                        .min()
                        .unwrap_or(0);
                }
                self.cursor.save(&cursor).await?;
            }
        }
        Ok(report)
    }

    /// Purges the messages of `filter` below `below` (returns how many went), or in a dry run
    /// counts those in `[from, below)` (`from`: what earlier steps would already have purged).
    ///
    /// A filtered purge makes NATS delete message by message, so it goes in chunks of
    /// [`PURGE_CHUNK`] sequences: each request stays well inside the request timeout and the lease
    /// is renewed between them.
    async fn purge_or_count(
        &mut self,
        view: &View,
        filter: &str,
        from: u64,
        below: u64,
        dry_run: bool,
        guarded: bool,
    ) -> Result<u64, SweepError> {
        let from = from.max(view.first);
        if below <= from {
            return Ok(0);
        }
        if dry_run {
            let at_from = pending_from(view, filter, from).await?;
            let at_below = if below > view.last {
                0
            } else {
                pending_from(view, filter, below).await?
            };
            return Ok(at_from.saturating_sub(at_below));
        }
        if view.whole && filter == policy::all_filter(&view.prefix) {
            let request = view.stream.purge().sequence(below).into_future();
            let response = self
                .renewing(guarded, request)
                .await?
                .map_err(|e| op_err("cannot purge the stream", e))?;
            return Ok(response.purged);
        }
        let mut purged = 0;
        let mut upto = from;
        while upto < below {
            upto = upto.saturating_add(PURGE_CHUNK).min(below);
            let request = view
                .stream
                .purge()
                .filter(filter)
                .sequence(upto)
                .into_future();
            let response = self
                .renewing(guarded, request)
                .await?
                .map_err(|e| op_err(format_args!("cannot purge {filter}"), e))?;
            purged += response.purged;
        }
        Ok(purged)
    }

    /// Awaits `request` while renewing the lease as it falls due (`guarded`), so a slow purge
    /// never outlives the lease; stops with [`SweepError::LeaseLost`] if the lease ends.
    async fn renewing<T>(
        &mut self,
        guarded: bool,
        request: impl std::future::Future<Output = T>,
    ) -> Result<T, SweepError> {
        tokio::pin!(request);
        if !guarded {
            return Ok(request.await);
        }
        loop {
            tokio::select! {
                out = &mut request => return Ok(out),
                () = tokio::time::sleep(self.lease.check_every()) => self.lease.keep().await?,
            }
        }
    }

    /// Reads subjects (headers only) of `filter` in `[from, below)` and collects their (app,
    /// event) tokens.
    async fn scan_tokens(
        &mut self,
        view: &View,
        filter: &str,
        from: u64,
        below: u64,
        guarded: bool,
    ) -> Result<Scan, SweepError> {
        let deliver = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from.max(1),
        };
        let consumer =
            headers_consumer(view, filter, deliver, "cannot create the scan consumer").await?;
        let mut scan = Scan {
            pairs: BTreeSet::new(),
            next: from,
            complete: false,
        };
        let mut scanned = 0u64;
        // App token → event tokens ("" for a subject without one: a dead letter's).
        let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let result: Result<(), SweepError> = async {
            loop {
                let mut batch = consumer
                    .fetch()
                    .max_messages(SCAN_BATCH)
                    .messages()
                    .await
                    .map_err(|e| op_err("scan fetch failed", e))?;
                let mut got = 0usize;
                while let Some(msg) = batch.next().await {
                    let msg = msg.map_err(|e| op_err("scan fetch failed", e))?;
                    got += 1;
                    let seq = msg
                        .info()
                        .map_err(|e| op_err("scan message without metadata", e))?
                        .stream_sequence;
                    if seq >= below {
                        scan.next = below;
                        scan.complete = true;
                        return Ok(());
                    }
                    if let Some((app, event)) = policy::subject_tokens(&view.prefix, &msg.subject) {
                        // Looked up by reference: no allocation for the pairs already seen.
                        let event = event.unwrap_or("");
                        if let Some(events) = seen.get_mut(app) {
                            if !events.contains(event) {
                                events.insert(event.to_string());
                            }
                        } else {
                            seen.insert(app.to_string(), BTreeSet::from([event.to_string()]));
                        }
                    }
                    scan.next = seq + 1;
                    scanned += 1;
                }
                if got < SCAN_BATCH {
                    // The end of the stream: nothing else below `below`.
                    scan.next = below;
                    scan.complete = true;
                    return Ok(());
                }
                if scanned >= SCAN_BUDGET {
                    return Ok(());
                }
                if guarded {
                    self.lease.keep().await?;
                }
            }
        }
        .await;
        delete_consumer(&view.stream, &consumer).await;
        for (app, events) in seen {
            for event in events {
                let event = (!event.is_empty()).then_some(event);
                scan.pairs.insert((app.clone(), event));
            }
        }
        result.map(|()| scan)
    }
}

/// What a scan found.
struct Scan {
    /// Escaped (app, event) tokens seen (no event: a dead letter's subject).
    pairs: BTreeSet<(String, Option<String>)>,
    /// Everything below this was checked.
    next: u64,
    /// The scan reached `below` (false: the per-run budget ran out first).
    complete: bool,
}

/// The cursor key of one scan: the target, the stream's creation time and the rules'
/// fingerprint are part of it, so a recreated stream or a changed rule starts the scan over.
fn scan_key(target: Target, created: &str, fingerprint: &str, scan: &str) -> String {
    format!("{}|{created}|{fingerprint}|{scan}", target.as_str())
}

/// Ids of the apps whose messages are never purged, for the report.
fn disabled_apps(retention: &Retention) -> Vec<String> {
    retention
        .apps
        .iter()
        .filter(|(_, r)| !r.enabled)
        .map(|(a, _)| a.clone())
        .collect()
}

/// The purges a scan's findings call for: subject filter → (app label, scope), one per filter.
fn scan_purges(
    prefix: &str,
    retention: &Retention,
    apps: &BTreeSet<String>,
    scan: &policy::ScanPurge,
    pairs: &BTreeSet<(String, Option<String>)>,
) -> BTreeMap<String, (String, String)> {
    use policy::Collect;
    let mut out = BTreeMap::new();
    for (app_token, event_token) in pairs {
        let raw_app = routing::unescape_token(app_token);
        let raw_event = event_token.as_deref().map(routing::unescape_token);
        let label = policy::app_label(apps, Some(&raw_app));
        match (&scan.collect, event_token, raw_event) {
            (Collect::Events { skip }, Some(event), Some(raw)) => {
                let Some(app) = &scan.within_app else {
                    continue;
                };
                if skip.contains(&raw) || raw_app != *app {
                    continue;
                }
                let filter = format!("{prefix}.{app_token}.{event}.>");
                out.insert(filter, (label, raw));
            }
            (Collect::Apps { except }, _, _) => {
                if except.contains(&raw_app) {
                    continue;
                }
                let (filter, scope) = match &scan.of_event {
                    None => (format!("{prefix}.{app_token}.>"), "*".to_string()),
                    Some(e) => (
                        format!("{prefix}.{app_token}.{}.>", routing::escape_token(e)),
                        e.clone(),
                    ),
                };
                out.insert(filter, (label, scope));
            }
            (Collect::OtherEvents { skip, except }, Some(event), Some(raw)) => {
                if skip.contains(&raw) || except.contains(&raw_app) {
                    continue;
                }
                if retention.wildcard_ok(&raw, scan.max_age) {
                    let filter = policy::event_token_filter(prefix, event);
                    out.insert(filter, (policy::ANY_APP.to_string(), raw));
                } else {
                    out.insert(format!("{prefix}.{app_token}.{event}.>"), (label, raw));
                }
            }
            _ => {}
        }
    }
    out
}

fn unix_nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// The first sequence of `filter` whose message is younger than `max_age` at `now`, or
/// `last + 1` when none is: every message of `filter` below it is older than `max_age`.
async fn first_young_seq(
    view: &View,
    filter: &str,
    now: SystemTime,
    max_age: Duration,
) -> Result<u64, SweepError> {
    let cutoff = now.checked_sub(max_age).unwrap_or(UNIX_EPOCH);
    let start_time = async_nats::datetime::from_nanos(unix_nanos(cutoff))
        .map_err(|e| op_err("cutoff time", e))?;
    let deliver = consumer::DeliverPolicy::ByStartTime { start_time };
    let consumer =
        headers_consumer(view, filter, deliver, &format!("cannot look up {filter}")).await?;
    let result = async {
        if consumer.cached_info().num_pending == 0 {
            return Ok(view.last + 1);
        }
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .messages()
            .await
            .map_err(|e| op_err(format_args!("cannot look up {filter}"), e))?;
        match batch.next().await {
            Some(Ok(msg)) => msg
                .info()
                .map(|i| i.stream_sequence)
                .map_err(|e| op_err("message without metadata", e)),
            Some(Err(e)) => Err(op_err(format_args!("cannot look up {filter}"), e)),
            // The young messages vanished meanwhile (stream limits): none is left.
            None => Ok(view.last + 1),
        }
    }
    .await;
    delete_consumer(&view.stream, &consumer).await;
    result
}

/// Messages of `filter` at or after `seq`, as the server counts them for a new consumer.
async fn pending_from(view: &View, filter: &str, seq: u64) -> Result<u64, SweepError> {
    let deliver = consumer::DeliverPolicy::ByStartSequence {
        start_sequence: seq.max(1),
    };
    let consumer =
        headers_consumer(view, filter, deliver, &format!("cannot count {filter}")).await?;
    let pending = consumer.cached_info().num_pending;
    delete_consumer(&view.stream, &consumer).await;
    Ok(pending)
}

/// An ephemeral consumer of `filter` from `deliver` that only reads: headers only, no acks,
/// gone by itself after [`CONSUMER_INACTIVE`] if a crashed sweeper leaves it. Its
/// `num_pending` (the server's count of what it would deliver) is often the whole answer.
/// `what` names the step in the error. Delete it with [`delete_consumer`].
async fn headers_consumer(
    view: &View,
    filter: &str,
    deliver: consumer::DeliverPolicy,
    what: &str,
) -> Result<consumer::PullConsumer, SweepError> {
    view.stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: deliver,
            filter_subject: filter.to_string(),
            ack_policy: consumer::AckPolicy::None,
            headers_only: true,
            inactive_threshold: CONSUMER_INACTIVE,
            ..Default::default()
        })
        .await
        .map_err(|e| op_err(what, e))
}

async fn delete_consumer(stream: &Stream, consumer: &consumer::PullConsumer) {
    let name = consumer.cached_info().name.clone();
    if let Err(e) = stream.delete_consumer(&name).await {
        // It disappears by itself after CONSUMER_INACTIVE.
        tracing::debug!(consumer = %name, error = %e, "could not delete a sweeper consumer");
    }
}
