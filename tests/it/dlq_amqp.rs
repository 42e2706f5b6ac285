//! `dlq list` / `dlq replay` over the real RabbitMQ: dead letters published into a test DLQ
//! queue the way the bridge stores them, listed without loss or reordering, replayed into the
//! bound events queue with their message ids, and left in place when unroutable.

use std::time::Duration;

use crate::common::*;
use indicatif::ProgressBar;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use pusher_bridge::broker::headers;
use pusher_bridge::config::{BrokerKind, SecretUrl, Settings};
use pusher_bridge::dlq::{self, DeadLetterRecord, DlqError};
use pusher_bridge::routing;

/// Unused test queues vanish after this long even if a test dies before its clean-up.
const QUEUE_TTL_MS: i64 = 600_000;

/// One test's RabbitMQ topology: events exchange (+ queue bound with `#` unless `bound` is
/// false) and DLQ exchange + queue, all with unique names.
struct Topology {
    settings: Settings,
    conn: Connection,
    ch: Channel,
}

impl Topology {
    async fn new(bound: bool) -> Self {
        let s = settings_for(BrokerKind::Amqp);
        let (conn, ch) = confirm_channel().await;
        let a = &s.broker.amqp;
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongLongInt(QUEUE_TTL_MS));
        for (exchange, queue, bind) in [
            (&a.exchange, &a.queue, bound),
            (&a.dlq_exchange, &a.dlq_queue, true),
        ] {
            declare_exchange(&ch, exchange).await;
            declare_queue(&ch, queue, true, args.clone()).await;
            if bind {
                bind_queue(&ch, queue, exchange, "#").await;
            }
        }
        Self {
            settings: s,
            conn,
            ch,
        }
    }

    /// Publishes a dead letter as the bridge stores one (exchange, routing key, persistent,
    /// `dlq-<id>`, headers as long strings, JSON content type) and waits for the confirm.
    async fn dead_letter(&self, l: &Letter) {
        let mut h = FieldTable::default();
        for (k, v) in [
            (headers::APP_ID, APP_ID.to_string()),
            (headers::EVENT, l.event.clone()),
            (headers::CHANNEL, l.channel.clone()),
            (headers::TIME_MS, "77".to_string()),
            (headers::DLQ_SUBJECT, l.subject.clone()),
            (headers::DLQ_MSG_ID, l.msg_id.clone()),
            (headers::DLQ_REASON, l.reason.to_string()),
            (headers::DLQ_DETAIL, format!("detail {}", l.msg_id)),
            (headers::DLQ_ATTEMPTS, "3".to_string()),
            (headers::DLQ_FIRST_FAILURE, "1700000000123".to_string()),
        ] {
            h.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
        }
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(format!("dlq-{}", l.msg_id).into())
            .with_headers(h);
        let key = routing::dlq_subject(&self.settings.broker.subject_prefix, APP_ID, l.reason);
        let confirm = self
            .ch
            .basic_publish(
                self.settings.broker.amqp.dlq_exchange.as_str().into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                l.body.as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(confirm, lapin::Confirmation::Ack(None), "letter stored");
    }

    /// Messages in `queue` right now.
    async fn count(&self, queue: &str) -> u32 {
        self.ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    /// Takes (and acknowledges) every message of the events queue.
    async fn drain_events(&self) -> Vec<lapin::message::Delivery> {
        let mut out = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(
                self.settings.broker.amqp.queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            out.push(m.delivery);
        }
        out
    }

    async fn clean_up(self) {
        let _ = self.conn.close(200, "OK".into()).await;
        amqp_delete(&self.settings).await;
    }
}

/// A dead letter to store.
#[derive(Clone)]
struct Letter {
    subject: String,
    msg_id: String,
    reason: &'static str,
    event: String,
    channel: String,
    body: String,
}

fn letter(t: &Topology, i: usize, reason: &'static str) -> Letter {
    let malformed = reason == "malformed";
    let (event, channel) = (format!("ev{i}"), format!("private-{i}.x"));
    Letter {
        subject: if malformed {
            String::new()
        } else {
            routing::subject(&t.settings.broker.subject_prefix, APP_ID, &event, &channel)
        },
        msg_id: format!("id{i}-{}", t.settings.broker.subject_prefix),
        reason,
        event: if malformed { String::new() } else { event },
        channel: if malformed { String::new() } else { channel },
        body: if malformed {
            format!(r#"{{"channel":{i}}}"#)
        } else {
            format!(r#"{{"name":"ev{i}","n":{i}}}"#)
        },
    }
}

fn ids(records: &[DeadLetterRecord]) -> Vec<String> {
    records.iter().map(|r| r.msg_id.clone()).collect()
}

#[tokio::test]
async fn listing_keeps_every_letter_in_order_and_replay_moves_the_replayable_ones() {
    let t = Topology::new(true).await;
    let letters = vec![
        letter(&t, 1, "unroutable"),
        letter(&t, 2, "malformed"),
        letter(&t, 3, "nacked"),
        letter(&t, 4, "rejected"),
    ];
    for l in &letters {
        t.dead_letter(l).await;
    }
    let want_ids: Vec<_> = letters.iter().map(|l| l.msg_id.clone()).collect();
    let dlq_queue = t.settings.broker.amqp.dlq_queue.clone();

    let listed = dlq::list_all(&t.settings).await.unwrap();
    assert_eq!(ids(&listed), want_ids);
    assert_eq!(
        listed.iter().map(|r| r.position).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let first = &listed[0];
    assert_eq!(first.subject, letters[0].subject);
    assert_eq!(first.reason, "unroutable");
    assert_eq!(first.attempts, 3);
    assert_eq!(first.first_failure_ms, 1_700_000_000_123);
    assert_eq!(first.first_failure(), "2023-11-14 22:13:20.123 UTC");
    assert_eq!(first.app_id, APP_ID);
    assert_eq!(first.event, "ev1");
    assert_eq!(first.channel, "private-1.x");
    assert_eq!(first.time_ms, "77");
    assert_eq!(first.detail, format!("detail {}", letters[0].msg_id));
    assert_eq!(&first.body[..], letters[0].body.as_bytes());
    assert!(listed[1].replay_blocker().is_some());

    // Nothing removed, nothing reordered, however often it is listed.
    assert_eq!(t.count(&dlq_queue).await, 4);
    let again = dlq::list_all(&t.settings).await.unwrap();
    assert_eq!(ids(&again), want_ids);
    assert_eq!(again[0].body, listed[0].body);
    assert_eq!(t.count(&dlq_queue).await, 4);

    let bar = ProgressBar::hidden();
    let summary = dlq::replay(&t.settings, &bar).await.unwrap();
    assert_eq!(
        (summary.seen, summary.replayed, summary.left),
        (4, 3, 1),
        "{}",
        summary.report()
    );
    assert!(!summary.all_replayed());
    assert_eq!(summary.left_letters[0].msg_id, letters[1].msg_id);
    assert_eq!(bar.position(), 4);

    let events = t.drain_events().await;
    assert_eq!(events.len(), 3);
    for (d, l) in events.iter().zip([&letters[0], &letters[2], &letters[3]]) {
        assert_eq!(d.routing_key.as_str(), l.subject);
        assert_eq!(d.exchange.as_str(), t.settings.broker.amqp.exchange);
        assert_eq!(
            d.properties.message_id().as_ref().map(|s| s.as_str()),
            Some(l.msg_id.as_str())
        );
        assert_eq!(d.properties.delivery_mode(), &Some(2));
        assert_eq!(
            d.properties.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(d.data, l.body.as_bytes());
        let h = d.properties.headers().as_ref().unwrap().inner();
        let text = |k: &str| match h.get(k) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("header {k}: {other:?}"),
        };
        assert_eq!(text(headers::APP_ID), APP_ID);
        assert_eq!(text(headers::EVENT), l.event);
        assert_eq!(text(headers::CHANNEL), l.channel);
        assert_eq!(text(headers::TIME_MS), "77");
        assert!(!h.contains_key(headers::DLQ_REASON));
    }
    let left = dlq::list_all(&t.settings).await.unwrap();
    assert_eq!(ids(&left), vec![letters[1].msg_id.clone()]);

    t.clean_up().await;
}

#[tokio::test]
async fn unroutable_letters_stay_in_place_and_in_order() {
    // The events exchange has no queue bound: every replay comes back unroutable.
    let t = Topology::new(false).await;
    let letters: Vec<_> = (0..5)
        .map(|i| letter(&t, i, if i == 2 { "malformed" } else { "unroutable" }))
        .collect();
    for l in &letters {
        t.dead_letter(l).await;
    }
    let summary = dlq::replay(&t.settings, &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!((summary.seen, summary.replayed, summary.left), (5, 0, 5));
    assert!(summary.stopped.is_none());
    assert!(
        summary
            .left_letters
            .iter()
            .filter(|l| l.msg_id != letters[2].msg_id)
            .all(|l| l.why.contains("unroutable")),
        "{}",
        summary.report()
    );
    let listed = dlq::list_all(&t.settings).await.unwrap();
    assert_eq!(
        ids(&listed),
        letters.iter().map(|l| l.msg_id.clone()).collect::<Vec<_>>()
    );
    t.clean_up().await;
}

#[tokio::test]
async fn more_letters_than_the_window_are_replayed_in_order() {
    let t = Topology::new(true).await;
    let n = dlq::REPLAY_WINDOW * 2 + 3;
    let letters: Vec<_> = (0..n).map(|i| letter(&t, i, "nacked")).collect();
    for l in &letters {
        t.dead_letter(l).await;
    }
    let summary = dlq::replay(&t.settings, &ProgressBar::hidden())
        .await
        .unwrap();
    assert!(summary.all_replayed(), "{}", summary.report());
    assert_eq!(summary.replayed, n as u64);
    let events = t.drain_events().await;
    let got: Vec<_> = events
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(
        got,
        letters.iter().map(|l| l.msg_id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(t.count(&t.settings.broker.amqp.dlq_queue).await, 0);
    t.clean_up().await;
}

#[tokio::test]
async fn a_missing_events_exchange_stops_the_replay_and_keeps_every_letter() {
    let mut t = Topology::new(true).await;
    let letters: Vec<_> = (0..3).map(|i| letter(&t, i, "nacked")).collect();
    for l in &letters {
        t.dead_letter(l).await;
    }
    let real = std::mem::replace(
        &mut t.settings.broker.amqp.exchange,
        format!("{}.nowhere", t.settings.broker.subject_prefix),
    );
    let summary = dlq::replay(&t.settings, &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!(summary.replayed, 0, "{}", summary.report());
    assert_eq!(summary.total, 3);
    assert_eq!(summary.left_total(), 3, "{}", summary.report());
    assert!(!summary.all_replayed());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let listed = dlq::list_all(&t.settings).await.unwrap();
    assert_eq!(
        ids(&listed),
        letters.iter().map(|l| l.msg_id.clone()).collect::<Vec<_>>()
    );
    t.settings.broker.amqp.exchange = real;
    t.clean_up().await;
}

#[tokio::test]
async fn a_missing_dlq_queue_is_named() {
    let mut s = Settings::default();
    s.broker.kind = BrokerKind::Amqp;
    s.broker.amqp.url = SecretUrl::new(amqp_url());
    s.broker.amqp.dlq_queue = unique("missing");
    match dlq::list_all(&s).await {
        Err(DlqError::Missing { kind, name }) => {
            assert_eq!(kind, "queue");
            assert_eq!(name, s.broker.amqp.dlq_queue);
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    assert!(matches!(
        dlq::replay(&s, &ProgressBar::hidden()).await,
        Err(DlqError::Missing { .. })
    ));
}

/// The issue-10 regression: with many publishes in flight, a confirm may carry another
/// message's `basic.return`. 300 `unroutable` letters, a queue bound for the even event names
/// only; after each of three replays every letter is in exactly one place (the events queue
/// once, or still in the DLQ), and the DLQ holds exactly the unroutable ones.
#[tokio::test]
async fn a_replay_of_routable_and_unroutable_letters_leaves_each_in_exactly_one_place() {
    let t = Topology::new(false).await;
    let a = &t.settings.broker.amqp;
    let n = 300;
    let letters: Vec<_> = (0..n).map(|i| letter(&t, i, "unroutable")).collect();
    for l in &letters {
        if l.event.trim_start_matches("ev").parse::<usize>().unwrap() % 2 == 0 {
            let key = routing::subject(&t.settings.broker.subject_prefix, APP_ID, &l.event, "*");
            // `routing::subject` escapes the channel: bind `<prefix>.<app>.<event>.#` instead.
            let key = format!("{}.#", key.trim_end_matches(".*"));
            bind_queue(&t.ch, &a.queue, &a.exchange, &key).await;
        }
    }
    for l in &letters {
        t.dead_letter(l).await;
    }
    let routable: std::collections::BTreeSet<String> = letters
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, l)| l.msg_id.clone())
        .collect();
    let mut delivered: std::collections::BTreeMap<String, usize> = Default::default();
    for run in 0..3 {
        let summary = dlq::replay(&t.settings, &ProgressBar::hidden())
            .await
            .unwrap();
        for d in t.drain_events().await {
            let id = d.properties.message_id().as_ref().unwrap().to_string();
            *delivered.entry(id).or_insert(0) += 1;
        }
        let left: std::collections::BTreeSet<String> = dlq::list_all(&t.settings)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.msg_id)
            .collect();
        let expected_replayed = if run == 0 { routable.len() as u64 } else { 0 };
        assert_eq!(
            summary.replayed,
            expected_replayed,
            "run {run}: {}",
            summary.report()
        );
        for l in &letters {
            let in_queue = delivered.get(&l.msg_id).copied().unwrap_or(0);
            let in_dlq = usize::from(left.contains(&l.msg_id));
            assert_eq!(
                in_queue + in_dlq,
                1,
                "run {run}: {} is {in_queue} time(s) in the queue and {in_dlq} in the DLQ",
                l.msg_id
            );
            assert_eq!(in_queue == 1, routable.contains(&l.msg_id), "{}", l.msg_id);
        }
    }
    t.clean_up().await;
}
