//! Delivery: the one loop that drives the broker for every path that publishes (the webhook,
//! the spool drainer, `dlq replay`), and the one policy it follows after a failed publish:
//! try again, keep the event where it can wait, or dead-letter it.
//!
//! [`Deliverer::events`] hands a batch to the broker in order with every ack awaited together
//! ([`Broker::publish_in_order`]), then follows [`next_step`] for each failure;
//! [`Deliverer::dead_letters`] publishes dead letters the same way, and a path with both hands
//! them over together ([`Deliverer::events_and_dead_letters`]). Each event ends in a
//! [`Fate`]. What differs between the paths is a [`Policy`], each difference named with its
//! reason: the webhook path has a time budget (its answer is due) and retries an unavailable
//! broker within it; the drainer and replay count tries and leave what the broker cannot take
//! where it is (the spool, the dead-letter queue), so nothing behind it overtakes it; replay
//! does not dead-letter a refusal, as the letter itself is in the dead-letter queue.
//!
//! The brokers sort each failure into [`PublishError`], since only they can read their answers:
//! `Unavailable` (no connection, no ack in time, a NATS stream without a leader, a JetStream API
//! that does not answer) is transient, `Refused` is the broker's answer about this message. Of
//! the refusals, `rejected` and `nacked` may pass on a retry (a broker under pressure); the
//! others (`no_stream` confirmed by the JetStream API, `full`, `unroutable`, `too_large`,
//! `malformed`) cannot, and are dead-lettered at once, each said in the log ([`refusals`]).
//!
//! [`refusals`]: crate::refusals

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::backoff::{self, Backoff};
use crate::broker::Broker;
use crate::message::{DeadLetter, DlqReason, Message, PublishError, now_ms};

/// What to do with an event whose publish failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Publish it again after `Duration`.
    Retry(Duration),
    /// Keep it on the spool (webhook path: append it; drainer: leave it where it is) until the
    /// broker takes it.
    Spool,
    /// Send it to the dead-letter queue.
    DeadLetter,
}

/// How much trying is left, as the caller counts it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Budget {
    /// The webhook path: time left until the answer is due, and the share of the budget kept
    /// for the dead-letter publish a refusal will need (so it fits in the same answer).
    Time {
        /// Until the answer's deadline.
        remaining: Duration,
        /// Kept back for the dead-letter publish after a refusal.
        reserve: Duration,
    },
    /// The paths without a deadline (the drainer, `dlq replay`): tries left for a refusal that
    /// may pass.
    Tries(u32),
}

/// The pause between tries: 25 ms doubling up to [`MAX_BACKOFF`] (jittered when slept).
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(25), MAX_BACKOFF);
/// The longest pause between tries.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_millis(400);
/// Below this much time left after the pause, a try is not worth starting.
const MIN_TRY: Duration = Duration::from_millis(10);

/// The pause after the `attempt`-th failed try (1-based): 25, 50, 100, 200, 400, 400... ms.
pub(crate) fn backoff(attempt: u32) -> Duration {
    BACKOFF.step(attempt)
}

/// Whether a refusal may pass on a retry.
pub(crate) fn may_pass(reason: DlqReason) -> bool {
    matches!(reason, DlqReason::Rejected | DlqReason::Nacked)
}

/// The next step after the `attempt`-th try (1-based) failed with `error`. `broker_up`: whether
/// an unavailable broker may be tried again now (it is connected, and the path retries an
/// unavailable broker at all, see [`Policy::retry_unavailable`]); a broker that is down is not
/// retried: its events are kept at once.
pub(crate) fn next_step(
    error: &PublishError,
    attempt: u32,
    broker_up: bool,
    budget: Budget,
) -> Step {
    let pause = backoff(attempt);
    let retryable = match error {
        PublishError::Unavailable(_) => broker_up,
        PublishError::Refused { reason, .. } => may_pass(*reason),
    };
    let room = match budget {
        Budget::Time { remaining, reserve } => {
            let reserve = match error {
                PublishError::Refused { .. } => reserve,
                PublishError::Unavailable(_) => Duration::ZERO,
            };
            remaining > pause + reserve + MIN_TRY
        }
        Budget::Tries(left) => left > 0,
    };
    match error {
        _ if retryable && room => Step::Retry(pause),
        PublishError::Unavailable(_) => Step::Spool,
        PublishError::Refused { .. } => Step::DeadLetter,
    }
}

