//! The retention sweeper against the real RabbitMQ: `sweep_once` removes messages older than
//! their retention from the queue head (per event overrides by the `Pusher-Event` header), keeps
//! and requeues the rest in order, stops at the first young message, leaves disabled targets
//! alone and changes nothing in a dry run; the lease is an exclusive queue; the loop sweeps on
//! its interval and a second replica takes over when the holder dies.
//!
//! "Old" messages are published with an old `timestamp` property.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use pusher_bridge::config::{BrokerKind, Settings};
use pusher_bridge::metrics::Metrics;
use pusher_bridge::sweeper::{self, LeaseStatus, Sweeper, Target, TargetOutcome, TargetReport};

const MIN: u64 = 60;

fn amqp_settings() -> Settings {
    let mut s = settings_for(BrokerKind::Amqp);
    s.retention.lease_ttl = Duration::from_secs(4);
    s.retention.events.max_age = Duration::from_secs(10 * MIN);
    s.retention.events.overrides = BTreeMap::from([
        ("client_event".to_string(), Duration::from_secs(MIN)),
        (
            "channel_occupied".to_string(),
            Duration::from_secs(120 * MIN),
        ),
    ]);
    s.retention.dlq.max_age = Duration::from_secs(10 * MIN);
    s
}

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

    /// Publishes a persistent message as the bridge does: `timestamp` (unix seconds) and the
    /// `Pusher-Event` header; the body is `tag` so tests can tell messages apart.
    async fn publish(&self, queue: &str, event: Option<&str>, age_secs: Option<u64>, tag: &str) {
        let mut headers = FieldTable::default();
        if let Some(e) = event {
            headers.insert("Pusher-Event".into(), AMQPValue::LongString(e.into()));
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(age) = age_secs {
            props = props.with_timestamp(now_secs() - age);
        }
        self.ch
            .basic_publish(
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

    async fn cleanup(self, settings: &Settings) {
        let _ = self.conn.close(200, "done".into()).await;
        amqp_delete(settings).await;
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn report(outcome: &(Target, TargetOutcome)) -> &TargetReport {
    match &outcome.1 {
        TargetOutcome::Swept(r) => r,
        other => panic!("{:?} not swept: {other:?}", outcome.0),
    }
}

/// The events queue, oldest first: what each message is and what the rules say.
async fn fill(rabbit: &Rabbit, settings: &Settings) {
    let q = &settings.broker.amqp.queue;
    // Kept: its override (2 h) is longer than its age.
    rabbit
        .publish(q, Some("channel_occupied"), Some(60 * MIN), "occupied-1h")
        .await;
    // Purged: past the default (10 min).
    rabbit
        .publish(q, Some("member_added"), Some(60 * MIN), "added-1h")
        .await;
    // Purged: past its override (1 min).
    rabbit
        .publish(q, Some("client_event"), Some(5 * MIN), "client-5m")
        .await;
    // Kept: inside the default.
    rabbit
        .publish(q, Some("member_added"), Some(5 * MIN), "added-5m")
        .await;
    // Purged: no event header, past the default.
    rabbit.publish(q, None, Some(30 * MIN), "unnamed-30m").await;
    // Kept: no publish time at all.
    rabbit
        .publish(q, Some("member_added"), None, "undated")
        .await;
    // Younger than every rule: the sweep stops here.
    rabbit
        .publish(q, Some("client_event"), Some(5), "client-5s")
        .await;
    // Behind the stop: not looked at, although old.
    rabbit
        .publish(q, Some("member_added"), Some(60 * MIN), "added-1h-late")
        .await;
    let d = &settings.broker.amqp.dlq_queue;
    rabbit
        .publish(d, Some("member_added"), Some(60 * MIN), "dlq-old")
        .await;
    rabbit
        .publish(d, Some("member_added"), Some(MIN), "dlq-young")
        .await;
}

#[tokio::test]
async fn sweep_once_removes_old_messages_from_the_head_and_keeps_order() {
    let settings = amqp_settings();
    let rabbit = Rabbit::open(&settings).await;
    fill(&rabbit, &settings).await;
    let (q, d) = (&settings.broker.amqp.queue, &settings.broker.amqp.dlq_queue);
    let before = rabbit.peek(q).await;
    assert_eq!(before.len(), 8);
    let metrics = Arc::new(Metrics::new());
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), metrics.clone())
        .await
        .unwrap();

    let dry = sweeper.sweep_once(&Target::ALL, true).await;
    let events = report(&dry[0]);
    assert!(events.dry_run && events.complete);
    assert_eq!(events.purged(), 3, "{events}");
    assert_eq!(events.purged_of("client_event"), 1, "{events}");
    assert_eq!(events.purged_of("member_added"), 1, "{events}");
    assert_eq!(report(&dry[1]).purged(), 1);
    assert_eq!(rabbit.peek(q).await, before, "dry run changed the queue");
    assert_eq!(rabbit.peek(d).await.len(), 2);

    let run = sweeper.sweep_once(&Target::ALL, false).await;
    let events = report(&run[0]);
    assert_eq!(events.purged(), 3, "{events}");
    assert!(events.complete);
    assert_eq!(
        rabbit.peek(q).await,
        [
            "occupied-1h",
            "added-5m",
            "undated",
            "client-5s",
            "added-1h-late"
        ]
    );
    assert_eq!(report(&run[1]).purged(), 1);
    assert_eq!(rabbit.peek(d).await, ["dlq-young"]);
    let text = metrics.encode();
    // No `Pusher-App-Id` header: the app is `other`, under the target's rules.
    assert!(
        text.contains(
            r#"pusher_bridge_sweeper_purged_total{target="events",app_id="other",rule="default"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"pusher_bridge_sweeper_purged_total{target="events",app_id="other",rule="event"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"pusher_bridge_sweeper_runs_total{target="dlq",outcome="success"} 1"#));

    sweeper.release().await;
    rabbit.cleanup(&settings).await;
}

#[tokio::test]
async fn disabled_targets_are_left_alone() {
    let mut settings = amqp_settings();
    settings.retention.dlq.enabled = false;
    let rabbit = Rabbit::open(&settings).await;
    fill(&rabbit, &settings).await;
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let run = sweeper.sweep_once(&Target::ALL, false).await;
    assert_eq!(report(&run[0]).purged(), 3);
    assert!(matches!(run[1], (Target::Dlq, TargetOutcome::Disabled)));
    assert_eq!(rabbit.peek(&settings.broker.amqp.dlq_queue).await.len(), 2);
    sweeper.release().await;
    rabbit.cleanup(&settings).await;
}

#[tokio::test]
async fn a_missing_queue_is_a_failed_run_not_a_crash() {
    let settings = amqp_settings();
    let metrics = Arc::new(Metrics::new());
    let mut sweeper = Sweeper::new(Arc::new(settings.clone()), metrics.clone())
        .await
        .unwrap();
    let run = sweeper.sweep_once(&[Target::Events], false).await;
    assert!(
        matches!(run[0].1, TargetOutcome::Failed(_)),
        "{:?}",
        run[0].1
    );
    assert!(
        metrics
            .encode()
            .contains(r#"pusher_bridge_sweeper_runs_total{target="events",outcome="failure"} 1"#)
    );
    sweeper.release().await;
}

#[tokio::test]
async fn one_lease_holder_at_a_time() {
    let settings = Arc::new(amqp_settings());
    let rabbit = Rabbit::open(&settings).await;
    let mut a = Sweeper::new(settings.clone(), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let mut b = Sweeper::new(settings.clone(), Arc::new(Metrics::new()))
        .await
        .unwrap();
    assert_eq!(a.acquire_lease().await.unwrap(), LeaseStatus::Held);
    assert_eq!(
        b.acquire_lease().await.unwrap(),
        LeaseStatus::Elsewhere(None)
    );
    let run = b.sweep_once(&Target::ALL, false).await;
    assert!(
        run.iter()
            .all(|(_, o)| matches!(o, TargetOutcome::Skipped(_)))
    );
    // Still held while the holder's connection lives.
    assert_eq!(a.acquire_lease().await.unwrap(), LeaseStatus::Held);
    assert_eq!(
        b.acquire_lease().await.unwrap(),
        LeaseStatus::Elsewhere(None)
    );
    a.release().await;
    assert_eq!(b.acquire_lease().await.unwrap(), LeaseStatus::Held);
    b.release().await;
    rabbit.cleanup(&settings).await;
}

#[tokio::test]
async fn the_loop_sweeps_on_its_interval_and_a_second_replica_takes_over() {
    let mut settings = amqp_settings();
    settings.retention.events.interval = Duration::from_millis(300);
    settings.retention.dlq.interval = Duration::from_millis(300);
    let settings = Arc::new(settings);
    let rabbit = Rabbit::open(&settings).await;
    let q = settings.broker.amqp.queue.clone();
    let metrics_a = Arc::new(Metrics::new());
    let metrics_b = Arc::new(Metrics::new());
    let (_stop_a, listen_a) = pusher_bridge::shutdown::channel();
    let (stop_b, listen_b) = pusher_bridge::shutdown::channel();
    let a = Sweeper::new(settings.clone(), metrics_a.clone())
        .await
        .unwrap();
    let task_a = tokio::spawn(sweeper::run_loop(a, listen_a));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = Sweeper::new(settings.clone(), metrics_b.clone())
        .await
        .unwrap();
    let task_b = tokio::spawn(sweeper::run_loop(b, listen_b));

    rabbit
        .publish(&q, Some("member_added"), Some(60 * MIN), "old-1")
        .await;
    wait_until_empty(&rabbit, &q, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let runs = |m: &Metrics, outcome: &str| {
        let text = m.encode();
        let prefix =
            format!(r#"pusher_bridge_sweeper_runs_total{{target="events",outcome="{outcome}"}}"#);
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(runs(&metrics_a, "success") >= 2.0);
    assert_eq!(runs(&metrics_b, "success"), 0.0, "only the holder sweeps");
    assert!(runs(&metrics_b, "skipped") >= 1.0);

    // The holder's task dies; its connection (and lease) ends with it.
    task_a.abort();
    let _ = task_a.await;
    rabbit
        .publish(&q, Some("member_added"), Some(60 * MIN), "old-2")
        .await;
    wait_until_empty(&rabbit, &q, Duration::from_secs(15)).await;
    assert!(runs(&metrics_b, "success") >= 1.0);

    stop_b.trigger();
    tokio::time::timeout(Duration::from_secs(5), task_b)
        .await
        .expect("loop stops on shutdown")
        .unwrap();
    rabbit.cleanup(&settings).await;
}

async fn wait_until_empty(rabbit: &Rabbit, queue: &str, within: Duration) {
    let start = tokio::time::Instant::now();
    loop {
        let left = rabbit.peek(queue).await;
        if left.is_empty() {
            return;
        }
        assert!(start.elapsed() < within, "{left:?} still in {queue}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
