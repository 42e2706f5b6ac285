//! The consumer's side, in the languages downstream teams write: the Python (nats-py, pika) and
//! Node (nats, amqplib) subscriber examples in examples/ read what the bridge published to the
//! real brokers, and the CloudEvents Python SDK reads the `ce-` headers of
//! `broker.cloudevents = true` from both brokers.
//!
//! `.ci/run` installs the dependencies from the registries into examples/python/.venv and
//! examples/node/node_modules; a test whose interpreter or packages are missing prints a
//! NOTICE and passes without checking (only when that install was impossible).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::{
    APP_ID, Stored, TestApp, amqp_channel, cleanup, nats_url, read_events, settings_for,
    webhook_body,
};
use pusher_bridge::config::BrokerKind;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The venv's Python with the examples' packages, or None (with a NOTICE).
fn python() -> Option<PathBuf> {
    let py = repo("examples/python/.venv/bin/python");
    let ok = py.is_file()
        && Command::new(&py)
            .args(["-c", "import nats, pika, cloudevents"])
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        println!(
            "NOTICE: examples/python/.venv with examples/python/requirements.txt is missing \
             (.ci/run installs it from PyPI); Python consumer check skipped"
        );
    }
    ok.then_some(py)
}

/// `node` when examples/node's packages are installed, or None (with a NOTICE).
fn node() -> Option<PathBuf> {
    let installed = ["nats", "amqplib"]
        .iter()
        .all(|p| repo(&format!("examples/node/node_modules/{p}/package.json")).is_file());
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(installed && node) {
        println!(
            "NOTICE: node or examples/node/node_modules is missing (.ci/run runs \
             `npm ci --prefix examples/node`); Node consumer check skipped"
        );
        return None;
    }
    Some(PathBuf::from("node"))
}

