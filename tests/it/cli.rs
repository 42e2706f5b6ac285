//! `check-config` as the interface page describes it: exit 0 with the effective configuration
//! (file < environment, secrets redacted), or exit 1 with a message naming the bad key.

use std::process::Command;

fn check_config(file_text: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bridge.toml");
    std::fs::write(&path, file_text).expect("config written");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pusher-bridge"));
    cmd.arg("check-config").arg("--config").arg(&path);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PUSHER_BRIDGE_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const APP: &str = "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"very-secret\"\n";

#[test]
fn a_valid_config_prints_the_effective_values_with_secrets_redacted() {
    let (code, stdout, stderr) = check_config(
        &format!("{APP}[broker.amqp]\nurl = \"amqp://u:pw-in-url@h:5672/%2f\"\n"),
        &[("PUSHER_BRIDGE_SERVER__LISTEN", "0.0.0.0:9999")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("listen = \"0.0.0.0:9999\""), "{stdout}");
    assert!(stdout.contains("amqp://u:***@h:5672/%2f"), "{stdout}");
    assert!(
        !stdout.contains("very-secret") && !stdout.contains("pw-in-url"),
        "{stdout}"
    );
}

#[test]
fn a_bad_key_exits_1_and_names_it() {
    for (text, env, key) in [
        (format!("{APP}[server]\nlistn = \"x\"\n"), vec![], "listn"),
        (
            format!("{APP}[broker.nats]\nstream = \"has.dot\"\n"),
            vec![],
            "broker.nats.stream",
        ),
        (
            APP.to_string(),
            vec![("PUSHER_BRIDGE_BROKER__KIND", "kafka")],
            "kafka",
        ),
    ] {
        let (code, stdout, stderr) = check_config(&text, &env);
        assert_eq!(code, 1, "{text}: {stdout}");
        assert!(stderr.contains(key), "{key} not named in: {stderr}");
    }
}

/// `PUSHER_BRIDGE_APPS` written as JSON (what most people type first) is refused with the hint
/// that environment values are TOML and how the list is written there, without the value: it
/// holds the secrets.
#[test]
fn apps_as_json_in_the_environment_say_the_value_is_toml() {
    let json = r#"[{"id":"1","key":"k","secret":"json-s3cret-value"}]"#;
    let (code, stdout, stderr) = check_config("", &[("PUSHER_BRIDGE_APPS", json)]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stderr.contains("PUSHER_BRIDGE_APPS")
            && stderr.contains("TOML, not JSON")
            && stderr.contains(r#"[{id="123456",key="app-key",secret="app-secret"}]"#),
        "{stderr}"
    );
    assert!(
        !stderr.contains("json-s3cret-value") && !stdout.contains("json-s3cret-value"),
        "{stderr}"
    );
    // The hint's own example is a value that works.
    let toml = r#"[{id="123456",key="app-key",secret="app-secret"}]"#;
    let (code, stdout, stderr) = check_config("", &[("PUSHER_BRIDGE_APPS", toml)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("id = \"123456\""), "{stdout}");
}

/// `pusher-bridge` with no command serves, and without `--config` or `$PUSHER_BRIDGE_CONFIG`
/// reads `config/pusher-bridge.toml` under the working directory.
#[test]
fn serve_is_the_default_and_reads_config_pusher_bridge_toml() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("config")).expect("config dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let tag = format!("CLI_{}_{port}", std::process::id());
    let nats = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    std::fs::write(
        dir.path().join("config/pusher-bridge.toml"),
        format!(
            "{APP}[server]\nlisten = \"127.0.0.1:{port}\"\n[broker]\nsubject_prefix = \"{}\"\n\
             [broker.nats]\nurl = \"{nats}\"\nstream = \"EV_{tag}\"\ndlq_stream = \"DLQ_{tag}\"\n\
             [retention.events]\nenabled = false\n[retention.dlq]\nenabled = false\n",
            tag.to_lowercase()
        ),
    )
    .expect("config written");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pusher-bridge"));
    cmd.current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PUSHER_BRIDGE_")) {
        cmd.env_remove(k);
    }
    let mut child = cmd.spawn().expect("binary runs");
    let mut healthy = false;
    for _ in 0..250 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            healthy = answer.starts_with("HTTP/1.1 200");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        healthy,
        "no /healthz 200 on the port of config/pusher-bridge.toml"
    );
    // The bridge created its streams on the local NATS: remove them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        if let Ok(c) = async_nats::connect(nats.as_str()).await {
            let js = async_nats::jetstream::new(c);
            let _ = js.delete_stream(format!("EV_{tag}")).await;
            let _ = js.delete_stream(format!("DLQ_{tag}")).await;
        }
    });
}

