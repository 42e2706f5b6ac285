use std::collections::{HashSet, VecDeque};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

/// Every app's client events, from its own durable queue, deduplicated on `message_id`.
pub async fn client_events_worker() -> Result<(), lapin::Error> {
    let conn = Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        ConnectionProperties::default().with_connection_name("client-events-worker".into()),
    )
    .await?;
    let ch = conn.create_channel().await?;
    let queue = "client-events-worker";
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    // `*` = any app id, `#` = any channel (the channel is one escaped word).
    ch.queue_bind(
        queue.into(),
        "pusher.events".into(),
        "pusher.*.client_event.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.basic_qos(100, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "client-events-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // Pusher redelivers webhooks; a redelivered event has the same message_id.
    // Remember the last 100 000 ids.
    let mut seen: HashSet<String> = HashSet::new();
    let mut order: VecDeque<String> = VecDeque::new();
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        if seen.insert(id.clone()) {
            order.push_back(id);
            if order.len() > 100_000 {
                let oldest = order.pop_front().unwrap_or_default();
                seen.remove(&oldest);
            }
            let event: serde_json::Value =
                serde_json::from_slice(&delivery.data).unwrap_or_default();
            println!(
                "{} {} {}",
                event["app_id"], event["channel"], event["event"]
            );
        }
        delivery.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}
