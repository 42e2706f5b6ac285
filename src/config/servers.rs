//! The server lists: `broker.nats.url` (and `state.nats_url`) and `broker.amqp.url`, each one
//! URL or several, comma-separated.
//!
//! NATS: the seed list of a cluster. async-nats parses a `&str` as one server only, so
//! `nats://a:1,nats://b:2` would fail with "invalid port number"; the bridge splits the list
//! itself and hands the client every server, which then connects to any of them and reconnects
//! across all of them (plus the servers the cluster announces).
//!
//! RabbitMQ: the nodes of a cluster. lapin connects to one URL and never fails over, so the
//! bridge keeps the list ([`amqp_nodes`]) and `crate::broker::amqp::endpoint` tries the nodes
//! in turn. Parsed here once, so `check-config` and every command refuse a bad list alike.

use async_nats::ServerAddr;
use lapin::uri::AMQPUri;

use super::{SecretUrl, redact_url};

/// `broker.nats.url` is not a list of NATS servers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServerListError {
    /// One entry does not parse (shown with its password masked).
    #[error("server {position} ({shown}) is invalid: {source}")]
    Invalid {
        /// 1-based position in the list.
        position: usize,
        /// The entry, password masked.
        shown: String,
        /// async-nats' reason.
        #[source]
        source: std::io::Error,
    },
    /// Only blanks and commas.
    #[error("names no server")]
    Empty,
}

/// Every server of `urls` (comma-separated, blanks around commas allowed, empty entries
/// skipped). A server without a scheme is `nats://`, one without a port is on 4222, as with
/// `nats-server`'s own tools.
pub(crate) fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, ServerListError> {
    let mut out = Vec::new();
    for (i, part) in urls.split(',').map(str::trim).enumerate() {
        if part.is_empty() {
            continue;
        }
        let addr = part
            .parse::<ServerAddr>()
            .map_err(|source| ServerListError::Invalid {
                position: i + 1,
                shown: redact_url(part),
                source,
            })?;
        out.push(addr);
    }
    if out.is_empty() {
        return Err(ServerListError::Empty);
    }
    Ok(out)
}

/// `broker.amqp.url` is not a list of RabbitMQ nodes. Every entry is shown with its password
/// masked: lapin's own parse errors quote the whole URL, so they are masked too.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AmqpListError {
    /// One entry is not an `amqp://` or `amqps://` URL lapin can use.
    #[error("URL {position} ({shown}) is not an amqp:// or amqps:// URL: {reason}")]
    Invalid {
        /// 1-based position in the list.
        position: usize,
        /// The entry, password masked.
        shown: String,
        /// lapin's reason (a plain string: its parser has no error type), password masked.
        reason: String,
    },
    /// One entry names another vhost than the first. The topology (exchanges, queues) lives
    /// in one vhost: a failover into another would publish where no consumer reads.
    #[error(
        "URL {position} ({shown}) names vhost {vhost:?} but URL {first_position} names \
         {first:?}: every node must be asked for the same vhost"
    )]
    OtherVhost {
        /// 1-based position in the list.
        position: usize,
        /// The entry, password masked.
        shown: String,
        /// Its vhost.
        vhost: String,
        /// 1-based position of the first entry.
        first_position: usize,
        /// The first entry's vhost.
        first: String,
    },
    /// One entry names the same host and port as an earlier one: a round would try that node
    /// twice, and a copy-paste slip would hide the node that was meant.
    #[error("URL {position} ({shown}) names the same node as URL {earlier}")]
    Repeated {
        /// 1-based position in the list.
        position: usize,
        /// The entry, password masked.
        shown: String,
        /// 1-based position of the earlier entry.
        earlier: usize,
    },
    /// Only blanks and commas.
    #[error("names no URL")]
    Empty,
}

/// One node of `broker.amqp.url`: lapin's reading of its URL, and the URL as logs and errors
/// show it. Its `Debug` shows the latter only: the parsed URL holds the password.
#[derive(Clone)]
pub(crate) struct AmqpNode {
    /// The parsed URL, password included (for connecting only).
    pub uri: AMQPUri,
    /// The URL as written, password masked.
    pub shown: String,
    /// 1-based position in the list as written, for errors that point at an entry.
    pub position: usize,
}

impl std::fmt::Debug for AmqpNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpNode")
            .field("url", &self.shown)
            .field("position", &self.position)
            .finish()
    }
}

