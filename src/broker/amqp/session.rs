//! One live connection to RabbitMQ with its publishing channels. The recovery loop in
//! [`super`] replaces a session whose connection died and repairs channels the broker closed.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use lapin::{Connection, Event};
use tokio::sync::Notify;

use super::endpoint::Endpoint;
use super::publish::{ChannelPublisher, Settling};
use super::topology;
use crate::broker::BrokerError;
use crate::broker::connection_log::ConnectionLog;
use crate::config::AmqpSettings;
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};

/// What opening a session needs; built once from the settings.
pub(crate) struct SessionConfig {
    /// `[broker.amqp]`.
    pub settings: AmqpSettings,
    /// Declare the topology on connect (`broker.declare`).
    pub declare: bool,
    /// URL, TLS and connection name.
    pub endpoint: Endpoint,
    /// Publishes allowed to await confirms on one channel.
    pub per_channel_in_flight: usize,
    /// Warnings about the connection (lost, cannot connect, back).
    pub log: Arc<ConnectionLog>,
    /// Queues that take a copy of the events (the channel state's), declared on every connect
    /// before any publish, so no event the broker takes misses them (also when RabbitMQ was
    /// away at start-up).
    pub copies: Vec<topology::BoundQueue>,
}

/// How long a channel retired after a nack stays open for the publishes in flight on it.
const RETIRED_GRACE: Duration = Duration::from_secs(5);
/// Shortest time between two replacements of retired channels: while a quorum queue still has
/// no leader a fresh channel is retired again at its first publish, and a queue that nacks
/// everything must not turn into a channel per publish.
const REPLACE_EVERY: Duration = Duration::from_millis(100);

/// What [`Session::repair`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Repaired {
    /// Channels the broker had closed, reopened.
    pub reopened: usize,
    /// Channels retired after a nack before any ack, replaced by fresh ones.
    pub replaced: usize,
}

/// A connection and its confirm-mode publishing channels.
pub(crate) struct Session {
    conn: Connection,
    publishers: Vec<RwLock<Arc<ChannelPublisher>>>,
    /// Ends the session's helper tasks (its event watcher, its channels' collectors) when the
    /// session is closed or dropped: they live and die with this one connection.
    stop: ShutdownTrigger,
    /// When retired channels were last replaced ([`REPLACE_EVERY`]).
    replaced_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Whether this session still settles after a lost connection (shared by its channels).
    settling: Arc<Settling>,
}

impl Session {
    /// Connects to the next node of `broker.amqp.url` that takes it (see
    /// [`Endpoint::connect_with`]), declares the topology there (unless told not to) and opens
    /// the channels, each node's attempt bounded by [`super::CONNECT_TIMEOUT`]. Returns the
    /// session and the position of its node. `wake` is notified when the connection reports an
    /// error or a block, so recovery starts at once. `after_loss`: an earlier connection was
    /// lost, so the session settles first ([`Settling`]).
    pub async fn open(
        cfg: &SessionConfig,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
        after_loss: bool,
    ) -> Result<(Self, usize), BrokerError> {
        cfg.endpoint
            .connect_with(super::CONNECT_TIMEOUT, |conn| {
                let settling = Arc::new(if after_loss {
                    Settling::after_loss()
                } else {
                    Settling::default()
                });
                Self::set_up(conn, cfg, wake.clone(), metrics.clone(), settling)
            })
            .await
    }

