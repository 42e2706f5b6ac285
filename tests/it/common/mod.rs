//! Test harness: spawns the bridge on port 0 against the real brokers of this machine (or
//! `NATS_URL` / `AMQP_URL`), with unique stream / exchange / queue / subject names per test, and
//! posts signed webhooks to it. `settings_for`, `read_events`, `read_dead_letters` and `cleanup`
//! take the broker kind, so one test body runs against both. `NatsServer` runs a private
//! `nats-server` on a free port for tests that must kill the broker; [`relay::Relay`] stands in
//! front of RabbitMQ for the AMQP tests that need it gone, frozen or behind TLS; [`amqp`] holds
//! the tests' own RabbitMQ connections, declarations, reads and clean-up.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the shared harness (`expect` would fail in the ones that use it all)"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pusher_bridge::config::{AppSettings, BrokerKind, Secret, SecretUrl, Settings};
use pusher_bridge::webhook::AppRegistry;
use tokio::sync::oneshot;

pub mod amqp;
pub mod deploy;
pub mod load;
pub mod nats_cluster;
pub mod otlp;
pub mod process;
pub mod rabbit_cluster;
pub mod relay;
pub mod state;

pub use self::amqp::*;

/// The app every test configures.
pub const APP_ID: &str = "123456";
/// Its key.
pub const APP_KEY: &str = "test-key";
/// Its secret.
pub const APP_SECRET: &str = "test-secret";

/// NATS URL for tests.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// AMQP URL for tests.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test (or test run) uses.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{tag}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        nanos % 100_000
    )
}

/// Settings for one NATS test: unique prefix and streams, one app.
pub fn nats_settings() -> Settings {
    let mut s = Settings::default();
    let id = unique("t");
    s.server.listen = "127.0.0.1:0".into();
    s.apps = vec![AppSettings {
        id: APP_ID.into(),
        key: APP_KEY.into(),
        secret: Secret::new(APP_SECRET),
        secret_file: None,
    }];
    s.broker.subject_prefix = id.to_lowercase();
    s.broker.nats.url = pusher_bridge::config::SecretUrl::new(nats_url());
    s.broker.nats.stream = format!("EV_{id}");
    s.broker.nats.dlq_stream = format!("DLQ_{id}");
    s.broker.nats.duplicate_window = Duration::from_secs(120);
    s.spool.dir = std::env::temp_dir().join(format!("pusher-bridge-{id}"));
    s
}

/// A running bridge.
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its settings.
    pub settings: Settings,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// An HTTP answer.
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Body text.
    pub body: String,
    /// The `Content-Type` header, when there is one.
    pub content_type: Option<String>,
}

impl TestApp {
    /// Spawns the bridge with `settings` on a free port and waits until /healthz answers.
    pub async fn spawn(settings: Settings) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let s = settings.clone();
        let handle = tokio::spawn(async move {
            pusher_bridge::run(listener, s, async {
                let _ = rx.await;
            })
            .await
            .expect("bridge failed");
        });
        let app = Self {
            addr,
            settings,
            shutdown: Some(tx),
            handle: Some(handle),
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        for _ in 0..200 {
            if app.get("/healthz").await.status == StatusCode::OK {
                return app;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("bridge did not come up");
    }

    /// Talks to a bridge running elsewhere (another process) at `addr`; `stop` does nothing.
    pub fn attach(addr: SocketAddr, settings: Settings) -> Self {
        Self {
            addr,
            settings,
            shutdown: None,
            handle: None,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Spawns and waits until /readyz says ready (broker connected, streams declared).
    pub async fn spawn_ready(settings: Settings) -> Self {
        let app = Self::spawn(settings).await;
        app.wait_ready().await;
        app
    }

    /// Waits until /readyz is 200 and the broker is connected (with a spool, /readyz is 200
    /// before the broker is).
    pub async fn wait_ready(&self) {
        for _ in 0..500 {
            if self.get("/readyz").await.status == StatusCode::OK
                && self.metric("pusher_bridge_broker_up").await == 1.0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("bridge not ready");
    }

    /// GET a path.
    pub async fn get(&self, path: &str) -> Answer {
        self.request(
            Request::get(format!("http://{}{path}", self.addr))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }

    /// Sends any request.
    pub async fn request(&self, req: Request<Full<Bytes>>) -> Answer {
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .expect("request timed out")
            .expect("request failed");
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            content_type,
        }
    }

    /// POSTs `body` to the webhook path, signed with the test app's key.
    pub async fn post_signed(&self, body: &str) -> Answer {
        let sig = sign(APP_SECRET, body.as_bytes());
        self.post_with(body, Some(APP_KEY), Some(&sig), Some("application/json"))
            .await
    }

    /// POSTs `body` with the given headers (None leaves one out).
    pub async fn post_with(
        &self,
        body: &str,
        key: Option<&str>,
        sig: Option<&str>,
        content_type: Option<&str>,
    ) -> Answer {
        let mut req = Request::post(format!(
            "http://{}{}",
            self.addr, self.settings.server.webhook_path
        ));
        if let Some(k) = key {
            req = req.header("X-Pusher-Key", k);
        }
        if let Some(s) = sig {
            req = req.header("X-Pusher-Signature", s);
        }
        if let Some(c) = content_type {
            req = req.header("Content-Type", c);
        }
        self.request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
            .await
    }

    /// The value of a metric line that starts with `prefix` (0 if absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = self.get("/metrics").await.body;
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Stops the bridge, waits for it, and removes its spool directory when it is a test's
    /// temporary one.
    pub async fn stop(self) {
        let dir = self.settings.spool.dir.clone();
        self.stop_keeping_spool().await;
        let temp = std::env::temp_dir().join("pusher-bridge-");
        if dir.to_string_lossy().starts_with(&*temp.to_string_lossy()) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Stops the bridge and waits for it; its spool stays (for a restart on the same spool).
    pub async fn stop_keeping_spool(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), h).await;
        }
    }
}

/// HMAC-SHA256 hex of `body` under `secret`, as Pusher signs.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let reg = AppRegistry::new(&[AppSettings {
        id: "x".into(),
        key: "x".into(),
        secret: Secret::new(secret),
        secret_file: None,
    }]);
    reg.get("x").unwrap().sign(body)
}

