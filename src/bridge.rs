//! The webhook pipeline, the same for every broker: once [`crate::http`] has authenticated a
//! webhook, parse, route, publish every event concurrently, dead-letter what the broker
//! refuses, and answer only once every event is durable.
//!
//! Per webhook: one HMAC over the body, one SHA-256 for the message ids, one borrowed parse, and
//! all publishes in flight at once (bounded across webhooks by `broker.max_in_flight`), their acks
//! awaited together within `broker.response_budget`: the deliverer (`crate::delivery`) drives
//! the broker with the webhook path's policy. What the broker cannot take in time goes to the
//! local [`Spool`] (fsynced before the answer); while the spool holds events, new webhooks are
//! appended behind them so they do not overtake them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::config::Settings;
use crate::delivery::{Deliverer, Fate, Kept, Pending, Policy};
use crate::message::{DeadLetter, Message};
use crate::metrics::Metrics;
use crate::spool::{Record, Spool, SpoolError};
use crate::supervisor::TaskHealth;
use crate::telemetry::export::Export;
use crate::telemetry::{Tracer, WebhookSpan};
use crate::webhook::{self, AppKey, AppRegistry, Apps};

/// Why a webhook was not accepted once its request was read; [`crate::http`] maps each to its
/// status code (with the refusals only HTTP can make).
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Key or signature missing or wrong (the key found by [`crate::http`], the signature
    /// checked by [`Bridge::handle_signed`]), or `time_ms` too old.
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] webhook::AuthError),
    /// More events than `server.max_events_per_webhook` (answered 413 like a large body).
    #[error("more than {0} events in one webhook (server.max_events_per_webhook)")]
    TooManyEvents(usize),
    /// Signed correctly but not a webhook.
    #[error("bad request: {0}")]
    BadRequest(#[source] webhook::PayloadError),
    /// The events the broker could not take could not be spooled either (full, disk error).
    #[error("unavailable: {events} events could not be made durable: {source}")]
    NotDurable {
        /// How many events (and dead letters) were to be spooled.
        events: usize,
        /// Why the spool refused them.
        #[source]
        source: SpoolError,
    },
    /// A blocking-pool task (a large body's signature check or parse) did not finish.
    #[error("unavailable: {what} stopped: {source}")]
    Stopped {
        /// Which task.
        what: &'static str,
        /// Why it ended (a panic, the runtime shutting down).
        #[source]
        source: tokio::task::JoinError,
    },
}

impl From<webhook::PayloadError> for BridgeError {
    fn from(e: webhook::PayloadError) -> Self {
        match e {
            webhook::PayloadError::TooManyEvents { max } => BridgeError::TooManyEvents(max),
            e => BridgeError::BadRequest(e),
        }
    }
}

/// What happened to an accepted webhook's events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Events the broker acknowledged.
    pub published: usize,
    /// Events sent to the dead-letter queue.
    pub dead_lettered: usize,
    /// Events held on the local spool.
    pub spooled: usize,
}

/// Shared state of the webhook pipeline.
pub struct Bridge {
    settings: Arc<Settings>,
    apps: Arc<Apps>,
    deliverer: Deliverer,
    metrics: Arc<Metrics>,
    spool: Arc<Spool>,
    /// The supervised background tasks that are down right now (for `/readyz`).
    tasks: TaskHealth,
    /// `[tracing]`: the spans of webhooks and their events (off: does nothing).
    tracer: Tracer,
    /// The span export task, for the supervisor to run (`None`: tracing is off).
    export: Option<Arc<Export>>,
    /// When the bridge was built, and whether its broker has been up since: right after a
    /// start a webhook waits for the first connection ([`FIRST_CONNECT`]).
    started: Instant,
    seen_up: AtomicBool,
}

