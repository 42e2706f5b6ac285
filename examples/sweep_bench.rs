//! Purge rates of the retention sweeper with per app rules, against the local brokers:
//! `cargo run --example sweep_bench -- [nats|amqp] [MESSAGES]`.
//!
//! NATS: fills a fresh stream with MESSAGES events over 10 apps and 5 event names, waits until
//! they are older than the short retention, then times one `sweep_once` for each scenario:
//! the whole-stream purge (no app rules), five apps with a shorter `max_age` (one filtered purge
//! per app), and a disabled app (no whole-stream purge: the other apps found by a scan and
//! purged app by app). RabbitMQ: fills a fresh queue with MESSAGES events of 10 apps with an old
//! `timestamp` and times the sweep with per app rules (`basic.get` and ack one by one). Streams
//! and queues are unique and deleted afterwards.
//!
//! `ttl` (NATS 2.11+): the same MESSAGES twice, half of the apps due soon, against the
//! server that `NATS_URL` names: once removed by the sweep (one filtered purge per app), once by
//! the server itself from each message's `Nats-TTL` (`retention.events.method = "message_ttl"`).
//! For each it prints the time from due to gone and the CPU the nats-server process spent (read
//! from /proc: run it on the server's machine).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use pusher_bridge::config::{AppRetention, AppSettings, BrokerKind, Secret, SecretUrl, Settings};
use pusher_bridge::metrics::Metrics;
use pusher_bridge::sweeper::{Sweeper, Target, TargetOutcome};

const APPS: usize = 10;
const EVENTS: [&str; 5] = [
    "client_event",
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
];

fn settings(kind: BrokerKind, tag: &str) -> Settings {
    let mut s = Settings::default();
    s.broker.kind = kind;
    s.broker.subject_prefix = format!("bench{tag}");
    s.broker.nats.url = SecretUrl::new(
        std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
    );
    s.broker.nats.stream = format!("BENCH_EV_{tag}");
    s.broker.nats.dlq_stream = format!("BENCH_DLQ_{tag}");
    s.broker.amqp.url = SecretUrl::new(
        std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    );
    s.broker.amqp.queue = format!("bench.ev.{tag}");
    s.broker.amqp.dlq_queue = format!("bench.dlq.{tag}");
    s.retention.dlq.enabled = false;
    s.apps = (0..APPS)
        .map(|i| AppSettings {
            id: format!("a{i}"),
            key: format!("k{i}"),
            secret: Secret::new("s"),
            secret_file: None,
        })
        .collect();
    s
}

fn app_max_age(age: Duration) -> AppRetention {
    AppRetention {
        max_age: Some(age),
        ..AppRetention::default()
    }
}

async fn sweep(settings: &Settings) -> (u64, Duration, String) {
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), Arc::new(Metrics::new()))
        .await
        .expect("sweeper");
    let started = Instant::now();
    let run = sweeper.sweep_once(&[Target::Events], false).await;
    let took = started.elapsed();
    sweeper.release().await;
    match &run[0].1 {
        TargetOutcome::Swept(r) => (r.purged(), took, r.to_string()),
        other => panic!("not swept: {other:?}"),
    }
}

/// A scenario's rules, applied to the base settings.
type Configure = Box<dyn Fn(&mut Settings)>;

