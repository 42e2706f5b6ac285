//! The order-safe merge: a pure function from (stored record, event) to the new record, or
//! "stale" when the event changes nothing.
//!
//! Every fact carries the [`Stamp`] of the event that set it: the webhook's `time_ms`, then the
//! event's place in its webhook, then (only to break ties between two different webhooks with
//! the same `time_ms` and place) the webhook's digest from the message id. A fact only moves to a
//! larger stamp, so applying any set of events in any order, any number of times, gives the same
//! record as applying them once in stamp order: the merge is commutative and idempotent, which
//! is what lets several replicas apply events concurrently (with compare-and-set writes) and a
//! redelivered webhook change nothing.
//!
//! A tombstone (a vacated channel, a removed member) also carries `written_ms`, the local clock
//! when it was written: the sweep counts its horizon from there, not from the event's
//! `time_ms`, so an event that reached the bridge late (from a spool that was offline for a
//! while) still leaves a tombstone that lasts `tombstone_ttl`. It is metadata, never compared
//! by the merge: which record wins is decided by the stamps alone.

use serde::{Deserialize, Serialize};

/// Where an event stands in time: compared field by field, in this order.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// The webhook's `time_ms`.
    pub time_ms: i64,
    /// The event's index in its webhook (the `-<index>` of the message id).
    pub index: u32,
    /// The webhook digest of the message id (tie-breaker between distinct webhooks).
    pub webhook: String,
}

/// What one event says about a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `channel_occupied` (true) or `channel_vacated` (false).
    Occupied(bool),
    /// `subscription_count`.
    SubscriptionCount(u64),
    /// `member_added` (true) or `member_removed` (false) of `user_id`.
    Member {
        /// The member's user id.
        user_id: String,
        /// Added (true) or removed (false).
        present: bool,
    },
}

/// One state-relevant event, ready to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// The app the event belongs to.
    pub app_id: String,
    /// The channel.
    pub channel: String,
    /// What it says.
    pub change: Change,
    /// When it happened.
    pub stamp: Stamp,
}

/// The stored record of a channel (key `<app>.channels.<channel>`), JSON in the KV.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecord {
    /// Whether the channel is occupied, as the newest occupied / vacated event says.
    pub occupied: bool,
    /// Stamp of that event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occupied_at: Option<Stamp>,
    /// Stamp of the newest `channel_vacated`: members and counts older than it are gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vacated_at: Option<Stamp>,
    /// The newest `subscription_count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_count: Option<u64>,
    /// Stamp of that event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_count_at: Option<Stamp>,
    /// When this tombstone was written (local clock, ms since the epoch), for the sweep; absent
    /// while occupied. See [`ChannelRecord::tombstone_written_ms`] for records without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_ms: Option<i64>,
}

impl ChannelRecord {
    /// The subscription count to report: the last count while occupied (unless a vacate came
    /// after it: unknown then), 0 when not occupied.
    pub(crate) fn current_subscription_count(&self) -> Option<u64> {
        if !self.occupied {
            return Some(0);
        }
        match (&self.subscription_count_at, &self.vacated_at) {
            (Some(at), Some(vacated)) if at < vacated => None,
            _ => self.subscription_count,
        }
    }

    /// Whether a member record counts: present and newer than the last vacate.
    pub(crate) fn counts_member(&self, member: &MemberRecord) -> bool {
        member.present && self.vacated_at.as_ref().is_none_or(|v| member.at > *v)
    }

    /// A tombstone: vacated, kept only so older events cannot reoccupy it.
    pub(crate) fn is_tombstone(&self) -> bool {
        !self.occupied
    }

    /// When the sweep's horizon starts for this record: `None` unless it is a tombstone; its
    /// `written_ms`, or for a tombstone written without one (by a version before issue 21, or
    /// rewritten by one during a rolling upgrade: those ignore the field) the `time_ms` of its
    /// newest stamp, as the horizon counted before.
    pub fn tombstone_written_ms(&self) -> Option<i64> {
        if !self.is_tombstone() {
            return None;
        }
        self.written_ms.or_else(|| self.newest().map(|s| s.time_ms))
    }