/// A webhook body holding `events` (JSON objects as text).
pub fn webhook_body(time_ms: u64, events: &[&str]) -> String {
    format!(r#"{{"time_ms":{time_ms},"events":[{}]}}"#, events.join(","))
}

/// One sample of every event type Pusher sends, plus an unknown one.
pub fn every_event_type() -> Vec<&'static str> {
    vec![
        r#"{"name":"channel_occupied","channel":"private-a.b"}"#,
        r#"{"name":"channel_vacated","channel":"public-news"}"#,
        r#"{"name":"member_added","channel":"presence-room-1","user_id":"u1"}"#,
        r#"{"name":"member_removed","channel":"presence-room-1","user_id":"u1"}"#,
        r#"{"name":"client_event","channel":"private-chat","event":"client-typing","data":"{\"t\":1}","socket_id":"123.456"}"#,
        r#"{"name":"cache_miss","channel":"cache-prices","data":"{}"}"#,
        r#"{"name":"subscription_count","channel":"public-news","subscription_count":7}"#,
        r#"{"name":"member_updated","channel":"presence-room-1","user_id":"u1","extra":{"n":[1,2.5,null]}}"#,
    ]
}

/// JetStream context on the test NATS.
pub async fn jetstream_ctx(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.expect("connect NATS");
    jetstream::new(client)
}

/// A stored stream message, decoded for assertions.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Subject.
    pub subject: String,
    /// Headers as (name, value).
    pub headers: Vec<(String, String)>,
    /// Body as JSON.
    pub body: serde_json::Value,
    /// Raw body.
    pub raw: Bytes,
    /// The message id (`Nats-Msg-Id` header / AMQP `message_id` property).
    pub msg_id: Option<String>,
    /// The content type (`Content-Type` header / AMQP `content_type` property).
    pub content_type: Option<String>,
}

impl Stored {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The event's channel, from its body (empty when it has none).
    pub fn channel(&self) -> &str {
        self.body["channel"].as_str().unwrap_or_default()
    }
}

/// Every message of `stream`, in order (waits up to 2 s for at least `min` of them).
pub async fn stream_messages(js: &jetstream::Context, stream: &str, min: usize) -> Vec<Stored> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let mut s = js.get_stream(stream).await.expect("stream exists");
        let info = s.info().await.unwrap().clone();
        if info.state.messages as usize >= min || tokio::time::Instant::now() > deadline {
            let mut out = Vec::new();
            if info.state.messages == 0 {
                return out;
            }
            for seq in info.state.first_sequence..=info.state.last_sequence {
                let Ok(m) = s.get_raw_message(seq).await else {
                    continue;
                };
                let headers = m
                    .headers
                    .iter()
                    .flat_map(|(k, vs)| {
                        vs.iter()
                            .map(move |v| (k.to_string(), v.as_str().to_string()))
                    })
                    .collect();
                let header = |name: &str| {
                    m.headers
                        .get(name)
                        .map(|v: &async_nats::HeaderValue| v.as_str().to_string())
                };
                out.push(Stored {
                    subject: m.subject.to_string(),
                    msg_id: header("Nats-Msg-Id"),
                    content_type: header("Content-Type"),
                    headers,
                    body: serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null),
                    raw: m.payload.clone(),
                });
            }
            return out;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `within` until `stream` holds at least `n` messages; the count it saw last.
