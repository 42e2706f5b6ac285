//! The consumer's side, in the languages downstream teams write: the Python (nats-py, pika) and
//! Node (nats, amqplib) subscriber examples in examples/ read what the bridge published to the
//! real brokers, and the CloudEvents Python SDK reads the `ce-` headers of
//! `broker.cloudevents = true` from both brokers. Each example has names of its own (two run
//! side by side both read every event), bounds what it leaves on the broker (an inactive
//! threshold on NATS, `x-expires` and `x-max-length` on RabbitMQ), and the CloudEvents reader
//! skips events without `ce-` headers, saying why. The NATS and RabbitMQ examples process each
//! event in an OpenTelemetry consumer span that continues the trace the message carries (issue
//! 23): a child of the bridge's producer span, or a new trace when there is no `traceparent`.
//!
//! `.ci/run` installs the dependencies from the registries into examples/python/.venv and
//! examples/node/node_modules; a test whose interpreter or packages are missing prints a
//! NOTICE and passes without checking (only when that install was impossible).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::otlp::Receiver;
use crate::common::{
    APP_ID, APP_KEY, APP_SECRET, Stored, TestApp, amqp_channel, cleanup, delete_queue,
    jetstream_ctx, nats_url, read_events, settings_for, sign, webhook_body,
};
use pusher_bridge::config::{BrokerKind, SecretUrl, Settings};

