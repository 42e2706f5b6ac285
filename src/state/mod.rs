//! Channel state (`[state]`): which channels are occupied, their last subscription count and
//! each presence channel's members, per app, kept in a NATS JetStream KV bucket from the
//! webhooks and served with the paths and signing of Pusher's HTTP API.
//!
//! - [`keys`]: the key layout and the reversible escape of channel names and user ids.
//! - [`merge`]: the order-safe merge, a pure function (newer `time_ms`, then later place in the
//!   webhook, wins; tombstones keep vacated channels and removed members).
//! - [`store`]: the bucket, compare-and-set writes retried on conflict, reads, tombstone sweep.
//! - [`applier`]: applies the state from a durable copy of the events (NATS consumers or an AMQP
//!   queue), acking each event only after its KV write.
//! - `api`: the query API on `server.listen`.
//! - [`client`]: the `pusher-bridge state ...` commands.

pub(crate) mod api;
pub mod applier;
pub mod client;
pub mod keys;
pub mod merge;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::broker::{Broker, BrokerError, cause};
use crate::config::{NatsSettings, Settings};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

pub(crate) use api::StateApi;
pub use store::StateStore;

/// Why the channel state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A connection could not be set up: NATS for the KV (or the events), RabbitMQ for the
    /// state queue; or the bucket did not answer.
    #[error("channel state: {0}")]
    Connect(#[from] BrokerError),
    /// A KV or JetStream operation failed (retried by the applier; 503 for the query API).
    #[error("{what}: {source}")]
    Kv {
        /// What the bridge was doing.
        what: &'static str,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// Too many writers collided on one key in a row (the event is retried later).
    #[error("gave up on {key} after repeated concurrent updates")]
    Contended {
        /// The KV key.
        key: String,
    },
    /// The AMQP side of the applier failed.
    #[error("RabbitMQ: {what}{}", cause(.source))]
    Amqp {
        /// What was being done.
        what: String,
        /// lapin's error, when there is one.
        #[source]
        source: Option<lapin::Error>,
    },
}

/// `[broker.nats]` pointed at the KV's server (`state.nats_url`, default `broker.nats.url`).
pub(crate) fn kv_nats_settings(settings: &Settings) -> NatsSettings {
    let mut nats = settings.broker.nats.clone();
    if let Some(url) = &settings.state.nats_url {
        nats.url = url.clone();
    }
    nats
}

/// Connects to NATS as `[broker.nats]` says (auth, TLS), in the background: the client retries
/// until the server answers, so the bridge starts while NATS is away.
pub async fn connect(nats: &NatsSettings) -> Result<async_nats::Client, StateError> {
    Ok(crate::broker::nats::connect_client(nats, "pusher-bridge-state").await?)
}

/// The pauses between tries to open the bucket while connected: 1 s doubling to 2 s, jittered.
/// An open fails while JetStream is not ready (a cluster electing its leaders, the bucket
/// being created by another replica), which takes seconds, not milliseconds; the jitter keeps
/// replicas started together from asking together, and the low cap opens the bucket soon
/// after the server is ready.
const OPEN_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(2));
/// The pauses between looks at a connection that is not up yet (start-up): 20 ms doubling to
/// 40 ms, jittered. Only the client's local state is read (it reconnects by itself), so looking
/// often costs nothing and opens the bucket within moments of the connect.
const CONNECT_POLL: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(40));

/// Opens the bucket once the KV's server has answered (its version decides how the store
/// writes), retrying after [`OPEN_RETRY`] until it opens or `shutdown`.
async fn open_store(
    client: &async_nats::Client,
    settings: &Settings,
    shutdown: &mut Shutdown,
) -> Option<StateStore> {
    let (mut failures, mut polls) = (0u32, 0u32);
    loop {
        let pause = if client.connection_state() == async_nats::connection::State::Connected {
            match StateStore::open(
                client.clone(),
                &settings.state.bucket,
                settings.broker.nats.replicas,
            )
            .await
            {
                Ok(s) => return Some(s),
                Err(e) => tracing::warn!(error = %e, "state: bucket not open yet, retrying"),
            }
            failures = failures.saturating_add(1);
            OPEN_RETRY.delay(failures)
        } else {
            // Not connected yet (start-up): look again soon rather than a second late.
            polls = polls.saturating_add(1);
            CONNECT_POLL.delay(polls)
        };
        tokio::select! {
            () = shutdown.wait() => return None,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// The state's background work: the applier and the tombstone sweep, until `shutdown`.
/// `events` is the connection to the events broker when that is NATS; the applier waits for
/// `broker`'s streams before it looks for the events stream (no race with the declaration).
pub async fn run(
    settings: Arc<Settings>,
    kv: async_nats::Client,
    events: Option<async_nats::Client>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) {
    let Some(store) = open_store(&kv, &settings, &mut shutdown).await else {
        return;
    };
    // One task (the supervisor's): a panic in either part is seen and the whole restarted.
    let sweep = sweep_loop(
        store.clone(),
        settings.state.tombstone_ttl,
        settings.state.sweep_interval,
        shutdown.clone(),
    );
    let apply = async {
        match events {
            Some(events) => {
                tokio::select! {
                    () = shutdown.wait() => {}
                    () = broker.streams_ready() => {
                        applier::run_nats(settings, events, store, metrics, shutdown).await;
                    }
                }
            }
            None => applier::amqp::run(settings, store, metrics, shutdown).await,
        }
    };
    tokio::join!(sweep, apply);
}

/// Drops tombstones written more than `horizon` ago every `interval` (every replica may:
/// deletes are revision-exact). Ages are by this replica's clock against the writer's: keep
/// the replicas' clocks in sync (NTP); a skew of seconds is nothing against the horizon.
async fn sweep_loop(
    store: StateStore,
    horizon: Duration,
    interval: Duration,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        let now = i64::try_from(crate::broker::now_ms()).unwrap_or(i64::MAX);
        match store.sweep_once(now, horizon).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(dropped = n, "state: dropped old tombstones"),
            Err(e) => tracing::warn!(error = %e, "state: tombstone sweep failed"),
        }
    }
}
