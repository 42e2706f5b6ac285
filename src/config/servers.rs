//! The server list of `broker.nats.url` (and `state.nats_url`): one URL or several, comma-separated (the seed list of a
//! NATS cluster). async-nats parses a `&str` as one server only, so `nats://a:1,nats://b:2`
//! would fail with "invalid port number"; the bridge splits the list itself and hands the
//! client every server, which then connects to any of them and reconnects across all of them
//! (plus the servers the cluster announces).

use async_nats::ServerAddr;

use super::redact_url;

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
}