pub(crate) fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The venv's Python with the examples' packages, or None (with a NOTICE).
pub(crate) fn python() -> Option<PathBuf> {
    let py = repo("examples/python/.venv/bin/python");
    let ok = py.is_file()
        && Command::new(&py)
            .args([
                "-c",
                "import nats, pika, cloudevents, opentelemetry.sdk.trace",
            ])
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
pub(crate) fn node() -> Option<PathBuf> {
    let installed = [
        "nats",
        "amqplib",
        "@opentelemetry/api",
        "@opentelemetry/core",
        "@opentelemetry/sdk-trace-base",
    ]
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
pub(crate) struct Consumer {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Consumer {
    pub(crate) fn start(program: &Path, script: &str, env: &[(&str, String)]) -> Self {
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

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next stdout line as JSON, waiting up to 30 s (a loaded machine starts Python
    /// slowly).
    pub(crate) async fn next(&mut self) -> serde_json::Value {
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
    pub(crate) async fn finish(mut self) {
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

/// The events the tests post, in one webhook: occupancy, a member, a client event on a channel
/// whose name needs escaping.
pub(crate) const EVENTS: [&str; 3] = [
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

/// The ids of an example's consumer span, from its line's `trace` field.
#[derive(Debug)]
struct Continuation {
    trace: String,
    /// The span it continues (the message's producer span); None: it started a trace.
    parent: Option<String>,
    span: String,
}

fn is_id(hex: &str, len: usize) -> bool {
    hex.len() == len
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && hex.bytes().any(|b| b != b'0')
}

/// `<trace id> parent <parent span id> span <span id>` or `<trace id> (new) span <span id>`.
fn continuation(line: &serde_json::Value) -> Continuation {
    let text = line["trace"]
        .as_str()
        .unwrap_or_else(|| panic!("no `trace` field: {line}"));
    let words: Vec<&str> = text.split(' ').collect();
    let c = match words[..] {
        [trace, "parent", parent, "span", span] => Continuation {
            trace: trace.into(),
            parent: Some(parent.into()),
            span: span.into(),
        },
        [trace, "(new)", "span", span] => Continuation {
            trace: trace.into(),
            parent: None,
            span: span.into(),
        },
        _ => panic!(
            "`trace` is neither `<trace> parent <span> span <span>` nor `<trace> (new) span <span>`: {line}"
        ),
    };
    assert!(is_id(&c.trace, 32) && is_id(&c.span, 16), "{line}");
    assert!(
        c.parent
            .as_deref()
            .is_none_or(|p| is_id(p, 16) && p != c.span),
        "{line}"
    );
    c
}

/// The lines of a bridge without tracing: its messages carry no `traceparent`, so each
/// event's span starts a trace of its own.
fn assert_lines(lines: &[serde_json::Value], stored: &[Stored]) {
    assert_eq!(lines.len(), EXPECTED.len(), "{lines:?}");
    let mut traces = std::collections::BTreeSet::new();
    for ((line, (event, channel)), m) in lines.iter().zip(EXPECTED).zip(stored) {
        assert_eq!(line["app_id"], APP_ID, "{line}");
        assert_eq!(line["event"], event, "{line}");
        assert_eq!(line["channel"], channel, "{line}");
        assert_eq!(line["id"].as_str(), m.msg_id.as_deref(), "{line}");
        assert_eq!(m.header("traceparent"), None, "{m:?}");
        let c = continuation(line);
        assert_eq!(c.parent, None, "a new trace: {line}");
        traces.insert(c.trace);
    }
    assert_eq!(traces.len(), lines.len(), "one trace per event: {lines:?}");
}

/// What the examples leave on the broker is bounded, as their docstrings say: the server
/// deletes the NATS consumer `durable` after a day without a pull.
async fn assert_inactive_threshold(s: &Settings, durable: &str) {
    let js = jetstream_ctx(&nats_url()).await;
    let stream = js.get_stream(&s.broker.nats.stream).await.unwrap();
    let info = stream.consumer_info(durable).await.unwrap();
    assert_eq!(
        info.config.inactive_threshold,
        Duration::from_secs(86_400),
        "consumer {durable}"
    );
}

/// The example's RabbitMQ queue is bounded as its docstring says: RabbitMQ takes a declaration
/// with `x-expires` a day and `x-max-length` 100 000, and refuses one without them.
async fn assert_bounded_queue(queue: &str) {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let (conn, ch) = amqp_channel().await;
    let plain = ch
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await;
    let err = plain
        .expect_err("the example's queue has no arguments")
        .to_string();
    assert!(err.contains("PRECONDITION_FAILED"), "{err}");
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongLongInt(86_400_000));
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(100_000));
    ch.queue_declare(queue.into(), durable, args)
        .await
        .unwrap_or_else(|e| panic!("{queue} has other arguments: {e}"));
    let _ = conn.close(200, "done".into()).await;
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
    assert_inactive_threshold(&s, "example-reader").await;
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
    assert_bounded_queue(&queue).await;
    delete_queue(&queue).await;
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

/// The trace a webhook brings (W3C `traceparent`) in the traced tests.
const INCOMING_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const INCOMING_SPAN: &str = "00f067aa0ba902b7";

/// POSTs [`EVENTS`] with the `traceparent` of [`INCOMING_TRACE`].
async fn post_traced_events(app: &TestApp) {
    let body = webhook_body(1_700_000_000_123, &EVENTS);
    let req = hyper::Request::post(format!(
        "http://{}{}",
        app.addr, app.settings.server.webhook_path
    ))
    .header("X-Pusher-Key", APP_KEY)
    .header("X-Pusher-Signature", sign(APP_SECRET, body.as_bytes()))
    .header("Content-Type", "application/json")
    .header(
        "traceparent",
        format!("00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"),
    )
    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
    .unwrap();
    let answer = app.request(req).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body.contains(r#""published":3"#), "{}", answer.body);
}

/// With the bridge's tracing on, the example's span for each event continues the webhook's
/// trace as the child of that message's producer span: its line names the incoming trace id,
/// the span id of the message's `traceparent` (the producer span the OTLP receiver got) as its
/// parent, and a span id of its own.
async fn the_example_continues_the_trace(
    kind: BrokerKind,
    program: PathBuf,
    script: &str,
) -> Vec<serde_json::Value> {
    let receiver = Receiver::start().await;
    let mut s = settings_for(kind);
    s.tracing.otlp_endpoint = Some(SecretUrl::new(receiver.endpoint()));
    let app = TestApp::spawn_ready(s.clone()).await;
    let queue = format!("{}.traced", s.broker.amqp.queue);
    let env = match kind {
        BrokerKind::Nats => vec![
            ("NATS_URL", nats_url()),
            ("STREAM", s.broker.nats.stream.clone()),
            ("SUBJECT", format!("{}.>", s.broker.subject_prefix)),
            ("DURABLE", "traced-reader".into()),
            ("MAX_MESSAGES", "3".into()),
        ],
        _ => vec![
            ("AMQP_URL", crate::common::amqp_url()),
            ("EXCHANGE", s.broker.amqp.exchange.clone()),
            ("QUEUE", queue.clone()),
            ("BINDING", format!("{}.#", s.broker.subject_prefix)),
            ("MAX_MESSAGES", "3".into()),
        ],
    };
    let mut consumer = Consumer::start(&program, script, &env);
    if kind == BrokerKind::Amqp {
        assert_eq!(consumer.next().await["ready"], true);
    }
    post_traced_events(&app).await;
    let mut lines = Vec::new();
    for _ in 0..3 {
        lines.push(consumer.next().await);
    }
    consumer.finish().await;
    let stored = read_events(kind, &s, 3).await;
    assert_eq!(stored.len(), 3);
    let spans = receiver
        .spans_until(|s| s.iter().filter(|s| s.kind == 4).count() >= 3)
        .await;
    let mut own = std::collections::BTreeSet::new();
    for ((line, (event, _)), m) in lines.iter().zip(EXPECTED).zip(&stored) {
        assert_eq!(line["event"], event, "{line}");
        assert_eq!(line["id"].as_str(), m.msg_id.as_deref(), "{line}");
        let carried = m
            .header("traceparent")
            .unwrap_or_else(|| panic!("no traceparent: {m:?}"));
        let producer_span = carried.split('-').nth(2).unwrap();
        assert_eq!(carried, format!("00-{INCOMING_TRACE}-{producer_span}-01"));
        let producer = spans
            .iter()
            .find(|s| s.span_id == producer_span)
            .unwrap_or_else(|| panic!("no producer span {producer_span}: {spans:#?}"));
        assert_eq!(producer.kind, 4, "{producer:?}");
        assert_eq!(producer.trace_id, INCOMING_TRACE);
        let c = continuation(line);
        assert_eq!(c.trace, INCOMING_TRACE, "the webhook's trace: {line}");
        assert_eq!(
            c.parent.as_deref(),
            Some(producer_span),
            "the message's producer span: {line}"
        );
        assert!(
            spans.iter().all(|s| s.span_id != c.span),
            "a span of its own: {line}"
        );
        own.insert(c.span);
    }
    assert_eq!(own.len(), 3, "one span per event: {lines:?}");
    if kind == BrokerKind::Amqp {
        delete_queue(&queue).await;
    }
    app.stop().await;
    cleanup(kind, &s).await;
    lines
}

/// The line the README's `heading` section shows after its command running `script` is one the
/// example prints with the bridge's tracing on: the fields of its line for that event, and a
/// `trace` continuing [`INCOMING_TRACE`], the `traceparent` the README names.
fn assert_readme_shows(heading: &str, script: &str, lines: &[serde_json::Value]) {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no `{heading}` in the README"));
    let section = &readme[start + heading.len() + 2..];
    let section = &section[..section.find("\n#").unwrap_or(section.len())];
    assert!(
        section.contains(INCOMING_TRACE),
        "{heading} names the trace"
    );
    let code: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .collect();
    let shown = code
        .windows(2)
        .find(|w| w[0].contains(script) && w[1].starts_with('{'))
        .unwrap_or_else(|| panic!("{heading}: no command runs {script} followed by its line"))[1];
    let shown: serde_json::Value = serde_json::from_str(shown)
        .unwrap_or_else(|e| panic!("{heading}: not JSON ({e}): {shown}"));
    let printed = lines
        .iter()
        .find(|l| l["event"] == shown["event"])
        .unwrap_or_else(|| panic!("{heading}: the example printed no {shown}"));
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&shown), keys(printed), "{heading}: {shown}");
    for field in ["id", "app_id", "channel", "user_id", "redelivered"] {
        assert_eq!(
            shown[field], printed[field],
            "{heading}: {field} of {shown}"
        );
    }
    let c = continuation(&shown);
    assert_eq!(c.trace, INCOMING_TRACE, "{heading}: {shown}");
    assert!(c.parent.is_some(), "{heading}: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_nats_consumer_continues_the_trace() {
    if let Some(py) = python() {
        let script = "examples/python/nats_consumer.py";
        let lines = the_example_continues_the_trace(BrokerKind::Nats, py, script).await;
        assert_readme_shows("### Tracing", script, &lines);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_amqp_consumer_continues_the_trace() {
    if let Some(py) = python() {
        the_example_continues_the_trace(BrokerKind::Amqp, py, "examples/python/amqp_consumer.py")
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_nats_consumer_continues_the_trace() {
    if let Some(node) = node() {
        the_example_continues_the_trace(BrokerKind::Nats, node, "examples/node/nats_consumer.mjs")
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_amqp_consumer_continues_the_trace() {
    if let Some(node) = node() {
        let script = "examples/node/amqp_consumer.mjs";
        let lines = the_example_continues_the_trace(BrokerKind::Amqp, node, script).await;
        assert_readme_shows("### Consumers in Python and Node", script, &lines);
    }
}

/// Reads `n` lines from each of `consumers` and waits for each to stop.
async fn lines_of(consumers: Vec<Consumer>, n: usize) -> Vec<Vec<serde_json::Value>> {
    let mut all = Vec::new();
    for mut c in consumers {
        let mut lines = Vec::new();
        for _ in 0..n {
            lines.push(c.next().await);
        }
        c.finish().await;
        all.push(lines);
    }
    all
}

/// The examples' default names differ (`python-nats-example`, `node-nats-example`,
/// `python-amqp-example`, `node-amqp-example`), so two of them started side by side without
/// DURABLE / QUEUE each read every event: consumers sharing one name would split the events
/// between them (a work queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_left_to_their_default_names_each_read_every_event() {
    let (Some(py), Some(node)) = (python(), node()) else {
        return;
    };
    let s = settings_for(BrokerKind::Nats);
    let app = TestApp::spawn_ready(s.clone()).await;
    post_events(&app, 1_700_000_000_123).await;
    let stored = read_events(BrokerKind::Nats, &s, 3).await;
    let env = [
        ("NATS_URL", nats_url()),
        ("STREAM", s.broker.nats.stream.clone()),
        ("SUBJECT", format!("{}.>", s.broker.subject_prefix)),
        ("MAX_MESSAGES", "3".into()),
    ];
    let both = vec![
        Consumer::start(&py, "examples/python/nats_consumer.py", &env),
        Consumer::start(&node, "examples/node/nats_consumer.mjs", &env),
    ];
    for lines in lines_of(both, 3).await {
        assert_lines(&lines, &stored);
    }
    assert_inactive_threshold(&s, "python-nats-example").await;
    assert_inactive_threshold(&s, "node-nats-example").await;
    app.stop().await;
    cleanup(BrokerKind::Nats, &s).await;

    let s = settings_for(BrokerKind::Amqp);
    let app = TestApp::spawn_ready(s.clone()).await;
    let queues = ["python-amqp-example", "node-amqp-example"];
    let delete_queues = || async {
        let (conn, ch) = amqp_channel().await;
        for q in queues {
            let _ = ch.queue_delete(q.into(), Default::default()).await;
        }
        let _ = conn.close(200, "done".into()).await;
    };
    // A queue of that name left by an earlier run may hold its events.
    delete_queues().await;
    let env = [
        ("AMQP_URL", crate::common::amqp_url()),
        ("EXCHANGE", s.broker.amqp.exchange.clone()),
        ("BINDING", format!("{}.#", s.broker.subject_prefix)),
        ("MAX_MESSAGES", "3".into()),
    ];
    let mut both = vec![
        Consumer::start(&py, "examples/python/amqp_consumer.py", &env),
        Consumer::start(&node, "examples/node/amqp_consumer.mjs", &env),
    ];
    for c in &mut both {
        assert_eq!(c.next().await["ready"], true);
    }
    post_events(&app, 1_700_000_000_123).await;
    let stored = read_events(BrokerKind::Amqp, &s, 3).await;
    for lines in lines_of(both, 3).await {
        assert_lines(&lines, &stored);
    }
    for q in queues {
        assert_bounded_queue(q).await;
    }
    delete_queues().await;
    app.stop().await;
    cleanup(BrokerKind::Amqp, &s).await;
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

/// The CloudEvents example reads the `ce-` headers of the events of a bridge with
/// `broker.cloudevents = true`. With `plain_first`, three events without them (a bridge with
/// `cloudevents = false`) come first: the example skips them, saying why on stderr, and reads
/// the CloudEvents behind them.
async fn cloudevents_read_by_the_sdk(kind: BrokerKind, plain_first: bool) {
    let Some(py) = python() else { return };
    let mut s = settings_for(kind);
    s.broker.cloudevents = !plain_first;
    let mut app = TestApp::spawn_ready(s.clone()).await;
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
    let skipped = if plain_first { 3 } else { 0 };
    if plain_first {
        // Another time_ms: other message ids than the CloudEvents below.
        post_events(&app, 1_700_000_000_001).await;
        app.stop().await;
        s.broker.cloudevents = true;
        app = TestApp::spawn_ready(s.clone()).await;
    }
    post_events(&app, 1_700_000_000_123).await;
    let stored = read_events(kind, &s, skipped + 3).await;
    assert_eq!(stored.len(), skipped + 3);
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
    for (m, (event, channel)) in stored[skipped..].iter().zip(EXPECTED) {
        let line = consumer.next().await;
        assert_cloudevent(&line, m, event, channel);
        assert_eq!(m.header("ce-id"), m.msg_id.as_deref());
    }
    let stderr = consumer.stderr();
    consumer.finish().await;
    assert!(!stderr.contains("Traceback"), "{stderr}");
    let skips = stderr
        .lines()
        .filter(|l| l.contains("no ce- headers"))
        .count();
    assert_eq!(skips, skipped, "{stderr}");
    if plain_first {
        assert!(
            stderr.contains("broker.cloudevents = true")
                && stderr.contains("PUSHER_BRIDGE_BROKER__CLOUDEVENTS=true"),
            "{stderr}"
        );
    }
    match kind {
        BrokerKind::Nats => assert_inactive_threshold(&s, "ce-reader").await,
        BrokerKind::Amqp => {
            assert_bounded_queue(&queue).await;
            delete_queue(&queue).await;
        }
    }
    app.stop().await;
    cleanup(kind, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_sdk_reads_nats_events() {
    cloudevents_read_by_the_sdk(BrokerKind::Nats, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_sdk_reads_amqp_events() {
    cloudevents_read_by_the_sdk(BrokerKind::Amqp, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_example_skips_nats_events_without_ce_headers() {
    cloudevents_read_by_the_sdk(BrokerKind::Nats, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_example_skips_amqp_events_without_ce_headers() {
    cloudevents_read_by_the_sdk(BrokerKind::Amqp, true).await;
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
