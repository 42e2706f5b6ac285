//! Failover on a private 3-node NATS cluster (R3 streams) with two bridge replicas: the events
//! stream's leader SIGKILLed twice under load, a rolling restart of every node under load, the
//! same webhook on both replicas across a leader change, the sweeper lease moving when its
//! holder and the holder's node die, and `dlq replay` / `sweep --once` against the cluster
//! through the whole server list. Every event of every webhook answered 200 must be in the
//! events stream exactly once (counted by message id), with nothing in the DLQ, the quarantine
//! file or a spool.
//!
//! Each test prints what it measured (events/s, time until the stream had a leader again) as
//! `FIGURE ...` lines: `cargo nextest run --test nats_cluster --no-capture`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::nats_cluster::NatsCluster;
use crate::common::*;
use async_nats::jetstream;
use futures::StreamExt;
use pusher_bridge::config::{SecretUrl, Settings};
use pusher_bridge::routing;

/// Settings of one bridge replica on `cluster`: the whole server list, R3 streams, its own
/// spool directory (`replica` names it), the same streams and prefix as its siblings.
fn replica_settings(base: &Settings, replica: usize) -> Settings {
    let mut s = base.clone();
    s.spool.dir = std::env::temp_dir().join(format!(
        "pusher-bridge-{}-r{replica}",
        s.broker.subject_prefix
    ));
    s
}

fn cluster_settings(cluster: &NatsCluster) -> Settings {
    let mut s = nats_settings();
    s.broker.nats.url = SecretUrl::new(cluster.urls());
    s.broker.nats.replicas = 3;
    s
}

/// One posted webhook: its body and the answer.
struct Posted {
    body: String,
    status: u16,
    took: Duration,
    answer: String,
}