/// For this long after start, a webhook waits (up to half its budget) for a broker that has not
/// been up yet: the connection comes up a moment after the listener, and a bridge started
/// beside a healthy broker should publish its first webhook rather than spool it (the natural
/// deployment check, `send-test` right after a start, said "cannot reach the broker").
const FIRST_CONNECT: Duration = Duration::from_secs(10);

/// Bodies at least this large are authenticated, parsed and turned into messages on the
/// blocking pool, in one trip: a 1 MiB body costs milliseconds of CPU (tens in a debug
/// build) that would otherwise stall every other webhook on the runtime (one thread by default).
pub(crate) const OFFLOAD_BYTES: usize = 64 * 1024;

/// Parses a webhook (at most `server.max_events_per_webhook` events), applies
/// `server.max_webhook_age`, and builds its messages and the dead letters of unroutable events.
fn parse_and_prepare(
    settings: &Settings,
    app: &AppKey,
    body: &[u8],
) -> Result<(Vec<Message>, Vec<DeadLetter>), BridgeError> {
    let hook = webhook::parse(body, settings.server.max_events_per_webhook)?;
    webhook::check_age(&hook, settings.server.max_webhook_age)?;
    Ok(webhook::prepare(
        &settings.broker.subject_prefix,
        app,
        &hook,
        body,
    ))
}

impl Bridge {
    /// Builds the pipeline around a connected broker and an open spool.
    pub fn new(
        settings: Arc<Settings>,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
        spool: Arc<Spool>,
    ) -> Self {
        let apps = Arc::new(Apps::new(&settings.apps));
        let (tracer, export) = Tracer::new(&settings, metrics.clone());
        let deliverer = Deliverer::new(
            broker,
            settings.broker.publish_timeout,
            settings.broker.max_in_flight,
        );
        Self {
            settings,
            apps,
            deliverer,
            metrics,
            spool,
            tasks: TaskHealth::default(),
            tracer,
            export,
            started: Instant::now(),
            seen_up: AtomicBool::new(false),
        }
    }

    /// The spool (for the drainer and shutdown).
    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// The broker (for readiness and shutdown).
    pub fn broker(&self) -> &Arc<Broker> {
        self.deliverer.broker()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Which supervised background tasks are down (the supervisor reports into it).
    pub fn task_health(&self) -> &TaskHealth {
        &self.tasks
    }

    /// Whether events can be made durable now and will move on (for `/readyz`), or why not:
    /// the broker is up or the spool has room for a webhook (within `spool.max_bytes`, on a
    /// disk that took its last write), the spool's drainer is not
    /// stalled, and none of the tasks that move events on (the drainer, the broker's loop) is
    /// down between a crash and its restart.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        // Asked first, whatever the broker: while the disk refused its last write this probes
        // it, so a refusal that is over is not reported when the broker drops next.
        let disk = self.spool.write_refused();
        if let Some(panic) = self.spool.writer_stopped() {
            return Err(format!(
                "the spool writer stopped ({panic}): the bridge cannot make events durable and stops"
            ));
        }
        if self.spool.is_stalled() {
            return Err("the spool is not draining although the broker is up".into());
        }
        let mut down = self.tasks.down();
        down.extend(self.broker().tasks_down());
        down.retain(|task| crate::metrics::task::DURABILITY.contains(task));
        if !down.is_empty() {
            return Err(format!(
                "background task(s) stopped and restarting: {}",
                down.join(", ")
            ));
        }
        if !self.broker().is_up() {
            let broker = || {
                self.broker()
                    .status()
                    .describe(self.settings.broker.kind, None)
            };
            if let Some(why) = disk {
                return Err(format!(
                    "the spool's disk refuses writes ({why}), and the broker is not up: {}",
                    broker()
                ));
            }
            if !self.spool.has_room() {
                return Err(format!(
                    "no spool room, and the broker is not up: {}",
                    broker()
                ));
            }
        }
        Ok(())
    }

    /// The spans of webhooks and their events (`[tracing]`).
    pub(crate) fn tracer(&self) -> &Tracer {
        &self.tracer
    }

