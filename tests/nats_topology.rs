//! The bridge's declaration on (re)connect against streams an operator already changed: it adds
//! only what it needs (its subject, a duplicate window at least as long as configured, more
//! replicas when possible) and leaves everything else, including an operator's longer window,
//! extra subjects and limits.

mod common;

use std::time::Duration;

use async_nats::jetstream::stream;
use common::*;
use pusher_bridge::routing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_stream_settings_survive_the_bridges_declaration() {
    let mut settings = nats_settings();
    settings.broker.nats.replicas = 3;
    let js = jetstream_ctx(&nats_url()).await;
    let prefix = settings.broker.subject_prefix.clone();
    let audit = format!("{prefix}_audit.>");
    // The operator's events stream: an extra subject, a longer window, limits.
    js.create_stream(stream::Config {
        name: settings.broker.nats.stream.clone(),
        subjects: vec![format!("{prefix}.>"), audit.clone()],
        duplicate_window: Duration::from_secs(3600),
        max_age: Duration::from_secs(7 * 86_400),
        max_bytes: 1 << 30,
        max_messages: 5_000_000,
        ..Default::default()
    })
    .await
    .expect("operator's events stream");
    // The DLQ stream from an older bridge version: a short window, no subject of its own yet.
    let dlq_subject = format!("{}.>", routing::dlq_prefix(&prefix));
    js.create_stream(stream::Config {
        name: settings.broker.nats.dlq_stream.clone(),
        subjects: vec![format!("{prefix}_old_dlq.>")],
        duplicate_window: Duration::from_secs(30),
        max_messages: 1000,
        ..Default::default()
    })
    .await
    .expect("older DLQ stream");

    let app = TestApp::spawn_ready(settings.clone()).await;
    let events = js
        .get_stream(&settings.broker.nats.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(events.subjects, [format!("{prefix}.>"), audit]);
    assert_eq!(events.duplicate_window, Duration::from_secs(3600));
    assert_eq!(events.max_age, Duration::from_secs(7 * 86_400));
    assert_eq!(events.max_bytes, 1 << 30);
    assert_eq!(events.max_messages, 5_000_000);
    // Replicas were asked to go from 1 to 3 (a standalone NATS 2.9 accepts and ignores that;
    // a cluster with too few servers refuses, which the bridge logs and lives with).
    assert!(events.num_replicas >= 1);

    let dlq = js
        .get_stream(&settings.broker.nats.dlq_stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(dlq.subjects, [format!("{prefix}_old_dlq.>"), dlq_subject]);
    assert_eq!(dlq.duplicate_window, settings.broker.nats.duplicate_window);
    assert_eq!(dlq.max_messages, 1000);

    // Up and publishing on the stream as it is.
    let r = app
        .post_signed(&webhook_body(
            5,
            &[r#"{"name":"channel_occupied","channel":"op"}"#],
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"published\":1"), "{}", r.body);
    app.stop().await;
    delete_streams(&js, &settings).await;
}