/// How one path may try; every difference between the paths is a field, with its reason.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// How much trying is left.
    pub limit: Limit,
    /// Try an unavailable broker again while it is connected. The webhook path does, within
    /// its answer's budget (a blip should not cost the spool a write). The drainer and replay
    /// do not: the event stays where it waits (the spool, the dead-letter queue) and their next
    /// pass tries it again in order, so nothing behind it overtakes it.
    pub retry_unavailable: bool,
    /// Dead-letter an event the broker refuses. Replay does not: the letter it republished is
    /// still in the dead-letter queue, and stays there.
    pub dead_letter: bool,
}

/// How long a [`Policy`] may try: until a deadline, or a number of tries ([`Budget`] is what
/// is left of it after each try).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Limit {
    /// Until the answer is due, keeping `reserve` for the dead-letter publish a refusal needs.
    Until {
        /// When the webhook's answer is due.
        deadline: Instant,
        /// Kept back for the dead-letter publish after a refusal.
        reserve: Duration,
    },
    /// A number of tries for a refusal that may pass.
    Tries(u32),
}

/// Tries for a refusal that may pass (`rejected`, `nacked`) on the paths without a deadline.
pub(crate) const REFUSAL_TRIES: u32 = 3;

impl Policy {
    /// The webhook path: until `deadline`, a quarter of `budget` kept for dead letters.
    pub(crate) fn webhook(deadline: Instant, budget: Duration) -> Self {
        Self {
            limit: Limit::Until {
                deadline,
                reserve: budget / 4,
            },
            retry_unavailable: true,
            dead_letter: true,
        }
    }

    /// The spool drainer.
    pub(crate) fn drain() -> Self {
        Self {
            limit: Limit::Tries(REFUSAL_TRIES),
            retry_unavailable: false,
            dead_letter: true,
        }
    }

    /// `dlq replay`.
    pub(crate) fn replay() -> Self {
        Self {
            dead_letter: false,
            ..Self::drain()
        }
    }

    /// The budget left after `attempt` tries.
    fn left(&self, attempt: u32) -> Budget {
        match self.limit {
            Limit::Until { deadline, reserve } => Budget::Time {
                remaining: deadline.saturating_duration_since(Instant::now()),
                reserve,
            },
            Limit::Tries(n) => Budget::Tries(n.saturating_sub(attempt)),
        }
    }

    /// The deadline to take in-flight room by (`None`: wait).
    fn deadline(&self) -> Option<Instant> {
        match self.limit {
            Limit::Until { deadline, .. } => Some(deadline),
            Limit::Tries(_) => None,
        }
    }
}

/// What could not reach the broker, to keep where it waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    /// An event.
    Event(Message),
    /// A dead letter.
    DeadLetter(DeadLetter),
}

/// Where one event or dead letter ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// The broker acknowledged the event.
    Published,
    /// The dead-letter queue acknowledged it, for this reason.
    DeadLettered(DlqReason),
    /// Not at the broker: the webhook path spools it, the drainer leaves it on the spool,
    /// replay leaves the letter in place.
    Kept {
        /// What to keep.
        item: Kept,
        /// The last failure.
        why: PublishError,
    },
    /// The dead-letter queue refused this letter for good: the drainer sets it aside in the
    /// quarantine file (with `refusal` added to its detail); the webhook path spools it as it
    /// is, like a kept one.
    Unplaceable {
        /// The letter, as it was.
        letter: DeadLetter,
        /// The dead-letter queue's answer.
        refusal: String,
    },
}

impl Fate {
    /// Where the event ended, as its producer span says it (`pusher.outcome`): `published`,
    /// `dead_lettered`, or `spooled` for what waits (kept, or a letter the dead-letter queue
    /// refused).
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Fate::Published => "published",
            Fate::DeadLettered(_) => "dead_lettered",
            Fate::Kept { .. } | Fate::Unplaceable { .. } => "spooled",
        }
    }

    /// Whether the event is settled: at the broker or in the dead-letter queue.
    pub(crate) fn settled(&self) -> bool {
        matches!(self, Fate::Published | Fate::DeadLettered(_))
    }
}

/// One event to deliver, and since when it waits (a spooled event failed when it was spooled).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pending<'a> {
    /// The event.
    pub message: &'a Message,
    /// Unix ms of its first failed publish, when an earlier pass had one.
    pub failed_since_ms: Option<u64>,
}

