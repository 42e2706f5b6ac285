//! Operations, as a new user meets them with the real binary: a fresh bridge exports every
//! series with known labels at 0 (and the process and build families); with the broker away it
//! says so plainly (address named, password redacted, rate-limited), `send-test` exits 3 and
//! says the events were only spooled; when the broker comes back it says so in one line and
//! counts the reconnect.

use std::time::Duration;

use crate::common::process::{BridgeProcess, run, settings_env};
use crate::common::{APP_ID, NatsServer, free_port, nats_settings, settings_for};
use pusher_bridge::config::BrokerKind;

const PASSWORD: &str = "s3cret-pw";

/// Waits up to `secs` for `pred` on the bridge's stdout; returns the stdout.
async fn wait_stdout(bridge: &BridgeProcess, secs: u64, pred: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let out = bridge.stdout();
        if pred(&out) || tokio::time::Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(bridge: &BridgeProcess) -> String {
    bridge.get("/metrics").await.expect("/metrics answers").1
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_away_is_said_plainly_and_back_in_one_line() {
    let mut s = nats_settings();
    let port = free_port();
    s.broker.nats.url =
        pusher_bridge::config::SecretUrl::new(format!("nats://bridge:{PASSWORD}@127.0.0.1:{port}"));
    let mut bridge = BridgeProcess::start(&["serve"], settings_env(&s));
    bridge.wait_healthy().await;

    // Every series with known labels exists before any traffic.
    let text = metrics(&bridge).await;
    for series in [
        format!(
            r#"pusher_bridge_events_dead_lettered_total{{app_id="{APP_ID}",reason="no_stream"}}"#
        ),
        format!(r#"pusher_bridge_webhooks_received_total{{app_id="{APP_ID}",outcome="accepted"}}"#),
        r#"pusher_bridge_sweeper_runs_total{target="events",outcome="failure"}"#.into(),
        r#"pusher_bridge_sweeper_purged_total{target="dlq",app_id="*",rule="default"}"#.into(),
        r#"pusher_bridge_broker_reconnects_total{broker="nats"}"#.into(),
    ] {
        assert_eq!(value(&text, &series), Some(0.0), "{series} in:\n{text}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = value(
        &text,
        r#"pusher_bridge_sweeper_last_success_timestamp_seconds{target="events"}"#,
    )
    .expect("last success from start-up");
    assert!((now - last).abs() < 120.0, "{last} vs {now}");
    assert_eq!(
        value(&text, "pusher_bridge_spool_max_bytes"),
        Some(1073741824.0)
    );
    assert!(text.contains(&format!(
        "pusher_bridge_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    for family in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            value(&text, family).is_some_and(|v| v >= 0.0),
            "{family}:\n{text}"
        );
    }
    assert!(value(&text, "process_resident_memory_bytes").unwrap() > 1e6);

    // NATS is not there: one warning naming it, password redacted, not one per attempt.
    let redacted = format!("nats://bridge:***@127.0.0.1:{port}");
    let out = wait_stdout(&bridge, 10, |o| o.contains("cannot connect to NATS")).await;
    let warning = out
        .lines()
        .find(|l| l.contains("cannot connect to NATS"))
        .unwrap_or_else(|| panic!("no warning:\n{out}"));
    assert!(
        warning.contains(" WARN ") && warning.contains(&redacted),
        "{warning}"
    );

    // send-test: accepted, but only spooled: exit 3, and it says so.
    let sent = run(&["send-test", "--event", "member_added"], &bridge.env).await;
    assert_eq!(sent.code, 3, "{sent:?}");
    assert!(
        sent.stdout.contains("1 of 1 webhooks accepted")
            && sent.stdout.contains("0 of 1 event(s) published")
            && sent.stdout.contains("only spooled"),
        "{}",
        sent.stdout
    );

    // Let async-nats retry for a few seconds (it retries every 2 s at most).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let out = bridge.stdout();
    let warnings = out.matches("cannot connect to NATS").count();
    assert_eq!(warnings, 1, "rate-limited to one per 30 s:\n{out}");

    // NATS comes up: one line saying it is back; a first connect is no reconnect.
    let mut nats =
        NatsServer::start_with_args(port, &["--user", "bridge", "--pass", PASSWORD]).await;
    let out = wait_stdout(&bridge, 20, |o| o.contains("is back after")).await;
    let back: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("is back after"))
        .collect();
    assert_eq!(back.len(), 1, "{out}");
    assert!(back[0].contains(&redacted), "{}", back[0]);
    bridge.wait_ready().await;

    // Lost while up: a warning on the disconnect; back again: a counted reconnect.
    nats.kill();
    let out = wait_stdout(&bridge, 20, |o| o.contains("lost the connection to NATS")).await;
    let lost = out
        .lines()
        .find(|l| l.contains("lost the connection to NATS"))
        .unwrap_or_else(|| panic!("no warning on the disconnect:\n{out}"));
    assert!(
        lost.contains(" WARN ") && lost.contains(&redacted),
        "{lost}"
    );
    nats.restart().await;
    bridge.wait_ready().await;
    let mut reconnects = None;
    for _ in 0..100 {
        reconnects = value(
            &metrics(&bridge).await,
            r#"pusher_bridge_broker_reconnects_total{broker="nats"}"#,
        );
        if reconnects == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reconnects, Some(1.0));
    let out = wait_stdout(&bridge, 20, |o| o.matches("is back after").count() == 2).await;
    assert_eq!(out.matches("is back after").count(), 2, "{out}");
    assert!(
        !out.contains(PASSWORD),
        "the password reached the log:\n{out}"
    );

    assert_eq!(bridge.terminate().await, Some(0));
    let _ = std::fs::remove_dir_all(&s.spool.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_away_is_said_plainly_and_send_test_exits_3() {
    let mut s = settings_for(BrokerKind::Amqp);
    let port = free_port();
    s.broker.amqp.url = pusher_bridge::config::SecretUrl::new(format!(
        "amqp://guest:{PASSWORD}@127.0.0.1:{port}/%2f"
    ));
    let mut env = settings_env(&s);
    env.push(("PUSHER_BRIDGE_BROKER__KIND".into(), "amqp".into()));
    env.push((
        "PUSHER_BRIDGE_BROKER__AMQP__URL".into(),
        s.broker.amqp.url.expose().to_string(),
    ));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_healthy().await;
    let text = metrics(&bridge).await;
    assert_eq!(
        value(
            &text,
            r#"pusher_bridge_broker_reconnects_total{broker="amqp"}"#
        ),
        Some(0.0),
        "{text}"
    );
    let redacted = format!("amqp://guest:***@127.0.0.1:{port}/%2f");
    let out = wait_stdout(&bridge, 10, |o| o.contains("cannot connect to RabbitMQ")).await;
    let warning = out
        .lines()
        .find(|l| l.contains("cannot connect to RabbitMQ"))
        .unwrap_or_else(|| panic!("no warning:\n{out}"));
    assert!(
        warning.contains(" WARN ") && warning.contains(&redacted),
        "{warning}"
    );

    let sent = run(&["send-test"], &bridge.env).await;
    assert_eq!(sent.code, 3, "{sent:?}");
    assert!(
        sent.stdout.contains("7 of 7 webhooks accepted")
            && sent.stdout.contains("7 event(s) only spooled"),
        "{}",
        sent.stdout
    );
    // The recovery loop retries every 5 s at most: still one warning.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = bridge.stdout();
    assert_eq!(
        out.matches("cannot connect to RabbitMQ").count(),
        1,
        "{out}"
    );
    assert!(
        !out.contains(PASSWORD),
        "the password reached the log:\n{out}"
    );
    assert_eq!(bridge.terminate().await, Some(0));
    let _ = std::fs::remove_dir_all(&s.spool.dir);
}
