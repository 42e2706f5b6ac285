//! Retention per app against the real brokers: with two apps that have rules of their own (one
//! with an app `max_age` and an app + event override, one with an app + event override only),
//! a disabled app, an app of `[[apps]]` without rules and target-wide rules (event override,
//! `max_age`), `sweep_once` purges each message by its most specific rule, never touches the
//! disabled app, counts the same in a dry run without removing anything, and labels the purged
//! counter by app and rule. On NATS once with a disabled app (no whole-stream purge: per app
//! filters and scans) and once without (the cheap purge plus per app filters), through the
//! command line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use async_nats::jetstream::{self, stream};
use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use pusher_bridge::config::{AppRetention, AppSettings, BrokerKind, Secret, Settings};
use pusher_bridge::metrics::Metrics;
use pusher_bridge::sweeper::{RuleKind, Sweeper, Target, TargetOutcome, TargetReport};

/// Rules of its own: `max_age` and an app + event override longer than it.
const A: &str = "111";
/// Rules of its own: one app + event override, no `max_age` (the target's rules otherwise).
const B: &str = "222";
/// `enabled = false`.
const C: &str = "333";
/// In `[[apps]]`, no rules of its own.
const D: &str = "444";

const EVENTS: [&str; 4] = [
    "client_event",
    "channel_occupied",
    "member_added",
    "subscription_count",
];

fn with_apps(mut s: Settings) -> Settings {
    for (i, id) in [A, B, C, D].into_iter().enumerate() {
        s.apps.push(AppSettings {
            id: id.into(),
            key: format!("key-{i}"),
            secret: Secret::new("s"),
            secret_file: None,
        });
    }
    s.retention.lease_ttl = Duration::from_secs(4);
    s
}

fn app_rule(max_age: Option<Duration>, overrides: &[(&str, Duration)]) -> AppRetention {
    AppRetention {
        enabled: true,
        max_age,
        overrides: overrides.iter().map(|(e, d)| (e.to_string(), *d)).collect(),
    }
}

fn off() -> AppRetention {
    AppRetention {
        enabled: false,
        ..AppRetention::default()
    }
}

/// Every level on one target: `short` and `long` are the two retentions the test uses.
fn rules_at_every_level(s: &mut Settings, short: Duration, long: Duration, hours: Duration) {
    let ev = &mut s.retention.events;
    ev.max_age = long;
    ev.overrides = BTreeMap::from([("client_event".to_string(), short)]);
    ev.apps = BTreeMap::from([
        (
            A.to_string(),
            app_rule(Some(short), &[("member_added", hours)]),
        ),
        (
            B.to_string(),
            app_rule(None, &[("channel_occupied", short)]),
        ),
        (C.to_string(), off()),
    ]);
    let dlq = &mut s.retention.dlq;
    dlq.max_age = long;
    dlq.apps = BTreeMap::from([
        (A.to_string(), app_rule(Some(short), &[])),
        (C.to_string(), off()),
    ]);
}

