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
            .delete_key_value(pusher_bridge::sweeper::state_bucket(&s))
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

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map_or("nats", String::as_str);
    let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(50_000);
    match which {
        "amqp" => amqp(n).await,
        _ => nats(n).await,
    }
}
