//! RabbitMQ (AMQP 0-9-1) through lapin: the same contract as the NATS broker (routing keys,
//! bodies, ids, refusals), with publisher confirms and `mandatory` publishes.
//!
//! - `endpoint`: the nodes of `broker.amqp.url` (one URL or several), TLS (`amqps://`, rustls
//!   with ring, `broker.amqp.tls_ca_file`), client properties, and opening a connection to the
//!   next node that takes it (also for the `dlq` tools, the sweeper and the state applier).
//! - [`topology`]: exchanges, queues and bindings declared on every (re)connect.
//! - `session`: one connection and its `broker.amqp.channels` publishing channels.
//! - [`publish`]: pipelined publishes per channel, confirms and returns.
//! - [`message`]: routing key, properties and headers.
//!
//! A background loop (`recovery_loop`: `Shared::recover_once` on an interval and on connection
//! events) connects, declares, and replaces the session when RabbitMQ restarts or closes the
//! connection, with backoff. With several nodes, each (re)connect is one round over them,
//! starting after the node tried last, so a lost node is tried again only after the others; a
//! round in which every node failed is one failure for the backoff. The bridge therefore
//! starts while RabbitMQ is down; `is_up()` and `pusher_bridge_broker_up` follow the session.

pub(crate) mod endpoint;
pub mod message;
pub mod publish;
pub(crate) mod session;
pub mod topology;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::types::ShortString;
use tokio::sync::Notify;

use self::publish::{ChannelPublisher, Outgoing};
use self::session::{Session, SessionConfig};
use super::status::{BrokerStatus, StatusCell};
use super::{BrokerError, BrokerTasks, DeadLetter, DlqReason, Message, PublishError};
use crate::backoff::Backoff;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::routing;
use crate::shutdown::Shutdown;

/// Longest a connection attempt on one node (TCP, TLS, AMQP handshake, declarations, channels)
/// may take; a round over several nodes gives each this long.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed connection attempt; doubles up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between connection attempts while RabbitMQ is down.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a publish looks again for an open channel while the connection's channels are
/// being reopened.
const CHANNEL_WAIT_STEP: Duration = Duration::from_millis(5);
/// How often a healthy session is checked (connection events also wake the loop at once).
pub(crate) const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// The RabbitMQ broker.
pub struct AmqpBroker {
    shared: Arc<Shared>,
    /// The recovery loop, under the broker's own supervisor (stopped and awaited on close).
    tasks: BrokerTasks,
}

/// State shared by the broker handle and its recovery loop.
struct Shared {
    cfg: SessionConfig,
    prefix: String,
    exchange: ShortString,
    dlq_exchange: ShortString,
    session: RwLock<Option<Arc<Session>>>,
    /// Round-robin position over the channels.
    next: AtomicUsize,
    /// Wakes the recovery loop (connection error, closed channel).
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// `broker.cloudevents`: event messages carry `ce-` headers.
    cloudevents: bool,
    /// With `declare = true`: a publish found an exchange or queue of the bridge missing; the
    /// recovery loop declares the topology again.
    redeclare: std::sync::atomic::AtomicBool,
    /// What the last connect attempt said (for [`AmqpBroker::status`]).
    status: StatusCell,
    /// A session was up once: every later one follows a lost connection and settles first
    /// (`publish::Settling`).
    ever_up: std::sync::atomic::AtomicBool,
}

