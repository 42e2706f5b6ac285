//! Quorum queues on a private 3-node RabbitMQ cluster (same host, own node names and ports):
//! the events queue's leader SIGKILLed and restarted while posters keep sending webhooks to a
//! bridge connected to another node. Every event of every webhook answered 200 must be in the
//! events queue afterwards (RabbitMQ has no duplicate window: a publish retried after a lost
//! confirm may be there twice, which the test reports), nothing in the DLQ or the spool.
//!
//! The second test lists all three nodes in `broker.amqp.url` and kills the node the bridge (a
//! real `pusher-bridge serve`) is connected to, the queues' leader too: it must fail over to
//! another node and keep answering 200, nothing answered 200 may be lost, and an event stored
//! twice must carry the same `message_id` both times. The third pins down the RabbitMQ
//! behaviour that failover meets: a channel that first publishes to a quorum queue during its
//! election is nacked for good (why the bridge replaces a channel nacked before any ack).
//!
//! The last runs one node with a small `max_message_size`: RabbitMQ closes the channel of a
//! message over it, failing every publish in flight on that channel with the same error; only
//! that message may be `too_large`.
//!
//! Runs alone (see `.config/nextest.toml`): three RabbitMQ nodes and a bridge under load need
//! the whole 2-core machine. Prints `FIGURE ...`: `cargo nextest run --test amqp_cluster
//! --no-capture`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    let mut counts = HashMap::new();
    for (id, _) in messages_in(url, queue).await {
        *counts.entry(id).or_insert(0) += 1;
    }
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

