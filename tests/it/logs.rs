//! Log output of the real binary: human-readable lines by default, one JSON object per line with
//! `[log] format = "json"`, the `[log] level` filter, `RUST_LOG` over it, no secret in any
//! line, and one warning (not async-nats's lines per attempt) while NATS cannot be reached.

use std::time::Duration;

use crate::common::process::{BridgeProcess, Env, run, settings_env};
use crate::common::{APP_SECRET, delete_streams, free_port, jetstream_ctx, nats_settings};
use pusher_bridge::config::SecretUrl;

/// Runs a bridge with `extra` env, provokes one 401 (a `warn` line) and returns its stdout.
async fn logs_of(extra: &[(&str, &str)]) -> String {
    let s = nats_settings();
    let mut env: Env = settings_env(&s);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_ready().await;
    let mut wrong = bridge.env.clone();
    wrong.push((
        "PUSHER_BRIDGE_APPS".into(),
        format!(
            r#"[{{id="{}",key="{}",secret="not-the-secret"}}]"#,
            s.apps[0].id, s.apps[0].key
        ),
    ));
    let out = run(&["send-test", "--event", "cache_miss"], &wrong).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(bridge.terminate().await, Some(0));
    let js = jetstream_ctx(s.broker.nats.url.expose()).await;
    delete_streams(&js, &s).await;
    let stdout = bridge.stdout();
    assert!(
        !stdout.contains(APP_SECRET),
        "a secret reached the log:\n{stdout}"
    );
    assert!(
        !stdout.contains('\u{1b}'),
        "colour codes in a log file:\n{stdout}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_is_the_default_format() {
    let out = logs_of(&[]).await;
    let serving = out
        .lines()
        .find(|l| l.contains("pusher-bridge serving"))
        .unwrap_or_else(|| panic!("no start-up line:\n{out}"));
    assert!(serving.contains(" INFO "), "{serving}");
    assert!(serving.contains("listen=127.0.0.1:"), "{serving}");
    // The broker as the configuration spells it (`broker.kind = "nats"`), not `Nats`.
    assert!(serving.contains(" broker=nats"), "{serving}");
    let refused = out
        .lines()
        .find(|l| l.contains("webhook refused"))
        .unwrap_or_else(|| panic!("no 401 line:\n{out}"));
    assert!(
        refused.contains(" WARN ") && refused.contains("status=401"),
        "{refused}"
    );
    assert!(out.lines().all(|l| !l.starts_with('{')), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_format_writes_one_object_per_line() {
    let out = logs_of(&[("PUSHER_BRIDGE_LOG__FORMAT", "json")]).await;
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{out}");
    for line in &lines {
        assert!(line["timestamp"].is_string(), "{line}");
        assert!(line["level"].is_string(), "{line}");
        assert!(line["target"].is_string(), "{line}");
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    let serving = lines
        .iter()
        .find(|l| l["fields"]["message"] == "pusher-bridge serving")
        .unwrap_or_else(|| panic!("no start-up line:\n{out}"));
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["fields"]["path"], "/pusher/webhooks");
    assert_eq!(serving["fields"]["broker"], "nats");
    let refused = lines
        .iter()
        .find(|l| l["fields"]["message"] == "webhook refused")
        .unwrap_or_else(|| panic!("no 401 line:\n{out}"));
    assert_eq!(refused["level"], "WARN");
    assert_eq!(refused["fields"]["status"], 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_filters_and_rust_log_overrides_it() {
    let out = logs_of(&[("PUSHER_BRIDGE_LOG__LEVEL", "warn")]).await;
    assert!(
        !out.contains("pusher-bridge serving"),
        "info line at warn:\n{out}"
    );
    assert!(out.contains("webhook refused"), "warn line missing:\n{out}");

    // RUST_LOG wins over [log] level: here it silences even the warning.
    let out = logs_of(&[("PUSHER_BRIDGE_LOG__LEVEL", "debug"), ("RUST_LOG", "error")]).await;
    assert!(!out.contains("webhook refused"), "{out}");
    assert!(!out.contains("pusher-bridge serving"), "{out}");

    // Directives per module work in [log] level too.
    let out = logs_of(&[("PUSHER_BRIDGE_LOG__LEVEL", "warn,pusher_bridge=info")]).await;
    assert!(out.contains("pusher-bridge serving"), "{out}");
    assert!(
        !out.contains("async_nats"),
        "async_nats info lines at warn:\n{out}"
    );
}

/// The log of a bridge whose NATS URL points where nothing listens, run for three seconds
/// (several connection attempts: the retries start at 100 ms and double), with `extra` env.
async fn logs_while_nats_is_away(extra: &[(&str, &str)]) -> String {
    let mut s = nats_settings();
    s.broker.nats.url = SecretUrl::new(format!("nats://127.0.0.1:{}", free_port()));
    let mut env: Env = settings_env(&s);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_healthy().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bridge.terminate().await, Some(0), "{}", bridge.stderr());
    bridge.stdout()
}

/// The lines of `out` that async-nats wrote about a failed connection attempt.
fn async_nats_attempts(out: &str) -> usize {
    out.lines()
        .filter(|l| l.contains("async_nats") && l.contains("client error"))
        .count()
}

/// At the default level an unreachable NATS is said once, by the bridge's own rate-limited
/// warning, and async-nats's `event: client error` line of every attempt of each client is
/// left out; `log.level` and `RUST_LOG` still bring those back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_is_one_warning_at_the_default_level() {
    let out = logs_while_nats_is_away(&[]).await;
    let warnings = out
        .lines()
        .filter(|l| l.contains("cannot connect to NATS"))
        .count();
    assert_eq!(warnings, 1, "{out}");
    assert_eq!(async_nats_attempts(&out), 0, "{out}");
    assert!(!out.contains("async_nats"), "{out}");

    for extra in [("PUSHER_BRIDGE_LOG__LEVEL", "info"), ("RUST_LOG", "info")] {
        let out = logs_while_nats_is_away(&[extra]).await;
        assert!(async_nats_attempts(&out) >= 2, "{extra:?}:\n{out}");
    }
}
