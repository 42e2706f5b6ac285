//! What the sweeper keeps and what it purges, as pure functions (no broker calls), so the rules
//! are unit-tested here and both brokers apply the same ones.
//!
//! A target has a default retention (`max_age`) and, for the events target, per event name
//! overrides. On NATS the rules become a [`NatsPlan`] of purges by subject filter; on RabbitMQ each
//! message at the queue head gets a [`Verdict`].

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::Settings;
use crate::routing;

/// Which stream / queue a sweep trims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// The events stream / queue (`[retention.events]`).
    Events,
    /// The dead-letter stream / queue (`[retention.dlq]`).
    Dlq,
}

impl Target {
    /// Both targets, in the order they are swept and reported.
    pub const ALL: [Target; 2] = [Target::Events, Target::Dlq];

    /// The `target` metric label and the name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Events => "events",
            Target::Dlq => "dlq",
        }
    }
}

/// The retention rules of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Messages of event names without an override are purged past this age.
    pub default: Duration,
    /// Per event name (raw, unescaped) retention.
    pub overrides: BTreeMap<String, Duration>,
}

impl Retention {
    /// The rules configured for `target`.
    pub fn for_target(settings: &Settings, target: Target) -> Self {
        let t = match target {
            Target::Events => &settings.retention.events,
            Target::Dlq => &settings.retention.dlq,
        };
        Self {
            default: t.max_age,
            overrides: t.overrides.clone(),
        }
    }

    /// Retention of messages of `event` (`None`: the name is unknown, the default applies).
    pub fn max_age_of(&self, event: Option<&str>) -> Duration {
        event
            .and_then(|e| self.overrides.get(e))
            .copied()
            .unwrap_or(self.default)
    }

    /// The longest retention of any rule: every message older than this is purged, whatever its
    /// event name.
    pub fn longest(&self) -> Duration {
        self.overrides
            .values()
            .copied()
            .fold(self.default, Duration::max)
    }

    /// The shortest retention of any message: a message younger than this is kept whatever its
    /// event name.
    pub fn shortest(&self) -> Duration {
        self.overrides
            .values()
            .copied()
            .fold(self.default, Duration::min)
    }

    /// Event names whose override keeps them longer than the default, escaped as subject tokens
    /// and sorted (they decide whether a stored scan cursor is still valid).
    pub fn longer_than_default(&self) -> Vec<String> {
        self.overrides
            .iter()
            .filter(|(_, age)| **age > self.default)
            .map(|(name, _)| routing::escape_token(name).into_owned())
            .collect()
    }

    /// Whether `token` (an escaped subject token) names an event with an override.
    pub fn is_overridden_token(&self, token: &str) -> bool {
        self.overrides
            .keys()
            .any(|name| routing::escape_token(name) == token)
    }

    /// The purges that implement these rules on a JetStream stream.
    pub fn nats_plan(&self) -> NatsPlan {
        let longest = self.longest();
        let per_event = self
            .overrides
            .iter()
            .filter(|(_, age)| **age < longest)
            .map(|(name, age)| (name.clone(), *age))
            .collect();
        NatsPlan {
            everything: longest,
            per_event,
            defaults_by_name: (self.default < longest).then_some(self.default),
        }
    }
}

/// How a target's rules map onto purges of a JetStream stream, in the order they run.
///
/// 1. `everything`: every message older than the longest retention is purged (one purge of the
///    whole subject space; correct because no rule keeps anything longer).
/// 2. `per_event`: each override shorter than that purges its own filter
///    `<prefix>.*.<event>.>` below the first message young enough for it.
/// 3. `defaults_by_name`: only when some override is *longer* than the default. A purge cannot
///    say "every subject except these", so the sweeper finds the event names present among the
///    messages older than the default (a headers-only scan that resumes from a stored cursor) and
///    purges each name without an override by its own filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsPlan {
    /// Retention applied to the whole stream (the longest of all rules).
    pub everything: Duration,
    /// Overrides shorter than `everything`: (raw event name, retention).
    pub per_event: Vec<(String, Duration)>,
    /// The default retention, when it must be applied name by name.
    pub defaults_by_name: Option<Duration>,
}

/// Filter matching every event of the stream: `<prefix>.>`.
pub fn all_filter(prefix: &str) -> String {
    format!("{prefix}.>")
}

/// Filter matching every event of one (raw) name: `<prefix>.*.<escaped name>.>`.
pub fn event_filter(prefix: &str, event: &str) -> String {
    event_token_filter(prefix, &routing::escape_token(event))
}

/// Filter matching every event whose escaped name token is `token`.
pub fn event_token_filter(prefix: &str, token: &str) -> String {
    format!("{prefix}.*.{token}.>")
}

/// The escaped event token of `<prefix>.<app>.<event>.<channel>`, if `subject` has that shape.
pub fn event_token<'a>(prefix: &str, subject: &'a str) -> Option<&'a str> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut tokens = rest.splitn(3, '.');
    let _app = tokens.next().filter(|t| !t.is_empty())?;
    let event = tokens.next().filter(|t| !t.is_empty())?;
    let _channel = tokens.next().filter(|t| !t.is_empty())?;
    Some(event)
}

