//! Reload on SIGHUP, on the real binary under load: apps added, rotated and removed, the log
//! level changed, a bad file refused while the running configuration stays, restart keys
//! named; no webhook of the load and none in flight fails, and the process does not exit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::process::{BridgeProcess, broker_env, http_get, post_signed};
use crate::common::{delete_streams, jetstream_ctx, nats_settings, sign, webhook_body};

const APP: &str = "123456";

fn app(id: &str, key: &str, secret: &str) -> String {
    format!("[[apps]]\nid = \"{id}\"\nkey = \"{key}\"\nsecret = \"{secret}\"\n")
}

fn hup(bridge: &BridgeProcess) {
    let pid = bridge.pid().expect("running");
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "SIGHUP sent");
}

/// The value of the metric line starting with `series` (waits up to 5 s for `want`).
/// `pusher-bridge serve` against `s`'s broker with the configuration file `file`, ready.
async fn serve_with(s: &pusher_bridge::Settings, file: &std::path::Path) -> BridgeProcess {
    let mut env = broker_env(s);
    env.push(("PUSHER_BRIDGE_CONFIG".into(), file.display().to_string()));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_ready().await;
    bridge
}

async fn wait_metric(port: u16, series: &str, want: f64) -> f64 {
    let mut last = f64::NAN;
    for _ in 0..250 {
        let text = http_get(port, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        last = text
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        if last == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

async fn status(port: u16, key: &str, secret: &str, tag: &str) -> u16 {
    let body = webhook_body(
        1,
        &[&format!(
            r#"{{"name":"channel_occupied","channel":"{tag}"}}"#
        )],
    );
    post_signed(port, key, secret, &body)
        .await
        .map(|(c, _)| c)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_apps_and_level_under_load_and_keeps_the_running_config_on_a_bad_file() {
    let s = nats_settings();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bridge.toml");
    std::fs::write(
        &file,
        format!("{}[log]\nlevel = \"info\"\n", app(APP, "k1", "s1")),
    )
    .expect("config");
    let mut bridge = serve_with(&s, &file).await;
    let port = bridge.port;
    let ok = r#"pusher_bridge_config_reloads_total{outcome="success"}"#;
    let failed = r#"pusher_bridge_config_reloads_total{outcome="failure"}"#;
    assert_eq!(wait_metric(port, ok, 0.0).await, 0.0);
    assert_eq!(
        wait_metric(port, failed, 0.0).await,
        0.0,
        "exists from start-up"
    );
    assert_eq!(
        wait_metric(port, "pusher_bridge_config_last_reload_successful", 1.0).await,
        1.0
    );

    // The load: webhooks of the key that stays, one after another, all through.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, sent, bad) = (stop.clone(), sent.clone(), bad.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                if status(port, "k1", "s1", &format!("load-{i}")).await != 200 {
                    bad.fetch_add(1, Ordering::SeqCst);
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // A webhook in flight across the reload: headers and half its body before, the rest after.
    let body = webhook_body(1, &[r#"{"name":"channel_occupied","channel":"in-flight"}"#]);
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let head = format!(
        "POST /pusher/webhooks HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nX-Pusher-Key: k1\r\nX-Pusher-Signature: {}\r\nContent-Length: {}\r\n\r\n",
        sign("s1", body.as_bytes()),
        body.len()
    );
    let (first, rest) = body.split_at(body.len() / 2);
    conn.write_all(head.as_bytes()).await.expect("head");
    conn.write_all(first.as_bytes()).await.expect("half");

    // Rotate: app 123456 gains a second key, a new app arrives, the level goes to debug.
    std::fs::write(
        &file,
        format!(
            "{}{}{}[log]\nlevel = \"debug\"\n",
            app(APP, "k1", "s1"),
            app(APP, "k2", "s2"),
            app("777", "k3", "s3")
        ),
    )
    .expect("config");
    hup(&bridge);
    assert_eq!(wait_metric(port, ok, 1.0).await, 1.0, "{}", bridge.stdout());
    conn.write_all(rest.as_bytes()).await.expect("rest");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(status(port, "k2", "s2", "rotated").await, 200);
    assert_eq!(status(port, "k3", "s3", "new-app").await, 200);
    let metrics = http_get(port, "/metrics").await.expect("metrics").1;
    assert!(
        metrics.contains(
            r#"pusher_bridge_webhooks_received_total{app_id="777",outcome="accepted"} 1"#
        ),
        "the new app's series: {metrics}"
    );

    // Rotation done: the old key goes.
    std::fs::write(
        &file,
        format!("{}[log]\nlevel = \"debug\"\n", app(APP, "k2", "s2")),
    )
    .expect("config");
    stop.store(true, Ordering::SeqCst);
    load.await.expect("load");
    hup(&bridge);
    assert_eq!(wait_metric(port, ok, 2.0).await, 2.0);
    assert_eq!(status(port, "k1", "s1", "gone").await, 401);
    assert_eq!(status(port, "k3", "s3", "gone").await, 401);
    assert_eq!(status(port, "k2", "s2", "still").await, 200);

    // A file that does not load: counted, said, and the running configuration stays.
    std::fs::write(&file, "[[apps]\nid = ").expect("config");
    hup(&bridge);
    assert_eq!(wait_metric(port, failed, 1.0).await, 1.0);
    assert_eq!(
        wait_metric(port, "pusher_bridge_config_last_reload_successful", 0.0).await,
        0.0
    );
    assert_eq!(status(port, "k2", "s2", "kept").await, 200);

    // A key that needs a restart is named, and the rest applies.
    std::fs::write(
        &file,
        format!(
            "{}[server]\nmax_body_bytes = 2048\n[log]\nlevel = \"info\"\n",
            app(APP, "k2", "s2")
        ),
    )
    .expect("config");
    hup(&bridge);
    assert_eq!(wait_metric(port, ok, 3.0).await, 3.0);
    assert_eq!(
        wait_metric(port, "pusher_bridge_config_last_reload_successful", 1.0).await,
        1.0
    );
    // Not applied: a webhook over the new 2,048 bytes is still taken.
    let large = webhook_body(
        1,
        &[&format!(
            r#"{{"name":"client_event","channel":"private-large","event":"client-x","data":"{}"}}"#,
            "x".repeat(4096)
        )],
    );
    assert_eq!(
        post_signed(port, "k2", "s2", &large).await.map(|(c, _)| c),
        Some(200)
    );

    assert_eq!(bridge.terminate().await, Some(0), "SIGHUP must not end it");
    let out = bridge.stdout();
    assert_eq!(
        bad.load(Ordering::SeqCst),
        0,
        "of {} under load:\n{out}",
        sent.load(Ordering::SeqCst)
    );
    assert!(sent.load(Ordering::SeqCst) > 0);
    assert!(out.contains("configuration reloaded"), "{out}");
    assert!(
        out.lines().any(|l| l.contains(" DEBUG ")),
        "log.level = debug took effect:\n{out}"
    );
    let refused = out
        .lines()
        .find(|l| l.contains("the configuration did not reload"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(refused.contains("ERROR"), "{refused}");
    let restart = out
        .lines()
        .find(|l| l.contains("take effect only at a restart"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        restart.contains(" WARN ") && restart.contains("server.max_body_bytes"),
        "{restart}"
    );
    assert!(
        !out.contains("s2\"") && !out.contains("=s3"),
        "a secret in the log:\n{out}"
    );
    delete_streams(&jetstream_ctx(s.broker.nats.url.expose()).await, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_secret_files_again() {
    // A mounted Secret rotated in place: the file's new value is in force after the SIGHUP.
    let s = nats_settings();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bridge.toml");
    let secret = dir.path().join("app-secret");
    std::fs::write(&secret, "first-secret\n").expect("secret");
    std::fs::write(
        &file,
        format!(
            "[[apps]]\nid = \"{APP}\"\nkey = \"k1\"\nsecret_file = \"{}\"\n",
            secret.display()
        ),
    )
    .expect("config");
    let mut bridge = serve_with(&s, &file).await;
    let port = bridge.port;
    assert_eq!(status(port, "k1", "first-secret", "before").await, 200);

    std::fs::write(&secret, "second-secret\n").expect("secret rotated");
    hup(&bridge);
    let ok = r#"pusher_bridge_config_reloads_total{outcome="success"}"#;
    assert_eq!(wait_metric(port, ok, 1.0).await, 1.0, "{}", bridge.stdout());
    assert_eq!(status(port, "k1", "first-secret", "old").await, 401);
    assert_eq!(status(port, "k1", "second-secret", "new").await, 200);
    assert_eq!(bridge.terminate().await, Some(0));
    let out = bridge.stdout();
    assert!(
        !out.contains("first-secret") && !out.contains("second-secret"),
        "a secret in the log:\n{out}"
    );
    delete_streams(&jetstream_ctx(s.broker.nats.url.expose()).await, &s).await;
}
