//! `dlq replay`: the letters published again through the bridge's own publisher and the
//! deliverer every path shares, each removed once the broker acknowledged it.

use indicatif::ProgressBar;

use super::format::or_dash;
#[cfg(feature = "bench-null-broker")]
use super::null_broker;
use super::{
    DeadLetterRecord, DlqError, LetterStore, MAX_LEFT_DETAILS, REPLAY_WINDOW, REPORT_LINES, amqp,
    nats,
};
use crate::broker::{Broker, BrokerError};
use crate::config::{BrokerKind, Settings};
use crate::delivery::{Deliverer, Fate, Pending, Policy};
use crate::message::{Message, PublishError};

/// A letter a replay left in the dead-letter queue, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftLetter {
    /// Its position (see [`DeadLetterRecord::position`]).
    pub position: u64,
    /// Its original message id.
    pub msg_id: String,
    /// Its original subject.
    pub subject: String,
    /// Why it stays: not replayable, or the broker's refusal.
    pub why: String,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Letters in the dead-letter queue when the replay started (the ones it works on).
    pub total: u64,
    /// Letters the replay got through: looked at and, when replayable, answered by the broker.
    /// A letter read while the broker was unavailable is not one of them: it is counted with
    /// the letters not reached (see [`ReplaySummary::left_total`]).
    pub seen: u64,
    /// Letters published, acknowledged and removed from the dead-letter queue.
    pub replayed: u64,
    /// Letters looked at that stay in the dead-letter queue.
    pub left: u64,
    /// The first `MAX_LEFT_DETAILS` (100) letters that stay, with why.
    pub left_letters: Vec<LeftLetter>,
    /// Why the replay stopped before the end of the queue (the broker went away, the
    /// dead-letter queue could not be read); letters not reached stay too.
    pub stopped: Option<String>,
}

impl ReplaySummary {
    /// Whether every letter went and nothing stopped the replay (exit 0).
    pub fn all_replayed(&self) -> bool {
        self.left == 0 && self.stopped.is_none()
    }

    /// Letters of the run that are still in the dead-letter queue: those left plus, when the
    /// replay stopped early, those it did not reach.
    pub fn left_total(&self) -> u64 {
        self.left + self.unreached()
    }

    /// Letters a replay that stopped early did not reach (0 for a complete run: letters that
    /// vanished meanwhile, swept by retention, are not counted).
    fn unreached(&self) -> u64 {
        if self.stopped.is_some() {
            self.total.saturating_sub(self.seen)
        } else {
            0
        }
    }

    /// Counts one letter that stays.
    pub fn leave(&mut self, r: &DeadLetterRecord, why: impl Into<String>) {
        self.left += 1;
        if self.left_letters.len() < MAX_LEFT_DETAILS {
            self.left_letters.push(LeftLetter {
                position: r.position,
                msg_id: r.msg_id.clone(),
                subject: r.subject.clone(),
                why: why.into(),
            });
        }
    }

    /// The one-line summary printed at the end of a replay.
    pub fn line(&self) -> String {
        let mut s = format!(
            "replayed {} of {} dead letters; {} left in the dead-letter queue",
            self.replayed,
            self.seen + self.unreached(),
            self.left_total()
        );
        if let Some(why) = &self.stopped {
            s.push_str(&format!("; stopped early: {why}"));
        }
        s
    }

    /// The summary line followed by one line per letter left (at most `REPORT_LINES`, 20).
    pub fn report(&self) -> String {
        let mut s = self.line();
        s.push('\n');
        for l in self.left_letters.iter().take(REPORT_LINES) {
            s.push_str(&format!(
                "left: position {} msg id {} subject {}: {}\n",
                l.position,
                or_dash(&l.msg_id),
                or_dash(&l.subject),
                l.why
            ));
        }
        let shown = self.left_letters.len().min(REPORT_LINES) as u64;
        if self.left > shown {
            s.push_str(&format!(
                "left: ... and {} more (`pusher-bridge dlq list` shows every letter)\n",
                self.left - shown
            ));
        }
        s
    }
}

