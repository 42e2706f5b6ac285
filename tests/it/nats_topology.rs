//! The bridge's declaration on (re)connect against streams an operator already changed: it adds
//! only what it needs (its subject, a duplicate window at least as long as configured, more
//! replicas when possible) and leaves everything else, including an operator's longer window,
//! extra subjects and limits, and what newer servers added that the client library does not
//! model (compression, metadata, per-message TTLs), on streams and on the KV buckets alike. Run
//! against each server CI tests (`NATS_URL`), the checks follow what that server has.

use std::time::Duration;

use crate::common::*;
use async_nats::jetstream::stream;
use pusher_bridge::broker::nats::ServerVersion;
use pusher_bridge::routing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_stream_settings_survive_the_bridges_declaration() {
    let mut settings = nats_settings();
    settings.broker.nats.replicas = 3;
    let js = jetstream_ctx(&nats_url()).await;
    let prefix = settings.broker.subject_prefix.clone();
    let audit = format!("{prefix}_audit.>");
    // The operator's events stream: an extra subject, a longer window, limits.
    js.create_stream(stream::Config {
        name: settings.broker.nats.stream.clone(),
        subjects: vec![format!("{prefix}.>"), audit.clone()],
        duplicate_window: Duration::from_secs(3600),
        max_age: Duration::from_secs(7 * 86_400),
        max_bytes: 1 << 30,
        max_messages: 5_000_000,
        ..Default::default()
    })
    .await
    .expect("operator's events stream");
    // The DLQ stream from an older bridge version: a short window, no subject of its own yet.
    let dlq_subject = format!("{}.>", routing::dlq_prefix(&prefix));
    js.create_stream(stream::Config {
        name: settings.broker.nats.dlq_stream.clone(),
        subjects: vec![format!("{prefix}_old_dlq.>")],
        duplicate_window: Duration::from_secs(30),
        max_messages: 1000,
        ..Default::default()
    })
    .await
    .expect("older DLQ stream");

    let app = TestApp::spawn_ready(settings.clone()).await;
    let events = js
        .get_stream(&settings.broker.nats.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(events.subjects, [format!("{prefix}.>"), audit]);
    assert_eq!(events.duplicate_window, Duration::from_secs(3600));
    assert_eq!(events.max_age, Duration::from_secs(7 * 86_400));
    assert_eq!(events.max_bytes, 1 << 30);
    assert_eq!(events.max_messages, 5_000_000);
    // Replicas were asked to go from 1 to 3 (a standalone NATS 2.9 accepts and ignores that;
    // a cluster with too few servers refuses, which the bridge logs and lives with).
    assert!(events.num_replicas >= 1);

    let dlq = js
        .get_stream(&settings.broker.nats.dlq_stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(dlq.subjects, [format!("{prefix}_old_dlq.>"), dlq_subject]);
    assert_eq!(dlq.duplicate_window, settings.broker.nats.duplicate_window);
    assert_eq!(dlq.max_messages, 1000);

    // Up and publishing on the stream as it is.
    let r = app
        .post_signed(&webhook_body(
            5,
            &[r#"{"name":"channel_occupied","channel":"op"}"#],
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"published\":1"), "{}", r.body);
    app.stop().await;
    delete_streams(&js, &settings).await;
}

/// A stream (or bucket) config an operator made with settings the bridge does not own, among
/// them what NATS 2.10+ added (compression, metadata) and 2.11+ (per-message TTLs) when the
/// server has them; `extra` on top.
fn operators_config(
    version: ServerVersion,
    name: &str,
    subject: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut c = serde_json::json!({
        "name": name,
        "subjects": [subject],
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "num_replicas": 1,
        "max_consumers": -1,
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": 0,
        "max_msg_size": -1,
        "max_msgs_per_subject": 1000,
        "description": "made by ops",
    });
    if version.has(ServerVersion::new(2, 10, 0)) {
        c["compression"] = "s2".into();
        c["metadata"] = serde_json::json!({ "owner": "ops" });
    }
    if version.has(ServerVersion::MESSAGE_TTL) {
        c["allow_msg_ttl"] = true.into();
    }
    for (k, v) in extra.as_object().expect("an object") {
        c[k] = v.clone();
    }
    c
}

/// `after` is `before` but for `changed` (checked by the caller): every other field as it was.
fn assert_only_changed(
    what: &str,
    before: &serde_json::Map<String, serde_json::Value>,
    after: &serde_json::Map<String, serde_json::Value>,
    changed: &[&str],
) {
    for (k, v) in before {
        if !changed.contains(&k.as_str()) {
            assert_eq!(after.get(k), Some(v), "{what}: {k} changed");
        }
    }
    for k in after.keys() {
        assert!(before.contains_key(k), "{what}: {k} appeared");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_settings_survive_on_every_server_the_bridge_supports() {
    let mut settings = nats_settings();
    settings.state.enabled = true;
    settings.state.bucket = unique("ST");
    let js = jetstream_ctx(&nats_url()).await;
    let version = server_version(&js);
    let prefix = settings.broker.subject_prefix.clone();
    let events = settings.broker.nats.stream.clone();
    let bucket = format!("KV_{}", settings.state.bucket);
    let lease = format!("KV_{}", pusher_bridge::sweeper::lease_bucket(&settings));
    // The events stream: a 1-minute window, shorter than the bridge's 2 minutes.
    let cfg = operators_config(
        version,
        &events,
        &format!("{prefix}.>"),
        serde_json::json!({ "duplicate_window": 60_000_000_000i64 }),
    );
    js_api(&js, &format!("STREAM.CREATE.{events}"), cfg).await;
    // A state bucket made by hand (`nats kv add`-like: direct gets on).
    let kv = serde_json::json!({
        "max_msgs_per_subject": 1, "allow_rollup_hdrs": true, "deny_delete": true,
        "discard": "new", "allow_direct": true, "duplicate_window": 120_000_000_000i64,
    });
    let subject = format!("$KV.{}.>", settings.state.bucket);
    js_api(
        &js,
        &format!("STREAM.CREATE.{bucket}"),
        operators_config(version, &bucket, &subject, kv.clone()),
    )
    .await;
    // The lease bucket with a 30 s expiry, where the bridge wants `retention.lease_ttl` (60 s).
    let mut lease_kv = kv.clone();
    lease_kv["max_age"] = 30_000_000_000i64.into();
    lease_kv["duplicate_window"] = 10_000_000_000i64.into();
    let lease_subject = format!("$KV.{}.>", pusher_bridge::sweeper::lease_bucket(&settings));
    js_api(
        &js,
        &format!("STREAM.CREATE.{lease}"),
        operators_config(version, &lease, &lease_subject, lease_kv),
    )
    .await;
    let before = [
        stream_config_json(&js, &events).await,
        stream_config_json(&js, &bucket).await,
        stream_config_json(&js, &lease).await,
    ];

    let app = TestApp::spawn_ready(settings.clone()).await;
    // The state bucket is open once the query API answers.
    crate::common::state::wait_for(
        &app,
        &crate::common::state::app_path("/channels"),
        &[],
        Duration::from_secs(10),
        |_| true,
    )
    .await;
    let mut sweeper = pusher_bridge::sweeper::Sweeper::new(
        std::sync::Arc::new(settings.clone()),
        std::sync::Arc::new(pusher_bridge::Metrics::new()),
    )
    .await
    .expect("a sweeper");
    sweeper
        .sweep_once(&[pusher_bridge::sweeper::Target::Events], false)
        .await;
    sweeper.release().await;

    let after = stream_config_json(&js, &events).await;
    assert_eq!(after["duplicate_window"], 120_000_000_000i64);
    assert_only_changed("events", &before[0], &after, &["duplicate_window"]);
    if version.has(ServerVersion::new(2, 10, 0)) {
        assert_eq!(after["compression"], "s2");
        assert_eq!(after["metadata"]["owner"], "ops");
    }
    assert_eq!(after["max_msgs_per_subject"], 1000);

    // Direct gets are turned off only where the server needs it (nats-server#4162).
    let after = stream_config_json(&js, &bucket).await;
    if version.has(ServerVersion::DIRECT_GETS_CURRENT) {
        assert_only_changed("state bucket", &before[1], &after, &[]);
    } else {
        assert_eq!(after["allow_direct"], false);
        assert_only_changed("state bucket", &before[1], &after, &["allow_direct"]);
    }
    let after = stream_config_json(&js, &lease).await;
    assert_eq!(after["max_age"], 60_000_000_000i64);
    let mut owned = vec!["max_age"];
    if !version.has(ServerVersion::DIRECT_GETS_CURRENT) {
        owned.push("allow_direct");
    }
    assert_only_changed("lease bucket", &before[2], &after, &owned);

    // Publishing on the stream as it is: a TTL-enabled stream (2.11+) takes events too.
    let r = app
        .post_signed(&webhook_body(
            5,
            &[r#"{"name":"channel_occupied","channel":"op"}"#],
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"published\":1"), "{}", r.body);
    app.stop().await;
    delete_streams(&js, &settings).await;
    let _ = js.delete_stream(&bucket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_the_server_refuses_is_not_retried_for_ever_and_the_stream_is_used_as_it_is() {
    // A duplicate window longer than the stream's max_age is refused by every server: the
    // bridge must not retry that for ever with its streams "not ready".
    let mut settings = nats_settings();
    settings.broker.nats.duplicate_window = Duration::from_secs(600);
    let js = jetstream_ctx(&nats_url()).await;
    let version = server_version(&js);
    let events = settings.broker.nats.stream.clone();
    let cfg = operators_config(
        version,
        &events,
        &format!("{}.>", settings.broker.subject_prefix),
        serde_json::json!({ "max_age": 300_000_000_000i64, "duplicate_window": 60_000_000_000i64 }),
    );
    js_api(&js, &format!("STREAM.CREATE.{events}"), cfg).await;
    let before = stream_config_json(&js, &events).await;
    let app = TestApp::spawn_ready(settings.clone()).await;
    let r = app
        .post_signed(&webhook_body(
            5,
            &[r#"{"name":"channel_occupied","channel":"kept"}"#],
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"published\":1"), "{}", r.body);
    assert_only_changed(
        "events",
        &before,
        &stream_config_json(&js, &events).await,
        &[],
    );
    app.stop().await;
    delete_streams(&js, &settings).await;
}
