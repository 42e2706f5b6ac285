//! The exchanges and queues the bridge declares at every (re)connect unless `broker.declare` is
//! off: a durable topic exchange for events with a durable queue bound with `#` (so no event is
//! unroutable), and the same pair for dead letters. Both queues are classic or quorum queues
//! (`broker.amqp.queue_type`).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::broker::BrokerError;
use crate::config::{AmqpSettings, QueueType};

/// Binding key that matches every routing key (AMQP topic `#` is NATS `>` and also matches an
/// empty remainder).
pub(crate) const BIND_ALL: &str = "#";

/// `value` of the setting `key` as an AMQP name (a short string, at most 255 bytes).
pub(crate) fn name(key: &str, value: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value).map_err(|_| BrokerError::Topology {
        what: format!("{key} is longer than 255 bytes"),
        source: None,
    })
}

/// The arguments of the events and dead-letter queues: none for a classic queue (as they were
/// declared before `broker.amqp.queue_type` existed, so existing queues still match), and
/// `x-queue-type = quorum` for a quorum queue (durable, never exclusive or auto-delete, which
/// the declaration above already is).
pub fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// The (exchange, queue) pairs of `[broker.amqp]`: events, then dead letters.
pub fn pairs(s: &AmqpSettings) -> [(&str, &str); 2] {
    [
        (s.exchange.as_str(), s.queue.as_str()),
        (s.dlq_exchange.as_str(), s.dlq_queue.as_str()),
    ]
}

/// Declares the durable topic exchange `exchange` (a no-op when it exists so).
pub(crate) async fn declare_exchange(
    channel: &Channel,
    exchange: ShortString,
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declares the durable queue `queue` with `args` (a no-op when it exists so).
pub(crate) async fn declare_queue(
    channel: &Channel,
    queue: ShortString,
    args: FieldTable,
) -> lapin::Result<()> {
    channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
}

/// A durable queue bound to the events exchange, declared on every connect before any publish
/// for whoever needs a copy of the events (the channel state's queue): the caller hands it to
/// the broker, which knows nothing of what it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundQueue {
    /// The queue's name.
    pub queue: String,
    /// Its binding keys on the events exchange.
    pub bindings: Vec<String>,
}

/// Declares the events exchange `exchange` (as [`declare`] does), the durable queue `q` and its
/// bindings.
pub(crate) async fn declare_bound(
    channel: &Channel,
    exchange: &str,
    q: &BoundQueue,
) -> Result<(), BrokerError> {
    let err = |what: &str, e: lapin::Error| BrokerError::topology(what, e);
    let ex = name("broker.amqp.exchange", exchange)?;
    let queue = name("queue", &q.queue)?;
    declare_exchange(channel, ex.clone())
        .await
        .map_err(|e| err(&format!("exchange {exchange}"), e))?;
    declare_queue(channel, queue.clone(), FieldTable::default())
        .await
        .map_err(|e| err(&format!("queue {}", q.queue), e))?;
    for key in &q.bindings {
        channel
            .queue_bind(
                queue.clone(),
                ex.clone(),
                name("binding key", key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| err(&format!("binding {} to {exchange}", q.queue), e))?;
    }
    Ok(())
}

/// Declares both exchanges and queues and binds them. Declaring what exists with the same
/// settings is a no-op; a queue that exists with other arguments makes RabbitMQ refuse
/// (`PRECONDITION_FAILED`), which is reported (and retried) rather than worked around.
pub async fn declare(channel: &Channel, s: &AmqpSettings) -> Result<(), BrokerError> {
    let err = |what: &str, e: lapin::Error| BrokerError::topology(what, e);
    for (exchange, queue) in pairs(s) {
        let ex = name("broker.amqp exchange", exchange)?;
        let q = name("broker.amqp queue", queue)?;
        declare_exchange(channel, ex.clone())
            .await
            .map_err(|e| err(&format!("exchange {exchange}"), e))?;
        declare_queue(channel, q.clone(), queue_arguments(s.queue_type))
            .await
            .map_err(|e| err(&format!("queue {queue}"), e))?;
        channel
            .queue_bind(
                q,
                ex,
                BIND_ALL.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| err(&format!("binding {queue} to {exchange}"), e))?;
    }
    Ok(())
}