/// Replays the letters of `store` through `publisher`: a window of letters published in their
/// order with all acks awaited together, then settled in order, so the events stream / queue
/// gets them in the DLQ's order (but for a letter that a refusal which may pass made the
/// deliverer try again: it lands after the ones behind it). A letter is removed after its ack
/// and kept otherwise.
///
/// A broker that went away (not connected after the window) stops the replay after the
/// window it happened in: the letters it did not take stay in place and are counted as not
/// reached, and the window's acked letters are removed as usual. Going on would only find it
/// away again, and publish the letters behind before those it did not take. A letter that
/// failed while the broker stayed up (no ack in time, a channel the broker closed) is left
/// with why, and the replay goes on: stopping there would stop every run at the same letter.
async fn replay_store<S: LetterStore>(
    mut store: S,
    publisher: &Deliverer,
    progress: &ProgressBar,
) -> ReplaySummary {
    progress.set_length(store.count());
    let mut summary = ReplaySummary {
        total: store.count(),
        ..Default::default()
    };
    let mut batch: Vec<(DeadLetterRecord, S::Handle)> = Vec::with_capacity(REPLAY_WINDOW);
    loop {
        let next = store.next().await.unwrap_or_else(|e| {
            summary.stopped = Some(e.to_string());
            None
        });
        let done = next.is_none();
        if let Some((r, handle)) = next {
            match r.replay_blocker().or_else(|| store.blocker(&r)) {
                Some(why) => {
                    summary.seen += 1;
                    summary.leave(&r, why);
                    store.keep(handle);
                    progress.inc(1);
                }
                None => batch.push((r, handle)),
            }
        }
        if done || batch.len() >= REPLAY_WINDOW {
            let results = republish(publisher, batch.iter().map(|(r, _)| r)).await;
            for ((r, handle), result) in batch.drain(..).zip(results) {
                match result {
                    Republished::Unavailable(why) if !publisher.broker().is_up() => {
                        summary
                            .stopped
                            .get_or_insert_with(|| format!("the broker is unavailable: {why}"));
                        store.keep(handle);
                    }
                    Republished::Unavailable(why) => {
                        summary.seen += 1;
                        summary.leave(&r, format!("not taken this time: {why}"));
                        store.keep(handle);
                    }
                    Republished::Refused(why) => {
                        summary.seen += 1;
                        summary.leave(&r, format!("refused again: {why}"));
                        store.keep(handle);
                    }
                    Republished::Acked => {
                        summary.seen += 1;
                        match store.remove(handle).await {
                            Ok(()) => summary.replayed += 1,
                            Err(e) => summary.leave(
                                &r,
                                format!(
                                    "published, but could not be removed from the dead-letter {}: {e}",
                                    S::KIND
                                ),
                            ),
                        }
                    }
                }
                progress.inc(1);
            }
        }
        if done || summary.stopped.is_some() {
            break;
        }
    }
    store.close().await;
    progress.finish_and_clear();
    summary
}

/// What became of one republished letter.
enum Republished {
    /// The broker acknowledged it.
    Acked,
    /// The broker refused it again (with why).
    Refused(String),
    /// The broker did not take it: not connected, no ack in time (with why).
    Unavailable(String),
}

/// Publishes `letters` as their event messages, in this order, all acks awaited together, as
/// the deliverer does for every path (with replay's policy: a refusal that may pass is tried a
/// few times; nothing is dead-lettered again, the letter stays): one result per letter.
async fn republish<'a>(
    publisher: &Deliverer,
    letters: impl Iterator<Item = &'a DeadLetterRecord>,
) -> Vec<Republished> {
    let messages: Vec<Message> = letters.map(DeadLetterRecord::to_message).collect();
    publisher
        .events(&Pending::fresh(&messages), Policy::replay())
        .await
        .into_iter()
        .map(|fate| match fate {
            Fate::Published => Republished::Acked,
            Fate::Kept {
                why: PublishError::Unavailable(why),
                ..
            } => Republished::Unavailable(why),
            Fate::Kept { why, .. } => Republished::Refused(why.to_string()),
            // Replay's policy dead-letters nothing.
            Fate::DeadLettered(_) | Fate::Unplaceable { .. } => {
                Republished::Refused("dead-lettered again".into())
            }
        })
        .collect()
}

