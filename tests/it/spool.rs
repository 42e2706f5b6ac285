//! The local spool with the real NATS: broker outages absorbed without losing or duplicating an
//! event, the bridge killed with SIGKILL while holding spooled events, drain order and ids, a
//! full spool, dead letters and the quarantine file.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::load::*;
use crate::common::*;
use bytes::Bytes;
use pusher_bridge::broker::{DeadLetter, DlqReason, Message};
use pusher_bridge::config::{SecretUrl, Settings};
use pusher_bridge::spool::drain::{DrainReport, Drainer};
use pusher_bridge::spool::{QUARANTINE_FILE, Record, record};
use pusher_bridge::webhook::AppRegistry;

/// Message ids of `stream`, in stream order.
async fn stream_ids(js: &async_nats::jetstream::Context, stream: &str, n: usize) -> Vec<String> {
    stream_messages(js, stream, n)
        .await
        .iter()
        .map(|m| m.header("Nats-Msg-Id").unwrap_or_default().to_string())
        .collect()
}

/// Polls `metric` of `app` until it equals `want` (within 20 s); the last value.
async fn wait_metric(app: &TestApp, metric: &str, want: f64) -> f64 {
    let mut last = f64::NAN;
    for _ in 0..400 {
        last = app.metric(metric).await;
        if last == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_traffic_every_webhook_answered_and_every_event_arrives_once() {
    let mut server = NatsServer::start().await;
    let mut settings = nats_settings();
    settings.broker.nats.url = SecretUrl::new(server.url());
    let app = Arc::new(TestApp::spawn_ready(settings.clone()).await);
    let posters = start_posters(&app, 6, Duration::from_secs(6));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;

    let (answers, spooled) = collect_answers(posters).await;
    let webhooks = answers.len();
    let slowest = answers.iter().map(|a| a.1).max().unwrap_or_default();
    eprintln!("{webhooks} webhooks, {spooled} events spooled, slowest answer {slowest:?}");
    let total = webhooks * EVENTS_PER_WEBHOOK;
    let js = jetstream_ctx(&server.url()).await;
    let count = wait_stream_count(
        &js,
        &settings.broker.nats.stream,
        total as u64,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        count as usize, total,
        "{webhooks} webhooks, {spooled} events spooled"
    );
    assert_eq!(
        wait_metric(&app, "pusher_bridge_spool_events", 0.0).await,
        0.0
    );
    let ids = stream_ids(&js, &settings.broker.nats.stream, total).await;
    assert_eq!(ids.len(), total);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        total,
        "duplicate ids"
    );
    assert!(app.metric("pusher_bridge_spool_written_total").await >= spooled as f64);
    assert!(app.metric("pusher_bridge_spool_drained_total").await >= 1.0);
    // The stream holds exactly the events sent: a second look finds nothing more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        wait_stream_count(&js, &settings.broker.nats.stream, u64::MAX, Duration::ZERO).await
            as usize,
        total
    );
    Arc::try_unwrap(app).ok().unwrap().stop().await;
}

/// A config file for the real binary.
fn write_config(path: &Path, port: u16, nats: &str, id: &str, spool_dir: &Path) -> Settings {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"

[[apps]]
id = "{APP_ID}"
key = "{APP_KEY}"
secret = "{APP_SECRET}"

[broker]
subject_prefix = "{prefix}"

[broker.nats]
url = "{nats}"
stream = "EV_{id}"
dlq_stream = "DLQ_{id}"
duplicate_window = "2m"

[spool]
dir = "{spool}"
drain_interval = "200ms"
"#,
        prefix = id.to_lowercase(),
        spool = spool_dir.display(),
    );
    std::fs::write(path, &text).unwrap();
    Settings::from_toml(&text).unwrap()
}

fn spawn_binary(config: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_pusher-bridge"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "pusher_bridge=info,warn")
        .spawn()
        .expect("the bridge binary runs")
}

async fn wait_healthy(app: &TestApp) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(app.addr).await.is_ok() {
            assert_eq!(app.get("/healthz").await.status, 200);
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the bridge binary did not come up");
}

