//! NATS side of the sweeper's coordination between bridge replicas.
//!
//! - The lease: key `lease` of KV bucket `<events stream>_sweeper_lease`, whose `max_age` is
//!   `retention.lease_ttl`. A replica takes it with create-if-absent and keeps it by updating it
//!   with its last revision (compare-and-set) at least every `lease_ttl / 3`; if the holder
//!   stops renewing (crash, partition), the server expires the key after `lease_ttl` and the
//!   next replica's create succeeds.
//! - The scan cursor: key `events-cursor` of bucket `<events stream>_sweeper_state` (no
//!   expiry; it also holds the dead-letter target's scan positions, see [`Cursor::scans`]), so a
//!   sweep never re-reads the part of a stream an earlier sweep (of any replica, or of
//!   `sweep --once`) already cleaned.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{LeaseStatus, SweepError, op_err};
use crate::broker::nats::streams::{self, StreamSpec};
use crate::broker::nats::{ServerVersion, is_wrong_last_sequence};
use crate::config::Settings;

const LEASE_KEY: &str = "lease";
const CURSOR_KEY: &str = "events-cursor";

/// A bucket name from the events stream's name (KV names allow `[A-Za-z0-9_-]` only).
fn bucket_name(settings: &Settings, suffix: &str) -> String {
    let stream: String = settings
        .broker
        .nats
        .stream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{stream}_{suffix}")
}

/// The KV bucket holding the sweeper lease (`<events stream>_sweeper_lease`).
pub fn lease_bucket(settings: &Settings) -> String {
    bucket_name(settings, "sweeper_lease")
}

/// The KV bucket holding the sweeper's scan cursor (`<events stream>_sweeper_state`).
pub fn cursor_bucket(settings: &Settings) -> String {
    bucket_name(settings, "sweeper_state")
}

/// A sweeper bucket's stream ([`streams::kv_bucket`]: the KV convention and its workarounds,
/// direct gets off only on a server known to need it, since a lease decision needs the latest
/// value), with `max_age` (the lease's expiry, zero for the cursor) set at creation and owned
/// when it exists, and replicas raised to `broker.nats.replicas`. Every other field stays as
/// it is (see [`streams`]).
fn bucket_spec(
    bucket: &str,
    max_age: Duration,
    replicas: usize,
    description: &str,
    version: Option<ServerVersion>,
) -> StreamSpec {
    let (mut create, mut owned) = streams::kv_bucket(bucket, description, replicas, version);
    create.max_age = max_age;
    owned.max_age = Some(max_age);
    owned.replicas = replicas;
    StreamSpec::new(&create, owned)
}

/// A KV bucket opened on first use (created if absent), then reused.
struct Bucket {
    js: jetstream::Context,
    name: String,
    /// Zero: no expiry.
    max_age: Duration,
    replicas: usize,
    description: &'static str,
    store: Option<kv::Store>,
}

impl Bucket {
    fn new(
        js: jetstream::Context,
        name: String,
        max_age: Duration,
        replicas: usize,
        description: &'static str,
    ) -> Self {
        Self {
            js,
            name,
            max_age,
            replicas,
            description,
            store: None,
        }
    }

    /// The store, opening the bucket on first use.
    async fn open(&mut self) -> Result<kv::Store, SweepError> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let store = self.create_or_update().await?;
        self.store = Some(store.clone());
        Ok(store)
    }

    /// The store if the bucket exists, without creating it (dry runs change nothing).
    async fn existing(&self) -> Option<kv::Store> {
        match &self.store {
            Some(s) => Some(s.clone()),
            None => self.js.get_key_value(&self.name).await.ok(),
        }
    }

    /// Opens the bucket, creating it if absent, or bringing what the bridge owns of it to what
    /// is configured (see [`bucket_spec`]): a changed `retention.lease_ttl` corrects its
    /// `max_age`.
    async fn create_or_update(&self) -> Result<kv::Store, SweepError> {
        let (js, bucket) = (&self.js, &self.name);
        let version = ServerVersion::of_connected(&js.client()).await;
        let spec = bucket_spec(
            bucket,
            self.max_age,
            self.replicas,
            self.description,
            version,
        );
        streams::ensure(js, &spec)
            .await
            .map_err(|e| op_err(format_args!("cannot create KV bucket {bucket}"), e))?;
        js.get_key_value(bucket)
            .await
            .map_err(|e| op_err(format_args!("cannot open KV bucket {bucket}"), e))
    }
}

/// This replica's view of the lease.
pub(super) struct NatsLease {
    bucket: Bucket,
    ttl: Duration,
    holder: String,
    held: Option<Held>,
}

struct Held {
    revision: u64,
    /// Taken before the request that created / renewed the key, so the server's expiry is
    /// always later than `renewed + ttl`.
    renewed: Instant,
}

impl NatsLease {
    pub(super) fn new(js: jetstream::Context, settings: &Settings, holder: String) -> Self {
        let ttl = settings.retention.lease_ttl;
        Self {
            bucket: Bucket::new(
                js,
                lease_bucket(settings),
                ttl,
                settings.broker.nats.replicas,
                "pusher-bridge retention sweeper lease",
            ),
            ttl,
            holder,
            held: None,
        }
    }

    /// Whether this replica believes it holds the lease right now.
    pub(super) fn is_held(&self) -> bool {
        self.held
            .as_ref()
            .is_some_and(|h| h.renewed.elapsed() < self.ttl)
    }

