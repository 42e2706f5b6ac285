//! Retention by message TTL (`retention.<target>.method = "message_ttl"`, NATS 2.11+): every
//! message carries `Nats-TTL` from the sweep's rules (app + event > app > event > `max_age`, a
//! disabled app `never`), the streams get `allow_msg_ttl`, the server expires what is due and
//! keeps the rest, and the sweeper leaves the target alone. On an older server, or with
//! RabbitMQ, the bridge refuses to start naming the key (and the server's version). Run against
//! each server CI tests (`NATS_URL`): the expiry on 2.11 and later, the refusal before.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::process::{self, Env};
use crate::common::*;
use pusher_bridge::broker::nats::ServerVersion;
use pusher_bridge::config::{AppRetention, AppSettings, RetentionMethod, Secret, Settings};
use pusher_bridge::sweeper::{Sweeper, Target, TargetOutcome};

const OTHER_ID: &str = "777";
const OTHER_KEY: &str = "other-key";
const OTHER_SECRET: &str = "other-secret";

/// Both targets by TTL: the test app's events 2 s (its `member_added` 1 h), the other app's
/// never, everything else 1 h; dead letters 30 days.
fn ttl_settings() -> Settings {
    let mut s = nats_settings();
    s.apps.push(AppSettings {
        id: OTHER_ID.into(),
        key: OTHER_KEY.into(),
        secret: Secret::new(OTHER_SECRET),
        secret_file: None,
    });
    s.retention.events.method = RetentionMethod::MessageTtl;
    s.retention.dlq.method = RetentionMethod::MessageTtl;
    s.retention.events.max_age = Duration::from_secs(3600);
    s.retention.events.apps = BTreeMap::from([
        (
            APP_ID.to_string(),
            AppRetention {
                max_age: Some(Duration::from_secs(2)),
                overrides: BTreeMap::from([(
                    "member_added".to_string(),
                    Duration::from_secs(3600),
                )]),
                ..AppRetention::default()
            },
        ),
        (
            OTHER_ID.to_string(),
            AppRetention {
                enabled: false,
                ..AppRetention::default()
            },
        ),
    ]);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_app_ttls_expire_what_is_due_and_keep_the_rest() {
    let js = jetstream_ctx(&nats_url()).await;
    let version = server_version(&js);
    let settings = ttl_settings();
    if !version.has(ServerVersion::MESSAGE_TTL) {
        // The server cannot expire messages: the bridge must not start as if it could.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stopped = tokio::time::timeout(
            Duration::from_secs(15),
            pusher_bridge::run(listener, settings.clone(), std::future::pending()),
        )
        .await
        .expect("the bridge stops on its own");
        let e = stopped.expect_err("a refusal").to_string();
        assert!(e.contains("retention.events.method"), "{e}");
        assert!(e.contains(&version.to_string()), "{e}");
        assert!(e.contains("2.11"), "{e}");
        delete_streams(&js, &settings).await;
        return;
    }
    let app = TestApp::spawn_ready(settings.clone()).await;
    let mine = webhook_body(
        now_ms(),
        &[
            r#"{"name":"channel_occupied","channel":"short"}"#,
            r#"{"name":"member_added","channel":"presence-long","user_id":"u1"}"#,
            r#"{"name":"channel_vacated"}"#,
        ],
    );
    let r = app.post_signed(&mine).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let theirs = webhook_body(
        now_ms(),
        &[r#"{"name":"channel_occupied","channel":"kept"}"#],
    );
    let sig = sign(OTHER_SECRET, theirs.as_bytes());
    let r = app
        .post_with(
            &theirs,
            Some(OTHER_KEY),
            Some(&sig),
            Some("application/json"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let events = &settings.broker.nats.stream;
    let stored = stream_messages(&js, events, 3).await;
    let ttl_of = |channel: &str| {
        stored
            .iter()
            .find(|m| m.header("Pusher-Channel") == Some(channel))
            .and_then(|m| m.header("Nats-TTL"))
            .map(str::to_string)
    };
    assert_eq!(ttl_of("short").as_deref(), Some("2"), "app rule");
    assert_eq!(
        ttl_of("presence-long").as_deref(),
        Some("3600"),
        "app + event rule"
    );
    assert_eq!(ttl_of("kept").as_deref(), Some("never"), "disabled app");
    let letters = stream_messages(&js, &settings.broker.nats.dlq_stream, 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].header("Nats-TTL"),
        Some("2592000"),
        "the DLQ's 30 days"
    );
    for stream in [events, &settings.broker.nats.dlq_stream] {
        assert_eq!(stream_config_json(&js, stream).await["allow_msg_ttl"], true);
    }

    // The server expires the 2-second message; the others stay.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left: Vec<String> = stream_messages(&js, events, 0)
            .await
            .iter()
            .filter_map(|m| m.header("Pusher-Channel").map(str::to_string))
            .collect();
        if left == ["presence-long", "kept"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never expired: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The sweeper leaves both targets alone.
    let mut sweeper = Sweeper::new(
        Arc::new(settings.clone()),
        Arc::new(pusher_bridge::Metrics::new()),
    )
    .await
    .expect("a sweeper");
    let run = sweeper.sweep_once(&Target::ALL, false).await;
    assert!(
        run.iter()
            .all(|(_, o)| matches!(o, TargetOutcome::MessageTtl)),
        "{run:?}"
    );
    app.stop().await;
    delete_streams(&js, &settings).await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ttl_env(s: &Settings) -> Env {
    let mut env = process::settings_env(s);
    env.push((
        "PUSHER_BRIDGE_RETENTION__EVENTS__METHOD".into(),
        "message_ttl".into(),
    ));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_message_ttls_a_server_cannot_keep() {
    let js = jetstream_ctx(&nats_url()).await;
    let version = server_version(&js);
    let settings = nats_settings();
    if version.has(ServerVersion::MESSAGE_TTL) {
        let mut bridge = process::BridgeProcess::start(&["serve"], ttl_env(&settings));
        bridge.wait_ready().await;
        assert_eq!(bridge.terminate().await, Some(0));
    } else {
        let run = tokio::time::timeout(
            Duration::from_secs(20),
            process::run(&["serve"], &ttl_env(&settings)),
        )
        .await
        .expect("the bridge exits on its own");
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stderr.contains("retention.events.method"), "{run:?}");
        assert!(run.stderr.contains(&version.to_string()), "{run:?}");
    }
    delete_streams(&js, &settings).await;
    let _ = std::fs::remove_dir_all(&settings.spool.dir);
}

#[tokio::test]
async fn rabbitmq_has_no_message_ttl_to_offer() {
    let mut env = ttl_env(&nats_settings());
    env.push(("PUSHER_BRIDGE_BROKER__KIND".into(), "amqp".into()));
    let run = process::run(&["check-config"], &env).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("retention.events.method") && run.stderr.contains("nats"),
        "{run:?}"
    );
}
