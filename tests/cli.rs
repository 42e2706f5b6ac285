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
