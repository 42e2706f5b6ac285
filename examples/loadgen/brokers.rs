//! After the load: how many messages the broker holds for the run (each run has its own stream or
//! queue, so the count is exactly the run's), then the run's topology is removed.

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

/// Which broker the bridge publishes to in this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// NATS JetStream, acknowledged publishes.
    Nats,
    /// RabbitMQ with publisher confirms.
    Amqp,
    /// The benchmark-only null broker: the HTTP path's ceiling (needs the `bench-null-broker`
    /// build).
    Null,
}

/// The run's unique topology names.
#[derive(Clone, Debug)]
pub struct Names {
    /// Subject prefix / routing key prefix.
    pub prefix: String,
    /// NATS events stream.
    pub stream: String,
    /// NATS dead-letter stream.
    pub dlq_stream: String,
    /// AMQP exchange and queue of events.
    pub exchange: String,
    /// AMQP events queue.
    pub queue: String,
    /// AMQP dead-letter exchange.
    pub dlq_exchange: String,
    /// AMQP dead-letter queue.
    pub dlq_queue: String,
}

impl Names {
    /// Names for run `id` (letters and digits only).
    pub fn new(id: &str) -> Self {
        Self {
            prefix: format!("bench{id}"),
            stream: format!("BENCH_{id}"),
            dlq_stream: format!("BENCH_DLQ_{id}"),
            exchange: format!("bench.{id}.events"),
            queue: format!("bench.{id}.events"),
            dlq_exchange: format!("bench.{id}.dlq"),
            dlq_queue: format!("bench.{id}.dlq"),
        }
    }
}

/// Messages stored for the run: (events, dead letters). `None` for the null broker.
/// Removes the run's streams / queues / exchanges afterwards.
pub async fn count_and_clean(
    kind: Kind,
    names: &Names,
    nats_url: &str,
    amqp_url: &str,
) -> Result<Option<(u64, u64)>, String> {
    match kind {
        Kind::Null => Ok(None),
        Kind::Nats => nats(names, nats_url).await.map(Some),
        Kind::Amqp => amqp(names, amqp_url).await.map(Some),
    }
}

async fn nats(names: &Names, url: &str) -> Result<(u64, u64), String> {
    let client = async_nats::connect(url)
        .await
        .map_err(|e| format!("cannot connect to NATS: {e}"))?;
    let js = async_nats::jetstream::new(client);
    let mut counts = [0u64; 2];
    for (i, name) in [&names.stream, &names.dlq_stream].into_iter().enumerate() {
        let mut stream = js
            .get_stream(name)
            .await
            .map_err(|e| format!("stream {name}: {e}"))?;
        counts[i] = stream
            .info()
            .await
            .map_err(|e| format!("stream {name}: {e}"))?
            .state
            .messages;
        js.delete_stream(name)
            .await
            .map_err(|e| format!("cannot delete stream {name}: {e}"))?;
    }
    Ok((counts[0], counts[1]))
}

async fn amqp(names: &Names, url: &str) -> Result<(u64, u64), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("cannot connect to RabbitMQ: {e}"))?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    let mut counts = [0u64; 2];
    for (i, queue) in [&names.queue, &names.dlq_queue].into_iter().enumerate() {
        counts[i] = ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(|e| format!("queue {queue}: {e}"))?
            .into();
    }
    for exchange in [&names.exchange, &names.dlq_exchange] {
        ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .map_err(|e| format!("cannot delete exchange {exchange}: {e}"))?;
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok((counts[0], counts[1]))
}
