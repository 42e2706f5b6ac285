//! The bridge's contract, end to end, against both brokers: subjects / routing keys, bodies,
//! ids, status codes, dead letters, metrics and readiness. Every test body takes the broker
//! kind; [`per_broker!`] makes one `#[tokio::test]` per body and broker (`nats::NAME`,
//! `amqp::NAME`, and `amqp_quorum::NAME` with `broker.amqp.queue_type = "quorum"`), against the
//! real NATS JetStream and RabbitMQ of this machine.

use std::time::Duration;

use crate::common::*;
use pusher_bridge::config::{AppSettings, BrokerKind, Secret};

per_broker!(
    every_event_type_lands_on_its_subject_with_its_body,
    the_same_webhook_twice_gives_the_same_ids,
    every_status_code_of_the_table,
    unreachable_broker_and_no_spool_room_answers_503_and_readyz_says_so,
    malformed_event_is_dead_lettered_and_siblings_published,
    sockudo_fixtures_are_accepted_byte_for_byte,
    rotated_keys_of_one_app_are_both_accepted,
    a_large_batch_is_stored_in_webhook_order,
);

async fn a_large_batch_is_stored_in_webhook_order(kind: BrokerKind) {
    let settings = settings_for(kind);
    let app = TestApp::spawn_ready(settings.clone()).await;
    // sockudo batches up to 100 events per webhook.
    let events: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"name":"channel_occupied","channel":"c-{i}"}}"#))
        .collect();
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    let answer = app.post_signed(&webhook_body(7, &refs)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let stored = read_events(kind, &settings, events.len()).await;
    let channels: Vec<&str> = stored.iter().map(Stored::channel).collect();
    let want: Vec<String> = (0..100).map(|i| format!("c-{i}")).collect();
    assert_eq!(channels, want);
    app.stop().await;
    cleanup(kind, &settings).await;
}

async fn every_event_type_lands_on_its_subject_with_its_body(kind: BrokerKind) {
    let settings = settings_for(kind);
    let app = TestApp::spawn_ready(settings.clone()).await;
    let events = every_event_type();
    let body = webhook_body(1_700_000_000_123, &events);
    let answer = app.post_signed(&body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    let stored = read_events(kind, &settings, events.len()).await;
    assert_eq!(stored.len(), events.len());
    let p = &settings.broker.subject_prefix;
    let expected_subjects = [
        format!("{p}.123456.channel_occupied.private-a%2Eb"),
        format!("{p}.123456.channel_vacated.public-news"),
        format!("{p}.123456.member_added.presence-room-1"),
        format!("{p}.123456.member_removed.presence-room-1"),
        format!("{p}.123456.client_event.private-chat"),
        format!("{p}.123456.cache_miss.cache-prices"),
        format!("{p}.123456.subscription_count.public-news"),
        format!("{p}.123456.member_updated.presence-room-1"),
    ];
    let mut subjects: Vec<_> = stored.iter().map(|m| m.subject.clone()).collect();
    subjects.sort();
    let mut want = expected_subjects.to_vec();
    want.sort();
    assert_eq!(subjects, want);

    for m in &stored {
        let original: serde_json::Value = events
            .iter()
            .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
            .find(|e| {
                pusher_bridge::routing::subject(
                    p,
                    "123456",
                    e["name"].as_str().unwrap(),
                    e["channel"].as_str().unwrap(),
                ) == m.subject
            })
            .unwrap();
        for (k, v) in original.as_object().unwrap() {
            assert_eq!(&m.body[k], v, "field {k} of {}", m.subject);
        }
        assert_eq!(m.body["app_id"], "123456");
        assert_eq!(m.body["time_ms"], 1_700_000_000_123u64);
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.header("Pusher-App-Id"), Some("123456"));
        assert!(m.msg_id.is_some());
        assert_eq!(m.header("Pusher-Event"), m.body["name"].as_str());
        assert_eq!(m.header("Pusher-Channel"), m.body["channel"].as_str());
        assert_eq!(m.header("Pusher-Time-Ms"), Some("1700000000123"));
    }
    let sc = stored
        .iter()
        .find(|m| m.subject.contains("subscription_count"))
        .unwrap();
    assert!(sc.body["subscription_count"].is_u64());

    app.stop().await;
    cleanup(kind, &settings).await;
}