    /// Takes the lease, or renews it when this replica holds it already.
    pub(super) async fn acquire(&mut self) -> Result<LeaseStatus, SweepError> {
        let store = self.bucket.open().await?;
        if self.held.is_some() && self.renew(&store).await? {
            return Ok(LeaseStatus::Held);
        }
        let started = Instant::now();
        match store
            .create(LEASE_KEY, Bytes::from(self.holder.clone()))
            .await
        {
            Ok(revision) => {
                self.held = Some(Held {
                    revision,
                    renewed: started,
                });
                tracing::info!(holder = %self.holder, bucket = %self.bucket.name, "took the sweeper lease");
                Ok(LeaseStatus::Held)
            }
            // Taken by another replica; NATS 2.11+ may say so as `wrong last sequence` (10164)
            // when both creates were in flight at once.
            Err(e)
                if e.kind() == kv::CreateErrorKind::AlreadyExists || is_wrong_last_sequence(&e) =>
            {
                let holder = store
                    .get(LEASE_KEY)
                    .await
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                Ok(LeaseStatus::Elsewhere(holder))
            }
            Err(e) => Err(op_err("cannot take the sweeper lease", e)),
        }
    }

    /// Compare-and-set renewal; `Ok(false)` when the lease is no longer ours.
    async fn renew(&mut self, store: &kv::Store) -> Result<bool, SweepError> {
        let Some(held) = &self.held else {
            return Ok(false);
        };
        let started = Instant::now();
        match store
            .update(LEASE_KEY, Bytes::from(self.holder.clone()), held.revision)
            .await
        {
            Ok(revision) => {
                self.held = Some(Held {
                    revision,
                    renewed: started,
                });
                Ok(true)
            }
            Err(e)
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision
                    || is_wrong_last_sequence(&e) =>
            {
                tracing::warn!(holder = %self.holder, "the sweeper lease expired or was taken over");
                self.held = None;
                Ok(false)
            }
            Err(e) => {
                // Unknown outcome: stop acting as the holder; the key expires on its own.
                self.held = None;
                Err(op_err("cannot renew the sweeper lease", e))
            }
        }
    }

    /// How often a long operation should call [`NatsLease::keep`].
    pub(super) fn check_every(&self) -> Duration {
        (self.ttl / 6).max(Duration::from_millis(50))
    }

    /// Between runs and during long runs: renews once a third of the TTL has passed. Errors with
    /// [`SweepError::LeaseLost`] when the lease is gone, so a run stops before another replica
    /// could start.
    pub(super) async fn keep(&mut self) -> Result<(), SweepError> {
        let due = match &self.held {
            None => return Err(SweepError::LeaseLost),
            Some(h) => h.renewed.elapsed() >= self.ttl / 3,
        };
        if !due {
            return Ok(());
        }
        let store = self.bucket.open().await?;
        if self.renew(&store).await? {
            Ok(())
        } else {
            Err(SweepError::LeaseLost)
        }
    }

    /// Gives the lease up (on shutdown) so another replica need not wait for the TTL.
    pub(super) async fn release(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        if let Some(store) = &self.bucket.store
            && let Err(e) = store
                .delete_expect_revision(LEASE_KEY, Some(held.revision))
                .await
        {
            tracing::debug!(error = %e, "could not release the sweeper lease; it expires on its own");
        }
    }
}

/// Where the name-by-name default purge of the events stream resumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Cursor {
    /// Creation time of the stream (RFC 3339) the cursor belongs to; a recreated stream restarts.
    pub stream_created: String,
    /// Escaped names with an override longer than the default when the cursor was written.
    pub long_names: Vec<String>,
    /// Every message below this sequence was already checked.
    pub next_seq: u64,
    /// Per scan of a target's plan, keyed by target, stream creation time, rules fingerprint
    /// and scan (`super::nats::scan_key`): everything below was already checked. Absent in
    /// cursors of older versions.
    #[serde(default)]
    pub scans: std::collections::BTreeMap<String, u64>,
}

/// Reads and writes the cursor in the state bucket.
pub(super) struct CursorStore {
    bucket: Bucket,
}

impl CursorStore {
    pub(super) fn new(js: jetstream::Context, settings: &Settings) -> Self {
        Self {
            bucket: Bucket::new(
                js,
                cursor_bucket(settings),
                Duration::ZERO,
                settings.broker.nats.replicas,
                "pusher-bridge retention sweeper state",
            ),
        }
    }

    /// The stored cursor (`None` if absent or unreadable: the scan starts from the beginning).
    /// `create`: create the bucket if it is missing (false for dry runs, which change nothing).
    pub(super) async fn load(&mut self, create: bool) -> Result<Option<Cursor>, SweepError> {
        let store = if create {
            self.bucket.open().await?
        } else {
            match self.bucket.existing().await {
                Some(s) => s,
                None => return Ok(None),
            }
        };
        let raw = store
            .get(CURSOR_KEY)
            .await
            .map_err(|e| op_err("cannot read the sweeper cursor", e))?;
        Ok(raw.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Stores `cursor`.
    pub(super) async fn save(&mut self, cursor: &Cursor) -> Result<(), SweepError> {
        let store = self.bucket.open().await?;
        let value = serde_json::to_vec(cursor).map_err(|e| op_err("cursor encoding", e))?;
        store
            .put(CURSOR_KEY, Bytes::from(value))
            .await
            .map(|_| ())
            .map_err(|e| op_err("cannot store the sweeper cursor", e))
    }
}