    /// The newest stamp in the record.
    pub fn newest(&self) -> Option<&Stamp> {
        [
            self.occupied_at.as_ref(),
            self.vacated_at.as_ref(),
            self.subscription_count_at.as_ref(),
        ]
        .into_iter()
        .flatten()
        .max()
    }
}

/// The stored record of one presence member (key `<app>.members.<channel>.<user>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Added (true) or removed (false: a tombstone).
    pub present: bool,
    /// Stamp of the event that said so.
    pub at: Stamp,
    /// When this tombstone was written (local clock, ms since the epoch), for the sweep; absent
    /// while present. See [`MemberRecord::tombstone_written_ms`] for records without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_ms: Option<i64>,
}

impl MemberRecord {
    /// When the sweep's horizon starts for this record: `None` while present; its
    /// `written_ms`, or for a tombstone written without one (by a version before issue 21, or
    /// rewritten by one during a rolling upgrade) the removal's `time_ms`, as before.
    pub fn tombstone_written_ms(&self) -> Option<i64> {
        if self.present {
            return None;
        }
        Some(self.written_ms.unwrap_or(self.at.time_ms))
    }
}

/// The outcome of a merge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Merged<T> {
    /// The record to write.
    Changed(T),
    /// The event is older than (or the same as) what the record holds: nothing to write.
    Stale,
}

/// Moves `slot` to `stamp` if that is newer; whether it moved.
fn advance(slot: &mut Option<Stamp>, stamp: &Stamp) -> bool {
    if slot.as_ref().is_some_and(|s| s >= stamp) {
        return false;
    }
    *slot = Some(stamp.clone());
    true
}

/// Merges an occupancy or subscription-count event into a channel record.
/// [`Change::Member`] never touches the channel record: it is [`Merged::Stale`] here.
/// `now_ms` (the local clock) becomes the `written_ms` of a record that is written as a
/// tombstone.
pub(crate) fn merge_channel(
    current: Option<&ChannelRecord>,
    change: &Change,
    stamp: &Stamp,
    now_ms: i64,
) -> Merged<ChannelRecord> {
    let mut next = current.cloned().unwrap_or_default();
    let changed = match change {
        Change::Occupied(occupied) => {
            let vacate = !*occupied && advance(&mut next.vacated_at, stamp);
            let moved = advance(&mut next.occupied_at, stamp);
            if moved {
                next.occupied = *occupied;
            }
            moved || vacate
        }
        Change::SubscriptionCount(n) => {
            let moved = advance(&mut next.subscription_count_at, stamp);
            if moved {
                next.subscription_count = Some(*n);
            }
            moved
        }
        Change::Member { .. } => false,
    };
    // Only a record an event changed gets a new write time: a stale or redelivered event
    // leaves a tombstone's horizon where it was.
    if changed && current != Some(&next) {
        next.written_ms = next.is_tombstone().then_some(now_ms);
        Merged::Changed(next)
    } else {
        Merged::Stale
    }
}

