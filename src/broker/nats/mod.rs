//! NATS JetStream: connection (auth, TLS, reconnect), the events and dead-letter streams, and
//! publishing with `Nats-Msg-Id` so JetStream drops a redelivered webhook's duplicates.
//!
//! The client connects in the background (`retry_on_initial_connect`), so the bridge serves
//! `/healthz` before NATS is reachable. Every time the connection comes up, the topology task
//! makes sure both streams exist; the broker counts as up only once they do.

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_nats::{Client, ConnectOptions, Event, HeaderMap};
use tokio::sync::{Notify, watch};

use super::BrokerTasks;
use super::connection_log::{ConnectionLog, WARN_EVERY};
use super::status::{BrokerStatus, StatusCell};
use super::{BrokerError, DeadLetter, DlqReason, Message, PublishError, cloudevents};
use crate::backoff::Backoff;
use crate::config::servers;
use crate::config::url_auth;
use crate::config::{NatsSettings, Settings};
use crate::metrics::Metrics;
use crate::retention::{Target, TtlRules};
use crate::routing;
use crate::shutdown::Shutdown;

mod classify;
pub(crate) mod streams;
pub mod version;

use streams::{Owned, StreamSpec};
pub use version::ServerVersion;

use classify::classify;
pub(crate) use classify::is_wrong_last_sequence;

/// The NATS JetStream broker.
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The connection is established (set by the client's event callback).
    connected: Arc<AtomicBool>,
    /// Both streams exist (or `declare = false`) since the last (re)connect.
    topology_ready: Arc<AtomicBool>,
    /// What the client and the topology task last learned about the connection (for
    /// [`NatsBroker::status`]).
    status: Arc<StatusCell>,
    /// Both streams have been declared at least once (from the start with `declare = false`):
    /// side tasks that need them (the state applier) wait for it instead of polling.
    streams_ready: watch::Receiver<bool>,
    /// Set when the server cannot do what the configuration asks (per-message TTLs on a
    /// server older than 2.11): the bridge stops with this error.
    fatal: watch::Receiver<Option<String>>,
    prefix: String,
    settings: NatsSettings,
    /// How long the JetStream context waits for an ack (`broker.publish_timeout`).
    ack_timeout: Duration,
    /// `broker.cloudevents`: event messages carry `ce-` headers.
    cloudevents: bool,
    /// Per-message TTLs (`retention.<target>.method = "message_ttl"`).
    ttl: Ttls,
    /// The topology loop, under the broker's own supervisor (stopped and awaited on close).
    tasks: BrokerTasks,
    /// With `declare = true`: wakes the topology loop when a stream of the bridge is found
    /// missing, so it is declared again rather than every event dead-lettered as `no_stream`.
    redeclare: Option<Arc<Notify>>,
    metrics: Arc<Metrics>,
}

