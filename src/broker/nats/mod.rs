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
use tokio::sync::Notify;

use super::connection_log::ConnectionLog;
use super::{BrokerError, DeadLetter, DlqReason, Message, PublishError, cloudevents, headers};
use crate::config::{NatsSettings, Settings};
use crate::metrics::Metrics;
use crate::routing;

mod classify;
pub mod servers;
pub(crate) mod url_auth;

use classify::classify;

/// The NATS JetStream broker.
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The connection is established (set by the client's event callback).
    connected: Arc<AtomicBool>,
    /// Both streams exist (or `declare = false`) since the last (re)connect.
    topology_ready: Arc<AtomicBool>,
    prefix: String,
    settings: NatsSettings,
    /// How long the JetStream context waits for an ack (`broker.publish_timeout`).
    ack_timeout: Duration,
    /// `broker.cloudevents`: event messages carry `ce-` headers.
    cloudevents: bool,
    topology_task: tokio::task::JoinHandle<()>,
}

/// Builds the connect options (auth and TLS) from `[broker.nats]`.
pub(crate) async fn connect_options(s: &NatsSettings) -> Result<ConnectOptions, BrokerError> {
    let mut opts = ConnectOptions::new()
        .name("pusher-bridge")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(10))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            // Fast first retries (a broker restart), capped at 2 s.
            Duration::from_millis((50u64 << attempts.min(6)).min(2000))
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
    let servers = servers::server_addrs(s.url.expose())?;
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

/// Stream settings the bridge owns: name, subjects, duplicate window, replicas.
fn stream_config(name: &str, subjects: String, s: &NatsSettings) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: vec![subjects],
        duplicate_window: s.duplicate_window,
        num_replicas: s.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// What the bridge changes on a stream that exists: only what it needs, never what an operator
/// set beyond that.
///
/// - `subjects`: the bridge's own filter is added when missing; subjects an operator added stay.
/// - `duplicate_window`: raised to `broker.nats.duplicate_window` when shorter, never shortened
///   (a longer window only removes more duplicates).
///
/// Every other field (limits, retention, discard policy, storage, placement, description) is
/// the operator's. Replicas are handled by [`replicas_upgrade`]. `None`: nothing to change.
fn reconciled(current: &stream::Config, want: &stream::Config) -> Option<stream::Config> {
    let mut cfg = current.clone();
    for subject in &want.subjects {
        if !cfg.subjects.contains(subject) {
            cfg.subjects.push(subject.clone());
        }
    }
    cfg.duplicate_window = cfg.duplicate_window.max(want.duplicate_window);
    (cfg.subjects != current.subjects || cfg.duplicate_window != current.duplicate_window)
        .then_some(cfg)
}

/// The replica count to move an existing stream to: `broker.nats.replicas` when the stream has
/// fewer, never fewer than it has (an operator's R5 stays R5).
fn replicas_upgrade(current: &stream::Config, want: &stream::Config) -> Option<usize> {
    (want.num_replicas > current.num_replicas.max(1)).then_some(want.num_replicas)
}

/// Creates the stream, or brings an existing one to what the bridge needs ([`reconciled`],
/// [`replicas_upgrade`]); every other setting is left as it is.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    want: stream::Config,
) -> Result<(), BrokerError> {
    match js.get_stream(&want.name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| BrokerError::topology(format!("stream {}", want.name), e))?;
            let mut current = info.config.clone();
            if let Some(cfg) = reconciled(&current, &want) {
                js.update_stream(&cfg)
                    .await
                    .map_err(|e| BrokerError::topology(format!("stream {}", want.name), e))?;
                current = cfg;
            }
            if let Some(replicas) = replicas_upgrade(&current, &want) {
                // Best effort: a cluster with too few JetStream servers refuses, and the stream
                // works as it is meanwhile.
                let mut cfg = current;
                let from = cfg.num_replicas;
                cfg.num_replicas = replicas;
                match js.update_stream(&cfg).await {
                    Ok(_) => {
                        tracing::info!(stream = %want.name, from, to = replicas, "stream replicas raised")
                    }
                    Err(e) => {
                        tracing::warn!(stream = %want.name, from, to = replicas, error = %e, "cannot raise the stream's replicas; it keeps its current count")
                    }
                }
            }
            Ok(())
        }
        Err(_) => {
            let what = format!("stream {}", want.name);
            js.create_stream(want)
                .await
                .map(|_| ())
                .map_err(|e| BrokerError::topology(what, e))
        }
    }
}

