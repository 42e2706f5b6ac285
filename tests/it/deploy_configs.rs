//! The bridge configs the deploy files carry, run by the real binary outside any container: the
//! compose service's (mounted TOML + env files), the Kubernetes ConfigMap's (+ Secret and the
//! Deployment's env) and the image's own (Dockerfile ENV + copied TOML). Each passes
//! `check-config`, serves against the local NATS (only the address, streams and spool directory
//! are overridden) and accepts `send-test`; the image's HEALTHCHECK command passes. The compose
//! file's NATS command line is run by the local nats-server.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::deploy::{
    compose_binds, compose_environment, compose_interpolate, dockerfile, env_file, exec_form,
    host_path, read, repo, s, seq, yaml, yaml_docs,
};
use crate::common::process::{BridgeProcess, Env, broker_env, http_get, run};
use crate::common::{
    delete_streams, free_port, jetstream_ctx, nats_settings, stream_messages, unique,
};
use pusher_bridge::config::Settings;
use serde_yaml::Value;

/// The test's overrides: the local NATS, unique prefix and streams, a temporary spool.
fn local_overrides() -> (Settings, Env) {
    let s = nats_settings();
    let env = broker_env(&s);
    (s, env)
}

fn value_of<'a>(env: &'a Env, key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `check-config` with `env` alone, then `serve` with the local overrides on top: ready,
/// `/healthz` 200, `send-test` puts every event type on the stream, clean exit on SIGTERM.
/// Returns the check-config output.
async fn check_and_serve(env: &Env, serve_args: &[&str]) -> String {
    let checked = run(&["check-config"], env).await;
    assert_eq!(checked.code, 0, "{checked:?}");
    assert!(
        !checked.stdout.contains("app-secret"),
        "secret printed:\n{}",
        checked.stdout
    );

    let (settings, overrides) = local_overrides();
    let mut full = env.clone();
    full.extend(overrides);
    // The deployed configurations serve the probes on server.admin_listen, the webhook alone on
    // listen (a free port for each here).
    let mut bridge = BridgeProcess::start_with_admin(serve_args, full);
    bridge.wait_ready().await;
    assert_eq!(bridge.get("/healthz").await.map(|a| a.0), Some(200));
    assert_eq!(
        http_get(bridge.port, "/healthz").await.map(|a| a.0),
        Some(404),
        "only the webhook on listen"
    );
    let sent = run(&["send-test"], &bridge.env).await;
    assert_eq!(sent.code, 0, "{sent:?}");
    let js = jetstream_ctx(settings.broker.nats.url.expose()).await;
    assert_eq!(
        stream_messages(&js, &settings.broker.nats.stream, 7)
            .await
            .len(),
        7
    );
    assert_eq!(bridge.terminate().await, Some(0), "{}", bridge.stderr());
    delete_streams(&js, &settings).await;
    checked.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_bridge_config_checks_and_serves() {
    let compose = yaml("docker-compose.yml");
    let service = &compose["services"]["pusher-bridge"];
    let binds = compose_binds(service);
    // As Compose builds the container's environment: the env files in order, then
    // `environment:` (which wins), its variables at their defaults.
    let mut env: Env = Vec::new();
    for file in seq(&service["env_file"]) {
        let path = repo(s(&file["path"], "env_file"));
        if path.exists() {
            env.extend(env_file(&path));
        } else {
            assert_eq!(
                file["required"],
                Value::Bool(false),
                "{} missing",
                path.display()
            );
        }
    }
    let no_variables = std::collections::BTreeMap::new();
    env.extend(
        compose_environment(service)
            .into_iter()
            .map(|(k, v)| (k, compose_interpolate(&v, &no_variables))),
    );
    let config = value_of(&env, "PUSHER_BRIDGE_CONFIG").expect("PUSHER_BRIDGE_CONFIG set");
    let host = host_path(&binds, config).expect("the config file is mounted");
    assert!(host.is_file(), "{}", host.display());
    env.push(("PUSHER_BRIDGE_CONFIG".into(), host.display().to_string()));

    let printed = check_and_serve(&env, &["serve"]).await;
    assert!(printed.contains(r#"listen = "0.0.0.0:8080""#), "{printed}");
    assert!(printed.contains(r#"url = "nats://nats:4222""#), "{printed}");
    assert!(
        printed.contains(r#"url = "amqp://pusher:***@rabbitmq:5672/%2f""#),
        "{printed}"
    );
    assert!(printed.contains(r#"id = "app-id""#), "{printed}");
    assert!(printed.contains(r#"secret = "***""#), "{printed}");
    assert!(printed.contains(r#"format = "json""#), "{printed}");
    assert!(
        printed.contains(r#"dir = "/var/lib/pusher-bridge/spool""#),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_configmap_checks_and_serves() {
    let docs: Vec<Value> = ["config.yaml", "deployment.yaml"]
        .iter()
        .flat_map(|f| yaml_docs(&format!("deploy/kubernetes/{f}")))
        .collect();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == Value::String(k.into()))
            .unwrap()
            .clone()
    };
    let (config_map, deployment) = (kind("ConfigMap"), kind("Deployment"));
    // The Secret lives in its own file (created once, never re-applied with the manifest).
    let secret = yaml_docs("deploy/kubernetes/secret.example.yaml")
        .into_iter()
        .find(|d| d["kind"] == Value::String("Secret".into()))
        .expect("a Secret");
    let container = &seq(&deployment["spec"]["template"]["spec"]["containers"])[0];

    let dir = std::env::temp_dir().join(unique("k8s-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let data = config_map["data"].as_mapping().unwrap();
    for (key, text) in data {
        std::fs::write(dir.join(s(key, "key")), s(text, "data")).unwrap();
    }
    let mut env: Env = Vec::new();
    for e in seq(&container["env"]) {
        env.push((
            s(&e["name"], "name").to_string(),
            s(&e["value"], "value").to_string(),
        ));
    }
    for (k, v) in secret["stringData"].as_mapping().unwrap() {
        env.push((s(k, "key").to_string(), s(v, "value").to_string()));
    }
    // The ConfigMap volume's mount path becomes the temporary directory.
    let config = value_of(&env, "PUSHER_BRIDGE_CONFIG").unwrap().to_string();
    let mount = seq(&container["volumeMounts"])
        .into_iter()
        .find(|m| m["name"] == Value::String("config".into()))
        .unwrap();
    let rest = config
        .strip_prefix(&format!("{}/", s(&mount["mountPath"], "mountPath")))
        .expect("config file inside the ConfigMap mount");
    env.push((
        "PUSHER_BRIDGE_CONFIG".into(),
        dir.join(rest).display().to_string(),
    ));
    let args: Vec<String> = seq(&container["args"])
        .iter()
        .map(|a| s(a, "arg").to_string())
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let printed = check_and_serve(&env, &args).await;
    assert!(printed.contains(r#"listen = "0.0.0.0:8080""#), "{printed}");
    assert!(printed.contains(r#"id = "app-id""#), "{printed}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_config_checks_and_serves_with_its_healthcheck() {
    let steps = dockerfile(&read("Dockerfile"));
    let runtime = steps.iter().rposition(|i| i.keyword == "FROM").unwrap();
    let stage = &steps[runtime..];
    // ENV of the runtime stage, with container paths mapped back to the files COPY takes them from.
    let mut copied: Vec<(PathBuf, String)> = Vec::new();
    let mut env: Env = Vec::new();
    for step in stage {
        match step.keyword.as_str() {
            "COPY" if !step.args.contains("--from") => {
                let words: Vec<&str> = step.args.split_whitespace().collect();
                let dst = words[words.len() - 1];
                for src in &words[..words.len() - 1] {
                    copied.push((repo(src), dst.to_string()));
                }
            }
            "ENV" => {
                for pair in step.args.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV KEY=value");
                    env.push((k.into(), v.into()));
                }
            }
            _ => {}
        }
    }
    let config = value_of(&env, "PUSHER_BRIDGE_CONFIG").expect("the image names its config");
    let host = host_path(&copied, config).expect("the config is copied into the image");
    let baked = Settings::from_toml(&std::fs::read_to_string(&host).unwrap()).unwrap();
    assert!(
        baked.apps.is_empty(),
        "no secret may be baked into the image"
    );
    let volume = stage
        .iter()
        .find(|i| i.keyword == "VOLUME")
        .map(|i| exec_form(&i.args)[0].clone())
        .expect("a VOLUME for the spool");
    assert!(
        baked.spool.dir.starts_with(&volume),
        "spool {} outside the volume {volume}",
        baked.spool.dir.display()
    );
    assert_eq!(baked.listen_addr().unwrap().ip().to_string(), "0.0.0.0");
    env.push(("PUSHER_BRIDGE_CONFIG".into(), host.display().to_string()));
    // As `docker run -e PUSHER_BRIDGE_APPS=...` would.
    env.push((
        "PUSHER_BRIDGE_APPS".into(),
        r#"[{id="app-id",key="app-key",secret="app-secret"}]"#.into(),
    ));

    // The image's CMD, and its HEALTHCHECK against that bridge.
    let cmd = exec_form(&stage.iter().find(|i| i.keyword == "CMD").unwrap().args);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let printed = run(&["check-config"], &env).await;
    assert_eq!(printed.code, 0, "{printed:?}");
    let (settings, overrides) = local_overrides();
    let mut full = env.clone();
    full.extend(overrides);
    let mut bridge = BridgeProcess::start_with_admin(&cmd, full);
    bridge.wait_ready().await;
    let health = stage
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .unwrap()
        .args
        .clone();
    let probe = exec_form(&health[health.find("CMD").unwrap() + 3..]);
    let probe: Vec<&str> = probe[1..].iter().map(String::as_str).collect();
    let out = run(&probe, &bridge.env).await;
    assert_eq!(out.code, 0, "{out:?}");
    bridge.terminate().await;
    let out = run(&probe, &bridge.env).await;
    assert_eq!(out.code, 1, "healthy after the bridge stopped: {out:?}");
    let js = jetstream_ctx(settings.broker.nats.url.expose()).await;
    delete_streams(&js, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_nats_command_runs_on_the_local_nats_server() {
    let compose = yaml("docker-compose.yml");
    let nats = &compose["services"]["nats"];
    let mut args: Vec<String> = seq(&nats["command"])
        .iter()
        .map(|a| s(a, "arg").to_string())
        .collect();
    let store = std::env::temp_dir().join(unique("compose-nats"));
    let http_port = free_port();
    for (flag, value) in [
        ("--store_dir", store.display().to_string()),
        ("--http_port", http_port.to_string()),
    ] {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing"));
        args[i + 1] = value;
    }
    let port = free_port();
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let mut child = std::process::Command::new(bin)
        .args(&args)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server runs");

    // The compose healthcheck's URL path, on the test's port.
    let test: Vec<String> = seq(&nats["healthcheck"]["test"])
        .iter()
        .map(|a| s(a, "arg").to_string())
        .collect();
    let url = test.iter().find(|a| a.starts_with("http://")).unwrap();
    let path = &url[url["http://".len()..].find('/').unwrap() + "http://".len()..];
    let mut healthy = false;
    for _ in 0..200 {
        if http_get(http_port, path).await.is_some_and(|a| a.0 == 200) {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // JetStream is on and stores where the compose volume is mounted.
    let jsz = http_get(http_port, "/jsz")
        .await
        .map(|a| a.1)
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&store);
    assert!(healthy, "{path} never answered 200 with {args:?}");
    let jsz: serde_json::Value = serde_json::from_str(&jsz).expect("/jsz is JSON");
    assert!(jsz.get("disabled").is_none(), "JetStream disabled: {jsz}");
    let store_dir = jsz["config"]["store_dir"].as_str().unwrap_or_default();
    assert!(
        store_dir.starts_with(&store.display().to_string()),
        "store {store_dir} is not under {}",
        store.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_bridge_config_names_the_file_next_to_other_env_keys() {
    let dir = std::env::temp_dir().join(unique("env-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bridge.toml");
    std::fs::write(&file, "[server]\nwebhook_path = \"/from-the-file\"\n").unwrap();
    let env: Env = vec![
        ("PUSHER_BRIDGE_CONFIG".into(), file.display().to_string()),
        (
            "PUSHER_BRIDGE_BROKER__SUBJECT_PREFIX".into(),
            "from_env".into(),
        ),
    ];
    let out = run(&["check-config"], &env).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains(r#"webhook_path = "/from-the-file""#),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(r#"subject_prefix = "from_env""#),
        "{}",
        out.stdout
    );
    let _ = std::fs::remove_dir_all(dir);
}
