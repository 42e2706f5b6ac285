//! The channel-state API read by Pusher's official server SDKs, `pusher` for Node (npm) and
//! for Python (PyPI), installed by `.ci/run` into `tests/sdk/node_modules` and `tests/sdk/venv`:
//! correct answers with the right secret, 401 with a wrong secret, unsigned or stale (signed
//! 700 s ago), 404 for an unknown app, 400 for `user_count` of a non-presence channel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::state::*;
use crate::common::*;
use pusher_bridge::config::BrokerKind;
use serde_json::{Value, json};

const ROOM: &str = "presence-sdk.room@1";

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

/// Runs one SDK script against the bridge and returns its JSON report (None, loudly, when the
/// SDK is not installed).
async fn run_sdk(program: &str, script: &str, installed: &Path, app: &TestApp) -> Option<Value> {
    if !installed.exists() {
        eprintln!(
            "\n!!! SKIPPED: {} is missing; run .ci/run (or the npm / pip commands in it) to install the Pusher SDKs\n",
            installed.display()
        );
        return None;
    }
    let mut cmd = std::process::Command::new(program);
    cmd.arg(sdk_dir().join(script))
        .env("BRIDGE_HOST", "127.0.0.1")
        .env("BRIDGE_PORT", app.addr.port().to_string())
        .env("APP_ID", APP_ID)
        .env("APP_KEY", APP_KEY)
        .env("APP_SECRET", APP_SECRET)
        .env("ROOM", ROOM);
    // Off the runtime's thread: the bridge under test runs on it.
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("SDK script runs");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("SDK script prints JSON"))
}

fn check(report: &Value, sdk: &str) {
    let ok = |name: &str| {
        assert_eq!(
            report[name]["status"], 200,
            "{sdk} {name}: {}",
            report[name]
        );
        &report[name]["body"]
    };
    assert_eq!(
        *ok("channels"),
        json!({"channels": {ROOM: {}, "private-sdk": {}}}),
        "{sdk}"
    );
    assert_eq!(
        *ok("presence"),
        json!({"channels": {ROOM: {"user_count": 2}}}),
        "{sdk}"
    );
    assert_eq!(
        *ok("channel"),
        json!({"occupied": true, "user_count": 2}),
        "{sdk}"
    );
    assert_eq!(
        *ok("users"),
        json!({"users": [{"id": "u.1@x"}, {"id": "u;3"}]}),
        "{sdk}"
    );
    assert_eq!(
        *ok("count"),
        json!({"occupied": true, "subscription_count": 4}),
        "{sdk}"
    );
    for (name, status) in [
        ("bad_request", 400),
        ("wrong_secret", 401),
        ("unknown_app", 404),
        ("stale", 401),
        ("unsigned", 401),
    ] {
        assert_eq!(
            report[name]["status"], status,
            "{sdk} {name}: {}",
            report[name]
        );
    }
}

#[tokio::test]
async fn pusher_sdks_read_the_state() {
    let s = state_settings(BrokerKind::Nats);
    let app = TestApp::spawn_ready(s.clone()).await;
    let t0 = pusher_bridge::broker::now_ms() - 10_000;
    let bodies = [
        body(t0 + 30, &[member(ROOM, "u-2", false)]),
        body(
            t0,
            &[
                occupancy(ROOM, true),
                member(ROOM, "u.1@x", true),
                member(ROOM, "u-2", true),
            ],
        ),
        body(t0 + 40, &[member(ROOM, "u;3", true)]),
        body(
            t0 + 5,
            &[occupancy("private-sdk", true), count("private-sdk", 4)],
        ),
        body(t0 + 1, &[count("private-sdk", 2)]),
    ];
    for b in &bodies {
        assert_eq!(app.post_signed(b).await.status, 200);
    }
    wait_for(
        &app,
        &app_path("/channels/private-sdk"),
        &[("info", "subscription_count")],
        Duration::from_secs(20),
        |b| b["subscription_count"] == 4,
    )
    .await;
    wait_for(
        &app,
        &app_path(&format!("/channels/{ROOM}/users")),
        &[],
        Duration::from_secs(20),
        |b| user_ids(b) == ["u.1@x", "u;3"],
    )
    .await;

    let dir = sdk_dir();
    let mut ran = 0;
    if let Some(report) = run_sdk("node", "query.js", &dir.join("node_modules/pusher"), &app).await
    {
        check(&report, "node");
        ran += 1;
    }
    let python = dir.join("venv/bin/python");
    if let Some(report) = run_sdk(python.to_str().unwrap(), "query.py", &python, &app).await {
        check(&report, "python");
        ran += 1;
    }
    eprintln!("{ran} of 2 Pusher SDKs read the state");
    app.stop().await;
    cleanup_state(BrokerKind::Nats, &s).await;
}