/// How long replay waits for the broker's publisher to connect (and declare, with
/// `broker.declare`) before giving up.
const PUBLISHER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `dlq replay`: publishes every replayable dead letter to its original subject / routing key
/// with its original message id and removes each one once the broker acknowledged it. Letters
/// that cannot be replayed or are refused again stay; a broker that becomes unavailable stops
/// the replay ([`ReplaySummary::stopped`]), and the letters it did not take stay too.
/// `progress` gets the total and one tick per letter handled.
///
/// The letters are read (and removed) by the broker's `LetterStore`; they are published by the
/// bridge's own [`Broker`], the publisher of live events: the same headers and properties, the
/// same confirm handling, and on RabbitMQ the same attribution of `basic.return`s to the message
/// they belong to (a confirm's attached return may be another message's when several are in
/// flight, which once left letters in neither the queue nor the DLQ).
pub async fn replay(
    settings: &Settings,
    progress: &ProgressBar,
) -> Result<ReplaySummary, DlqError> {
    #[cfg(feature = "bench-null-broker")]
    if settings.broker.kind == BrokerKind::Null {
        return Err(null_broker());
    }
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    // Replay publishes into the topology as it is: a letter that no queue or stream takes now
    // stays a letter, rather than the tool creating the bridge's catch-all queue for it.
    let mut publishing = settings.clone();
    publishing.broker.declare = false;
    let broker = std::sync::Arc::new(Broker::connect(&publishing, metrics.clone()).await?);
    if !broker.wait_up(PUBLISHER_WAIT).await {
        broker.close().await;
        return Err(BrokerError::connect_msg(format!(
            "the broker's publisher was not up within {PUBLISHER_WAIT:?}"
        ))
        .into());
    }
    let publisher = Deliverer::new(
        broker.clone(),
        settings.broker.publish_timeout,
        REPLAY_WINDOW,
    );
    let result = match settings.broker.kind {
        BrokerKind::Nats => match nats::Store::open(settings).await {
            Ok(store) => Ok(replay_store(store, &publisher, progress).await),
            Err(e) => Err(e),
        },
        BrokerKind::Amqp => match amqp::Store::open(settings).await {
            Ok(store) => Ok(replay_store(store, &publisher, progress).await),
            Err(e) => Err(e),
        },
        #[cfg(feature = "bench-null-broker")]
        BrokerKind::Null => Err(null_broker()),
    };
    broker.close().await;
    result
}

#[cfg(test)]
mod tests {
    //! `replay_store` against an in-memory store of letters and the in-memory broker
    //! ([`crate::broker::fake`]): which letters are removed, which kept, and what is said.

    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::broker::fake::{FakeBroker, refused, timeout};
    use crate::dlq::list_store::ListStore;
    use crate::message::DlqReason;

    /// A letter at `position` of an event to `subject` (empty: a letter with no subject).
    fn letter(position: u64, subject: &str, reason: &str) -> DeadLetterRecord {
        DeadLetterRecord::from_headers(
            position,
            |name| match name {
                "Pusher-Bridge-Subject" => Some(subject.to_string()),
                "Pusher-Bridge-Msg-Id" => Some(format!("id-{position}")),
                "Pusher-Bridge-Reason" => Some(reason.to_string()),
                _ => None,
            },
            None,
            Bytes::from_static(b"{}"),
        )
    }

    /// A store of letters 1..=`n`, each of an event to `s<position>`.
    fn numbered(n: u64) -> ListStore {
        ListStore::new(
            (1..=n)
                .map(|i| letter(i, &format!("s{i}"), "no_stream"))
                .collect(),
        )
    }

    fn deliverer() -> Deliverer {
        Deliverer::new(
            Arc::new(Broker::Fake(Box::default())),
            Duration::from_millis(100),
            REPLAY_WINDOW,
        )
    }

    fn fake(d: &Deliverer) -> &FakeBroker {
        match &**d.broker() {
            Broker::Fake(f) => f,
            _ => unreachable!("the fake broker"),
        }
    }

    async fn replay(store: &mut ListStore, d: &Deliverer) -> ReplaySummary {
        replay_store(store, d, &ProgressBar::hidden()).await
    }

    #[tokio::test]
    async fn acked_letters_are_removed_and_the_rest_kept_in_place() {
        let mut store = ListStore {
            letters: vec![
                letter(1, "a", "unroutable"),
                letter(2, "", "malformed"),
                letter(3, "c", "no_stream"),
                letter(4, "d", "no_stream"),
                letter(5, "e", "nacked"),
            ],
            blocked: HashSet::from([3]),
            ..ListStore::default()
        };
        let d = deliverer();
        fake(&d).script("d", vec![refused(DlqReason::TooLarge)]);
        let summary = replay(&mut store, &d).await;
        assert_eq!(store.removed, [1, 5]);
        assert_eq!(store.kept, [2, 3, 4]);
        assert!(store.closed);
        assert_eq!(fake(&d).published(), ["a", "e"]);
        assert_eq!(fake(&d).tries("c"), 0, "a blocked letter is not published");
        assert!(
            fake(&d).dead_letters().is_empty(),
            "nothing is dead-lettered again"
        );
        assert_eq!(
            (summary.total, summary.seen, summary.replayed, summary.left),
            (5, 5, 2, 3)
        );
        assert_eq!(summary.stopped, None);
        let why: Vec<(u64, &str)> = summary
            .left_letters
            .iter()
            .map(|l| (l.position, l.why.as_str()))
            .collect();
        assert_eq!(why[0].0, 2);
        assert!(why[0].1.contains("malformed"), "{why:?}");
        assert_eq!(why[1], (3, "this store cannot take it back"));
        assert_eq!(why[2].0, 4);
        assert!(
            why[2].1.starts_with("refused again: ") && why[2].1.contains("too_large"),
            "{why:?}"
        );
    }