/// Merges a member event into a member record. `now_ms` (the local clock) becomes the
/// `written_ms` of a removal's tombstone.
pub(crate) fn merge_member(
    current: Option<&MemberRecord>,
    present: bool,
    stamp: &Stamp,
    now_ms: i64,
) -> Merged<MemberRecord> {
    match current {
        Some(c) if c.at >= *stamp => Merged::Stale,
        _ => Merged::Changed(MemberRecord {
            present,
            at: stamp.clone(),
            written_ms: (!present).then_some(now_ms),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The write time of every record in the convergence tests: one clock reading, so the
    /// records of every order compare equal.
    const NOW: i64 = 1_700_000_000_000;

    /// The whole state as an in-memory map, applied with the merge functions (what the KV
    /// holds, minus revisions).
    #[derive(Default, Debug, PartialEq, Eq)]
    struct State {
        channels: BTreeMap<String, ChannelRecord>,
        members: BTreeMap<(String, String), MemberRecord>,
    }

    impl State {
        fn apply(&mut self, u: &Update) -> bool {
            match &u.change {
                Change::Member { user_id, present } => {
                    let key = (u.channel.clone(), user_id.clone());
                    match merge_member(self.members.get(&key), *present, &u.stamp, NOW) {
                        Merged::Changed(r) => {
                            self.members.insert(key, r);
                            true
                        }
                        Merged::Stale => false,
                    }
                }
                change => match merge_channel(self.channels.get(&u.channel), change, &u.stamp, NOW)
                {
                    Merged::Changed(r) => {
                        self.channels.insert(u.channel.clone(), r);
                        true
                    }
                    Merged::Stale => false,
                },
            }
        }

        /// What the query API shows: occupied channels, counted members, counts.
        fn visible(&self) -> Vec<String> {
            let mut out = Vec::new();
            for (name, c) in &self.channels {
                let users: Vec<&str> = self
                    .members
                    .iter()
                    .filter(|((ch, _), m)| ch == name && c.counts_member(m))
                    .map(|((_, u), _)| u.as_str())
                    .collect();
                out.push(format!(
                    "{name} occupied={} sc={:?} users={users:?}",
                    c.occupied,
                    c.current_subscription_count()
                ));
            }
            out
        }
    }

    fn ev(t: i64, index: u32, webhook: &str, channel: &str, change: Change) -> Update {
        Update {
            app_id: "1".into(),
            channel: channel.into(),
            change,
            stamp: Stamp {
                time_ms: t,
                index,
                webhook: webhook.into(),
            },
        }
    }

    fn member(user: &str, present: bool) -> Change {
        Change::Member {
            user_id: user.into(),
            present,
        }
    }

    /// Calls `f` with every permutation of `items` (Heap's algorithm).
    fn permutations<T: Clone>(items: &[T], f: &mut impl FnMut(&[T])) {
        fn heap<T: Clone>(k: usize, a: &mut Vec<T>, f: &mut impl FnMut(&[T])) {
            if k <= 1 {
                f(a);
                return;
            }
            for i in 0..k {
                heap(k - 1, a, f);
                let j = if k.is_multiple_of(2) { i } else { 0 };
                a.swap(j, k - 1);
            }
        }
        let mut a = items.to_vec();
        heap(a.len(), &mut a, f);
    }

    fn in_order(events: &[Update]) -> State {
        let mut sorted = events.to_vec();
        sorted.sort_by(|a, b| a.stamp.cmp(&b.stamp));
        let mut s = State::default();
        for e in &sorted {
            s.apply(e);
        }
        s
    }

    fn assert_converges(events: &[Update]) {
        let want = in_order(events);
        let mut runs = 0;
        permutations(events, &mut |perm| {
            let mut s = State::default();
            for e in perm {
                s.apply(e);
            }
            assert_eq!(s, want, "order {perm:#?}");
            // Redelivering every webhook afterwards (in any order) changes nothing.
            for e in perm.iter().rev() {
                assert!(!s.apply(e), "redelivered {e:?} changed the state");
            }
            assert_eq!(s, want);
            runs += 1;
        });
        assert!(runs >= 1);
    }

    #[test]
    fn every_order_of_a_presence_session_converges() {
        // A presence channel's life: occupied, two members, one leaves, vacated, reoccupied;
        // two events of one webhook share a time_ms and differ by index.
        let events = vec![
            ev(1000, 0, "w1", "presence-a.b", Change::Occupied(true)),
            ev(1000, 1, "w1", "presence-a.b", member("u@1", true)),
            ev(1500, 0, "w2", "presence-a.b", member("u;2", true)),
            ev(2000, 0, "w3", "presence-a.b", member("u@1", false)),
            ev(3000, 0, "w4", "presence-a.b", member("u;2", false)),
            ev(3000, 1, "w4", "presence-a.b", Change::Occupied(false)),
            ev(4000, 0, "w5", "presence-a.b", Change::Occupied(true)),
        ];
        assert_converges(&events);
        let end = in_order(&events);
        assert_eq!(
            end.visible(),
            vec!["presence-a.b occupied=true sc=None users=[]"]
        );
    }

    #[test]
    fn every_order_of_occupancy_and_counts_converges() {
        let events = vec![
            ev(10, 0, "a", "news", Change::Occupied(true)),
            ev(11, 0, "b", "news", Change::SubscriptionCount(3)),
            ev(12, 0, "c", "news", Change::SubscriptionCount(5)),
            ev(13, 0, "d", "news", Change::Occupied(false)),
            ev(13, 0, "e", "news", Change::Occupied(true)), // same time and index: digest decides
            ev(14, 0, "f", "other", Change::Occupied(true)),
            ev(15, 0, "g", "news", Change::SubscriptionCount(1)),
        ];
        assert_converges(&events);
        let end = in_order(&events);
        assert_eq!(
            end.visible(),
            vec![
                "news occupied=true sc=Some(1) users=[]",
                "other occupied=true sc=None users=[]"
            ]
        );
    }

    #[test]
    fn a_late_member_added_does_not_resurrect() {
        // member_removed arrives before the member_added it follows.
        let added = ev(100, 0, "w1", "presence-x", member("u", true));
        let removed = ev(200, 0, "w2", "presence-x", member("u", false));
        let mut s = State::default();
        assert!(s.apply(&removed));
        assert!(!s.apply(&added));
        assert!(!s.members[&("presence-x".into(), "u".into())].present);
    }

    #[test]
    fn members_older_than_a_vacate_do_not_count() {
        let mut s = State::default();
        s.apply(&ev(1, 0, "a", "presence-x", Change::Occupied(true)));
        s.apply(&ev(2, 0, "b", "presence-x", member("stale", true)));
        s.apply(&ev(3, 0, "c", "presence-x", Change::Occupied(false)));
        s.apply(&ev(4, 0, "d", "presence-x", Change::Occupied(true)));
        s.apply(&ev(5, 0, "e", "presence-x", member("fresh", true)));
        assert_eq!(
            s.visible(),
            vec!["presence-x occupied=true sc=None users=[\"fresh\"]"]
        );
    }

    /// Random small event sets (a fixed-seed generator, so failures reproduce): every
    /// permutation converges, redeliveries included.
    #[test]
    fn random_event_sets_converge_in_every_order() {
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..40 {
            let len = 3 + next(4) as usize; // 3..=6 events: up to 720 orders
            let mut events = Vec::with_capacity(len + 1);
            for i in 0..len {
                let channel = if next(3) == 0 {
                    "presence-b"
                } else {
                    "presence-a"
                };
                let change = match next(5) {
                    0 => Change::Occupied(true),
                    1 => Change::Occupied(false),
                    2 => Change::SubscriptionCount(next(10)),
                    3 => member(if next(2) == 0 { "u1" } else { "u2" }, true),
                    _ => member(if next(2) == 0 { "u1" } else { "u2" }, false),
                };
                // Few distinct times: equal time_ms is common, index and digest decide.
                let t = next(3) as i64;
                events.push(ev(t, next(2) as u32, &format!("w{i}"), channel, change));
            }
            // A redelivered webhook: the same event twice in the set.
            let dup = events[next(len as u64) as usize].clone();
            events.push(dup);
            assert_converges(&events);
        }
    }

    /// A tombstone carries the local clock of its write (issue 21); a live record does not;
    /// a stale or redelivered event does not refresh it, a newer one does; what wins is still
    /// decided by the stamps alone.
    #[test]
    fn tombstones_carry_their_write_time() {
        let at = |t: i64| Stamp {
            time_ms: t,
            index: 0,
            webhook: format!("w{t}"),
        };
        let Merged::Changed(added) = merge_member(None, true, &at(10), NOW) else {
            panic!("stale")
        };
        assert_eq!(
            (added.written_ms, added.tombstone_written_ms()),
            (None, None)
        );
        let Merged::Changed(removed) = merge_member(Some(&added), false, &at(20), NOW + 5) else {
            panic!("stale")
        };
        assert_eq!(removed.written_ms, Some(NOW + 5));
        assert_eq!(removed.tombstone_written_ms(), Some(NOW + 5));
        // Older, the same again, or written later: stale, the write time stays.
        for t in [15, 20] {
            assert_eq!(
                merge_member(Some(&removed), true, &at(t), NOW + 9),
                Merged::Stale
            );
            assert_eq!(
                merge_member(Some(&removed), false, &at(t), NOW + 9),
                Merged::Stale
            );
        }
        let Merged::Changed(again) = merge_member(Some(&removed), false, &at(30), NOW + 9) else {
            panic!("stale")
        };
        assert_eq!(again.written_ms, Some(NOW + 9));

        let Merged::Changed(vacated) = merge_channel(None, &Change::Occupied(false), &at(10), NOW)
        else {
            panic!("stale")
        };
        assert_eq!(vacated.tombstone_written_ms(), Some(NOW));
        assert_eq!(
            merge_channel(Some(&vacated), &Change::Occupied(true), &at(5), NOW + 1),
            Merged::Stale
        );
        let Merged::Changed(back) =
            merge_channel(Some(&vacated), &Change::Occupied(true), &at(11), NOW + 1)
        else {
            panic!("stale")
        };
        assert_eq!((back.written_ms, back.tombstone_written_ms()), (None, None));
        assert_eq!(back.vacated_at, Some(at(10)));
    }

    /// Records of a version before issue 21 (no `written_ms`) read as before: the horizon
    /// counts from their event time. Records with it read in such a version (its structs, as
    /// they were, ignore unknown fields), and live records are the same JSON as before.
    #[test]
    fn write_times_are_compatible_both_ways() {
        let old_member = r#"{"present":false,"at":{"time_ms":7,"index":0,"webhook":"w"}}"#;
        let m: MemberRecord = serde_json::from_str(old_member).unwrap();
        assert_eq!((m.written_ms, m.tombstone_written_ms()), (None, Some(7)));
        let seven = m.at.clone();
        let old_channel = r#"{"occupied":false,"occupied_at":{"time_ms":7,"index":0,"webhook":"w"},"subscription_count":2,"subscription_count_at":{"time_ms":9,"index":0,"webhook":"w"}}"#;
        let c: ChannelRecord = serde_json::from_str(old_channel).unwrap();
        assert_eq!((c.written_ms, c.tombstone_written_ms()), (None, Some(9)));

        /// `MemberRecord` and `ChannelRecord` before issue 21.
        #[derive(Deserialize)]
        struct OldMember {
            present: bool,
            at: Stamp,
        }
        #[derive(Deserialize)]
        struct OldChannel {
            occupied: bool,
            vacated_at: Option<Stamp>,
        }
        let tomb = MemberRecord {
            written_ms: Some(NOW),
            ..m
        };
        let text = serde_json::to_string(&tomb).unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"present":false,"at":{{"time_ms":7,"index":0,"webhook":"w"}},"written_ms":{NOW}}}"#
            )
        );
        let read: OldMember = serde_json::from_str(&text).unwrap();
        assert_eq!((read.present, read.at.time_ms), (false, 7));
        let Merged::Changed(vacated) = merge_channel(None, &Change::Occupied(false), &tomb.at, NOW)
        else {
            panic!("stale")
        };
        let read: OldChannel =
            serde_json::from_str(&serde_json::to_string(&vacated).unwrap()).unwrap();
        assert_eq!((read.occupied, read.vacated_at), (false, Some(tomb.at)));

        let Merged::Changed(present) = merge_member(None, true, &seven, NOW) else {
            panic!("stale")
        };
        assert_eq!(
            serde_json::to_string(&present).unwrap(),
            r#"{"present":true,"at":{"time_ms":7,"index":0,"webhook":"w"}}"#
        );
    }

    #[test]
    fn records_are_stable_json() {
        let r = ChannelRecord {
            occupied: true,
            occupied_at: Some(Stamp {
                time_ms: 5,
                index: 1,
                webhook: "ab".into(),
            }),
            ..Default::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"occupied":true,"occupied_at":{"time_ms":5,"index":1,"webhook":"ab"}}"#
        );
        assert_eq!(serde_json::from_str::<ChannelRecord>(&text).unwrap(), r);
    }
}
