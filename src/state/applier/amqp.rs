//! The AMQP source of the state: a durable queue `<broker.amqp.queue>.<state.durable>` bound to
//! the events exchange for the state events, consumed with manual acks. The bridge's AMQP broker
//! declares it (`declare_on`) on every connect before it publishes anything, so it holds a
//! copy of every event published, whether the KV is reachable or not (and whether RabbitMQ was
//! there when the bridge started or came later).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use tokio::sync::OnceCell;

use super::{CONCURRENCY, RETRY_PAUSE, STATE_EVENTS, Settle, apply_message};
use crate::broker::amqp::endpoint::Endpoint;
use crate::broker::amqp::topology;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::routing;
use crate::shutdown::Shutdown;
use crate::state::{StateError, StateStore};

/// Heartbeat of the applier's connection, in seconds.
const HEARTBEAT_SECS: u16 = 10;
/// How long connecting to one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The state queue's name: `<broker.amqp.queue>.<state.durable>`.
pub fn queue_name(settings: &Settings) -> String {
    format!("{}.{}", settings.broker.amqp.queue, settings.state.durable)
}

/// The binding keys: `<prefix>.*.<event>.#` for each state event.
pub(crate) fn binding_keys(settings: &Settings) -> Vec<String> {
    STATE_EVENTS
        .iter()
        .map(|e| {
            format!(
                "{}.*.{}.#",
                settings.broker.subject_prefix,
                routing::escape_token(e)
            )
        })
        .collect()
}

fn short(value: &str) -> Result<ShortString, StateError> {
    ShortString::try_new(value).map_err(|_| StateError::Amqp {
        what: format!("name longer than 255 bytes: {value}"),
        source: None,
    })
}

/// The state queue and its bindings, as the bridge's RabbitMQ connection declares it on every
/// connect ([`crate::broker::Broker::connect_with`]).
pub(crate) fn state_queue(settings: &Settings) -> topology::BoundQueue {
    topology::BoundQueue {
        queue: queue_name(settings),
        bindings: binding_keys(settings),
    }
}

/// Declares the events exchange (as the broker does), the state queue and its bindings.
pub(crate) async fn declare_on(channel: &Channel, settings: &Settings) -> Result<(), StateError> {
    topology::declare_bound(
        channel,
        &settings.broker.amqp.exchange,
        &state_queue(settings),
    )
    .await
    .map_err(StateError::Connect)
}

/// Where the applier connects: the nodes of `broker.amqp.url`, under a connection name of its
/// own. Made once per run and kept, so a reconnect after a lost connection starts at the node
/// after the lost one.
async fn endpoint(settings: &Settings) -> Result<Endpoint, StateError> {
    let name = format!("{}-state", settings.broker.amqp.connection_name);
    Endpoint::new(&settings.broker.amqp, &name, HEARTBEAT_SECS)
        .await
        .map_err(StateError::from)
}

/// Connects, declares and consumes until the connection or consumer ends.
async fn consume_once(
    settings: &Settings,
    endpoint: &OnceCell<Endpoint>,
    store: &StateStore,
    metrics: &Metrics,
) -> Result<(), StateError> {
    let endpoint = endpoint
        .get_or_try_init(|| self::endpoint(settings))
        .await?;
    let conn = endpoint.open(CONNECT_TIMEOUT).await?;
    let amqp = |e: lapin::Error| StateError::Amqp {
        what: "state queue".to_string(),
        source: Some(e),
    };
    let ch = conn.create_channel().await.map_err(amqp)?;
    declare_on(&ch, settings).await?;
    ch.basic_qos(
        u16::try_from(CONCURRENCY * 4).unwrap_or(256),
        BasicQosOptions::default(),
    )
    .await
    .map_err(amqp)?;
    let consumer = ch
        .basic_consume(
            short(&queue_name(settings))?,
            "pusher-bridge-state".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp)?;
    consumer
        .for_each_concurrent(CONCURRENCY, |delivery| async move {
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "state consumer");
                    return;
                }
            };
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string());
            let result = match apply_message(store, metrics, &delivery.data, id.as_deref()).await {
                Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
                Settle::Drop => {
                    delivery
                        .nack(BasicNackOptions {
                            requeue: false,
                            ..Default::default()
                        })
                        .await
                }
                Settle::Retry => {
                    // Requeued at once it would come straight back: pause first.
                    tokio::time::sleep(crate::backoff::jitter(RETRY_PAUSE)).await;
                    delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await
                }
            };
            if let Err(e) = result {
                // Unacked deliveries return to the queue when the channel closes.
                tracing::debug!(error = %e, "state: ack failed");
            }
        })
        .await;
    let _ = conn.close(200, "consumer ended".into()).await;
    Ok(())
}

/// The AMQP applier: until `shutdown`, (re)connects and applies what the state queue delivers.
pub async fn run(
    settings: Arc<Settings>,
    store: StateStore,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let endpoint = OnceCell::new();
    // At shutdown the connection closes and RabbitMQ requeues what was delivered unacked.
    super::keep_consuming(shutdown, |mut stop| {
        let (settings, endpoint, store, metrics) = (&settings, &endpoint, &store, &metrics);
        async move {
            tokio::select! {
                () = stop.wait() => Ok(()),
                result = consume_once(settings, endpoint, store, metrics) => result,
            }
        }
    })
    .await;
}
