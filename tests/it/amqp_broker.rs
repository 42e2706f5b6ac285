//! RabbitMQ-only behaviour against the real RabbitMQ of this machine: message properties,
//! nacks and returns going to the dead-letter queue, pipelined confirms, missing confirms,
//! recovery (server-side close, broker gone and back) and `amqps://`. Each test uses its own
//! exchanges, queues and connection name and deletes them at the end; broker outages are
//! simulated with a relay in front of RabbitMQ (`crate::common::relay`), never on the shared broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::relay::{Relay, tls_fixture};
use crate::common::*;
use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString};
use pusher_bridge::broker::{Broker, DlqReason, Message, PublishError};
use pusher_bridge::config::{BrokerKind, SecretUrl, Settings};
use pusher_bridge::metrics::Metrics;
use pusher_bridge::routing;

fn amqp_settings() -> Settings {
    settings_for(BrokerKind::Amqp)
}

/// Declares `exchange` (durable topic) and, when given, `queue` (durable) bound with `key`.
async fn declare(exchange: &str, queue: Option<(&str, &str, FieldTable)>) {
    declare_with(exchange, queue, true).await
}

/// [`declare`] with the queue's durability chosen.
async fn declare_with(exchange: &str, queue: Option<(&str, &str, FieldTable)>, durable: bool) {
    let (conn, ch) = amqp_channel().await;
    declare_exchange(&ch, exchange).await;
    if let Some((queue, key, args)) = queue {
        declare_queue(&ch, queue, durable, args).await;
        bind_queue(&ch, queue, exchange, key).await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// The DLQ pair the bridge expects, declared by the test (for `broker.declare = false`).
async fn declare_dlq(s: &Settings) {
    let a = &s.broker.amqp;
    declare(
        &a.dlq_exchange,
        Some((&a.dlq_queue, "#", FieldTable::default())),
    )
    .await;
}

fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    amqp_header(&d.properties, name)
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_carries_its_amqp_properties() {
    let settings = amqp_settings();
    let app = TestApp::spawn_ready(settings.clone()).await;
    let body = webhook_body(
        1_700_000_000_123,
        &[
            r#"{"name":"member_added","channel":"presence-a.b","user_id":"u1"}"#,
            r#"{"name":"channel_vacated"}"#,
            r#"{"name":"client_event","channel":"private-chat","event":"client-x","data":"{}"}"#,
        ],
    );
    let before = unix_secs();
    let a = app.post_signed(&body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let after = unix_secs();
    let digest = routing::webhook_digest(APP_ID, body.as_bytes());
    let p = &settings.broker.subject_prefix;

    let events = amqp_deliveries(&settings.broker.amqp.queue, 2).await;
    assert_eq!(events.len(), 2);
    for d in &events {
        let (index, key) = if d.routing_key.as_str().contains("member_added") {
            (0, format!("{p}.123456.member_added.presence-a%2Eb"))
        } else {
            (2, format!("{p}.123456.client_event.private-chat"))
        };
        assert_eq!(d.routing_key.as_str(), key);
        assert_eq!(d.exchange.as_str(), settings.broker.amqp.exchange);
        let props = &d.properties;
        assert_eq!(props.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            props.message_id().as_ref().map(|s| s.to_string()),
            Some(routing::message_id(&digest, index)),
            "the deterministic id, as on NATS"
        );
        let ts = props.timestamp().expect("timestamp");
        assert!(before <= ts && ts <= after, "{before} <= {ts} <= {after}");
        let json: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(header(d, "Pusher-App-Id").as_deref(), Some("123456"));
        assert_eq!(
            header(d, "Pusher-Event"),
            json["name"].as_str().map(Into::into)
        );
        assert_eq!(
            header(d, "Pusher-Channel"),
            json["channel"].as_str().map(Into::into)
        );
        assert_eq!(
            header(d, "Pusher-Time-Ms").as_deref(),
            Some("1700000000123")
        );
        assert_eq!(json["app_id"], "123456");
    }

    let dead = amqp_deliveries(&settings.broker.amqp.dlq_queue, 1).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.routing_key.as_str(), format!("{p}_dlq.123456.malformed"));
    assert_eq!(d.exchange.as_str(), settings.broker.amqp.dlq_exchange);
    assert_eq!(d.properties.delivery_mode(), &Some(2));
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.to_string()),
        Some(format!("dlq-{}", routing::message_id(&digest, 1)))
    );
    assert_eq!(
        header(d, "Pusher-Bridge-Reason").as_deref(),
        Some("malformed")
    );
    assert_eq!(
        header(d, "Pusher-Bridge-Msg-Id"),
        Some(routing::message_id(&digest, 1))
    );
    assert_eq!(header(d, "Pusher-Bridge-Attempts").as_deref(), Some("0"));
    assert!(header(d, "Pusher-Bridge-First-Failure-Ms").is_some());
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_publishes_are_retried_then_dead_lettered_as_nacked() {
    let mut settings = amqp_settings();
    settings.broker.declare = false;
    settings.broker.response_budget = Duration::from_millis(800);
    let a = &settings.broker.amqp;
    // A queue that takes nothing: with `reject-publish` RabbitMQ nacks every publish.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    declare(&a.exchange, Some((&a.queue, "#", args))).await;
    declare_dlq(&settings).await;

    let app = TestApp::spawn_ready(settings.clone()).await;
    let started = Instant::now();
    let r = app
        .post_signed(&webhook_body(
            7,
            &[r#"{"name":"channel_occupied","channel":"full"}"#],
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(3));
    let dead = amqp_deliveries(&settings.broker.amqp.dlq_queue, 1).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(header(d, "Pusher-Bridge-Reason").as_deref(), Some("nacked"));
    let attempts: u32 = header(d, "Pusher-Bridge-Attempts")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        attempts > 1,
        "nacks are retried within the budget: {attempts}"
    );
    assert_eq!(
        header(d, "Pusher-Bridge-Subject"),
        Some(format!(
            "{}.123456.channel_occupied.full",
            settings.broker.subject_prefix
        ))
    );
    assert_eq!(
        app.metric("pusher_bridge_events_dead_lettered_total{app_id=\"123456\",reason=\"nacked\"}")
            .await,
        1.0
    );
    assert_eq!(
        app.metric("pusher_bridge_events_published_total").await,
        0.0
    );
    assert!(
        amqp_deliveries(&settings.broker.amqp.queue, 0)
            .await
            .is_empty()
    );
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publishes_are_dead_lettered_as_unroutable() {
    let mut settings = amqp_settings();
    settings.broker.declare = false;
    // The events exchange exists but no queue is bound to it.
    declare(&settings.broker.amqp.exchange, None).await;
    declare_dlq(&settings).await;

    let app = TestApp::spawn_ready(settings.clone()).await;
    let r = app
        .post_signed(&webhook_body(
            8,
            &[
                r#"{"name":"channel_occupied","channel":"nowhere-1"}"#,
                r#"{"name":"channel_vacated","channel":"nowhere-2"}"#,
            ],
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let dead = amqp_deliveries(&settings.broker.amqp.dlq_queue, 2).await;
    assert_eq!(dead.len(), 2);
    for d in &dead {
        assert_eq!(
            header(d, "Pusher-Bridge-Reason").as_deref(),
            Some("unroutable")
        );
        assert_eq!(
            header(d, "Pusher-Bridge-Attempts").as_deref(),
            Some("1"),
            "an unroutable message is not retried"
        );
        assert!(
            header(d, "Pusher-Bridge-Detail")
                .unwrap()
                .contains("NO_ROUTE")
        );
        assert_eq!(
            d.routing_key.as_str(),
            format!("{}_dlq.123456.unroutable", settings.broker.subject_prefix)
        );
    }
    assert_eq!(
        app.metric(
            "pusher_bridge_events_dead_lettered_total{app_id=\"123456\",reason=\"unroutable\"}"
        )
        .await,
        2.0
    );
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

/// Many publishes in flight on few channels, half of them unroutable: each gets its own
/// verdict (lapin alone may hand a return to another message's confirm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_get_their_own_confirms_and_returns() {
    let mut settings = amqp_settings();
    settings.broker.declare = false;
    settings.broker.amqp.channels = 2;
    let a = settings.broker.amqp.clone();
    // A transient queue: RabbitMQ confirms at once instead of after the disk write, so the
    // acks of routed messages and the returns and acks of unroutable ones interleave tightly.
    declare_with(
        &a.exchange,
        Some((&a.queue, "k.even.*", FieldTable::default())),
        false,
    )
    .await;
    let broker = Broker::connect(&settings, Arc::new(Metrics::new()))
        .await
        .unwrap();
    assert!(broker.wait_up(Duration::from_secs(5)).await);

    const N: usize = 1000;
    let messages: Vec<Message> = (0..N)
        .map(|i| {
            let parity = if i % 2 == 0 { "even" } else { "odd" };
            Message {
                subject: format!("k.{parity}.{i}"),
                msg_id: format!("pipelined-{i}"),
                body: Bytes::from(format!(r#"{{"i":{i}}}"#)),
                app_id: Arc::from(APP_ID),
                event: "e".into(),
                channel: "c".into(),
                time_ms: "1".into(),
                trace: None,
            }
        })
        .collect();
    let started = Instant::now();
    let results = futures::future::join_all(
        messages
            .iter()
            .map(|m| broker.publish(m, Duration::from_secs(10))),
    )
    .await;
    let elapsed = started.elapsed();
    eprintln!(
        "{N} confirmed publishes (half returned) in {elapsed:?}: {:.0}/s",
        N as f64 / elapsed.as_secs_f64()
    );
    for (i, r) in results.iter().enumerate() {
        if i % 2 == 0 {
            assert!(r.is_ok(), "message {i}: {r:?}");
        } else {
            match r {
                Err(PublishError::Refused { reason, .. }) => {
                    assert_eq!(*reason, DlqReason::Unroutable, "message {i}")
                }
                other => panic!("message {i} should be unroutable: {other:?}"),
            }
        }
    }
    let stored = amqp_deliveries(&a.queue, N / 2).await;
    let mut ids: Vec<String> = stored
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..N)
        .step_by(2)
        .map(|i| format!("pipelined-{i}"))
        .collect();
    want.sort();
    assert_eq!(ids, want);
    broker.close().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_that_never_comes_is_unavailable_after_the_timeout() {
    let relay = Relay::start().await;
    let mut settings = amqp_settings();
    settings.broker.amqp.url =
        SecretUrl::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", relay.port));
    let broker = Broker::connect(&settings, Arc::new(Metrics::new()))
        .await
        .unwrap();
    assert!(broker.wait_up(Duration::from_secs(5)).await);
    let msg = Message {
        subject: format!("{}.123456.e.c", settings.broker.subject_prefix),
        msg_id: "never-confirmed".into(),
        body: Bytes::from_static(b"{}"),
        app_id: Arc::from(APP_ID),
        event: "e".into(),
        channel: "c".into(),
        time_ms: "1".into(),
        trace: None,
    };
    relay.freeze(true);
    let started = Instant::now();
    let r = broker.publish(&msg, Duration::from_millis(400)).await;
    let took = started.elapsed();
    assert!(matches!(r, Err(PublishError::Unavailable(_))), "{r:?}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );
    relay.freeze(false);
    let again = Message {
        msg_id: "confirmed".into(),
        ..msg
    };
    broker
        .publish(&again, Duration::from_secs(5))
        .await
        .expect("confirms flow again");
    broker.close().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

/// `rabbitmqctl list_connections pid client_properties`: the server pid of the connection whose
/// `connection_name` client property is `wanted` (`close_connection` takes the pid).
fn server_connection_named(wanted: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!("\"{wanted}\"")))
        .and_then(|l| l.split('\t').next())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_recovers_when_the_server_closes_its_connection() {
    let mut settings = amqp_settings();
    // No spool room, so readiness follows the broker alone.
    settings.spool.max_bytes = 64;
    let name = settings.broker.amqp.connection_name.clone();
    let app = TestApp::spawn_ready(settings.clone()).await;
    let first = app
        .post_signed(&webhook_body(
            1,
            &[r#"{"name":"channel_occupied","channel":"before"}"#],
        ))
        .await;
    assert_eq!(first.status, 200);
    let server_name = server_connection_named(&name).expect("the bridge's connection is listed");

    // Watch readiness while the connection is closed from the server side (only this one).
    let addr = app.addr;
    let watcher = tokio::spawn(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let uri: hyper::Uri = format!("http://{addr}/readyz").parse().unwrap();
            if let Ok(r) = client.get(uri).await {
                let s = r.status().as_u16();
                if seen.last() != Some(&s) {
                    seen.push(s);
                }
                if seen.ends_with(&[503, 200]) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen
    });
    let status = std::process::Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &server_name, "pusher-bridge test"])
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success());
    let seen = watcher.await.unwrap();
    assert!(
        seen.ends_with(&[503, 200]),
        "readiness went 503 then 200: {seen:?}"
    );
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 1.0);
    let again = server_connection_named(&name).expect("reconnected under the same name");
    assert_ne!(again, server_name, "a new connection");
    let after = app
        .post_signed(&webhook_body(
            2,
            &[r#"{"name":"channel_occupied","channel":"after"}"#],
        ))
        .await;
    assert_eq!(after.status, 200, "{}", after.body);
    let stored = read_events(BrokerKind::Amqp, &settings, 2).await;
    let mut channels: Vec<_> = stored.iter().map(Stored::channel).collect();
    channels.sort();
    assert_eq!(channels, ["after", "before"]);
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_starts_before_rabbitmq_and_follows_it_down_and_up() {
    let mut relay = Relay::on_port(free_port());
    let mut settings = amqp_settings();
    settings.broker.amqp.url =
        SecretUrl::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", relay.port));
    // No spool room, so readiness follows the broker alone.
    settings.spool.max_bytes = 64;
    let app = TestApp::spawn(settings.clone()).await;
    assert_eq!(app.get("/healthz").await.status, 200);
    assert_eq!(app.get("/readyz").await.status, 503);
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 0.0);

    relay.restart().await;
    app.wait_ready().await;
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 1.0);
    let ok = app
        .post_signed(&webhook_body(
            3,
            &[r#"{"name":"channel_occupied","channel":"late"}"#],
        ))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);

    // The broker vanishes (every connection dropped, nothing listening).
    relay.stop();
    for _ in 0..250 {
        if app.get("/readyz").await.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.get("/readyz").await.status, 503);
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 0.0);
    let started = Instant::now();
    let down = app
        .post_signed(&webhook_body(
            4,
            &[r#"{"name":"channel_occupied","channel":"down"}"#],
        ))
        .await;
    assert_eq!(down.status, 503);
    assert!(started.elapsed() < Duration::from_secs(4));

    relay.restart().await;
    app.wait_ready().await;
    let back = app
        .post_signed(&webhook_body(
            5,
            &[r#"{"name":"channel_occupied","channel":"back"}"#],
        ))
        .await;
    assert_eq!(back.status, 200, "{}", back.body);
    let stored = read_events(BrokerKind::Amqp, &settings, 2).await;
    assert_eq!(stored.len(), 2);
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_works_with_the_configured_ca_and_only_with_it() {
    let relay = Relay::start_tls().await;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", relay.port);

    // Without the CA the server's certificate is not trusted: never ready.
    let mut untrusted = amqp_settings();
    untrusted.broker.amqp.url = SecretUrl::new(url.clone());
    untrusted.spool.max_bytes = 64;
    let app = TestApp::spawn(untrusted).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.get("/readyz").await.status, 503);
    app.stop().await;

    let mut settings = amqp_settings();
    settings.broker.amqp.url = SecretUrl::new(url);
    settings.broker.amqp.tls_ca_file = Some(tls_fixture("ca.pem"));
    let app = TestApp::spawn_ready(settings.clone()).await;
    let r = app
        .post_signed(&webhook_body(
            6,
            &[r#"{"name":"channel_occupied","channel":"tls"}"#],
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stored = read_events(BrokerKind::Amqp, &settings, 1).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].body["channel"], "tls");
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

/// With `broker.declare = false` and no events exchange, RabbitMQ closes the channel with 404:
/// the event is dead-lettered as `no_stream` (like NATS with no stream), the channel is reopened
/// and the bridge stays ready for the next webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_dead_letters_as_no_stream_and_channels_reopen() {
    let mut settings = amqp_settings();
    settings.broker.declare = false;
    settings.broker.amqp.channels = 1;
    declare_dlq(&settings).await;
    let app = TestApp::spawn_ready(settings.clone()).await;
    for i in 0..3 {
        let r = app
            .post_signed(&webhook_body(
                10 + i,
                &[r#"{"name":"channel_occupied","channel":"no-exchange"}"#],
            ))
            .await;
        assert_eq!(r.status, 200, "webhook {i}: {}", r.body);
        app.wait_ready().await;
    }
    let dead = amqp_deliveries(&settings.broker.amqp.dlq_queue, 3).await;
    assert_eq!(dead.len(), 3);
    for d in &dead {
        assert_eq!(
            header(d, "Pusher-Bridge-Reason").as_deref(),
            Some("no_stream")
        );
        assert!(
            header(d, "Pusher-Bridge-Detail")
                .unwrap()
                .contains("NOT_FOUND")
        );
    }
    assert_eq!(
        app.metric(
            "pusher_bridge_events_dead_lettered_total{app_id=\"123456\",reason=\"no_stream\"}"
        )
        .await,
        3.0
    );
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

/// `amqp://guest:guest@127.0.0.1:<port>/%2f`: a node of a `broker.amqp.url` list.
fn node_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// Waits until the bridge counted `n` reconnects and is up again.
async fn wait_reconnects(app: &TestApp, n: f64) {
    for _ in 0..500 {
        if app
            .metric(r#"pusher_bridge_broker_reconnects_total{broker="amqp"}"#)
            .await
            == n
            && app.metric("pusher_bridge_broker_up").await == 1.0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no reconnect number {n}");
}

/// Three "nodes" (relays in front of this machine's RabbitMQ) in `broker.amqp.url`. The first
/// is down at start: the bridge connects to the second. The first comes back and the second
/// dies: the bridge goes on to the third, the one after the lost node, not back to the first
/// (which stopping the first then shows: no further reconnect). Events posted on each node
/// arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_list_connects_to_the_first_that_answers_and_fails_over_in_turn() {
    let mut a = Relay::on_port(free_port());
    let mut b = Relay::start().await;
    let c = Relay::start().await;
    let mut settings = amqp_settings();
    settings.broker.amqp.url = SecretUrl::new(format!(
        "{},{}, {}",
        node_url(a.port),
        node_url(b.port),
        node_url(c.port)
    ));
    // No spool room: a webhook answered 200 was published, not spooled.
    settings.spool.max_bytes = 64;
    let app = TestApp::spawn_ready(settings.clone()).await;
    let post = |n: u64, channel: &str| {
        webhook_body(
            n,
            &[&format!(
                r#"{{"name":"channel_occupied","channel":"{channel}"}}"#
            )],
        )
    };
    let on_b = app.post_signed(&post(1, "on-b")).await;
    assert_eq!(on_b.status, 200, "{}", on_b.body);

    a.restart().await;
    let lost = Instant::now();
    b.stop();
    wait_reconnects(&app, 1.0).await;
    let failover = lost.elapsed();
    let on_c = app.post_signed(&post(2, "on-c")).await;
    assert_eq!(on_c.status, 200, "{}", on_c.body);
    // Had the bridge gone back to the first node, losing it now would be a second reconnect.
    a.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        app.metric(r#"pusher_bridge_broker_reconnects_total{broker="amqp"}"#)
            .await,
        1.0,
        "the bridge went back to the first node instead of on to the third"
    );
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 1.0);

    let stored = read_events(BrokerKind::Amqp, &settings, 2).await;
    let mut channels: Vec<_> = stored.iter().map(Stored::channel).collect();
    channels.sort();
    assert_eq!(channels, ["on-b", "on-c"]);
    println!("FIGURE amqp-failover (relays): up on the next node {failover:.2?} after the loss");
    drop(c);
    app.stop().await;
    cleanup(BrokerKind::Amqp, &settings).await;
}

/// The environment that runs the binary against `s`'s RabbitMQ topology with `url` as
/// `broker.amqp.url`.
fn amqp_tool_env(s: &Settings, url: &str) -> process::Env {
    let mut env = process::settings_env(s);
    env.extend(process::amqp_env(s));
    // Set last, so it wins over the settings' own URL.
    env.push(("PUSHER_BRIDGE_BROKER__AMQP__URL".into(), url.to_string()));
    env
}

/// `dlq list` and `sweep --once --dry-run` with a `broker.amqp.url` whose first node is down
/// (nothing listens there) and whose second is this machine's RabbitMQ: both get through the
/// second. `check-config` shows the list with each password masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_take_a_node_list_whose_first_node_is_down() {
    let settings = amqp_settings();
    let a = &settings.broker.amqp;
    declare(&a.exchange, Some((&a.queue, "#", FieldTable::default()))).await;
    declare_dlq(&settings).await;
    let (conn, ch) = confirm_channel().await;
    ch.basic_publish(
        "".into(),
        a.dlq_queue.as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        br#"{"name":"channel_occupied","channel":"x"}"#,
        lapin::BasicProperties::default().with_message_id("dlq-x".into()),
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");
    let _ = conn.close(200, "done".into()).await;
    let dead = free_port();
    let list = format!("amqp://guest:hunter2@127.0.0.1:{dead}/%2f, {}", amqp_url());
    let env = amqp_tool_env(&settings, &list);

    let listed = process::run(&["dlq", "list"], &env).await;
    assert_eq!(listed.code, 0, "{listed:?}");
    assert!(
        listed.stdout.contains("1 dead letter "),
        "{}",
        listed.stdout
    );
    let swept = process::run(&["sweep", "--once", "--dry-run"], &env).await;
    assert_eq!(swept.code, 0, "{swept:?}");
    let shown = process::run(&["check-config"], &env).await;
    assert_eq!(shown.code, 0, "{shown:?}");
    assert!(
        shown.stdout.contains(&format!(
            "amqp://guest:***@127.0.0.1:{dead}/%2f, amqp://guest:***@127.0.0.1:"
        )),
        "{}",
        shown.stdout
    );
    for run in [&listed, &swept, &shown] {
        assert!(
            !run.stdout.contains("hunter2") && !run.stderr.contains("hunter2"),
            "{run:?}"
        );
    }
    cleanup(BrokerKind::Amqp, &settings).await;
}
