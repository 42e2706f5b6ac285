use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;

/// A durable consumer of every app's `member_added` events.
pub async fn presence_sync() -> Result<(), async_nats::Error> {
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let js = jetstream::new(client);
    let stream = js.get_stream("PUSHER_EVENTS").await?;
    let consumer = stream
        .get_or_create_consumer(
            "presence-sync",
            pull::Config {
                durable_name: Some("presence-sync".into()),
                filter_subject: "pusher.*.member_added.>".into(),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let event: serde_json::Value = serde_json::from_slice(&msg.payload)?;
        println!("{} joined {}", event["user_id"], event["channel"]);
        msg.ack().await?;
    }
    Ok(())
}