    /// The span export task to run under the supervisor (`None`: tracing is off).
    pub(crate) fn span_export(&self) -> Option<Arc<Export>> {
        self.export.clone()
    }

    /// The configured app keys ([`crate::http`] authenticates each request against them).
    pub fn apps(&self) -> Arc<AppRegistry> {
        self.apps.current()
    }

    /// The swappable keys (the state API checks its requests against them; a reload replaces
    /// them).
    pub(crate) fn app_keys(&self) -> &Arc<Apps> {
        &self.apps
    }

    /// Publishes every event of an authenticated webhook; `Ok` once all are durable.
    pub async fn handle(&self, app: &Arc<AppKey>, body: &Bytes) -> Result<Accepted, BridgeError> {
        self.handle_checked(app, None, body, None).await
    }

    /// Checks `signature` (the `X-Pusher-Signature` [`crate::http`] read) against `app`'s
    /// secret, then publishes as [`Bridge::handle`] does. A large body's check and parse share
    /// one trip to the blocking pool.
    pub async fn handle_signed(
        &self,
        app: &Arc<AppKey>,
        signature: Option<&[u8]>,
        body: &Bytes,
    ) -> Result<Accepted, BridgeError> {
        self.handle_checked(app, Some(signature), body, None).await
    }

    /// [`Bridge::handle_signed`] under the request's span (`[tracing]`): each event gets a
    /// producer span, its child, whose context its message carries.
    pub(crate) async fn handle_traced(
        &self,
        app: &Arc<AppKey>,
        signature: Option<&[u8]>,
        body: &Bytes,
        span: Option<&WebhookSpan>,
    ) -> Result<Accepted, BridgeError> {
        self.handle_checked(app, Some(signature), body, span).await
    }

    /// `check`: the signature to check first (`None`: already authenticated).
    async fn handle_checked(
        &self,
        app: &Arc<AppKey>,
        check: Option<Option<&[u8]>>,
        body: &Bytes,
        span: Option<&WebhookSpan>,
    ) -> Result<Accepted, BridgeError> {
        let started = Instant::now();
        let budget = self.settings.broker.response_budget;
        let policy = Policy::webhook(started + budget, budget);
        let (messages, dead) = if body.len() >= OFFLOAD_BYTES {
            // The HMAC and the parse of a large body are CPU time the runtime's thread must
            // not spend: one trip to the blocking pool for both.
            let (settings, app, body) = (self.settings.clone(), app.clone(), body.clone());
            let check = check.map(|sig| sig.map(<[u8]>::to_vec));
            tokio::task::spawn_blocking(move || {
                if let Some(sig) = check {
                    app.check(sig.as_deref(), &body)?;
                }
                parse_and_prepare(&settings, &app, &body)
            })
            .await
            .map_err(|source| BridgeError::Stopped {
                what: "webhook check and parsing",
                source,
            })??
        } else {
            if let Some(sig) = check {
                app.check(sig, body)?;
            }
            parse_and_prepare(&self.settings, app, body)?
        };
        let mut messages = messages;
        let producers = span.map(|s| s.producers(&mut messages)).unwrap_or_default();
        if !self.spool.is_empty() {
            // Earlier events are still waiting: queue behind them (the drainer keeps order).
            let records: Vec<Record> = messages
                .into_iter()
                .map(Record::Event)
                .chain(dead.into_iter().map(Record::DeadLetter))
                .collect();
            let spooled = self.make_durable(records).await;
            let outcome = if spooled.is_ok() {
                "spooled"
            } else {
                "refused"
            };
            producers.into_iter().for_each(|p| p.end(outcome));
            return Ok(Accepted {
                spooled: spooled?,
                ..Accepted::default()
            });
        }
        self.await_first_connect(budget / 2).await;
        let (mut fates, letters) = self
            .deliverer
            .events_and_dead_letters(&Pending::fresh(&messages), dead, policy)
            .await;
        fates.extend(letters);
        self.metrics
            .publish_duration
            .observe(started.elapsed().as_secs_f64());
        let mut accepted = Accepted::default();
        let mut kept = Vec::new();
        let mut events = messages.iter();
        let mut producers = producers.into_iter();
        let mut ended = Vec::new();
        for fate in fates {
            // The first fates are the events', in order; the rest the malformed letters'.
            let event = events.next();
            let producer = event.and_then(|_| producers.next());
            ended.extend(producer.map(|p| (p, fate.outcome())));
            match fate {
                Fate::Published => {
                    accepted.published += 1;
                    if let Some(m) = event {
                        self.metrics.published(&app.app_id, &m.event);
                    }
                }
                Fate::DeadLettered(reason) => {
                    accepted.dead_lettered += 1;
                    self.metrics.dead_lettered(&app.app_id, reason.as_str());
                }
                Fate::Kept {
                    item: Kept::Event(m),
                    ..
                } => kept.push(Record::Event(m)),
                // The drainer sets aside what the dead-letter queue refuses for good.
                Fate::Kept {
                    item: Kept::DeadLetter(dl),
                    ..
                }
                | Fate::Unplaceable { letter: dl, .. } => {
                    kept.push(Record::DeadLetter(dl));
                }
            }
        }
        if !kept.is_empty() {
            let spooled = self.make_durable(kept).await;
            let refused = spooled.is_err();
            for (p, outcome) in ended.drain(..) {
                p.end(if refused && outcome == "spooled" {
                    "refused"
                } else {
                    outcome
                });
            }
            accepted.spooled = spooled?;
        }
        for (p, outcome) in ended {
            p.end(outcome);
        }
        Ok(accepted)
    }