pub async fn wait_stream_count(
    js: &jetstream::Context,
    stream: &str,
    n: u64,
    within: Duration,
) -> u64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let count = match js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        if count >= n || tokio::time::Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The version of the NATS server `js` is connected to.
pub fn server_version(js: &jetstream::Context) -> pusher_bridge::broker::nats::ServerVersion {
    let text = js.client().server_info().version;
    pusher_bridge::broker::nats::ServerVersion::parse(&text)
        .unwrap_or_else(|| panic!("a server version: {text:?}"))
}

/// A JetStream API request as raw JSON (`api` without `$JS.API.`); panics on an error answer.
pub async fn js_api(
    js: &jetstream::Context,
    api: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let reply: serde_json::Value = js
        .request(api.to_string(), &body)
        .await
        .expect("JetStream answers");
    assert!(reply.get("error").is_none(), "{api}: {reply}");
    reply
}

/// A stream's config exactly as the server describes it.
pub async fn stream_config_json(
    js: &jetstream::Context,
    stream: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let info = js_api(js, &format!("STREAM.INFO.{stream}"), serde_json::json!({})).await;
    info["config"].as_object().expect("a config").clone()
}

/// Deletes the test's streams (and the sweeper's KV buckets, which a running bridge creates).
pub async fn delete_streams(js: &jetstream::Context, settings: &Settings) {
    let _ = js.delete_stream(&settings.broker.nats.stream).await;
    let _ = js.delete_stream(&settings.broker.nats.dlq_stream).await;
    let _ = js
        .delete_key_value(pusher_bridge::sweeper::lease_bucket(settings))
        .await;
    let _ = js
        .delete_key_value(pusher_bridge::sweeper::cursor_bucket(settings))
        .await;
}

/// A private `nats-server` with JetStream (unless started without) on a free port and its own
/// store directory.
pub struct NatsServer {
    /// Port it listens on.
    pub port: u16,
    /// Store directory.
    pub dir: PathBuf,
    /// Extra command-line arguments (auth, TLS), passed on every (re)start.
    pub args: Vec<String>,
    /// Started with `-js` (the default).
    pub jetstream: bool,
    child: Option<std::process::Child>,
}

impl NatsServer {
    /// Starts one and waits until it accepts connections.
    pub async fn start() -> Self {
        Self::start_on(server_port()).await
    }

    /// Starts one on `port`.
    pub async fn start_on(port: u16) -> Self {
        Self::start_with_args(port, &[]).await
    }

    /// Starts one on `port` with extra `nats-server` arguments (e.g. `--user u --pass p`).
    pub async fn start_with_args(port: u16, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(unique("nats-store"));
        let mut s = Self {
            port,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            jetstream: true,
            child: None,
        };
        s.restart().await;
        s
    }

    /// Starts one on `port` without JetStream (no `-js`): core NATS answers, the JetStream API
    /// does not.
    pub async fn start_without_jetstream(port: u16) -> Self {
        let mut s = Self {
            port,
            dir: std::env::temp_dir().join(unique("nats-store")),
            args: Vec::new(),
            jetstream: false,
            child: None,
        };
        s.restart().await;
        s
    }

