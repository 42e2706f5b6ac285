//! Lasting refusals told as they are: a full stream is dead-lettered at once (no retries that
//! cannot help) as `full`, said in the log once a minute per reason with a count; a deleted
//! events stream is declared again with `declare = true`, and dead-lettered as `no_stream`
//! with `declare = false`.

use std::time::{Duration, Instant};

use async_nats::jetstream::stream::{Config, DiscardPolicy};

use pusher_bridge::config::BrokerKind;

use crate::common::process::{BridgeProcess, amqp_env, post_signed, settings_env};
use crate::common::{
    APP_KEY, APP_SECRET, delete_streams, jetstream_ctx, nats_settings, nats_url, read_dead_letters,
    stream_messages, webhook_body,
};

fn events(n: usize, tag: &str) -> String {
    let events: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"name":"channel_occupied","channel":"{tag}-{i}"}}"#))
        .collect();
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    webhook_body(1_700_000_000_000, &refs)
}

const REFUSED_LINE: &str = "the broker refuses events for good";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_is_dead_lettered_at_once_and_said_once_a_minute() {
    let s = nats_settings();
    let js = jetstream_ctx(&nats_url()).await;
    // The operator's stream: room for one message, new ones refused.
    js.create_stream(Config {
        name: s.broker.nats.stream.clone(),
        subjects: vec![format!("{}.>", s.broker.subject_prefix)],
        max_messages: 1,
        discard: DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .expect("events stream");
    let mut bridge = BridgeProcess::start(&["serve"], settings_env(&s));
    bridge.wait_ready().await;

    let first = post_signed(bridge.port, APP_KEY, APP_SECRET, &events(1, "a")).await;
    let first = first.expect("an answer");
    assert_eq!(first.0, 200, "{}", first.1);
    assert!(first.1.contains(r#""published":1"#), "{}", first.1);

    // Full now: each refusal goes to the dead-letter queue without the retries a `rejected`
    // gets (they took about 2 s of the response budget before).
    for (n, tag) in [(2, "b"), (1, "c")] {
        let started = Instant::now();
        let r = post_signed(bridge.port, APP_KEY, APP_SECRET, &events(n, tag))
            .await
            .expect("an answer");
        let took = started.elapsed();
        assert_eq!(r.0, 200, "{}", r.1);
        assert!(r.1.contains(&format!(r#""dead_lettered":{n}"#)), "{}", r.1);
        assert!(took < Duration::from_millis(700), "answered after {took:?}");
    }
    let letters = read_dead_letters(BrokerKind::Nats, &s, 3).await;
    assert_eq!(letters.len(), 3);
    for l in &letters {
        assert_eq!(l.header("Pusher-Bridge-Reason"), Some("full"));
        assert!(l.subject.ends_with(".full"), "{}", l.subject);
    }
    let metrics = bridge.get("/metrics").await.expect("metrics").1;
    assert!(
        metrics.contains(
            r#"pusher_bridge_events_dead_lettered_total{app_id="123456",reason="full"} 3"#
        ),
        "{metrics}"
    );

    assert_eq!(bridge.terminate().await, Some(0));
    let out = bridge.stdout();
    let said: Vec<&str> = out.lines().filter(|l| l.contains(REFUSED_LINE)).collect();
    assert_eq!(said.len(), 1, "one line a minute per reason:\n{out}");
    assert!(said[0].contains(r#"reason="full""#), "{}", said[0]);
    assert!(said[0].contains("refused=1"), "{}", said[0]);
    assert!(said[0].contains("raise its limits"), "{}", said[0]);
    delete_streams(&js, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_events_stream_is_declared_again_and_its_events_published() {
    let s = nats_settings();
    let js = jetstream_ctx(&nats_url()).await;
    let mut bridge = BridgeProcess::start(&["serve"], settings_env(&s));
    bridge.wait_ready().await;
    let r = post_signed(bridge.port, APP_KEY, APP_SECRET, &events(1, "before"))
        .await
        .expect("an answer");
    assert!(r.1.contains(r#""published":1"#), "{}", r.1);

    js.delete_stream(&s.broker.nats.stream)
        .await
        .expect("the operator deletes the stream");
    let r = post_signed(bridge.port, APP_KEY, APP_SECRET, &events(3, "after"))
        .await
        .expect("an answer");
    assert_eq!(r.0, 200, "{}", r.1);
    assert!(!r.1.contains(r#""dead_lettered":3"#), "{}", r.1);

    // Declared again, and the three events are in it (published at once, or drained from
    // the spool a moment later).
    let deadline = Instant::now() + Duration::from_secs(5);
    while js.get_stream(&s.broker.nats.stream).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the stream was not declared again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = stream_messages(&js, &s.broker.nats.stream, 3).await;
    let channels: Vec<&str> = stored
        .iter()
        .filter_map(|m| m.header("Pusher-Channel"))
        .collect();
    assert_eq!(channels, ["after-0", "after-1", "after-2"], "{stored:?}");
    let (code, _) = bridge.get("/readyz").await.expect("readyz");
    assert_eq!(code, 200);

    assert_eq!(bridge.terminate().await, Some(0));
    let out = bridge.stdout();
    assert!(
        out.lines()
            .any(|l| l.contains("declaring it again") && l.contains(&s.broker.nats.stream)),
        "{out}"
    );
    assert!(!out.contains(REFUSED_LINE), "{out}");
    delete_streams(&js, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_declare_a_deleted_stream_is_a_no_stream_dead_letter_said_in_the_log() {
    let s = nats_settings();
    let js = jetstream_ctx(&nats_url()).await;
    for (name, subject) in [
        (
            &s.broker.nats.stream,
            format!("{}.>", s.broker.subject_prefix),
        ),
        (
            &s.broker.nats.dlq_stream,
            format!("{}_dlq.>", s.broker.subject_prefix),
        ),
    ] {
        js.create_stream(Config {
            name: name.clone(),
            subjects: vec![subject],
            ..Default::default()
        })
        .await
        .expect("the operator's stream");
    }
    let mut env = settings_env(&s);
    env.push(("PUSHER_BRIDGE_BROKER__DECLARE".into(), "false".into()));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_ready().await;
    js.delete_stream(&s.broker.nats.stream)
        .await
        .expect("the operator deletes the stream");
    let r = post_signed(bridge.port, APP_KEY, APP_SECRET, &events(2, "gone"))
        .await
        .expect("an answer");
    assert_eq!(r.0, 200, "{}", r.1);
    assert!(r.1.contains(r#""dead_lettered":2"#), "{}", r.1);
    let letters = read_dead_letters(BrokerKind::Nats, &s, 2).await;
    assert!(
        letters
            .iter()
            .all(|l| l.header("Pusher-Bridge-Reason") == Some("no_stream")),
        "{letters:?}"
    );
    assert_eq!(bridge.terminate().await, Some(0));
    let out = bridge.stdout();
    let said: Vec<&str> = out.lines().filter(|l| l.contains(REFUSED_LINE)).collect();
    assert_eq!(said.len(), 1, "{out}");
    assert!(said[0].contains(r#"reason="no_stream""#), "{}", said[0]);
    assert!(said[0].contains("broker.declare = true"), "{}", said[0]);
    delete_streams(&js, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_deleted_exchange_and_queue_are_declared_again_and_the_events_delivered() {
    let s = crate::common::settings_for(BrokerKind::Amqp);
    let mut env = settings_env(&s);
    env.extend(amqp_env(&s));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_ready().await;
    let r = post_signed(bridge.port, APP_KEY, APP_SECRET, &events(1, "before"))
        .await
        .expect("an answer");
    assert!(r.1.contains(r#""published":1"#), "{}", r.1);
    assert_eq!(
        crate::common::amqp_deliveries(&s.broker.amqp.queue, 1)
            .await
            .len(),
        1
    );

    let (_conn, ch) = crate::common::amqp_channel().await;
    ch.queue_delete(s.broker.amqp.queue.as_str().into(), Default::default())
        .await
        .expect("the operator deletes the queue");
    let r = post_signed(bridge.port, APP_KEY, APP_SECRET, &events(2, "noqueue"))
        .await
        .expect("an answer");
    assert_eq!(r.0, 200, "{}", r.1);
    assert!(
        !r.1.contains(r#""dead_lettered""#) || r.1.contains(r#""dead_lettered":0"#),
        "{}",
        r.1
    );
    ch.exchange_delete(s.broker.amqp.exchange.as_str().into(), Default::default())
        .await
        .expect("the operator deletes the exchange");
    let r = post_signed(bridge.port, APP_KEY, APP_SECRET, &events(2, "noexchange"))
        .await
        .expect("an answer");
    assert_eq!(r.0, 200, "{}", r.1);
    assert!(r.1.contains(r#""dead_lettered":0"#), "{}", r.1);

    let got = crate::common::amqp_deliveries(&s.broker.amqp.queue, 4).await;
    // Tried again one by one after the channel error: their order is not promised.
    let mut channels: Vec<String> = got
        .iter()
        .filter_map(|d| crate::common::amqp_header(&d.properties, "Pusher-Channel"))
        .collect();
    channels.sort();
    assert_eq!(
        channels,
        ["noexchange-0", "noexchange-1", "noqueue-0", "noqueue-1"]
    );
    assert_eq!(bridge.terminate().await, Some(0));
    let out = bridge.stdout();
    assert!(out.contains("declaring it again"), "{out}");
    assert!(!out.contains(REFUSED_LINE), "{out}");
    crate::common::amqp_delete(&s).await;
}