    #[tokio::test]
    async fn a_letter_published_but_not_removed_is_said_and_not_counted_replayed() {
        let mut store = ListStore {
            letters: vec![letter(1, "a", "no_stream"), letter(2, "b", "no_stream")],
            remove_fails: HashSet::from([1]),
            ..ListStore::default()
        };
        let d = deliverer();
        let summary = replay(&mut store, &d).await;
        assert_eq!(fake(&d).published(), ["a", "b"]);
        assert_eq!(store.removed, [2]);
        assert!(store.kept.is_empty());
        assert_eq!((summary.seen, summary.replayed, summary.left), (2, 1, 1));
        assert!(!summary.all_replayed());
        let left = &summary.left_letters[0];
        assert_eq!(left.position, 1);
        assert_eq!(
            left.why,
            "published, but could not be removed from the dead-letter list: the store went away"
        );
    }

    #[tokio::test]
    async fn an_unavailable_broker_stops_the_replay_and_keeps_every_letter_it_did_not_take() {
        // More letters than a window: the outage is in the first one.
        let n = REPLAY_WINDOW as u64 + 6;
        let mut store = numbered(n);
        let d = deliverer();
        fake(&d).script("s3", vec![refused(DlqReason::TooLarge)]);
        fake(&d).go_down_at("s4");
        let summary = replay(&mut store, &d).await;
        assert_eq!(fake(&d).published(), ["s1", "s2"]);
        assert_eq!(
            store.removed,
            [1, 2],
            "only what was republished is removed"
        );
        let window: Vec<u64> = (3..=REPLAY_WINDOW as u64).collect();
        assert_eq!(store.kept, window, "the rest of the window stays in place");
        assert_eq!(
            store.read, REPLAY_WINDOW,
            "no letter is read after the window the broker went away in"
        );
        assert!(store.closed);
        let why = summary.stopped.clone().expect("the replay stopped");
        assert!(why.contains("broker is unavailable"), "{why}");
        assert!(why.contains("connection lost"), "{why}");
        assert!(!summary.all_replayed(), "exit code 2");
        assert_eq!(summary.replayed, 2);
        assert_eq!(summary.left_total(), n - 2, "{}", summary.report());
        // The refused letter is left with its refusal; the outage is said once, not per letter.
        assert_eq!(summary.left, 1);
        assert_eq!(summary.left_letters[0].position, 3);
        assert!(
            summary.left_letters[0].why.contains("too_large"),
            "{:?}",
            summary.left_letters
        );
        let line = summary.line();
        assert!(
            line.starts_with(&format!(
                "replayed 2 of {n} dead letters; {} left in the dead-letter queue; stopped early: ",
                n - 2
            )),
            "{line}"
        );
    }

    /// A letter the broker did not take while it stayed up (no ack in time) is left with why,
    /// and the replay goes on: stopping would stop every run at that letter.
    #[tokio::test]
    async fn a_letter_not_taken_while_the_broker_stays_up_is_left_and_the_replay_goes_on() {
        let n = REPLAY_WINDOW as u64 + 6;
        let mut store = numbered(n);
        let d = deliverer();
        fake(&d).script("s4", vec![timeout()]);
        let summary = replay(&mut store, &d).await;
        assert_eq!(summary.stopped, None);
        // s4 and the rest of its window were not sent after it (in order); the next window
        // went.
        let window = REPLAY_WINDOW as u64;
        assert_eq!(store.kept, (4..=window).collect::<Vec<_>>());
        assert_eq!(summary.replayed, n - (window - 3));
        assert_eq!(summary.left, window - 3);
        assert!(
            summary.left_letters[0]
                .why
                .starts_with("not taken this time: no ack in time"),
            "{:?}",
            summary.left_letters[0]
        );
        assert!(!summary.all_replayed(), "exit code 2");
        assert!(store.closed);
    }

    #[tokio::test]
    async fn a_broker_that_goes_down_stops_the_replay() {
        let mut store = ListStore {
            letters: vec![letter(1, "a", "no_stream"), letter(2, "b", "no_stream")],
            ..ListStore::default()
        };
        let d = deliverer();
        fake(&d).set_up(false);
        let summary = replay(&mut store, &d).await;
        assert!(store.removed.is_empty());
        assert_eq!(store.kept, [1, 2]);
        assert_eq!(summary.replayed, 0);
        assert_eq!(summary.left_total(), 2);
        let why = summary.stopped.expect("the replay stopped");
        assert!(why.contains("broker is unavailable"), "{why}");
    }
}