async fn the_same_webhook_twice_gives_the_same_ids(kind: BrokerKind) {
    let settings = settings_for(kind);
    let app = TestApp::spawn_ready(settings.clone()).await;
    let body = webhook_body(
        1,
        &[
            r#"{"name":"channel_occupied","channel":"a"}"#,
            r#"{"name":"channel_occupied","channel":"a"}"#,
        ],
    );
    assert_eq!(app.post_signed(&body).await.status, 200);
    assert_eq!(app.post_signed(&body).await.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // JetStream drops the redelivery inside its duplicate window; RabbitMQ keeps both copies
    // and consumers deduplicate by `message_id`. Either way: two events, two ids, and the
    // redelivery carries the same ids as the first delivery.
    let copies = match kind {
        BrokerKind::Nats => 1,
        BrokerKind::Amqp => 2,
    };
    let stored = read_events(kind, &settings, 2 * copies).await;
    assert_eq!(
        stored.len(),
        2 * copies,
        "two events per delivery that is kept"
    );
    let mut ids: Vec<_> = stored.iter().map(|m| m.msg_id.clone().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2, "two events (same content, own ids)");
    app.stop().await;
    cleanup(kind, &settings).await;
}

async fn every_status_code_of_the_table(kind: BrokerKind) {
    let mut settings = settings_for(kind);
    settings.server.max_body_bytes = 2048;
    let app = TestApp::spawn_ready(settings.clone()).await;
    let body = webhook_body(5, &[r#"{"name":"channel_occupied","channel":"c"}"#]);
    let sig = sign(APP_SECRET, body.as_bytes());

    // 200, with content-type parameters and header names in any case (hyper lowercases).
    let ok = app
        .post_with(
            &body,
            Some(APP_KEY),
            Some(&sig),
            Some("application/json; charset=utf-8"),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);

    // 401: key missing, key unknown, signature missing, signature wrong, non-hex signature.
    for (key, s) in [
        (None, Some(sig.as_str())),
        (Some("nope"), Some(sig.as_str())),
        (Some(APP_KEY), None),
        (Some(APP_KEY), Some(&"0".repeat(64)[..])),
        (Some(APP_KEY), Some("zz")),
    ] {
        let a = app.post_with(&body, key, s, Some("application/json")).await;
        assert_eq!(a.status, 401, "{key:?} {s:?}");
        assert!(!a.body.contains(&sig), "never echo the expected signature");
    }
    // 400: signed but not a webhook.
    for bad in [
        "not json",
        r#"{"events":[]}"#,
        r#"{"time_ms":"1","events":[]}"#,
        "[]",
    ] {
        let a = app
            .post_with(
                bad,
                Some(APP_KEY),
                Some(&sign(APP_SECRET, bad.as_bytes())),
                Some("application/json"),
            )
            .await;
        assert_eq!(a.status, 400, "{bad}");
    }
    // 405: other methods.
    let a = app
        .request(
            hyper::Request::get(format!(
                "http://{}{}",
                app.addr, settings.server.webhook_path
            ))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
        )
        .await;
    assert_eq!(a.status, 405);
    // 413: declared and streamed bodies over the limit.
    let big = webhook_body(
        5,
        &[&format!(
            r#"{{"name":"x","channel":"c","pad":"{}"}}"#,
            "a".repeat(4096)
        )],
    );
    let a = app
        .post_with(
            &big,
            Some(APP_KEY),
            Some(&sign(APP_SECRET, big.as_bytes())),
            Some("application/json"),
        )
        .await;
    assert_eq!(a.status, 413);
    // 415: not JSON, or no content type.
    assert_eq!(
        app.post_with(&body, Some(APP_KEY), Some(&sig), Some("text/plain"))
            .await
            .status,
        415
    );
    assert_eq!(
        app.post_with(&body, Some(APP_KEY), Some(&sig), None)
            .await
            .status,
        415
    );
    // 404 elsewhere.
    assert_eq!(app.get("/nope").await.status, 404);

    let m = |o: &str| {
        format!("pusher_bridge_webhooks_received_total{{app_id=\"123456\",outcome=\"{o}\"}}")
    };
    assert_eq!(app.metric(&m("accepted")).await, 1.0);
    assert_eq!(app.metric(&m("unauthorized")).await, 3.0);
    assert_eq!(app.metric(&m("bad_request")).await, 4.0);
    assert_eq!(
        app.metric(
            "pusher_bridge_webhooks_received_total{app_id=\"unknown\",outcome=\"unauthorized\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        app.metric(
            "pusher_bridge_webhooks_received_total{app_id=\"unknown\",outcome=\"too_large\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        app.metric("pusher_bridge_webhooks_received_total{app_id=\"unknown\",outcome=\"unsupported_media_type\"}")
            .await,
        2.0
    );
    app.stop().await;
    cleanup(kind, &settings).await;
}

async fn unreachable_broker_and_no_spool_room_answers_503_and_readyz_says_so(kind: BrokerKind) {
    let mut settings = settings_for(kind);
    unreachable(kind, &mut settings);
    // A spool too small for any webhook.
    settings.spool.max_bytes = 64;
    let app = TestApp::spawn(settings).await;
    assert_eq!(app.get("/healthz").await.status, 200);
    assert_eq!(app.get("/readyz").await.status, 503);
    let started = std::time::Instant::now();
    let a = app
        .post_signed(&webhook_body(
            1,
            &[r#"{"name":"channel_occupied","channel":"c"}"#],
        ))
        .await;
    assert_eq!(a.status, 503);
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 0.0);
    assert_eq!(
        app.metric(
            "pusher_bridge_webhooks_received_total{app_id=\"123456\",outcome=\"unavailable\"}"
        )
        .await,
        1.0
    );
    app.stop().await;
}

async fn malformed_event_is_dead_lettered_and_siblings_published(kind: BrokerKind) {
    let settings = settings_for(kind);
    let app = TestApp::spawn_ready(settings.clone()).await;
    let body = webhook_body(
        9,
        &[
            r#"{"name":"channel_occupied","channel":"good-1"}"#,
            r#"{"name":"channel_occupied"}"#,
            r#"{"name":"member_added","channel":"presence-x","user_id":"u"}"#,
        ],
    );
    let a = app.post_signed(&body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let events = read_events(kind, &settings, 2).await;
    assert_eq!(events.len(), 2);
    let dead = read_dead_letters(kind, &settings, 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("Pusher-Bridge-Reason"), Some("malformed"));
    assert!(
        dead[0]
            .header("Pusher-Bridge-Detail")
            .unwrap()
            .contains("channel")
    );
    assert_eq!(dead[0].body, serde_json::json!({"name":"channel_occupied"}));
    assert_eq!(
        app.metric(
            "pusher_bridge_events_dead_lettered_total{app_id=\"123456\",reason=\"malformed\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        app.metric("pusher_bridge_events_published_total").await,
        2.0
    );
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 1.0);
    assert!(
        app.metric("pusher_bridge_publish_duration_seconds_count")
            .await
            >= 1.0
    );
    app.stop().await;
    cleanup(kind, &settings).await;
}

async fn sockudo_fixtures_are_accepted_byte_for_byte(kind: BrokerKind) {
    let settings = {
        let mut s = settings_for(kind);
        s.apps = vec![AppSettings {
            id: "app-id".into(),
            key: "app-key".into(),
            secret: Secret::new("app-secret"),
            secret_file: None,
        }];
        s
    };
    let app = TestApp::spawn_ready(settings.clone()).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/sockudo-webhooks");
    let mut total = 0;
    for i in 1..=5 {
        let text = std::fs::read_to_string(dir.join(format!("0{i}.json"))).expect("fixture");
        let f: serde_json::Value = serde_json::from_str(&text).unwrap();
        let raw = f["raw_body"].as_str().unwrap();
        total += serde_json::from_str::<serde_json::Value>(raw).unwrap()["events"]
            .as_array()
            .unwrap()
            .len();
        let h = &f["headers"];
        let a = app
            .post_with(
                raw,
                h["x-pusher-key"].as_str(),
                h["x-pusher-signature"].as_str(),
                h["content-type"].as_str(),
            )
            .await;
        assert_eq!(a.status, 200, "fixture {i}: {}", a.body);
    }
    let stored = read_events(kind, &settings, total).await;
    assert_eq!(stored.len(), total);
    let client_event = stored
        .iter()
        .find(|m| m.subject.ends_with(".client_event.private-chat"))
        .unwrap();
    assert_eq!(
        client_event.body["data"],
        serde_json::json!({"text":"hello from A"})
    );
    app.stop().await;
    cleanup(kind, &settings).await;
}

async fn rotated_keys_of_one_app_are_both_accepted(kind: BrokerKind) {
    let mut settings = settings_for(kind);
    settings.apps.push(AppSettings {
        id: APP_ID.into(),
        key: "new-key".into(),
        secret: Secret::new("new-secret"),
        secret_file: None,
    });
    let app = TestApp::spawn_ready(settings.clone()).await;
    let body = webhook_body(2, &[r#"{"name":"channel_vacated","channel":"c"}"#]);
    assert_eq!(app.post_signed(&body).await.status, 200);
    let sig = sign("new-secret", body.as_bytes());
    let a = app
        .post_with(&body, Some("new-key"), Some(&sig), Some("application/json"))
        .await;
    assert_eq!(a.status, 200);
    // Signed with the other key's secret: refused.
    let wrong = sign(APP_SECRET, body.as_bytes());
    let a = app
        .post_with(
            &body,
            Some("new-key"),
            Some(&wrong),
            Some("application/json"),
        )
        .await;
    assert_eq!(a.status, 401);
    app.stop().await;
    cleanup(kind, &settings).await;
}