impl AmqpBroker {
    /// Checks the settings (URL, CA file) and starts the recovery loop; returns at once, before
    /// RabbitMQ is reached. `copies`: queues bound to the events exchange that every connect
    /// declares before it publishes ([`topology::BoundQueue`]).
    pub async fn connect(
        settings: &Settings,
        metrics: Arc<Metrics>,
        copies: Vec<topology::BoundQueue>,
    ) -> Result<Self, BrokerError> {
        let s = settings.broker.amqp.clone();
        let endpoint =
            endpoint::Endpoint::new(&s, &s.connection_name, endpoint::DEFAULT_HEARTBEAT_SECS)
                .await?;
        let exchange = topology::name("broker.amqp.exchange", &s.exchange)?;
        let dlq_exchange = topology::name("broker.amqp.dlq_exchange", &s.dlq_exchange)?;
        let channels = s.channels.max(1);
        // Until a node is reached the log names the whole list; then the node it is on.
        let log = Arc::new(super::connection_log::ConnectionLog::new(
            "RabbitMQ",
            "amqp",
            endpoint.shown().to_string(),
            metrics.clone(),
        ));
        let cfg = SessionConfig {
            log,
            endpoint,
            per_channel_in_flight: settings.broker.max_in_flight.div_ceil(channels).max(1),
            declare: settings.broker.declare,
            settings: s,
            copies,
        };
        let shared = Arc::new(Shared {
            cfg,
            prefix: settings.broker.subject_prefix.clone(),
            exchange,
            dlq_exchange,
            session: RwLock::new(None),
            next: AtomicUsize::new(0),
            wake: Arc::new(Notify::new()),
            metrics,
            cloudevents: settings.broker.cloudevents,
            redeclare: std::sync::atomic::AtomicBool::new(false),
            status: StatusCell::default(),
            ever_up: std::sync::atomic::AtomicBool::new(false),
        });
        shared.metrics.set_broker_up(false);
        let tasks = BrokerTasks::new(shared.metrics.clone());
        let loop_shared = shared.clone();
        tasks.spawn(crate::metrics::task::AMQP_RECOVERY, move |shutdown| {
            recovery_loop(loop_shared.clone(), shutdown)
        });
        Ok(Self { shared, tasks })
    }

    /// The broker's own loops that are down right now.
    pub(crate) fn tasks_down(&self) -> Vec<&'static str> {
        self.tasks.down()
    }

    /// Up, or why not: blocked by a resource alarm, or what the last connect attempt said.
    pub(crate) fn status(&self) -> BrokerStatus {
        if self.is_up() {
            return BrokerStatus::Up;
        }
        if self
            .shared
            .current()
            .is_some_and(|s| s.connected() && s.blocked())
        {
            return BrokerStatus::Blocked;
        }
        self.shared.status.not_up()
    }

    /// Connected, not blocked, and at least one channel open.
    pub fn is_up(&self) -> bool {
        self.shared.is_up()
    }

    /// `broker.amqp.connection_name`, as RabbitMQ lists the connection.
    pub fn connection_name(&self) -> &str {
        &self.shared.cfg.settings.connection_name
    }

    /// Publishes one event to `broker.amqp.exchange`; `Ok` once RabbitMQ confirmed it and did
    /// not return it.
    pub async fn publish(&self, msg: &Message, timeout: Duration) -> Result<(), PublishError> {
        let out = Outgoing {
            exchange: self.shared.exchange.clone(),
            routing_key: message::routing_key(&msg.subject)?,
            msg_id: msg.msg_id.clone(),
            body: msg.body.clone(),
            properties: message::event_properties(
                msg,
                message::now_secs(),
                self.shared.cloudevents,
            ),
        };
        self.shared.send(out, timeout).await
    }

    /// Publishes `msgs` in this order on one channel, all in flight at once, and waits for every
    /// confirm together until `timeout`: every path's first try ([`crate::delivery`]), in the
    /// webhook's or the spool's order, at pipeline speed.
    pub(crate) async fn publish_in_order(
        &self,
        msgs: &[&Message],
        timeout: Duration,
    ) -> Vec<Result<(), PublishError>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let publisher = match self.shared.pick_or_wait(deadline).await {
            Ok(p) => p,
            Err(e) => return msgs.iter().map(|_| Err(e.clone())).collect(),
        };
        let now = message::now_secs();
        let enqueued: Vec<_> = msgs
            .iter()
            .map(|msg| {
                let out = Outgoing {
                    exchange: self.shared.exchange.clone(),
                    routing_key: message::routing_key(&msg.subject)?,
                    msg_id: msg.msg_id.clone(),
                    body: msg.body.clone(),
                    properties: message::event_properties(msg, now, self.shared.cloudevents),
                };
                publisher.enqueue(out)
            })
            .collect();
        let results = futures::future::join_all(
            enqueued
                .into_iter()
                .map(|e| async move { publish::ChannelPublisher::verdict(e?, deadline).await }),
        )
        .await;
        if !publisher.is_open() {
            self.shared.wake.notify_one();
        }
        results.into_iter().map(|r| self.shared.judge(r)).collect()
    }

    /// Publishes one dead letter to `broker.amqp.dlq_exchange` with routing key
    /// `<prefix>_dlq.<app>.<reason>`.
    pub async fn publish_dead_letter(
        &self,
        dl: &DeadLetter,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let m = &dl.message;
        let subject = routing::dlq_subject(&self.shared.prefix, &m.app_id, dl.reason.as_str());
        let out = Outgoing {
            exchange: self.shared.dlq_exchange.clone(),
            routing_key: message::routing_key(&subject)?,
            msg_id: super::dead_letter_id(&m.msg_id),
            body: m.body.clone(),
            properties: message::dead_letter_properties(dl, message::now_secs()),
        };
        self.shared.send(out, timeout).await
    }

    /// Stops the recovery loop and closes the connection.
    pub async fn close(&self) {
        self.tasks.stop().await;
        let session = self.shared.take_session();
        if let Some(s) = session {
            s.close("pusher-bridge shutting down").await;
        }
        self.shared.metrics.set_broker_up(false);
    }
}

