//! Lasting refusals, said in the log: a broker that refuses events for good (no stream takes
//! them, the stream is full, a limit or a permission) is something an operator must act on,
//! and the dead-letter counter alone did not say it. One line per reason at most once a
//! minute, with the count since the previous line, so a refusing broker under load cannot
//! flood the log.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::message::DlqReason;

/// At most one line per reason this often.
pub(crate) const EVERY: Duration = Duration::from_secs(60);

/// The count of one reason's refusals since its last line.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// When the last line was written (`None`: never).
    logged_at: Option<Instant>,
    /// Refusals since that line, not yet in a line.
    unsaid: u64,
}

/// Per reason, when a line is due ([`RateLimit::note`]).
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    tallies: Mutex<[Tally; DlqReason::ALL.len()]>,
}

impl RateLimit {
    /// Counts one refusal for `reason` at `now`; `Some(n)` when a line is due, `n` being the
    /// refusals it reports (this one and those held back since the previous line).
    pub(crate) fn note(&self, reason: DlqReason, now: Instant) -> Option<u64> {
        let i = DlqReason::ALL.iter().position(|r| *r == reason)?;
        let mut tallies = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        let tally = &mut tallies[i];
        tally.unsaid += 1;
        let due = tally
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= EVERY);
        if !due {
            return None;
        }
        tally.logged_at = Some(now);
        Some(std::mem::take(&mut tally.unsaid))
    }
}

/// The process's limiter: the webhook path and the drainer each have their own deliverer,
/// and the operator wants one line per reason from the process, not one per path.
static LOG: LazyLock<RateLimit> = LazyLock::new(RateLimit::default);

/// What an operator can do about each lasting refusal.
fn remedy(reason: DlqReason) -> &'static str {
    match reason {
        DlqReason::NoStream => {
            "no stream / exchange takes these events: create it, or let the bridge declare it (broker.declare = true)"
        }
        DlqReason::Full => {
            "the stream is full: raise its limits (max_msgs, max_bytes) or shorten retention"
        }
        DlqReason::TooLarge => "the message is larger than the broker accepts (max_payload)",
        DlqReason::Unroutable => "no queue is bound for the routing key: bind one",
        DlqReason::Rejected | DlqReason::Nacked | DlqReason::Malformed => {
            "see the broker's words in `detail`"
        }
    }
}

/// Says that the broker refused `subject` of `app_id` for good, rate-limited per reason.
pub(crate) fn refused(reason: DlqReason, app_id: &str, subject: &str, detail: &str) {
    if let Some(count) = LOG.note(reason, Instant::now()) {
        tracing::warn!(
            reason = reason.as_str(),
            app_id,
            subject,
            detail,
            refused = count,
            remedy = remedy(reason),
            "the broker refuses events for good; they are sent to the dead-letter queue (one line per reason a minute at most: `refused` counts them since the last)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_reason_a_minute_with_the_count_since_the_last() {
        let limit = RateLimit::default();
        let t0 = Instant::now();
        assert_eq!(
            limit.note(DlqReason::Full, t0),
            Some(1),
            "the first at once"
        );
        for s in 1..=30 {
            assert_eq!(
                limit.note(DlqReason::Full, t0 + Duration::from_secs(s)),
                None
            );
        }
        assert_eq!(
            limit.note(DlqReason::NoStream, t0 + Duration::from_secs(30)),
            Some(1),
            "each reason has its own minute"
        );
        assert_eq!(
            limit.note(DlqReason::Full, t0 + EVERY),
            Some(31),
            "the 30 held back and this one"
        );
        assert_eq!(limit.note(DlqReason::Full, t0 + EVERY), None);
    }
}