/// Every message in `queue` as (`message_id`, body), taken off it with basic.get.
async fn messages_in(url: &str, queue: &str) -> Vec<(String, Vec<u8>)> {
    let (conn, ch) = connect(url).await;
    let mut out = Vec::new();
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
        out.push((id, m.delivery.data));
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

/// A value of `/metrics` (0 when the series is missing).
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The `spooled` count of a webhook's JSON answer.
fn spooled_in(answer: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(answer).ok()?["spooled"].as_u64()
}

/// One webhook the posters sent: when, its body, and the answer (None: no answer at all).
struct Sent {
    at: Instant,
    body: String,
    answer: Option<(u16, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_the_bridge_is_on_killed_under_load_it_fails_over_and_loses_nothing() {
    let Some(mut cluster) = RabbitCluster::start().await else {
        return;
    };
    let settings = settings_for(BrokerKind::Amqp);
    let a = &settings.broker.amqp;
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let shown = |i: usize| format!("amqp://guest:***@127.0.0.1:{}/%2f", ports[i]);
    let list = (0..3).map(|i| cluster.url(i)).collect::<Vec<_>>().join(",");
    let mut env = process::settings_env(&settings);
    for (key, value) in [
        ("BROKER__KIND", "amqp"),
        ("BROKER__AMQP__URL", list.as_str()),
        ("BROKER__AMQP__QUEUE_TYPE", "quorum"),
        ("BROKER__AMQP__EXCHANGE", &a.exchange),
        ("BROKER__AMQP__QUEUE", &a.queue),
        ("BROKER__AMQP__DLQ_EXCHANGE", &a.dlq_exchange),
        ("BROKER__AMQP__DLQ_QUEUE", &a.dlq_queue),
        ("BROKER__AMQP__CONNECTION_NAME", &a.connection_name),
        // The head sweep refuses quorum queues; nothing to sweep here anyway.
        ("RETENTION__EVENTS__ENABLED", "false"),
        ("RETENTION__DLQ__ENABLED", "false"),
    ] {
        env.push((format!("PUSHER_BRIDGE_{key}"), value.to_string()));
    }
    let mut bridge = process::BridgeProcess::start(&["serve"], env);
    bridge.wait_ready().await;
    let connected_to = |out: &str| -> Vec<usize> {
        out.lines()
            .filter(|l| l.contains("connected to RabbitMQ"))
            .filter_map(|l| (0..3).find(|i| l.contains(&shown(*i))))
            .collect()
    };
    assert_eq!(
        connected_to(&bridge.stdout()),
        [0],
        "the first node first:\n{}",
        bridge.stdout()
    );
    let queue = a.queue.clone();
    let leader = cluster.queue_leader(0, &queue).await;
    assert_eq!(
        leader, 0,
        "the bridge declared the queues on node 0, so their leader is there and dies with it"
    );

    let port = bridge.port;
    let started = Instant::now();
    // The posters run until told: through the kill, the failover and the spool's drain.
    let stop = Arc::new(AtomicBool::new(false));
    // Webhooks answered without spooling anything: published on a node there and then.
    let live = Arc::new(AtomicUsize::new(0));
    let posters: Vec<_> = (0..4u64)
        .map(|p| {
            let (stop, live) = (stop.clone(), live.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let body = webhook_body(
                        1_700_000_000_000 + p * 1_000_000 + i,
                        &[
                            &format!(r#"{{"name":"channel_occupied","channel":"fo-{p}-{i}"}}"#),
                            &format!(
                                r#"{{"name":"member_added","channel":"presence-fo-{p}-{i}","user_id":"u"}}"#
                            ),
                        ],
                    );
                    let at = Instant::now();
                    let answer = process::post_signed(port, APP_KEY, APP_SECRET, &body).await;
                    if answer.as_ref().is_some_and(|(status, body)| {
                        *status == 200 && spooled_in(body) == Some(0)
                    }) {
                        live.fetch_add(1, Ordering::Relaxed);
                    }
                    out.push(Sent { at, body, answer });
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                out
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill(0);
    let killed = Instant::now();
    // Failed over: a reconnect counted and the broker up again.
    let deadline = killed + Duration::from_secs(30);
    loop {
        let text = bridge
            .get("/metrics")
            .await
            .map(|(_, t)| t)
            .unwrap_or_default();
        if series(
            &text,
            r#"pusher_bridge_broker_reconnects_total{broker="amqp"}"#,
        ) >= 1.0
            && series(&text, "pusher_bridge_broker_up") == 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failover within 30 s:\n{}",
            bridge.stdout()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed_over = killed.elapsed();
    let back_at = Instant::now();
    // New webhooks queue behind spooled events until the spool has drained; then they are
    // published at once on the new node. Let the load go on for 3 s, and until 100 more have
    // been.
    let live_at_failover = live.load(Ordering::Relaxed);
    let deadline = back_at + Duration::from_secs(60);
    while live.load(Ordering::Relaxed) < live_at_failover + 100
        || back_at.elapsed() < Duration::from_secs(3)
    {
        assert!(
            Instant::now() < deadline,
            "no webhook published live within 60 s of the failover:\n{}",
            bridge.stdout()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut sent = Vec::new();
    for p in posters {
        sent.extend(p.await.expect("poster"));
    }
    let elapsed = started.elapsed();
    let mut spooled = 0;
    let mut last_spooled = Duration::ZERO;
    for s in &sent {
        let (status, body) = s.answer.as_ref().expect("every webhook got an answer");
        assert_eq!(*status, 200, "{body}");
        let n = spooled_in(body).expect("JSON answer with a spooled count");
        spooled += n;
        if n > 0 && s.at > killed {
            last_spooled = last_spooled.max(s.at - killed);
        }
    }
    let live_after = sent
        .iter()
        .filter(|s| s.at > back_at && s.answer.as_ref().and_then(|(_, b)| spooled_in(b)) == Some(0))
        .count();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = bridge
            .get("/metrics")
            .await
            .map(|(_, t)| t)
            .unwrap_or_default();
        if text.contains("pusher_bridge_spool_events 0\n") {
            assert!(
                text.contains("pusher_bridge_spool_quarantined 0\n"),
                "events were set aside in quarantine:\n{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the spool did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = bridge.stdout();
    assert!(
        out.lines()
            .any(|l| l.contains(&format!("lost the connection to RabbitMQ at {}", shown(0)))),
        "the loss names the node:\n{out}"
    );
    let nodes = connected_to(&out);
    assert!(
        nodes.len() == 2 && nodes[1] != 0,
        "connected to node 0, then to another: {nodes:?}\n{out}"
    );

    // Every event of every webhook answered 200 is in the queue; an event stored twice (a
    // publish in flight at the loss, published again) carries the same message_id each time.
    let want: HashSet<String> = sent
        .iter()
        .flat_map(|s| {
            let digest = routing::webhook_digest(APP_ID, s.body.as_bytes());
            (0..2).map(move |i| routing::message_id(&digest, i))
        })
        .collect();
    let stored = messages_in(&cluster.url(nodes[1]), &queue).await;
    let mut ids_of_event: HashMap<&[u8], Vec<&str>> = HashMap::new();
    for (id, body) in &stored {
        ids_of_event.entry(body).or_default().push(id);
    }
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &stored {
        *copies.entry(id).or_default() += 1;
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|id| !copies.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events answered 200 are not in the queue (first: {:?})",
        missing.len(),
        want.len(),
        missing.first()
    );
    assert_eq!(
        copies.len(),
        want.len(),
        "the queue holds events nobody posted"
    );
    let mut duplicated = 0;
    for (body, ids) in &ids_of_event {
        if ids.len() > 1 {
            duplicated += 1;
            assert!(
                ids.iter().all(|id| *id == ids[0]),
                "an event stored twice under different ids {ids:?}: {}",
                String::from_utf8_lossy(body)
            );
        }
    }
    assert_eq!(
        ids_of_event.len(),
        copies.len(),
        "one message_id per event and one event per message_id"
    );
    let dlq = messages_in(&cluster.url(nodes[1]), &a.dlq_queue).await;
    assert!(dlq.is_empty(), "events were dead-lettered: {}", dlq.len());
    println!(
        "FIGURE amqp-failover: {} webhooks, {} events in {elapsed:.1?} ({:.0} events/s \
         answered); node 0 (the queues' leader) killed, the bridge up on node {} \
         {failed_over:.2?} later; {spooled} events spooled (the last in a webhook posted \
         {last_spooled:.2?} after the kill), {live_after} webhooks published live after the \
         failover, {duplicated} events stored twice (same message_id)",
        sent.len(),
        want.len(),
        want.len() as f64 / elapsed.as_secs_f64(),
        nodes[1]
    );
    assert_eq!(bridge.terminate().await, Some(0), "{}", bridge.stderr());
}

/// A confirm-mode channel on its own connection to `url`.
async fn confirm_channel_at(url: &str) -> (lapin::Connection, lapin::Channel) {
    let (conn, ch) = connect(url).await;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    (conn, ch)
}

/// Publishes one message to `queue` (default exchange) and says how RabbitMQ answered.
async fn ack_or_nack(ch: &lapin::Channel, queue: &str) -> &'static str {
    let confirm = async {
        ch.basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions::default(),
            b"probe",
            lapin::BasicProperties::default(),
        )
        .await?
        .await
    };
    match tokio::time::timeout(Duration::from_secs(5), confirm).await {
        Ok(Ok(lapin::Confirmation::Ack(_))) => "ack",
        Ok(Ok(lapin::Confirmation::Nack(_))) => "nack",
        Ok(Ok(lapin::Confirmation::NotRequested)) => "no confirm",
        Ok(Err(_)) => "error",
        Err(_) => "no answer",
    }
}

/// The RabbitMQ 3.10 behaviour the bridge works around after a failover
/// (`broker::amqp::publish::Health`): a channel whose first publish to a quorum queue comes
/// while the queue's leader is down (here right after SIGKILL, before the election ends)
/// nacks every publish to that queue, for good; a channel that had published before the kill
/// goes on being acked, and so is a channel opened after the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_first_publishing_while_the_quorum_leader_is_down_is_nacked_for_good() {
    let Some(mut cluster) = RabbitCluster::start().await else {
        return;
    };
    let queue = unique("qq-probe");
    let (_c0, ch0) = confirm_channel_at(&cluster.url(0)).await;
    declare_queue(&ch0, &queue, true, queue_arguments(QueueType::Quorum)).await;
    assert_eq!(cluster.queue_leader(0, &queue).await, 0);
    let (_early, early) = confirm_channel_at(&cluster.url(1)).await;
    assert_eq!(ack_or_nack(&early, &queue).await, "ack");
    // Opened before the kill, first publish after it: within the election.
    let (_fresh, fresh) = confirm_channel_at(&cluster.url(1)).await;
    cluster.kill(0);
    let killed = Instant::now();
    assert_eq!(
        ack_or_nack(&fresh, &queue).await,
        "nack",
        "during the election"
    );
    assert_ne!(cluster.queue_leader(1, &queue).await, 0);
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(killed.elapsed())).await;
    assert_eq!(
        ack_or_nack(&fresh, &queue).await,
        "nack",
        "still nacked 3 s after the kill, with a new leader"
    );
    assert_eq!(ack_or_nack(&early, &queue).await, "ack");
    let (_late, late) = confirm_channel_at(&cluster.url(1)).await;
    assert_eq!(
        ack_or_nack(&late, &queue).await,
        "ack",
        "a channel opened after"
    );
}

/// One webhook whose third event is over the node's `max_message_size`, the others small, all
/// sent in order on one channel: RabbitMQ closes the channel at the large one, and every
/// publish in flight on it fails with "message size N is larger than configured max size".
/// Only the large one is too large: the small ones beside it are tried again on a new channel
/// and published, none is dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_message_over_the_max_size_is_too_large_not_those_beside_it() {
    let Some(cluster) = RabbitCluster::start_nodes_with(1, "max_message_size = 2048\n").await
    else {
        return;
    };
    let mut s = settings_for(BrokerKind::Amqp);
    s.broker.amqp.url = SecretUrl::new(cluster.url(0));
    let app = TestApp::spawn_ready(s.clone()).await;
    let small = |i: usize| {
        format!(
            r#"{{"name":"client_event","channel":"private-a","event":"client-{i}","data":"{{}}","socket_id":"1.{i}"}}"#
        )
    };
    let large = format!(
        r#"{{"name":"client_event","channel":"private-a","event":"client-large","data":"{}","socket_id":"1.9"}}"#,
        "x".repeat(4000)
    );
    let events = [small(1), small(2), large, small(3), small(4), small(5)];
    let events: Vec<&str> = events.iter().map(String::as_str).collect();
    let answer = app
        .post_signed(&webhook_body(pusher_bridge::broker::now_ms(), &events))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // An event RabbitMQ stored before the channel closed, whose confirm was lost with it, is
    // published again (RabbitMQ has no duplicate window): the copies share their message id.
    let stored = messages_in(&cluster.url(0), &s.broker.amqp.queue).await;
    let mut names: HashMap<String, String> = HashMap::new();
    for (id, body) in &stored {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let name = v["event"].as_str().unwrap_or_default().to_string();
        let first = names.entry(id.clone()).or_insert_with(|| name.clone());
        assert_eq!(*first, name, "one message id, one event");
    }
    let mut names: Vec<String> = names.into_values().collect();
    names.sort();
    assert_eq!(
        names,
        ["client-1", "client-2", "client-3", "client-4", "client-5"],
        "every small event is published ({})",
        answer.body
    );
    let dead = messages_in(&cluster.url(0), &s.broker.amqp.dlq_queue).await;
    assert!(
        dead.iter().all(|(_, body)| body.len() > 2048),
        "no small event is dead-lettered: {} letters",
        dead.len()
    );
    app.stop().await;
}
