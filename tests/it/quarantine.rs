//! The spool's quarantine on the real NATS: an event no stream takes becomes a dead letter,
//! the dead-letter stream does not exist either, so the spooled dead letter is set aside in
//! `quarantine.log` (the records behind it go on). It is counted by
//! `pusher_bridge_spool_quarantined`, listed by `pusher-bridge quarantine`, and once the
//! dead-letter stream exists, the next start takes it back onto the spool and the drainer
//! stores it: nothing answered 200 stays in a file no command reads.

use std::time::{Duration, Instant};

use crate::common::*;
use async_nats::jetstream::stream;
use pusher_bridge::routing;
use pusher_bridge::spool::QUARANTINE_FILE;

async fn wait_metric(app: &TestApp, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.metric(name).await != want {
        assert!(
            Instant::now() < deadline,
            "{name} is {} not {want}",
            app.metric(name).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dead_letter_no_stream_takes_is_set_aside_listed_and_taken_back_at_the_next_start() {
    let js = jetstream_ctx(&nats_url()).await;
    let mut settings = nats_settings();
    settings.broker.declare = false;
    // An events stream that takes none of the bridge's subjects, and no dead-letter stream.
    js.create_stream(stream::Config {
        name: settings.broker.nats.stream.clone(),
        subjects: vec![format!("{}.elsewhere.>", settings.broker.subject_prefix)],
        ..Default::default()
    })
    .await
    .unwrap();
    let app = TestApp::spawn_ready(settings.clone()).await;
    let lost = webhook_body(
        1_700_000_000_000,
        &[r#"{"name":"channel_occupied","channel":"nowhere"}"#],
    );
    let answer = app.post_signed(&lost).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body.contains(r#""spooled":1"#), "{}", answer.body);
    wait_metric(&app, "pusher_bridge_spool_quarantined", 1.0).await;
    wait_metric(&app, "pusher_bridge_spool_events", 0.0).await;

    // The records behind it are not blocked: with the events stream taking the bridge's
    // subjects, the next webhook is published (the spool is empty again).
    let mut st = js.get_stream(&settings.broker.nats.stream).await.unwrap();
    let mut cfg = st.info().await.unwrap().config.clone();
    cfg.subjects = vec![format!("{}.>", settings.broker.subject_prefix)];
    js.update_stream(cfg).await.unwrap();
    let next = webhook_body(
        1_700_000_000_001,
        &[r#"{"name":"channel_occupied","channel":"somewhere"}"#],
    );
    let answer = app.post_signed(&next).await;
    assert!(answer.body.contains(r#""published":1"#), "{}", answer.body);

    // The command reads it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, settings.to_redacted_toml()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pusher-bridge"))
        .args(["quarantine", "--config"])
        .arg(&file)
        .env_remove("PUSHER_BRIDGE_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = routing::webhook_digest(APP_ID, lost.as_bytes());
    let id = routing::message_id(&digest, 0);
    assert!(text.contains(&format!("msg_id={id}")), "{text}");
    assert!(text.contains("reason=no_stream"), "{text}");
    assert!(text.contains("1 record(s)"), "{text}");
    app.stop_keeping_spool().await;

    // The dead-letter stream exists now: the next start takes the letter back and stores it.
    js.create_stream(stream::Config {
        name: settings.broker.nats.dlq_stream.clone(),
        subjects: vec![format!(
            "{}.>",
            routing::dlq_prefix(&settings.broker.subject_prefix)
        )],
        ..Default::default()
    })
    .await
    .unwrap();
    let app = TestApp::spawn_ready(settings.clone()).await;
    assert_eq!(app.metric("pusher_bridge_spool_quarantined").await, 0.0);
    wait_metric(&app, "pusher_bridge_spool_events", 0.0).await;
    let letters = stream_messages(&js, &settings.broker.nats.dlq_stream, 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("Pusher-Bridge-Msg-Id"), Some(id.as_str()));
    assert!(!settings.spool.dir.join(QUARANTINE_FILE).exists());
    app.stop().await;
    delete_streams(&js, &settings).await;
}
