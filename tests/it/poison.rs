//! Poison records on NATS: a signed webhook whose subject NATS cannot take (an event name of
//! ~4,030 bytes, or of ~1,340 dots, each escaped to `%2E`) once made nats-server drop the
//! bridge's connection on every try; spooled, it blocked every webhook behind it for good. Now
//! such an event is dead-lettered at once as `too_large`, live or from the spool, and the
//! webhooks behind it reach the stream at once.

use std::time::{Duration, Instant};

use crate::common::*;
use pusher_bridge::config::SecretUrl;

fn poison_bodies() -> Vec<String> {
    let long = "x".repeat(4030);
    let dots = ".".repeat(1340);
    [long, dots]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            webhook_body(
                1_700_000_000_000 + i as u64,
                &[&format!(r#"{{"name":"{name}","channel":"poison-{i}"}}"#)],
            )
        })
        .collect()
}

fn normal(i: usize) -> String {
    webhook_body(
        1_700_000_100_000 + i as u64,
        &[&format!(
            r#"{{"name":"channel_occupied","channel":"after-{i}"}}"#
        )],
    )
}

#[tokio::test]
async fn a_subject_nats_cannot_take_is_dead_lettered_at_once_and_blocks_nothing() {
    let settings = nats_settings();
    let app = TestApp::spawn_ready(settings.clone()).await;
    for body in poison_bodies() {
        let answer = app.post_signed(&body).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(
            answer.body.contains(r#""dead_lettered":1"#),
            "{}",
            answer.body
        );
    }
    let started = Instant::now();
    for i in 0..20 {
        let answer = app.post_signed(&normal(i)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(answer.body.contains(r#""published":1"#), "{}", answer.body);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let js = jetstream_ctx(&nats_url()).await;
    assert_eq!(
        wait_stream_count(
            &js,
            &settings.broker.nats.stream,
            20,
            Duration::from_secs(5)
        )
        .await,
        20
    );
    let letters = stream_messages(&js, &settings.broker.nats.dlq_stream, 2).await;
    assert_eq!(letters.len(), 2);
    for l in &letters {
        assert_eq!(l.header("Pusher-Bridge-Reason"), Some("too_large"));
    }
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 1.0);
    app.stop().await;
    delete_streams(&js, &settings).await;
}

#[tokio::test]
async fn a_spooled_poison_record_does_not_stop_the_drainer() {
    let mut nats = NatsServer::start().await;
    let mut settings = nats_settings();
    settings.broker.nats.url = SecretUrl::new(nats.url());
    let app = TestApp::spawn_ready(settings.clone()).await;
    nats.kill();
    // While NATS is away: the poison first, then normal webhooks behind it on the spool.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metric("pusher_bridge_broker_up").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the bridge did not notice NATS going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for body in poison_bodies()
        .iter()
        .chain((0..10).map(normal).collect::<Vec<_>>().iter())
    {
        let answer = app.post_signed(body).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(answer.body.contains(r#""spooled":1"#), "{}", answer.body);
    }
    nats.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.metric("pusher_bridge_spool_events").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the spool did not drain past the poison"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let js = jetstream_ctx(&nats.url()).await;
    assert_eq!(
        wait_stream_count(
            &js,
            &settings.broker.nats.stream,
            10,
            Duration::from_secs(5)
        )
        .await,
        10
    );
    let letters = stream_messages(&js, &settings.broker.nats.dlq_stream, 2).await;
    assert_eq!(letters.len(), 2);
    assert!(
        letters
            .iter()
            .all(|l| l.header("Pusher-Bridge-Reason") == Some("too_large"))
    );
    app.stop().await;
}
