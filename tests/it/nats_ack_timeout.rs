//! A NATS server that stops answering (SIGSTOP: the connection stays open, no ack ever comes):
//! every publish is bounded by `broker.publish_timeout` and the webhook by
//! `broker.response_budget`, whichever timer bounds it (the JetStream context's own ack timer
//! while a whole publish timeout is left, the bridge's near the end of the budget); then the
//! event goes to the spool and the webhook is answered.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use pusher_bridge::config::SecretUrl;

struct PausableNats {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl PausableNats {
    async fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("nats-pause"));
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs");
        // Built first, so that `Drop` stops the server whatever happens next.
        let server = Self { child, dir, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("nats-server did not start");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {sig} failed");
        // A signal is delivered asynchronously: on a loaded machine the server could still
        // answer a publish sent right after `kill` returned. Wait until it is really stopped.
        if sig == "-STOP" {
            let stat = format!("/proc/{}/stat", self.child.id());
            for _ in 0..200 {
                let state = std::fs::read_to_string(&stat).unwrap_or_default();
                if state
                    .rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('T'))
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("nats-server did not stop");
        }
    }
}

impl Drop for PausableNats {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_silent_server_is_bounded_by_the_publish_timeout_and_the_budget() {
    let nats = PausableNats::start().await;
    let mut settings = nats_settings();
    settings.broker.nats.url = SecretUrl::new(format!("nats://127.0.0.1:{}", nats.port));
    settings.broker.publish_timeout = Duration::from_millis(900);
    settings.broker.response_budget = Duration::from_millis(1000);
    let app = TestApp::spawn_ready(settings).await;
    let event = r#"{"name":"channel_occupied","channel":"c"}"#;
    assert_eq!(
        app.post_signed(&webhook_body(1, &[event])).await.status,
        200
    );

    nats.signal("-STOP");
    let started = Instant::now();
    let a = app.post_signed(&webhook_body(2, &[event])).await;
    let took = started.elapsed();
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("\"spooled\":1"), "{}", a.body);
    // One attempt of 900 ms (the context's ack timer), then a retry with the 75 ms left of the
    // budget (the bridge's own timer; without it the retry would wait another 900 ms), then the
    // spool.
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");

    nats.signal("-CONT");
    let mut status = 0;
    for _ in 0..50 {
        status = app
            .post_signed(&webhook_body(3, &[event]))
            .await
            .status
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status, 200,
        "the bridge publishes again once the server answers"
    );
    app.stop().await;
}