async fn nats(n: usize) {
    let tag = format!("{}", std::process::id());
    let base = settings(BrokerKind::Nats, &tag);
    let client = async_nats::connect(base.broker.nats.url.expose())
        .await
        .expect("NATS");
    let js = jetstream::new(client);
    let scenarios: Vec<(&str, Configure)> = vec![
        (
            "whole-stream purge (no app rules)",
            Box::new(|s: &mut Settings| {
                s.retention.events.max_age = Duration::from_secs(1);
            }),
        ),
        (
            "5 of 10 apps with a shorter max_age (one filtered purge per app)",
            Box::new(|s: &mut Settings| {
                s.retention.events.max_age = Duration::from_secs(3600);
                for i in 0..5 {
                    s.retention
                        .events
                        .apps
                        .insert(format!("a{i}"), app_max_age(Duration::from_secs(1)));
                }
            }),
        ),
        (
            "1 of 10 apps disabled (scan, then app by app)",
            Box::new(|s: &mut Settings| {
                s.retention.events.max_age = Duration::from_secs(1);
                s.retention.events.apps.insert(
                    "a9".into(),
                    AppRetention {
                        enabled: false,
                        ..AppRetention::default()
                    },
                );
            }),
        ),
    ];
    for (name, configure) in scenarios {
        let mut s = base.clone();
        configure(&mut s);
        let p = s.broker.subject_prefix.clone();
        let _ = js.delete_stream(&s.broker.nats.stream).await;
        js.create_stream(stream::Config {
            name: s.broker.nats.stream.clone(),
            subjects: vec![format!("{p}.>")],
            ..Default::default()
        })
        .await
        .expect("stream");
        let mut acks = Vec::with_capacity(1000);
        for i in 0..n {
            let subject = format!("{p}.a{}.{}.c{}", i % APPS, EVENTS[(i / APPS) % 5], i % 97);
            acks.push(js.publish(subject, "{}".into()).await.expect("publish"));
            if acks.len() == 1000 {
                for a in acks.drain(..) {
                    a.await.expect("ack");
                }
            }
        }
        for a in acks.drain(..) {
            a.await.expect("ack");
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (purged, took, report) = sweep(&s).await;
        println!(
            "NATS {name}: {purged} of {n} purged in {took:.2?} ({:.0} messages/s)\n{report}\n",
            purged as f64 / took.as_secs_f64()
        );
        let _ = js.delete_stream(&s.broker.nats.stream).await;
        let _ = js
            .delete_key_value(pusher_bridge::sweeper::lease_bucket(&s))
            .await;
        let _ = js
            .delete_key_value(pusher_bridge::sweeper::cursor_bucket(&s))
            .await;
    }
}

async fn amqp(n: usize) {
    amqp_run(n, false).await;
    amqp_run(n, true).await;
}

/// One RabbitMQ scenario: `per_app` adds app rules (a0 kept 2 h, a1's client events 1 min) to
/// the target's 10 min; without, the target's rules alone (the same messages otherwise).
async fn amqp_run(n: usize, per_app: bool) {
    let tag = format!("{}{}", std::process::id(), u8::from(per_app));
    let mut s = settings(BrokerKind::Amqp, &tag);
    s.retention.events.max_age = Duration::from_secs(600);
    if per_app {
        amqp_rules(&mut s);
    }
    let conn = Connection::connect(s.broker.amqp.url.expose(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let q = s.broker.amqp.queue.clone();
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut confirms = Vec::with_capacity(1000);
    for i in 0..n {
        let mut h = FieldTable::default();
        let app = format!("a{}", i % APPS);
        h.insert(
            "Pusher-App-Id".into(),
            AMQPValue::LongString(app.as_str().into()),
        );
        let event = EVENTS[(i / APPS) % 5];
        h.insert("Pusher-Event".into(), AMQPValue::LongString(event.into()));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(h)
            .with_timestamp(now - 3600);
        confirms.push(
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                props,
            )
            .await
            .expect("publish"),
        );
        if confirms.len() == 1000 {
            for c in confirms.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in confirms.drain(..) {
        c.await.expect("confirm");
    }
    let (purged, took, report) = sweep(&s).await;
    let name = if per_app {
        "per app rules (a0 kept 2 h, the rest past 10 min)"
    } else {
        "the target's max_age alone"
    };
    println!(
        "RabbitMQ {name}: {purged} of {n} purged in {took:.2?} ({:.0} messages/s)\n{report}\n",
        purged as f64 / took.as_secs_f64()
    );
    let _ = ch
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}

fn amqp_rules(s: &mut Settings) {
    s.retention
        .events
        .apps
        .insert("a0".into(), app_max_age(Duration::from_secs(7200)));
    s.retention.events.apps.insert(
        "a1".into(),
        AppRetention {
            overrides: BTreeMap::from([("client_event".to_string(), Duration::from_secs(60))]),
            ..AppRetention::default()
        },
    );
}

/// CPU seconds (user + system) of the nats-server process listening on `port`, from /proc.
fn server_cpu(port: u16) -> Option<f64> {
    let port = port.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_server = args.first().is_some_and(|a| a.ends_with(b"nats-server"));
        let on_port = args
            .windows(2)
            .any(|w| w[0] == b"-p" && w[1] == port.as_bytes());
        if !(is_server && on_port) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        return Some(ticks / 100.0);
    }
    None
}

/// Fills a fresh stream with `n` events of 10 apps (5 event names, 97 channels), with a
/// `Nats-TTL` of `ttl` seconds for apps a0..a4 and 1 h for the others when `ttl` is given.
async fn fill(js: &jetstream::Context, s: &Settings, n: usize, ttl: Option<u64>) {
    let p = s.broker.subject_prefix.clone();
    let _ = js.delete_stream(&s.broker.nats.stream).await;
    let mut config = serde_json::json!({
        "name": s.broker.nats.stream, "subjects": [format!("{p}.>")], "retention": "limits",
        "storage": "file", "num_replicas": 1, "discard": "old", "max_msgs": -1, "max_bytes": -1,
        "max_age": 0, "max_msg_size": -1, "max_consumers": -1, "duplicate_window": 120_000_000_000i64,
    });
    if ttl.is_some() {
        config["allow_msg_ttl"] = true.into();
    }
    let due = ttl.map(|t| t.to_string()).unwrap_or_default();
    let created: serde_json::Value = js
        .request(format!("STREAM.CREATE.{}", s.broker.nats.stream), &config)
        .await
        .expect("stream");
    assert!(created.get("error").is_none(), "{created}");
    let mut acks = Vec::with_capacity(1000);
    for i in 0..n {
        let app = i % APPS;
        let subject = format!("{p}.a{app}.{}.c{}", EVENTS[(i / APPS) % 5], i % 97);
        let mut headers = async_nats::HeaderMap::new();
        if ttl.is_some() {
            headers.insert("Nats-TTL", if app < 5 { due.as_str() } else { "3600" });
        }
        acks.push(
            js.publish_with_headers(subject, headers, "{}".into())
                .await
                .expect("publish"),
        );
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await.expect("ack");
            }
        }
    }
    for a in acks.drain(..) {
        a.await.expect("ack");
    }
}

async fn stream_count(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

async fn ttl_against_sweep(n: usize) {
    let tag = format!("{}t", std::process::id());
    let mut s = settings(BrokerKind::Nats, &tag);
    s.retention.events.max_age = Duration::from_secs(3600);
    for i in 0..5 {
        s.retention
            .events
            .apps
            .insert(format!("a{i}"), app_max_age(Duration::from_secs(2)));
    }
    let url = s.broker.nats.url.expose().to_string();
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(4222);
    let client = async_nats::connect(&url).await.expect("NATS");
    let version = client.server_info().version;
    let js = jetstream::new(client);
    let cpu = || server_cpu(port).unwrap_or(f64::NAN);

    fill(&js, &s, n, None).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = cpu();
    let (purged, took, _) = sweep(&s).await;
    println!(
        "NATS {version}, sweep (5 of 10 apps due, one filtered purge per app): {purged} of {n} \
         removed in {took:.2?} ({:.0} messages/s), nats-server CPU {:.2} s",
        purged as f64 / took.as_secs_f64(),
        cpu() - before
    );
    let _ = js
        .delete_key_value(pusher_bridge::sweeper::lease_bucket(&s))
        .await;
    let _ = js
        .delete_key_value(pusher_bridge::sweeper::cursor_bucket(&s))
        .await;

    // A TTL that falls due after the last publish (about 80,000 a second here), so that the
    // CPU measured from then on is the expiry's alone.
    let ttl = 5 + (n as u64) / 40_000;
    let filled = Instant::now();
    fill(&js, &s, n, Some(ttl)).await;
    let fill_time = filled.elapsed();
    let due = filled + Duration::from_secs(ttl);
    tokio::time::sleep_until(due.into()).await;
    let before = cpu();
    let keep = (n - n / 2) as u64;
    loop {
        if stream_count(&js, &s.broker.nats.stream).await <= keep {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = due.elapsed();
    println!(
        "NATS {version}, message TTL (5 of 10 apps with Nats-TTL {ttl}): {} of {n} removed by \
         the server within {gone:.2?} of the first falling due (publishing took {fill_time:.2?}), \
         nats-server CPU {:.2} s from the first due to the last gone; the bridge: nothing",
        n / 2,
        cpu() - before
    );
    let _ = js.delete_stream(&s.broker.nats.stream).await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map_or("nats", String::as_str);
    let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(50_000);
    match which {
        "amqp" => amqp(n).await,
        "ttl" => ttl_against_sweep(n).await,
        _ => nats(n).await,
    }
}
