//! How the bridge and its tools reach RabbitMQ: the nodes of `broker.amqp.url` (one URL or
//! several, parsed by `crate::config::servers::amqp_nodes`, each with a default heartbeat and
//! frame size), TLS for `amqps://` (rustls with ring; the system roots plus
//! `broker.amqp.tls_ca_file`), the client properties that name the connection, and the one
//! place a connection is opened ([`Endpoint::connect_with`], [`connect`]): the broker's
//! sessions, `dlq list` / `dlq replay` / `dlq purge`, the sweeper and the state applier all go
//! through it, so they honour the same settings, fail over across the same nodes and never show
//! the password.
//!
//! Several nodes: a connection goes to the first node of a round that takes it; a round tries
//! every node once, in the order written, starting after the node tried last ([`Rotation`]).
//! A first connection thus goes to the first node that answers, and after a loss the lost node
//! is tried again only after all the others. Each attempt is bounded by its own timeout, so a
//! node that swallows packets costs one timeout, not the whole round.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPScheme;
use lapin::{Connection, ConnectionProperties};

use crate::broker::BrokerError;
use crate::broker::status::BrokerStatus;
use crate::config::servers::{AmqpNode, amqp_nodes};
use crate::config::{AmqpSettings, SecretUrl};

/// Heartbeat asked for when the URL does not set one: a peer that vanished without closing the
/// TCP connection is noticed within about two intervals.
pub(crate) const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Largest frame asked for when the URL does not set one (`?frame_max=`). lapin keeps 32
/// frames' worth of read and of write buffer, zero-filled, so RabbitMQ's 128 KiB default costs
/// 8 MiB of resident memory; with 32 KiB it is 2 MiB. Event messages are a few KiB, and a larger
/// one is simply split into more frames (docs/performance.md).
pub(crate) const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Parses `broker.amqp.url` into its nodes, each asking for `default_heartbeat` seconds unless
/// its URL sets `heartbeat=`, and for [`DEFAULT_FRAME_MAX`] unless it sets `frame_max=`. Errors
/// name `broker.amqp.url` and show the URLs with their passwords replaced.
pub(crate) fn parse_nodes(
    url: &SecretUrl,
    default_heartbeat: u16,
) -> Result<Vec<AmqpNode>, BrokerError> {
    let mut nodes = amqp_nodes(url).map_err(|e| BrokerError::connect("broker.amqp.url", e))?;
    for node in &mut nodes {
        let query = &mut node.uri.query;
        query.heartbeat.get_or_insert(default_heartbeat);
        query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    }
    Ok(nodes)
}

/// The TLS settings of the connections: the CA of `broker.amqp.tls_ca_file` (PEM) is trusted in
/// addition to the system's roots (one setting for every node: rustls checks each node's
/// certificate against the host name of its own URL). A CA file with a plain `amqp://` URL is
/// refused, naming the URL: the operator asked for TLS and would not get it.
pub(crate) async fn tls_config(
    s: &AmqpSettings,
    nodes: &[AmqpNode],
) -> Result<OwnedTLSConfig, BrokerError> {
    let mut config = OwnedTLSConfig::default();
    let Some(path) = &s.tls_ca_file else {
        return Ok(config);
    };
    if let Some(plain) = nodes.iter().find(|n| n.uri.scheme != AMQPScheme::AMQPS) {
        return Err(BrokerError::connect_msg(format!(
            "broker.amqp.tls_ca_file is set but broker.amqp.url {} is not amqps://",
            plain.shown
        )));
    }
    let pem = tokio::fs::read_to_string(path).await.map_err(|e| {
        BrokerError::connect(
            format!("cannot read broker.amqp.tls_ca_file {}", path.display()),
            e,
        )
    })?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(BrokerError::connect_msg(format!(
            "broker.amqp.tls_ca_file {} holds no PEM certificate",
            path.display()
        )));
    }
    config.cert_chain = Some(pem);
    Ok(config)
}

/// Client properties: the connection is listed under `connection_name` by the management UI
/// and `rabbitmqctl list_connections` (`broker.amqp.connection_name` for the bridge, a fixed
/// name for each tool).
pub(crate) fn connection_properties(connection_name: &str) -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name(connection_name.into())
}