impl NatsBroker {
    /// Starts connecting; returns at once.
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self, BrokerError> {
        let s = settings.broker.nats.clone();
        let connected = Arc::new(AtomicBool::new(false));
        let topology_ready = Arc::new(AtomicBool::new(!settings.broker.declare));
        let reconnected = Arc::new(Notify::new());
        let log = Arc::new(ConnectionLog::new(
            "NATS",
            "nats",
            s.url.redacted(),
            metrics.clone(),
        ));
        let opts = {
            let connected = connected.clone();
            let topology_ready = topology_ready.clone();
            let reconnected = reconnected.clone();
            let metrics = metrics.clone();
            let declare = settings.broker.declare;
            connect_options(&s).await?.event_callback(move |event| {
                let connected = connected.clone();
                let topology_ready = topology_ready.clone();
                let reconnected = reconnected.clone();
                let metrics = metrics.clone();
                let log = log.clone();
                async move {
                    match event {
                        Event::Connected => {
                            connected.store(true, Ordering::SeqCst);
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
                            log.disconnected(None);
                        }
                        // Failed (re)connection attempts: async-nats retries on its own.
                        Event::ClientError(e) => log.connect_failed(&e),
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
        let topology_task = tokio::spawn(topology_loop(
            js.clone(),
            settings.broker.declare,
            prefix.clone(),
            s.clone(),
            connected.clone(),
            topology_ready.clone(),
            reconnected,
            metrics,
        ));
        Ok(Self {
            client,
            js,
            connected,
            topology_ready,
            prefix,
            settings: s,
            ack_timeout: settings.broker.publish_timeout,
            cloudevents: settings.broker.cloudevents,
            topology_task,
        })
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
            event_headers(msg, self.cloudevents),
            msg.body.clone(),
            timeout,
        )
        .await
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
                .headers(event_headers(m, self.cloudevents));
            let sent =
                tokio::time::timeout_at(deadline, self.js.send_publish(m.subject.clone(), publish))
                    .await;
            pending.push(match sent {
                Ok(Ok(ack)) => Ok(ack),
                Ok(Err(e)) => Err(classify(e)),
                Err(_) => Err(PublishError::Unavailable("no ack in time".into())),
            });
            stopped = matches!(pending.last(), Some(Err(e)) if crate::delivery::is_transient(e));
        }
        futures::future::join_all(pending.into_iter().zip(msgs).map(|(p, m)| async move {
            match tokio::time::timeout_at(deadline, p?).await {
                Err(_) => Err(PublishError::Unavailable("no ack in time".into())),
                Ok(Ok(_ack)) => Ok(()),
                Ok(Err(e)) => Err(classify::confirm(&self.js, &m.subject, classify(e)).await),
            }
        }))
        .await
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
        h.insert(headers::DLQ_SUBJECT, m.subject.as_str());
        h.insert(headers::DLQ_MSG_ID, m.msg_id.as_str());
        h.insert(headers::DLQ_REASON, dl.reason.as_str());
        h.insert(headers::DLQ_DETAIL, super::header_safe(&dl.detail).as_str());
        h.insert(headers::DLQ_ATTEMPTS, dl.attempts.to_string().as_str());
        h.insert(
            headers::DLQ_FIRST_FAILURE,
            dl.first_failure_ms.to_string().as_str(),
        );
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
            // No responders is `no_stream` only if the JetStream API confirms it.
            Err(e) => Err(classify::confirm(&self.js, &subject, classify(e)).await),
        }
    }

    /// Flushes pending publishes and stops the topology task.
    pub async fn close(&self) {
        self.topology_task.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

/// Header names built once: a `HeaderName` from a `&str` is validated and copied on every insert.
const CONTENT_TYPE: HeaderName = HeaderName::from_static("Content-Type");
const APP_ID: HeaderName = HeaderName::from_static(headers::APP_ID);
const EVENT: HeaderName = HeaderName::from_static(headers::EVENT);
const CHANNEL: HeaderName = HeaderName::from_static(headers::CHANNEL);
const TIME_MS: HeaderName = HeaderName::from_static(headers::TIME_MS);

/// The headers of an event message: `Nats-Msg-Id` (deduplication), content type, and the app,
/// event, channel and `time_ms` for consumers that filter without parsing the body; with
/// `cloudevents`, the CloudEvents attributes too (dead letters are not CloudEvents: `false`).
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

fn event_headers(msg: &Message, cloudevents: bool) -> HeaderMap {
    let mut h: HeaderMap = [
        (
            async_nats::header::NATS_MESSAGE_ID,
            HeaderValue::from(msg.msg_id.as_str()),
        ),
        (CONTENT_TYPE, HeaderValue::from("application/json")),
        (APP_ID, HeaderValue::from(&*msg.app_id)),
        (EVENT, HeaderValue::from(msg.event.as_str())),
        (CHANNEL, HeaderValue::from(msg.channel.as_str())),
        (TIME_MS, HeaderValue::from(msg.time_ms.as_str())),
    ]
    .into_iter()
    .collect();
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

#[expect(
    clippy::too_many_arguments,
    reason = "one call site, all of it the broker's shared state"
)]
async fn topology_loop(
    js: jetstream::Context,
    declare: bool,
    prefix: String,
    s: NatsSettings,
    connected: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    reconnected: Arc<Notify>,
    metrics: Arc<Metrics>,
) {
    loop {
        reconnected.notified().await;
        if !declare {
            metrics.set_broker_up(true);
            continue;
        }
        let mut delay = Duration::from_millis(100);
        while connected.load(Ordering::SeqCst) {
            let events = stream_config(&s.stream, format!("{prefix}.>"), &s);
            let dlq = stream_config(
                &s.dlq_stream,
                format!("{}.>", routing::dlq_prefix(&prefix)),
                &s,
            );
            let result = async {
                ensure_stream(&js, events).await?;
                ensure_stream(&js, dlq).await
            }
            .await;
            match result {
                Ok(()) => {
                    ready.store(true, Ordering::SeqCst);
                    metrics.set_broker_up(connected.load(Ordering::SeqCst));
                    tracing::info!(stream = %s.stream, dlq_stream = %s.dlq_stream, "JetStream streams ready");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot declare JetStream streams; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn bridge_wants(replicas: usize) -> stream::Config {
        let s = NatsSettings {
            replicas,
            ..NatsSettings::default()
        };
        stream_config("EV", "p.>".into(), &s)
    }

    #[test]
    fn an_operators_limits_subjects_and_longer_window_stay() {
        let want = bridge_wants(3);
        let operator = stream::Config {
            subjects: vec!["p.>".into(), "audit.>".into()],
            duplicate_window: Duration::from_secs(3600),
            max_age: Duration::from_secs(86_400),
            max_bytes: 1 << 40,
            num_replicas: 5,
            ..want.clone()
        };
        assert_eq!(reconciled(&operator, &want), None);
        assert_eq!(replicas_upgrade(&operator, &want), None);
    }

    #[test]
    fn what_the_bridge_needs_is_added_and_nothing_else_changes() {
        let want = bridge_wants(3);
        let old = stream::Config {
            subjects: vec!["other.>".into()],
            duplicate_window: Duration::from_secs(60),
            max_messages: 1_000_000,
            num_replicas: 1,
            ..want.clone()
        };
        let cfg = reconciled(&old, &want).expect("an update");
        assert_eq!(cfg.subjects, ["other.>", "p.>"]);
        assert_eq!(cfg.duplicate_window, want.duplicate_window);
        assert_eq!(cfg.max_messages, 1_000_000);
        assert_eq!(cfg.num_replicas, 1, "replicas move in their own update");
        assert_eq!(replicas_upgrade(&cfg, &want), Some(3));
        assert_eq!(replicas_upgrade(&cfg, &bridge_wants(1)), None);
    }

    fn msg() -> Message {
        Message {
            subject: "pusher.1.channel_occupied.c".into(),
            msg_id: "abc-0".into(),
            body: bytes::Bytes::from_static(b"{}"),
            app_id: Arc::from("1"),
            event: "channel_occupied".into(),
            channel: "c".into(),
            time_ms: "1700000000123".into(),
        }
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
