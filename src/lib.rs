//! pusher-bridge receives Pusher Channels webhooks, authenticates them, and publishes every
//! event to NATS JetStream or RabbitMQ on `<prefix>.<app_id>.<event>.<channel>`.
//!
//! How the crate is laid out, following one webhook:
//! - [`config`]: typed settings (defaults < TOML < `PUSHER_BRIDGE_*` env), secrets redacted.
//! - [`http`]: hyper server, routes, limits and the mapping of errors to status codes.
//! - [`webhook`]: app lookup by key, HMAC signature check, borrowed parsing of the body.
//! - [`routing`]: subjects / routing keys, token escaping, deterministic message ids.
//! - [`bridge`]: the pipeline shared by all brokers: publish concurrently, await every ack,
//!   dead-letter refusals, answer only when every event is durable.
//! - [`broker`]: [`broker::Broker`] over [`broker::nats`] and [`broker::amqp`].
//! - [`metrics`]: every Prometheus family, named in one place.
//! - [`dlq`]: the `dlq list` / `dlq replay` tools over the dead letters both brokers store.
//! - [`probe`] and [`sendtest`]: the client side of the `healthcheck` and `send-test` commands.
//! - [`sweeper`]: the retention sweeper (trims old events and dead letters) and its lease.
//! - [`shutdown`]: the stop signal background tasks select on.
//!
//! [`run`] is the whole server: tests bind a listener on port 0 and pass a shutdown future.

pub mod bridge;
pub mod broker;
pub mod config;
pub mod dlq;
pub mod http;
pub mod metrics;
pub mod probe;
pub mod routing;
pub mod sendtest;
pub mod shutdown;
pub mod sweeper;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::bridge::Bridge;
use crate::broker::{Broker, BrokerError};
use crate::config::Settings;
use crate::metrics::Metrics;

/// Connects the broker and builds the webhook pipeline (no listener yet).
pub async fn build(settings: Settings) -> Result<Arc<Bridge>, BrokerError> {
    let settings = Arc::new(settings);
    let metrics = Arc::new(Metrics::new());
    let broker = Arc::new(Broker::connect(&settings, metrics.clone()).await?);
    Ok(Arc::new(Bridge::new(settings, broker, metrics)))
}

/// Runs the bridge on `listener` until `shutdown` completes, then drains in-flight webhooks and
/// closes the broker connection.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
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
    let shutdown = async move {
        shutdown.await;
        stop_background.trigger();
    };
    http::serve(listener, bridge.clone(), shutdown).await;
    if let Some(task) = sweeper {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    bridge.broker().close().await;
    Ok(())
}