/// A consumer example running as a child process; its stdout lines arrive on a channel.
struct Consumer {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Consumer {
    fn start(program: &Path, script: &str, env: &[(&str, String)]) -> Self {
        let stderr = std::env::temp_dir().join(crate::common::unique("consumer-stderr"));
        let mut child = Command::new(program)
            .arg(repo(script))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{script}: {e}"));
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next stdout line as JSON, waiting up to 30 s (a loaded machine starts Python
    /// slowly).
    async fn next(&mut self) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    return serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    panic!("the consumer exited early; stderr:\n{}", self.stderr())
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no output from the consumer in 30 s; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the exit (it stops by itself after MAX_MESSAGES) and asserts success.
    async fn finish(mut self) {
        for _ in 0..750 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "exit {status}; stderr:\n{}",
                    self.stderr()
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the consumer did not stop; stderr:\n{}", self.stderr());
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

const EVENTS: [&str; 3] = [
    r#"{"name":"channel_occupied","channel":"presence-lobby"}"#,
    r#"{"name":"member_added","channel":"presence-lobby","user_id":"u-1"}"#,
    r#"{"name":"client_event","channel":"private-a.b","event":"client-x","data":"{}","socket_id":"1.2"}"#,
];

/// (event, channel) of [`EVENTS`], in order.
const EXPECTED: [(&str, &str); 3] = [
    ("channel_occupied", "presence-lobby"),
    ("member_added", "presence-lobby"),
    ("client_event", "private-a.b"),
];

async fn post_events(app: &TestApp, time_ms: u64) {
    let answer = app.post_signed(&webhook_body(time_ms, &EVENTS)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body.contains(r#""published":3"#), "{}", answer.body);
}

fn assert_lines(lines: &[serde_json::Value], stored: &[Stored]) {
    assert_eq!(lines.len(), EXPECTED.len(), "{lines:?}");
    for ((line, (event, channel)), m) in lines.iter().zip(EXPECTED).zip(stored) {
        assert_eq!(line["app_id"], APP_ID, "{line}");
        assert_eq!(line["event"], event, "{line}");
        assert_eq!(line["channel"], channel, "{line}");
        assert_eq!(line["id"].as_str(), m.msg_id.as_deref(), "{line}");
    }
}

/// The NATS example reads every event, in order, with its message id.
async fn nats_example(program: PathBuf, script: &str) {
    let s = settings_for(BrokerKind::Nats);
    let app = TestApp::spawn_ready(s.clone()).await;
    post_events(&app, 1_700_000_000_123).await;
    let stored = read_events(BrokerKind::Nats, &s, 3).await;
    let mut consumer = Consumer::start(
        &program,
        script,
        &[
            ("NATS_URL", nats_url()),
            ("STREAM", s.broker.nats.stream.clone()),
            ("SUBJECT", format!("{}.>", s.broker.subject_prefix)),
            ("DURABLE", "example-reader".into()),
            ("MAX_MESSAGES", "3".into()),
        ],
    );
    let mut lines = Vec::new();
    for _ in 0..3 {
        lines.push(consumer.next().await);
    }
    consumer.finish().await;
    assert_lines(&lines, &stored);
    assert_eq!(
        lines[2]["subject"],
        format!(
            "{}.{APP_ID}.client_event.private-a%2Eb",
            s.broker.subject_prefix
        )
    );
    assert_eq!(lines[1]["user_id"], "u-1");
    app.stop().await;
    cleanup(BrokerKind::Nats, &s).await;
}

/// The AMQP example binds its own queue, reads every event in order and drops the copies of a
/// redelivered webhook by `message_id`.
async fn amqp_example(program: PathBuf, script: &str) {
    let s = settings_for(BrokerKind::Amqp);
    let app = TestApp::spawn_ready(s.clone()).await;
    let queue = format!("{}.example", s.broker.amqp.queue);
    let mut consumer = Consumer::start(
        &program,
        script,
        &[
            ("AMQP_URL", crate::common::amqp_url()),
            ("EXCHANGE", s.broker.amqp.exchange.clone()),
            ("QUEUE", queue.clone()),
            ("BINDING", format!("{}.#", s.broker.subject_prefix)),
            ("MAX_MESSAGES", "4".into()),
        ],
    );
    assert_eq!(consumer.next().await["ready"], true);
    // The same webhook twice (Pusher's retry), then one more event.
    post_events(&app, 1_700_000_000_123).await;
    post_events(&app, 1_700_000_000_123).await;
    let last = webhook_body(
        1_700_000_000_999,
        &[r#"{"name":"cache_miss","channel":"cache-x"}"#],
    );
    assert_eq!(app.post_signed(&last).await.status, 200);
    let mut lines = Vec::new();
    for _ in 0..4 {
        lines.push(consumer.next().await);
    }
    consumer.finish().await;
    let stored = read_events(BrokerKind::Amqp, &s, 7).await;
    assert_eq!(stored.len(), 7, "the bridge's own queue has every copy");
    assert_lines(&lines[..3], &stored[..3]);
    assert_eq!(
        lines[3]["event"], "cache_miss",
        "the redelivered copies were dropped"
    );
    let (conn, ch) = amqp_channel().await;
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    app.stop().await;
    cleanup(BrokerKind::Amqp, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_nats_consumer_example() {
    if let Some(py) = python() {
        nats_example(py, "examples/python/nats_consumer.py").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_amqp_consumer_example() {
    if let Some(py) = python() {
        amqp_example(py, "examples/python/amqp_consumer.py").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_nats_consumer_example() {
    if let Some(node) = node() {
        nats_example(node, "examples/node/nats_consumer.mjs").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_amqp_consumer_example() {
    if let Some(node) = node() {
        amqp_example(node, "examples/node/amqp_consumer.mjs").await;
    }
}

/// What the CloudEvents SDK read from one event, checked against the stored message.
fn assert_cloudevent(line: &serde_json::Value, stored: &Stored, event: &str, channel: &str) {
    assert_eq!(line["specversion"], "1.0", "{line}");
    assert_eq!(line["id"].as_str(), stored.msg_id.as_deref(), "{line}");
    assert_eq!(line["type"], format!("com.pusher.{event}"), "{line}");
    assert_eq!(line["source"], format!("/apps/{APP_ID}"), "{line}");
    assert_eq!(line["subject"], channel, "{line}");
    assert_eq!(line["time"], "2023-11-14T22:13:20.123000+00:00", "{line}");
    assert_eq!(line["datacontenttype"], "application/json", "{line}");
    // `data` is the message body: the event as Pusher sent it, plus app_id and time_ms.
    assert_eq!(line["data"], stored.body, "{line}");
}

async fn cloudevents_read_by_the_sdk(kind: BrokerKind) {
    let Some(py) = python() else { return };
    let mut s = settings_for(kind);
    s.broker.cloudevents = true;
    let app = TestApp::spawn_ready(s.clone()).await;
    let queue = format!("{}.ce", s.broker.amqp.queue);
    let script = "examples/python/cloudevents_consumer.py";
    let mut consumer = match kind {
        BrokerKind::Nats => None,
        BrokerKind::Amqp => {
            let mut c = Consumer::start(
                &py,
                script,
                &[
                    ("BROKER", "amqp".into()),
                    ("AMQP_URL", crate::common::amqp_url()),
                    ("EXCHANGE", s.broker.amqp.exchange.clone()),
                    ("QUEUE", queue.clone()),
                    ("BINDING", format!("{}.#", s.broker.subject_prefix)),
                    ("MAX_MESSAGES", "3".into()),
                ],
            );
            assert_eq!(c.next().await["ready"], true);
            Some(c)
        }
    };
    post_events(&app, 1_700_000_000_123).await;
    let stored = read_events(kind, &s, 3).await;
    assert_eq!(stored.len(), 3);
    let mut consumer = consumer.take().unwrap_or_else(|| {
        Consumer::start(
            &py,
            script,
            &[
                ("BROKER", "nats".into()),
                ("NATS_URL", nats_url()),
                ("STREAM", s.broker.nats.stream.clone()),
                ("SUBJECT", format!("{}.>", s.broker.subject_prefix)),
                ("DURABLE", "ce-reader".into()),
                ("MAX_MESSAGES", "3".into()),
            ],
        )
    });
    for (m, (event, channel)) in stored.iter().zip(EXPECTED) {
        let line = consumer.next().await;
        assert_cloudevent(&line, m, event, channel);
        assert_eq!(m.header("ce-id"), m.msg_id.as_deref());
    }
    consumer.finish().await;
    if kind == BrokerKind::Amqp {
        let (conn, ch) = amqp_channel().await;
        let _ = ch
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
        let _ = conn.close(200, "done".into()).await;
    }
    app.stop().await;
    cleanup(kind, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_sdk_reads_nats_events() {
    cloudevents_read_by_the_sdk(BrokerKind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_sdk_reads_amqp_events() {
    cloudevents_read_by_the_sdk(BrokerKind::Amqp).await;
}

/// Off by default: no `ce-` header at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_headers_are_opt_in() {
    let s = settings_for(BrokerKind::Nats);
    let app = TestApp::spawn_ready(s.clone()).await;
    post_events(&app, 1_700_000_000_123).await;
    let stored = read_events(BrokerKind::Nats, &s, 3).await;
    assert_eq!(stored.len(), 3);
    for m in &stored {
        assert!(
            m.headers.iter().all(|(k, _)| !k.starts_with("ce-")),
            "{m:?}"
        );
    }
    app.stop().await;
    cleanup(BrokerKind::Nats, &s).await;
}
