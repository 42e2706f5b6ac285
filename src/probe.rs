//! The client side of the operations commands: the bridge's own URL derived from
//! `server.listen`, one bounded HTTP request, and the `healthcheck` probe.
//!
//! `healthcheck` exists so a container image needs no `curl`: Docker's `HEALTHCHECK` (or any
//! supervisor) runs `pusher-bridge healthcheck`, which GETs `/healthz` of the configured listen
//! address and exits 0 or 1. `send-test` ([`crate::sendtest`]) posts through the same client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::{ConfigError, Settings};

/// At most this much of an answer's body is read (the bridge's answers are a few bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why a probe or test request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The URL cannot be used (not `http://host[:port]/path`).
    #[error("invalid URL `{url}`: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration does not name a usable listen address.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Connecting or exchanging the request failed.
    #[error("request to {url} failed: {reason}")]
    Request {
        /// Where the request went.
        url: String,
        /// The client's error.
        reason: String,
    },
    /// No complete answer within the timeout.
    #[error("no answer from {url} within {timeout:?}")]
    Timeout {
        /// Where the request went.
        url: String,
        /// The limit that passed.
        timeout: Duration,
    },
}

/// An HTTP answer: status and (at most `MAX_ANSWER_BYTES` of) the body as text.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// The status code.
    pub status: StatusCode,
    /// The body, lossily decoded as UTF-8.
    pub body: String,
}

/// `http://<addr>` for reaching the bridge on the machine it runs on: an unspecified listen
/// address (`0.0.0.0`, `[::]`) is mapped to the loopback address of its family.
pub(crate) fn local_base_url(settings: &Settings) -> Result<String, ConfigError> {
    Ok(local_url(settings.listen_addr()?))
}

/// `http://<addr>` of the probes and `/metrics`: `server.admin_listen` when it is set, else
/// `server.listen` (as [`local_base_url`]).
pub(crate) fn local_admin_url(settings: &Settings) -> Result<String, ConfigError> {
    match settings.admin_addr()? {
        Some(addr) => Ok(local_url(addr)),
        None => local_base_url(settings),
    }
}

fn local_url(mut addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    format!("http://{addr}")
}

/// Parses `url` and checks it is plain `http://` (the client has no TLS).
pub(crate) fn parse_http_url(url: &str) -> Result<Uri, ProbeError> {
    let bad = |reason: &str| ProbeError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => return Err(bad("only http:// URLs are supported")),
        None => return Err(bad("must start with http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(uri)
}

/// Sends one request and reads the answer, all within `timeout`.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<HttpAnswer, ProbeError> {
    let uri = parse_http_url(url)?;
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body)).map_err(|e| ProbeError::Url {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let failed = |reason: String| ProbeError::Request {
        url: url.to_string(),
        reason,
    };
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| failed(format!("{e:#}")))?;
        let status = response.status();
        let limited = Limited::new(response.into_body(), MAX_ANSWER_BYTES);
        let body = limited
            .collect()
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok(HttpAnswer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::Timeout {
            url: url.to_string(),
            timeout,
        })?
}

/// GETs `path` (`/healthz`, or `/readyz` for readiness) on the bridge configured by
/// `settings` (on `server.admin_listen` when set). Any answer is returned; the caller decides
/// that only 200 is healthy.
pub async fn healthcheck(
    settings: &Settings,
    path: &str,
    timeout: Duration,
) -> Result<(String, HttpAnswer), ProbeError> {
    let url = format!("{}{path}", local_admin_url(settings)?);
    let answer = send(Method::GET, &url, &[], Bytes::new(), timeout).await?;
    Ok((url, answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_listen(listen: &str) -> Settings {
        let mut s = Settings::default();
        s.server.listen = listen.into();
        s
    }

    #[test]
    fn unspecified_addresses_map_to_loopback() {
        let url = |l: &str| local_base_url(&with_listen(l)).unwrap();
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(url("[::]:9000"), "http://[::1]:9000");
        assert_eq!(url("10.1.2.3:80"), "http://10.1.2.3:80");
        assert_eq!(url("127.0.0.1:8080"), "http://127.0.0.1:8080");
    }

    #[test]
    fn only_plain_http_urls_pass() {
        assert!(parse_http_url("http://127.0.0.1:8080/pusher/webhooks").is_ok());
        for bad in [
            "https://h/x",
            "127.0.0.1:8080/x",
            "ftp://h/",
            "http:///x",
            "not a url",
        ] {
            assert!(parse_http_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn unreachable_port_is_an_error_not_a_hang() {
        // Bind and drop a listener: nothing listens on that port afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let settings = with_listen(&format!("127.0.0.1:{port}"));
        let err = healthcheck(&settings, "/healthz", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Request { .. }), "{err}");
    }
}
