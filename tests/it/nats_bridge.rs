//! NATS-only behaviour: the bridge against a private `nats-server` that it starts before,
//! loses and gets back. The shared contract (subjects, bodies, ids, status codes, dead letters,
//! metrics) runs against both brokers in `bridge_contract.rs`.

use std::time::Duration;

use crate::common::*;
use pusher_bridge::config::SecretUrl;

#[tokio::test]
async fn bridge_starts_before_nats_and_connects_when_it_appears() {
    let port = free_port();
    let mut settings = nats_settings();
    settings.broker.nats.url = SecretUrl::new(format!("nats://127.0.0.1:{port}"));
    // No spool room, so readiness follows the broker alone.
    settings.spool.max_bytes = 64;
    let app = TestApp::spawn(settings.clone()).await;
    assert_eq!(app.get("/readyz").await.status, 503);
    let mut server = NatsServer::start_on(port).await;
    app.wait_ready().await;
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 1.0);
    let a = app
        .post_signed(&webhook_body(
            3,
            &[r#"{"name":"channel_occupied","channel":"late"}"#],
        ))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let js = jetstream_ctx(&server.url()).await;
    assert_eq!(
        stream_messages(&js, &settings.broker.nats.stream, 1)
            .await
            .len(),
        1
    );

    // Broker dies: readiness and the gauge follow; it comes back: so does the bridge.
    server.kill();
    for _ in 0..200 {
        if app.get("/readyz").await.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.get("/readyz").await.status, 503);
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 0.0);
    server.restart().await;
    app.wait_ready().await;
    let a = app
        .post_signed(&webhook_body(
            4,
            &[r#"{"name":"channel_occupied","channel":"again"}"#],
        ))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_webhook_after_start_is_published_not_spooled() {
    // The natural deployment check: start beside a healthy NATS and post at once. The
    // broker's connection comes up a moment after the listener: the webhook waits for it
    // (within its budget) instead of landing on the spool.
    let settings = nats_settings();
    let app = TestApp::spawn(settings.clone()).await;
    let r = app
        .post_signed(&webhook_body(
            1,
            &[r#"{"name":"channel_occupied","channel":"first"}"#],
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"published\":1"), "{}", r.body);
    app.stop().await;
    let js = jetstream_ctx(&nats_url()).await;
    delete_streams(&js, &settings).await;
}