#[tokio::test]
async fn bridge_killed_with_sigkill_drains_its_spool_after_restart() {
    let mut server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let config = dir.path().join("bridge.toml");
    let id = unique("k");
    let port = free_port();
    let settings = write_config(&config, port, &server.url(), &id, &spool_dir);
    let mut bridge = spawn_binary(&config);
    let app = TestApp::attach(settings.listen_addr().unwrap(), settings.clone());
    wait_healthy(&app).await;
    app.wait_ready().await;

    server.kill();
    assert_eq!(wait_metric(&app, "pusher_bridge_broker_up", 0.0).await, 0.0);
    let webhooks = 40;
    for i in 0..webhooks {
        let body = webhook_body(
            1_700_000_100_000 + i,
            &[
                r#"{"name":"channel_occupied","channel":"k-1"}"#,
                r#"{"name":"channel_vacated","channel":"k-1"}"#,
                r#"{"name":"member_added","channel":"presence-k","user_id":"u"}"#,
            ],
        );
        let a = app.post_signed(&body).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(a.body.contains(r#""spooled":3"#), "{}", a.body);
    }
    let total = webhooks * 3;
    assert_eq!(app.metric("pusher_bridge_spool_events").await, total as f64);
    assert_eq!(app.get("/readyz").await.status, 200, "the spool has room");

    bridge.kill().unwrap(); // SIGKILL
    bridge.wait().unwrap();
    server.restart().await;
    let mut bridge = spawn_binary(&config);
    wait_healthy(&app).await;

    let js = jetstream_ctx(&server.url()).await;
    let count = wait_stream_count(
        &js,
        &settings.broker.nats.stream,
        total,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(count, total);
    assert_eq!(
        wait_metric(&app, "pusher_bridge_spool_events", 0.0).await,
        0.0
    );
    assert_eq!(
        app.metric("pusher_bridge_spool_drained_total").await,
        total as f64
    );
    let ids = stream_ids(&js, &settings.broker.nats.stream, total as usize).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), total as usize);
    bridge.kill().unwrap();
    bridge.wait().unwrap();
}

#[tokio::test]
async fn drainer_publishes_in_arrival_order_with_original_ids() {
    let settings = nats_settings();
    // Generous: a loaded CI machine must not turn slow acks into a failed drain.
    let DrainRig {
        metrics,
        broker,
        spool,
        drainer,
    } = drain_rig(&settings, Duration::from_secs(10)).await;
    // More than two drain batches' worth.
    let n = 1200;
    let msgs: Vec<Message> = (0..n).map(|i| event_message(&settings, i, "ord")).collect();
    // One event was published before the outage: the drain must not store it twice.
    broker
        .publish(&msgs[5], Duration::from_secs(2))
        .await
        .unwrap();
    let malformed = DeadLetter {
        message: Message {
            subject: String::new(),
            body: Bytes::from_static(br#"{"name":"x"}"#),
            ..event_message(&settings, 99, "bad")
        },
        reason: DlqReason::Malformed,
        detail: "event has no channel".into(),
        attempts: 0,
        first_failure_ms: 1,
    };
    let no_stream = Message {
        subject: format!("nostream_{}.a", settings.broker.subject_prefix),
        ..event_message(&settings, 98, "nostream")
    };
    for (k, chunk) in msgs.chunks(100).enumerate() {
        let mut records: Vec<Record> = chunk.iter().cloned().map(Record::Event).collect();
        if k == 1 {
            records.push(Record::DeadLetter(malformed.clone()));
            records.push(Record::Event(no_stream.clone()));
        }
        spool.append(&records).await.unwrap();
    }
    assert_eq!(spool.events(), n as u64 + 2);
    let report = drainer.drain_once().await.unwrap();
    assert_eq!(
        report,
        DrainReport {
            published: n,
            dead_lettered: 2,
            quarantined: 0,
            interrupted: false
        }
    );
    assert!(spool.is_empty());
    let js = jetstream_ctx(&nats_url()).await;
    let ids = stream_ids(&js, &settings.broker.nats.stream, n).await;
    let mut want = vec!["ord-5".to_string()];
    want.extend((0..n).filter(|&i| i != 5).map(|i| format!("ord-{i}")));
    let first_diff = ids.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        (ids.len(), first_diff),
        (want.len(), None),
        "stream order differs at {first_diff:?}: {:?}",
        first_diff.map(|i| &ids[i.saturating_sub(3)..(i + 5).min(ids.len())])
    );
    let dead = stream_messages(&js, &settings.broker.nats.dlq_stream, 2).await;
    // Dead letters are published concurrently: their order in the DLQ is not promised.
    let mut reasons: Vec<_> = dead
        .iter()
        .map(|m| {
            (
                m.header("Pusher-Bridge-Reason").unwrap().to_string(),
                m.header("Pusher-Bridge-Msg-Id").unwrap().to_string(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons[0].0, "malformed");
    assert_eq!(
        reasons[1],
        ("no_stream".to_string(), "nostream-98".to_string())
    );
    let text = metrics.encode();
    assert!(
        text.contains(&format!("pusher_bridge_spool_drained_total {}", n + 2)),
        "{text}"
    );
    assert!(
        text.contains(
            r#"pusher_bridge_events_dead_lettered_total{app_id="123456",reason="no_stream"} 1"#
        ),
        "{text}"
    );
    // Nothing left: a second pass does nothing.
    assert_eq!(drainer.drain_once().await.unwrap(), DrainReport::default());

    spool.close().await;
    broker.close().await;
    delete_streams(&js, &settings).await;
    let _ = std::fs::remove_dir_all(&settings.spool.dir);
}

#[tokio::test]
async fn new_webhooks_queue_behind_spooled_events() {
    let settings = nats_settings();
    let bridge = pusher_bridge::build(settings.clone()).await.unwrap();
    assert!(bridge.broker().wait_up(Duration::from_secs(10)).await);
    // Left from an outage (the drainer has not run yet).
    let earlier: Vec<Record> = (0..3)
        .map(|i| Record::Event(event_message(&settings, i, "early")))
        .collect();
    bridge.spool().append(&earlier).await.unwrap();
    let apps = AppRegistry::new(&settings.apps);
    let app = apps.get(APP_KEY).unwrap();
    let body = Bytes::from(webhook_body(
        7,
        &[r#"{"name":"channel_occupied","channel":"later"}"#],
    ));
    let accepted = bridge.handle(app, &body).await.unwrap();
    assert_eq!((accepted.published, accepted.spooled), (0, 1));

    let drainer = Drainer::new(
        bridge.spool().clone(),
        bridge.broker().clone(),
        bridge.metrics().clone(),
        Duration::from_secs(2),
        Duration::from_secs(1),
    );
    assert_eq!(drainer.drain_once().await.unwrap().published, 4);
    let js = jetstream_ctx(&nats_url()).await;
    let stored = stream_messages(&js, &settings.broker.nats.stream, 4).await;
    let subjects: Vec<_> = stored.iter().map(|m| m.subject.clone()).collect();
    let p = &settings.broker.subject_prefix;
    assert_eq!(
        subjects,
        [
            format!("{p}.123456.channel_occupied.ch-0"),
            format!("{p}.123456.channel_occupied.ch-1"),
            format!("{p}.123456.channel_occupied.ch-2"),
            format!("{p}.123456.channel_occupied.later"),
        ]
    );
    // Spool empty again: the next webhook is published directly.
    let body = Bytes::from(webhook_body(
        8,
        &[r#"{"name":"channel_occupied","channel":"direct"}"#],
    ));
    let accepted = bridge.handle(app, &body).await.unwrap();
    assert_eq!((accepted.published, accepted.spooled), (1, 0));

    bridge.spool().close().await;
    bridge.broker().close().await;
    delete_streams(&js, &settings).await;
    let _ = std::fs::remove_dir_all(&settings.spool.dir);
}

#[tokio::test]
async fn dead_letters_the_dlq_refuses_go_to_the_quarantine_file() {
    // The streams are the operator's (`declare = false`), and the dead-letter stream is
    // missing: a lasting refusal (with `declare = true` the bridge would declare it again).
    let mut settings = nats_settings();
    settings.broker.declare = false;
    let js = jetstream_ctx(&nats_url()).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: settings.broker.nats.stream.clone(),
        subjects: vec![format!("{}.>", settings.broker.subject_prefix)],
        ..Default::default()
    })
    .await
    .unwrap();
    let DrainRig {
        broker,
        spool,
        drainer,
        ..
    } = drain_rig(&settings, Duration::from_secs(2)).await;
    let dl = DeadLetter {
        message: event_message(&settings, 1, "q"),
        reason: DlqReason::TooLarge,
        detail: "too big".into(),
        attempts: 1,
        first_failure_ms: 1,
    };
    spool
        .append(&[
            Record::DeadLetter(dl.clone()),
            Record::Event(event_message(&settings, 2, "q")),
        ])
        .await
        .unwrap();
    let report = drainer.drain_once().await.unwrap();
    assert_eq!((report.published, report.quarantined), (1, 1));
    assert!(spool.is_empty());
    let kept = std::fs::read(settings.spool.dir.join(QUARANTINE_FILE)).unwrap();
    let record::Parsed::Frame { payload, next } = record::parse_at(&kept, 0) else {
        panic!("no frame in the quarantine file");
    };
    assert_eq!(next, kept.len());
    let Record::DeadLetter(back) = record::decode(&kept[payload]).unwrap().record else {
        panic!("not a dead letter");
    };
    assert_eq!(back.message, dl.message);
    assert!(
        back.detail.starts_with("too big; dead-letter queue:"),
        "{}",
        back.detail
    );

    spool.close().await;
    broker.close().await;
    delete_streams(&js, &settings).await;
    let _ = std::fs::remove_dir_all(&settings.spool.dir);
}

#[tokio::test]
async fn a_full_spool_answers_503_and_everything_accepted_arrives_later() {
    let port = free_port();
    let mut settings = nats_settings();
    settings.broker.nats.url = SecretUrl::new(format!("nats://127.0.0.1:{port}"));
    settings.server.max_body_bytes = 1024;
    settings.spool.max_bytes = 4096;
    let app = TestApp::spawn(settings.clone()).await;
    assert_eq!(app.get("/readyz").await.status, 200, "the spool has room");
    let mut accepted = 0;
    let mut refused = false;
    for i in 0..40 {
        let a = app
            .post_signed(&webhook_body(
                100 + i,
                &[r#"{"name":"channel_occupied","channel":"full"}"#],
            ))
            .await;
        match a.status.as_u16() {
            200 => {
                assert!(!refused, "accepted after a refusal: {}", a.body);
                assert!(a.body.contains(r#""spooled":1"#), "{}", a.body);
                accepted += 1;
            }
            503 => {
                refused = true;
                assert!(a.body.contains("spool is full"), "{}", a.body);
                // Why the broker did not take them, as a spooled 200 says it.
                let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
                assert_eq!(v["broker"], "unreachable", "{}", a.body);
                assert!(v["broker_error"].is_string(), "{}", a.body);
                break;
            }
            s => panic!("{s}: {}", a.body),
        }
    }
    assert!(refused && accepted >= 2, "{accepted} accepted");
    assert_eq!(app.get("/readyz").await.status, 503);
    let bytes = app.metric("pusher_bridge_spool_bytes").await;
    assert!(bytes > 0.0 && bytes <= 4096.0, "{bytes}");
    assert_eq!(
        app.metric(
            "pusher_bridge_webhooks_received_total{app_id=\"123456\",outcome=\"unavailable\"}"
        )
        .await,
        1.0
    );

    // The broker appears: everything accepted is published, the spool empties.
    let server = NatsServer::start_on(port).await;
    let js = jetstream_ctx(&server.url()).await;
    app.wait_ready().await;
    let count = wait_stream_count(
        &js,
        &settings.broker.nats.stream,
        accepted,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(count, accepted);
    assert_eq!(
        wait_metric(&app, "pusher_bridge_spool_events", 0.0).await,
        0.0
    );
    assert_eq!(
        wait_metric(&app, "pusher_bridge_spool_bytes", 0.0).await,
        0.0
    );
    app.stop().await;
}

#[tokio::test]
async fn a_graceful_restart_keeps_spooled_events_and_drains_them() {
    let port = free_port();
    let mut settings = nats_settings();
    settings.broker.nats.url = SecretUrl::new(format!("nats://127.0.0.1:{port}"));
    let app = TestApp::spawn(settings.clone()).await;
    for i in 0..5 {
        let a = app
            .post_signed(&webhook_body(
                500 + i,
                &[r#"{"name":"channel_occupied","channel":"restart"}"#],
            ))
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(a.body.contains(r#""spooled":1"#), "{}", a.body);
    }
    // Shutdown stops the drainer and the spool writer and lets go of the spool directory.
    let started = Instant::now();
    app.stop_keeping_spool().await;
    assert!(started.elapsed() < Duration::from_secs(10));

    let server = NatsServer::start_on(port).await;
    let app = TestApp::spawn(settings.clone()).await;
    let js = jetstream_ctx(&server.url()).await;
    app.wait_ready().await;
    let count = wait_stream_count(
        &js,
        &settings.broker.nats.stream,
        5,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(count, 5);
    assert_eq!(
        wait_metric(&app, "pusher_bridge_spool_events", 0.0).await,
        0.0
    );
    app.stop().await;
}
