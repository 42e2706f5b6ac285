//! The real `pusher-bridge` binary as a child process: for tests of the command line, the
//! deploy files and the log output. Each process runs in its own temporary directory (so no
//! `config/pusher-bridge.toml` is picked up by accident) with the inherited `PUSHER_BRIDGE_*`
//! and `RUST_LOG` variables removed: a test sees only the environment it sets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pusher_bridge::config::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{free_port, unique};

/// The binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_pusher-bridge");

/// Environment variables (name, value).
pub type Env = Vec<(String, String)>;

/// A finished one-shot command.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

fn command(args: &[&str], env: &[(String, String)], dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir);
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("PUSHER_BRIDGE_") || name == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("pb-proc"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `pusher-bridge <args>` to completion (off the async threads).
pub async fn run(args: &[&str], env: &[(String, String)]) -> Run {
    let dir = scratch_dir();
    let mut cmd = command(args, env, &dir);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("pusher-bridge runs");
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The environment that makes the binary run with `s`'s apps, prefix, streams and spool.
pub fn settings_env(s: &Settings) -> Env {
    let apps = s
        .apps
        .iter()
        .map(|a| {
            format!(
                r#"{{id="{}",key="{}",secret="{}"}}"#,
                a.id,
                a.key,
                a.secret.expose()
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let mut env = vec![("PUSHER_BRIDGE_APPS".into(), format!("[{apps}]"))];
    env.extend(broker_env(s));
    env
}

/// The environment that points the binary at `s`'s prefix, NATS URL, streams and spool, and
/// leaves the apps to its config file.
pub fn broker_env(s: &Settings) -> Env {
    vec![
        (
            "PUSHER_BRIDGE_BROKER__SUBJECT_PREFIX".into(),
            s.broker.subject_prefix.clone(),
        ),
        (
            "PUSHER_BRIDGE_BROKER__NATS__URL".into(),
            s.broker.nats.url.expose().to_string(),
        ),
        (
            "PUSHER_BRIDGE_BROKER__NATS__STREAM".into(),
            s.broker.nats.stream.clone(),
        ),
        (
            "PUSHER_BRIDGE_BROKER__NATS__DLQ_STREAM".into(),
            s.broker.nats.dlq_stream.clone(),
        ),
        (
            "PUSHER_BRIDGE_SPOOL__DIR".into(),
            s.spool.dir.display().to_string(),
        ),
    ]
}

/// The environment that points the binary at `s`'s RabbitMQ: `broker.kind = "amqp"`, its
/// URL, exchanges, queues (and their type) and connection name.
pub fn amqp_env(s: &Settings) -> Env {
    let a = &s.broker.amqp;
    let queue_type = match a.queue_type {
        pusher_bridge::config::QueueType::Classic => "classic",
        pusher_bridge::config::QueueType::Quorum => "quorum",
    };
    [
        ("KIND", "amqp"),
        ("AMQP__URL", a.url.expose()),
        ("AMQP__EXCHANGE", &a.exchange),
        ("AMQP__QUEUE", &a.queue),
        ("AMQP__DLQ_EXCHANGE", &a.dlq_exchange),
        ("AMQP__DLQ_QUEUE", &a.dlq_queue),
        ("AMQP__CONNECTION_NAME", &a.connection_name),
        ("AMQP__QUEUE_TYPE", queue_type),
    ]
    .into_iter()
    .map(|(k, v)| (format!("PUSHER_BRIDGE_BROKER__{k}"), v.to_string()))
    .collect()
}

/// A bridge (`serve`) running as a child process on a free port.
pub struct BridgeProcess {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its admin port (`server.admin_listen`), when started with one: probes and `/metrics`
    /// are asked there.
    pub admin_port: Option<u16>,
    /// The environment it was started with (listen address included).
    pub env: Env,
    dir: PathBuf,
    child: Option<Child>,
}

impl BridgeProcess {
    /// Starts `pusher-bridge <args>` with `env`, listening on 127.0.0.1 at a free port
    /// (`PUSHER_BRIDGE_SERVER__LISTEN`, set last so it wins).
    pub fn start(args: &[&str], env: Env) -> Self {
        Self::start_on(args, env, None)
    }

    /// [`Self::start`] with `server.admin_listen` on another free port (for configurations
    /// that set one: the container's and the manifests'); [`Self::get`] asks there.
    pub fn start_with_admin(args: &[&str], mut env: Env) -> Self {
        let admin = free_port();
        env.push((
            "PUSHER_BRIDGE_SERVER__ADMIN_LISTEN".into(),
            format!("127.0.0.1:{admin}"),
        ));
        Self::start_on(args, env, Some(admin))
    }

    fn start_on(args: &[&str], mut env: Env, admin_port: Option<u16>) -> Self {
        let port = free_port();
        env.push((
            "PUSHER_BRIDGE_SERVER__LISTEN".into(),
            format!("127.0.0.1:{port}"),
        ));
        let dir = scratch_dir();
        let stdout = std::fs::File::create(dir.join("stdout")).unwrap();
        let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
        let child = command(args, &env, &dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("pusher-bridge starts");
        Self {
            port,
            admin_port,
            env,
            dir,
            child: Some(child),
        }
    }

    /// Its process id (None once it was terminated).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything it printed on standard output so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    /// Everything it printed on standard error so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    async fn wait_for(&mut self, path: &str) {
        for _ in 0..500 {
            if let Some(status) = self.exited() {
                panic!(
                    "pusher-bridge exited with {status}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            if self.get(path).await.is_some_and(|(code, _)| code == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "{path} never answered 200\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
    }

    /// Waits until `/healthz` answers 200 (panics with its output if it exits first).
    pub async fn wait_healthy(&mut self) {
        self.wait_for("/healthz").await;
    }

    /// Waits until `/readyz` answers 200 and the broker is up (`/readyz` alone is 200 as soon
    /// as the spool has room, before the broker's streams exist).
    pub async fn wait_ready(&mut self) {
        self.wait_for("/readyz").await;
        for _ in 0..500 {
            let metrics = self.get("/metrics").await.map(|(_, body)| body);
            if metrics.is_some_and(|m| m.lines().any(|l| l == "pusher_bridge_broker_up 1")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("broker never up\nstderr:\n{}", self.stderr());
    }

    /// GET `path` over a plain HTTP/1.1 connection (on the admin port when there is one):
    /// (status, body), None when nothing answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin_port.unwrap_or(self.port), path).await
    }

    /// Sends SIGTERM and waits up to 15 s for the exit (then SIGKILL). Returns the exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        for _ in 0..300 {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal HTTP/1.1 GET to 127.0.0.1:`port` (independent of the crate's own client).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path, &[], "").await
}

/// A minimal HTTP/1.1 request to 127.0.0.1:`port`: (status, body), None when nothing answers.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        Some((
            code,
            if chunked {
                dechunk(body)
            } else {
                body.to_string()
            },
        ))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// POSTs `body` to the bridge's webhook path, signed with the app of `settings_env`.
pub async fn post_signed(port: u16, key: &str, secret: &str, body: &str) -> Option<(u16, String)> {
    let signature = super::sign(secret, body.as_bytes());
    http_request(
        port,
        "POST",
        "/pusher/webhooks",
        &[
            ("Content-Type", "application/json"),
            ("X-Pusher-Key", key),
            ("X-Pusher-Signature", &signature),
        ],
        body,
    )
    .await
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
