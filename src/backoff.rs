//! The one backoff of every retry loop (the NATS client's reconnects, the stream declaration,
//! the RabbitMQ recovery loop, the deliverer's retries, the supervisor's restarts, the channel
//! state's writes, reads and reconnects): doubling from a first pause up to a
//! cap, each pause drawn between its half and its whole ("equal jitter"), so that the replicas
//! that lost a broker at the same moment do not all come back at the same moment either.
//! Imports nothing of the crate.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// A loop that ran this long before it ended had been working: its next pause is the first
/// one again (the supervisor's restarts, the channel state's consumers).
pub(crate) const RAN_A_WHILE: Duration = Duration::from_secs(60);

/// Pauses that double from `first` up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
}

impl Backoff {
    /// Doubling from `first` up to `max`.
    pub(crate) const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The pause after the `attempt`-th failure (1-based) before jitter: `first`, twice that,
    /// ... up to `max`.
    pub(crate) fn step(&self, attempt: u32) -> Duration {
        self.first
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.max)
    }

    /// The pause after the `attempt`-th failure, jittered ([`jitter`]).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        jitter(self.step(attempt))
    }
}

/// A pause drawn evenly between half of `pause` and all of it.
pub(crate) fn jitter(pause: Duration) -> Duration {
    let half = pause / 2;
    let spread = u64::try_from((pause - half).as_nanos()).unwrap_or(u64::MAX);
    if spread == 0 {
        return pause;
    }
    half + Duration::from_nanos(random() % (spread + 1))
}

/// A random number: the standard library seeds each `RandomState` from the operating system
/// once per thread and varies it for every new one, which is plenty for spreading pauses.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_stay_within_their_jitter() {
        let b = Backoff::new(Duration::from_millis(25), Duration::from_millis(400));
        let ms: Vec<u128> = (1..=7).map(|a| b.step(a).as_millis()).collect();
        assert_eq!(ms, [25, 50, 100, 200, 400, 400, 400]);
        assert_eq!(b.step(u32::MAX), Duration::from_millis(400));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let d = b.delay(3);
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
            seen.insert(d);
        }
        assert!(seen.len() > 100, "pauses spread: {} distinct", seen.len());
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
