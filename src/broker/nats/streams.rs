//! Streams as the server describes them: the bridge reads a stream's config as JSON, changes
//! only the fields it owns, and sends every other field back exactly as the server wrote it.
//!
//! A client library's stream struct knows the fields of the server it was written for; one
//! built for NATS 2.9 drops what 2.10 and later added (compression, metadata, `allow_msg_ttl`,
//! whatever comes next) when it re-serialises a config, which stripped an operator's settings
//! and made 2.11 refuse the update (`message TTL status can not be disabled`). So the bridge
//! never re-serialises a config: [`ensure`] keeps each field's JSON text and touches only
//! [`Owned`]'s, and sends nothing when none of those differs. The same function declares the
//! events and dead-letter streams and the KV buckets the bridge keeps (channel state, the
//! sweeper's lease and cursor).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::version::{self, ServerVersion};

/// A stream config as the server sent it: each field's JSON text as it came.
pub(crate) type RawConfig = BTreeMap<String, Box<RawValue>>;

/// What the bridge owns on one stream; every other field is the operator's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Owned {
    /// Subjects the stream must take: added when missing, an operator's others stay.
    pub subjects: Vec<String>,
    /// The duplicate window is raised to this when shorter, never shortened (a longer window
    /// only drops more duplicates).
    pub duplicate_window: Option<Duration>,
    /// Replicas are raised to this when fewer, never lowered (an operator's R5 stays R5). Best
    /// effort, in an update of its own: a cluster with too few servers refuses, and the stream
    /// works as it is meanwhile.
    pub replicas: usize,
    /// `Some`: direct gets must be so (only where a server's bug needs them off); `None`: the
    /// operator's.
    pub allow_direct: Option<bool>,
    /// Per-message TTLs must be on (`retention.*.method = "message_ttl"`). Never turned off:
    /// the server refuses that, and another writer may rely on it.
    pub allow_msg_ttl: bool,
    /// `Some`: the stream's `max_age` is exactly this (the lease bucket's expiry is the lease).
    pub max_age: Option<Duration>,
}

/// One stream the bridge declares.
#[derive(Clone, Debug)]
pub(crate) struct StreamSpec {
    /// The stream's name.
    pub name: String,
    /// What the bridge owns on it.
    pub owned: Owned,
    /// The whole config of the stream when the bridge creates it.
    pub create: serde_json::Map<String, serde_json::Value>,
}

impl StreamSpec {
    /// A spec whose creation config is `create` (async-nats' struct, which carries every field
    /// a 2.9 server needs) with what [`Owned`] adds on top (`allow_msg_ttl`).
    pub(crate) fn new(create: &jetstream::stream::Config, owned: Owned) -> Self {
        let mut map = match serde_json::to_value(create) {
            Ok(serde_json::Value::Object(map)) => map,
            // A struct of strings, numbers and enums always serialises to an object.
            _ => serde_json::Map::new(),
        };
        map.insert("name".into(), create.name.clone().into());
        if owned.allow_msg_ttl {
            map.insert("allow_msg_ttl".into(), true.into());
        }
        if let Some(direct) = owned.allow_direct {
            map.insert("allow_direct".into(), direct.into());
        }
        Self {
            name: create.name.clone(),
            owned,
            create: map,
        }
    }
}

/// The stream behind KV bucket `bucket` as the KV convention wants it (`KV_<bucket>` on
/// `$KV.<bucket>.>`, history 1, rollups, deletes denied, no expiry), created with `replicas`,
/// and what the bridge owns of it when it exists: its subject and, on a server that needs it,
/// direct gets off. The caller adds what its bucket needs on top (deletes, an expiry, replicas
/// raised) before [`StreamSpec::new`]. One function for every bucket the bridge keeps (channel
/// state, the sweeper's lease and cursor), so the workarounds below are made once:
///
/// - Built by hand rather than with async-nats' `create_key_value`: that call first asks for
///   the account info, whose NATS 2.9 answer this client version cannot parse.
/// - Direct gets (reads from any replica) are on in a bucket it creates on a server that
///   answers them with current values, and turned off in an existing one only on a server known
///   to be older: NATS before 2.9.17 lets a restarted replica answer them before it has caught
///   up (nats-server#4162), and a cluster test on 2.9.10 saw a state count stuck at an old value
///   for a minute after a node restart. The KV client reads from the leader only when the
///   stream config it reads at open says so. A server whose version is not known yet changes
///   nothing.
pub(crate) fn kv_bucket(
    bucket: &str,
    description: &str,
    replicas: usize,
    version: Option<ServerVersion>,
) -> (jetstream::stream::Config, Owned) {
    let subject = format!("$KV.{bucket}.>");
    let create = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_string()),
        subjects: vec![subject.clone()],
        max_messages_per_subject: 1,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: version::has(version, ServerVersion::DIRECT_GETS_CURRENT),
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    let owned = Owned {
        subjects: vec![subject],
        allow_direct: version::known_before(version, ServerVersion::DIRECT_GETS_CURRENT)
            .then_some(false),
        ..Owned::default()
    };
    (create, owned)
}