    /// Makes a session of a fresh connection; on failure closes it again (politely, bounded),
    /// so a node that took the connection but refused the topology is not left with it.
    async fn set_up(
        conn: Connection,
        cfg: &SessionConfig,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
        settling: Arc<Settling>,
    ) -> Result<Self, BrokerError> {
        let (stop, ended) = shutdown::channel();
        tokio::spawn(watch_events(
            conn.events_listener(),
            wake,
            metrics,
            cfg.log.clone(),
            ended.clone(),
        ));
        match Self::prepare(&conn, cfg, &settling, &ended).await {
            Ok(publishers) => Ok(Self {
                conn,
                publishers,
                stop,
                replaced_at: std::sync::Mutex::new(None),
                settling,
            }),
            Err(e) => {
                stop.trigger();
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    conn.close(200, "setup failed".into()),
                )
                .await;
                Err(e)
            }
        }
    }

    async fn prepare(
        conn: &Connection,
        cfg: &SessionConfig,
        settling: &Arc<Settling>,
        ended: &Shutdown,
    ) -> Result<Vec<RwLock<Arc<ChannelPublisher>>>, BrokerError> {
        Self::declare_on(conn, cfg).await?;
        let mut publishers = Vec::with_capacity(cfg.settings.channels);
        for _ in 0..cfg.settings.channels.max(1) {
            let p = ChannelPublisher::open(
                conn,
                cfg.per_channel_in_flight,
                settling.clone(),
                ended.clone(),
            )
            .await
            .map_err(|e| BrokerError::connect("cannot open a channel", e))?;
            publishers.push(RwLock::new(Arc::new(p)));
        }
        Ok(publishers)
    }

    /// Declares the topology again on this connection (an operator deleted an exchange or a
    /// queue of the bridge while it ran, `declare = true`).
    pub(crate) async fn redeclare(&self, cfg: &SessionConfig) -> Result<(), BrokerError> {
        Self::declare_on(&self.conn, cfg).await
    }

    /// The exchanges, queues and bindings (with `declare`), and the copies' queues, each on a
    /// channel of its own that is closed after.
    async fn declare_on(conn: &Connection, cfg: &SessionConfig) -> Result<(), BrokerError> {
        if cfg.declare {
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| BrokerError::topology("a channel to declare on", e))?;
            topology::declare(&channel, &cfg.settings).await?;
            let _ = channel.close(200, "topology declared".into()).await;
        }
        if !cfg.copies.is_empty() {
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| BrokerError::topology("a channel to declare on", e))?;
            for q in &cfg.copies {
                topology::declare_bound(&channel, &cfg.settings.exchange, q).await?;
            }
            let _ = channel.close(200, "queues declared".into()).await;
        }
        Ok(())
    }

    /// The connection is established (not closed, not failed).
    pub fn connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// RabbitMQ blocked the connection (resource alarm): publishes would wait for the alarm.
    pub fn blocked(&self) -> bool {
        self.conn.status().blocked()
    }

    /// Publishes can go out now: connected, not blocked by a resource alarm, and at least one
    /// channel open.
    pub(crate) fn usable(&self) -> bool {
        self.connected() && !self.blocked() && self.publishers.iter().any(|p| read(p).is_open())
    }

    /// An open channel, starting the search at `n` (round robin across calls).
    pub fn pick(&self, n: usize) -> Option<Arc<ChannelPublisher>> {
        let len = self.publishers.len();
        (0..len)
            .map(|i| read(&self.publishers[(n + i) % len]))
            .find(|p| p.is_open())
    }

    /// Reopens channels the broker closed (a channel error closes only that channel), and
    /// replaces channels retired after a nack before any ack (at most once per
    /// [`REPLACE_EVERY`]; a retired channel is closed after [`RETIRED_GRACE`]).
    pub(crate) async fn repair(
        &self,
        per_channel_in_flight: usize,
    ) -> Result<Repaired, lapin::Error> {
        let mut done = Repaired::default();
        let now = tokio::time::Instant::now();
        let may_replace = self
            .replaced_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|at| now.duration_since(at) >= REPLACE_EVERY);
        for slot in &self.publishers {
            let old = read(slot);
            if old.is_open() || (old.retired() && !may_replace) {
                continue;
            }
            let fresh = Arc::new(
                ChannelPublisher::open(
                    &self.conn,
                    per_channel_in_flight,
                    self.settling.clone(),
                    self.stop.listener(),
                )
                .await?,
            );
            *slot.write().unwrap_or_else(|e| e.into_inner()) = fresh;
            if old.retired() {
                old.close_later(RETIRED_GRACE);
                done.replaced += 1;
            } else {
                done.reopened += 1;
            }
        }
        if done.replaced > 0 {
            *self.replaced_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
        }
        Ok(done)
    }

    /// Closes the connection politely (bounded in time); a dead one is just dropped.
    pub async fn close(&self, reason: &str) {
        self.stop.trigger();
        if self.connected() {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), self.conn.close(200, reason.into()))
                    .await;
        }
    }
}

fn read(slot: &RwLock<Arc<ChannelPublisher>>) -> Arc<ChannelPublisher> {
    slot.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Follows the connection's events until the session ends: an error or a block wakes the
/// recovery loop, and an error drops the gauge at once (the loop sets it again when it has
/// recovered).
async fn watch_events(
    events: impl futures::Stream<Item = Event>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    log: Arc<ConnectionLog>,
    mut ended: Shutdown,
) {
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = ended.wait() => None,
        };
        let Some(event) = event else { return };
        match event {
            Event::Error(e) => {
                log.disconnected(Some(&e));
                metrics.set_broker_up(false);
                wake.notify_one();
            }
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(%reason, "RabbitMQ blocked the connection (resource alarm)");
                metrics.set_broker_up(false);
                wake.notify_one();
            }
            Event::ConnectionUnblocked => {
                tracing::info!("RabbitMQ unblocked the connection");
                wake.notify_one();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watcher of a connection that never reports anything again (a half-open socket)
    /// still ends with its session: it listens to the session's stop, not only to the
    /// connection's events.
    #[tokio::test]
    async fn the_event_watcher_ends_with_its_session() {
        let metrics = Arc::new(Metrics::new());
        let log = Arc::new(ConnectionLog::new(
            "RabbitMQ",
            "amqp",
            "amqp://h".into(),
            metrics.clone(),
        ));
        let (stop, ended) = shutdown::channel();
        let watcher = tokio::spawn(watch_events(
            futures::stream::pending(),
            Arc::new(Notify::new()),
            metrics,
            log,
            ended,
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!watcher.is_finished());
        drop(stop);
        tokio::time::timeout(Duration::from_secs(1), watcher)
            .await
            .expect("the watcher ended with its session")
            .expect("it did not panic");
    }
}
