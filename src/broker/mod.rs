//! The brokers behind one small enum: NATS JetStream ([`nats`]) and RabbitMQ ([`amqp`]).
//!
//! The webhook pipeline ([`crate::bridge`]) only sees [`Broker`], [`Message`], [`DeadLetter`] and
//! [`PublishError`]; each broker folder holds its connection, topology, publishing and
//! dead-letter storage. Errors say whether the failure is transient ([`PublishError::Unavailable`])
//! or the broker's lasting answer ([`PublishError::Refused`]); what to do about it (retry, spool,
//! dead-letter) is the delivery policy's call (`crate::delivery`). Unit tests put the scripted
//! in-memory `fake` broker behind the same enum, so the bridge and the drainer are tested for
//! every outcome without a server.

pub mod amqp;
pub mod cloudevents;
pub(crate) mod connection_log;
#[cfg(test)]
pub mod fake;
pub mod nats;
#[cfg(feature = "bench-null-broker")]
pub mod null;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use crate::config::{BrokerKind, Settings};
pub(crate) use crate::message::dead_letter_id;
pub use crate::message::{DeadLetter, DlqReason, Message, PublishError, headers, now_ms};
use crate::metrics::Metrics;
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::supervisor::{Supervisor, TaskHealth};
pub use status::BrokerStatus;

