//! pusher-bridge receives Pusher Channels webhooks, authenticates them, and publishes every
//! event to NATS JetStream or RabbitMQ on `<prefix>.<app_id>.<event>.<channel>`.
//!
//! How the crate is laid out, following one webhook:
//! - [`config`]: typed settings (defaults < TOML < `PUSHER_BRIDGE_*` env), secrets redacted.
//! - [`http`]: hyper server, routes, limits, the HTTP-only refusals and the mapping of every
//!   refusal to its status code.
//! - [`webhook`]: app lookup by key and HMAC signature check (called by `http`), borrowed
//!   parsing of the body, and the messages and dead letters its events become.
//! - [`routing`]: subjects / routing keys, token escaping, deterministic message ids.
//! - [`bridge`]: the pipeline shared by all brokers: publish concurrently, await every ack,
//!   dead-letter refusals, answer only when every event is durable.
//! - [`broker`]: [`broker::Broker`] over [`broker::nats`] and [`broker::amqp`].
//! - `delivery`: the delivery policy (retry, spool or dead-letter after a failed publish) that
//!   the webhook path and the spool drainer share.
//! - [`spool`]: the local durable spool for events the broker cannot take, and its drainer.
//! - [`metrics`]: every Prometheus family, named in one place.
//! - [`dlq`]: the `dlq list` / `dlq replay` tools over the dead letters both brokers store.
//! - [`probe`] and [`sendtest`]: the client side of the `healthcheck` and `send-test` commands.
//! - [`retention`]: the retention rules (per app, per event) that the sweeper purges by and
//!   that per-message TTLs are stamped from.
//! - [`sweeper`]: the retention sweeper (trims old events and dead letters) and its lease.
//! - [`shutdown`]: the stop signal background tasks select on.
//! - [`logging`]: the log output, every configured secret masked in every line.
//! - [`state`]: channel state (occupancy, subscription counts, presence members) in NATS KV,
//!   applied from a durable copy of the events and served with Pusher's HTTP API paths.
//!
//! [`run`] is the whole server: tests bind a listener on port 0 and pass a shutdown future.
//! The types an embedder or a test names most ([`Settings`], [`Bridge`], [`Accepted`],
//! [`Broker`], [`Message`], [`Metrics`], [`Spool`] and their errors) are re-exported here; the rest of each module is
//! `pub(crate)` unless the binary, the tests or the examples need it.

pub mod bridge;
pub mod broker;
pub mod config;
mod delivery;
pub mod dlq;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod probe;
pub mod retention;
pub mod routing;
pub mod sendtest;
pub mod shutdown;
pub mod spool;
pub mod state;
pub mod sweeper;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use crate::bridge::{Accepted, Bridge, WebhookError};
pub use crate::broker::{Broker, BrokerError, Message};
pub use crate::config::Settings;
pub use crate::metrics::Metrics;
use crate::spool::drain::Drainer;
pub use crate::spool::{Spool, SpoolError};

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The broker could not be set up.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The spool directory could not be opened (or another process holds it).
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The channel state (`[state]`) could not be set up.
    #[error(transparent)]
    State(#[from] state::StateError),
}

/// Opens the spool, connects the broker and builds the webhook pipeline (no listener yet, no
/// background tasks).
pub async fn build(settings: Settings) -> Result<Arc<Bridge>, StartError> {
    let settings = Arc::new(settings);
    let metrics = Arc::new(Metrics::new());
    metrics.init_known_series(&settings);
    let spool = Arc::new(
        Spool::open(
            &settings.spool,
            settings.server.max_body_bytes,
            metrics.clone(),
        )
        .await?,
    );
    let broker = Arc::new(Broker::connect(&settings, metrics.clone()).await?);
    Ok(Arc::new(Bridge::new(settings, broker, metrics, spool)))
}

/// Runs the bridge on `listener` until `shutdown` completes: serves webhooks and drains the
/// spool in the background; on shutdown lets in-flight webhooks finish, stops the background
/// tasks and closes the broker connection. Spooled events stay on disk for the next start.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    if settings.apps.is_empty() {
        tracing::warn!("no [[apps]] configured: every webhook will be refused with 401");
    }
    let bridge = build(settings).await?;
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        path = %bridge.settings().server.webhook_path,
        broker = ?bridge.settings().broker.kind,
        "pusher-bridge serving"
    );
    // Background tasks stop when `shutdown` completes (or `serve` returns and drops the trigger).
    let (stop_background, background) = shutdown::channel();
    let sweeper = sweeper::spawn(
        Arc::new(bridge.settings().clone()),
        bridge.metrics().clone(),
        background.clone(),
    );
    let drainer = Drainer::new(
        bridge.spool().clone(),
        bridge.broker().clone(),
        bridge.metrics().clone(),
        bridge.settings().broker.publish_timeout,
        bridge.settings().spool.drain_interval,
    );
    let (state_api, state_task) = start_state(
        bridge.settings(),
        bridge.metrics(),
        bridge.broker(),
        &background,
    )
    .await?;
    let drainer = tokio::spawn(drainer.run(background));
    // The server stops when `shutdown` completes, or when the broker finds it cannot do what
    // the configuration asks (the error is then `run`'s answer; the spool keeps what waits).
    let (fatal_tx, mut fatal_rx) = tokio::sync::oneshot::channel();
    let broker = bridge.broker().clone();
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            e = broker.fatal() => {
                let _ = fatal_tx.send(e);
            }
        }
        stop_background.trigger();
    };
    http::serve_with_state(listener, bridge.clone(), state_api, shutdown).await;
    if let Some(task) = state_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    let wait = std::time::Duration::from_secs(5);
    if tokio::time::timeout(wait, drainer).await.is_err() {
        tracing::warn!("the spool drainer did not stop in time");
    }
    if let Some(task) = sweeper {
        let _ = tokio::time::timeout(wait, task).await;
    }
    bridge.spool().close().await;
    bridge.broker().close().await;
    match fatal_rx.try_recv() {
        Ok(e) => Err(e.into()),
        Err(_) => Ok(()),
    }
}

/// With `[state] enabled`: connects to the KV's NATS (and, for a NATS broker at another URL, to
/// the events' NATS), declares the AMQP state queue before any webhook is served, and spawns the
/// applier. Returns the query API and the task.
async fn start_state(
    settings: &Settings,
    metrics: &Arc<Metrics>,
    broker: &Arc<Broker>,
    background: &shutdown::Shutdown,
) -> Result<
    (
        Option<state::api::SharedApi>,
        Option<tokio::task::JoinHandle<()>>,
    ),
    StartError,
> {
    if !settings.state.enabled {
        return Ok((None, None));
    }
    let kv_settings = state::kv_nats_settings(settings);
    let kv = state::connect(&kv_settings).await?;
    let events = match settings.broker.kind {
        config::BrokerKind::Amqp => {
            // The broker declares the state queue on every connect, before it publishes
            // (`broker::amqp::session`); the applier declares it again when it connects.
            None
        }
        _ if kv_settings.url == settings.broker.nats.url => Some(kv.clone()),
        _ => Some(state::connect(&settings.broker.nats).await?),
    };
    let api = Arc::new(state::StateApi::new(settings, kv.clone()));
    let task = tokio::spawn(state::run(
        Arc::new(settings.clone()),
        kv,
        events,
        broker.clone(),
        metrics.clone(),
        background.clone(),
    ));
    Ok((Some(api), Some(task)))
}
