//! The state bucket: opened (created by hand if absent), records written with compare-and-set
//! and retried on conflict, read one by one or by key filter, and tombstones swept.
//!
//! Every write names the revision it read (`update(key, value, revision)`, revision 0 meaning
//! "absent"), so two replicas applying events to the same key never lose one another's update:
//! the loser of a race reads again and merges again. Tombstones are dropped by deleting the
//! exact stream message (revision) that holds them: if a writer replaced it meanwhile, the
//! delete finds nothing and the new value stays; if the delete came first, the writer's
//! expected revision no longer matches and it retries from "absent". No delete markers remain.
//!
//! On a replicated bucket the compare-and-set alone is not enough with NATS before 2.9.21: the
//! leader checks the expected revision before it proposes a write, not when the write is
//! applied, so two writes that name the same revision can both be taken when they are in flight
//! together (nats-server#4320), the second silently dropping the first one's update (a cluster
//! test saw a subscription count end 8 updates short). So on such a server, on a bucket with
//! more than one replica, a writer reads its key again `VERIFY_AFTER` after its write was
//! acknowledged, when every write that was in flight beside it has been applied, and merges and
//! writes again if its update is not in what it reads. The merge is idempotent, so writing again
//! is always safe. Newer servers refuse the second write (`wrong last sequence`, error 10071, or
//! 10164 from 2.11 on), which the writer takes as the conflict it is: it reads and merges again.
//! The server's version is read when the bucket is opened.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StateError;
use super::keys::{self, Parsed};
use super::merge::{self, Change, ChannelRecord, MemberRecord, Merged, Update};
use crate::backoff::Backoff;
use crate::broker::nats::streams::{self, StreamSpec};
use crate::broker::nats::{ServerVersion, is_wrong_last_sequence, version};

/// How often a write is retried after losing a compare-and-set race before it counts as failed
/// (and is redelivered later).
const MAX_ATTEMPTS: u32 = 50;
/// On a replicated bucket, how long after its acknowledged write a writer reads its key again
/// (see the module doc): well past the time a write spends in flight on a healthy cluster (a
/// write delayed by an election is applied by the new leader before it answers reads).
const VERIFY_AFTER: Duration = Duration::from_millis(200);
/// The pause before a writer that lost a compare-and-set race reads and merges again: 2 ms
/// doubling up to 20 ms, each drawn between its half and its whole, so that replicas that
/// collided on a key come back apart instead of colliding again in step. Short because the
/// race was lost to a write that has just landed, which the next read sees; capped at 20 ms so
/// that [`MAX_ATTEMPTS`] lost races give up (and leave the event to its redelivery) within
/// about a second.
const CONFLICT: Backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(20));
/// Tries again after a failed read, this many times, after the pauses of [`READ_RETRY`].
const READ_TRIES: u32 = 3;
/// The pauses before reading again: 50 ms, 100 ms, then 150 ms, jittered so that replicas that
/// hit the same blip (a leader election, a bucket created a moment ago) do not ask again
/// together. A blip lasts a moment; the cap keeps the [`READ_TRIES`] pauses within 300 ms, so a
/// read that keeps failing is reported promptly (its event is redelivered later).
const READ_RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(150));
/// A filtered read gives up after this long.
const SCAN_TIMEOUT: Duration = Duration::from_secs(10);

/// What applying one update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The record changed and was written.
    Written,
    /// The update was older than (or the same as) the stored record.
    Stale,
}

/// One record read from the bucket.
#[derive(Clone, Debug)]
pub struct Stored<T> {
    /// The key, parsed.
    pub key: Parsed,
    /// The record.
    pub record: T,
    /// Its revision (stream sequence).
    pub revision: u64,
}

/// The state bucket.
#[derive(Clone)]
pub struct StateStore {
    client: async_nats::Client,
    store: kv::Store,
    bucket: String,
    /// More than one replica on a server older than 2.9.21: writes are read back (see the
    /// module doc).
    verify_writes: bool,
}

/// The state bucket's stream ([`streams::kv_bucket`]: the KV convention and its workarounds),
/// with deletes allowed: tombstones are dropped by message sequence (see the module doc). Of
/// a bucket that exists (made by an earlier version, or by `nats kv add`), the bridge owns only
/// what `kv_bucket` owns: its subject and, on a server that needs it, direct gets off.
fn bucket_spec(bucket: &str, replicas: usize, version: Option<ServerVersion>) -> StreamSpec {
    let (mut create, owned) =
        streams::kv_bucket(bucket, "pusher-bridge channel state", replicas, version);
    create.deny_delete = false;
    StreamSpec::new(&create, owned)
}