/// A client library's error (async-nats, lapin, std::io), kept as a [`BrokerError`]'s source.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A broker could not be set up (bad URL, unreachable, topology refused).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Connecting failed, or a connection setting (URL, TLS CA file, creds file) is unusable.
    #[error("cannot connect to the broker: {what}{}", cause(.source))]
    Connect {
        /// What failed, with the URL redacted.
        what: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker cannot do what the configuration asks (per-message TTLs on a NATS server
    /// older than 2.11, or on a stream that does not allow them): the bridge stops.
    #[error("the broker cannot do what the configuration asks: {0}")]
    Unsupported(String),
    /// Declaring streams / exchanges / queues failed, or a name is too long to declare.
    #[error("cannot declare the broker topology: {what}{}", cause(.source))]
    Topology {
        /// What was being declared.
        what: String,
        /// The broker's answer, when there is one.
        #[source]
        source: Option<BoxError>,
    },
}

impl BrokerError {
    /// A connection failure of `what`, caused by `source`.
    pub(crate) fn connect(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        BrokerError::Connect {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// A connection setting or answer that has no client error behind it.
    pub(crate) fn connect_msg(what: impl Into<String>) -> Self {
        BrokerError::Connect {
            what: what.into(),
            source: None,
        }
    }

    /// A declaration of `what` the broker refused with `source`.
    pub(crate) fn topology(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        BrokerError::Topology {
            what: what.into(),
            source: Some(source.into()),
        }
    }
}

impl BrokerError {
    /// The client's or broker's own words (the source's message, else what failed), without
    /// the "cannot connect" or "cannot declare" a [`BrokerStatus`] says itself, and without the
    /// address that this error's message names beside a source.
    pub(crate) fn cause_words(&self) -> String {
        match self {
            BrokerError::Connect {
                source: Some(source),
                ..
            }
            | BrokerError::Topology {
                source: Some(source),
                ..
            } => source.to_string(),
            BrokerError::Connect { what, .. } | BrokerError::Topology { what, .. } => what.clone(),
            BrokerError::Unsupported(why) => why.clone(),
        }
    }
}

/// `: <source>` for a message that shows its cause, or nothing: the log lines keep the client's
/// words although the error also keeps the source itself (`main` prints each cause once).
pub(crate) fn cause<E: std::fmt::Display>(source: &Option<E>) -> String {
    source
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default()
}

/// The configured broker.
pub enum Broker {
    /// NATS JetStream.
    Nats(Box<nats::NatsBroker>),
    /// RabbitMQ.
    Amqp(Box<amqp::AmqpBroker>),
    /// Benchmark only: acknowledges everything, stores nothing.
    #[cfg(feature = "bench-null-broker")]
    Null(null::NullBroker),
    /// Unit tests only: the scripted in-memory broker ([`fake`]).
    #[cfg(test)]
    Fake(Box<fake::FakeBroker>),
}

impl Broker {
    /// Connects the broker of `settings.broker.kind`. Does not wait for the broker to be
    /// reachable: the connection (and topology) comes up in the background and reconnects.
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self, BrokerError> {
        Self::connect_with(settings, metrics, Vec::new()).await
    }

    /// [`Broker::connect`], with queues that take a copy of the events on RabbitMQ (declared on
    /// every connect before any publish; the channel state's queue).
    pub(crate) async fn connect_with(
        settings: &Settings,
        metrics: Arc<Metrics>,
        copies: Vec<amqp::topology::BoundQueue>,
    ) -> Result<Self, BrokerError> {
        Ok(match settings.broker.kind {
            BrokerKind::Nats => Broker::Nats(Box::new(
                nats::NatsBroker::connect(settings, metrics).await?,
            )),
            BrokerKind::Amqp => Broker::Amqp(Box::new(
                amqp::AmqpBroker::connect(settings, metrics, copies).await?,
            )),
            #[cfg(feature = "bench-null-broker")]
            BrokerKind::Null => {
                metrics.set_broker_up(true);
                Broker::Null(null::NullBroker)
            }
        })
    }

    /// Whether the broker is connected (and its topology declared) right now.
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Nats(b) => b.is_up(),
            Broker::Amqp(b) => b.is_up(),
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(b) => b.is_up(),
            #[cfg(test)]
            Broker::Fake(b) => b.is_up(),
        }
    }

    /// Publishes one event and waits up to `timeout` for the broker's ack.
    pub async fn publish(&self, msg: &Message, timeout: Duration) -> Result<(), PublishError> {
        match self {
            Broker::Nats(b) => b.publish(msg, timeout).await,
            Broker::Amqp(b) => b.publish(msg, timeout).await,
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(b) => b.publish(msg, timeout).await,
            #[cfg(test)]
            Broker::Fake(b) => b.publish(msg, timeout).await,
        }
    }

    /// Publishes `msgs` so that the broker stores them in this order, all in flight at once and
    /// their acks awaited together (every path's first try, `crate::delivery`). NATS: after the
    /// first one that cannot be sent, the rest are not sent, so none overtakes it. RabbitMQ:
    /// on one channel, whose confirms keep the order.
    pub(crate) async fn publish_in_order(
        &self,
        msgs: &[&Message],
        timeout: Duration,
    ) -> Vec<Result<(), PublishError>> {
        match self {
            Broker::Nats(b) => b.publish_in_order(msgs, timeout).await,
            Broker::Amqp(b) => b.publish_in_order(msgs, timeout).await,
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(_) => msgs.iter().map(|_| Ok(())).collect(),
            #[cfg(test)]
            Broker::Fake(b) => b.publish_in_order(msgs, timeout).await,
        }
    }

    /// Publishes one dead letter to the dead-letter stream / queue and waits for the ack.
    pub async fn publish_dead_letter(
        &self,
        dl: &DeadLetter,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        match self {
            Broker::Nats(b) => b.publish_dead_letter(dl, timeout).await,
            Broker::Amqp(b) => b.publish_dead_letter(dl, timeout).await,
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(b) => b.publish_dead_letter(dl, timeout).await,
            #[cfg(test)]
            Broker::Fake(b) => b.publish_dead_letter(dl, timeout).await,
        }
    }

    /// Waits until the broker's streams have been declared once (NATS; at once otherwise), so a
    /// side task that reads them does not race the declaration at start-up.
    pub(crate) async fn streams_ready(&self) {
        if let Broker::Nats(b) = self {
            b.streams_ready().await;
        }
    }

    /// Resolves when the broker finds it cannot do what the configuration asks; the bridge
    /// then stops with this error. Pending for ever otherwise.
    pub(crate) async fn fatal(&self) -> BrokerError {
        match self {
            Broker::Nats(b) => b.fatal().await,
            _ => std::future::pending().await,
        }
    }

    /// Whether the broker's connection is on its way: not up yet, and nothing has failed since
    /// the attempt began (the webhook path waits a little for it right after a start).
    pub(crate) fn is_connecting(&self) -> bool {
        self.status() == BrokerStatus::Connecting
    }

    /// Up, or why not (connecting, JetStream off, unreachable, refused, not declared,
    /// blocked): for `/readyz` and the answer to a webhook whose events were spooled.
    pub fn status(&self) -> BrokerStatus {
        match self {
            Broker::Nats(b) => b.status(),
            Broker::Amqp(b) => b.status(),
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(_) => BrokerStatus::Up,
            #[cfg(test)]
            Broker::Fake(b) if b.is_up() => BrokerStatus::Up,
            #[cfg(test)]
            Broker::Fake(_) => BrokerStatus::Unreachable("the fake broker is down".into()),
        }
    }

    /// The broker's own loops that are down right now (for `/readyz`).
    pub(crate) fn tasks_down(&self) -> Vec<&'static str> {
        match self {
            Broker::Nats(b) => b.tasks_down(),
            Broker::Amqp(b) => b.tasks_down(),
            #[cfg(any(test, feature = "bench-null-broker"))]
            _ => Vec::new(),
        }
    }

    /// Waits until the broker is up or `timeout` passes; true when up.
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_up() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Flushes and closes the connection (on shutdown).
    pub async fn close(&self) {
        match self {
            Broker::Nats(b) => b.close().await,
            Broker::Amqp(b) => b.close().await,
            #[cfg(feature = "bench-null-broker")]
            Broker::Null(b) => b.close().await,
            #[cfg(test)]
            Broker::Fake(_) => {}
        }
    }
}