/// Per app retention names an app of `[[apps]]`; anything else is refused naming the key, and
/// the environment sets per app keys like any other (`__` between levels, the app id a level).
#[test]
fn per_app_retention_names_a_configured_app() {
    for (text, key) in [
        (
            format!("{APP}[retention.events.apps.\"999\"]\nmax_age = \"1d\"\n"),
            "retention.events.apps.\"999\"",
        ),
        (
            format!("{APP}[retention.dlq.apps.\"42\"]\nenabled = false\n"),
            "retention.dlq.apps.\"42\"",
        ),
        (
            format!("{APP}[retention.dlq.apps.\"1\".overrides]\nclient_event = \"1h\"\n"),
            "retention.dlq.apps.\"1\".overrides",
        ),
        (
            format!("{APP}[retention.events.apps.\"1\"]\nmax_age = \"0s\"\n"),
            "retention.events.apps.\"1\".max_age",
        ),
        (
            format!("{APP}[retention.events.apps.\"1\"]\nmaxage = \"1d\"\n"),
            "maxage",
        ),
    ] {
        let (code, stdout, stderr) = check_config(&text, &[]);
        assert_eq!(code, 1, "{text}: {stdout}");
        assert!(stderr.contains(key), "{key} not named in: {stderr}");
    }
    let (code, _, stderr) = check_config(
        APP,
        &[("PUSHER_BRIDGE_RETENTION__EVENTS__APPS__7__MAX_AGE", "1d")],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("retention.events.apps.\"7\""), "{stderr}");

    let (code, stdout, stderr) = check_config(
        &format!("{APP}[retention.events.apps.\"1\"]\nmax_age = \"2d\"\n"),
        &[
            (
                "PUSHER_BRIDGE_RETENTION__EVENTS__APPS__1__OVERRIDES__CLIENT_EVENT",
                "1h",
            ),
            ("PUSHER_BRIDGE_RETENTION__DLQ__APPS__1__ENABLED", "false"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let effective = pusher_bridge::config::Settings::from_toml(&stdout).expect("output parses");
    let app = &effective.retention.events.apps["1"];
    assert_eq!(
        app.max_age,
        Some(std::time::Duration::from_secs(2 * 86_400))
    );
    assert_eq!(
        app.overrides["client_event"],
        std::time::Duration::from_secs(3600)
    );
    assert!(!effective.retention.dlq.apps["1"].enabled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_their_file_twins_as_kubernetes_mounts_them() {
    use crate::common::process::{BridgeProcess, broker_env, run};
    use crate::common::{APP_ID, APP_KEY, APP_SECRET, delete_streams, jetstream_ctx};

    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("app-secret");
    // As `kubectl create secret --from-file` or `echo` writes it: one trailing newline.
    std::fs::write(&secret, format!("{APP_SECRET}\n")).expect("secret file");
    let s = crate::common::nats_settings();
    let mut env = broker_env(&s);
    env.push((
        "PUSHER_BRIDGE_APPS".into(),
        format!(
            r#"[{{id="{APP_ID}",key="{APP_KEY}",secret_file="{}"}}]"#,
            secret.display()
        ),
    ));
    let mut bridge = BridgeProcess::start(&["serve"], env.clone());
    bridge.wait_ready().await;
    // send-test signs with the secret it read from the same file; the bridge checks it.
    let out = run(&["send-test"], &bridge.env).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(bridge.terminate().await, Some(0));
    assert!(!bridge.stdout().contains(APP_SECRET), "a secret in the log");
    delete_streams(&jetstream_ctx(s.broker.nats.url.expose()).await, &s).await;

    // A key and its twin together: exit 1 naming both, without the value.
    let (code, stdout, stderr) = check_config(
        &format!(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"inline-value\"\nsecret_file = \"{}\"\n",
            secret.display()
        ),
        &[],
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("apps[0].secret_file") && stderr.contains("set apps[0].secret or"),
        "{stderr}"
    );
    assert!(!stderr.contains("inline-value"), "{stderr}");
    // A file that is not there names the key and the path.
    let (code, _, stderr) = check_config(
        "",
        &[(
            "PUSHER_BRIDGE_BROKER__NATS__PASSWORD_FILE",
            "/run/secrets/not-there",
        )],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("broker.nats.password_file") && stderr.contains("/run/secrets/not-there"),
        "{stderr}"
    );
    // check-config shows the path, never the value.
    let (code, stdout, stderr) = check_config(
        &format!(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret_file = \"{}\"\n",
            secret.display()
        ),
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("secret_file"), "{stdout}");
    assert!(!stdout.contains(APP_SECRET), "{stdout}");
}