/// The local clock in ms since the epoch, as the records' `written_ms` hold it.
fn clock_ms() -> i64 {
    i64::try_from(crate::message::now_ms()).unwrap_or(i64::MAX)
}

/// Wraps a KV client error with what the bridge was doing.
fn kv_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> StateError {
    move |e| StateError::Kv {
        what,
        source: Box::new(e),
    }
}

impl StateStore {
    /// Opens the bucket, creating it if it does not exist (another replica may create it at the
    /// same moment: that is fine). `client` must be connected: the server's version decides
    /// the workarounds (see the module doc).
    pub async fn open(
        client: async_nats::Client,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, StateError> {
        let js = jetstream::new(client.clone());
        let version = ServerVersion::of_connected(&client).await;
        streams::ensure(&js, &bucket_spec(bucket, replicas, version))
            .await
            .map_err(|e| kv_err("cannot create the state bucket")(e))?;
        let store = js
            .get_key_value(bucket)
            .await
            .map_err(|e| kv_err("cannot open the state bucket")(e))?;
        let verify_writes = store.stream.cached_info().config.num_replicas > 1
            && !version::has(version, ServerVersion::CAS_EXACT);
        Ok(Self {
            client,
            store,
            bucket: bucket.to_string(),
            verify_writes,
        })
    }

    /// Opens an existing bucket only (the CLI and the query API read; they never create).
    pub async fn existing(client: async_nats::Client, bucket: &str) -> Result<Self, StateError> {
        let js = jetstream::new(client.clone());
        let store = js
            .get_key_value(bucket)
            .await
            .map_err(|e| kv_err("cannot open the state bucket")(e))?;
        Ok(Self {
            client,
            store,
            bucket: bucket.to_string(),
            // Readers never write.
            verify_writes: false,
        })
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Applies one update: read, merge, compare-and-set, again on conflict. A tombstone it
    /// writes carries the local clock of that write (the sweep's horizon starts there).
    pub async fn apply(&self, update: &Update) -> Result<Applied, StateError> {
        match &update.change {
            Change::Member { user_id, present } => {
                let key = keys::member_key(&update.app_id, &update.channel, user_id);
                self.cas(&key, |current: Option<&MemberRecord>| {
                    merge::merge_member(current, *present, &update.stamp, clock_ms())
                })
                .await
            }
            change => {
                let key = keys::channel_key(&update.app_id, &update.channel);
                self.cas(&key, |current: Option<&ChannelRecord>| {
                    merge::merge_channel(current, change, &update.stamp, clock_ms())
                })
                .await
            }
        }
    }

    async fn cas<T: Serialize + DeserializeOwned>(
        &self,
        key: &str,
        merge: impl Fn(Option<&T>) -> Merged<T>,
    ) -> Result<Applied, StateError> {
        let mut written = false;
        for attempt in 0..MAX_ATTEMPTS {
            let (current, revision) = self.read::<T>(key).await?;
            let next = match merge(current.as_ref()) {
                // Our own earlier write (or a newer one) holds the update.
                Merged::Stale if written => return Ok(Applied::Written),
                Merged::Stale => return Ok(Applied::Stale),
                Merged::Changed(next) => next,
            };
            let value =
                serde_json::to_vec(&next).map_err(|e| kv_err("cannot encode a state record")(e))?;
            match self.store.update(key, Bytes::from(value), revision).await {
                Ok(_) if self.verify_writes => {
                    // Read it back once the writes in flight beside it are applied.
                    written = true;
                    tokio::time::sleep(VERIFY_AFTER).await;
                }
                Ok(_) => return Ok(Applied::Written),
                Err(e)
                    if e.kind() == kv::UpdateErrorKind::WrongLastRevision
                        || is_wrong_last_sequence(&e) =>
                {
                    // Another writer got there first: read its value and merge again, after a
                    // short jittered pause that spreads replicas that keep colliding.
                    tokio::time::sleep(CONFLICT.delay(attempt + 1)).await;
                }
                Err(e) => return Err(kv_err("cannot write a state record")(e)),
            }
        }
        Err(StateError::Contended {
            key: key.to_string(),
        })
    }

    /// The record at `key` and its revision (0 when absent, deleted or unreadable).
    async fn read<T: DeserializeOwned>(&self, key: &str) -> Result<(Option<T>, u64), StateError> {
        let mut tries = 0;
        let entry = loop {
            match self.store.entry(key).await {
                Ok(entry) => break entry,
                // A replicated bucket created a moment ago may not answer direct gets on
                // every node yet ("no responders"); a leader election has the same blip. Not
                // while the server is away: that failure is reported at once (the event is
                // redelivered later).
                Err(_)
                    if tries < READ_TRIES
                        && self.client.connection_state()
                            == async_nats::connection::State::Connected =>
                {
                    tries += 1;
                    tokio::time::sleep(READ_RETRY.delay(tries)).await;
                }
                Err(e) => return Err(kv_err("cannot read a state record")(e)),
            }
        };
        Ok(match entry {
            None => (None, 0),
            Some(e) if e.operation != kv::Operation::Put => (None, e.revision),
            Some(e) => match serde_json::from_slice(&e.value) {
                Ok(v) => (Some(v), e.revision),
                Err(err) => {
                    // Not written by the bridge: it is replaced by the next event's record.
                    tracing::warn!(key, error = %err, "unreadable state record");
                    (None, e.revision)
                }
            },
        })
    }

    /// One channel's record.
    pub async fn channel(
        &self,
        app_id: &str,
        channel: &str,
    ) -> Result<Option<ChannelRecord>, StateError> {
        Ok(self
            .read::<ChannelRecord>(&keys::channel_key(app_id, channel))
            .await?
            .0)
    }

    /// Every channel record of an app (tombstones included).
    pub async fn channels(&self, app_id: &str) -> Result<Vec<Stored<ChannelRecord>>, StateError> {
        self.scan(&keys::channels_filter(app_id)).await
    }

    /// Every member record of one channel (tombstones included).
    pub async fn members(
        &self,
        app_id: &str,
        channel: &str,
    ) -> Result<Vec<Stored<MemberRecord>>, StateError> {
        self.scan(&keys::members_filter(app_id, channel)).await
    }

    /// Every member record of an app, all channels (one read for `user_count` of a listing).
    pub(crate) async fn app_members(
        &self,
        app_id: &str,
    ) -> Result<Vec<Stored<MemberRecord>>, StateError> {
        self.scan(&format!("{}.{}.>", keys::escape(app_id), keys::MEMBERS))
            .await
    }

    /// The present members of a channel, as the query API counts them (none while it is not
    /// occupied; members older than the channel's last vacate do not count), sorted by user id.
    pub async fn present_members(
        &self,
        app_id: &str,
        channel: &str,
    ) -> Result<Vec<String>, StateError> {
        let record = self.channel(app_id, channel).await?.unwrap_or_default();
        if !record.occupied {
            return Ok(Vec::new());
        }
        let mut users: Vec<String> = self
            .members(app_id, channel)
            .await?
            .into_iter()
            .filter(|m| record.counts_member(&m.record))
            .filter_map(|m| match m.key {
                Parsed::Member { user_id, .. } => Some(user_id),
                Parsed::Channel { .. } => None,
            })
            .collect();
        users.sort();
        Ok(users)
    }

    /// The last value of every key matching `filter` (relative to the bucket) that decodes as
    /// `T`: an ordered consumer delivering the last message per subject, read until the
    /// server says nothing is pending.
    async fn scan<T: DeserializeOwned>(&self, filter: &str) -> Result<Vec<Stored<T>>, StateError> {
        let prefix = format!("$KV.{}.", self.bucket);
        let consumer = self
            .store
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                description: Some("pusher-bridge state read".into()),
                filter_subject: format!("{prefix}{filter}"),
                replay_policy: consumer::ReplayPolicy::Instant,
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| kv_err("cannot read the state bucket")(e))?;
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| kv_err("cannot read the state bucket")(e))?;
        let read = async {
            while let Some(msg) = messages.next().await {
                let msg = msg.map_err(|e| kv_err("cannot read the state bucket")(e))?;
                let info = msg.info().map_err(|e| StateError::Kv {
                    what: "unexpected state message",
                    source: e,
                })?;
                let (pending, revision) = (info.pending, info.stream_sequence);
                let deleted = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| op.as_str() != "PUT");
                let key = msg
                    .subject
                    .as_str()
                    .strip_prefix(&prefix)
                    .and_then(keys::parse);
                if !deleted
                    && let Some(key) = key
                    && let Ok(record) = serde_json::from_slice::<T>(&msg.payload)
                {
                    out.push(Stored {
                        key,
                        record,
                        revision,
                    });
                }
                if pending == 0 {
                    break;
                }
            }
            Ok::<_, StateError>(())
        };
        match tokio::time::timeout(SCAN_TIMEOUT, read).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(StateError::Kv {
                    what: "reading the state bucket timed out",
                    source: "timeout".into(),
                });
            }
        }
        Ok(out)
    }

    /// Drops tombstones written more than `horizon` before `now_ms` (their `written_ms`; the
    /// event's `time_ms` for a record written without one): vacated channels, removed members,
    /// and members left over from before a long-gone vacate. Returns how many it dropped. Safe
    /// to run on every replica at once (deletes name the exact revision).
    pub async fn sweep_once(&self, now_ms: i64, horizon: Duration) -> Result<u64, StateError> {
        let cutoff = now_ms.saturating_sub(i64::try_from(horizon.as_millis()).unwrap_or(i64::MAX));
        let channels: Vec<Stored<ChannelRecord>> =
            self.scan(&format!("*.{}.>", keys::CHANNELS)).await?;
        let members: Vec<Stored<MemberRecord>> =
            self.scan(&format!("*.{}.>", keys::MEMBERS)).await?;
        let doomed = doomed(&channels, &members, cutoff);
        let mut dropped = 0;
        for revision in doomed {
            // Fails when replaced by a newer revision meanwhile (or swept by another replica).
            if let Ok(true) = self.store.stream.delete_message(revision).await {
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

/// The revisions the sweep deletes, given every channel and member record and the cutoff
/// (`now - tombstone_ttl`, local clock):
///
/// - a removed member or a vacated channel whose tombstone was written before the cutoff
///   ([`MemberRecord::tombstone_written_ms`], [`ChannelRecord::tombstone_written_ms`]: the
///   write time, or for a record without one its event time). Counting from the write, not
///   from the event's `time_ms`, is what keeps the tombstone of an event that arrived late
///   (from a spool offline longer than the ttl) for a whole ttl (issue 21);
/// - a present member from before its channel's last vacate, once that vacate's `time_ms` is
///   before the cutoff. It does not count while the channel record holds the vacate, and the
///   channel's tombstone (written after the vacate happened) is not dropped before it, so its
///   event time is enough; the record keeps no write time of a vacate once it is reoccupied.
///
/// Members come first: a channel and its leftovers dropped in one sweep go members first.
fn doomed(
    channels: &[Stored<ChannelRecord>],
    members: &[Stored<MemberRecord>],
    cutoff: i64,
) -> Vec<u64> {
    let before_cutoff = |ms: Option<i64>| ms.is_some_and(|ms| ms < cutoff);
    let by_channel: std::collections::HashMap<(&str, &str), &ChannelRecord> = channels
        .iter()
        .filter_map(|c| match &c.key {
            Parsed::Channel { app_id, channel } => {
                Some(((app_id.as_str(), channel.as_str()), &c.record))
            }
            Parsed::Member { .. } => None,
        })
        .collect();
    let mut doomed = Vec::new();
    for m in members {
        let Parsed::Member {
            app_id, channel, ..
        } = &m.key
        else {
            continue;
        };
        let removed = before_cutoff(m.record.tombstone_written_ms());
        let left_over = m.record.present
            && by_channel
                .get(&(app_id.as_str(), channel.as_str()))
                .is_some_and(|c| {
                    !c.counts_member(&m.record)
                        && before_cutoff(c.vacated_at.as_ref().map(|v| v.time_ms))
                });
        if removed || left_over {
            doomed.push(m.revision);
        }
    }
    for c in channels {
        if before_cutoff(c.record.tombstone_written_ms()) {
            doomed.push(c.revision);
        }
    }
    doomed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::merge::Stamp;

    const HOUR_MS: i64 = 3600 * 1000;
    const NOW: i64 = 1_700_000_000_000;

    fn stamp(time_ms: i64) -> Stamp {
        Stamp {
            time_ms,
            index: 0,
            webhook: format!("w{time_ms}"),
        }
    }

    fn changed<T>(m: Merged<T>) -> T {
        match m {
            Merged::Changed(r) => r,
            Merged::Stale => panic!("the merge found the event stale"),
        }
    }

    fn member(user: &str, record: MemberRecord, revision: u64) -> Stored<MemberRecord> {
        Stored {
            key: Parsed::Member {
                app_id: "1".into(),
                channel: "presence-a".into(),
                user_id: user.into(),
            },
            record,
            revision,
        }
    }

    fn channel(name: &str, record: ChannelRecord, revision: u64) -> Stored<ChannelRecord> {
        Stored {
            key: Parsed::Channel {
                app_id: "1".into(),
                channel: name.into(),
            },
            record,
            revision,
        }
    }

    /// Issue 21: a tombstone whose event is older than the ttl but that was written just now
    /// (the event waited in a spool) stays; one written longer ago than the ttl goes; a record
    /// of an older version, without a write time, is judged by its event time as before.
    #[test]
    fn the_sweep_counts_the_horizon_from_the_write() {
        let ttl = HOUR_MS;
        let cutoff = NOW - ttl;
        let spooled = NOW - 2 * HOUR_MS;
        let removed = |time_ms, written_ms| {
            changed(merge::merge_member(
                None,
                false,
                &stamp(time_ms),
                written_ms,
            ))
        };
        let vacated = |time_ms, written_ms| {
            changed(merge::merge_channel(
                None,
                &Change::Occupied(false),
                &stamp(time_ms),
                written_ms,
            ))
        };
        let legacy_member = |time_ms: i64| -> MemberRecord {
            serde_json::from_str(&format!(
                r#"{{"present":false,"at":{{"time_ms":{time_ms},"index":0,"webhook":"w"}}}}"#
            ))
            .unwrap()
        };
        let legacy_channel = |time_ms: i64| -> ChannelRecord {
            serde_json::from_str(&format!(
                r#"{{"occupied":false,"occupied_at":{{"time_ms":{time_ms},"index":0,"webhook":"w"}},"vacated_at":{{"time_ms":{time_ms},"index":0,"webhook":"w"}}}}"#
            ))
            .unwrap()
        };
        let present = changed(merge::merge_member(None, true, &stamp(spooled), NOW));
        let occupied = changed(merge::merge_channel(
            None,
            &Change::Occupied(true),
            &stamp(spooled),
            NOW,
        ));
        assert_eq!(removed(spooled, NOW - 1000).written_ms, Some(NOW - 1000));
        assert_eq!(legacy_member(spooled).written_ms, None);

        let members = [
            member("spooled-written-now", removed(spooled, NOW - 1000), 1),
            member("written-long-ago", removed(spooled, cutoff - 1000), 2),
            member("legacy-old", legacy_member(spooled), 3),
            member("legacy-recent", legacy_member(NOW - 1000), 4),
            member("present", present, 5),
        ];
        let channels = [
            channel("spooled-written-now", vacated(spooled, NOW - 1000), 11),
            channel("written-long-ago", vacated(spooled, cutoff - 1000), 12),
            channel("legacy-old", legacy_channel(spooled), 13),
            channel("legacy-recent", legacy_channel(NOW - 1000), 14),
            channel("occupied", occupied, 15),
        ];
        assert_eq!(doomed(&channels, &members, cutoff), [2, 3, 12, 13]);
    }

    /// Members from before a vacate go once the vacate is past the horizon, as before; a
    /// present member after it stays.
    #[test]
    fn the_sweep_drops_members_left_over_from_an_old_vacate() {
        let cutoff = NOW - HOUR_MS;
        let old = cutoff - HOUR_MS;
        let mut room = changed(merge::merge_channel(
            None,
            &Change::Occupied(false),
            &stamp(old),
            NOW,
        ));
        room = changed(merge::merge_channel(
            Some(&room),
            &Change::Occupied(true),
            &stamp(old + 10),
            NOW,
        ));
        assert_eq!(room.written_ms, None);
        let before = changed(merge::merge_member(None, true, &stamp(old - 10), NOW));
        let after = changed(merge::merge_member(None, true, &stamp(old + 20), NOW));
        let channels = [channel("presence-a", room, 9)];
        let members = [member("before", before, 1), member("after", after, 2)];
        assert_eq!(doomed(&channels, &members, cutoff), [1]);
    }
}
