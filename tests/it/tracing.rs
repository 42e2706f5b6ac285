//! `[tracing]` against a real OTLP/HTTP receiver: the webhook's server span continues the
//! request's `traceparent` (or starts a trace), one producer span per event is its child, and
//! each message carries its producer span's `traceparent` on both brokers; a collector that is
//! down changes no answer; sampling 0 records and carries nothing.

use std::time::{Duration, Instant};

use hyper::Request;
use hyper::StatusCode;
use pusher_bridge::config::BrokerKind;

use crate::common::otlp::{Receiver, Span};
use crate::common::{
    APP_KEY, APP_SECRET, Stored, TestApp, cleanup, free_port, read_events, settings_for, sign,
    webhook_body,
};

const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

fn body() -> String {
    body_at(1_700_000_000_000)
}

fn body_at(time_ms: u64) -> String {
    webhook_body(
        time_ms,
        &[
            r#"{"name":"channel_occupied","channel":"traced-a"}"#,
            r#"{"name":"member_added","channel":"presence-traced","user_id":"u-1"}"#,
        ],
    )
}

async fn post(app: &TestApp, body: &str, traceparent: Option<&str>) -> (StatusCode, String) {
    let mut req = Request::post(format!(
        "http://{}{}",
        app.addr, app.settings.server.webhook_path
    ))
    .header("X-Pusher-Key", APP_KEY)
    .header("X-Pusher-Signature", sign(APP_SECRET, body.as_bytes()))
    .header("Content-Type", "application/json");
    if let Some(t) = traceparent {
        req = req
            .header("traceparent", t)
            .header("tracestate", "vendor=1");
    }
    let a = app
        .request(
            req.body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap(),
        )
        .await;
    (a.status, a.body)
}

/// (trace id, span id) of a message's `traceparent`.
fn carried(m: &Stored) -> (String, String) {
    let t = m
        .header("traceparent")
        .unwrap_or_else(|| panic!("no traceparent: {m:?}"));
    let parts: Vec<&str> = t.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[3]), (4, "00", "01"), "{t}");
    (parts[1].to_string(), parts[2].to_string())
}