impl<'a> Pending<'a> {
    /// `messages` for their first delivery (no earlier failure).
    pub(crate) fn fresh(messages: &'a [Message]) -> Vec<Self> {
        messages
            .iter()
            .map(|message| Pending {
                message,
                failed_since_ms: None,
            })
            .collect()
    }
}

/// A failed publish after the policy gave up on it.
struct Failed {
    error: PublishError,
    attempts: u32,
    first_failure_ms: u64,
}

/// Drives one broker for one path: the publishes in flight bounded by its own `max_in_flight`
/// (the webhook path's is `broker.max_in_flight`, shared by all webhooks; the drainer's a
/// drain batch; replay's its window), each failure handled by [`next_step`]. The callers count
/// what their fates mean (the drainer only for the records it commits).
pub(crate) struct Deliverer {
    broker: Arc<Broker>,
    publish_timeout: Duration,
    in_flight: Semaphore,
    max_in_flight: usize,
}

impl Deliverer {
    /// A deliverer of `broker` whose tries wait `publish_timeout` at most, with at most
    /// `max_in_flight` publishes in flight.
    pub(crate) fn new(
        broker: Arc<Broker>,
        publish_timeout: Duration,
        max_in_flight: usize,
    ) -> Self {
        let max_in_flight = max_in_flight.max(1);
        Self {
            broker,
            publish_timeout,
            in_flight: Semaphore::new(max_in_flight),
            max_in_flight,
        }
    }

