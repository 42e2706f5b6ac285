//! Channel state on a private 3-node NATS cluster (R3 events stream, R3 state bucket) with two
//! bridge replicas: the state bucket's leader and then the events stream's leader are SIGKILLed
//! while both replicas take member and count webhooks, newest first. Once the cluster has its
//! leaders back, both replicas must answer the state of the in-order sequence: no update lost
//! to an election, none applied twice in a way that shows, no stale event winning.
//!
//! Runs alone (see `.config/nextest.toml`): three nats-servers and two bridges need the whole
//! 2-core machine for their elections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::nats_cluster::NatsCluster;
use crate::common::state::*;
use crate::common::*;
use pusher_bridge::broker::nats::ServerVersion;
use pusher_bridge::config::{SecretUrl, Settings};
use pusher_bridge::state::StateStore;
use pusher_bridge::state::merge::{Change, Stamp, Update};

/// How long the replicas may take to converge after the last kill (elections, redeliveries).
const CONVERGE: Duration = Duration::from_secs(60);

fn replica(base: &Settings, r: usize) -> Settings {
    let mut s = base.clone();
    s.spool.dir = std::env::temp_dir().join(format!(
        "pusher-bridge-{}-state-r{r}",
        s.broker.subject_prefix
    ));
    s
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Posts every body alternately on the replicas, all at once; returns the statuses.
async fn post_spread(apps: &[Arc<TestApp>], bodies: &[String]) -> Vec<u16> {
    let posts = bodies.iter().enumerate().map(|(i, body)| {
        let app = apps[i % apps.len()].clone();
        async move { app.post_signed(body).await.status.as_u16() }
    });
    futures::future::join_all(posts).await
}

/// Kills `stream`'s leader, waits for a new one, restarts the node after `down_for`.
async fn kill_leader_of(
    cluster: &mut NatsCluster,
    js: &async_nats::jetstream::Context,
    stream: &str,
    during: impl std::future::Future<Output = Vec<u16>>,
    down_for: Duration,
) -> Vec<u16> {
    let leader = cluster.wait_stream_healthy(js, stream).await;
    cluster.kill(leader);
    let killed = Instant::now();
    let statuses = during.await;
    tokio::time::sleep(down_for.saturating_sub(killed.elapsed())).await;
    cluster.restart(leader).await;
    cluster.wait_stream_healthy(js, stream).await;
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_leader_kills_of_its_bucket_and_stream_with_two_replicas() {
    let mut cluster = NatsCluster::start().await;
    let mut settings = state_settings(pusher_bridge::config::BrokerKind::Nats);
    settings.broker.nats.url = SecretUrl::new(cluster.urls());
    settings.broker.nats.replicas = 3;
    let mut apps = Vec::new();
    for r in 0..2 {
        apps.push(Arc::new(TestApp::spawn_ready(replica(&settings, r)).await));
    }
    let js = cluster.jetstream().await;
    let bucket = format!("KV_{}", settings.state.bucket);
    let events = settings.broker.nats.stream.clone();

    let t0 = now_ms() - 60_000;
    let room = "presence-cluster";
    let counted = "private-counted";
    // Phase 1: the channels and 20 members, newest first.
    let mut first = vec![body(t0, &[occupancy(room, true), occupancy(counted, true)])];
    for i in 0..20u64 {
        first.push(body(t0 + 1 + i, &[member(room, &format!("u{i:02}"), true)]));
    }
    first.reverse();
    let statuses = post_spread(&apps, &first).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    wait_for(
        &apps[0],
        &app_path(&format!("/channels/{room}/users")),
        &[],
        CONVERGE,
        |b| user_ids(b).len() == 20,
    )
    .await;
    let bucket_info = js
        .get_stream(&bucket)
        .await
        .expect("the state bucket exists")
        .info()
        .await
        .expect("bucket info")
        .clone();
    assert_eq!(bucket_info.config.num_replicas, 3, "the state bucket is R3");

    // Phase 2, while the bucket's leader is down: 20 more members, 10 of the first removed,
    // and 30 subscription counts, newest first.
    let mut second = Vec::new();
    for i in 20..40u64 {
        second.push(body(
            t0 + 100 + i,
            &[member(room, &format!("u{i:02}"), true)],
        ));
    }
    for i in 0..10u64 {
        second.push(body(
            t0 + 200 + i,
            &[member(room, &format!("u{i:02}"), false)],
        ));
    }
    for n in 1..=30u64 {
        second.push(body(t0 + 300 + n, &[count(counted, n)]));
    }
    second.reverse();
    let statuses = kill_leader_of(
        &mut cluster,
        &js,
        &bucket,
        post_spread(&apps, &second),
        Duration::from_millis(1500),
    )
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // Phase 3, while the events stream's leader is down: the last 5 members leave, and an old
    // `member_added` of one removed member arrives late (it must not bring the member back).
    let mut third = Vec::new();
    for i in 35..40u64 {
        third.push(body(
            t0 + 400 + i,
            &[member(room, &format!("u{i:02}"), false)],
        ));
    }
    third.push(body(t0 + 5, &[member(room, "u03", true)]));
    let statuses = kill_leader_of(
        &mut cluster,
        &js,
        &events,
        post_spread(&apps, &third),
        Duration::from_millis(1500),
    )
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let want: Vec<String> = (10..35).map(|i| format!("u{i:02}")).collect();
    let started = Instant::now();
    for app in &apps {
        wait_for(
            app,
            &app_path(&format!("/channels/{room}/users")),
            &[],
            CONVERGE,
            |b| user_ids(b) == want,
        )
        .await;
        wait_for(
            app,
            &app_path(&format!("/channels/{counted}")),
            &[("info", "subscription_count")],
            CONVERGE,
            |b| b["occupied"] == true && b["subscription_count"] == 30,
        )
        .await;
    }
    println!(
        "FIGURE state-cluster: {} webhooks over two leader kills; both replicas converged {:.2?} \
         after the last restart",
        first.len() + second.len() + third.len(),
        started.elapsed()
    );
    for app in apps {
        if let Ok(app) = Arc::try_unwrap(app) {
            app.stop().await;
        }
    }
    delete_streams(&js, &settings).await;
    let _ = js.delete_stream(&bucket).await;
}

/// A shuffle by a small LCG (no randomness crate here); the seed is printed so a failing order
/// can be replayed.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = (seed >> 33) as usize % (i + 1);
        items.swap(i, j);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_applying_400_presence_updates_in_random_order_never_fail_an_update() {
    // On NATS 2.11+ the second of two compare-and-sets naming one revision is refused as
    // `wrong last sequence` (10164); the store must take that as the conflict it is (it used
    // to log `update failed` and wait for redelivery: 96 of 400 on 2.15).
    let cluster = NatsCluster::start().await;
    let mut settings = state_settings(pusher_bridge::config::BrokerKind::Nats);
    settings.broker.nats.url = SecretUrl::new(cluster.urls());
    settings.broker.nats.replicas = 3;
    let mut apps = Vec::new();
    for r in 0..2 {
        apps.push(Arc::new(TestApp::spawn_ready(replica(&settings, r)).await));
    }
    let js = cluster.jetstream().await;
    let room = "presence-random";
    let t0 = now_ms() - 60_000;
    // 200 members join; every second one leaves; every fourth comes back; 50 counts.
    let mut bodies = vec![body(t0, &[occupancy(room, true)])];
    for i in 0..200u64 {
        let user = format!("u{i:03}");
        bodies.push(body(t0 + 10 * i + 1, &[member(room, &user, true)]));
        if i % 2 == 0 {
            bodies.push(body(t0 + 10 * i + 5, &[member(room, &user, false)]));
        }
        if i % 4 == 0 {
            bodies.push(body(t0 + 10 * i + 7, &[member(room, &user, true)]));
        }
    }
    for n in 1..=49u64 {
        bodies.push(body(t0 + 3000 + n, &[count(room, n)]));
    }
    assert_eq!(bodies.len(), 400);
    let seed = now_ms();
    shuffle(&mut bodies, seed);
    let started = Instant::now();
    let statuses = post_spread(&apps, &bodies).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let want: Vec<String> = (0..200u64)
        .filter(|i| i % 2 == 1 || i % 4 == 0)
        .map(|i| format!("u{i:03}"))
        .collect();
    for app in &apps {
        wait_for(
            app,
            &app_path(&format!("/channels/{room}/users")),
            &[],
            CONVERGE,
            |b| user_ids(b) == want,
        )
        .await;
        wait_for(
            app,
            &app_path(&format!("/channels/{room}")),
            &[("info", "subscription_count")],
            CONVERGE,
            |b| b["subscription_count"] == 49,
        )
        .await;
    }
    let mut failed = 0.0;
    for app in &apps {
        failed += app
            .metric("pusher_bridge_state_updates_total{outcome=\"failed\"}")
            .await;
    }
    println!(
        "FIGURE state-random: 400 webhooks (seed {seed}) on two replicas converged in {:.2?}, \
         {failed} failed updates",
        started.elapsed()
    );
    assert_eq!(failed, 0.0, "seed {seed}");
    for app in apps {
        if let Ok(app) = Arc::try_unwrap(app) {
            app.stop().await;
        }
    }
    delete_streams(&js, &settings).await;
    let _ = js
        .delete_stream(format!("KV_{}", settings.state.bucket))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_write_on_a_replicated_bucket_waits_for_a_read_back_only_where_the_server_needs_it()
{
    // NATS before 2.9.21 could take two compare-and-sets naming one revision (nats-server#4320),
    // so there a writer reads its write back 200 ms later; newer servers refuse the second.
    let cluster = NatsCluster::start().await;
    cluster.wait_meta_leader().await;
    let client = async_nats::connect(cluster.url(0)).await.unwrap();
    let version = ServerVersion::of_connected(&client)
        .await
        .expect("a version");
    let bucket = unique("ST");
    // As the bridge does (`state::open_store`): a young cluster may not answer at once.
    let mut tries = 0;
    let store = loop {
        match StateStore::open(client.clone(), &bucket, 3).await {
            Ok(store) => break store,
            Err(e) => {
                tries += 1;
                assert!(tries < 10, "the bucket never opened: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let js = cluster.jetstream().await;
    cluster
        .wait_stream_healthy(&js, &format!("KV_{bucket}"))
        .await;
    const WRITES: u32 = 20;
    let started = Instant::now();
    for n in 0..WRITES {
        let update = Update {
            app_id: APP_ID.into(),
            channel: "private-timed".into(),
            change: Change::SubscriptionCount(u64::from(n)),
            stamp: Stamp {
                time_ms: 1_000_000 + i64::from(n),
                index: 0,
                webhook: format!("w{n}"),
            },
        };
        store.apply(&update).await.unwrap();
    }
    let per_write = started.elapsed() / WRITES;
    println!("FIGURE state-write: {per_write:.2?} per write on an R3 bucket of NATS {version}");
    if version.has(ServerVersion::CAS_EXACT) {
        assert!(per_write < Duration::from_millis(100), "{per_write:?}");
    } else {
        assert!(per_write >= Duration::from_millis(200), "{per_write:?}");
    }
    let _ = js.delete_stream(format!("KV_{bucket}")).await;
}