async fn the_trace_continues_into_every_message(kind: BrokerKind) {
    let receiver = Receiver::start().await;
    let mut s = settings_for(kind);
    s.tracing.otlp_endpoint = Some(pusher_bridge::config::SecretUrl::new(receiver.endpoint()));
    s.tracing.service_name = "bridge-under-test".into();
    let app = TestApp::spawn_ready(s.clone()).await;
    let (status, answer) = post(
        &app,
        &body(),
        Some(&format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let stored = read_events(kind, &s, 2).await;
    assert_eq!(stored.len(), 2);

    let spans = receiver.spans_until(|s| s.len() >= 3).await;
    let server: Vec<&Span> = spans.iter().filter(|s| s.kind == 2).collect();
    assert_eq!(server.len(), 1, "{spans:#?}");
    let server = server[0];
    assert_eq!(server.trace_id, PARENT_TRACE);
    assert_eq!(server.parent.as_deref(), Some(PARENT_SPAN));
    assert_eq!(server.service, "bridge-under-test");
    assert_eq!(server.attributes["http.response.status_code"], "200");
    assert_eq!(server.attributes["pusher.app_id"], "123456");
    let system = match kind {
        BrokerKind::Nats => "nats",
        _ => "rabbitmq",
    };
    for m in &stored {
        let (trace, span) = carried(m);
        assert_eq!(trace, PARENT_TRACE);
        let producer = spans
            .iter()
            .find(|s| s.span_id == span)
            .unwrap_or_else(|| panic!("no span {span}: {spans:#?}"));
        assert_eq!(producer.kind, 4, "a producer span");
        assert_eq!(producer.parent.as_deref(), Some(server.span_id.as_str()));
        assert_eq!(producer.attributes["messaging.system"], system);
        assert_eq!(
            producer.attributes.get("messaging.message.id"),
            m.msg_id.as_ref()
        );
        assert_eq!(producer.attributes["pusher.outcome"], "published");
        assert_eq!(m.header("tracestate"), Some("vendor=1"));
    }
    // No secret, no body, no user data in any span.
    for b in receiver.bodies.lock().unwrap().iter() {
        assert!(!b.contains(APP_SECRET) && !b.contains("u-1"), "{b}");
    }
    // The export is counted once the collector answered; nothing was dropped, and the
    // drop series exists at 0.
    let mut exported = 0.0;
    for _ in 0..100 {
        exported = app.metric("pusher_bridge_trace_spans_exported_total").await;
        if exported >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(exported >= 3.0, "{exported}");
    let text = app.get("/metrics").await.body;
    assert!(
        text.contains(r#"pusher_bridge_trace_spans_dropped_total{reason="queue_full"} 0"#),
        "{text}"
    );
    app.stop().await;
    cleanup(kind, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_the_trace_continues_into_every_message() {
    the_trace_continues_into_every_message(BrokerKind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_the_trace_continues_into_every_message() {
    the_trace_continues_into_every_message(BrokerKind::Amqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_traceparent_starts_a_trace() {
    let receiver = Receiver::start().await;
    let mut s = settings_for(BrokerKind::Nats);
    s.tracing.otlp_endpoint = Some(pusher_bridge::config::SecretUrl::new(receiver.endpoint()));
    let app = TestApp::spawn_ready(s.clone()).await;
    let (status, _) = post(&app, &body(), None).await;
    assert_eq!(status, StatusCode::OK);
    let stored = read_events(BrokerKind::Nats, &s, 2).await;
    let spans = receiver.spans_until(|s| s.len() >= 3).await;
    let server = spans.iter().find(|s| s.kind == 2).expect("a server span");
    assert_eq!(server.parent, None, "a root span");
    for m in &stored {
        assert_eq!(carried(m).0, server.trace_id);
    }
    app.stop().await;
    cleanup(BrokerKind::Nats, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_changes_no_answer() {
    let mut s = settings_for(BrokerKind::Nats);
    s.tracing.otlp_endpoint = Some(pusher_bridge::config::SecretUrl::new(format!(
        "http://127.0.0.1:{}",
        free_port()
    )));
    let app = TestApp::spawn_ready(s.clone()).await;
    for i in 0..20 {
        let started = Instant::now();
        let (status, answer) = post(&app, &body_at(1_700_000_000_000 + i), None).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(answer.contains(r#""published":2"#), "{answer}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "webhook {i} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(read_events(BrokerKind::Nats, &s, 40).await.len(), 40);
    // The spans were tried and dropped, counted.
    let mut failed = 0.0;
    for _ in 0..200 {
        failed = app
            .metric(r#"pusher_bridge_trace_spans_dropped_total{reason="export_failed"}"#)
            .await;
        if failed > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failed > 0.0, "failed exports are counted");
    app.stop().await;
    cleanup(BrokerKind::Nats, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_zero_records_and_carries_nothing() {
    let receiver = Receiver::start().await;
    let mut s = settings_for(BrokerKind::Nats);
    s.tracing.otlp_endpoint = Some(pusher_bridge::config::SecretUrl::new(receiver.endpoint()));
    s.tracing.sample_ratio = 0.0;
    let app = TestApp::spawn_ready(s.clone()).await;
    let (status, _) = post(&app, &body(), None).await;
    assert_eq!(status, StatusCode::OK);
    let stored = read_events(BrokerKind::Nats, &s, 2).await;
    assert!(stored.iter().all(|m| m.header("traceparent").is_none()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(receiver.spans_until(|_| true).await.is_empty());
    app.stop().await;
    cleanup(BrokerKind::Nats, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_event_is_published_under_a_span_of_its_own_linked_to_the_first() {
    let receiver = Receiver::start().await;
    let mut s = settings_for(BrokerKind::Nats);
    s.tracing.otlp_endpoint = Some(pusher_bridge::config::SecretUrl::new(receiver.endpoint()));
    // NATS away: the events go to the spool under their first producer spans.
    let mut away = s.clone();
    crate::common::unreachable(BrokerKind::Nats, &mut away);
    let app = TestApp::spawn(away.clone()).await;
    let (status, answer) = post(
        &app,
        &body(),
        Some(&format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer.contains(r#""spooled":2"#), "{answer}");
    app.stop_keeping_spool().await;
    // Back with NATS: the drainer publishes them under new producer spans.
    let app = TestApp::spawn_ready(s.clone()).await;
    let stored = read_events(BrokerKind::Nats, &s, 2).await;
    assert_eq!(stored.len(), 2);
    let spans = receiver
        .spans_until(|s| s.iter().filter(|s| s.kind == 4).count() >= 4)
        .await;
    for m in &stored {
        let (trace, span) = carried(m);
        assert_eq!(trace, PARENT_TRACE, "the same trace");
        let drained = spans
            .iter()
            .find(|s| s.span_id == span)
            .unwrap_or_else(|| panic!("no span {span}: {spans:#?}"));
        assert_eq!(drained.attributes["pusher.outcome"], "published");
        let first = spans
            .iter()
            .find(|s| Some(&s.span_id) == drained.parent.as_ref())
            .expect("the first producer span");
        assert_eq!(first.attributes["pusher.outcome"], "spooled");
        assert_eq!(
            drained.links,
            [(PARENT_TRACE.to_string(), first.span_id.clone())]
        );
    }
    app.stop().await;
    cleanup(BrokerKind::Nats, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opentelemetry_environment_is_honoured_and_never_stops_the_bridge() {
    use crate::common::process::{BridgeProcess, post_signed, run, settings_env};

    // OTEL_EXPORTER_OTLP_ENDPOINT alone turns tracing on, as in every OpenTelemetry SDK.
    let receiver = Receiver::start().await;
    let s = settings_for(BrokerKind::Nats);
    let mut env = settings_env(&s);
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_ready().await;
    let answer = post_signed(bridge.port, APP_KEY, APP_SECRET, &body()).await;
    assert_eq!(answer.map(|(c, _)| c), Some(200));
    let spans = receiver.spans_until(|s| s.len() >= 3).await;
    assert!(spans.iter().any(|s| s.kind == 2), "{spans:#?}");
    assert_eq!(bridge.terminate().await, Some(0));

    // An endpoint from the environment that the exporter cannot use leaves tracing off with a
    // warning; the same in the config key is refused naming it.
    let mut env = settings_env(&s);
    env.push((
        "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
        "https://api.vendor.example".into(),
    ));
    let checked = run(&["check-config"], &env).await;
    assert_eq!(checked.code, 0, "{checked:?}");
    let mut bridge = BridgeProcess::start(&["serve"], env.clone());
    bridge.wait_ready().await;
    assert_eq!(bridge.terminate().await, Some(0));
    assert!(
        bridge.stdout().contains("tracing stays off"),
        "{}",
        bridge.stdout()
    );
    // A gRPC protocol is an endpoint the exporter cannot talk to either: said, not silent.
    let mut grpc = settings_env(&s);
    grpc.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()));
    grpc.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "grpc".into()));
    let mut bridge = BridgeProcess::start(&["serve"], grpc);
    bridge.wait_ready().await;
    assert_eq!(bridge.terminate().await, Some(0));
    let out = bridge.stdout();
    assert!(
        out.contains("tracing stays off") && out.contains("grpc"),
        "{out}"
    );
    env.push((
        "PUSHER_BRIDGE_TRACING__OTLP_ENDPOINT".into(),
        "https://api.vendor.example".into(),
    ));
    let refused = run(&["check-config"], &env).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("tracing.otlp_endpoint"),
        "{refused:?}"
    );
    cleanup(BrokerKind::Nats, &s).await;
}
