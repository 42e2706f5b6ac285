//! Quorum queues on a private 3-node RabbitMQ cluster (same host, own node names and ports):
//! the events queue's leader SIGKILLed and restarted while posters keep sending webhooks to a
//! bridge connected to another node. Every event of every webhook answered 200 must be in the
//! events queue afterwards (RabbitMQ has no duplicate window: a publish retried after a lost
//! confirm may be there twice, which the test reports), nothing in the DLQ or the spool.
//!
//! Runs alone (see `.config/nextest.toml`): three RabbitMQ nodes and a bridge under load need
//! the whole 2-core machine. Prints `FIGURE ...`: `cargo nextest run --test amqp_cluster
//! --no-capture`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::rabbit_cluster::RabbitCluster;
use crate::common::*;
use lapin::options::BasicGetOptions;
use pusher_bridge::broker::amqp::topology::queue_arguments;
use pusher_bridge::config::{BrokerKind, QueueType, SecretUrl};
use pusher_bridge::routing;

async fn connect(url: &str) -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to the cluster node");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// How often each `message_id` occurs in `queue` (taken off it with basic.get).
async fn ids_in(url: &str, queue: &str) -> HashMap<String, usize> {
    let (conn, ch) = connect(url).await;
    let mut counts = HashMap::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        *counts.entry(id).or_insert(0) += 1;
    }
    let _ = conn.close(200, "done".into()).await;
    counts
}

struct Posted {
    body: String,
    status: u16,
    answer: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quorum_queue_leader_killed_under_load_loses_nothing() {
    let Some(mut cluster) = RabbitCluster::start().await else {
        println!(
            "NOTICE: no root or no rabbitmq-server here: the RabbitMQ cluster test checked nothing"
        );
        return;
    };
    let mut settings = settings_for(BrokerKind::Amqp);
    settings.broker.amqp.url = SecretUrl::new(cluster.url(0));
    settings.broker.amqp.queue_type = QueueType::Quorum;
    // The queues are declared from node 1 first, so their leader is not the bridge's node 0.
    let (conn, ch) = connect(&cluster.url(1)).await;
    for q in [&settings.broker.amqp.queue, &settings.broker.amqp.dlq_queue] {
        declare_queue(&ch, q, true, queue_arguments(QueueType::Quorum)).await;
    }
    let _ = conn.close(200, "declared".into()).await;
    let app = Arc::new(TestApp::spawn_ready(settings.clone()).await);
    let queue = settings.broker.amqp.queue.clone();
    let leader = cluster.queue_leader(0, &queue).await;
    assert_ne!(leader, 0, "the events queue's leader is on node 1 or 2");

    let run_for = Duration::from_secs(8);
    let stop_at = Instant::now() + run_for;
    let started = Instant::now();
    let posters: Vec<_> = (0..4u64)
        .map(|p| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut i = 0u64;
                while Instant::now() < stop_at {
                    let body = webhook_body(
                        1_700_000_000_000 + i,
                        &[
                            &format!(r#"{{"name":"channel_occupied","channel":"q-{p}-{i}"}}"#),
                            &format!(
                                r#"{{"name":"member_added","channel":"presence-q-{p}-{i}","user_id":"u"}}"#
                            ),
                        ],
                    );
                    let answer = app.post_signed(&body).await;
                    out.push(Posted {
                        body,
                        status: answer.status.as_u16(),
                        answer: answer.body,
                    });
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                out
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.kill(leader);
    let killed = Instant::now();
    let new_leader = cluster.queue_leader(0, &queue).await;
    let elected = killed.elapsed();
    assert_ne!(new_leader, leader);
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(killed.elapsed())).await;
    cluster.restart(leader).await;

    let mut posted = Vec::new();
    for p in posters {
        posted.extend(p.await.expect("poster"));
    }
    let elapsed = started.elapsed();
    for p in &posted {
        assert_eq!(p.status, 200, "{}", p.answer);
    }
    let spooled: u64 = posted
        .iter()
        .map(|p| {
            serde_json::from_str::<serde_json::Value>(&p.answer).expect("JSON answer")["spooled"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.metric("pusher_bridge_spool_events").await != 0.0 {
        assert!(Instant::now() < deadline, "the spool did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let want: Vec<String> = posted
        .iter()
        .flat_map(|p| {
            let digest = routing::webhook_digest(APP_ID, p.body.as_bytes());
            (0..2).map(move |i| routing::message_id(&digest, i))
        })
        .collect();
    let stored = ids_in(&cluster.url(0), &queue).await;
    let missing: Vec<&String> = want.iter().filter(|id| !stored.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events are not in the queue (first: {:?})",
        missing.len(),
        want.len(),
        missing.first()
    );
    assert_eq!(
        stored.len(),
        want.len(),
        "the queue holds events nobody posted"
    );
    let twice = stored.values().filter(|n| **n > 1).count();
    let dlq = ids_in(&cluster.url(0), &settings.broker.amqp.dlq_queue).await;
    assert!(dlq.is_empty(), "events were dead-lettered: {dlq:?}");
    println!(
        "FIGURE amqp-cluster: {} webhooks, {} events in {elapsed:.1?} ({:.0} events/s answered), \
         {spooled} spooled, {twice} stored twice; new queue leader {elected:.2?} after the kill",
        posted.len(),
        want.len(),
        want.len() as f64 / elapsed.as_secs_f64()
    );
    if let Ok(app) = Arc::try_unwrap(app) {
        app.stop().await;
    }
}