/// `per_app` posters on each app, posting unique two-event webhooks for `run_for`.
fn start_load(
    apps: &[Arc<TestApp>],
    per_app: u64,
    run_for: Duration,
) -> Vec<tokio::task::JoinHandle<Vec<Posted>>> {
    let stop_at = Instant::now() + run_for;
    let mut handles = Vec::new();
    for (a, app) in apps.iter().enumerate() {
        for p in 0..per_app {
            let app = app.clone();
            handles.push(tokio::spawn(async move {
                let mut out = Vec::new();
                let mut i = 0u64;
                while Instant::now() < stop_at {
                    let tag = format!("{a}-{p}-{i}");
                    let body = webhook_body(
                        1_700_000_000_000 + i,
                        &[
                            &format!(r#"{{"name":"channel_occupied","channel":"load-{tag}"}}"#),
                            &format!(
                                r#"{{"name":"member_added","channel":"presence-{tag}","user_id":"u"}}"#
                            ),
                        ],
                    );
                    let started = Instant::now();
                    let answer = app.post_signed(&body).await;
                    out.push(Posted {
                        body,
                        status: answer.status.as_u16(),
                        took: started.elapsed(),
                        answer: answer.body,
                    });
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                out
            }));
        }
    }
    handles
}

/// The message ids of every event of `body`'s webhook (two per webhook here).
fn ids_of(body: &str, events: usize) -> Vec<String> {
    let digest = routing::webhook_digest(APP_ID, body.as_bytes());
    (0..events)
        .map(|i| routing::message_id(&digest, i))
        .collect()
}

/// How often each message id occurs in `stream` (read with an ordered consumer). Retried a few
/// times: right after a failover the test's own connection may still be moving to another node.
async fn ids_in(js: &jetstream::Context, stream: &str) -> HashMap<String, usize> {
    let mut last = String::new();
    for _ in 0..10 {
        match try_ids_in(js, stream).await {
            Ok(counts) => return counts,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("cannot read {stream}: {last}");
}

async fn try_ids_in(
    js: &jetstream::Context,
    stream: &str,
) -> Result<HashMap<String, usize>, String> {
    let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let total = s.info().await.map_err(|e| e.to_string())?.state.messages;
    let mut counts = HashMap::new();
    if total == 0 {
        return Ok(counts);
    }
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut read = 0;
    while read < total {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| format!("stalled after {read} of {total} messages"))?
            .ok_or("the consumer ended")?
            .map_err(|e| e.to_string())?;
        let id = next
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        *counts.entry(id).or_insert(0) += 1;
        read += 1;
    }
    Ok(counts)
}

/// Waits until every app's spool is empty (the drainer delivered what the outage left there).
async fn wait_spools_empty(apps: &[Arc<TestApp>], within: Duration) {
    let deadline = Instant::now() + within;
    for app in apps {
        loop {
            if app.metric("pusher_bridge_spool_events").await == 0.0 {
                break;
            }
            assert!(Instant::now() < deadline, "a spool did not drain");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a load run left: (webhooks answered, events answered, events spooled, slowest answer).
async fn collect(handles: Vec<tokio::task::JoinHandle<Vec<Posted>>>) -> Vec<Posted> {
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("poster"));
    }
    all
}

/// Every answer was 200, and every event of every webhook is in the events stream exactly
/// once; nothing in the DLQ, the quarantine file or a spool. Returns (events, spooled, slowest
/// answer, time the spools took to drain after the load ended).
async fn assert_exactly_once(
    cluster: &NatsCluster,
    settings: &Settings,
    apps: &[Arc<TestApp>],
    posted: &[Posted],
) -> (usize, usize, Duration, Duration) {
    for p in posted {
        assert_eq!(p.status, 200, "{}", p.answer);
    }
    let spooled: usize = posted
        .iter()
        .map(|p| {
            serde_json::from_str::<serde_json::Value>(&p.answer).expect("JSON answer")["spooled"]
                .as_u64()
                .unwrap_or(0) as usize
        })
        .sum();
    let slowest = posted.iter().map(|p| p.took).max().unwrap_or_default();
    let draining = Instant::now();
    wait_spools_empty(apps, Duration::from_secs(40)).await;
    let drained = draining.elapsed();
    let js = cluster.jetstream().await;
    let want: Vec<String> = posted.iter().flat_map(|p| ids_of(&p.body, 2)).collect();
    wait_stream_count(
        &js,
        &settings.broker.nats.stream,
        want.len() as u64,
        Duration::from_secs(10),
    )
    .await;
    let stored = ids_in(&js, &settings.broker.nats.stream).await;
    let missing: Vec<&String> = want.iter().filter(|id| !stored.contains_key(*id)).collect();
    let twice: Vec<(&String, &usize)> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events are not in the stream (first: {:?})",
        missing.len(),
        want.len(),
        missing.first()
    );
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert_eq!(
        stored.len(),
        want.len(),
        "the stream holds events nobody posted"
    );
    let dlq = wait_stream_count(&js, &settings.broker.nats.dlq_stream, 1, Duration::ZERO).await;
    assert_eq!(dlq, 0, "events were dead-lettered");
    for app in apps {
        assert_eq!(
            app.metric("pusher_bridge_events_dead_lettered_total").await,
            0.0
        );
        let quarantine = app
            .settings
            .spool
            .dir
            .join(pusher_bridge::spool::QUARANTINE_FILE);
        let size = std::fs::metadata(&quarantine).map(|m| m.len()).unwrap_or(0);
        assert_eq!(size, 0, "records in {}", quarantine.display());
    }
    (want.len(), spooled, slowest, drained)
}

/// Two bridge replicas on `cluster`, up, their streams R3 with a leader and current replicas.
async fn two_replicas(cluster: &NatsCluster, settings: &Settings) -> Vec<Arc<TestApp>> {
    let mut apps = Vec::new();
    for r in 0..2 {
        apps.push(Arc::new(
            TestApp::spawn_ready(replica_settings(settings, r)).await,
        ));
    }
    let js = cluster.jetstream().await;
    for stream in [
        &settings.broker.nats.stream,
        &settings.broker.nats.dlq_stream,
    ] {
        cluster.wait_stream_healthy(&js, stream).await;
        let info = js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        assert_eq!(info.config.num_replicas, 3, "{stream} is R3");
    }
    apps
}

async fn stop_all(apps: Vec<Arc<TestApp>>) {
    for app in apps {
        if let Ok(app) = Arc::try_unwrap(app) {
            app.stop().await;
        }
    }
}

/// Kills the events stream's leader, measures until the stream has a leader again, restarts
/// the node after `down_for` and waits until its replica is current again.
async fn kill_leader(
    cluster: &mut NatsCluster,
    js: &jetstream::Context,
    stream: &str,
    down_for: Duration,
) -> Duration {
    let leader = cluster.wait_stream_healthy(js, stream).await;
    cluster.kill(leader);
    let killed = Instant::now();
    let mut recovered = None;
    while killed.elapsed() < Duration::from_secs(40) {
        if let Some(name) = cluster.stream_leader(js, stream).await
            && cluster.index_of(&name) != Some(leader)
        {
            recovered = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = recovered.expect("a new leader after the kill");
    tokio::time::sleep(down_for.saturating_sub(killed.elapsed())).await;
    cluster.restart(leader).await;
    cluster.wait_stream_healthy(js, stream).await;
    recovered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_twice_under_load_loses_nothing_and_duplicates_nothing() {
    let mut cluster = NatsCluster::start().await;
    let settings = cluster_settings(&cluster);
    let apps = two_replicas(&cluster, &settings).await;
    let js = cluster.jetstream().await;
    let stream = settings.broker.nats.stream.clone();

    // The same webhook on both replicas at once: one message per event.
    let same = webhook_body(
        1_600_000_000_000,
        &[
            r#"{"name":"channel_vacated","channel":"dup"}"#,
            r#"{"name":"channel_occupied","channel":"dup"}"#,
        ],
    );
    let (a, b) = tokio::join!(apps[0].post_signed(&same), apps[1].post_signed(&same));
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (200, 200),
        "{} {}",
        a.body,
        b.body
    );

    let run_for = Duration::from_secs(9);
    let started = Instant::now();
    let load = start_load(&apps, 2, run_for);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let first = kill_leader(&mut cluster, &js, &stream, Duration::from_millis(1500)).await;
    let second = kill_leader(&mut cluster, &js, &stream, Duration::from_millis(1500)).await;
    let mut posted = collect(load).await;
    let elapsed = started.elapsed();

    // After two leader changes, the first webhook and some early load webhooks again, each on
    // the other replica: the duplicate window holds across the leader changes.
    for (i, p) in posted.iter().take(20).enumerate() {
        let again = apps[i % 2].post_signed(&p.body).await;
        assert_eq!(again.status, 200, "{}", again.body);
    }
    let again = apps[1].post_signed(&same).await;
    assert_eq!(again.status, 200, "{}", again.body);
    posted.push(Posted {
        body: same,
        status: 200,
        took: Duration::ZERO,
        answer: a.body,
    });

    let (events, spooled, slowest, drained) =
        assert_exactly_once(&cluster, &settings, &apps, &posted).await;
    println!(
        "FIGURE leader-kill: {} webhooks, {events} events in {elapsed:.1?} ({:.0} events/s answered), \
         {spooled} spooled, slowest answer {slowest:.2?}, spools empty {drained:.2?} after the load; \
         new leader {first:.2?} and {second:.2?} after the kills",
        posted.len(),
        events as f64 / elapsed.as_secs_f64()
    );
    stop_all(apps).await;
    delete_streams(&js, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_under_load_loses_nothing() {
    let mut cluster = NatsCluster::start().await;
    let settings = cluster_settings(&cluster);
    let apps = two_replicas(&cluster, &settings).await;
    let js = cluster.jetstream().await;
    let stream = settings.broker.nats.stream.clone();

    let started = Instant::now();
    let load = start_load(&apps, 2, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut rejoin = Vec::new();
    for i in 0..3 {
        cluster.stop(i).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.restart(i).await;
        let back = Instant::now();
        cluster.wait_stream_healthy(&js, &stream).await;
        rejoin.push(back.elapsed());
    }
    let posted = collect(load).await;
    let elapsed = started.elapsed();
    let (events, spooled, slowest, drained) =
        assert_exactly_once(&cluster, &settings, &apps, &posted).await;
    println!(
        "FIGURE rolling-restart: {} webhooks, {events} events in {elapsed:.1?} ({:.0} events/s answered), \
         {spooled} spooled, slowest answer {slowest:.2?}, spools empty {drained:.2?} after the load; \
         nodes current again after {rejoin:.2?}",
        posted.len(),
        events as f64 / elapsed.as_secs_f64()
    );
    stop_all(apps).await;
    delete_streams(&js, &settings).await;
}

/// The answer of `acquire_lease`, asked again while requests time out (a lease request waits a
/// third of the TTL: on a loaded machine, or while a new bucket elects its leader, that can pass).
async fn lease_answer(
    sweeper: &mut pusher_bridge::sweeper::Sweeper,
) -> pusher_bridge::sweeper::LeaseStatus {
    let started = Instant::now();
    loop {
        match sweeper.acquire_lease().await {
            Ok(status) => return status,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(20), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_lease_moves_when_its_holder_and_its_node_die() {
    use pusher_bridge::metrics::Metrics;
    use pusher_bridge::sweeper::{LeaseStatus, Sweeper};

    let mut cluster = NatsCluster::start().await;
    let mut settings = cluster_settings(&cluster);
    settings.retention.lease_ttl = Duration::from_secs(2);
    let js = cluster.jetstream().await;
    let bucket_stream = format!("KV_{}", pusher_bridge::sweeper::lease_bucket(&settings));

    // The bucket is created by the first replica, R3. Its stream elects a leader a moment
    // after creation: a lease request meanwhile times out (a third of the TTL) and the sweeper
    // tries again, as its loop does on the next interval.
    let mut probe = Sweeper::new(Arc::new(settings.clone()), Arc::new(Metrics::new()))
        .await
        .unwrap();
    assert_eq!(lease_answer(&mut probe).await, LeaseStatus::Held);
    probe.release().await;
    drop(probe);
    let leader = cluster.wait_stream_healthy(&js, &bucket_stream).await;
    let info = js
        .get_stream(&bucket_stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3, "the lease bucket is R3");

    // A talks to the bucket leader's node only (no discovered servers matter once it is gone
    // with it), B to the other two.
    let mut a_settings = settings.clone();
    a_settings.broker.nats.url = SecretUrl::new(cluster.url(leader));
    let others: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| cluster.url(i))
        .collect();
    let mut b_settings = settings.clone();
    b_settings.broker.nats.url = SecretUrl::new(others.join(","));
    let mut a = Sweeper::new(Arc::new(a_settings), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let mut b = Sweeper::new(Arc::new(b_settings), Arc::new(Metrics::new()))
        .await
        .unwrap();
    assert_eq!(lease_answer(&mut a).await, LeaseStatus::Held);
    assert!(matches!(
        lease_answer(&mut b).await,
        LeaseStatus::Elsewhere(_)
    ));

    // The holder crashes (no release) together with its node, which led the bucket.
    drop(a);
    cluster.kill(leader);
    let died = Instant::now();
    // The lease key expires after its TTL; the bucket's stream needs a new leader first (a
    // Raft election: 4 to 9 s on NATS 2.9).
    let moved = loop {
        let status = b.acquire_lease().await;
        if let Ok(LeaseStatus::Held) = status {
            break died.elapsed();
        }
        assert!(
            died.elapsed() < Duration::from_secs(30),
            "the lease never moved; last: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(b.holds_lease());
    assert!(
        moved >= Duration::from_millis(1500),
        "taken after {moved:?}, before the holder's lease could expire"
    );
    println!(
        "FIGURE lease: moved to the other replica {moved:.2?} after holder and node died (ttl 2 s)"
    );
    b.release().await;
    cluster.restart(leader).await;
    delete_streams(&js, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_with_a_node_down_and_sweep_run_against_the_cluster() {
    use pusher_bridge::broker::nats::NatsBroker;
    use pusher_bridge::broker::{DeadLetter, DlqReason};
    use pusher_bridge::metrics::Metrics;

    let mut cluster = NatsCluster::start().await;
    let mut settings = cluster_settings(&cluster);
    settings.retention.events.max_age = Duration::from_secs(1);
    settings.retention.dlq.enabled = false;
    let js = cluster.jetstream().await;

    // The bridge's own broker declares the R3 streams and stores 20 replayable dead letters.
    let broker = NatsBroker::connect(&settings, Arc::new(Metrics::new()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !broker.is_up() {
        assert!(Instant::now() < deadline, "broker not up on the cluster");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dlq_leader = cluster
        .wait_stream_healthy(&js, &settings.broker.nats.dlq_stream)
        .await;
    for i in 0..20 {
        let dl = DeadLetter {
            message: load::event_message(&settings, i, "replay"),
            reason: DlqReason::NoStream,
            detail: "test".into(),
            attempts: 1,
            first_failure_ms: 1,
        };
        // A stream that has just elected its leader may still answer "no responders" for a
        // moment (seen on 2.12): the bridge would retry, so does the test.
        let mut tries = 0;
        while let Err(e) = broker
            .publish_dead_letter(&dl, Duration::from_secs(5))
            .await
        {
            tries += 1;
            assert!(e.is_transient() && tries < 50, "dead letter stored: {e:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    broker.close().await;
    drop(broker);

    // The DLQ stream's leader goes down: the tools reach the others through the server list.
    cluster.kill(dlq_leader);
    cluster
        .wait_stream_leader(&js, &settings.broker.nats.dlq_stream)
        .await;
    cluster
        .wait_stream_leader(&js, &settings.broker.nats.stream)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, settings.to_redacted_toml()).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pusher-bridge"));
        cmd.args(args).arg("--config").arg(&file);
        for (k, _) in std::env::vars() {
            if k.starts_with("PUSHER_BRIDGE_") {
                cmd.env_remove(k);
            }
        }
        cmd.output().expect("pusher-bridge runs")
    };
    let replay = tokio::task::block_in_place(|| run(&["dlq", "replay"]));
    let out = String::from_utf8_lossy(&replay.stdout);
    assert!(
        replay.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let events = ids_in(&js, &settings.broker.nats.stream).await;
    assert_eq!(events.len(), 20, "{out}");
    assert!(events.values().all(|n| *n == 1));
    let left = wait_stream_count(&js, &settings.broker.nats.dlq_stream, 1, Duration::ZERO).await;
    assert_eq!(left, 0, "{out}");

    // The sweep creates its KV buckets R3, which needs all three nodes.
    cluster.restart(dlq_leader).await;
    cluster
        .wait_stream_healthy(&js, &settings.broker.nats.stream)
        .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sweep = tokio::task::block_in_place(|| run(&["sweep", "--once"]));
    let out = String::from_utf8_lossy(&sweep.stdout);
    assert!(
        sweep.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&sweep.stderr)
    );
    assert!(out.contains("purged 20 message(s)"), "{out}");
    assert_eq!(
        wait_stream_count(&js, &settings.broker.nats.stream, 1, Duration::ZERO).await,
        0
    );
    let lease = format!("KV_{}", pusher_bridge::sweeper::lease_bucket(&settings));
    let info = js
        .get_stream(&lease)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3, "the lease bucket is R3");
    delete_streams(&js, &settings).await;
}