/// Every node of `urls` (comma-separated, blanks around commas allowed, empty entries skipped,
/// as in `broker.nats.url`), in the order given: the order the bridge tries them in. Each must
/// be `amqp://` or `amqps://`, all must name the same vhost, and no node may be named twice.
pub(crate) fn amqp_nodes(urls: &SecretUrl) -> Result<Vec<AmqpNode>, AmqpListError> {
    let mut nodes: Vec<AmqpNode> = Vec::new();
    for (i, part) in urls.expose().split(',').map(str::trim).enumerate() {
        if part.is_empty() {
            continue;
        }
        let position = i + 1;
        let shown = redact_url(part);
        let uri: AMQPUri = part
            .parse()
            .map_err(|reason: String| AmqpListError::Invalid {
                position,
                // The parser quotes the URL it was given, password included.
                reason: reason.replace(part, &shown),
                shown: shown.clone(),
            })?;
        if let Some(first) = nodes.first()
            && first.uri.vhost != uri.vhost
        {
            return Err(AmqpListError::OtherVhost {
                position,
                shown,
                vhost: uri.vhost,
                first_position: first.position,
                first: first.uri.vhost.clone(),
            });
        }
        let same = |n: &&AmqpNode| {
            n.uri
                .authority
                .host
                .eq_ignore_ascii_case(&uri.authority.host)
                && n.uri.authority.port == uri.authority.port
        };
        if let Some(earlier) = nodes.iter().find(same) {
            return Err(AmqpListError::Repeated {
                position,
                shown,
                earlier: earlier.position,
            });
        }
        nodes.push(AmqpNode {
            uri,
            shown,
            position,
        });
    }
    if nodes.is_empty() {
        return Err(AmqpListError::Empty);
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_or_several_servers() {
        let one = server_addrs("nats://127.0.0.1:4222").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].port(), 4222);
        let three =
            server_addrs("nats://127.0.0.1:14221,nats://127.0.0.1:14222, nats://127.0.0.1:14223 ,")
                .unwrap();
        let ports: Vec<u16> = three.iter().map(|a| a.port()).collect();
        assert_eq!(ports, [14221, 14222, 14223]);
        let bare = server_addrs("h1:1,h2").unwrap();
        assert_eq!(bare[0].host(), "h1");
        assert_eq!(bare[1].port(), 4222);
        let tls = server_addrs("tls://u:p@h:4443,tls://h2:4443").unwrap();
        assert!(tls.iter().all(|a| a.tls_required()));
    }

    #[test]
    fn errors_name_the_entry_without_its_password() {
        let e = server_addrs("nats://a:1,nats://u:hunter2@b:notaport")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server 2"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        assert!(server_addrs(" , ").is_err());
        assert!(server_addrs("http://h:1").is_err());
    }

    #[test]
    fn amqp_lists_keep_their_order_and_skip_blanks() {
        let nodes = amqp_nodes(&SecretUrl::new(
            "amqp://u:p@h1:5672/%2f, amqps://u:p@h2/%2f ,amqp://h3:5673/%2f,",
        ))
        .unwrap();
        let hosts: Vec<(&str, u16)> = nodes
            .iter()
            .map(|n| (n.uri.authority.host.as_str(), n.uri.authority.port))
            .collect();
        assert_eq!(hosts, [("h1", 5672), ("h2", 5671), ("h3", 5673)]);
        assert_eq!(nodes[0].shown, "amqp://u:***@h1:5672/%2f");
        assert_eq!(nodes[2].position, 3);
        assert!(nodes.iter().all(|n| n.uri.vhost == "/"));
        let one = amqp_nodes(&SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f")).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].uri.authority.host, "127.0.0.1");
        assert!(!format!("{nodes:?}").contains(":p@"), "{nodes:?}");
    }

    #[test]
    fn amqp_list_errors_name_the_entry_without_any_password() {
        let err = |urls: &str| amqp_nodes(&SecretUrl::new(urls)).unwrap_err().to_string();
        let e = err("amqp://u:hunter2@h1/%2f,http://u:hunter3@h2/%2f");
        assert!(e.starts_with("URL 2 (http://u:***@h2/%2f)"), "{e}");
        assert!(!e.contains("hunter"), "{e}");
        // lapin's own message quotes the URL: masked too.
        let e = err("amqp://u:hunter2@h1:notaport/%2f");
        assert!(e.contains("URL 1") && !e.contains("hunter2"), "{e}");
        let e = err("amqp://u:hunter2@h1/%2f,amqp://u:hunter2@h2/other");
        assert!(e.contains("vhost \"other\"") && e.contains("\"/\""), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("amqp://u:hunter2@h1:5672/%2f,amqp://u:x@H1/%2f");
        assert!(
            e.contains("URL 2") && e.contains("same node as URL 1"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(err(" , "), "names no URL");
    }
}