/// Pauses between reconnects: 50 ms doubling up to 2 s.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
/// Pauses between attempts to declare the streams: 100 ms doubling up to 5 s.
const DECLARE_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Builds the connect options (auth and TLS) from `[broker.nats]`.
pub(crate) async fn connect_options(s: &NatsSettings) -> Result<ConnectOptions, BrokerError> {
    let mut opts = ConnectOptions::new()
        .name("pusher-bridge")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(10))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            // Fast first retries (a broker restart), capped at 2 s, jittered so replicas do
            // not reconnect in lockstep.
            RECONNECT.delay(
                u32::try_from(attempts)
                    .unwrap_or(u32::MAX)
                    .saturating_add(1),
            )
        });
    if let Some(path) = &s.creds_file {
        opts = opts.credentials_file(path).await.map_err(|e| {
            BrokerError::connect(format!("cannot read creds file {}", path.display()), e)
        })?;
    }
    if let (Some(user), Some(pass)) = (&s.user, &s.password) {
        opts = opts.user_and_password(user.clone(), pass.expose().to_string());
    }
    if let Some(token) = &s.token {
        opts = opts.token(token.expose().to_string());
    }
    if s.user.is_none() && s.token.is_none() && s.creds_file.is_none() {
        // Credentials in the URL itself, which async-nats does not send on its own.
        match url_auth::url_credentials(s.url.expose()) {
            Some(url_auth::UrlCredentials::UserPassword(user, pass)) => {
                opts = opts.user_and_password(user, pass);
            }
            Some(url_auth::UrlCredentials::Token(token)) => opts = opts.token(token),
            None => {}
        }
    }
    if let Some(ca) = &s.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if s.tls_required {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

/// Connects `opts` to every server of `broker.nats.url`. Returns at once: the client connects
/// in the background and reconnects (`retry_on_initial_connect`).
async fn connect_with(s: &NatsSettings, opts: ConnectOptions) -> Result<Client, BrokerError> {
    let servers = servers::server_addrs(s.url.expose())
        .map_err(|e| BrokerError::connect("broker.nats.url", e))?;
    opts.connect(servers)
        .await
        .map_err(|e| BrokerError::connect(s.url.redacted(), e))
}

/// The one way the tools and side tasks (`dlq`, the sweeper, the channel state) reach NATS:
/// the bridge's auth, TLS and server list, under their own connection `name`, connecting in
/// the background like the bridge. Tools that need the server now call [`wait_connected`].
pub(crate) async fn connect_client(s: &NatsSettings, name: &str) -> Result<Client, BrokerError> {
    connect_with(s, connect_options(s).await?.name(name)).await
}

/// Waits up to `wait` for `client`'s connection, so a wrong URL or a server that is down is an
/// error instead of a hang.
pub(crate) async fn wait_connected(
    client: &Client,
    s: &NatsSettings,
    wait: Duration,
) -> Result<(), BrokerError> {
    let deadline = tokio::time::Instant::now() + wait;
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() >= deadline {
            return Err(BrokerError::connect_msg(format!(
                "no connection to NATS at {} within {wait:?}",
                s.url.redacted()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// What a failed connect attempt says about the server. async-nats reports only the kind of
/// failure (`authorization violation`, `failed signing nonce`, `TLS error`, `timed out`,
/// `IO error`, `DNS error`): the first three mean the server answered and refused the bridge,
/// the others that nothing answered.
fn connect_failure(e: &async_nats::ClientError) -> BrokerStatus {
    let words = match e {
        async_nats::ClientError::Other(words) => words.clone(),
        other => other.to_string(),
    };
    let lower = words.to_ascii_lowercase();
    if ["authorization", "authentication", "signing nonce", "tls"]
        .iter()
        .any(|w| lower.contains(w))
    {
        BrokerStatus::Refused(words)
    } else {
        BrokerStatus::Unreachable(words)
    }
}

/// The events and dead-letter streams as the bridge declares them: its subject filter, the
/// duplicate window and replicas at least as configured, file storage when it creates them,
/// and per-message TTLs on where `retention.<target>.method = "message_ttl"`.
fn stream_specs(prefix: &str, s: &NatsSettings, ttl: &Ttls) -> [StreamSpec; 2] {
    let spec = |name: &str, subject: String, allow_msg_ttl: bool| {
        let create = stream::Config {
            name: name.to_string(),
            subjects: vec![subject.clone()],
            duplicate_window: s.duplicate_window,
            num_replicas: s.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let owned = Owned {
            subjects: vec![subject],
            duplicate_window: Some(s.duplicate_window),
            replicas: s.replicas,
            allow_msg_ttl,
            ..Owned::default()
        };
        StreamSpec::new(&create, owned)
    };
    [
        spec(&s.stream, format!("{prefix}.>"), ttl.events.is_some()),
        spec(
            &s.dlq_stream,
            format!("{}.>", routing::dlq_prefix(prefix)),
            ttl.dlq.is_some(),
        ),
    ]
}

/// The per-message TTLs of each target (`None`: that target is swept, its messages carry none).
#[derive(Clone, Debug, Default)]
pub(crate) struct Ttls {
    events: Option<TtlRules>,
    dlq: Option<TtlRules>,
}

impl Ttls {
    pub(crate) fn of(settings: &Settings) -> Self {
        Self {
            events: TtlRules::for_target(settings, Target::Events),
            dlq: TtlRules::for_target(settings, Target::Dlq),
        }
    }

    /// The config key and stream of each target that needs per-message TTLs.
    fn needed<'a>(&self, s: &'a NatsSettings) -> Vec<(&'static str, &'a str)> {
        let mut out = Vec::new();
        if self.events.is_some() {
            out.push(("retention.events.method", s.stream.as_str()));
        }
        if self.dlq.is_some() {
            out.push(("retention.dlq.method", s.dlq_stream.as_str()));
        }
        out
    }
}

impl NatsBroker {
    /// Starts connecting; returns at once.
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self, BrokerError> {
        let s = settings.broker.nats.clone();
        let connected = Arc::new(AtomicBool::new(false));
        let status = Arc::new(StatusCell::default());
        // Ready at once only when there is nothing to declare or check first: with per-message
        // TTLs the server's version and the streams' `allow_msg_ttl` are checked before any
        // event is published with a `Nats-TTL`.
        let ttl = Ttls::of(settings);
        let ready_at_start = !settings.broker.declare && ttl.needed(&s).is_empty();
        let topology_ready = Arc::new(AtomicBool::new(ready_at_start));
        let reconnected = Arc::new(Notify::new());
        let log = Arc::new(ConnectionLog::new(
            "NATS",
            "nats",
            s.url.redacted(),
            metrics.clone(),
        ));
        let opts = {
            let connected = connected.clone();
            let status = status.clone();
            let topology_ready = topology_ready.clone();
            let reconnected = reconnected.clone();
            let metrics = metrics.clone();
            let declare = settings.broker.declare;
            connect_options(&s).await?.event_callback(move |event| {
                let connected = connected.clone();
                let status = status.clone();
                let topology_ready = topology_ready.clone();
                let reconnected = reconnected.clone();
                let metrics = metrics.clone();
                let log = log.clone();
                async move {
                    match event {
                        Event::Connected => {
                            connected.store(true, Ordering::SeqCst);
                            // Up once the topology task has checked JetStream and declared.
                            status.set(if topology_ready.load(Ordering::SeqCst) {
                                BrokerStatus::Up
                            } else {
                                BrokerStatus::Connecting
                            });
                            reconnected.notify_one();
                            metrics.set_broker_up(topology_ready.load(Ordering::SeqCst));
                            log.connected();
                        }
                        Event::Disconnected | Event::Closed => {
                            connected.store(false, Ordering::SeqCst);
                            if declare {
                                topology_ready.store(false, Ordering::SeqCst);
                            }
                            metrics.set_broker_up(false);
                            status.set(BrokerStatus::Unreachable("connection lost".into()));
                            log.disconnected(None);
                        }
                        // Failed (re)connection attempts: async-nats retries on its own.
                        Event::ClientError(e) => {
                            status.set(connect_failure(&e));
                            log.connect_failed(&e);
                        }
                        _ => {}
                    }
                }
            })
        };
        let client = connect_with(&s, opts).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(settings.broker.publish_timeout)
            .max_ack_inflight(settings.broker.max_in_flight.max(1))
            .build(client.clone());
        let prefix = settings.broker.subject_prefix.clone();
        let (ready_tx, streams_ready) = watch::channel(ready_at_start);
        let (fatal_tx, fatal) = watch::channel(None);
        let metrics_for_tasks = metrics.clone();
        let topology = Topology {
            js: js.clone(),
            declare: settings.broker.declare,
            specs: stream_specs(&prefix, &s, &ttl),
            ttl_streams: ttl
                .needed(&s)
                .into_iter()
                .map(|(key, stream)| (key, stream.to_string()))
                .collect(),
            url: s.url.redacted(),
            connected: connected.clone(),
            status: status.clone(),
            ready: topology_ready.clone(),
            ready_tx,
            fatal: fatal_tx,
            metrics,
        };
        let tasks = BrokerTasks::new(metrics_for_tasks.clone());
        let topology = Arc::new(topology);
        let redeclare = settings.broker.declare.then(|| reconnected.clone());
        tasks.spawn(crate::metrics::task::NATS_TOPOLOGY, move |shutdown| {
            topology.clone().run(reconnected.clone(), shutdown)
        });
        Ok(Self {
            client,
            js,
            connected,
            status,
            topology_ready,
            streams_ready,
            fatal,
            prefix,
            settings: s,
            ack_timeout: settings.broker.publish_timeout,
            cloudevents: settings.broker.cloudevents,
            ttl,
            tasks,
            redeclare,
            metrics: metrics_for_tasks,
        })
    }

    /// Waits until both streams exist (at once with `declare = false`).
    pub(crate) async fn streams_ready(&self) {
        let mut ready = self.streams_ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Resolves when the server cannot do what the configuration asks (then the bridge stops
    /// with this error); pending for ever otherwise.
    pub(crate) async fn fatal(&self) -> BrokerError {
        let mut fatal = self.fatal.clone();
        let why = fatal.wait_for(Option::is_some).await.map(|why| why.clone());
        match why {
            Ok(why) => BrokerError::Unsupported(why.unwrap_or_default()),
            // The topology task ended without a verdict (on close): nothing to report.
            Err(_) => std::future::pending().await,
        }
    }

    /// The broker's own loops that are down right now.
    pub(crate) fn tasks_down(&self) -> Vec<&'static str> {
        self.tasks.down()
    }

    /// Up, or why not: what the client's last connect attempt said, or the topology task's
    /// JetStream check and declaration.
    pub(crate) fn status(&self) -> BrokerStatus {
        if self.is_up() {
            BrokerStatus::Up
        } else {
            self.status.not_up()
        }
    }

    /// Connected and both streams known to exist.
    pub fn is_up(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.client.connection_state() == async_nats::connection::State::Connected
            && self.topology_ready.load(Ordering::SeqCst)
    }

    /// The JetStream context (dead-letter tools and the sweeper use it).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The core client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// `[broker.nats]` as configured.
    pub fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    /// The subject prefix of events.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Publishes one event; `Ok` once JetStream has stored it (or recognised a duplicate).
    pub async fn publish(&self, msg: &Message, timeout: Duration) -> Result<(), PublishError> {
        self.send(
            msg.subject.clone(),
            self.headers_of(msg),
            msg.body.clone(),
            timeout,
        )
        .await
    }

    /// An event's headers ([`event_headers`]) and, with per-message TTLs, its `Nats-TTL`.
    fn headers_of(&self, msg: &Message) -> HeaderMap {
        let mut h = event_headers(msg, self.cloudevents);
        if let Some(rules) = &self.ttl.events {
            h.insert(
                NATS_TTL,
                rules.ttl(&msg.app_id, Some(&msg.event)).header_value(),
            );
        }
        h
    }

    /// Publishes `msgs` in their order: each is handed to the connection before the next, then
    /// all acks are awaited together, so the stream stores them in this order. After the first
    /// one that cannot be sent, the rest are not sent (`Unavailable`), so none overtakes it.
    pub(crate) async fn publish_in_order(
        &self,
        msgs: &[&Message],
        timeout: Duration,
    ) -> Vec<Result<(), PublishError>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending = Vec::with_capacity(msgs.len());
        let mut stopped = false;
        for m in msgs {
            if stopped || !self.is_up() {
                stopped = true;
                pending.push(Err(PublishError::Unavailable(
                    "not sent: an earlier event could not be".into(),
                )));
                continue;
            }
            if let Err(e) = check_subject(&m.subject) {
                // Refused for good without being sent: the events behind it go on.
                pending.push(Err(e));
                continue;
            }
            let publish = PublishMessage::build()
                .payload(m.body.clone())
                .headers(self.headers_of(m));
            let sent =
                tokio::time::timeout_at(deadline, self.js.send_publish(m.subject.clone(), publish))
                    .await;
            pending.push(match sent {
                Ok(Ok(ack)) => Ok(ack),
                Ok(Err(e)) => Err(classify(e)),
                Err(_) => Err(PublishError::Unavailable("no ack in time".into())),
            });
            stopped = matches!(pending.last(), Some(Err(e)) if e.is_transient());
        }
        futures::future::join_all(pending.into_iter().zip(msgs).map(|(p, m)| async move {
            match tokio::time::timeout_at(deadline, p?).await {
                Err(_) => Err(PublishError::Unavailable("no ack in time".into())),
                Ok(Ok(_ack)) => Ok(()),
                Ok(Err(e)) => Err(self.judge(&m.subject, e).await),
            }
        }))
        .await
    }

    /// Whether one of the bridge's streams takes `subject` once declared: the events stream
    /// takes `<prefix>.>`, the dead-letter stream `<prefix>_dlq.>`. A subject outside both
    /// would not be helped by declaring them again.
    fn owns(&self, subject: &str) -> bool {
        let under = |root: &str| {
            subject
                .strip_prefix(root)
                .is_some_and(|rest| rest.starts_with('.'))
        };
        under(&self.prefix) || under(&format!("{}_dlq", self.prefix))
    }

    /// A failed publish to `subject`, judged: no responders is `no_stream` only when the
    /// JetStream API confirms that no stream takes the subject. With `declare = true` the
    /// bridge owns its streams: a missing one (an operator deleted it) is declared again, and
    /// the event waits for it (`Unavailable`: spooled, then drained) instead of being
    /// dead-lettered.
    async fn judge(&self, subject: &str, e: jetstream::context::PublishError) -> PublishError {
        match (
            classify::confirm(&self.js, subject, classify(e)).await,
            &self.redeclare,
        ) {
            (
                PublishError::Refused {
                    reason: DlqReason::NoStream,
                    detail,
                },
                Some(wake),
            ) if self.owns(subject) => {
                if self.topology_ready.swap(false, Ordering::SeqCst) {
                    tracing::warn!(
                        stream = %self.settings.stream,
                        dlq_stream = %self.settings.dlq_stream,
                        %subject,
                        %detail,
                        "a stream of the bridge is gone (deleted?): declaring it again; events wait on the spool meanwhile"
                    );
                    self.metrics.set_broker_up(false);
                    wake.notify_one();
                }
                PublishError::Unavailable(format!(
                    "{detail}; the bridge declares its streams again"
                ))
            }
            (judged, _) => judged,
        }
    }

    /// Publishes one dead letter to `<prefix>_dlq.<app>.<reason>`.
    pub async fn publish_dead_letter(
        &self,
        dl: &DeadLetter,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let m = &dl.message;
        let mut h = event_headers(m, false);
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            super::dead_letter_id(&m.msg_id).as_str(),
        );
        for (name, value) in dl.headers() {
            h.insert(name, value);
        }
        if let Some(rules) = &self.ttl.dlq {
            h.insert(NATS_TTL, rules.ttl(&m.app_id, None).header_value());
        }
        let subject = routing::dlq_subject(&self.prefix, &m.app_id, dl.reason.as_str());
        self.send(subject, h, m.body.clone(), timeout).await
    }

    async fn send(
        &self,
        subject: String,
        h: HeaderMap,
        body: bytes::Bytes,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        check_subject(&subject)?;
        if !self.is_up() {
            return Err(PublishError::Unavailable("not connected to NATS".into()));
        }
        let started = tokio::time::Instant::now();
        let no_ack = || PublishError::Unavailable("no ack in time".into());
        let publish = PublishMessage::build().payload(body).headers(h);
        // Queueing is immediate unless the client's command channel is full: only then does
        // this timeout arm a timer.
        let ack = tokio::time::timeout(timeout, self.js.send_publish(subject.clone(), publish))
            .await
            .map_err(|_| no_ack())?
            .map_err(classify)?;
        let remaining = timeout.saturating_sub(started.elapsed());
        // The ack future has its own timer (`broker.publish_timeout`, set on the context); a
        // second one is armed only when less time than that is left.
        let acked = if remaining >= self.ack_timeout {
            ack.await
        } else {
            tokio::time::timeout(remaining, ack.into_future())
                .await
                .map_err(|_| no_ack())?
        };
        match acked {
            Ok(_) => Ok(()),
            Err(e) => Err(self.judge(&subject, e).await),
        }
    }

    /// Flushes pending publishes and stops the topology task.
    pub async fn close(&self) {
        self.tasks.stop().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

/// Header names built once: a `HeaderName` from a `&str` is validated and copied on every insert.
const CONTENT_TYPE: HeaderName = HeaderName::from_static("Content-Type");
/// A message's own time to live (NATS 2.11+, on a stream with `allow_msg_ttl`).
const NATS_TTL: HeaderName = HeaderName::from_static("Nats-TTL");

/// The longest subject the bridge hands to NATS. nats-server reads a publish's control line
/// (`HPUB <subject> <reply inbox> <header size> <total size>`) into a 4,096-byte buffer and
/// drops the connection of a client whose line is longer, which would break every publish in
/// flight beside it and, for a spooled event, every drain after it. 256 bytes are left for the
/// reply inbox and the sizes.
pub(crate) const MAX_SUBJECT_BYTES: usize = 4096 - 256;

/// A subject NATS cannot take is refused for good (`too_large`) before it is sent.
fn check_subject(subject: &str) -> Result<(), PublishError> {
    if subject.len() > MAX_SUBJECT_BYTES {
        return Err(PublishError::Refused {
            reason: DlqReason::TooLarge,
            detail: format!(
                "subject of {} bytes: NATS takes at most {MAX_SUBJECT_BYTES}",
                subject.len()
            ),
        });
    }
    Ok(())
}

/// The headers of an event message: `Nats-Msg-Id` (deduplication), content type, and
/// [`Message::headers`]; with `cloudevents`, the CloudEvents attributes too (dead letters are
/// not CloudEvents: `false`).
fn event_headers(msg: &Message, cloudevents: bool) -> HeaderMap {
    let mut h: HeaderMap = [
        (
            async_nats::header::NATS_MESSAGE_ID,
            HeaderValue::from_lossy(msg.msg_id.as_str()),
        ),
        (CONTENT_TYPE, HeaderValue::from_lossy("application/json")),
    ]
    .into_iter()
    .collect();
    for (name, value) in msg.headers() {
        // A static name is taken as it is (no check, no copy).
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_lossy(value),
        );
    }
    if cloudevents {
        cloudevents_headers(&mut h, msg);
    }
    h
}

/// `ce-` header names, built once (see [`CONTENT_TYPE`]).
const CE_SPECVERSION: HeaderName = HeaderName::from_static(cloudevents::SPECVERSION);
const CE_ID: HeaderName = HeaderName::from_static(cloudevents::ID);
const CE_TYPE: HeaderName = HeaderName::from_static(cloudevents::TYPE);
const CE_SOURCE: HeaderName = HeaderName::from_static(cloudevents::SOURCE);
const CE_SUBJECT: HeaderName = HeaderName::from_static(cloudevents::SUBJECT);
const CE_TIME: HeaderName = HeaderName::from_static(cloudevents::TIME);
/// The NATS binding's `datacontenttype` header. NATS header names are case-sensitive, so it
/// is sent beside `Content-Type`, which existing consumers read.
const CE_CONTENT_TYPE: HeaderName = HeaderName::from_static("content-type");

/// Adds the CloudEvents binary-mode headers of `msg` ([`cloudevents::Attributes`]).
fn cloudevents_headers(h: &mut HeaderMap, msg: &Message) {
    let a = cloudevents::Attributes::of(msg);
    h.insert(CE_SPECVERSION, cloudevents::SPEC_VERSION);
    h.insert(CE_ID, a.id);
    h.insert(CE_TYPE, a.kind.as_str());
    h.insert(CE_SOURCE, a.source.as_str());
    h.insert(CE_SUBJECT, a.subject);
    if let Some(t) = &a.time {
        h.insert(CE_TIME, t.as_str());
    }
    h.insert(CE_CONTENT_TYPE, "application/json");
}

/// The topology task's state: what to declare, and whom to tell.
struct Topology {
    js: jetstream::Context,
    declare: bool,
    specs: [StreamSpec; 2],
    /// `(config key, stream)` of each target whose messages carry TTLs.
    ttl_streams: Vec<(&'static str, String)>,
    /// The redacted server URL, for the refusal.
    url: String,
    connected: Arc<AtomicBool>,
    /// Where each declaration's outcome is recorded ([`NatsBroker::status`]).
    status: Arc<StatusCell>,
    ready: Arc<AtomicBool>,
    ready_tx: watch::Sender<bool>,
    fatal: watch::Sender<Option<String>>,
    metrics: Arc<Metrics>,
}

impl Topology {
    /// On every (re)connect: checks that the server can do what the configuration asks,
    /// declares both streams (with `declare = true`), and marks the broker ready.
    /// Run under the broker's supervisor until `shutdown`; started again after a panic, it
    /// declares at once when connected.
    async fn run(self: Arc<Self>, reconnected: Arc<Notify>, mut shutdown: Shutdown) {
        let mut wait = !self.connected.load(Ordering::SeqCst);
        loop {
            if wait {
                tokio::select! {
                    () = shutdown.wait() => return,
                    () = reconnected.notified() => {}
                }
            }
            wait = true;
            let mut failures = 0;
            let mut warned_off: Option<tokio::time::Instant> = None;
            while self.connected.load(Ordering::SeqCst) {
                let step = tokio::select! {
                    () = shutdown.wait() => return,
                    step = self.once() => step,
                };
                match step {
                    Ok(()) => {
                        self.ready.store(true, Ordering::SeqCst);
                        self.ready_tx.send_replace(true);
                        self.record(BrokerStatus::Up);
                        self.metrics
                            .set_broker_up(self.connected.load(Ordering::SeqCst));
                        break;
                    }
                    Err(Step::JetStreamOff(why)) => {
                        // Not ready even with declare = false: no event can be stored.
                        self.ready.store(false, Ordering::SeqCst);
                        self.metrics.set_broker_up(false);
                        let status = BrokerStatus::JetStreamOff(why);
                        let changed = self.record(status.clone());
                        if changed || warned_off.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                            warned_off = Some(tokio::time::Instant::now());
                            tracing::warn!(
                                broker = "nats",
                                address = %self.url,
                                "{}",
                                status.describe(crate::config::BrokerKind::Nats, Some(&self.url))
                            );
                        }
                        failures += 1;
                        tokio::select! {
                            () = shutdown.wait() => return,
                            () = tokio::time::sleep(DECLARE_RETRY.delay(failures)) => {}
                        }
                    }
                    Err(Step::Fatal(why)) => {
                        self.record(BrokerStatus::NotDeclared(why.clone()));
                        tracing::error!(error = %why, "the NATS server cannot do what the configuration asks");
                        self.fatal.send_replace(Some(why));
                        // The bridge stops on it; nothing more to declare.
                        shutdown.wait().await;
                        return;
                    }
                    Err(Step::Retry(e)) => {
                        self.record(BrokerStatus::NotDeclared(e.cause_words()));
                        tracing::warn!(error = %e, "cannot declare JetStream streams; retrying");
                        failures += 1;
                        tokio::select! {
                            () = shutdown.wait() => return,
                            () = tokio::time::sleep(DECLARE_RETRY.delay(failures)) => {}
                        }
                    }
                }
            }
        }
    }

    /// Records `status` while still connected (a disconnect the client reported meanwhile
    /// says more); returns whether it changed.
    fn record(&self, status: BrokerStatus) -> bool {
        self.connected.load(Ordering::SeqCst) && self.status.set(status)
    }

    /// One declaration: the JetStream check, the version check, both streams, and the TTL
    /// check of each stream whose messages carry TTLs.
    async fn once(&self) -> Result<(), Step> {
        jetstream_on(&self.js).await?;
        if let Some((key, _)) = self.ttl_streams.first() {
            match ServerVersion::of_connected(&self.js.client()).await {
                // The INFO may trail the connect event: ask again rather than refuse.
                None => {
                    return Err(Step::Retry(BrokerError::connect_msg(
                        "the NATS server's version is not known yet",
                    )));
                }
                Some(v) if !v.has(ServerVersion::MESSAGE_TTL) => {
                    return Err(Step::Fatal(format!(
                        "{key} = \"message_ttl\" needs NATS {} or newer; the server at {} is {v}",
                        ServerVersion::MESSAGE_TTL,
                        self.url
                    )));
                }
                Some(_) => {}
            }
        }
        if self.declare {
            for spec in &self.specs {
                streams::ensure(&self.js, spec).await.map_err(|e| {
                    Step::Retry(BrokerError::topology(format!("stream {}", spec.name), e))
                })?;
            }
            tracing::info!(stream = %self.specs[0].name, dlq_stream = %self.specs[1].name, "JetStream streams ready");
        }
        for (key, stream) in &self.ttl_streams {
            let allowed = match streams::info(&self.js, stream).await {
                Ok(config) => streams::field::<bool>(&config, "allow_msg_ttl").unwrap_or(false),
                // No such stream (declare = false): nothing to check until the operator makes it.
                Err(e) if e.code() == Some(streams::STREAM_NOT_FOUND) => continue,
                Err(e) => {
                    return Err(Step::Retry(BrokerError::topology(
                        format!("stream {stream}"),
                        e,
                    )));
                }
            };
            if !allowed {
                return Err(Step::Fatal(format!(
                    "{key} = \"message_ttl\" needs per-message TTLs on stream {stream}, which does not allow them (allow_msg_ttl): with broker.declare = true the server refused the update (the warning before this line says why), with declare = false the operator must turn them on"
                )));
            }
        }
        Ok(())
    }
}

/// Why a declaration did not finish.
enum Step {
    /// The server answers but its JetStream API does not (the client's or server's words):
    /// try again, the broker not up meanwhile.
    JetStreamOff(String),
    /// Transient: try again.
    Retry(BrokerError),
    /// The server cannot do what the configuration asks: stop the bridge.
    Fatal(String),
}

/// The answer of `$JS.API.INFO`: only its error matters here.
#[derive(serde::Deserialize)]
struct AccountInfoReply {
    error: Option<jetstream::Error>,
}

/// Asks the JetStream API for the account's information, once per (re)connect: without
/// JetStream nothing can be stored, whether the bridge declares its streams or not, and the
/// operator must hear "JetStream is off" rather than "cannot reach the broker". No responders
/// (a server started without `-js`) and "JetStream not enabled" (for the server or the
/// account) mean it is off; no answer in time says nothing definite.
async fn jetstream_on(js: &jetstream::Context) -> Result<(), Step> {
    use jetstream::context::RequestErrorKind;
    let asked = js
        .request::<_, _, AccountInfoReply>("INFO", &serde_json::json!({}))
        .await;
    match asked {
        Ok(AccountInfoReply { error: None }) => Ok(()),
        Ok(AccountInfoReply { error: Some(e) }) if jetstream_off_code(e.error_code()) => {
            Err(Step::JetStreamOff(e.to_string()))
        }
        Ok(AccountInfoReply { error: Some(e) }) => Err(Step::Retry(BrokerError::topology(
            "the JetStream account information",
            e,
        ))),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => {
            Err(Step::JetStreamOff("no responders".into()))
        }
        Err(e) => Err(Step::Retry(BrokerError::topology(
            "the JetStream account information",
            e,
        ))),
    }
}

/// The server's "JetStream not enabled" and "JetStream not enabled for account".
fn jetstream_off_code(code: jetstream::ErrorCode) -> bool {
    matches!(
        code,
        jetstream::ErrorCode::JETSTREAM_NOT_ENABLED
            | jetstream::ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn msg() -> Message {
        Message {
            subject: "pusher.1.channel_occupied.c".into(),
            msg_id: "abc-0".into(),
            body: bytes::Bytes::from_static(b"{}"),
            app_id: Arc::from("1"),
            event: "channel_occupied".into(),
            channel: "c".into(),
            time_ms: "1700000000123".into(),
            trace: None,
        }
    }

    #[test]
    fn refusals_and_silence_are_told_apart() {
        let failed = |words: &str| connect_failure(&async_nats::ClientError::Other(words.into()));
        for refused in [
            "authorization violation",
            "failed signing nonce",
            "TLS error",
        ] {
            assert_eq!(
                failed(refused),
                BrokerStatus::Refused(refused.into()),
                "{refused}"
            );
        }
        for silent in ["IO error", "timed out", "DNS error"] {
            assert_eq!(
                failed(silent),
                BrokerStatus::Unreachable(silent.into()),
                "{silent}"
            );
        }
        assert!(jetstream_off_code(jetstream::ErrorCode(10039)));
        assert!(jetstream_off_code(jetstream::ErrorCode(10076)));
        assert!(!jetstream_off_code(jetstream::ErrorCode(10008)));
    }

    #[test]
    fn cloudevents_headers_only_when_asked() {
        let plain = event_headers(&msg(), false);
        assert!(plain.get("ce-id").is_none());
        let h = event_headers(&msg(), true);
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_string());
        assert_eq!(get("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(get("ce-id").as_deref(), Some("abc-0"));
        assert_eq!(
            get("ce-type").as_deref(),
            Some("com.pusher.channel_occupied")
        );
        assert_eq!(get("ce-source").as_deref(), Some("/apps/1"));
        assert_eq!(get("ce-subject").as_deref(), Some("c"));
        assert_eq!(get("ce-time").as_deref(), Some("2023-11-14T22:13:20.123Z"));
        assert_eq!(get("content-type").as_deref(), Some("application/json"));
        assert_eq!(get("Content-Type").as_deref(), Some("application/json"));
        assert_eq!(get("Nats-Msg-Id").as_deref(), Some("abc-0"));
    }
}
