//! The query API: Pusher's HTTP API paths, JSON shapes and request signing, so that Pusher's
//! server SDKs read the state with their host and port pointed at the bridge.
//!
//! - `GET /apps/{app_id}/channels[?filter_by_prefix=P][&info=user_count,subscription_count]`
//! - `GET /apps/{app_id}/channels/{channel}[?info=user_count,subscription_count]`
//! - `GET /apps/{app_id}/channels/{channel}/users`
//!
//! Signing (as the SDKs sign): query parameters `auth_key`, `auth_timestamp` (within 600 s of
//! now), `auth_version=1.0`, `auth_signature` = hex HMAC-SHA256(secret, `GET\n<path>\n<query>`)
//! where `<query>` is every other parameter (percent-decoded, keys lower-cased) sorted by key
//! and joined as `k=v` with `&`; `body_md5`, when a client sends one, is signed like any other.
//! Answers: 200 JSON; 400 a `user_count` / `users` question about a channel that is not a
//! presence channel; 401 unsigned, wrongly signed, stale, or signed with another app's key;
//! 404 an unknown app id or path; 405 not GET; 503 the KV cannot be read.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::StateError;
use super::store::StateStore;
use crate::config::Settings;
use crate::webhook::Apps;

/// How far `auth_timestamp` may be from the bridge's clock, as Pusher allows.
pub(crate) const MAX_CLOCK_SKEW_SECS: i64 = 600;
/// A query that cannot read the KV within this long gets 503 (rather than hanging while NATS
/// is away: the client's requests wait for a reconnect).
pub(crate) const QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A refused query and its status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueryError {
    /// 400: a question the channel cannot answer (e.g. `user_count` of a public channel).
    #[error("{0}")]
    BadRequest(String),
    /// 401: unsigned, wrong signature, stale timestamp or foreign key.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404: unknown app or path.
    #[error("{0}")]
    NotFound(&'static str),
    /// 405: not GET.
    #[error("only GET is supported")]
    MethodNotAllowed,
    /// 503: the state could not be read.
    #[error("channel state unavailable: {0}")]
    Unavailable(#[source] StateError),
}

impl QueryError {
    /// The HTTP status of the refusal (the whole mapping, in one place).
    pub fn status(&self) -> u16 {
        match self {
            QueryError::BadRequest(_) => 400,
            QueryError::Unauthorized(_) => 401,
            QueryError::NotFound(_) => 404,
            QueryError::MethodNotAllowed => 405,
            QueryError::Unavailable(_) => 503,
        }
    }
}

/// The query API of one bridge: the app keys and a reader of the state bucket.
pub(crate) struct StateApi {
    /// The bridge's app keys (replaced on a reload).
    apps: Arc<Apps>,
    client: async_nats::Client,
    bucket: String,
    replicas: usize,
    /// Opened on the first query that needs it (NATS may be away when the bridge starts).
    store: tokio::sync::OnceCell<StateStore>,
}

/// What the path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Query {
    Channels,
    Channel(String),
    Users(String),
}

/// Percent-decodes a query or path component (`+` is a space in query strings only). Stricter
/// than the crate it uses, which keeps a malformed escape as it is: a signed query holding a
/// `%` without two hex digits, or bytes that are not UTF-8, is refused (`None`, a 400).
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let well_formed = s.split('%').skip(1).all(|after| {
        after
            .get(..2)
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if !well_formed {
        return None;
    }
    let spaced;
    let s = if plus_is_space && s.contains('+') {
        spaced = s.replace('+', " ");
        &spaced
    } else {
        s
    };
    let decoded = percent_encoding::percent_decode_str(s).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

/// The query parameters, decoded; `None` when one is malformed or repeated.
fn parse_query(query: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true)?.to_ascii_lowercase();
        let v = percent_decode(v, true)?;
        if out.insert(k, v).is_some() {
            return None;
        }
    }
    Some(out)
}

/// The string Pusher signs: `GET\n<path>\n<sorted k=v&...>` (without `auth_signature`).
pub(crate) fn string_to_sign(
    method: &str,
    path: &str,
    params: &BTreeMap<String, String>,
) -> String {
    let query: Vec<String> = params
        .iter()
        .filter(|(k, _)| k.as_str() != "auth_signature")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{method}\n{path}\n{}", query.join("&"))
}

/// The `info` attributes asked for.
fn info(params: &BTreeMap<String, String>) -> HashSet<&str> {
    params
        .get("info")
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn is_presence(channel: &str) -> bool {
    channel.starts_with("presence-")
}

impl StateApi {
    /// The API for the bridge's `apps`, reading the state bucket of `settings` through `client`.
    pub fn new(settings: &Settings, client: async_nats::Client, apps: Arc<Apps>) -> Self {
        Self {
            apps,
            client,
            bucket: settings.state.bucket.clone(),
            replicas: settings.broker.nats.replicas,
            store: tokio::sync::OnceCell::new(),
        }
    }

    async fn store(&self) -> Result<&StateStore, QueryError> {
        self.store
            .get_or_try_init(|| StateStore::open(self.client.clone(), &self.bucket, self.replicas))
            .await
            .map_err(QueryError::Unavailable)
    }

    /// Answers one request: `path` as received (raw), `query` the raw query string.
    pub async fn answer(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
        now_secs: i64,
    ) -> Result<Value, QueryError> {
        if method != "GET" && method != "HEAD" {
            return Err(QueryError::MethodNotAllowed);
        }
        let (app_id, what) = route(path)?;
        if !self.apps.current().has_app(&app_id) {
            return Err(QueryError::NotFound("unknown app"));
        }
        let params = parse_query(query.unwrap_or("")).ok_or(QueryError::Unauthorized(
            "malformed or repeated query parameter",
        ))?;
        self.authenticate(&app_id, path, &params, now_secs)?;
        match what {
            Query::Channels => self.channels(&app_id, &params).await,
            Query::Channel(channel) => self.channel(&app_id, &channel, &params).await,
            Query::Users(channel) => self.users(&app_id, &channel).await,
        }
    }

    fn authenticate(
        &self,
        app_id: &str,
        path: &str,
        params: &BTreeMap<String, String>,
        now_secs: i64,
    ) -> Result<(), QueryError> {
        let (Some(key), Some(ts), Some(version), Some(signature)) = (
            params.get("auth_key"),
            params.get("auth_timestamp"),
            params.get("auth_version"),
            params.get("auth_signature"),
        ) else {
            return Err(QueryError::Unauthorized(
                "auth_key, auth_timestamp, auth_version and auth_signature are required",
            ));
        };
        if version != "1.0" {
            return Err(QueryError::Unauthorized("auth_version must be 1.0"));
        }
        let apps = self.apps.current();
        let app = apps
            .get(key)
            .filter(|a| &*a.app_id == app_id)
            .ok_or(QueryError::Unauthorized("unknown auth_key for this app"))?;
        let ts: i64 = ts
            .parse()
            .map_err(|_| QueryError::Unauthorized("auth_timestamp is not a number"))?;
        if (now_secs - ts).abs() > MAX_CLOCK_SKEW_SECS {
            return Err(QueryError::Unauthorized(
                "auth_timestamp is more than 600 s away from the server's clock",
            ));
        }
        // The SDKs sign the path as they send it; a client that percent-encodes the path may
        // have signed either form.
        let decoded = percent_decode(path, false);
        let candidates = std::iter::once(path).chain(decoded.as_deref().filter(|d| *d != path));
        for p in candidates {
            if app.verify(
                string_to_sign("GET", p, params).as_bytes(),
                signature.as_bytes(),
            ) {
                return Ok(());
            }
        }
        Err(QueryError::Unauthorized("invalid signature"))
    }

    async fn channels(
        &self,
        app_id: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<Value, QueryError> {
        let prefix = params
            .get("filter_by_prefix")
            .map(String::as_str)
            .unwrap_or("");
        let info = info(params);
        if info.contains("user_count") && !prefix.starts_with("presence-") {
            return Err(QueryError::BadRequest(
                "user_count may only be requested with filter_by_prefix=presence-".into(),
            ));
        }
        let store = self.store().await?;
        let records = store
            .channels(app_id)
            .await
            .map_err(QueryError::Unavailable)?;
        // One read of the app's members for every channel's user_count.
        let mut members: std::collections::HashMap<String, Vec<super::merge::MemberRecord>> =
            std::collections::HashMap::new();
        if info.contains("user_count") {
            for m in store
                .app_members(app_id)
                .await
                .map_err(QueryError::Unavailable)?
            {
                if let super::keys::Parsed::Member { channel, .. } = m.key {
                    members.entry(channel).or_default().push(m.record);
                }
            }
        }
        let mut channels = Map::new();
        for stored in records {
            let super::keys::Parsed::Channel { channel, .. } = stored.key else {
                continue;
            };
            if !stored.record.occupied || !channel.starts_with(prefix) {
                continue;
            }
            let mut attrs = Map::new();
            if info.contains("user_count") && is_presence(&channel) {
                let count = members.get(&channel).map_or(0, |ms| {
                    ms.iter().filter(|m| stored.record.counts_member(m)).count()
                });
                attrs.insert("user_count".into(), json!(count));
            }
            if info.contains("subscription_count")
                && let Some(n) = stored.record.current_subscription_count()
            {
                attrs.insert("subscription_count".into(), json!(n));
            }
            channels.insert(channel, Value::Object(attrs));
        }
        Ok(json!({ "channels": channels }))
    }

    async fn channel(
        &self,
        app_id: &str,
        channel: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<Value, QueryError> {
        let info = info(params);
        if info.contains("user_count") && !is_presence(channel) {
            return Err(QueryError::BadRequest(
                "user_count is only available for presence channels".into(),
            ));
        }
        let store = self.store().await?;
        let record = store
            .channel(app_id, channel)
            .await
            .map_err(QueryError::Unavailable)?
            .unwrap_or_default();
        let mut out = Map::new();
        out.insert("occupied".into(), json!(record.occupied));
        if info.contains("user_count") {
            let members = store.present_members(app_id, channel).await;
            let count = members.map_err(QueryError::Unavailable)?.len();
            out.insert("user_count".into(), json!(count));
        }
        if info.contains("subscription_count")
            && let Some(n) = record.current_subscription_count()
        {
            out.insert("subscription_count".into(), json!(n));
        }
        Ok(Value::Object(out))
    }

    async fn users(&self, app_id: &str, channel: &str) -> Result<Value, QueryError> {
        if !is_presence(channel) {
            return Err(QueryError::BadRequest(
                "users are only available for presence channels".into(),
            ));
        }
        let store = self.store().await?;
        let users = store.present_members(app_id, channel).await;
        let users: Vec<Value> = users
            .map_err(QueryError::Unavailable)?
            .into_iter()
            .map(|id| json!({ "id": id }))
            .collect();
        Ok(json!({ "users": users }))
    }
}

/// `/apps/{app_id}/channels[/{channel}[/users]]` → (app id, query).
fn route(path: &str) -> Result<(String, Query), QueryError> {
    const NOT_FOUND: QueryError = QueryError::NotFound("no such path");
    let rest = path.strip_prefix("/apps/").ok_or(NOT_FOUND)?;
    let mut parts = rest.split('/');
    let app_id = parts
        .next()
        .and_then(|a| percent_decode(a, false))
        .ok_or(NOT_FOUND)?;
    if parts.next() != Some("channels") {
        return Err(NOT_FOUND);
    }
    let channel = parts.next().map(|c| percent_decode(c, false));
    let users = parts.next();
    if parts.next().is_some() || app_id.is_empty() {
        return Err(NOT_FOUND);
    }
    match (channel, users) {
        (None, None) => Ok((app_id, Query::Channels)),
        (Some(Some(c)), None) if !c.is_empty() => Ok((app_id, Query::Channel(c))),
        (Some(Some(c)), Some("users")) if !c.is_empty() => Ok((app_id, Query::Users(c))),
        _ => Err(NOT_FOUND),
    }
}

/// The answer when `[state]` is off: 404 that says so (no signature is checked: nothing is
/// revealed).
pub(crate) fn disabled_body() -> Value {
    json!({ "error": "channel state is off: set [state] enabled = true" })
}

/// The status and JSON body for a request under `/apps/` (`api` is `None` when `[state]` is
/// off: 404 saying so).
pub(crate) async fn http_answer(
    method: &hyper::Method,
    uri: &hyper::Uri,
    api: Option<&StateApi>,
) -> (hyper::StatusCode, Value) {
    let Some(api) = api else {
        return (hyper::StatusCode::NOT_FOUND, disabled_body());
    };
    let now = i64::try_from(crate::broker::now_ms() / 1000).unwrap_or(i64::MAX);
    let answer = tokio::time::timeout(
        QUERY_TIMEOUT,
        api.answer(method.as_str(), uri.path(), uri.query(), now),
    )
    .await
    .unwrap_or_else(|_| {
        Err(QueryError::Unavailable(StateError::Kv {
            what: "reading the state",
            source: "timed out".into(),
        }))
    });
    match answer {
        Ok(body) => (hyper::StatusCode::OK, body),
        Err(e) => {
            if let QueryError::Unavailable(source) = &e {
                tracing::warn!(error = %source, "state query failed");
            }
            let status = hyper::StatusCode::from_u16(e.status())
                .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
            (status, json!({ "error": e.to_string() }))
        }
    }
}

/// Shared handle, for the HTTP layer.
pub(crate) type SharedApi = Arc<StateApi>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route("/apps/1/channels").unwrap(),
            ("1".into(), Query::Channels)
        );
        assert_eq!(
            route("/apps/1/channels/presence-a.b%40c").unwrap(),
            ("1".into(), Query::Channel("presence-a.b@c".into()))
        );
        assert_eq!(
            route("/apps/1/channels/presence-x/users").unwrap(),
            ("1".into(), Query::Users("presence-x".into()))
        );
        for bad in [
            "/apps/1",
            "/apps/1/events",
            "/apps/1/channels/x/members",
            "/apps/1/channels/x/users/y",
            "/apps//channels",
            "/apps/1/channels/",
        ] {
            assert!(route(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signing_string_is_pushers() {
        let params = parse_query(
            "auth_key=k&auth_timestamp=10&auth_version=1.0&info=user_count,subscription_count&filter_by_prefix=presence-&auth_signature=x",
        )
        .unwrap();
        assert_eq!(
            string_to_sign("GET", "/apps/1/channels", &params),
            "GET\n/apps/1/channels\nauth_key=k&auth_timestamp=10&auth_version=1.0&filter_by_prefix=presence-&info=user_count,subscription_count"
        );
        // Percent-encoded values are signed decoded; upper-case keys are lower-cased.
        let params = parse_query("INFO=user_count%2Csubscription_count").unwrap();
        assert_eq!(params["info"], "user_count,subscription_count");
        assert!(parse_query("a=1&a=2").is_none());
        assert!(parse_query("a=%zz").is_none());
        for malformed in ["a=%", "a=%4", "a=%+f", "a=%é1", "a=%ff"] {
            assert!(parse_query(malformed).is_none(), "{malformed}");
        }
        let params = parse_query("q=a+b%2Bc%20d&e=%C3%A9").unwrap();
        assert_eq!(
            (params["q"].as_str(), params["e"].as_str()),
            ("a b+c d", "é")
        );
        assert_eq!(percent_decode("a+b%2F", false).as_deref(), Some("a+b/"));
    }
}