/// What [`ensure`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ensured {
    /// The stream did not exist and was created.
    Created,
    /// Nothing the bridge owns differed: nothing was sent.
    Unchanged,
    /// These owned fields were changed (replicas included when that update went through).
    Updated(Vec<&'static str>),
    /// The server refused to change these owned fields; the stream works as it is (logged).
    Kept(Vec<&'static str>),
}

/// A JetStream API request about a stream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamApiError {
    /// No answer (no JetStream, no connection, a timeout).
    #[error("stream {name}: {source}")]
    Request {
        /// The stream.
        name: String,
        /// The client's error.
        #[source]
        source: jetstream::context::RequestError,
    },
    /// The server refused.
    #[error("stream {name}: {source}")]
    Refused {
        /// The stream.
        name: String,
        /// The server's answer.
        #[source]
        source: jetstream::Error,
    },
    /// An answer that is not a stream info.
    #[error("stream {name}: unexpected answer")]
    Answer {
        /// The stream.
        name: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
}

impl StreamApiError {
    /// The server's error code, when it answered with one.
    pub(crate) fn code(&self) -> Option<ErrorCode> {
        match self {
            StreamApiError::Refused { source, .. } => Some(source.error_code()),
            _ => None,
        }
    }
}

/// The answer of `STREAM.INFO` / `CREATE` / `UPDATE`: the config as raw JSON, or an error.
#[derive(Deserialize)]
struct InfoReply {
    error: Option<jetstream::Error>,
    config: Option<Box<RawValue>>,
}

/// Sends `body` to `$JS.API.<api>` and returns the stream config of the answer.
async fn call<T: serde::Serialize + ?Sized>(
    js: &jetstream::Context,
    name: &str,
    api: String,
    body: &T,
) -> Result<RawConfig, StreamApiError> {
    let reply: InfoReply =
        js.request(api, body)
            .await
            .map_err(|source| StreamApiError::Request {
                name: name.to_string(),
                source,
            })?;
    if let Some(source) = reply.error {
        return Err(StreamApiError::Refused {
            name: name.to_string(),
            source,
        });
    }
    let raw = reply
        .config
        .map(|c| c.get().to_string())
        .unwrap_or_default();
    serde_json::from_str(&raw).map_err(|source| StreamApiError::Answer {
        name: name.to_string(),
        source,
    })
}

/// The config of stream `name` as the server holds it.
pub(crate) async fn info(js: &jetstream::Context, name: &str) -> Result<RawConfig, StreamApiError> {
    call(
        js,
        name,
        format!("STREAM.INFO.{name}"),
        &serde_json::json!({}),
    )
    .await
}

/// Sends `config` as the whole new config of stream `name`.
pub(crate) async fn update(
    js: &jetstream::Context,
    name: &str,
    config: &RawConfig,
) -> Result<RawConfig, StreamApiError> {
    call(js, name, format!("STREAM.UPDATE.{name}"), config).await
}

/// One field of a config, typed (`None` when absent or of another type).
pub(crate) fn field<T: DeserializeOwned>(config: &RawConfig, key: &str) -> Option<T> {
    config
        .get(key)
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
}

fn set<T: serde::Serialize>(config: &mut RawConfig, key: &str, value: T) {
    if let Ok(raw) = serde_json::value::to_raw_value(&value) {
        config.insert(key.to_string(), raw);
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// `current` with the owned fields (replicas aside) brought to what `owned` asks, and the names
/// of those that changed; every other field keeps its JSON text.
pub(crate) fn reconciled(current: &RawConfig, owned: &Owned) -> (RawConfig, Vec<&'static str>) {
    let mut next = current.clone();
    let mut changed = Vec::new();
    let mut subjects: Vec<String> = field(current, "subjects").unwrap_or_default();
    if owned.subjects.iter().any(|s| !subjects.contains(s)) {
        for s in &owned.subjects {
            if !subjects.contains(s) {
                subjects.push(s.clone());
            }
        }
        set(&mut next, "subjects", &subjects);
        changed.push("subjects");
    }
    if let Some(want) = owned.duplicate_window.map(nanos) {
        let have: i64 = field(current, "duplicate_window").unwrap_or(0);
        if have < want {
            set(&mut next, "duplicate_window", want);
            changed.push("duplicate_window");
        }
    }
    if let Some(want) = owned.allow_direct {
        let have: bool = field(current, "allow_direct").unwrap_or(false);
        if have != want {
            set(&mut next, "allow_direct", want);
            changed.push("allow_direct");
        }
    }
    if owned.allow_msg_ttl && !field::<bool>(current, "allow_msg_ttl").unwrap_or(false) {
        set(&mut next, "allow_msg_ttl", true);
        changed.push("allow_msg_ttl");
    }
    if let Some(want) = owned.max_age.map(nanos) {
        let have: i64 = field(current, "max_age").unwrap_or(0);
        if have != want {
            set(&mut next, "max_age", want);
            changed.push("max_age");
        }
    }
    (next, changed)
}

/// The replica count to move a stream to: `owned.replicas` when it has fewer, never fewer than
/// it has. `None`: nothing to do.
pub(crate) fn replicas_upgrade(current: &RawConfig, owned: &Owned) -> Option<usize> {
    let have: usize = field(current, "num_replicas").unwrap_or(1).max(1);
    (owned.replicas > have).then_some(owned.replicas)
}

/// The server's "stream not found".
pub(crate) const STREAM_NOT_FOUND: ErrorCode = ErrorCode(10059);
/// The server's "stream name already in use with a different configuration" (another replica
/// created it a moment ago).
const STREAM_NAME_IN_USE: ErrorCode = ErrorCode(10058);

/// Creates the stream of `spec`, or brings an existing one to what the bridge owns and leaves
/// every other field as it is. A refused update is logged and the stream used as it is; a
/// stream that cannot be read or created is an error (the caller retries).
pub(crate) async fn ensure(
    js: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<Ensured, StreamApiError> {
    let name = spec.name.as_str();
    let current = match info(js, name).await {
        Ok(current) => current,
        Err(e) if e.code() == Some(STREAM_NOT_FOUND) => {
            let created = call(js, name, format!("STREAM.CREATE.{name}"), &spec.create).await;
            match created {
                Ok(_) => {
                    tracing::info!(stream = name, "stream created");
                    return Ok(Ensured::Created);
                }
                // Created by another replica meanwhile: bring that one to what we own.
                Err(e) if e.code() == Some(STREAM_NAME_IN_USE) => info(js, name).await?,
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let (next, mut changed) = reconciled(&current, &spec.owned);
    let mut current = current;
    if !changed.is_empty() {
        match update(js, name, &next).await {
            Ok(updated) => {
                tracing::info!(stream = name, changed = ?changed, "stream updated: only the bridge's own settings changed");
                current = updated;
            }
            Err(StreamApiError::Refused { source, .. }) => {
                tracing::warn!(stream = name, fields = ?changed, error = %source, "the server refused to change the bridge's settings on the stream; it is used as it is");
                return Ok(Ensured::Kept(changed));
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(replicas) = replicas_upgrade(&current, &spec.owned) {
        let from: usize = field(&current, "num_replicas").unwrap_or(1);
        let mut next = current.clone();
        set(&mut next, "num_replicas", replicas);
        match update(js, name, &next).await {
            Ok(_) => {
                tracing::info!(stream = name, from, to = replicas, "stream replicas raised");
                changed.push("num_replicas");
            }
            Err(e) => {
                tracing::warn!(stream = name, from, to = replicas, error = %e, "cannot raise the stream's replicas; it keeps its current count");
            }
        }
    }
    Ok(if changed.is_empty() {
        Ensured::Unchanged
    } else {
        Ensured::Updated(changed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> RawConfig {
        serde_json::from_str(json).expect("a config")
    }

    fn owned() -> Owned {
        Owned {
            subjects: vec!["p.>".into()],
            duplicate_window: Some(Duration::from_secs(120)),
            replicas: 3,
            ..Owned::default()
        }
    }

    #[test]
    fn fields_the_client_does_not_know_keep_their_text() {
        let operator = raw(
            r#"{"name":"EV","subjects":["p.>"],"duplicate_window":60000000000,
                "compression":"s2","metadata":{"owner":"ops"},"allow_msg_ttl":true,
                "max_msgs_per_subject":  5,"some_future_field":{"x":[1,2.50]}}"#,
        );
        let (next, changed) = reconciled(&operator, &owned());
        assert_eq!(changed, ["duplicate_window"]);
        assert_eq!(
            field::<i64>(&next, "duplicate_window"),
            Some(120_000_000_000)
        );
        for key in [
            "compression",
            "metadata",
            "allow_msg_ttl",
            "max_msgs_per_subject",
            "some_future_field",
            "subjects",
            "name",
        ] {
            assert_eq!(next[key].get(), operator[key].get(), "{key}");
        }
        assert_eq!(next.len(), operator.len());
    }

    #[test]
    fn nothing_owned_differs_nothing_is_sent() {
        let operator = raw(
            r#"{"name":"EV","subjects":["audit.>","p.>"],"duplicate_window":3600000000000,
                "num_replicas":5,"allow_direct":true}"#,
        );
        let (_, changed) = reconciled(&operator, &owned());
        assert!(changed.is_empty());
        assert_eq!(replicas_upgrade(&operator, &owned()), None);
    }

    #[test]
    fn what_the_bridge_needs_is_added_and_never_taken_away() {
        let old = raw(
            r#"{"name":"EV","subjects":["other.>"],"duplicate_window":1,"num_replicas":1,
                "allow_direct":true,"max_age":0}"#,
        );
        let want = Owned {
            allow_direct: Some(false),
            allow_msg_ttl: true,
            max_age: Some(Duration::from_secs(60)),
            ..owned()
        };
        let (next, changed) = reconciled(&old, &want);
        assert_eq!(
            changed,
            [
                "subjects",
                "duplicate_window",
                "allow_direct",
                "allow_msg_ttl",
                "max_age"
            ]
        );
        assert_eq!(
            field::<Vec<String>>(&next, "subjects").unwrap(),
            ["other.>", "p.>"]
        );
        assert_eq!(field::<bool>(&next, "allow_direct"), Some(false));
        assert_eq!(field::<bool>(&next, "allow_msg_ttl"), Some(true));
        assert_eq!(field::<i64>(&next, "max_age"), Some(60_000_000_000));
        assert_eq!(replicas_upgrade(&next, &want), Some(3));
        // TTLs on and not asked for: left on.
        let ttl_on = raw(r#"{"name":"EV","subjects":["p.>"],"allow_msg_ttl":true}"#);
        let (next, _) = reconciled(&ttl_on, &Owned::default());
        assert_eq!(field::<bool>(&next, "allow_msg_ttl"), Some(true));
    }

    #[test]
    fn a_created_stream_carries_what_the_bridge_owns() {
        let cfg = jetstream::stream::Config {
            name: "EV".into(),
            subjects: vec!["p.>".into()],
            ..Default::default()
        };
        let spec = StreamSpec::new(
            &cfg,
            Owned {
                allow_msg_ttl: true,
                allow_direct: Some(true),
                ..owned()
            },
        );
        assert_eq!(spec.create["name"], "EV");
        assert_eq!(spec.create["allow_msg_ttl"], true);
        assert_eq!(spec.create["allow_direct"], true);
        assert_eq!(spec.create["subjects"], serde_json::json!(["p.>"]));
        let plain = StreamSpec::new(&cfg, owned());
        assert!(!plain.create.contains_key("allow_msg_ttl"));
    }

    /// nats-server#4162: direct gets are on in a bucket created on a server that answers them
    /// with current values, off in an existing one only where the server is known to be older,
    /// and left alone while the version is unknown.
    #[test]
    fn a_kv_bucket_turns_direct_gets_off_only_where_the_server_needs_it() {
        // (on at creation, owned) for a server of version `v`.
        let direct = |v| {
            let (create, owned) = kv_bucket("b", "d", 0, v);
            let spec = StreamSpec::new(&create, owned);
            let on = spec.create.get("allow_direct").and_then(|d| d.as_bool());
            (on.unwrap_or(false), spec.owned.allow_direct)
        };
        assert_eq!(
            direct(Some(ServerVersion::new(2, 9, 10))),
            (false, Some(false))
        );
        assert_eq!(
            direct(Some(ServerVersion::DIRECT_GETS_CURRENT)),
            (true, None)
        );
        assert_eq!(direct(None), (false, None));
        let (create, owned) = kv_bucket("b", "d", 0, None);
        assert_eq!(create.name, "KV_b");
        assert_eq!(create.subjects, owned.subjects);
        assert_eq!(owned.subjects, ["$KV.b.>"]);
        assert_eq!(create.num_replicas, 1);
        assert!(create.deny_delete, "the KV convention");
    }
}
