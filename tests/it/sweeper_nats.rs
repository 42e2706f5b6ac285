//! The retention sweeper against the real NATS JetStream: `sweep_once` purges what is too old
//! (per event overrides included), keeps the rest, leaves disabled targets alone, changes nothing
//! in a dry run; the loop runs on its interval; two sweepers share one lease.
//!
//! "Old" messages are made by publishing, waiting, publishing more, and sweeping with retentions
//! of a second or two (JetStream stamps messages itself).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use async_nats::jetstream::{self, stream};
use pusher_bridge::config::Settings;
use pusher_bridge::metrics::Metrics;
use pusher_bridge::sweeper::{self, LeaseStatus, Sweeper, Target, TargetOutcome, TargetReport};

const EVENTS: [&str; 4] = [
    "client_event",
    "channel_occupied",
    "member_added",
    "subscription_count",
];

/// Unique streams for one test, created the way the bridge creates them.
async fn setup(settings: &Settings) -> jetstream::Context {
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

async fn cleanup(js: &jetstream::Context, settings: &Settings) {
    delete_streams(js, settings).await;
}

/// One message per event name (channel `c-<tag>`) and one dead letter, all acknowledged.
async fn publish_batch(js: &jetstream::Context, settings: &Settings, tag: &str) {
    let p = &settings.broker.subject_prefix;
    let mut acks = Vec::new();
    for e in EVENTS {
        acks.push(
            js.publish(format!("{p}.{APP_ID}.{e}.c-{tag}"), tag.to_string().into())
                .await
                .unwrap(),
        );
    }
    acks.push(
        js.publish(
            format!("{p}_dlq.{APP_ID}.malformed"),
            tag.to_string().into(),
        )
        .await
        .unwrap(),
    );
    for a in acks {
        a.await.expect("stored");
    }
}

/// (event token, batch tag) of every message left in a stream.
async fn remaining(js: &jetstream::Context, stream: &str) -> Vec<(String, String)> {
    let mut out: Vec<_> = stream_messages(js, stream, 0)
        .await
        .into_iter()
        .map(|m| {
            let tokens: Vec<&str> = m.subject.split('.').collect();
            (
                tokens[tokens.len() - 2].to_string(),
                String::from_utf8_lossy(&m.raw).into_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn expect(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

fn report(outcome: &(Target, TargetOutcome)) -> &TargetReport {
    match &outcome.1 {
        TargetOutcome::Swept(r) => r,
        other => panic!("{:?} not swept: {other:?}", outcome.0),
    }
}

/// Rules with all three cases: `client_event` shorter than the default, `channel_occupied`
/// longer (forces the name-by-name default), the rest on the default.
fn rules(settings: &mut Settings) {
    settings.retention.lease_ttl = Duration::from_secs(2);
    settings.retention.events.max_age = Duration::from_millis(2200);
    settings.retention.events.overrides = BTreeMap::from([
        ("client_event".to_string(), Duration::from_millis(1000)),
        ("channel_occupied".to_string(), Duration::from_secs(3600)),
    ]);
    settings.retention.dlq.max_age = Duration::from_millis(2200);
}

/// Batch `a` is ~3 s old, `b` ~1.5 s, `c` new.
async fn three_batches(js: &jetstream::Context, settings: &Settings) {
    publish_batch(js, settings, "a").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_batch(js, settings, "b").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_batch(js, settings, "c").await;
}

#[tokio::test]
async fn sweep_once_purges_by_age_and_override_and_dry_run_changes_nothing() {
    let mut settings = nats_settings();
    rules(&mut settings);
    let js = setup(&settings).await;
    three_batches(&js, &settings).await;
    let metrics = Arc::new(Metrics::new());
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), metrics.clone())
        .await
        .unwrap();
    let events_stream = settings.broker.nats.stream.clone();
    let dlq_stream = settings.broker.nats.dlq_stream.clone();
    let before = remaining(&js, &events_stream).await;
    assert_eq!(before.len(), 12);

    let dry = sweeper.sweep_once(&Target::ALL, true).await;
    let events = report(&dry[0]);
    assert!(events.dry_run);
    assert_eq!(events.purged_of("client_event"), 2, "{events}");
    assert_eq!(events.purged_of("member_added"), 1, "{events}");
    assert_eq!(events.purged_of("subscription_count"), 1, "{events}");
    assert_eq!(events.purged_of("channel_occupied"), 0, "{events}");
    assert_eq!(events.purged(), 4, "{events}");
    assert_eq!(report(&dry[1]).purged(), 1);
    assert_eq!(
        remaining(&js, &events_stream).await,
        before,
        "dry run purged"
    );
    assert_eq!(remaining(&js, &dlq_stream).await.len(), 3);
    assert!(
        !metrics.encode().contains("sweeper_runs_total{"),
        "dry runs are not counted"
    );

    let run = sweeper.sweep_once(&Target::ALL, false).await;
    let events = report(&run[0]);
    assert!(!events.dry_run && events.complete);
    assert_eq!(events.purged(), 4, "{events}");
    assert_eq!(
        remaining(&js, &events_stream).await,
        expect(&[
            ("channel_occupied", "a"),
            ("channel_occupied", "b"),
            ("channel_occupied", "c"),
            ("client_event", "c"),
            ("member_added", "b"),
            ("member_added", "c"),
            ("subscription_count", "b"),
            ("subscription_count", "c"),
        ])
    );
    assert_eq!(report(&run[1]).purged(), 1);
    assert_eq!(
        remaining(&js, &dlq_stream).await,
        expect(&[(APP_ID, "b"), (APP_ID, "c")])
    );
    let text = metrics.encode();
    assert!(
        text.contains(r#"pusher_bridge_sweeper_runs_total{target="events",outcome="success"} 1"#),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            r#"pusher_bridge_sweeper_purged_total{target="events","#
        ),
        4.0,
        "{text}"
    );
    assert!(
        text.contains(
            r#"pusher_bridge_sweeper_purged_total{target="events",app_id="*",rule="event"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"pusher_bridge_sweeper_purged_total{target="dlq",app_id="*",rule="default"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"pusher_bridge_sweeper_last_success_timestamp_seconds{target="dlq"}"#));

    // A second run finds nothing more (the cursor skips what the first one checked).
    let again = sweeper.sweep_once(&Target::ALL, false).await;
    assert_eq!(report(&again[0]).purged(), 0);
    assert_eq!(report(&again[1]).purged(), 0);

    sweeper.release().await;
    cleanup(&js, &settings).await;
}

#[tokio::test]
async fn without_a_longer_override_default_and_shorter_override_purge_by_filter() {
    let mut settings = nats_settings();
    settings.retention.events.max_age = Duration::from_millis(2200);
    settings.retention.events.overrides =
        BTreeMap::from([("client_event".to_string(), Duration::from_millis(1000))]);
    let js = setup(&settings).await;
    three_batches(&js, &settings).await;
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let run = sweeper.sweep_once(&[Target::Events], false).await;
    let events = report(&run[0]);
    // `a` of every event past the default; `b` of client_event past its override.
    assert_eq!(events.purged_of("*"), 4, "{events}");
    assert_eq!(events.purged_of("client_event"), 1, "{events}");
    let left = remaining(&js, &settings.broker.nats.stream).await;
    assert_eq!(left.len(), 7, "{left:?}");
    assert!(left.iter().all(|(_, tag)| tag != "a"));
    assert!(!left.contains(&("client_event".into(), "b".into())));
    sweeper.release().await;
    cleanup(&js, &settings).await;
}

#[tokio::test]
async fn dropping_a_long_override_rescans_what_the_cursor_had_skipped() {
    let mut settings = nats_settings();
    settings.retention.events.max_age = Duration::from_millis(2200);
    settings.retention.events.overrides = BTreeMap::from([
        ("channel_occupied".to_string(), Duration::from_secs(3600)),
        ("member_added".to_string(), Duration::from_secs(3600)),
    ]);
    settings.retention.dlq.enabled = false;
    let js = setup(&settings).await;
    publish_batch(&js, &settings, "a").await;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let mut first = Sweeper::new(Arc::new(settings.clone()), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let run = first.sweep_once(&[Target::Events], false).await;
    assert_eq!(report(&run[0]).purged(), 2, "{}", report(&run[0]));
    first.release().await;

    // `channel_occupied` falls back to the default: its old message is due now, although it
    // sits below the cursor the first run stored.
    settings
        .retention
        .events
        .overrides
        .remove("channel_occupied");
    let mut second = Sweeper::new(Arc::new(settings.clone()), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let run = second.sweep_once(&[Target::Events], false).await;
    let events = report(&run[0]);
    assert_eq!(events.purged_of("channel_occupied"), 1, "{events}");
    assert_eq!(
        remaining(&js, &settings.broker.nats.stream).await,
        expect(&[("member_added", "a")])
    );
    second.release().await;
    cleanup(&js, &settings).await;
}

#[tokio::test]
async fn disabled_targets_are_left_alone() {
    let mut settings = nats_settings();
    rules(&mut settings);
    settings.retention.events.enabled = false;
    let js = setup(&settings).await;
    publish_batch(&js, &settings, "a").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let metrics = Arc::new(Metrics::new());
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), metrics.clone())
        .await
        .unwrap();
    let run = sweeper.sweep_once(&Target::ALL, false).await;
    assert!(matches!(run[0], (Target::Events, TargetOutcome::Disabled)));
    assert_eq!(report(&run[1]).purged(), 1);
    assert_eq!(remaining(&js, &settings.broker.nats.stream).await.len(), 4);
    assert!(
        remaining(&js, &settings.broker.nats.dlq_stream)
            .await
            .is_empty()
    );
    assert!(!metrics.encode().contains(r#"target="events""#));
    sweeper.release().await;
    cleanup(&js, &settings).await;
}

#[tokio::test]
async fn one_lease_holder_and_takeover_after_the_ttl() {
    let mut settings = nats_settings();
    rules(&mut settings);
    let js = setup(&settings).await;
    let shared = Arc::new(settings.clone());
    let mut a = Sweeper::new(shared.clone(), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let metrics_b = Arc::new(Metrics::new());
    let mut b = Sweeper::new(shared.clone(), metrics_b.clone())
        .await
        .unwrap();

    assert_eq!(a.acquire_lease().await.unwrap(), LeaseStatus::Held);
    let LeaseStatus::Elsewhere(Some(holder)) = b.acquire_lease().await.unwrap() else {
        panic!("b must not get the lease");
    };
    assert!(!holder.is_empty());
    let run = b.sweep_once(&Target::ALL, false).await;
    assert!(
        run.iter()
            .all(|(_, o)| matches!(o, TargetOutcome::Skipped(_)))
    );
    assert!(
        metrics_b
            .encode()
            .contains(r#"pusher_bridge_sweeper_runs_total{target="events",outcome="skipped"} 1"#)
    );
    // The holder renewing keeps it past the TTL.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        a.keep_lease().await.unwrap();
        assert!(matches!(
            b.acquire_lease().await.unwrap(),
            LeaseStatus::Elsewhere(_)
        ));
    }
    // The holder "crashes": no release, no renewal.
    drop(a);
    let crashed = tokio::time::Instant::now();
    let mut took = None;
    while crashed.elapsed() < Duration::from_secs(10) {
        if b.acquire_lease().await.unwrap() == LeaseStatus::Held {
            took = Some(crashed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = took.expect("b never took over");
    assert!(
        took >= Duration::from_millis(1200),
        "took over after {took:?}, before the lease could expire"
    );
    let run = b.sweep_once(&Target::ALL, false).await;
    assert!(
        run.iter()
            .all(|(_, o)| matches!(o, TargetOutcome::Swept(_)))
    );
    b.release().await;
    cleanup(&js, &settings).await;
}

#[tokio::test]
async fn the_loop_sweeps_on_its_interval_and_a_second_replica_takes_over() {
    let mut settings = nats_settings();
    settings.retention.lease_ttl = Duration::from_secs(2);
    settings.retention.events.max_age = Duration::from_secs(1);
    settings.retention.dlq.max_age = Duration::from_secs(1);
    settings.retention.events.interval = Duration::from_millis(300);
    settings.retention.dlq.interval = Duration::from_millis(300);
    let js = setup(&settings).await;
    let shared = Arc::new(settings.clone());
    let metrics_a = Arc::new(Metrics::new());
    let metrics_b = Arc::new(Metrics::new());
    let (stop_a, listen_a) = pusher_bridge::shutdown::channel();
    let (stop_b, listen_b) = pusher_bridge::shutdown::channel();
    let a = Sweeper::new(shared.clone(), metrics_a.clone())
        .await
        .unwrap();
    let task_a = tokio::spawn(sweeper::run_loop(a, listen_a));
    // Let `a` take the lease first.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = Sweeper::new(shared.clone(), metrics_b.clone())
        .await
        .unwrap();
    let task_b = tokio::spawn(sweeper::run_loop(b, listen_b));

    publish_batch(&js, &settings, "a").await;
    let events_stream = settings.broker.nats.stream.clone();
    wait_until_empty(&js, &events_stream, Duration::from_secs(5)).await;
    let runs = |m: &Metrics, outcome: &str| {
        metric_value(
            &m.encode(),
            &format!(r#"pusher_bridge_sweeper_runs_total{{target="events",outcome="{outcome}"}}"#),
        )
    };
    assert!(runs(&metrics_a, "success") >= 2.0);
    assert_eq!(runs(&metrics_b, "success"), 0.0, "only the holder sweeps");
    assert!(runs(&metrics_b, "skipped") >= 1.0);
    assert!(
        metric_value(
            &metrics_a.encode(),
            r#"pusher_bridge_sweeper_purged_total{target="events","#
        ) >= 4.0
    );

    // `a` dies without releasing; `b` takes over once the TTL has passed.
    task_a.abort();
    let _ = task_a.await;
    drop(stop_a);
    publish_batch(&js, &settings, "b").await;
    wait_until_empty(&js, &events_stream, Duration::from_secs(8)).await;
    assert!(runs(&metrics_b, "success") >= 1.0);
    assert!(
        metric_value(
            &metrics_b.encode(),
            r#"pusher_bridge_sweeper_purged_total{target="events","#
        ) >= 4.0
    );

    stop_b.trigger();
    tokio::time::timeout(Duration::from_secs(5), task_b)
        .await
        .expect("loop stops on shutdown")
        .unwrap();
    cleanup(&js, &settings).await;
}

async fn wait_until_empty(js: &jetstream::Context, stream: &str, within: Duration) {
    let start = tokio::time::Instant::now();
    loop {
        let mut s = js.get_stream(stream).await.unwrap();
        let n = s.info().await.unwrap().state.messages;
        if n == 0 {
            return;
        }
        assert!(start.elapsed() < within, "{n} messages still in {stream}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric_value(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_server_runs_the_sweeper_and_stops_it_on_shutdown() {
    let mut settings = nats_settings();
    settings.retention.events.max_age = Duration::from_secs(1);
    settings.retention.events.interval = Duration::from_millis(300);
    settings.retention.dlq.interval = Duration::from_millis(300);
    let app = TestApp::spawn_ready(settings.clone()).await;
    let js = jetstream_ctx(&nats_url()).await;
    let body = webhook_body(1, &[r#"{"name":"channel_occupied","channel":"a"}"#]);
    assert_eq!(app.post_signed(&body).await.status, 200);
    assert_eq!(
        stream_messages(&js, &settings.broker.nats.stream, 1)
            .await
            .len(),
        1
    );
    wait_until_empty(&js, &settings.broker.nats.stream, Duration::from_secs(5)).await;
    let success = r#"pusher_bridge_sweeper_runs_total{target="events",outcome="success"}"#;
    assert!(app.metric(success).await >= 1.0);
    assert!(
        app.metric(r#"pusher_bridge_sweeper_purged_total{target="events","#)
            .await
            >= 1.0
    );
    let stopped = tokio::time::Instant::now();
    app.stop().await;
    assert!(stopped.elapsed() < Duration::from_secs(10));
    cleanup(&js, &settings).await;
}

#[tokio::test]
async fn sweep_once_on_the_command_line_prints_what_it_purged() {
    let mut settings = nats_settings();
    settings.retention.events.max_age = Duration::from_secs(1);
    settings.retention.dlq.enabled = false;
    let js = setup(&settings).await;
    publish_batch(&js, &settings, "a").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, settings.to_redacted_toml()).unwrap();
    let path = file.to_str().unwrap().to_string();
    let cli = move |extra: &[&str]| {
        let mut args = vec!["sweep", "--once", "--config", path.as_str()];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_pusher-bridge"))
            .args(&args)
            .env_remove("PUSHER_BRIDGE_CONFIG")
            .output()
            .unwrap()
    };
    let dry = tokio::task::spawn_blocking({
        let cli = cli.clone();
        move || cli(&["--dry-run"])
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(out.contains("events (stream EV_"), "{out}");
    assert!(out.contains("would purge 4 message(s)"), "{out}");
    assert!(out.contains("dlq: disabled"), "{out}");
    assert_eq!(remaining(&js, &settings.broker.nats.stream).await.len(), 4);

    let real = tokio::task::spawn_blocking(move || cli(&[])).await.unwrap();
    let out = String::from_utf8_lossy(&real.stdout);
    assert!(
        real.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&real.stderr)
    );
    assert!(out.contains("purged 4 message(s)"), "{out}");
    assert!(
        remaining(&js, &settings.broker.nats.stream)
            .await
            .is_empty()
    );
    cleanup(&js, &settings).await;
}