    /// Right after the start, while the broker's first connection is on its way (nothing
    /// failed yet): waits up to `wait` for it ([`FIRST_CONNECT`]). A broker that refused or
    /// could not be reached is not waited for: its events go to the spool at once.
    async fn await_first_connect(&self, wait: Duration) {
        if self.seen_up.load(Ordering::Relaxed) {
            return;
        }
        let deadline = Instant::now() + wait;
        let broker = self.broker();
        while !broker.is_up()
            && broker.is_connecting()
            && self.started.elapsed() < FIRST_CONNECT
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if broker.is_up() {
            self.seen_up.store(true, Ordering::Relaxed);
        }
    }

    /// Makes events the broker could not take durable on the local spool: appended as one unit
    /// and fsynced before this returns. A full spool (or a disk error) refuses the webhook and
    /// Pusher retries it (ids are deterministic, so events already published are deduplicated).
    async fn make_durable(&self, records: Vec<Record>) -> Result<usize, BridgeError> {
        match self.spool.append(&records).await {
            Ok(()) => Ok(records.len()),
            Err(source) => {
                if !matches!(source, SpoolError::Full { .. }) {
                    tracing::error!(error = %source, "cannot write to the spool");
                }
                Err(BridgeError::NotDurable {
                    events: records.len(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! `Bridge::handle` against the in-memory broker ([`crate::broker::fake`]): where every
    //! event ends for each broker outcome.

    use std::time::Duration;

    use super::*;
    use crate::broker::fake::{FakeBroker, refused, timeout};
    use crate::message::{DlqReason, now_ms};
    use crate::routing;

    struct Rig {
        bridge: Bridge,
        app: Arc<AppKey>,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        async fn new() -> Self {
            Self::with_spool("").await
        }

        /// A rig whose `[spool]` section has `spool` too.
        async fn with_spool(spool: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let toml = format!(
                "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n\
                 [broker]\nresponse_budget = \"400ms\"\npublish_timeout = \"100ms\"\n\
                 [spool]\ndir = {:?}\n{spool}",
                dir.path().display().to_string()
            );
            let settings = Arc::new(Settings::from_toml(&toml).unwrap());
            let metrics = Arc::new(Metrics::new());
            let spool = Arc::new(
                Spool::open(&settings.spool, 1024, metrics.clone())
                    .await
                    .unwrap(),
            );
            let broker = Arc::new(Broker::Fake(Box::default()));
            let bridge = Bridge::new(settings, broker, metrics, spool);
            let app = bridge.apps.current().get("k").unwrap().clone();
            Self {
                bridge,
                app,
                _dir: dir,
            }
        }

        fn fake(&self) -> &FakeBroker {
            match &**self.bridge.broker() {
                Broker::Fake(f) => f,
                _ => unreachable!("the rig uses the fake broker"),
            }
        }

        /// Posts one webhook with an event per channel name.
        async fn post(&self, channels: &[&str]) -> Result<Accepted, BridgeError> {
            let events: Vec<String> = channels
                .iter()
                .map(|c| format!(r#"{{"name":"channel_occupied","channel":"{c}"}}"#))
                .collect();
            self.post_events(&events).await
        }

        /// Posts one webhook with these events (JSON texts).
        async fn post_events(&self, events: &[String]) -> Result<Accepted, BridgeError> {
            let body = format!(
                r#"{{"time_ms":{},"events":[{}]}}"#,
                now_ms(),
                events.join(",")
            );
            let body = Bytes::from(body);
            self.bridge.handle(&self.app, &body).await
        }
    }

    fn subject(channel: &str) -> String {
        routing::subject("pusher", "1", "channel_occupied", channel)
    }

    fn accepted(published: usize, dead_lettered: usize, spooled: usize) -> Accepted {
        Accepted {
            published,
            dead_lettered,
            spooled,
        }
    }

    #[tokio::test]
    async fn readiness_names_a_background_task_that_is_down() {
        let rig = Rig::new().await;
        assert_eq!(rig.bridge.readiness(), Ok(()));
        rig.bridge.task_health().set("spool_drainer", true);
        let why = rig.bridge.readiness().unwrap_err();
        assert!(why.contains("spool_drainer"), "{why}");
        rig.bridge.task_health().set("spool_drainer", false);
        assert_eq!(rig.bridge.readiness(), Ok(()));
        // The sweeper is counted, not a reason to take the replica out of the load balancer.
        rig.bridge.task_health().set("retention_sweeper", true);
        assert_eq!(rig.bridge.readiness(), Ok(()));
    }

    /// The `/readyz` answers in the words of the README's operations table.
    #[tokio::test]
    async fn readiness_says_why_in_the_words_operators_read() {
        // Less room than the rig's smallest webhook (1,024 bytes): the spool takes none.
        let rig = Rig::with_spool("max_bytes = 1000\n").await;
        assert_eq!(
            rig.bridge.readiness(),
            Ok(()),
            "the broker takes the events"
        );
        rig.fake().set_up(false);
        let why = rig.bridge.readiness().unwrap_err();
        assert!(
            why.starts_with("no spool room, and the broker is not up: "),
            "{why}"
        );
        rig.fake().set_up(true);
        rig.bridge.spool().set_stalled(true);
        assert_eq!(
            rig.bridge.readiness(),
            Err("the spool is not draining although the broker is up".into())
        );
        rig.bridge.spool().set_stalled(false);
        // The broker's own loops count as much as the drainer.
        rig.bridge.task_health().set("nats_topology", true);
        assert_eq!(
            rig.bridge.readiness(),
            Err("background task(s) stopped and restarting: nats_topology".into())
        );
    }

    #[tokio::test]
    async fn readiness_is_red_for_good_once_the_spool_writer_panicked() {
        let rig = Rig::new().await;
        rig.bridge.spool().panic_writer().await;
        // The broker is up: the spool is still needed for the next outage.
        let why = rig.bridge.readiness().unwrap_err();
        assert!(why.contains("the spool writer stopped"), "{why}");
        assert!(why.contains("stops"), "{why}");
    }

    #[tokio::test]
    async fn acked_events_are_published() {
        let rig = Rig::new().await;
        assert_eq!(rig.post(&["a", "b"]).await.unwrap(), accepted(2, 0, 0));
        assert_eq!(rig.fake().published(), [subject("a"), subject("b")]);
        assert!(rig.bridge.spool().is_empty());
    }

    #[tokio::test]
    async fn a_nack_is_retried_and_a_lasting_nack_dead_lettered_within_the_budget() {
        let rig = Rig::new().await;
        rig.fake()
            .script(&subject("a"), vec![refused(DlqReason::Nacked)]);
        rig.fake()
            .script(&subject("b"), vec![refused(DlqReason::Nacked); 100]);
        let started = Instant::now();
        assert_eq!(rig.post(&["a", "b"]).await.unwrap(), accepted(1, 1, 0));
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "within the budget"
        );
        assert_eq!(rig.fake().tries(&subject("a")), 2);
        assert!(rig.fake().tries(&subject("b")) > 1);
        assert_eq!(rig.fake().published(), [subject("a")]);
        assert_eq!(
            rig.fake().dead_letters(),
            [(subject("b"), DlqReason::Nacked)]
        );
    }

    #[tokio::test]
    async fn returns_and_lasting_refusals_are_dead_lettered_at_once() {
        let rig = Rig::new().await;
        let reasons = [
            ("r", DlqReason::Unroutable),
            ("s", DlqReason::NoStream),
            ("t", DlqReason::TooLarge),
        ];
        for (c, reason) in reasons {
            rig.fake().script(&subject(c), vec![refused(reason)]);
        }
        assert_eq!(
            rig.post(&["r", "s", "t", "ok"]).await.unwrap(),
            accepted(1, 3, 0)
        );
        for (c, reason) in reasons {
            assert_eq!(rig.fake().tries(&subject(c)), 1, "{reason:?} not retried");
        }
        let mut dead = rig.fake().dead_letters();
        dead.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(dead, reasons.map(|(c, r)| (subject(c), r)));
        assert!(rig.bridge.spool().is_empty(), "nothing refused is spooled");
    }

    #[tokio::test]
    async fn a_timeout_is_retried_while_the_broker_is_up_then_spooled() {
        let rig = Rig::new().await;
        rig.fake().script(&subject("a"), vec![timeout()]);
        rig.fake().script(&subject("b"), vec![timeout(); 1000]);
        assert_eq!(rig.post(&["a", "b"]).await.unwrap(), accepted(1, 0, 1));
        assert_eq!(rig.fake().published(), [subject("a")]);
        assert!(
            rig.fake().dead_letters().is_empty(),
            "transient is not lasting"
        );
        assert_eq!(rig.bridge.spool().events(), 1);
    }

    #[tokio::test]
    async fn an_unavailable_broker_spools_at_once_and_later_webhooks_queue_behind() {
        let rig = Rig::new().await;
        rig.fake().set_up(false);
        let started = Instant::now();
        assert_eq!(rig.post(&["a", "b"]).await.unwrap(), accepted(0, 0, 2));
        assert!(started.elapsed() < Duration::from_millis(100), "no retries");
        assert_eq!(rig.fake().tries(&subject("a")), 1);
        rig.fake().set_up(true);
        // The spool holds events: the next webhook goes behind them, not past them.
        assert_eq!(rig.post(&["c"]).await.unwrap(), accepted(0, 0, 1));
        assert_eq!(rig.fake().tries(&subject("c")), 0);
        assert_eq!(rig.bridge.spool().events(), 3);
    }

    #[tokio::test]
    async fn a_dead_letter_the_dlq_cannot_take_now_is_spooled() {
        let rig = Rig::new().await;
        rig.fake()
            .script(&subject("a"), vec![refused(DlqReason::Unroutable)]);
        rig.fake().script_dead(vec![timeout(); 1000]);
        assert_eq!(rig.post(&["a"]).await.unwrap(), accepted(0, 0, 1));
        assert!(rig.fake().dead_letters().is_empty());
        assert_eq!(rig.bridge.spool().events(), 1);
    }

    /// An event without a channel: a `malformed` dead letter of the webhook.
    fn malformed() -> String {
        r#"{"name":"channel_occupied"}"#.to_string()
    }

    /// What waits on the spool, in order: (whether it is a dead letter, its subject).
    async fn spooled(rig: &Rig) -> Vec<(bool, String)> {
        let batch = rig.bridge.spool().read_batch(100).await.unwrap();
        batch
            .items
            .iter()
            .map(|item| match item {
                crate::spool::Item::Record(s) => match &s.record {
                    Record::Event(m) => (false, m.subject.clone()),
                    Record::DeadLetter(dl) => (true, dl.message.subject.clone()),
                },
                crate::spool::Item::Undecodable { error, .. } => panic!("{error}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_dead_letter_the_dlq_refuses_is_spooled_as_a_letter_not_answered_as_settled() {
        let rig = Rig::new().await;
        rig.fake()
            .script(&subject("a"), vec![refused(DlqReason::Unroutable)]);
        // One lasting refusal for the refused event's letter, one for the malformed event's.
        rig.fake().script_dead(vec![
            refused(DlqReason::NoStream),
            refused(DlqReason::NoStream),
        ]);
        let events = [
            r#"{"name":"channel_occupied","channel":"a"}"#.to_string(),
            malformed(),
        ];
        assert_eq!(rig.post_events(&events).await.unwrap(), accepted(0, 0, 2));
        assert!(rig.fake().dead_letters().is_empty());
        assert_eq!(
            spooled(&rig).await,
            [(true, subject("a")), (true, String::new())],
            "kept as the letters they are, for the drainer to place"
        );
    }

    #[tokio::test]
    async fn a_dead_letter_the_dlq_refuses_and_the_spool_cannot_take_is_not_accepted() {
        let rig = Rig::with_spool("max_bytes = 1\n").await;
        rig.fake()
            .script(&subject("a"), vec![refused(DlqReason::Unroutable)]);
        rig.fake().script_dead(vec![refused(DlqReason::NoStream)]);
        let err = rig.post(&["a"]).await.unwrap_err();
        assert!(
            matches!(
                err,
                BridgeError::NotDurable {
                    source: SpoolError::Full { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_webhook_that_finds_no_in_flight_room_within_its_budget_is_spooled() {
        let rig = Rig::new().await;
        let _all = rig.bridge.deliverer.take_all_room().await;
        let started = Instant::now();
        let events = [
            r#"{"name":"channel_occupied","channel":"a"}"#.to_string(),
            malformed(),
        ];
        assert_eq!(rig.post_events(&events).await.unwrap(), accepted(0, 0, 2));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answered by the budget"
        );
        assert_eq!(rig.fake().tries(&subject("a")), 0, "nothing sent");
        assert!(rig.fake().dead_letters().is_empty());
        assert_eq!(
            spooled(&rig).await,
            [(false, subject("a")), (true, String::new())]
        );
    }

    #[tokio::test]
    async fn the_dead_letters_of_a_webhook_do_not_wait_for_its_events() {
        let rig = Rig::new().await;
        rig.fake()
            .script(&subject("a"), vec![refused(DlqReason::Nacked)]);
        let events = [
            r#"{"name":"channel_occupied","channel":"a"}"#.to_string(),
            malformed(),
        ];
        assert_eq!(rig.post_events(&events).await.unwrap(), accepted(1, 1, 0));
        assert_eq!(
            rig.fake().acks(),
            ["dlq:".to_string(), subject("a")],
            "the malformed event's letter is acked while the event waits to be tried again"
        );
    }
}
