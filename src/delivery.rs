//! The delivery policy: after a failed publish, whether to try again, to keep the event on the
//! spool, or to dead-letter it. The webhook path ([`crate::bridge`]) and the spool drainer
//! ([`crate::spool::drain`]) both ask [`next_step`]; only their budgets differ (the webhook
//! path has `broker.response_budget`, the drainer a number of tries).
//!
//! The broker modules sort each failure into [`PublishError`], since only they can read their
//! broker's answers: `Unavailable` (no connection, no ack in time, a NATS stream without a
//! leader, a JetStream API that does not answer) is transient, `Refused` is the broker's answer
//! about this message. [`is_transient`] is where the rest of the crate (the publishes in order
//! included) asks which of the two it got. Of the
//! refusals, `rejected` and `nacked` may pass on a retry (a broker under pressure); the others
//! (`no_stream` confirmed by the JetStream API, `unroutable`, `too_large`, `malformed`) cannot.

use std::time::Duration;

use crate::broker::{DlqReason, PublishError};

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
    /// The drainer: tries left for a refusal that may pass.
    Tries(u32),
}

/// The first pause between tries; it doubles up to [`MAX_BACKOFF`].
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_millis(25);
/// The longest pause between tries.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_millis(400);
/// Below this much time left after the pause, a try is not worth starting.
const MIN_TRY: Duration = Duration::from_millis(10);

/// The pause after the `attempt`-th failed try (1-based): 25, 50, 100, 200, 400, 400... ms.
pub(crate) fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(8))
        .min(MAX_BACKOFF)
}

/// Whether a failure is transient: the same publish may succeed once the broker is back (a
/// publish in order stops at such a failure, so nothing behind it overtakes it).
pub(crate) fn is_transient(error: &PublishError) -> bool {
    matches!(error, PublishError::Unavailable(_))
}

/// Whether a refusal may pass on a retry.
pub(crate) fn may_pass(reason: DlqReason) -> bool {
    matches!(reason, DlqReason::Rejected | DlqReason::Nacked)
}

/// The next step after the `attempt`-th try (1-based) failed with `error`. `broker_up`: whether
/// the broker is connected now (an unavailable broker that is down is not retried: its events
/// go to the spool at once).
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

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let ms: Vec<u128> = (1..=7).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(ms, [25, 50, 100, 200, 400, 400, 400]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