/// What the RabbitMQ sweep does with the message it took from the queue head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Older than its retention: remove it (ack).
    Purge,
    /// Kept, but older than some other rule's retention, so messages behind it may still be due:
    /// hold it and look at the next one.
    Keep,
    /// Younger than every rule: nothing behind it (FIFO, later publishes) can be due; stop.
    Stop,
}

/// The verdict for a message of `event` published at `published_ms` (unix ms), at `now_ms`.
/// A message without a publish time is kept (the sweeper never removes what it cannot date).
pub fn verdict(
    retention: &Retention,
    event: Option<&str>,
    published_ms: Option<u64>,
    now_ms: u64,
) -> Verdict {
    let Some(published) = published_ms else {
        return Verdict::Keep;
    };
    let age = Duration::from_millis(now_ms.saturating_sub(published));
    if age > retention.max_age_of(event) {
        Verdict::Purge
    } else if age > retention.shortest() {
        Verdict::Keep
    } else {
        Verdict::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn rules(default_days: u64, overrides: &[(&str, u64)]) -> Retention {
        Retention {
            default: DAY * default_days as u32,
            overrides: overrides
                .iter()
                .map(|(n, d)| (n.to_string(), DAY * *d as u32))
                .collect(),
        }
    }

    #[test]
    fn without_overrides_one_purge_does_it() {
        let plan = rules(7, &[]).nats_plan();
        assert_eq!(plan.everything, DAY * 7);
        assert!(plan.per_event.is_empty());
        assert_eq!(plan.defaults_by_name, None);
    }

    #[test]
    fn shorter_overrides_purge_by_filter_after_the_default() {
        let plan = rules(7, &[("client_event", 1)]).nats_plan();
        assert_eq!(plan.everything, DAY * 7);
        assert_eq!(plan.per_event, vec![("client_event".to_string(), DAY)]);
        assert_eq!(plan.defaults_by_name, None);
    }

    #[test]
    fn a_longer_override_makes_the_default_name_by_name() {
        let r = rules(
            7,
            &[
                ("client_event", 1),
                ("channel_occupied", 30),
                ("member_added", 7),
            ],
        );
        let plan = r.nats_plan();
        assert_eq!(plan.everything, DAY * 30);
        assert_eq!(
            plan.per_event,
            vec![
                ("client_event".to_string(), DAY),
                ("member_added".to_string(), DAY * 7)
            ]
        );
        assert_eq!(plan.defaults_by_name, Some(DAY * 7));
        assert_eq!(
            r.longer_than_default(),
            vec!["channel_occupied".to_string()]
        );
        assert_eq!(r.longest(), DAY * 30);
        assert_eq!(r.shortest(), DAY);
    }

    #[test]
    fn filters_escape_the_event_token() {
        assert_eq!(all_filter("pusher"), "pusher.>");
        assert_eq!(
            event_filter("pusher", "client_event"),
            "pusher.*.client_event.>"
        );
        assert_eq!(event_filter("a.b", "x.y%"), "a.b.*.x%2Ey%25.>");
        let r = rules(1, &[("x.y", 2)]);
        assert!(r.is_overridden_token("x%2Ey"));
        assert!(!r.is_overridden_token("x.y"));
    }

    #[test]
    fn event_tokens_come_from_well_formed_subjects_only() {
        assert_eq!(
            event_token("pusher", "pusher.1.member_added.presence-a%2Eb"),
            Some("member_added")
        );
        assert_eq!(event_token("a.b", "a.b.1.e%2Ex.c"), Some("e%2Ex"));
        assert_eq!(event_token("pusher", "pusher.1.e"), None);
        assert_eq!(event_token("pusher", "pusherx.1.e.c"), None);
        assert_eq!(event_token("pusher", "other.1.e.c"), None);
        assert_eq!(event_token("pusher", "pusher..e.c"), None);
    }

    #[test]
    fn verdicts_follow_each_events_own_retention() {
        let r = rules(7, &[("client_event", 1), ("channel_occupied", 30)]);
        let now = 100 * 86_400_000;
        let days_ago = |d: u64| Some(now - d * 86_400_000);
        assert_eq!(
            verdict(&r, Some("client_event"), days_ago(2), now),
            Verdict::Purge
        );
        assert_eq!(verdict(&r, Some("other"), days_ago(8), now), Verdict::Purge);
        assert_eq!(verdict(&r, None, days_ago(8), now), Verdict::Purge);
        assert_eq!(
            verdict(&r, Some("channel_occupied"), days_ago(8), now),
            Verdict::Keep
        );
        assert_eq!(verdict(&r, Some("other"), days_ago(3), now), Verdict::Keep);
        assert_eq!(
            verdict(&r, Some("channel_occupied"), Some(now - 1000), now),
            Verdict::Stop
        );
        assert_eq!(verdict(&r, Some("x"), None, now), Verdict::Keep);
        // A publish time in the future (clock skew) is young.
        assert_eq!(verdict(&r, Some("x"), Some(now + 5000), now), Verdict::Stop);
    }
}