/// Where the next round of connection attempts starts: right after the node tried last,
/// whether that attempt connected or failed. So the first round starts at the first node; a
/// node whose connection was lost, or that just failed, is tried again only after every other
/// one; and a bridge that failed over stays where it is while that node works (no fail-back
/// that would move every publisher at once when the old node returns).
#[derive(Debug, Default)]
pub(crate) struct Rotation {
    next: AtomicUsize,
}

impl Rotation {
    /// The order of one round over `len` nodes: each once, from the rotation point on.
    pub(crate) fn round(&self, len: usize) -> impl Iterator<Item = usize> + use<> {
        let start = self.next.load(Ordering::Relaxed) % len.max(1);
        (0..len).map(move |i| (start + i) % len)
    }

    /// Node `i` of `len` was just tried: the next round starts after it.
    pub(crate) fn tried(&self, i: usize, len: usize) {
        self.next.store((i + 1) % len.max(1), Ordering::Relaxed);
    }
}

/// One node's failed attempt in a round.
struct Failure {
    /// Position of the node in the list (0-based).
    node: usize,
    /// What happened, in the client's words, without the node's address.
    words: String,
    error: BrokerError,
}

/// Everything needed to open a connection, checked once (URLs, CA file) and reused on every
/// (re)connect, so a bad setting fails at start-up rather than at each retry; and the rotation
/// over the nodes, kept across reconnects.
pub(crate) struct Endpoint {
    nodes: Vec<AmqpNode>,
    tls: OwnedTLSConfig,
    properties: ConnectionProperties,
    rotation: Rotation,
    /// `broker.amqp.url` with its passwords replaced, for messages about the whole list.
    shown: String,
}

impl Endpoint {
    /// Checks `[broker.amqp]` for a connection named `connection_name` that asks for a heartbeat
    /// of `default_heartbeat` seconds unless the URL sets one.
    pub async fn new(
        s: &AmqpSettings,
        connection_name: &str,
        default_heartbeat: u16,
    ) -> Result<Self, BrokerError> {
        let nodes = parse_nodes(&s.url, default_heartbeat)?;
        let tls = tls_config(s, &nodes).await?;
        Ok(Self {
            nodes,
            tls,
            properties: connection_properties(connection_name),
            rotation: Rotation::default(),
            shown: s.url.redacted(),
        })
    }

    /// `broker.amqp.url` as logs show it (passwords replaced): every node.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Node `i`'s URL as logs show it (password replaced).
    pub fn node_shown(&self, i: usize) -> &str {
        self.nodes.get(i).map_or(self.shown.as_str(), |n| &n.shown)
    }

    /// How many nodes the list names.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Opens a connection to node `i` (TCP, TLS, AMQP handshake), not bounded in time.
    async fn open_node(&self, i: usize) -> Result<Connection, BrokerError> {
        let node = &self.nodes[i];
        let fail = |e: lapin::Error| BrokerError::connect(node.shown.clone(), e);
        let runtime = lapin::runtime::default_runtime().map_err(fail)?;
        Connection::connect_uri_with_config(
            node.uri.clone(),
            self.properties.clone(),
            self.tls.clone(),
            runtime,
        )
        .await
        .map_err(fail)
    }