    /// URL to connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store (after [`NatsServer::kill`]).
    pub async fn restart(&mut self) {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = std::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(if self.jetstream { &["-js"][..] } else { &[] })
            .arg("-sd")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("nats-server did not start");
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free TCP port for a server a test kills and starts again on the same port: below the
/// kernel's ephemeral range (32768 and up here), so that while the server is down no client
/// connection of the machine can be given that port as its local end (which made a restarted
/// cluster node fail to listen now and then). Spread by process id and a counter, checked free.
pub fn server_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 10_000 + (std::process::id() % 1000) * 22;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (base + n * 7919 % 22_000) % 22_000 + 10_000;
        let port = u16::try_from(port).unwrap_or(10_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Subscribes to a core NATS subject (for live-delivery checks).
pub async fn subscribe(url: &str, subject: &str) -> async_nats::Subscriber {
    let c = async_nats::connect(url).await.unwrap();
    let sub = c.subscribe(subject.to_string()).await.unwrap();
    c.flush().await.unwrap();
    sub
}

/// Next message of a subscriber within 2 s.
pub async fn next_msg(sub: &mut async_nats::Subscriber) -> Option<async_nats::Message> {
    tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .ok()
        .flatten()
}

// ---------------------------------------------------------------------------------------------
// Both brokers: the shared contract tests take a `BrokerKind` and use these.

tokio::task_local! {
    /// The `broker.amqp.queue_type` that [`settings_for`] configures inside
    /// `AMQP_QUEUE_TYPE.scope(..)` (the contract suite runs on quorum queues too); classic
    /// outside any scope.
    pub static AMQP_QUEUE_TYPE: pusher_bridge::config::QueueType;
}

/// One `#[tokio::test]` per broker for each shared test body (an `async fn NAME(kind:
/// BrokerKind)` of the calling module): `nats::NAME`, `amqp::NAME`, and `amqp_quorum::NAME`
/// with `broker.amqp.queue_type = "quorum"` (inside an [`AMQP_QUEUE_TYPE`] scope).
macro_rules! per_broker {
    ($($name:ident),* $(,)?) => {
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(pusher_bridge::config::BrokerKind::Nats).await
                }
            )*
        }
        mod amqp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(pusher_bridge::config::BrokerKind::Amqp).await
                }
            )*
        }
        mod amqp_quorum {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    crate::common::AMQP_QUEUE_TYPE
                        .scope(
                            pusher_bridge::config::QueueType::Quorum,
                            super::$name(pusher_bridge::config::BrokerKind::Amqp),
                        )
                        .await
                }
            )*
        }
    };
}
pub(crate) use per_broker;

/// Settings for one test against `kind`: unique prefix, streams / exchanges / queues and AMQP
/// connection name, one app.
pub fn settings_for(kind: BrokerKind) -> Settings {
    let mut s = nats_settings();
    if kind == BrokerKind::Amqp {
        let id = s.broker.subject_prefix.clone();
        s.broker.kind = BrokerKind::Amqp;
        s.broker.amqp.url = SecretUrl::new(amqp_url());
        s.broker.amqp.exchange = format!("ev.{id}");
        s.broker.amqp.queue = format!("ev.{id}");
        s.broker.amqp.dlq_exchange = format!("dlq.{id}");
        s.broker.amqp.dlq_queue = format!("dlq.{id}");
        s.broker.amqp.connection_name = format!("pusher-bridge-test-{id}");
        s.broker.amqp.queue_type = AMQP_QUEUE_TYPE.try_with(|t| *t).unwrap_or_default();
    }
    s
}

/// `settings` pointed at a port where no broker listens.
pub fn unreachable(kind: BrokerKind, settings: &mut Settings) {
    let port = free_port();
    match kind {
        BrokerKind::Nats => {
            settings.broker.nats.url = SecretUrl::new(format!("nats://127.0.0.1:{port}"))
        }
        BrokerKind::Amqp => {
            settings.broker.amqp.url =
                SecretUrl::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
        }
    }
}

/// The events stored by the bridge of `settings` (waits up to 2 s for at least `min`). On
/// AMQP the messages are taken off the queue (`basic.get`), so read each queue once.
pub async fn read_events(kind: BrokerKind, settings: &Settings, min: usize) -> Vec<Stored> {
    match kind {
        BrokerKind::Nats => {
            let js = jetstream_ctx(&nats_url()).await;
            stream_messages(&js, &settings.broker.nats.stream, min).await
        }
        BrokerKind::Amqp => amqp::stored(&settings.broker.amqp.queue, min).await,
    }
}

/// The dead letters stored by the bridge of `settings` (as [`read_events`]).
pub async fn read_dead_letters(kind: BrokerKind, settings: &Settings, min: usize) -> Vec<Stored> {
    match kind {
        BrokerKind::Nats => {
            let js = jetstream_ctx(&nats_url()).await;
            stream_messages(&js, &settings.broker.nats.dlq_stream, min).await
        }
        BrokerKind::Amqp => amqp::stored(&settings.broker.amqp.dlq_queue, min).await,
    }
}

/// Deletes what the test's bridge declared.
pub async fn cleanup(kind: BrokerKind, settings: &Settings) {
    match kind {
        BrokerKind::Nats => delete_streams(&jetstream_ctx(&nats_url()).await, settings).await,
        BrokerKind::Amqp => amqp_delete(settings).await,
    }
}