/// A broker's own background loops (NATS: the topology loop; RabbitMQ: the recovery loop)
/// under a supervisor of their own ([`crate::supervisor`]): started again if one ends or
/// panics (counted in `pusher_bridge_task_restarts_total`, `/readyz` red meanwhile), stopped by
/// the broker's own shutdown signal on close (or when the broker is dropped) and awaited,
/// never aborted. The brokers are built before the bridge's supervisor exists, and tools
/// (`dlq`, `sweep`) use them without one.
pub(crate) struct BrokerTasks {
    stop: std::sync::Mutex<Option<ShutdownTrigger>>,
    supervisor: std::sync::Mutex<Option<Supervisor>>,
    health: TaskHealth,
}

impl BrokerTasks {
    /// Loops reporting their restarts to `metrics`.
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        let (trigger, shutdown) = crate::shutdown::channel();
        let health = TaskHealth::default();
        Self {
            stop: std::sync::Mutex::new(Some(trigger)),
            supervisor: std::sync::Mutex::new(Some(Supervisor::new(
                shutdown,
                metrics,
                health.clone(),
            ))),
            health,
        }
    }

    /// Starts `task` as `name` (see [`Supervisor::spawn`]).
    pub(crate) fn spawn<F, Fut>(&self, name: &'static str, task: F)
    where
        F: Fn(Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut guard = self
            .supervisor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(supervisor) = guard.as_mut() {
            supervisor.spawn(name, task);
        }
    }

    /// Signals the loops to stop and waits for them (at most 2 s).
    pub(crate) async fn stop(&self) {
        let trigger = self
            .stop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(trigger) = trigger {
            trigger.trigger();
        }
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(supervisor) = supervisor {
            supervisor.join(Duration::from_secs(2)).await;
        }
    }

    /// The loops that are down right now.
    pub(crate) fn down(&self) -> Vec<&'static str> {
        self.health.down()
    }
}
