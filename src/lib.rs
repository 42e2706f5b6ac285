//! pusher-bridge receives Pusher Channels webhooks, authenticates them, and publishes every
//! event to NATS JetStream or RabbitMQ on `<prefix>.<app_id>.<event>.<channel>`.
//!
//! How the crate is laid out, following one webhook:
//! - `backoff`: the one jittered backoff of every retry loop (ground floor too).
//! - [`message`]: the ground floor, importing nothing of the crate: messages, dead letters and
//!   their headers, publish errors, Pusher's event names.
//! - [`config`]: typed settings (defaults < TOML < `PUSHER_BRIDGE_*` env), secrets redacted.
//! - [`http`]: hyper server, routes, limits, the HTTP-only refusals and the mapping of every
//!   refusal to its status code.
//! - [`webhook`]: app lookup by key (asked by `http`), the HMAC signature check and the
//!   borrowed parsing of the body (asked by `bridge`, on the blocking pool for a large body),
//!   and the messages and dead letters its events become.
//! - [`routing`]: subjects / routing keys, token escaping, deterministic message ids.
//! - [`bridge`]: the pipeline shared by all brokers: publish concurrently, await every ack,
//!   dead-letter refusals, answer only when every event is durable.
//! - [`broker`]: [`broker::Broker`] over [`broker::nats`] and [`broker::amqp`].
//! - `delivery`: the one deliverer (publish in order, retry, keep or dead-letter after a failed
//!   publish) that the webhook path, the spool drainer and `dlq replay` drive the broker with,
//!   each with its policy; `refusals`: lasting refusals said in the log, once a minute per
//!   reason at most.
//! - [`spool`]: the local durable spool for events the broker cannot take, and its drainer.
//! - [`metrics`]: every Prometheus family, named in one place.
//! - [`dlq`]: the `dlq list` / `dlq replay` / `dlq purge` tools over the dead letters both
//!   brokers store.
//! - [`probe`] and [`sendtest`]: the client side of the `healthcheck` and `send-test` commands.
//! - [`retention`]: the retention rules (per app, per event) that the sweeper purges by and
//!   that per-message TTLs are stamped from.
//! - [`sweeper`]: the retention sweeper (trims old events and dead letters) and its lease.
//! - [`shutdown`]: the one stop signal background tasks select on; [`supervisor`]: starts
//!   them, restarts one that ends or panics (logged and counted; `/readyz` red meanwhile for
//!   the drainer and the broker's loops, which keep events durable), waits for all at the end.
//! - [`logging`]: the log output, every configured secret masked in every line.
//! - [`telemetry`]: OpenTelemetry spans of webhooks and published events, and the
//!   `traceparent` each message carries (`[tracing]`).
//! - [`reload`]: a configuration loaded on SIGHUP, applied (apps, log level) or refused.
//! - [`state`]: channel state (occupancy, subscription counts, presence members) in NATS KV,
//!   applied from a durable copy of the events and served with Pusher's HTTP API paths.
//!
//! [`run`] is the whole server: tests bind a listener on port 0 and pass a shutdown future.
//! The types an embedder or a test names most ([`Settings`], [`Bridge`], [`Accepted`],
//! [`Broker`], [`Message`], [`Metrics`], [`Spool`] and their errors) are re-exported here; the rest of each module is
//! `pub(crate)` unless the binary, the tests or the examples need it.

mod backoff;
pub mod bridge;
pub mod broker;
pub mod config;
mod delivery;
pub mod dlq;
pub mod http;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod probe;
mod refusals;
pub mod reload;
pub mod retention;
pub mod routing;
pub mod sendtest;
pub mod shutdown;
pub mod spool;
pub mod state;
pub mod supervisor;
pub mod sweeper;
pub mod telemetry;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use crate::bridge::{Accepted, Bridge, BridgeError};
pub use crate::broker::{Broker, BrokerError, Message};
pub use crate::config::Settings;
pub use crate::metrics::Metrics;
use crate::retention::Target;
use crate::spool::drain::Drainer;
pub use crate::spool::{Spool, SpoolError};
use crate::supervisor::Supervisor;

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
    /// The configuration does not hold (an address that does not parse).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// `server.admin_listen` could not be bound.
    #[error("cannot listen on {addr} (server.admin_listen)")]
    Listen {
        /// The address.
        addr: String,
        /// The operating system's answer.
        #[source]
        source: std::io::Error,
    },
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
    // On RabbitMQ the state's queue takes a copy of every event from the first publish on.
    let copies = match settings.broker.kind {
        config::BrokerKind::Amqp if settings.state.enabled => {
            vec![state::applier::amqp::state_queue(&settings)]
        }
        _ => Vec::new(),
    };
    let broker = Arc::new(Broker::connect_with(&settings, metrics.clone(), copies).await?);
    Ok(Arc::new(Bridge::new(settings, broker, metrics, spool)))
}

