//! RabbitMQ helpers of the tests: their own connection and channels, declaring exchanges and
//! queues as the bridge does, reading what the bridge stored and deleting it afterwards.

use std::time::Duration;

use bytes::Bytes;
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};
use pusher_bridge::config::Settings;

use super::{Stored, amqp_url};

/// A test's own AMQP connection and channel.
pub async fn amqp_channel() -> (Connection, Channel) {
    let conn = Connection::connect(
        &amqp_url(),
        lapin::ConnectionProperties::default()
            .with_connection_name("pusher-bridge-test-reader".into()),
    )
    .await
    .expect("connect RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// [`amqp_channel`] with publisher confirms on, so a test's publish can wait until RabbitMQ
/// stored the message.
pub async fn confirm_channel() -> (Connection, Channel) {
    let (conn, ch) = amqp_channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    (conn, ch)
}

/// Declares `exchange` as the bridge does: a durable topic exchange.
pub async fn declare_exchange(ch: &Channel, exchange: &str) {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange.declare");
}

/// Declares `queue` (durable or not) with the queue arguments `args`.
pub async fn declare_queue(ch: &Channel, queue: &str, durable: bool, args: FieldTable) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("queue.declare");
}

/// Binds `queue` to `exchange` with the binding key `key`.
pub async fn bind_queue(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue.bind");
}

/// Takes the messages of `queue` off it: waits up to 2 s until at least `min` arrived, then
/// also takes whatever else is there (so duplicates show).
pub async fn amqp_deliveries(queue: &str, min: usize) -> Vec<lapin::message::Delivery> {
    let (conn, ch) = amqp_channel().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut out = Vec::new();
    loop {
        let got = ch
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get");
        match got {
            Some(m) => out.push(m.delivery),
            None if out.len() >= min || tokio::time::Instant::now() > deadline => break,
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

/// A header of an AMQP message as text.
pub fn amqp_header(p: &lapin::BasicProperties, name: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    match p.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The messages of `queue` as [`Stored`] (taken off the queue, as [`amqp_deliveries`]).
pub(super) async fn stored(queue: &str, min: usize) -> Vec<Stored> {
    amqp_deliveries(queue, min)
        .await
        .into_iter()
        .map(|d| {
            let p = &d.properties;
            let headers = p
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .keys()
                        .filter_map(|k| Some((k.to_string(), amqp_header(p, k.as_str())?)))
                        .collect()
                })
                .unwrap_or_default();
            Stored {
                subject: d.routing_key.to_string(),
                headers,
                body: serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null),
                raw: Bytes::from(d.data.clone()),
                msg_id: p.message_id().as_ref().map(|s| s.to_string()),
                content_type: p.content_type().as_ref().map(|s| s.to_string()),
            }
        })
        .collect()
}

/// Deletes a queue a test (or its consumer) declared.
pub async fn delete_queue(queue: &str) {
    let (conn, ch) = amqp_channel().await;
    let _ = ch.queue_delete(queue.into(), Default::default()).await;
    let _ = conn.close(200, "done".into()).await;
}

/// Deletes the test's exchanges and queues (each on its own channel: deleting something that
/// does not exist may close the channel).
pub async fn amqp_delete(settings: &Settings) {
    let (conn, _) = amqp_channel().await;
    let a = &settings.broker.amqp;
    for q in [&a.queue, &a.dlq_queue] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
    }
    for e in [&a.exchange, &a.dlq_exchange] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(e.as_str().into(), Default::default())
                .await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
}