    /// Tries the nodes in turn (one round, see [`Rotation`]): on each, opens a connection and
    /// runs `setup` on it (the broker declares its topology and opens its channels there), the
    /// two together bounded by `timeout`. Returns what `setup` made of the first connection
    /// that got through it, with the position of its node; when every node failed, one error
    /// naming each node's failure (see [`Endpoint::round_failed`]).
    pub async fn connect_with<T, F, Fut>(
        &self,
        timeout: Duration,
        mut setup: F,
    ) -> Result<(T, usize), BrokerError>
    where
        F: FnMut(Connection) -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        let len = self.nodes.len();
        let mut failures = Vec::new();
        for i in self.rotation.round(len) {
            self.rotation.tried(i, len);
            let attempt = async { setup(self.open_node(i).await?).await };
            let failure = match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(made)) => {
                    tracing::debug!(node = %self.nodes[i].shown, "connected to a RabbitMQ node");
                    return Ok((made, i));
                }
                Ok(Err(error)) => Failure {
                    node: i,
                    // An error of `open_node` names the node beside the client's words; one of
                    // `setup` says what it was setting up.
                    words: match &error {
                        BrokerError::Connect {
                            what,
                            source: Some(source),
                        } if *what == self.nodes[i].shown => source.to_string(),
                        other => other.to_string(),
                    },
                    error,
                },
                Err(_) => Failure {
                    node: i,
                    words: format!("no answer within {timeout:?}"),
                    error: BrokerError::connect_msg(format!(
                        "no answer from RabbitMQ at {} within {timeout:?}",
                        self.nodes[i].shown
                    )),
                },
            };
            // Per node at debug only: while every node is down this would repeat each round;
            // the round's failure is reported (rate-limited) by the caller.
            tracing::debug!(
                node = %self.nodes[i].shown,
                error = %failure.words,
                "a RabbitMQ node did not take the connection"
            );
            failures.push(failure);
        }
        Err(self.round_failed(failures))
    }

    /// The error of a round in which every node failed. With one node, that node's error as it
    /// is. With several, the most telling failure (the last node that answered and refused,
    /// the login or a declaration, rather than one that did not answer: that is what the
    /// operator has to fix), keeping its kind and its client error (`open_failure` reads
    /// them), with a message naming every node and what each said.
    fn round_failed(&self, mut failures: Vec<Failure>) -> BrokerError {
        if failures.len() <= 1 {
            return failures.pop().map_or_else(
                || BrokerError::connect_msg("broker.amqp.url names no node"),
                |f| f.error,
            );
        }
        let telling = failures
            .iter()
            .rposition(|f| !matches!(super::open_failure(&f.error), BrokerStatus::Unreachable(_)))
            .unwrap_or(failures.len() - 1);
        let chosen = failures.remove(telling);
        let mut parts: Vec<String> = failures
            .iter()
            .map(|f| format!("{}: {}", self.nodes[f.node].shown, f.words))
            .collect();
        let shown = &self.nodes[chosen.node].shown;
        let mut relabel = |what: String, has_source: bool| {
            // The chosen node goes last: the error's own cause (appended to the message after
            // `what`) then reads as that node's.
            let last = match (what == *shown, has_source) {
                (true, true) => shown.clone(),
                (_, false) => format!("{shown}: {}", chosen.words),
                (false, true) => format!("{shown}: {what}"),
            };
            parts.push(last);
            format!(
                "no node of broker.amqp.url took the connection: {}",
                parts.join("; ")
            )
        };
        match chosen.error {
            BrokerError::Connect { what, source } => BrokerError::Connect {
                what: relabel(what, source.is_some()),
                source,
            },
            BrokerError::Topology { what, source } => BrokerError::Topology {
                what: relabel(what, source.is_some()),
                source,
            },
            BrokerError::Unsupported(why) => BrokerError::Unsupported(relabel(why, false)),
        }
    }
}

/// Opens one connection from `[broker.amqp]` named `connection_name`, asking for a heartbeat
/// of `default_heartbeat` seconds unless the URL sets one: the first node that answers within
/// `timeout` (each node gets the whole `timeout`). For the one-shot tools (`dlq`); the sweeper,
/// the state applier and the broker keep an [`Endpoint`], so their reconnects rotate.
pub async fn connect(
    s: &AmqpSettings,
    connection_name: &str,
    default_heartbeat: u16,
    timeout: Duration,
) -> Result<Connection, BrokerError> {
    let endpoint = Endpoint::new(s, connection_name, default_heartbeat).await?;
    endpoint.open(timeout).await
}