impl Shared {
    fn current(&self) -> Option<Arc<Session>> {
        self.session
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn take_session(&self) -> Option<Arc<Session>> {
        self.session
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn is_up(&self) -> bool {
        self.current().is_some_and(|s| s.usable())
    }

    fn connected(&self) -> bool {
        self.current().is_some_and(|s| s.connected())
    }

    fn pick(&self) -> Option<Arc<ChannelPublisher>> {
        let session = self.current()?;
        if !session.usable() {
            return None;
        }
        session.pick(self.next.fetch_add(1, Ordering::Relaxed))
    }

    async fn send(&self, out: Outgoing, timeout: Duration) -> Result<(), PublishError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let publisher = self.pick_or_wait(deadline).await?;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let result = publisher.publish(out, remaining).await;
        if !publisher.is_open() {
            // The broker closed the channel (or the connection): repair now, not at the next
            // health check.
            self.wake.notify_one();
        }
        self.judge(result)
    }

    /// With `declare = true` the bridge owns its exchanges and queues: a publish that finds
    /// one missing (`no_stream`: the exchange; `unroutable`: the queue bound to all of it) means
    /// an operator deleted it while the bridge ran. The recovery loop declares them again and
    /// the event is tried again or spooled (`Unavailable`) instead of dead-lettered.
    fn judge(&self, result: Result<(), PublishError>) -> Result<(), PublishError> {
        match result {
            Err(PublishError::Refused {
                reason: DlqReason::NoStream | DlqReason::Unroutable,
                detail,
            }) if self.cfg.declare => {
                if !self.redeclare.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        exchange = %self.cfg.settings.exchange,
                        queue = %self.cfg.settings.queue,
                        %detail,
                        "an exchange or queue of the bridge is gone (deleted?): declaring it again"
                    );
                }
                self.wake.notify_one();
                Err(PublishError::Unavailable(format!(
                    "{detail}; the bridge declares its topology again"
                )))
            }
            other => other,
        }
    }

    /// An open channel. When the connection is up but every channel was closed by a channel
    /// error (the recovery loop reopens them within milliseconds), waits for one until
    /// `deadline`; without a connection, or with a blocked one, it fails at once.
    async fn pick_or_wait(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<ChannelPublisher>, PublishError> {
        loop {
            if let Some(p) = self.pick() {
                return Ok(p);
            }
            let waitable = self
                .current()
                .is_some_and(|s| s.connected() && !s.blocked());
            if !waitable || tokio::time::Instant::now() >= deadline {
                return Err(PublishError::Unavailable(
                    "not connected to RabbitMQ".into(),
                ));
            }
            self.wake.notify_one();
            tokio::time::sleep(CHANNEL_WAIT_STEP).await;
        }
    }

    async fn recover_once(&self) -> bool {
        match self.current() {
            Some(s) if s.connected() => {
                if self.redeclare.load(Ordering::SeqCst) {
                    match s.redeclare(&self.cfg).await {
                        Ok(()) => {
                            self.redeclare.store(false, Ordering::SeqCst);
                            tracing::info!(exchange = %self.cfg.settings.exchange, "declared the topology again");
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot declare the topology again"),
                    }
                }
                match s.repair(self.cfg.per_channel_in_flight).await {
                    Ok(done) => {
                        if done.reopened > 0 {
                            tracing::info!(channels = done.reopened, "reopened AMQP channels");
                        }
                        if done.replaced > 0 {
                            // Debug only: a queue that nacks everything would repeat it.
                            tracing::debug!(
                                channels = done.replaced,
                                "replaced AMQP channels nacked before any ack"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot reopen an AMQP channel"),
                }
            }
            _ => {
                if let Some(old) = self.take_session() {
                    self.cfg.log.disconnected(None);
                    self.status
                        .set(BrokerStatus::Unreachable("connection lost".into()));
                    old.close("reconnecting").await;
                }
                // One round over the nodes, each attempt bounded by CONNECT_TIMEOUT: for the
                // backoff in `recovery_loop`, a round that failed everywhere is one failure.
                let after_loss = self.ever_up.load(Ordering::Relaxed);
                let opened = Session::open(
                    &self.cfg,
                    self.wake.clone(),
                    self.metrics.clone(),
                    after_loss,
                )
                .await;
                match opened {
                    Ok((session, node)) => {
                        *self.session.write().unwrap_or_else(|e| e.into_inner()) =
                            Some(Arc::new(session));
                        self.ever_up.store(true, Ordering::Relaxed);
                        let endpoint = &self.cfg.endpoint;
                        let url = endpoint.node_shown(node);
                        // From now on "lost the connection" names this node.
                        self.cfg.log.set_address(url.to_string());
                        tracing::info!(
                            url = %url,
                            node = node + 1,
                            nodes = endpoint.len(),
                            connection_name = %self.cfg.settings.connection_name,
                            exchange = %self.cfg.settings.exchange,
                            declared = self.cfg.declare,
                            "connected to RabbitMQ"
                        );
                        self.status.set(BrokerStatus::Up);
                        self.cfg.log.connected();
                    }
                    Err(e) => {
                        // The error names every node it tried; the warning names the list.
                        self.cfg
                            .log
                            .set_address(self.cfg.endpoint.shown().to_string());
                        self.status.set(open_failure(&e));
                        self.cfg.log.connect_failed(&e);
                    }
                }
            }
        }
        let up = self.is_up();
        self.metrics.set_broker_up(up);
        up
    }
}

/// What a failed [`Session::open`] says about RabbitMQ: it refused the bridge (`ACCESS_REFUSED`:
/// a wrong user or password, or no permission on the vhost; `NOT_ALLOWED`: no such vhost; any
/// other answer to the login), it answered but the topology cannot be declared, or nothing
/// answered (an IO error). The words are lapin's (RabbitMQ's own for a refusal), not the
/// error's message, which names the address.
fn open_failure(e: &BrokerError) -> BrokerStatus {
    use lapin::ErrorKind;
    let mut next = std::error::Error::source(e);
    let mut lapin_error = None;
    while let Some(err) = next {
        if let Some(l) = err.downcast_ref::<lapin::Error>() {
            lapin_error = Some(l);
            break;
        }
        next = err.source();
    }
    let words = lapin_error.map_or_else(|| e.cause_words(), ToString::to_string);
    match (e, lapin_error.map(lapin::Error::kind)) {
        (_, Some(ErrorKind::ProtocolError(answer))) if is_refusal(answer) => {
            BrokerStatus::Refused(words)
        }
        (
            BrokerError::Connect { .. },
            Some(
                ErrorKind::ProtocolError(_)
                | ErrorKind::AuthProviderError(_)
                | ErrorKind::InvalidProtocolVersion(_),
            ),
        ) => BrokerStatus::Refused(words),
        (BrokerError::Topology { .. } | BrokerError::Unsupported(_), _) => {
            BrokerStatus::NotDeclared(words)
        }
        _ => BrokerStatus::Unreachable(words),
    }
}

/// RabbitMQ's answers to a login it refuses or a vhost it does not have.
fn is_refusal(answer: &lapin::protocol::AMQPError) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    matches!(
        answer.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
    )
}

/// Keeps a session up: [`Shared::recover_once`] right away, then every [`HEALTH_INTERVAL`] (or
/// at once when a connection event or a closed channel wakes it) while connected, and with
/// jittered exponential backoff while not (wake-ups do not shorten the backoff, so a burst of webhooks
/// cannot turn into a reconnect storm). A connected but blocked session is checked on the
/// health interval, so the gauge follows an unblock promptly. One `recover_once` without a
/// session is one round over every node of `broker.amqp.url`, so a failover to a live node
/// happens at once (no backoff before it) and only a round that failed everywhere backs off.
async fn recovery_loop(shared: Arc<Shared>, mut shutdown: Shutdown) {
    let backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let mut failures = 0;
    loop {
        if shutdown.is_triggered() {
            return;
        }
        // A connect in progress (up to its timeout) must not hold up a close.
        let up = tokio::select! {
            () = shutdown.wait() => return,
            up = shared.recover_once() => up,
        };
        if up || shared.connected() {
            failures = 0;
            tokio::select! {
                () = shutdown.wait() => return,
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            }
        } else {
            failures += 1;
            tokio::select! {
                () = shutdown.wait() => return,
                _ = tokio::time::sleep(backoff.delay(failures)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPHardError, AMQPSoftError};

    use super::*;

    fn answer(kind: lapin::protocol::AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn refusals_silence_and_declarations_are_told_apart() {
        let login = answer(
            AMQPSoftError::ACCESSREFUSED.into(),
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN",
        );
        let vhost = answer(
            AMQPHardError::NOTALLOWED.into(),
            "NOT_ALLOWED - vhost nope not found",
        );
        for e in [login.clone(), vhost] {
            let status = open_failure(&BrokerError::connect("amqp://g:***@h/%2f", e));
            assert!(matches!(status, BrokerStatus::Refused(_)), "{status:?}");
            assert!(
                !status.error().unwrap_or("").contains("amqp://"),
                "{status:?}"
            );
        }
        let reset: lapin::Error =
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert!(matches!(
            open_failure(&BrokerError::connect("amqp://h", reset)),
            BrokerStatus::Unreachable(_)
        ));
        let precondition = answer(
            AMQPSoftError::PRECONDITIONFAILED.into(),
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'",
        );
        assert!(matches!(
            open_failure(&BrokerError::topology("queue q", precondition)),
            BrokerStatus::NotDeclared(_)
        ));
        // No permission to declare is a refusal too.
        assert!(matches!(
            open_failure(&BrokerError::topology("exchange e", login)),
            BrokerStatus::Refused(_)
        ));
    }
}
