//! The retention rules of the events and the dead letters, as pure functions: the sweeper
//! purges by them ([`crate::sweeper::policy`] turns them into purges), and with
//! `method = "message_ttl"` the NATS broker stamps each message's `Nats-TTL` from them
//! ([`TtlRules`]), so both methods keep exactly the same messages for the same time.
//!
//! A target has a default retention (`max_age`), for the events target per event name
//! overrides, and per app rules (`[retention.<target>.apps."<id>"]`: enabled, the app's own
//! `max_age`, per event overrides of that app). The most specific rule wins: app + event, app,
//! event, then the target's `max_age` ([`Retention::rule_of`]); a disabled app's messages are
//! never removed.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{RetentionMethod, Settings};

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

/// Which rule purged a message: the `rule` label of `pusher_bridge_sweeper_purged_total` and
/// the tag of a report line. Five values, whatever the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleKind {
    /// Older than every rule that covers it (one purge of a whole stream or of one app's
    /// subjects, cheaper than rule by rule).
    Longest,
    /// An app's own override of one event name.
    AppEvent,
    /// An app's own `max_age`.
    App,
    /// The target's override of one event name.
    Event,
    /// The target's `max_age`.
    Default,
}

impl RuleKind {
    /// Every kind, in report order.
    pub const ALL: [RuleKind; 5] = [
        RuleKind::Longest,
        RuleKind::AppEvent,
        RuleKind::App,
        RuleKind::Event,
        RuleKind::Default,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Longest => "longest",
            RuleKind::AppEvent => "app_event",
            RuleKind::App => "app",
            RuleKind::Event => "event",
            RuleKind::Default => "default",
        }
    }
}

/// One app's rules on one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRule {
    /// `false`: never purge this app's messages.
    pub enabled: bool,
    /// The app's default retention (else the target's rules apply).
    pub max_age: Option<Duration>,
    /// Per event name (raw) retention of this app.
    pub overrides: BTreeMap<String, Duration>,
}

/// The retention rules of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Messages of event names without an override are purged past this age.
    pub default: Duration,
    /// Per event name (raw, unescaped) retention.
    pub overrides: BTreeMap<String, Duration>,
    /// Per app id (raw) rules.
    pub apps: BTreeMap<String, AppRule>,
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
            apps: t
                .apps
                .iter()
                .map(|(id, a)| {
                    let rule = AppRule {
                        enabled: a.enabled,
                        max_age: a.max_age,
                        overrides: a.overrides.clone(),
                    };
                    (id.clone(), rule)
                })
                .collect(),
        }
    }

    /// The rule of a message of `app` and `event` (raw names; `None`: unknown): its retention
    /// and which rule it is, or `None` when the message is never purged (its app is disabled).
    /// Most specific first: app + event, app, event, the target's `max_age`.
    pub fn rule_of(&self, app: Option<&str>, event: Option<&str>) -> Option<(Duration, RuleKind)> {
        if let Some(rule) = app.and_then(|a| self.apps.get(a)) {
            if !rule.enabled {
                return None;
            }
            if let Some(age) = event.and_then(|e| rule.overrides.get(e)) {
                return Some((*age, RuleKind::AppEvent));
            }
            if let Some(age) = rule.max_age {
                return Some((age, RuleKind::App));
            }
        }
        if let Some(age) = event.and_then(|e| self.overrides.get(e)) {
            return Some((*age, RuleKind::Event));
        }
        Some((self.default, RuleKind::Default))
    }
}

/// The `Nats-TTL` header of one message: whole seconds, or `never` (an app whose retention is
/// disabled keeps its messages whatever the stream's own limits say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageTtl {
    /// Expire after this many seconds.
    Seconds(u64),
    /// Never expire.
    Never,
}

impl MessageTtl {
    /// The header's value.
    pub fn header_value(self) -> String {
        match self {
            MessageTtl::Seconds(s) => s.to_string(),
            MessageTtl::Never => "never".to_string(),
        }
    }
}

/// One target's per-message TTLs (`retention.<target>.method = "message_ttl"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TtlRules {
    rules: Retention,
}

impl TtlRules {
    /// The TTL rules of `target`, when its messages carry TTLs: `method = "message_ttl"` and
    /// the target enabled (a disabled target's messages carry none, so only the stream's own
    /// limits apply to them, as with the sweep).
    pub fn for_target(settings: &Settings, target: Target) -> Option<Self> {
        let t = match target {
            Target::Events => &settings.retention.events,
            Target::Dlq => &settings.retention.dlq,
        };
        (t.method == RetentionMethod::MessageTtl && t.enabled).then(|| Self {
            rules: Retention::for_target(settings, target),
        })
    }

    /// The TTL of a message of `app` and `event` (dead letters: no event): the rule the sweep
    /// would apply, rounded up to whole seconds (a message is never removed before its rule
    /// says).
    pub fn ttl(&self, app: &str, event: Option<&str>) -> MessageTtl {
        match self.rules.rule_of(Some(app), event) {
            None => MessageTtl::Never,
            Some((age, _)) => {
                let secs = age.as_secs() + u64::from(age.subsec_nanos() > 0);
                MessageTtl::Seconds(secs.max(1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AppRetention;

    #[test]
    fn ttls_follow_the_sweeps_rules_most_specific_first() {
        let mut s = Settings::default();
        assert_eq!(TtlRules::for_target(&s, Target::Events), None, "sweep");
        s.retention.events.method = RetentionMethod::MessageTtl;
        s.retention.events.max_age = Duration::from_secs(7 * 86_400);
        s.retention.events.overrides =
            [("client_event".to_string(), Duration::from_secs(3600))].into();
        s.retention.events.apps = [
            (
                "a".to_string(),
                AppRetention {
                    max_age: Some(Duration::from_secs(86_400)),
                    overrides: [("member_added".to_string(), Duration::from_millis(1500))].into(),
                    ..AppRetention::default()
                },
            ),
            (
                "off".to_string(),
                AppRetention {
                    enabled: false,
                    ..AppRetention::default()
                },
            ),
        ]
        .into();
        let ttl = TtlRules::for_target(&s, Target::Events).expect("message_ttl");
        assert_eq!(ttl.ttl("a", Some("member_added")), MessageTtl::Seconds(2));
        assert_eq!(
            ttl.ttl("a", Some("client_event")),
            MessageTtl::Seconds(86_400)
        );
        assert_eq!(
            ttl.ttl("b", Some("client_event")),
            MessageTtl::Seconds(3600)
        );
        assert_eq!(ttl.ttl("b", Some("x")), MessageTtl::Seconds(7 * 86_400));
        assert_eq!(ttl.ttl("off", Some("x")), MessageTtl::Never);
        assert_eq!(MessageTtl::Never.header_value(), "never");
        assert_eq!(MessageTtl::Seconds(60).header_value(), "60");
        assert_eq!(TtlRules::for_target(&s, Target::Dlq), None);
        s.retention.events.enabled = false;
        assert_eq!(TtlRules::for_target(&s, Target::Events), None, "disabled");
    }
}