/// Runs the bridge on `listener` until `shutdown` completes: serves webhooks and drains the
/// spool in the background; on shutdown lets in-flight webhooks finish, stops the background
/// tasks and closes the broker connection. Spooled events stay on disk for the next start.
/// With `server.admin_listen` set, binds it too ([`run_with`]).
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let admin = match settings.admin_addr()? {
        Some(addr) => Some(http::bind(addr, settings.server.max_connections).map_err(
            |source| StartError::Listen {
                addr: addr.to_string(),
                source,
            },
        )?),
        None => None,
    };
    run_with(
        listener,
        Extras {
            admin,
            reloads: None,
        },
        settings,
        shutdown,
    )
    .await
}

/// What [`run_with`] takes beside the webhook listener.
#[derive(Default)]
pub struct Extras {
    /// The admin listener, bound by the caller: with it, the webhook listener serves the
    /// webhook path alone and this one the probes, `/metrics` and the channel-state API.
    pub admin: Option<TcpListener>,
    /// Configurations loaded on SIGHUP (the binary's signal handler sends them), applied as
    /// they arrive ([`reload`]).
    pub reloads: Option<tokio::sync::mpsc::Receiver<reload::Loaded>>,
}

/// [`run`] with the admin listener and the reloads of [`Extras`].
pub async fn run_with(
    listener: TcpListener,
    extras: Extras,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    if settings.apps.is_empty() {
        tracing::warn!("no [[apps]] configured: every webhook will be refused with 401");
    }
    let bridge = build(settings).await?;
    serve(bridge, listener, extras, shutdown).await
}

/// Serves a built `bridge` on `listener` (and the admin listener of `extras`) with its
/// background tasks until `shutdown` completes, the broker finds it cannot do what the
/// configuration asks, or the spool's writer panicked (then that error is the answer).
async fn serve(
    bridge: Arc<Bridge>,
    listener: TcpListener,
    extras: Extras,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let Extras { admin, reloads } = extras;
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        listen = %local(&listener),
        admin_listen = %admin.as_ref().map(local).unwrap_or_else(|| "(on listen)".into()),
        path = %bridge.settings().server.webhook_path,
        broker = %bridge.settings().broker.kind,
        "pusher-bridge serving"
    );
    // Background tasks run under the one supervisor and stop when `shutdown` completes (or
    // `serve` returns and drops the trigger).
    let (stop_background, background) = shutdown::channel();
    let mut tasks = Supervisor::new(
        background,
        bridge.metrics().clone(),
        bridge.task_health().clone(),
    );
    let settings = Arc::new(bridge.settings().clone());
    if Target::ALL.iter().any(|t| sweeper::swept(&settings, *t)) {
        let (settings, metrics) = (settings.clone(), bridge.metrics().clone());
        tasks.spawn(metrics::task::RETENTION_SWEEPER, move |shutdown| {
            sweeper::run(settings.clone(), metrics.clone(), shutdown)
        });
    }
    let tracer = bridge.tracer().clone();
    let (spool, broker, metrics) = (
        bridge.spool().clone(),
        bridge.broker().clone(),
        bridge.metrics().clone(),
    );
    let (publish_timeout, interval) = (
        settings.broker.publish_timeout,
        settings.spool.drain_interval,
    );
    tasks.spawn(metrics::task::SPOOL_DRAINER, move |shutdown| {
        let drainer = Drainer::new(
            spool.clone(),
            broker.clone(),
            metrics.clone(),
            publish_timeout,
            interval,
        )
        .with_tracer(tracer.clone());
        drainer.run(shutdown)
    });
    let state_api = start_state(&settings, &bridge, &mut tasks).await?;
    // Started last, so at shutdown the tasks that move events on are awaited first.
    if let Some(export) = bridge.span_export() {
        tasks.spawn(metrics::task::TRACE_EXPORT, move |shutdown| {
            export.clone().run(shutdown)
        });
    }
    // The server stops when `shutdown` completes, when the broker finds it cannot do what the
    // configuration asks, or when the spool's writer panicked (the error is then `run`'s
    // answer; the spool keeps what waits).
    let (fatal_tx, mut fatal_rx) = tokio::sync::oneshot::channel::<StartError>();
    let spool = bridge.spool().clone();
    let broker = bridge.broker().clone();
    let (stop_servers, servers) = shutdown::channel();
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            e = broker.fatal() => {
                let _ = fatal_tx.send(e.into());
            }
            e = spool.writer_lost() => {
                let _ = fatal_tx.send(e.into());
            }
        }
        stop_servers.trigger();
        stop_background.trigger();
    };
    let serve = |l, routes| {
        let mut stop = servers.clone();
        http::serve_with_state(l, bridge.clone(), state_api.clone(), routes, async move {
            stop.wait().await
        })
    };
    let reloading = async {
        if let Some(loads) = reloads {
            reload::run(bridge.clone(), loads, servers.clone()).await;
        }
    };
    let serving = async {
        let listening = async {
            match admin {
                None => serve(listener, http::Routes::All).await,
                Some(admin) => {
                    tokio::join!(
                        serve(listener, http::Routes::Webhook),
                        serve(admin, http::Routes::Admin)
                    );
                }
            }
        };
        tokio::join!(listening, reloading);
    };
    tokio::pin!(serving);
    let mut shutdown = Box::pin(shutdown);
    tokio::select! {
        () = &mut serving => {}
        () = &mut shutdown => serving.await,
    }
    // Servers that ended on their own: dropping `shutdown` drops the background's trigger,
    // which stops the background tasks too.
    drop(shutdown);
    tasks.join(std::time::Duration::from_secs(5)).await;
    bridge.spool().close().await;
    bridge.broker().close().await;
    match fatal_rx.try_recv() {
        Ok(e) => Err(e),
        Err(_) => Ok(()),
    }
}

