//! How the bridge reaches RabbitMQ: the parsed URL (with a default heartbeat), TLS for
//! `amqps://` (rustls with ring; the system roots plus `broker.amqp.tls_ca_file`), and the
//! client properties that name the connection.

use lapin::ConnectionProperties;
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::broker::BrokerError;
use crate::config::{AmqpSettings, SecretUrl};

/// Heartbeat asked for when the URL does not set one: a peer that vanished without closing the
/// TCP connection is noticed within about two intervals.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Largest frame asked for when the URL does not set one (`?frame_max=`). lapin keeps 32
/// frames' worth of read and of write buffer, zero-filled, so RabbitMQ's 128 KiB default costs
/// 8 MiB of resident memory; with 32 KiB it is 2 MiB. Event messages are a few KiB, and a larger
/// one is simply split into more frames.
pub const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Parses `broker.amqp.url`. Errors show the URL with its password replaced.
pub fn parse_url(url: &SecretUrl) -> Result<AMQPUri, BrokerError> {
    let mut uri: AMQPUri = url.expose().parse().map_err(|e: String| {
        // The parser quotes the whole URL, password included.
        let e = e.replace(url.expose(), &url.redacted());
        BrokerError::Connect(format!(
            "broker.amqp.url {} is not an amqp:// or amqps:// URL: {e}",
            url.redacted()
        ))
    })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
    }
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
    }
    Ok(uri)
}

/// The TLS settings for the connection: the CA of `broker.amqp.tls_ca_file` (PEM) is trusted in
/// addition to the system's roots. A CA file with a plain `amqp://` URL is refused: the
/// operator asked for TLS and would not get it.
pub async fn tls_config(s: &AmqpSettings, uri: &AMQPUri) -> Result<OwnedTLSConfig, BrokerError> {
    let mut config = OwnedTLSConfig::default();
    let Some(path) = &s.tls_ca_file else {
        return Ok(config);
    };
    if uri.scheme != AMQPScheme::AMQPS {
        return Err(BrokerError::Connect(
            "broker.amqp.tls_ca_file is set but broker.amqp.url is not amqps://".into(),
        ));
    }
    let pem = tokio::fs::read_to_string(path).await.map_err(|e| {
        BrokerError::Connect(format!(
            "cannot read broker.amqp.tls_ca_file {}: {e}",
            path.display()
        ))
    })?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(BrokerError::Connect(format!(
            "broker.amqp.tls_ca_file {} holds no PEM certificate",
            path.display()
        )));
    }
    config.cert_chain = Some(pem);
    Ok(config)
}

/// Client properties: `connection_name` from `broker.amqp.connection_name`.
pub fn connection_properties(s: &AmqpSettings) -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name(s.connection_name.as_str().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_errors_never_show_the_password() {
        let err = parse_url(&SecretUrl::new("http://u:hunter2@h/%2f"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("broker.amqp.url"), "{err}");
    }

    #[test]
    fn heartbeat_and_frame_max_default_but_explicit_ones_win() {
        let uri = parse_url(&SecretUrl::new("amqp://g:g@127.0.0.1:5672/%2f")).unwrap();
        assert_eq!(uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        assert_eq!(uri.query.frame_max, Some(DEFAULT_FRAME_MAX));
        assert_eq!(uri.vhost, "/");
        let uri = parse_url(&SecretUrl::new(
            "amqps://h/%2f?heartbeat=30&frame_max=131072",
        ))
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
        let plain = parse_url(&SecretUrl::new("amqp://h/%2f")).unwrap();
        let err = tls_config(&s, &plain).await.unwrap_err().to_string();
        assert!(err.contains("amqps://"), "{err}");
        let tls = parse_url(&SecretUrl::new("amqps://h/%2f")).unwrap();
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
}
