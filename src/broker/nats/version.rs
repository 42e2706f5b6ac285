//! The version of the NATS server a client is connected to, and the releases that changed what
//! the bridge must do: it applies each workaround only below the release that fixed its bug, and
//! uses a feature only from the release that brought it, detected at connect, never assumed.

use std::fmt;

/// A nats-server release, as its `INFO` names it (`2.9.10`, `2.11.0-RC.1`: the suffix is left
/// out, so a release candidate counts as its release).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl ServerVersion {
    /// A release.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `2.10.25`, `v2.9.10`, `2.11.0-RC.1`; `None` for anything else (an empty version
    /// before the first connect).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_start_matches('v');
        let core = text.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().unwrap_or(Some(0))?;
        Some(Self::new(major, minor, patch))
    }

    /// The version of the server `client` is connected to now (`None` before the first connect).
    pub fn of(client: &async_nats::Client) -> Option<Self> {
        Self::parse(&client.server_info().version)
    }

    /// The version of the server `client` is connected to, waiting up to 2 s for it: the
    /// client reports "connected" a moment before it stores the server's `INFO`, so right
    /// after a connect [`ServerVersion::of`] can still say `None`.
    pub async fn of_connected(client: &async_nats::Client) -> Option<Self> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            if let Some(v) = Self::of(client) {
                return Some(v);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// NATS before 2.9.17 lets a restarted replica answer direct gets before it has caught up
    /// (nats-server#4162): below it, buckets whose reads must be current turn direct gets off.
    pub const DIRECT_GETS_CURRENT: Self = Self::new(2, 9, 17);

    /// NATS before 2.9.21 takes two compare-and-sets naming the same revision when both are in
    /// flight on a replicated stream (nats-server#4320): below it, a state writer reads its
    /// write back.
    pub const CAS_EXACT: Self = Self::new(2, 9, 21);

    /// NATS 2.10 brought consumers filtered by several subjects (`filter_subjects`).
    pub const MULTI_FILTER: Self = Self::new(2, 10, 0);

    /// NATS 2.11 brought per-message TTLs (`allow_msg_ttl`, the `Nats-TTL` header).
    pub const MESSAGE_TTL: Self = Self::new(2, 11, 0);

    /// Whether this release has what `since` brought (or fixed).
    pub fn has(self, since: Self) -> bool {
        self >= since
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Whether a server of `version` has what `since` brought. An unknown version (no `INFO` yet,
/// or one that does not parse) counts as old for what the bridge does itself: a workaround
/// that changes nothing of the server's is safe on any server, a feature is not.
pub(crate) fn has(version: Option<ServerVersion>, since: ServerVersion) -> bool {
    version.is_some_and(|v| v.has(since))
}

/// Whether a server of `version` is known to predate `fixed`: the workarounds that change an
/// operator's settings (direct gets off) apply only then, never on a server whose version is
/// not known yet.
pub(crate) fn known_before(version: Option<ServerVersion>, fixed: ServerVersion) -> bool {
    version.is_some_and(|v| !v.has(fixed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_as_servers_send_them() {
        assert_eq!(
            ServerVersion::parse("2.9.10"),
            Some(ServerVersion::new(2, 9, 10))
        );
        assert_eq!(
            ServerVersion::parse("v2.11.0-RC.1"),
            Some(ServerVersion::new(2, 11, 0))
        );
        assert_eq!(
            ServerVersion::parse("2.15.1+build"),
            Some(ServerVersion::new(2, 15, 1))
        );
        assert_eq!(
            ServerVersion::parse("2.10"),
            Some(ServerVersion::new(2, 10, 0))
        );
        assert_eq!(ServerVersion::parse(""), None);
        assert_eq!(ServerVersion::parse("two.nine"), None);
    }

    #[test]
    fn each_workaround_stops_at_its_fix_and_each_feature_starts_at_its_release() {
        let v = |s| ServerVersion::parse(s);
        assert!(!has(v("2.9.10"), ServerVersion::DIRECT_GETS_CURRENT));
        assert!(has(v("2.9.17"), ServerVersion::DIRECT_GETS_CURRENT));
        assert!(!has(v("2.9.20"), ServerVersion::CAS_EXACT));
        assert!(has(v("2.9.21"), ServerVersion::CAS_EXACT));
        assert!(has(v("2.15.1"), ServerVersion::CAS_EXACT));
        assert!(!has(v("2.9.25"), ServerVersion::MULTI_FILTER));
        assert!(has(v("2.10.25"), ServerVersion::MULTI_FILTER));
        assert!(!has(v("2.10.26"), ServerVersion::MESSAGE_TTL));
        assert!(has(v("2.11.0-RC.1"), ServerVersion::MESSAGE_TTL));
        assert!(has(v("3.0.0"), ServerVersion::MESSAGE_TTL));
        // Unknown: old for what the bridge does itself, but no operator setting is changed.
        assert!(!has(None, ServerVersion::DIRECT_GETS_CURRENT));
        assert!(!known_before(None, ServerVersion::DIRECT_GETS_CURRENT));
        assert!(known_before(
            v("2.9.10"),
            ServerVersion::DIRECT_GETS_CURRENT
        ));
        assert!(!known_before(
            v("2.9.17"),
            ServerVersion::DIRECT_GETS_CURRENT
        ));
    }
}