    /// The broker it drives.
    pub(crate) fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Room for `n` publishes (at most `max_in_flight`), by the policy's deadline if it has one.
    async fn room(&self, n: usize, policy: &Policy) -> Option<SemaphorePermit<'_>> {
        let wanted = u32::try_from(n.min(self.max_in_flight)).unwrap_or(u32::MAX);
        let acquire = self.in_flight.acquire_many(wanted);
        match policy.deadline() {
            Some(deadline) => tokio::time::timeout_at(deadline, acquire).await.ok()?.ok(),
            None => acquire.await.ok(),
        }
    }

    /// All of this deliverer's in-flight room, held until the permit is dropped: for tests of a
    /// path that finds none.
    #[cfg(test)]
    pub(crate) async fn take_all_room(&self) -> SemaphorePermit<'_> {
        let all = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        self.in_flight
            .acquire_many(all)
            .await
            .unwrap_or_else(|_| unreachable!("the semaphore is never closed"))
    }

    /// How long one try may wait for its ack.
    fn try_timeout(&self, policy: &Policy) -> Duration {
        match policy.limit {
            Limit::Until { deadline, .. } => deadline
                .saturating_duration_since(Instant::now())
                .min(self.publish_timeout),
            Limit::Tries(_) => self.publish_timeout,
        }
    }

    /// Delivers `events`: handed to the broker in this order with every ack awaited together,
    /// then each failure as `policy` says (tried again, dead-lettered, or kept). One fate per
    /// event, in order.
    pub(crate) async fn events(&self, events: &[Pending<'_>], policy: Policy) -> Vec<Fate> {
        if events.is_empty() {
            return Vec::new();
        }
        let Some(_room) = self.room(events.len(), &policy).await else {
            let no_room = || PublishError::Unavailable("too many publishes in flight".into());
            let failed = |_| Failed {
                error: no_room(),
                attempts: 0,
                first_failure_ms: now_ms(),
            };
            return join_all(
                events
                    .iter()
                    .map(|p| self.settle(p, Err(failed(p)), policy)),
            )
            .await;
        };
        let refs: Vec<&Message> = events.iter().map(|p| p.message).collect();
        let first = self
            .broker
            .publish_in_order(&refs, self.try_timeout(&policy))
            .await;
        join_all(
            events
                .iter()
                .zip(first)
                .map(|(p, first)| self.event(p, first, policy)),
        )
        .await
    }

    /// One event after its first try: tried again while the policy allows, then settled.
    async fn event(
        &self,
        p: &Pending<'_>,
        first: Result<(), PublishError>,
        policy: Policy,
    ) -> Fate {
        let outcome = self
            .retry(Some(first), policy, |t| self.broker.publish(p.message, t))
            .await;
        self.settle(p, outcome, policy).await
    }

    /// Where an event ends after its last try.
    async fn settle(&self, p: &Pending<'_>, outcome: Result<(), Failed>, policy: Policy) -> Fate {
        let m = p.message;
        match outcome {
            Ok(()) => Fate::Published,
            Err(Failed {
                error: PublishError::Refused { reason, detail },
                attempts,
                first_failure_ms,
            }) if policy.dead_letter => {
                crate::refusals::refused(reason, &m.app_id, &m.subject, &detail);
                let letter = DeadLetter {
                    message: m.clone(),
                    reason,
                    detail,
                    attempts,
                    first_failure_ms: p.failed_since_ms.unwrap_or(first_failure_ms),
                };
                self.dead_letter(letter, policy).await
            }
            Err(Failed { error, .. }) => Fate::Kept {
                item: Kept::Event(m.clone()),
                why: error,
            },
        }
    }

    /// Delivers a batch's events ([`Deliverer::events`]) and its dead letters
    /// ([`Deliverer::dead_letters`]) at once, each as `policy` says: the way every path that has
    /// both (the webhook path: its malformed events; the drainer: the spool's letters) delivers
    /// them. The letters go to another destination and owe the events no order, so they do not
    /// wait for the events' tries (a retry's backoff, a slow ack), nor spend the answer's budget
    /// after them. The fates of the events, then of the letters, each in order.
    pub(crate) async fn events_and_dead_letters(
        &self,
        events: &[Pending<'_>],
        letters: Vec<DeadLetter>,
        policy: Policy,
    ) -> (Vec<Fate>, Vec<Fate>) {
        tokio::join!(
            self.events(events, policy),
            self.dead_letters(letters, policy)
        )
    }

    /// Delivers dead letters (malformed events, spooled letters) to the dead-letter queue, in
    /// chunks of this deliverer's `max_in_flight` (`broker.max_in_flight` on the webhook path,
    /// [`DRAIN_BATCH`] for the drainer, [`REPLAY_WINDOW`] for replay), each failure as `policy`
    /// says. One fate per letter.
    ///
    /// [`DRAIN_BATCH`]: crate::spool::DRAIN_BATCH
    /// [`REPLAY_WINDOW`]: crate::dlq::REPLAY_WINDOW
    ///
    /// Chunks, not one permit per letter: all of them awaited in one `join_all` grew with the
    /// square of the count (each wake-up of the join re-polled every waiting acquire, and
    /// tokio's cooperative budget let only 128 through per round: 8,000 malformed events took
    /// 1.5 s).
    pub(crate) async fn dead_letters(&self, letters: Vec<DeadLetter>, policy: Policy) -> Vec<Fate> {
        let mut fates = Vec::with_capacity(letters.len());
        let mut letters = letters.into_iter().peekable();
        while letters.peek().is_some() {
            let chunk: Vec<DeadLetter> = letters.by_ref().take(self.max_in_flight).collect();
            match self.room(chunk.len(), &policy).await {
                Some(_room) => {
                    fates.extend(
                        join_all(chunk.into_iter().map(|dl| self.dead_letter(dl, policy))).await,
                    );
                }
                None => fates.extend(chunk.into_iter().map(|dl| Fate::Kept {
                    item: Kept::DeadLetter(dl),
                    why: PublishError::Unavailable("too many publishes in flight".into()),
                })),
            }
        }
        fates
    }

    /// One dead letter to the dead-letter queue; the caller holds its in-flight room.
    async fn dead_letter(&self, letter: DeadLetter, policy: Policy) -> Fate {
        let outcome = self
            .retry(None, policy, |t| {
                self.broker.publish_dead_letter(&letter, t)
            })
            .await;
        match outcome {
            Ok(()) => Fate::DeadLettered(letter.reason),
            Err(Failed {
                error: PublishError::Refused { detail, .. },
                ..
            }) => Fate::Unplaceable {
                letter,
                refusal: detail,
            },
            Err(Failed { error, .. }) => Fate::Kept {
                item: Kept::DeadLetter(letter),
                why: error,
            },
        }
    }

    /// Runs `attempt` (after `first`, the outcome of a try made elsewhere, if any) until it
    /// succeeds or [`next_step`] says to stop.
    async fn retry<F, Fut>(
        &self,
        mut first: Option<Result<(), PublishError>>,
        policy: Policy,
        attempt: F,
    ) -> Result<(), Failed>
    where
        F: Fn(Duration) -> Fut,
        Fut: Future<Output = Result<(), PublishError>>,
    {
        let mut attempts = 0;
        let mut first_failure_ms = 0;
        loop {
            attempts += 1;
            let outcome = match first.take() {
                Some(outcome) => outcome,
                None => attempt(self.try_timeout(&policy)).await,
            };
            let error = match outcome {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if first_failure_ms == 0 {
                first_failure_ms = now_ms();
            }
            let may_retry_unavailable = policy.retry_unavailable && self.broker.is_up();
            match next_step(
                &error,
                attempts,
                may_retry_unavailable,
                policy.left(attempts),
            ) {
                Step::Retry(pause) => tokio::time::sleep(backoff::jitter(pause)).await,
                Step::Spool | Step::DeadLetter => {
                    return Err(Failed {
                        error,
                        attempts,
                        first_failure_ms,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(reason: DlqReason) -> PublishError {
        PublishError::Refused {
            reason,
            detail: "test".into(),
        }
    }

    fn time(ms: u64) -> Budget {
        Budget::Time {
            remaining: Duration::from_millis(ms),
            reserve: Duration::from_millis(500),
        }
    }

    #[test]
    fn unavailable_is_retried_while_the_broker_is_up_and_time_is_left_then_spooled() {
        let e = PublishError::Unavailable("no ack in time".into());
        assert_eq!(next_step(&e, 1, true, time(1000)), Step::Retry(backoff(1)));
        assert_eq!(
            next_step(&e, 1, false, time(1000)),
            Step::Spool,
            "broker down: spool now"
        );
        assert_eq!(
            next_step(&e, 1, true, time(20)),
            Step::Spool,
            "no time left"
        );
        assert_eq!(
            next_step(&e, 3, true, Budget::Tries(2)),
            Step::Retry(backoff(3))
        );
        assert_eq!(next_step(&e, 3, true, Budget::Tries(0)), Step::Spool);
    }

    #[test]
    fn refusals_that_may_pass_are_retried_within_the_budget_then_dead_lettered() {
        for reason in [DlqReason::Nacked, DlqReason::Rejected] {
            let e = refused(reason);
            assert_eq!(next_step(&e, 1, true, time(1000)), Step::Retry(backoff(1)));
            // The reserve for the dead-letter publish is kept.
            assert_eq!(next_step(&e, 1, true, time(520)), Step::DeadLetter);
            assert_eq!(
                next_step(&e, 1, true, Budget::Tries(1)),
                Step::Retry(backoff(1))
            );
            assert_eq!(next_step(&e, 3, true, Budget::Tries(0)), Step::DeadLetter);
        }
    }

    #[test]
    fn lasting_refusals_are_dead_lettered_at_once() {
        for reason in [
            DlqReason::NoStream,
            DlqReason::Unroutable,
            DlqReason::TooLarge,
            DlqReason::Malformed,
        ] {
            let e = refused(reason);
            assert_eq!(
                next_step(&e, 1, true, time(60_000)),
                Step::DeadLetter,
                "{reason:?}"
            );
            assert_eq!(
                next_step(&e, 1, true, Budget::Tries(9)),
                Step::DeadLetter,
                "{reason:?}"
            );
            assert_eq!(
                next_step(&e, 1, false, time(60_000)),
                Step::DeadLetter,
                "{reason:?}"
            );
        }
    }

    mod deliverer {
        //! The deliverer against the in-memory broker ([`crate::broker::fake`]): every outcome
        //! on every path's policy.

        use super::super::*;
        use crate::broker::fake::{FakeBroker, refused, timeout};

        fn deliverer() -> Deliverer {
            Deliverer::new(
                Arc::new(Broker::Fake(Box::default())),
                Duration::from_millis(100),
                8,
            )
        }

        fn fake(d: &Deliverer) -> &FakeBroker {
            match &**d.broker() {
                Broker::Fake(f) => f,
                _ => unreachable!("the fake broker"),
            }
        }

        fn msg(subject: &str) -> Message {
            Message {
                subject: subject.into(),
                msg_id: format!("id-{subject}"),
                body: bytes::Bytes::from_static(b"{}"),
                app_id: Arc::from("1"),
                event: "e".into(),
                channel: subject.into(),
                time_ms: "1".into(),
                trace: None,
            }
        }

        fn webhook() -> Policy {
            Policy::webhook(
                Instant::now() + Duration::from_millis(800),
                Duration::from_millis(800),
            )
        }

        async fn one(d: &Deliverer, m: &Message, policy: Policy, since: Option<u64>) -> Fate {
            let pending = [Pending {
                message: m,
                failed_since_ms: since,
            }];
            d.events(&pending, policy).await.remove(0)
        }

        #[tokio::test]
        async fn every_path_publishes_what_is_acked_and_retries_what_may_pass() {
            for policy in [webhook(), Policy::drain(), Policy::replay()] {
                let d = deliverer();
                fake(&d).script("a", vec![refused(DlqReason::Nacked)]);
                let m = msg("a");
                assert_eq!(
                    one(&d, &m, policy, None).await,
                    Fate::Published,
                    "{policy:?}"
                );
                assert_eq!(fake(&d).tries("a"), 2);
            }
        }

        #[tokio::test]
        async fn an_unavailable_broker_is_retried_by_the_webhook_path_only() {
            let d = deliverer();
            fake(&d).script("a", vec![timeout()]);
            assert_eq!(one(&d, &msg("a"), webhook(), None).await, Fate::Published);
            for policy in [Policy::drain(), Policy::replay()] {
                let d = deliverer();
                fake(&d).script("a", vec![timeout()]);
                let fate = one(&d, &msg("a"), policy, None).await;
                assert!(
                    matches!(
                        fate,
                        Fate::Kept {
                            item: Kept::Event(_),
                            ..
                        }
                    ),
                    "{fate:?}"
                );
                assert_eq!(fake(&d).tries("a"), 1, "left where it waits, in order");
            }
            // A broker that is down is not retried even by the webhook path.
            let d = deliverer();
            fake(&d).set_up(false);
            let fate = one(&d, &msg("a"), webhook(), None).await;
            assert!(matches!(fate, Fate::Kept { .. }), "{fate:?}");
        }

        #[tokio::test]
        async fn a_refusal_is_dead_lettered_except_on_replay() {
            for policy in [webhook(), Policy::drain()] {
                let d = deliverer();
                fake(&d).script("a", vec![refused(DlqReason::TooLarge)]);
                let fate = one(&d, &msg("a"), policy, Some(7)).await;
                assert_eq!(fate, Fate::DeadLettered(DlqReason::TooLarge));
                assert_eq!(fake(&d).tries("a"), 1, "a lasting refusal is not retried");
                assert_eq!(fake(&d).dead_letters(), [("a".into(), DlqReason::TooLarge)]);
            }
            let d = deliverer();
            fake(&d).script("a", vec![refused(DlqReason::TooLarge)]);
            let fate = one(&d, &msg("a"), Policy::replay(), None).await;
            assert!(
                matches!(
                    fate,
                    Fate::Kept {
                        item: Kept::Event(_),
                        ..
                    }
                ),
                "{fate:?}"
            );
            assert!(
                fake(&d).dead_letters().is_empty(),
                "the letter stays a letter"
            );
        }

        #[tokio::test]
        async fn a_nacked_dead_letter_is_retried_on_every_path() {
            for policy in [webhook(), Policy::drain()] {
                let d = deliverer();
                fake(&d).script_dead(vec![refused(DlqReason::Nacked)]);
                let letter = DeadLetter {
                    message: msg("a"),
                    reason: DlqReason::Malformed,
                    detail: String::new(),
                    attempts: 0,
                    first_failure_ms: 1,
                };
                let fates = d.dead_letters(vec![letter], policy).await;
                assert_eq!(
                    fates,
                    [Fate::DeadLettered(DlqReason::Malformed)],
                    "{policy:?}"
                );
            }
        }

        #[tokio::test]
        async fn what_the_dead_letter_queue_refuses_or_cannot_take_is_said_apart() {
            let letter = DeadLetter {
                message: msg("a"),
                reason: DlqReason::Malformed,
                detail: "bad".into(),
                attempts: 0,
                first_failure_ms: 1,
            };
            let d = deliverer();
            fake(&d).script_dead(vec![refused(DlqReason::NoStream)]);
            let fates = d.dead_letters(vec![letter.clone()], Policy::drain()).await;
            let [
                Fate::Unplaceable {
                    letter: kept,
                    refusal,
                },
            ] = &fates[..]
            else {
                panic!("{fates:?}");
            };
            assert_eq!(kept.detail, "bad", "kept as it was");
            assert!(refusal.contains("no_stream"), "{refusal}");
            let d = deliverer();
            fake(&d).script_dead(vec![timeout()]);
            let fates = d.dead_letters(vec![letter], Policy::drain()).await;
            assert!(
                matches!(
                    &fates[..],
                    [Fate::Kept {
                        item: Kept::DeadLetter(_),
                        ..
                    }]
                ),
                "{fates:?}"
            );
        }

        fn letter(subject: &str) -> DeadLetter {
            DeadLetter {
                message: msg(subject),
                reason: DlqReason::Malformed,
                detail: String::new(),
                attempts: 0,
                first_failure_ms: 1,
            }
        }

        #[tokio::test]
        async fn the_webhook_path_keeps_what_finds_no_in_flight_room_by_its_deadline() {
            let d = deliverer();
            let _all = d.in_flight.acquire_many(8).await.unwrap();
            let budget = Duration::from_millis(50);
            let policy = Policy::webhook(Instant::now() + budget, budget);
            let started = Instant::now();
            let m = msg("a");
            let fates = tokio::time::timeout(Duration::from_secs(2), async {
                let mut fates = d
                    .events(&Pending::fresh(std::slice::from_ref(&m)), policy)
                    .await;
                fates.extend(d.dead_letters(vec![letter("b")], policy).await);
                fates
            })
            .await
            .expect("the webhook path waits for room only until its deadline");
            assert!(started.elapsed() < Duration::from_millis(500));
            let no_room = PublishError::Unavailable("too many publishes in flight".into());
            assert_eq!(
                fates,
                [
                    Fate::Kept {
                        item: Kept::Event(m),
                        why: no_room.clone()
                    },
                    Fate::Kept {
                        item: Kept::DeadLetter(letter("b")),
                        why: no_room
                    },
                ]
            );
            assert_eq!(fake(&d).tries("a"), 0, "not sent without room");
            assert!(fake(&d).dead_letters().is_empty());
        }

        #[tokio::test]
        async fn the_paths_without_a_deadline_wait_for_in_flight_room() {
            for policy in [Policy::drain(), Policy::replay()] {
                let d = deliverer();
                let all = d.in_flight.acquire_many(8).await.unwrap();
                let release = async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    drop(all);
                };
                let m = msg("a");
                let deliver = async {
                    let mut fates = d
                        .events(&Pending::fresh(std::slice::from_ref(&m)), policy)
                        .await;
                    fates.extend(d.dead_letters(vec![letter("b")], policy).await);
                    fates
                };
                let (fates, ()) = tokio::join!(deliver, release);
                assert_eq!(
                    fates,
                    [Fate::Published, Fate::DeadLettered(DlqReason::Malformed)],
                    "{policy:?}"
                );
                assert_eq!(fake(&d).published(), ["a"]);
            }
        }

        #[tokio::test]
        async fn dead_letters_do_not_wait_for_the_events_on_the_paths_with_both() {
            for policy in [webhook(), Policy::drain()] {
                let d = deliverer();
                // The event's retry waits a backoff: the letter is acked meanwhile.
                fake(&d).script("a", vec![refused(DlqReason::Nacked)]);
                let m = msg("a");
                let (events, letters) = d
                    .events_and_dead_letters(&Pending::fresh(&[m]), vec![letter("b")], policy)
                    .await;
                assert_eq!(events, [Fate::Published], "{policy:?}");
                assert_eq!(letters, [Fate::DeadLettered(DlqReason::Malformed)]);
                assert_eq!(fake(&d).acks(), ["dlq:b", "a"], "{policy:?}");
            }
        }

        #[tokio::test]
        async fn a_spooled_events_first_failure_is_when_it_was_spooled() {
            let d = deliverer();
            fake(&d).script("a", vec![refused(DlqReason::Unroutable)]);
            let m = msg("a");
            one(&d, &m, Policy::drain(), Some(1234)).await;
            let stored = fake(&d).dead_letter_records();
            assert_eq!(stored[0].first_failure_ms, 1234);
        }
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let ms: Vec<u128> = (1..=7).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(ms, [25, 50, 100, 200, 400, 400, 400]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