fn report(outcome: &(Target, TargetOutcome)) -> &TargetReport {
    match &outcome.1 {
        TargetOutcome::Swept(r) => r,
        other => panic!("{:?} not swept: {other:?}", outcome.0),
    }
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// NATS

async fn nats_setup(settings: &Settings) -> jetstream::Context {
    let js = jetstream_ctx(&nats_url()).await;
    let p = &settings.broker.subject_prefix;
    for (name, subjects) in [
        (&settings.broker.nats.stream, format!("{p}.>")),
        (&settings.broker.nats.dlq_stream, format!("{p}_dlq.>")),
    ] {
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subjects],
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    js
}

/// One message per app and event name, one dead letter per app; the body is `tag`.
async fn nats_batch(js: &jetstream::Context, settings: &Settings, tag: &str) {
    let p = &settings.broker.subject_prefix;
    let mut acks = Vec::new();
    for app in [A, B, C, D] {
        for e in EVENTS {
            let subject = format!("{p}.{app}.{e}.c-{tag}");
            acks.push(js.publish(subject, tag.to_string().into()).await.unwrap());
        }
        let subject = format!("{p}_dlq.{app}.malformed");
        acks.push(js.publish(subject, tag.to_string().into()).await.unwrap());
    }
    for a in acks {
        a.await.expect("stored");
    }
}

/// Batch `a` about 5 s old, `b` about 2.5 s, `c` new: retentions of 1.5 s and 4 s tell them
/// apart with a margin of more than a second for a loaded machine.
async fn nats_three_batches(js: &jetstream::Context, settings: &Settings) {
    nats_batch(js, settings, "a").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    nats_batch(js, settings, "b").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    nats_batch(js, settings, "c").await;
}

const SHORT: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_millis(4000);
const HOURS: Duration = Duration::from_secs(3600);

/// "app event tag" of every message left in a stream, sorted.
async fn nats_left(js: &jetstream::Context, stream: &str) -> Vec<String> {
    let mut out: Vec<String> = stream_messages(js, stream, 0)
        .await
        .into_iter()
        .map(|m| {
            let t: Vec<&str> = m.subject.split('.').collect();
            let tag = String::from_utf8_lossy(&m.raw).into_owned();
            // Events: <prefix>.<app>.<event>.<channel>; dead letters: <prefix>_dlq.<app>.<reason>.
            if t.len() >= 4 {
                format!("{} {} {tag}", t[t.len() - 3], t[t.len() - 2])
            } else {
                format!("{} dlq {tag}", t[t.len() - 2])
            }
        })
        .collect();
    out.sort();
    out
}

fn sorted(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = items.into_iter().collect();
    v.sort();
    v
}

fn each(app: &str, events: &[&str], tags: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for e in events {
        for t in tags {
            out.push(format!("{app} {e} {t}"));
        }
    }
    out
}

#[tokio::test]
async fn nats_each_message_goes_by_its_most_specific_rule_and_a_disabled_app_stays() {
    let mut settings = with_apps(nats_settings());
    rules_at_every_level(&mut settings, SHORT, LONG, HOURS);
    let js = nats_setup(&settings).await;
    nats_three_batches(&js, &settings).await;
    let metrics = Arc::new(Metrics::new());
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), metrics.clone())
        .await
        .unwrap();
    let (ev, dl) = (
        settings.broker.nats.stream.clone(),
        settings.broker.nats.dlq_stream.clone(),
    );
    let text = metrics.encode();
    for series in [
        format!(
            r#"pusher_bridge_sweeper_purged_total{{target="events",app_id="{A}",rule="app"}} 0"#
        ),
        format!(
            r#"pusher_bridge_sweeper_purged_total{{target="events",app_id="{B}",rule="app_event"}} 0"#
        ),
        format!(r#"pusher_bridge_sweeper_purged_total{{target="dlq",app_id="{A}",rule="app"}} 0"#),
    ] {
        assert!(
            text.contains(&series),
            "{series} not there from the start:\n{text}"
        );
    }
    assert!(!text.contains(&format!(r#"app_id="{C}""#)), "{text}");

    let before = nats_left(&js, &ev).await;
    assert_eq!(before.len(), 48);
    let dry = sweeper.sweep_once(&Target::ALL, true).await;
    let (events, dlq) = (report(&dry[0]).clone(), report(&dry[1]).clone());
    assert!(events.dry_run);
    assert_eq!(nats_left(&js, &ev).await, before, "the dry run purged");
    assert_eq!(nats_left(&js, &dl).await.len(), 12);

    let run = sweeper.sweep_once(&Target::ALL, false).await;
    let real = report(&run[0]);
    assert!(real.complete, "{real}");
    // A: everything after 1.5 s (its max_age beats the client_event override), but member_added
    // (A + member_added: an hour).
    let mut want = each(A, &["member_added"], &["a", "b", "c"]);
    want.extend(each(
        A,
        &["client_event", "channel_occupied", "subscription_count"],
        &["c"],
    ));
    // B: channel_occupied after 1.5 s (B + event), client_event after 1.5 s (the event
    // override), the rest after 4 s (the target's max_age).
    want.extend(each(B, &["client_event", "channel_occupied"], &["c"]));
    want.extend(each(
        B,
        &["member_added", "subscription_count"],
        &["b", "c"],
    ));
    // C: disabled, untouched.
    want.extend(each(C, &EVENTS, &["a", "b", "c"]));
    // D: no rules of its own: the event override, then the target's max_age.
    want.extend(each(D, &["client_event"], &["c"]));
    want.extend(each(
        D,
        &["channel_occupied", "member_added", "subscription_count"],
        &["b", "c"],
    ));
    assert_eq!(nats_left(&js, &ev).await, sorted(want));
    assert_eq!(real.purged(), 17, "{real}");
    assert_eq!(
        events.purged(),
        real.purged(),
        "dry run {events}\nreal run {real}"
    );
    assert_eq!(real.purged_by(A, RuleKind::App), 6, "{real}");
    assert_eq!(real.purged_by(B, RuleKind::Default), 4, "{real}");
    assert_eq!(real.purged_by(B, RuleKind::AppEvent), 1, "{real}");
    assert_eq!(real.purged_by(B, RuleKind::Event), 1, "{real}");
    assert_eq!(real.purged_by(D, RuleKind::Default), 4, "{real}");
    assert_eq!(real.purged_by(D, RuleKind::Event), 1, "{real}");
    assert_eq!(real.untouched, [C]);
    let shown = real.to_string();
    assert!(
        shown.contains(&format!("app {C}: disabled, untouched")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!(
            "app {B}, channel_occupied older than 1s 500ms (app_event rule): 1"
        )),
        "{shown}"
    );

    // Dead letters: A after 1.5 s, C never, the others after 4 s.
    let dreal = report(&run[1]);
    assert_eq!(
        nats_left(&js, &dl).await,
        sorted(
            [
                format!("{A} dlq c"),
                format!("{B} dlq b"),
                format!("{B} dlq c"),
                format!("{C} dlq a"),
                format!("{C} dlq b"),
                format!("{C} dlq c"),
                format!("{D} dlq b"),
                format!("{D} dlq c"),
            ]
            .into_iter()
        )
    );
    assert_eq!(dreal.purged(), 4, "{dreal}");
    assert_eq!(dlq.purged(), 4, "dry run {dlq}");
    assert_eq!(dreal.purged_by(A, RuleKind::App), 2, "{dreal}");

    let text = metrics.encode();
    let purged = |target: &str, app: &str, rule: &str| {
        metric(
            &text,
            &format!(
                r#"pusher_bridge_sweeper_purged_total{{target="{target}",app_id="{app}",rule="{rule}"}}"#
            ),
        )
    };
    assert_eq!(purged("events", A, "app"), 6.0, "{text}");
    assert_eq!(purged("events", B, "app_event"), 1.0, "{text}");
    assert_eq!(purged("events", B, "event"), 1.0, "{text}");
    assert_eq!(purged("events", D, "default"), 4.0, "{text}");
    assert_eq!(purged("dlq", A, "app"), 2.0, "{text}");
    assert_eq!(purged("dlq", B, "default"), 1.0, "{text}");
    assert!(!text.contains("channel=") && !text.contains(&format!(r#"app_id="{C}""#)));

    // The scans' positions are stored, one per scan and target, under the current rules.
    let kv = js
        .get_key_value(pusher_bridge::sweeper::cursor_bucket(&settings))
        .await
        .expect("state bucket");
    let cursor: serde_json::Value =
        serde_json::from_slice(&kv.get("events-cursor").await.unwrap().expect("cursor")).unwrap();
    let keys: Vec<String> = cursor["scans"]
        .as_object()
        .expect("scans")
        .keys()
        .map(|k| {
            let parts: Vec<&str> = k.split('|').collect();
            format!("{} {}", parts[0], parts[parts.len() - 1])
        })
        .collect();
    assert_eq!(
        sorted(keys),
        [
            "dlq others".to_string(),
            format!("events app:{A}"),
            "events event:client_event".to_string(),
            "events others".to_string(),
        ]
    );
    let seq = cursor["scans"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v.as_u64())
        .min()
        .unwrap();
    assert!(seq > 1, "{cursor}");

    sweeper.release().await;
    delete_streams(&js, &settings).await;
}

/// Without a disabled app the whole-stream purge stays (everything older than the longest
/// rule, in one request); per app rules purge by their own filters after it. Through
/// `pusher-bridge sweep --once [--dry-run]`, which prints every app and rule.
#[tokio::test]
async fn nats_without_a_disabled_app_the_cheap_purge_stays_and_the_command_prints_per_app() {
    let mut settings = with_apps(nats_settings());
    settings.retention.events.max_age = LONG;
    settings.retention.events.apps = BTreeMap::from([
        (A.to_string(), app_rule(Some(SHORT), &[])),
        (B.to_string(), app_rule(None, &[("client_event", SHORT)])),
    ]);
    settings.retention.dlq.enabled = false;
    let js = nats_setup(&settings).await;
    nats_three_batches(&js, &settings).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, settings.to_redacted_toml()).unwrap();
    let path = file.to_str().unwrap().to_string();
    let cli = move |extra: &'static [&'static str]| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["sweep", "--once", "--config", path.as_str()];
            args.extend_from_slice(extra);
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_pusher-bridge"))
                .args(&args)
                .env_remove("PUSHER_BRIDGE_CONFIG")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            text
        })
    };
    let ev = settings.broker.nats.stream.clone();
    let before = nats_left(&js, &ev).await;
    let dry = cli(&["--dry-run"]).await.unwrap();
    assert_eq!(nats_left(&js, &ev).await, before, "the dry run purged");
    let real = cli(&[]).await.unwrap();
    for out in [&dry, &real] {
        // Batch a of every app, then A's b, then B's client_event b.
        assert!(out.contains(" 21 message(s)"), "{out}");
        assert!(
            out.contains("any app, any message older than 4s (default rule): 16"),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "app {A}, any message older than 1s 500ms (app rule): 4"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "app {B}, client_event older than 1s 500ms (app_event rule): 1"
            )),
            "{out}"
        );
    }
    assert!(dry.contains("would purge 21"), "{dry}");
    let mut want = each(A, &EVENTS, &["c"]);
    want.extend(each(B, &["client_event"], &["c"]));
    want.extend(each(B, &EVENTS[1..], &["b", "c"]));
    for app in [C, D] {
        want.extend(each(app, &EVENTS, &["b", "c"]));
    }
    assert_eq!(nats_left(&js, &ev).await, sorted(want));
    delete_streams(&js, &settings).await;
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ

const MIN: u64 = 60;

struct Rabbit {
    conn: Connection,
    ch: Channel,
}

impl Rabbit {
    async fn open(settings: &Settings) -> Self {
        let (conn, ch) = confirm_channel().await;
        for q in [&settings.broker.amqp.queue, &settings.broker.amqp.dlq_queue] {
            declare_queue(&ch, q, true, FieldTable::default()).await;
        }
        Self { conn, ch }
    }

    /// A message as the bridge publishes it: `timestamp` `age_secs` ago, `Pusher-App-Id` and
    /// `Pusher-Event` headers; the body names it.
    async fn publish(&self, queue: &str, app: &str, event: &str, age_secs: u64) {
        let mut headers = FieldTable::default();
        headers.insert("Pusher-App-Id".into(), AMQPValue::LongString(app.into()));
        headers.insert("Pusher-Event".into(), AMQPValue::LongString(event.into()));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers)
            .with_timestamp(now - age_secs);
        let body = format!("{app} {event} {age_secs}");
        self.ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Bodies of every message in `queue`, in order, leaving them there.
    async fn peek(&self, queue: &str) -> Vec<String> {
        let ch = self.conn.create_channel().await.unwrap();
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
}

#[tokio::test]
async fn amqp_each_message_goes_by_its_most_specific_rule_and_a_disabled_app_stays() {
    let mut settings = with_apps(settings_for(BrokerKind::Amqp));
    rules_at_every_level(
        &mut settings,
        Duration::from_secs(2 * MIN),
        Duration::from_secs(10 * MIN),
        Duration::from_secs(120 * MIN),
    );
    // B's and the target's client_event: one minute (shorter than A's two).
    settings
        .retention
        .events
        .overrides
        .insert("client_event".into(), Duration::from_secs(MIN));
    settings
        .retention
        .events
        .apps
        .get_mut(B)
        .unwrap()
        .overrides
        .insert("channel_occupied".into(), Duration::from_secs(MIN));
    let rabbit = Rabbit::open(&settings).await;
    let (q, d) = (
        settings.broker.amqp.queue.clone(),
        settings.broker.amqp.dlq_queue.clone(),
    );
    // Oldest first, with what the rules say.
    for (app, event, age) in [
        (C, "client_event", 60 * MIN),       // kept: C is disabled
        (A, "member_added", 60 * MIN),       // kept: A + member_added, 2 h
        (A, "subscription_count", 5 * MIN),  // purged: A's 2 min
        (A, "client_event", 5 * MIN),        // purged: A's 2 min (A's max_age beats the event's)
        (B, "channel_occupied", 5 * MIN),    // purged: B + channel_occupied, 1 min
        (B, "member_added", 5 * MIN),        // kept: the target's 10 min
        (B, "client_event", 5 * MIN),        // purged: the event override, 1 min
        (D, "member_added", 30 * MIN),       // purged: the target's 10 min
        ("999", "member_added", 30 * MIN),   // purged: not in [[apps]], the target's rules
        (A, "client_event", 90),             // kept: A's 2 min (the event's 1 min would purge it)
        (D, "client_event", 20),             // younger than every rule: the sweep stops
        (A, "subscription_count", 60 * MIN), // behind the stop
    ] {
        rabbit.publish(&q, app, event, age).await;
    }
    for (app, age) in [
        (C, 60 * MIN), // kept: disabled
        (A, 5 * MIN),  // purged: A's 2 min
        (B, 30 * MIN), // purged: the target's 10 min
        (B, 5 * MIN),  // kept
        (D, 20),       // stop
    ] {
        rabbit.publish(&d, app, "member_added", age).await;
    }
    let before = rabbit.peek(&q).await;
    let metrics = Arc::new(Metrics::new());
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), metrics.clone())
        .await
        .unwrap();

    let dry = sweeper.sweep_once(&Target::ALL, true).await;
    assert_eq!(report(&dry[0]).purged(), 6, "{}", report(&dry[0]));
    assert_eq!(report(&dry[1]).purged(), 2, "{}", report(&dry[1]));
    assert_eq!(
        rabbit.peek(&q).await,
        before,
        "the dry run changed the queue"
    );

    let run = sweeper.sweep_once(&Target::ALL, false).await;
    let events = report(&run[0]);
    assert!(events.complete);
    let m = |app: &str, event: &str, age: u64| format!("{app} {event} {age}");
    assert_eq!(
        rabbit.peek(&q).await,
        [
            m(C, "client_event", 60 * MIN),
            m(A, "member_added", 60 * MIN),
            m(B, "member_added", 5 * MIN),
            m(A, "client_event", 90),
            m(D, "client_event", 20),
            m(A, "subscription_count", 60 * MIN),
        ]
    );
    assert_eq!(events.purged_by(A, RuleKind::App), 2, "{events}");
    assert_eq!(events.purged_by(B, RuleKind::AppEvent), 1, "{events}");
    assert_eq!(events.purged_by(B, RuleKind::Event), 1, "{events}");
    assert_eq!(events.purged_by(D, RuleKind::Default), 1, "{events}");
    assert_eq!(events.purged_by("other", RuleKind::Default), 1, "{events}");
    assert_eq!(events.untouched, [C]);
    assert_eq!(
        rabbit.peek(&d).await,
        [
            m(C, "member_added", 60 * MIN),
            m(B, "member_added", 5 * MIN),
            m(D, "member_added", 20),
        ]
    );
    let dlq = report(&run[1]);
    assert_eq!(dlq.purged_by(A, RuleKind::App), 1, "{dlq}");
    assert_eq!(dlq.purged_by(B, RuleKind::Default), 1, "{dlq}");

    let text = metrics.encode();
    for (series, n) in [
        (format!(r#"{{target="events",app_id="{A}",rule="app"}}"#), 2),
        (
            format!(r#"{{target="events",app_id="{B}",rule="app_event"}}"#),
            1,
        ),
        (
            format!(r#"{{target="events",app_id="{B}",rule="event"}}"#),
            1,
        ),
        (
            r#"{target="events",app_id="other",rule="default"}"#.to_string(),
            1,
        ),
        (format!(r#"{{target="dlq",app_id="{A}",rule="app"}}"#), 1),
    ] {
        let line = format!("pusher_bridge_sweeper_purged_total{series} {n}");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    sweeper.release().await;
    let _ = rabbit.conn.close(200, "done".into()).await;
    amqp_delete(&settings).await;
}
