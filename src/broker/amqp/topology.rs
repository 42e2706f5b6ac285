//! The exchanges and queues the bridge declares at every (re)connect unless `broker.declare` is
//! off: a durable topic exchange for events with a durable queue bound with `#` (so no event is
//! unroutable), and the same pair for dead letters.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::broker::BrokerError;
use crate::config::AmqpSettings;

/// Binding key that matches every routing key (AMQP topic `#` is NATS `>` and also matches an
/// empty remainder).
pub const BIND_ALL: &str = "#";

fn name(key: &str, value: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value)
        .map_err(|_| BrokerError::Topology(format!("{key} is longer than 255 bytes")))
}

/// The (exchange, queue) pairs of `[broker.amqp]`: events, then dead letters.
pub fn pairs(s: &AmqpSettings) -> [(&str, &str); 2] {
    [
        (s.exchange.as_str(), s.queue.as_str()),
        (s.dlq_exchange.as_str(), s.dlq_queue.as_str()),
    ]
}

/// Declares both exchanges and queues and binds them. Declaring what exists with the same
/// settings is a no-op; a queue that exists with other arguments makes RabbitMQ refuse
/// (`PRECONDITION_FAILED`), which is reported (and retried) rather than worked around.
pub async fn declare(channel: &Channel, s: &AmqpSettings) -> Result<(), BrokerError> {
    let err = |what: &str, e: lapin::Error| BrokerError::Topology(format!("{what}: {e}"));
    for (exchange, queue) in pairs(s) {
        let ex = name("broker.amqp exchange", exchange)?;
        let q = name("broker.amqp queue", queue)?;
        channel
            .exchange_declare(
                ex.clone(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| err(&format!("exchange {exchange}"), e))?;
        channel
            .queue_declare(
                q.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
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
