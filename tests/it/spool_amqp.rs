//! The spool drained into RabbitMQ: arrival order kept, original message ids, every event
//! confirmed. (The drain pipelines its publishes on one channel; the time it took is printed.)

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::load::*;
use crate::common::relay::Relay;
use crate::common::*;
use pusher_bridge::config::{BrokerKind, SecretUrl};
use pusher_bridge::spool::Record;
use pusher_bridge::spool::drain::DrainReport;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drainer_publishes_to_rabbitmq_in_arrival_order_with_original_ids() {
    let settings = settings_for(BrokerKind::Amqp);
    let DrainRig {
        broker,
        spool,
        drainer,
        ..
    } = drain_rig(&settings, Duration::from_secs(10)).await;
    let n = 1200;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let records: Vec<Record> = chunk
            .iter()
            .map(|&i| Record::Event(event_message(&settings, i, "amqp-ord")))
            .collect();
        spool.append(&records).await.unwrap();
    }
    let started = Instant::now();
    let report = drainer.drain_once().await.unwrap();
    let took = started.elapsed();
    assert_eq!(
        report,
        DrainReport {
            published: n,
            dead_lettered: 0,
            quarantined: 0,
            interrupted: false
        }
    );
    assert!(spool.is_empty());
    let got = amqp_deliveries(&settings.broker.amqp.queue, n).await;
    let ids: Vec<String> = got
        .iter()
        .map(|d| {
            d.properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default()
        })
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("amqp-ord-{i}")).collect();
    assert_eq!(ids, want, "every event once, in arrival order");
    println!("drained {n} events into RabbitMQ in {took:?}");
    spool.close().await;
    broker.close().await;
    let _ = std::fs::remove_dir_all(&settings.spool.dir);
    amqp_delete(&settings).await;
}

/// RabbitMQ disappears mid-traffic (the relay in front of it drops every connection and stops
/// listening, as a killed node would look to the bridge), then comes back: every webhook is
/// answered 200 within 4 s and every event reaches the queue. AMQP has no deduplication, so an
/// event whose confirm was lost with the connection may arrive twice (at-least-once, README):
/// the test demands every id at least once and reports duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_gone_mid_traffic_every_webhook_answered_and_every_event_arrives() {
    let mut relay = Relay::start().await;
    let mut settings = settings_for(BrokerKind::Amqp);
    settings.broker.amqp.url =
        SecretUrl::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", relay.port));
    let app = Arc::new(TestApp::spawn_ready(settings.clone()).await);
    let posters = start_posters(&app, 4, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.restart().await;

    let (answers, spooled) = collect_answers(posters).await;
    let total = answers.len() * EVENTS_PER_WEBHOOK;
    // Wait for the drain, then read the queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.metric("pusher_bridge_spool_events").await > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.metric("pusher_bridge_spool_events").await, 0.0);
    let got = amqp_deliveries(&settings.broker.amqp.queue, total).await;
    let ids: HashSet<String> = got
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|s| s.to_string()))
        .collect();
    eprintln!(
        "{} webhooks, {spooled} events spooled, {} deliveries, {} duplicates",
        answers.len(),
        got.len(),
        got.len() - ids.len()
    );
    assert_eq!(ids.len(), total, "every event at least once");
    match Arc::try_unwrap(app) {
        Ok(app) => app.stop().await,
        Err(_) => panic!("app still shared"),
    }
    amqp_delete(&settings).await;
}
