//! The spool drained into RabbitMQ: arrival order kept, original message ids, every event
//! confirmed. (The drain pipelines its publishes on one channel; the time it took is printed.)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use pusher_bridge::broker::{Broker, Message};
use pusher_bridge::config::{BrokerKind, Settings};
use pusher_bridge::metrics::Metrics;
use pusher_bridge::spool::drain::{DrainReport, Drainer};
use pusher_bridge::spool::{Record, Spool};

fn event_message(settings: &Settings, i: usize) -> Message {
    let channel = format!("ch-{i}");
    Message {
        subject: pusher_bridge::routing::subject(
            &settings.broker.subject_prefix,
            APP_ID,
            "channel_occupied",
            &channel,
        ),
        msg_id: format!("amqp-ord-{i}"),
        body: Bytes::from(format!(
            r#"{{"name":"channel_occupied","channel":"{channel}","app_id":"{APP_ID}","time_ms":1}}"#
        )),
        app_id: Arc::from(APP_ID),
        event: "channel_occupied".into(),
        channel,
        time_ms: "1".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drainer_publishes_to_rabbitmq_in_arrival_order_with_original_ids() {
    let settings = settings_for(BrokerKind::Amqp);
    let metrics = Arc::new(Metrics::new());
    let broker = Arc::new(Broker::connect(&settings, metrics.clone()).await.unwrap());
    assert!(broker.wait_up(Duration::from_secs(10)).await);
    let spool = Arc::new(
        Spool::open(&settings.spool, 1024, metrics.clone())
            .await
            .unwrap(),
    );
    let n = 1200;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let records: Vec<Record> = chunk
            .iter()
            .map(|&i| Record::Event(event_message(&settings, i)))
            .collect();
        spool.append(&records).await.unwrap();
    }
    let drainer = Drainer::new(
        spool.clone(),
        broker.clone(),
        metrics.clone(),
        Duration::from_secs(10),
        Duration::from_secs(1),
    );
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
