//! How the bridge and its tools reach RabbitMQ: the parsed URL (with a default heartbeat), TLS
//! for `amqps://` (rustls with ring; the system roots plus `broker.amqp.tls_ca_file`), the client
//! properties that name the connection, and the one place a connection is opened
//! ([`Endpoint::open`], [`connect`]): the broker's sessions, `dlq list` / `dlq replay` and the
//! sweeper all go through it, so they honour the same settings and never show the password.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use crate::broker::BrokerError;
use crate::config::{AmqpSettings, SecretUrl};

/// Heartbeat asked for when the URL does not set one: a peer that vanished without closing the
/// TCP connection is noticed within about two intervals.
pub(crate) const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Largest frame asked for when the URL does not set one (`?frame_max=`). lapin keeps 32
/// frames' worth of read and of write buffer, zero-filled, so RabbitMQ's 128 KiB default costs
/// 8 MiB of resident memory; with 32 KiB it is 2 MiB. Event messages are a few KiB, and a larger
/// one is simply split into more frames (docs/performance.md).
pub(crate) const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Parses `broker.amqp.url`, asking for `default_heartbeat` seconds unless the URL sets
/// `heartbeat=`, and for [`DEFAULT_FRAME_MAX`] unless it sets `frame_max=`. Errors show the URL
/// with its password replaced.
pub(crate) fn parse_url(url: &SecretUrl, default_heartbeat: u16) -> Result<AMQPUri, BrokerError> {
    let mut uri: AMQPUri = url.expose().parse().map_err(|e: String| {
        // The parser quotes the whole URL, password included.
        let e = e.replace(url.expose(), &url.redacted());
        BrokerError::connect(
            format!(
                "broker.amqp.url {} is not an amqp:// or amqps:// URL",
                url.redacted()
            ),
            e,
        )
    })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(default_heartbeat);
    }
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
    }
    Ok(uri)
}

/// The TLS settings for the connection: the CA of `broker.amqp.tls_ca_file` (PEM) is trusted in
/// addition to the system's roots. A CA file with a plain `amqp://` URL is refused: the
/// operator asked for TLS and would not get it.
pub(crate) async fn tls_config(
    s: &AmqpSettings,
    uri: &AMQPUri,
) -> Result<OwnedTLSConfig, BrokerError> {
    let mut config = OwnedTLSConfig::default();
    let Some(path) = &s.tls_ca_file else {
        return Ok(config);
    };
    if uri.scheme != AMQPScheme::AMQPS {
        return Err(BrokerError::connect_msg(
            "broker.amqp.tls_ca_file is set but broker.amqp.url is not amqps://",
        ));
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

/// Everything needed to open a connection, checked once (URL, CA file) and reused on every
/// (re)connect, so a bad setting fails at start-up rather than at each retry.
#[derive(Clone)]
pub(crate) struct Endpoint {
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    properties: ConnectionProperties,
    /// `broker.amqp.url` with its password replaced, for error messages.
    redacted: String,
}

impl Endpoint {
    /// Checks `[broker.amqp]` for a connection named `connection_name` that asks for a heartbeat
    /// of `default_heartbeat` seconds unless the URL sets one.
    pub async fn new(
        s: &AmqpSettings,
        connection_name: &str,
        default_heartbeat: u16,
    ) -> Result<Self, BrokerError> {
        let uri = parse_url(&s.url, default_heartbeat)?;
        let tls = tls_config(s, &uri).await?;
        Ok(Self {
            uri,
            tls,
            properties: connection_properties(connection_name),
            redacted: s.url.redacted(),
        })
    }

    /// Opens a connection (TCP, TLS, AMQP handshake). Not bounded in time: callers put their
    /// own timeout around it (the broker's covers the topology declarations too).
    pub async fn open(&self) -> Result<Connection, BrokerError> {
        let fail = |e: lapin::Error| BrokerError::connect(self.redacted.clone(), e);
        let runtime = lapin::runtime::default_runtime().map_err(fail)?;
        Connection::connect_uri_with_config(
            self.uri.clone(),
            self.properties.clone(),
            self.tls.clone(),
            runtime,
        )
        .await
        .map_err(fail)
    }
}

/// Opens one connection from `[broker.amqp]` named `connection_name`, asking for a heartbeat
/// of `default_heartbeat` seconds unless the URL sets one, and gives up after `timeout`. For
/// the tools' own connections (`dlq`, the sweeper); the broker keeps an [`Endpoint`].
pub async fn connect(
    s: &AmqpSettings,
    connection_name: &str,
    default_heartbeat: u16,
    timeout: Duration,
) -> Result<Connection, BrokerError> {
    let endpoint = Endpoint::new(s, connection_name, default_heartbeat).await?;
    match tokio::time::timeout(timeout, endpoint.open()).await {
        Ok(result) => result,
        Err(_) => Err(BrokerError::connect_msg(format!(
            "no answer from RabbitMQ at {} within {timeout:?}",
            endpoint.redacted
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_errors_never_show_the_password() {
        let err = parse_url(
            &SecretUrl::new("http://u:hunter2@h/%2f"),
            DEFAULT_HEARTBEAT_SECS,
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("broker.amqp.url"), "{err}");
    }

    #[test]
    fn heartbeat_and_frame_max_default_but_explicit_ones_win() {
        let uri = parse_url(
            &SecretUrl::new("amqp://g:g@127.0.0.1:5672/%2f"),
            DEFAULT_HEARTBEAT_SECS,
        )
        .unwrap();
        assert_eq!(uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        assert_eq!(uri.query.frame_max, Some(DEFAULT_FRAME_MAX));
        assert_eq!(uri.vhost, "/");
        let uri = parse_url(
            &SecretUrl::new("amqps://h/%2f?heartbeat=30&frame_max=131072"),
            DEFAULT_HEARTBEAT_SECS,
        )
        .unwrap();
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
        let plain = parse_url(&SecretUrl::new("amqp://h/%2f"), DEFAULT_HEARTBEAT_SECS).unwrap();
        let err = tls_config(&s, &plain).await.unwrap_err().to_string();
        assert!(err.contains("amqps://"), "{err}");
        let tls = parse_url(&SecretUrl::new("amqps://h/%2f"), DEFAULT_HEARTBEAT_SECS).unwrap();
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
        assert_eq!(e.uri.query.heartbeat, Some(7));
        s.url = SecretUrl::new("amqp://h/%2f?heartbeat=30");
        let e = Endpoint::new(&s, "t", 7).await.unwrap();
        assert_eq!(e.uri.query.heartbeat, Some(30));
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
}
