//! NATS authentication and TLS against private `nats-server`s started with `--user/--pass`,
//! `--auth` and `--tls`: the right credentials (config keys, or written into the URL) get the
//! bridge connected and publishing; wrong or missing ones leave `broker_up` at 0.

use std::path::Path;
use std::time::Duration;

use crate::common::process::{run, settings_env};
use crate::common::{
    NatsServer, TestApp, free_port, nats_settings, stream_messages, unique, webhook_body,
};
use async_nats::ConnectOptions;
use async_nats::jetstream;
use pusher_bridge::config::{Secret, SecretUrl, Settings};

fn settings_for(server: &NatsServer) -> Settings {
    let mut s = nats_settings();
    s.broker.nats.url = SecretUrl::new(server.url());
    s
}

/// Spawns the bridge, expects it ready, posts one webhook and reads it back through `reader`.
async fn publishes(s: Settings, reader: ConnectOptions, url: &str) {
    let app = TestApp::spawn_ready(s.clone()).await;
    assert_eq!(app.metric("pusher_bridge_broker_up").await, 1.0);
    let body = webhook_body(
        1_700_000_000_000,
        &[r#"{"name":"channel_occupied","channel":"auth-check"}"#],
    );
    let answer = app.post_signed(&body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let client = reader.connect(url).await.expect("reader connects");
    let js = jetstream::new(client);
    let stored = stream_messages(&js, &s.broker.nats.stream, 1).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].subject,
        format!(
            "{}.123456.channel_occupied.auth-check",
            s.broker.subject_prefix
        )
    );
    app.stop().await;
}

/// Spawns the bridge and expects it to stay without a broker connection.
async fn refused(s: Settings) {
    let app = TestApp::spawn(s).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        app.metric("pusher_bridge_broker_up").await,
        0.0,
        "connected with wrong credentials"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password() {
    let server =
        NatsServer::start_with_args(free_port(), &["--user", "bridge", "--pass", "s3cr3t"]).await;
    let reader = || ConnectOptions::with_user_and_password("bridge".into(), "s3cr3t".into());

    // Config keys.
    let mut s = settings_for(&server);
    s.broker.nats.user = Some("bridge".into());
    s.broker.nats.password = Some(Secret::new("s3cr3t"));
    publishes(s, reader(), &server.url()).await;

    // Written into the URL (percent-escapes allowed).
    let mut s = settings_for(&server);
    s.broker.nats.url = SecretUrl::new(format!("nats://bridge:s3cr%33t@127.0.0.1:{}", server.port));
    publishes(s, reader(), &server.url()).await;

    // Wrong password, and none at all.
    let mut s = settings_for(&server);
    s.broker.nats.user = Some("bridge".into());
    s.broker.nats.password = Some(Secret::new("wrong"));
    refused(s).await;
    refused(settings_for(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let server = NatsServer::start_with_args(free_port(), &["--auth", "t0ken-abc"]).await;
    let reader = || ConnectOptions::with_token("t0ken-abc".into());

    let mut s = settings_for(&server);
    s.broker.nats.token = Some(Secret::new("t0ken-abc"));
    publishes(s, reader(), &server.url()).await;

    let mut s = settings_for(&server);
    s.broker.nats.url = SecretUrl::new(format!("nats://t0ken-abc@127.0.0.1:{}", server.port));
    publishes(s, reader(), &server.url()).await;

    let mut s = settings_for(&server);
    s.broker.nats.token = Some(Secret::new("other"));
    refused(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_the_environment_are_redacted() {
    let s = nats_settings();
    let mut env = settings_env(&s);
    env.push(("PUSHER_BRIDGE_BROKER__NATS__USER".into(), "bridge".into()));
    env.push((
        "PUSHER_BRIDGE_BROKER__NATS__PASSWORD".into(),
        "pw-in-env".into(),
    ));
    env.push((
        "PUSHER_BRIDGE_BROKER__NATS__TOKEN".into(),
        "tok-in-env".into(),
    ));
    let out = run(&["check-config"], &env).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("user = \"bridge\""), "{}", out.stdout);
    assert!(out.stdout.contains("password = \"***\""), "{}", out.stdout);
    assert!(out.stdout.contains("token = \"***\""), "{}", out.stdout);
    assert!(!out.stdout.contains("pw-in-env") && !out.stdout.contains("tok-in-env"));

    env.retain(|(k, _)| k != "PUSHER_BRIDGE_BROKER__NATS__PASSWORD");
    let out = run(&["check-config"], &env).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("broker.nats.password"),
        "{}",
        out.stderr
    );
}

/// A CA and a server certificate for 127.0.0.1 / localhost, made with the openssl CLI.
fn make_certs(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=pusher-bridge test CA",
    ];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let dir = std::env::temp_dir().join(unique("nats-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir);
    let cert = dir.join("server.pem").display().to_string();
    let key = dir.join("server.key").display().to_string();
    let server = NatsServer::start_with_args(
        free_port(),
        &[
            "--tls",
            "--tlscert",
            &cert,
            "--tlskey",
            &key,
            "--user",
            "b",
            "--pass",
            "p",
        ],
    )
    .await;

    let mut s = settings_for(&server);
    s.broker.nats.tls_ca_file = Some(dir.join("ca.pem"));
    s.broker.nats.user = Some("b".into());
    s.broker.nats.password = Some(Secret::new("p"));
    let reader = ConnectOptions::with_user_and_password("b".into(), "p".into())
        .add_root_certificates(dir.join("ca.pem"))
        .require_tls(true);
    publishes(s.clone(), reader, &server.url()).await;

    // The server's certificate is not trusted without the CA.
    let mut untrusted = s.clone();
    untrusted.broker.nats.tls_ca_file = None;
    untrusted.broker.nats.tls_required = true;
    refused(untrusted).await;

    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