impl Endpoint {
    /// A plain connection: the first node of the next round that answers within `timeout`.
    pub async fn open(&self, timeout: Duration) -> Result<Connection, BrokerError> {
        let (conn, _) = self.connect_with(timeout, |c| async { Ok(c) }).await?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(mut nodes: Vec<AmqpNode>) -> AmqpNode {
        assert_eq!(nodes.len(), 1);
        nodes.remove(0)
    }

    #[test]
    fn url_errors_never_show_the_password() {
        let err = parse_nodes(
            &SecretUrl::new("http://u:hunter2@h/%2f"),
            DEFAULT_HEARTBEAT_SECS,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("broker.amqp.url"), "{err}");
    }

    #[test]
    fn heartbeat_and_frame_max_default_but_explicit_ones_win() {
        let uri = only(
            parse_nodes(
                &SecretUrl::new("amqp://g:g@127.0.0.1:5672/%2f"),
                DEFAULT_HEARTBEAT_SECS,
            )
            .unwrap(),
        )
        .uri;
        assert_eq!(uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        assert_eq!(uri.query.frame_max, Some(DEFAULT_FRAME_MAX));
        assert_eq!(uri.vhost, "/");
        let uri = only(
            parse_nodes(
                &SecretUrl::new("amqps://h/%2f?heartbeat=30&frame_max=131072"),
                DEFAULT_HEARTBEAT_SECS,
            )
            .unwrap(),
        )
        .uri;
        assert_eq!(uri.query.heartbeat, Some(30));
        assert_eq!(uri.query.frame_max, Some(131_072));
        assert_eq!(uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(uri.authority.port, 5671);
    }

    #[tokio::test]
    async fn a_ca_file_needs_amqps_and_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let s = AmqpSettings {
            tls_ca_file: Some(ca.clone()),
            ..AmqpSettings::default()
        };
        let plain = parse_nodes(&SecretUrl::new("amqp://h/%2f"), DEFAULT_HEARTBEAT_SECS).unwrap();
        let err = tls_config(&s, &plain).await.unwrap_err().to_string();
        assert!(err.contains("amqps://"), "{err}");
        let tls = parse_nodes(&SecretUrl::new("amqps://h/%2f"), DEFAULT_HEARTBEAT_SECS).unwrap();
        let err = tls_config(&s, &tls).await.unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let cfg = tls_config(&s, &tls).await.unwrap();
        assert!(cfg.cert_chain.unwrap().contains("BEGIN CERTIFICATE"));
        let missing = AmqpSettings {
            tls_ca_file: Some(dir.path().join("nope.pem")),
            ..AmqpSettings::default()
        };
        let err = tls_config(&missing, &tls).await.unwrap_err().to_string();
        assert!(err.contains("tls_ca_file"), "{err}");
    }

    #[tokio::test]
    async fn the_default_heartbeat_applies_unless_the_url_sets_one() {
        let mut s = AmqpSettings {
            url: SecretUrl::new("amqp://h/%2f"),
            ..AmqpSettings::default()
        };
        let e = Endpoint::new(&s, "t", 7).await.unwrap();
        assert_eq!(e.nodes[0].uri.query.heartbeat, Some(7));
        s.url = SecretUrl::new("amqp://h/%2f?heartbeat=30");
        let e = Endpoint::new(&s, "t", 7).await.unwrap();
        assert_eq!(e.nodes[0].uri.query.heartbeat, Some(30));
    }

    #[tokio::test]
    async fn connect_errors_name_the_url_without_its_password() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let s = AmqpSettings {
            url: SecretUrl::new(format!("amqp://u:hunter2@127.0.0.1:{port}/%2f")),
            ..AmqpSettings::default()
        };
        let timeout = Duration::from_secs(5);
        let err = connect(&s, "t", 7, timeout).await.unwrap_err().to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(!err.contains("no answer"), "refused, not timed out: {err}");
    }

    #[tokio::test]
    async fn connect_gives_up_after_its_timeout() {
        // Accepts TCP (the kernel does) but never speaks AMQP.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let s = AmqpSettings {
            url: SecretUrl::new(format!("amqp://u:hunter2@127.0.0.1:{port}/%2f")),
            ..AmqpSettings::default()
        };
        let started = std::time::Instant::now();
        let err = connect(&s, "t", 7, Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(err.contains("no answer"), "{err}");
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        drop(silent);
    }

    #[test]
    fn a_round_starts_after_the_node_tried_last() {
        let r = Rotation::default();
        let round = |r: &Rotation| r.round(3).collect::<Vec<_>>();
        // The first connection: the nodes in the order written.
        assert_eq!(round(&r), [0, 1, 2]);
        // Connected to (or failed on) the second: after its loss the third comes first and the
        // lost one last.
        r.tried(1, 3);
        assert_eq!(round(&r), [2, 0, 1]);
        // A whole round failed (the last tried was the first): the next round is the same.
        r.tried(0, 3);
        assert_eq!(round(&r), [1, 2, 0]);
        r.tried(2, 3);
        assert_eq!(round(&r), [0, 1, 2]);
        let one = Rotation::default();
        one.tried(0, 1);
        assert_eq!(one.round(1).collect::<Vec<_>>(), [0]);
    }

    /// A node that accepts TCP (the kernel does) but never speaks AMQP, and counts the
    /// connections it got.
    async fn silent_node() -> (u16, tokio::task::JoinHandle<usize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok(Ok((stream, _))) =
                tokio::time::timeout(Duration::from_secs(2), listener.accept()).await
            {
                held.push(stream);
            }
            held.len()
        });
        (port, task)
    }

    fn dead_port() -> u16 {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        closed.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_round_tries_every_node_in_turn_each_within_the_timeout() {
        let (silent_a, a) = silent_node().await;
        let dead = dead_port();
        let (silent_c, c) = silent_node().await;
        let url = |p: u16, pw: &str| format!("amqp://u:{pw}@127.0.0.1:{p}/%2f");
        let s = AmqpSettings {
            url: SecretUrl::new(format!(
                "{}, {},{}",
                url(silent_a, "hunter2"),
                url(dead, "hunter3"),
                url(silent_c, "hunter4")
            )),
            ..AmqpSettings::default()
        };
        let timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let err = connect(&s, "t", 7, timeout)
            .await
            .err()
            .unwrap()
            .to_string();
        let took = started.elapsed();
        assert!(!err.contains("hunter"), "{err}");
        let (at_a, at_dead, at_c) = (
            err.find(&format!("127.0.0.1:{silent_a}")),
            err.find(&format!("127.0.0.1:{dead}")),
            err.find(&format!("127.0.0.1:{silent_c}")),
        );
        assert!(
            at_a < at_dead && at_dead < at_c && at_a.is_some(),
            "every node, in the order written: {err}"
        );
        assert_eq!(err.matches("no answer within 300ms").count(), 2, "{err}");
        // Two silent nodes, one timeout each; the refused one at once.
        assert!(
            took >= 2 * timeout && took < 2 * timeout + Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(a.await.unwrap(), 1, "the first node was tried once");
        assert_eq!(c.await.unwrap(), 1, "the third node was tried once");
    }

    #[tokio::test]
    async fn a_failed_round_reports_the_node_that_refused_rather_than_one_that_was_away() {
        use lapin::protocol::{AMQPError, AMQPSoftError};
        let s = AmqpSettings {
            url: SecretUrl::new("amqp://u:hunter2@h1/%2f,amqp://u:hunter2@h2/%2f"),
            ..AmqpSettings::default()
        };
        let e = Endpoint::new(&s, "t", 7).await.unwrap();
        let refused = || {
            BrokerError::connect(
                e.node_shown(0).to_string(),
                lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
                    AMQPSoftError::ACCESSREFUSED.into(),
                    "ACCESS_REFUSED - Login was refused".into(),
                ))),
            )
        };
        let away = || {
            BrokerError::connect(
                e.node_shown(1).to_string(),
                lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            )
        };
        let failure = |node: usize, error: BrokerError| Failure {
            node,
            words: match &error {
                BrokerError::Connect {
                    source: Some(s), ..
                } => s.to_string(),
                other => other.to_string(),
            },
            error,
        };
        let err = e.round_failed(vec![failure(0, refused()), failure(1, away())]);
        let status = super::super::open_failure(&err);
        assert!(matches!(status, BrokerStatus::Refused(_)), "{status:?}");
        let text = err.to_string();
        assert!(
            text.contains("amqp://u:***@h1/%2f") && text.contains("amqp://u:***@h2/%2f"),
            "{text}"
        );
        assert!(
            text.ends_with("ACCESS_REFUSED - Login was refused"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        // Nobody answered: the last node's failure, still naming both.
        let err = e.round_failed(vec![failure(0, away()), failure(1, away())]);
        assert!(matches!(
            super::super::open_failure(&err),
            BrokerStatus::Unreachable(_)
        ));
        assert!(err.to_string().contains("amqp://u:***@h1/%2f"), "{err}");
    }
}