/// With `[state] enabled`: connects to the KV's NATS (and, for a NATS broker at another URL, to
/// the events' NATS) and starts the state's background work (applier and tombstone sweep)
/// under the supervisor. Returns the query API. On RabbitMQ the broker declares the state
/// queue on every connect, before it publishes ([`build`]); the applier declares it again when
/// it connects.
async fn start_state(
    settings: &Arc<Settings>,
    bridge: &Arc<Bridge>,
    tasks: &mut Supervisor,
) -> Result<Option<state::api::SharedApi>, StartError> {
    let (metrics, broker, apps) = (bridge.metrics(), bridge.broker(), bridge.app_keys());
    if !settings.state.enabled {
        return Ok(None);
    }
    let kv_settings = state::kv_nats_settings(settings);
    let kv = state::connect(&kv_settings).await?;
    let events = match settings.broker.kind {
        config::BrokerKind::Amqp => None,
        _ if kv_settings.url == settings.broker.nats.url => Some(kv.clone()),
        _ => Some(state::connect(&settings.broker.nats).await?),
    };
    let api = Arc::new(state::StateApi::new(settings, kv.clone(), apps.clone()));
    let (settings, metrics, broker) = (settings.clone(), metrics.clone(), broker.clone());
    tasks.spawn(metrics::task::CHANNEL_STATE, move |shutdown| {
        state::run(
            settings.clone(),
            kv.clone(),
            events.clone(),
            broker.clone(),
            metrics.clone(),
            shutdown,
        )
    });
    Ok(Some(api))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spool writer that panicked cannot make an event durable again: the bridge stops with
    /// that error (the binary exits 1 with it), instead of a process that lives on without
    /// a spool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spool_writer_that_panicked_stops_the_bridge_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n\
             [retention.events]\nenabled = false\n[retention.dlq]\nenabled = false\n\
             [spool]\ndir = {:?}\n",
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
        let bridge = Arc::new(Bridge::new(settings, broker, metrics, spool));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = tokio::spawn(serve(
            bridge.clone(),
            listener,
            Extras::default(),
            std::future::pending(),
        ));
        bridge.spool().panic_writer().await;
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), served)
            .await
            .expect("the bridge stopped")
            .unwrap();
        assert!(
            matches!(
                &answer,
                Err(StartError::Spool(SpoolError::WriterPanicked(p)))
                    if p == "a test asked the spool writer to panic"
            ),
            "{answer:?}"
        );
    }
}
