//! `broker.amqp.queue_type = "quorum"` on the local RabbitMQ: the bridge declares both queues as
//! quorum queues (RabbitMQ then refuses to see them as classic), events arrive through them, and
//! the sweeper's head sweep removes old messages from a quorum queue and puts the kept ones back
//! in their order. (The whole contract suite also runs on quorum queues: `bridge_contract`'s
//! `amqp_quorum::*`.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use pusher_bridge::broker::amqp::topology::queue_arguments;
use pusher_bridge::config::{BrokerKind, QueueType, Settings};
use pusher_bridge::metrics::Metrics;
use pusher_bridge::sweeper::{Sweeper, Target, TargetOutcome};

fn quorum_settings() -> Settings {
    let mut s = settings_for(BrokerKind::Amqp);
    s.broker.amqp.queue_type = QueueType::Quorum;
    s
}

/// Declares `queue` durable with `x-queue-type = <kind>` on a fresh channel: Ok when RabbitMQ
/// finds it equivalent to the existing queue.
async fn declare_as(conn: &lapin::Connection, queue: &str, kind: &str) -> Result<(), String> {
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    let result = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let _ = ch.close(200, "done".into()).await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_queues_are_quorum_queues_and_events_arrive() {
    let settings = quorum_settings();
    let app = TestApp::spawn_ready(settings.clone()).await;
    let (conn, _ch) = amqp_channel().await;
    for q in [&settings.broker.amqp.queue, &settings.broker.amqp.dlq_queue] {
        declare_as(&conn, q, "quorum")
            .await
            .unwrap_or_else(|e| panic!("{q} is not a quorum queue: {e}"));
        let classic = declare_as(&conn, q, "classic").await;
        assert!(
            classic.as_ref().is_err_and(|e| e.contains("PRECONDITION")),
            "{q} accepted as classic: {classic:?}"
        );
    }
    let r = app
        .post_signed(&webhook_body(
            9,
            &[
                r#"{"name":"channel_occupied","channel":"q-1"}"#,
                r#"{"name":1}"#,
            ],
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(read_events(BrokerKind::Amqp, &settings, 1).await.len(), 1);
    assert_eq!(
        read_dead_letters(BrokerKind::Amqp, &settings, 1)
            .await
            .len(),
        1
    );
    let _ = conn.close(200, "done".into()).await;
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_of_the_same_name_keeps_the_bridge_not_ready() {
    let settings = quorum_settings();
    let (conn, ch) = amqp_channel().await;
    declare_queue(
        &ch,
        &settings.broker.amqp.queue,
        true,
        FieldTable::default(),
    )
    .await;
    let app = TestApp::spawn(settings.clone()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 0.0);
    let _ = conn.close(200, "done".into()).await;
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn publish(ch: &Channel, queue: &str, event: &str, age_secs: u64, tag: &str) {
    let mut headers = FieldTable::default();
    headers.insert("Pusher-Event".into(), AMQPValue::LongString(event.into()));
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_timestamp(now_secs() - age_secs);
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        tag.as_bytes(),
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Bodies of every message in `queue`, in order, leaving them there.
async fn peek(conn: &lapin::Connection, queue: &str) -> Vec<String> {
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    let mut last = None;
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        out.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
        last = Some(m.delivery.delivery_tag);
    }
    if let Some(tag) = last {
        ch.basic_nack(
            tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .unwrap();
    }
    let _ = ch.close(200, "peeked".into()).await;
    out
}

/// What RabbitMQ does with a requeued message of a quorum queue: it goes behind the newest one.
/// This is why the sweeper's head sweep (which holds the messages it keeps, then requeues them)
/// refuses quorum queues: it would reorder them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_requeues_at_its_tail_so_the_head_sweep_refuses_it() {
    let mut settings = quorum_settings();
    settings.retention.events.max_age = Duration::from_secs(600);
    settings.retention.events.overrides =
        BTreeMap::from([("channel_occupied".to_string(), Duration::from_secs(7200))]);
    settings.retention.dlq.enabled = false;
    let (conn, ch) = confirm_channel().await;
    let q = settings.broker.amqp.queue.clone();
    declare_queue(&ch, &q, true, queue_arguments(QueueType::Quorum)).await;
    publish(&ch, &q, "channel_occupied", 3600, "occupied-1h").await;
    publish(&ch, &q, "member_added", 3600, "added-1h").await;
    publish(&ch, &q, "client_event", 5, "client-5s").await;

    // The broker's behaviour: take the head, requeue it, and it is now last.
    let probe = conn.create_channel().await.unwrap();
    let head = probe
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    probe
        .basic_nack(
            head.delivery.delivery_tag,
            BasicNackOptions {
                multiple: false,
                requeue: true,
            },
        )
        .await
        .unwrap();
    let _ = probe.close(200, "done".into()).await;
    let order = peek(&conn, &q).await;
    assert_eq!(order.len(), 3);
    assert_eq!(
        order.last().map(String::as_str),
        Some("occupied-1h"),
        "{order:?}"
    );

    // The sweeper refuses, and the queue stays as it was.
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let run = sweeper.sweep_once(&[Target::Events], false).await;
    let TargetOutcome::Failed(e) = &run[0].1 else {
        panic!("a quorum queue was swept: {:?}", run[0]);
    };
    assert!(e.to_string().contains("quorum"), "{e}");
    // (peek takes every message and requeues them all, which keeps their order.)
    assert_eq!(
        peek(&conn, &q).await,
        order,
        "the refused sweep moved messages"
    );
    sweeper.release().await;
    let _ = conn.close(200, "done".into()).await;
    amqp_delete(&settings).await;
}
