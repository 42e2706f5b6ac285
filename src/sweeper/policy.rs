//! What the sweeper keeps and what it purges, as pure functions (no broker calls), so the rules
//! are unit-tested here and both brokers apply the same ones.
//!
//! A target has a default retention (`max_age`), for the events target per event name
//! overrides, and per app rules (`[retention.<target>.apps."<id>"]`: enabled, the app's own
//! `max_age`, per event overrides of that app). The most specific rule wins: app + event, app,
//! event, then the target's `max_age` ([`Retention::rule_of`]); a disabled app's messages are
//! never purged. On NATS the rules become a `NatsPlan` of purges by subject filter; on
//! RabbitMQ each message at the queue head gets a [`HeadAction`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::routing;

/// The `app_id` label of report lines and metrics for messages not tied to one app.
pub(crate) const ANY_APP: &str = "*";
/// The `app_id` label of messages of an app id that is not in `[[apps]]` (old data, a removed
/// app), so labels stay bounded by the configuration.
pub(crate) const OTHER_APP: &str = "other";

pub use crate::retention::{AppRule, Retention, RuleKind, Target};

impl Retention {
    /// Every finite retention of any rule.
    fn ages(&self) -> impl Iterator<Item = Duration> + '_ {
        let apps = self
            .apps
            .values()
            .filter(|a| a.enabled)
            .flat_map(|a| a.max_age.into_iter().chain(a.overrides.values().copied()));
        std::iter::once(self.default)
            .chain(self.overrides.values().copied())
            .chain(apps)
    }

    /// The longest retention of any (enabled) rule.
    pub fn longest(&self) -> Duration {
        self.ages().fold(self.default, Duration::max)
    }

    /// The shortest retention of any message: a message younger than this is kept whatever its
    /// app and event name.
    pub(crate) fn shortest(&self) -> Duration {
        self.ages().fold(self.default, Duration::min)
    }

    /// Whether some app is disabled (nothing may then purge the whole stream).
    pub(crate) fn any_disabled(&self) -> bool {
        self.apps.values().any(|a| !a.enabled)
    }

    /// Whether purging `<prefix>.*.<event>.>` at `age` is safe for every configured app: none
    /// is disabled and none keeps `event` longer.
    pub(crate) fn wildcard_ok(&self, event: &str, age: Duration) -> bool {
        self.apps.keys().all(|a| {
            self.rule_of(Some(a), Some(event))
                .is_some_and(|(d, _)| d <= age)
        })
    }

    /// Event names whose override keeps them longer than the default, escaped as subject tokens
    /// and sorted.
    pub(crate) fn longer_than_default(&self) -> Vec<String> {
        self.overrides
            .iter()
            .filter(|(_, age)| **age > self.default)
            .map(|(name, _)| routing::escape_token(name).into_owned())
            .collect()
    }

    /// A fingerprint of every rule: the stored scan cursors are valid only for the rules they
    /// were written under (a changed rule makes the next run scan from the start once).
    pub(crate) fn fingerprint(&self) -> String {
        let mut text = format!("d={};", self.default.as_millis());
        for (e, d) in &self.overrides {
            text.push_str(&format!("e:{e}={};", d.as_millis()));
        }
        for (a, r) in &self.apps {
            text.push_str(&format!(
                "a:{a}={}/{:?};",
                r.enabled,
                r.max_age.map(|d| d.as_millis())
            ));
            for (e, d) in &r.overrides {
                text.push_str(&format!("ae:{a}:{e}={};", d.as_millis()));
            }
        }
        hex::encode(&Sha256::digest(text.as_bytes())[..12])
    }

    /// The rules of one configured, enabled app as explicit events and a fallback.
    fn app_view(&self, rule: &AppRule) -> AppView {
        let fallback = match rule.max_age {
            Some(d) => (d, RuleKind::App),
            None => (self.default, RuleKind::Default),
        };
        let mut events: BTreeMap<String, (Duration, RuleKind)> = BTreeMap::new();
        if rule.max_age.is_none() {
            for (e, d) in &self.overrides {
                events.insert(e.clone(), (*d, RuleKind::Event));
            }
        }
        for (e, d) in &rule.overrides {
            events.insert(e.clone(), (*d, RuleKind::AppEvent));
        }
        let longest = events
            .values()
            .map(|(d, _)| *d)
            .fold(fallback.0, Duration::max);
        AppView {
            fallback,
            events,
            longest,
        }
    }

    /// The purges that implement these rules on a JetStream stream.
    pub(crate) fn nats_plan(&self) -> NatsPlan {
        let configured: BTreeSet<String> = self.apps.keys().cloned().collect();
        // Apps without rules of their own ("the others"): event overrides, then the default.
        let others_longest = self
            .overrides
            .values()
            .copied()
            .fold(self.default, Duration::max);
        let views: Vec<(String, AppView)> = self
            .apps
            .iter()
            .filter(|(_, r)| r.enabled)
            .map(|(a, r)| (a.clone(), self.app_view(r)))
            .collect();
        let everything = (!self.any_disabled()).then(|| {
            views
                .iter()
                .map(|(_, v)| v.longest)
                .fold(others_longest, Duration::max)
        });
        let below_everything = |age: Duration| everything.is_none_or(|t| age < t);
        let mut filters = Vec::new();
        let mut scans = Vec::new();

        for (app, v) in &views {
            if below_everything(v.longest) {
                // Named for the app's own default when that is the app's longest rule.
                let kind = if v.fallback.0 == v.longest {
                    v.fallback.1
                } else {
                    RuleKind::Longest
                };
                filters.push(FilterPurge {
                    app: Some(app.clone()),
                    event: None,
                    max_age: v.longest,
                    rule: kind,
                });
            }
            for (event, (age, kind)) in &v.events {
                if *age < v.longest {
                    filters.push(FilterPurge {
                        app: Some(app.clone()),
                        event: Some(event.clone()),
                        max_age: *age,
                        rule: *kind,
                    });
                }
            }
            if v.fallback.0 < v.longest {
                scans.push(ScanPurge {
                    key: format!("app:{app}"),
                    max_age: v.fallback.0,
                    rule: v.fallback.1,
                    within_app: Some(app.clone()),
                    of_event: None,
                    collect: Collect::Events {
                        skip: v.events.keys().cloned().collect(),
                    },
                });
            }
        }

        // The others: apps without rules of their own.
        if below_everything(others_longest) {
            // Some configured app keeps messages longer (or forever): the others' longest rule
            // goes app by app, for the app ids found among the old messages.
            let kind = if others_longest == self.default {
                RuleKind::Default
            } else {
                RuleKind::Longest
            };
            scans.push(ScanPurge {
                key: "others".into(),
                max_age: others_longest,
                rule: kind,
                within_app: None,
                of_event: None,
                collect: Collect::Apps {
                    except: configured.clone(),
                },
            });
        }
        for (event, age) in &self.overrides {
            if *age >= others_longest {
                continue;
            }
            if self.wildcard_ok(event, *age) {
                filters.push(FilterPurge {
                    app: None,
                    event: Some(event.clone()),
                    max_age: *age,
                    rule: RuleKind::Event,
                });
            } else {
                scans.push(ScanPurge {
                    key: format!("event:{event}"),
                    max_age: *age,
                    rule: RuleKind::Event,
                    within_app: None,
                    of_event: Some(event.clone()),
                    collect: Collect::Apps {
                        except: configured.clone(),
                    },
                });
            }
        }
        if self.default < others_longest {
            scans.push(ScanPurge {
                key: "default".into(),
                max_age: self.default,
                rule: RuleKind::Default,
                within_app: None,
                of_event: None,
                collect: Collect::OtherEvents {
                    skip: self.overrides.keys().cloned().collect(),
                    except: configured,
                },
            });
        }
        // An app's filter that a filter of every app at the same age already covers is one
        // purge too many.
        let wildcards: Vec<(String, Duration)> = filters
            .iter()
            .filter(|f| f.app.is_none())
            .filter_map(|f| Some((f.event.clone()?, f.max_age)))
            .collect();
        filters.retain(|f| {
            f.app.is_none()
                || !f
                    .event
                    .as_ref()
                    .is_some_and(|e| wildcards.iter().any(|(w, d)| w == e && *d == f.max_age))
        });
        NatsPlan {
            everything_rule: if everything == Some(self.default) {
                RuleKind::Default
            } else {
                RuleKind::Longest
            },
            everything,
            filters,
            scans,
        }
    }

    /// Every (app label, rule) pair a sweep of these rules can report on either broker, for
    /// metric series that exist from start-up. `apps`: the ids of `[[apps]]`.
    pub(crate) fn label_sets(&self, apps: &BTreeSet<String>) -> BTreeSet<(String, RuleKind)> {
        let mut out = BTreeSet::new();
        let plan = self.nats_plan();
        if plan.everything.is_some() {
            out.insert((ANY_APP.to_string(), plan.everything_rule));
        }
        for f in &plan.filters {
            let app = f.app.clone().unwrap_or_else(|| ANY_APP.to_string());
            out.insert((app, f.rule));
        }
        // Labels of the apps without rules of their own: their ids, and `other`.
        let others: Vec<String> = apps
            .iter()
            .filter(|a| !self.apps.contains_key(*a))
            .cloned()
            .chain([OTHER_APP.to_string()])
            .collect();
        for s in &plan.scans {
            match (&s.within_app, &s.collect) {
                (Some(app), _) => {
                    out.insert((app.clone(), s.rule));
                }
                (None, Collect::OtherEvents { .. }) => {
                    out.insert((ANY_APP.to_string(), s.rule));
                    out.extend(others.iter().map(|a| (a.clone(), s.rule)));
                }
                (None, _) => out.extend(others.iter().map(|a| (a.clone(), s.rule))),
            }
        }
        // Message by message (RabbitMQ): each app's rule of each event name.
        let names: BTreeSet<&str> = self
            .overrides
            .keys()
            .chain(self.apps.values().flat_map(|a| a.overrides.keys()))
            .map(String::as_str)
            .collect();
        for app in self.apps.keys().chain(others.iter()) {
            let rule_app = (app != OTHER_APP).then_some(app.as_str());
            for event in names.iter().copied().map(Some).chain([None]) {
                if let Some((_, kind)) = self.rule_of(rule_app, event) {
                    out.insert((app.clone(), kind));
                }
            }
        }
        out
    }
}

/// The label of `app` (a raw app id, or `None` when a message has none) in reports and metrics:
/// the id when `[[apps]]` has it, else [`OTHER_APP`].
pub(crate) fn app_label(apps: &BTreeSet<String>, app: Option<&str>) -> String {
    match app {
        Some(a) if apps.contains(a) => a.to_string(),
        _ => OTHER_APP.to_string(),
    }
}

/// One enabled configured app's rules, flattened.
struct AppView {
    /// Events without an explicit rule: the app's `max_age`, else the target's.
    fallback: (Duration, RuleKind),
    /// Event names with a rule of their own for this app (the app's overrides, and the
    /// target's when the app has no `max_age`).
    events: BTreeMap<String, (Duration, RuleKind)>,
    /// The longest of them.
    longest: Duration,
}

/// How a target's rules map onto purges of a JetStream stream, in the order they run.
///
/// 1. `everything`: every message older than the longest retention is purged (one purge of the
///    whole subject space; correct because no rule keeps anything longer). `None` when an app is
///    disabled: nothing may then purge the whole stream.
/// 2. `filters`: purges of one filter each (`<prefix>.<app>.>`, `<prefix>.<app>.<event>.>`,
///    `<prefix>.*.<event>.>`) below the first message young enough for it, each at the longest
///    retention of what the filter covers, so none removes a message some rule keeps.
/// 3. `scans`: rules no filter can express ("every app but these", "every event but these"),
///    e.g. when an override is *longer* than the default or a configured app keeps longer than
///    the others. The sweeper finds the app ids / event names present among the messages older
///    than the rule (a headers-only scan that resumes from a stored cursor) and purges each by
///    its own filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NatsPlan {
    /// Retention applied to the whole stream (the longest of all rules), if any.
    pub everything: Option<Duration>,
    /// `default` when that is the target's `max_age` (no rule keeps anything longer), else
    /// `longest`.
    pub everything_rule: RuleKind,
    /// Purges by one filter each.
    pub filters: Vec<FilterPurge>,
    /// Purges of the names a scan finds.
    pub scans: Vec<ScanPurge>,
}

/// A purge of one subject filter at one age.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FilterPurge {
    /// Raw app id (`None`: every app).
    pub app: Option<String>,
    /// Raw event name (`None`: every event).
    pub event: Option<String>,
    /// Messages of the filter older than this are purged.
    pub max_age: Duration,
    /// The rule, for reports and metrics.
    pub rule: RuleKind,
}

impl FilterPurge {
    /// The subject filter.
    pub fn filter(&self, prefix: &str) -> String {
        let app = self
            .app
            .as_deref()
            .map_or("*".into(), routing::escape_token);
        match &self.event {
            None => format!("{prefix}.{app}.>"),
            Some(e) => format!("{prefix}.{app}.{}.>", routing::escape_token(e)),
        }
    }
}

/// A purge of the names a scan finds among the messages older than `max_age`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ScanPurge {
    /// Names this scan's cursor (stable across runs with the same rules).
    pub key: String,
    /// The retention applied to what the scan finds.
    pub max_age: Duration,
    /// The rule, for reports and metrics.
    pub rule: RuleKind,
    /// Scan only this app's subjects (raw id).
    pub within_app: Option<String>,
    /// Scan only this event's subjects (raw name).
    pub of_event: Option<String>,
    /// What to collect and purge.
    pub collect: Collect,
}

impl ScanPurge {
    /// The subject filter the scan reads.
    pub(crate) fn scan_filter(&self, prefix: &str) -> String {
        FilterPurge {
            app: self.within_app.clone(),
            event: self.of_event.clone(),
            max_age: self.max_age,
            rule: self.rule,
        }
        .filter(prefix)
    }
}

/// What a scan collects from the subjects it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Collect {
    /// Event tokens (of `within_app`) without a rule of their own (`skip`, raw names): each is
    /// purged as `<prefix>.<app>.<event>.>`.
    Events {
        /// Raw event names with their own rule.
        skip: BTreeSet<String>,
    },
    /// App tokens other than `except` (raw ids with rules of their own): each is purged as
    /// `<prefix>.<app>.>` (or `<prefix>.<app>.<of_event>.>`).
    Apps {
        /// Raw app ids with rules of their own.
        except: BTreeSet<String>,
    },
    /// Event tokens without an override (`skip`) of apps other than `except`: each name is
    /// purged as `<prefix>.*.<event>.>` when that is safe for every configured app
    /// ([`Retention::wildcard_ok`]), else app by app.
    OtherEvents {
        /// Raw event names with an override.
        skip: BTreeSet<String>,
        /// Raw app ids with rules of their own.
        except: BTreeSet<String>,
    },
}

/// Filter matching every event of the stream: `<prefix>.>`.
pub(crate) fn all_filter(prefix: &str) -> String {
    format!("{prefix}.>")
}

/// Filter matching every event of one (raw) name: `<prefix>.*.<escaped name>.>` (the tests'
/// shorthand; the sweep builds its filters from rules).
#[cfg(test)]
fn event_filter(prefix: &str, event: &str) -> String {
    event_token_filter(prefix, &routing::escape_token(event))
}

/// Filter matching every event whose escaped name token is `token`.
pub(crate) fn event_token_filter(prefix: &str, token: &str) -> String {
    format!("{prefix}.*.{token}.>")
}

/// The escaped event token of `<prefix>.<app>.<event>.<channel>`, if `subject` has that shape.
pub(crate) fn event_token<'a>(prefix: &str, subject: &'a str) -> Option<&'a str> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut tokens = rest.splitn(3, '.');
    let _app = tokens.next().filter(|t| !t.is_empty())?;
    let event = tokens.next().filter(|t| !t.is_empty())?;
    let _channel = tokens.next().filter(|t| !t.is_empty())?;
    Some(event)
}

/// The escaped (app, event) tokens of `<prefix>.<app>.<event>.<channel>`, or (app, `None`) for
/// a subject with fewer tokens (dead letters: `<prefix>_dlq.<app>.<reason>`).
pub(crate) fn subject_tokens<'a>(
    prefix: &str,
    subject: &'a str,
) -> Option<(&'a str, Option<&'a str>)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (app, rest) = rest.split_once('.')?;
    if app.is_empty() || rest.is_empty() {
        return None;
    }
    Some((app, event_token(prefix, subject)))
}

/// What the RabbitMQ sweep does with the message it took from the queue head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadAction {
    /// Older than its retention: remove it (ack).
    Purge,
    /// Kept, but older than some other rule's retention, so messages behind it may still be due:
    /// hold it and look at the next one.
    Keep,
    /// Younger than every rule: nothing behind it (FIFO, later publishes) can be due; stop.
    Stop,
}

/// What to do with a message of `app` and `event` published at `published_ms` (unix ms), at
/// `now_ms`. A message without a publish time is kept (the sweeper never removes what it cannot
/// date), and so is a message of a disabled app.
pub fn head_action(
    retention: &Retention,
    app: Option<&str>,
    event: Option<&str>,
    published_ms: Option<u64>,
    now_ms: u64,
) -> HeadAction {
    let Some(published) = published_ms else {
        return HeadAction::Keep;
    };
    let age = Duration::from_millis(now_ms.saturating_sub(published));
    if retention
        .rule_of(app, event)
        .is_some_and(|(max_age, _)| age > max_age)
    {
        HeadAction::Purge
    } else if age > retention.shortest() {
        HeadAction::Keep
    } else {
        HeadAction::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);
    const HOUR: Duration = Duration::from_secs(3600);

    fn rules(default_days: u64, overrides: &[(&str, u64)]) -> Retention {
        Retention {
            default: DAY * default_days as u32,
            overrides: overrides
                .iter()
                .map(|(n, d)| (n.to_string(), DAY * *d as u32))
                .collect(),
            apps: BTreeMap::new(),
        }
    }

    fn app(max_age: Option<Duration>, overrides: &[(&str, Duration)]) -> AppRule {
        AppRule {
            enabled: true,
            max_age,
            overrides: overrides.iter().map(|(n, d)| (n.to_string(), *d)).collect(),
        }
    }

    fn disabled() -> AppRule {
        AppRule {
            enabled: false,
            ..app(None, &[])
        }
    }

    fn filter(
        app: Option<&str>,
        event: Option<&str>,
        max_age: Duration,
        rule: RuleKind,
    ) -> FilterPurge {
        FilterPurge {
            app: app.map(str::to_string),
            event: event.map(str::to_string),
            max_age,
            rule,
        }
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_most_specific_rule_wins() {
        let mut r = rules(7, &[("client_event", 2)]);
        r.apps
            .insert("a".into(), app(Some(DAY), &[("client_event", HOUR)]));
        r.apps
            .insert("b".into(), app(None, &[("member_added", DAY * 30)]));
        r.apps.insert("off".into(), disabled());
        let rule = |a: Option<&str>, e: Option<&str>| r.rule_of(a, e);
        assert_eq!(
            rule(Some("a"), Some("client_event")),
            Some((HOUR, RuleKind::AppEvent))
        );
        assert_eq!(
            rule(Some("a"), Some("member_added")),
            Some((DAY, RuleKind::App))
        );
        assert_eq!(rule(Some("a"), None), Some((DAY, RuleKind::App)));
        // No max_age of its own: the target's override, then the target's default.
        assert_eq!(
            rule(Some("b"), Some("member_added")),
            Some((DAY * 30, RuleKind::AppEvent))
        );
        assert_eq!(
            rule(Some("b"), Some("client_event")),
            Some((DAY * 2, RuleKind::Event))
        );
        assert_eq!(
            rule(Some("b"), Some("x")),
            Some((DAY * 7, RuleKind::Default))
        );
        // An app without rules, or no app at all: the target's rules.
        assert_eq!(
            rule(Some("z"), Some("client_event")),
            Some((DAY * 2, RuleKind::Event))
        );
        assert_eq!(rule(None, None), Some((DAY * 7, RuleKind::Default)));
        // Disabled: never purged, whatever the event.
        assert_eq!(rule(Some("off"), Some("client_event")), None);
        assert_eq!(rule(Some("off"), None), None);
        assert_eq!(r.longest(), DAY * 30);
        assert_eq!(r.shortest(), HOUR);
        assert!(r.any_disabled());
    }

    #[test]
    fn without_overrides_one_purge_does_it() {
        let plan = rules(7, &[]).nats_plan();
        assert_eq!(plan.everything, Some(DAY * 7));
        assert!(plan.filters.is_empty());
        assert!(plan.scans.is_empty());
    }

    #[test]
    fn shorter_overrides_purge_by_filter_after_the_default() {
        let plan = rules(7, &[("client_event", 1)]).nats_plan();
        assert_eq!(plan.everything, Some(DAY * 7));
        assert_eq!(
            plan.filters,
            vec![filter(None, Some("client_event"), DAY, RuleKind::Event)]
        );
        assert!(plan.scans.is_empty());
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
        assert_eq!(plan.everything, Some(DAY * 30));
        assert_eq!(
            plan.filters,
            vec![
                filter(None, Some("client_event"), DAY, RuleKind::Event),
                filter(None, Some("member_added"), DAY * 7, RuleKind::Event),
            ]
        );
        assert_eq!(plan.scans.len(), 1);
        let scan = &plan.scans[0];
        assert_eq!((scan.max_age, scan.rule), (DAY * 7, RuleKind::Default));
        assert_eq!(scan.scan_filter("p"), "p.*.>");
        assert_eq!(
            scan.collect,
            Collect::OtherEvents {
                skip: names(&["channel_occupied", "client_event", "member_added"]),
                except: BTreeSet::new(),
            }
        );
        assert_eq!(
            r.longer_than_default(),
            vec!["channel_occupied".to_string()]
        );
        assert_eq!(r.longest(), DAY * 30);
        assert_eq!(r.shortest(), DAY);
    }

    #[test]
    fn apps_shorter_than_the_default_keep_the_cheap_purge() {
        let mut r = rules(7, &[]);
        r.apps
            .insert("a".into(), app(Some(DAY), &[("client_event", HOUR)]));
        let plan = r.nats_plan();
        assert_eq!(plan.everything, Some(DAY * 7));
        assert_eq!(
            plan.filters,
            vec![
                filter(Some("a"), None, DAY, RuleKind::App),
                filter(Some("a"), Some("client_event"), HOUR, RuleKind::AppEvent),
            ]
        );
        assert!(plan.scans.is_empty());
        assert_eq!(plan.filters[1].filter("pusher"), "pusher.a.client_event.>");
    }

    #[test]
    fn an_app_kept_longer_sends_the_others_app_by_app() {
        let mut r = rules(1, &[]);
        r.apps.insert("long".into(), app(Some(DAY * 30), &[]));
        let plan = r.nats_plan();
        assert_eq!(plan.everything, Some(DAY * 30));
        assert!(plan.filters.is_empty());
        assert_eq!(plan.scans.len(), 1);
        assert_eq!(plan.scans[0].max_age, DAY);
        assert_eq!(plan.scans[0].rule, RuleKind::Default);
        assert_eq!(
            plan.scans[0].collect,
            Collect::Apps {
                except: names(&["long"])
            }
        );
    }

    #[test]
    fn a_disabled_app_forbids_the_whole_stream_purge() {
        let mut r = rules(7, &[("client_event", 1)]);
        r.apps
            .insert("a".into(), app(Some(DAY), &[("client_event", HOUR)]));
        r.apps.insert("off".into(), disabled());
        r.apps.insert("long".into(), app(Some(DAY * 30), &[]));
        let plan = r.nats_plan();
        assert_eq!(plan.everything, None);
        assert_eq!(
            plan.filters,
            vec![
                filter(Some("a"), None, DAY, RuleKind::App),
                filter(Some("a"), Some("client_event"), HOUR, RuleKind::AppEvent),
                filter(Some("long"), None, DAY * 30, RuleKind::App),
            ]
        );
        let keys: Vec<_> = plan.scans.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["others", "event:client_event"]);
        let except = names(&["a", "long", "off"]);
        assert_eq!(plan.scans[0].max_age, DAY * 7);
        assert_eq!(
            plan.scans[0].collect,
            Collect::Apps {
                except: except.clone()
            }
        );
        // `off` keeps client events: no `*.client_event` purge, app by app instead.
        assert!(!r.wildcard_ok("client_event", DAY));
        assert_eq!(plan.scans[1].max_age, DAY);
        assert_eq!(plan.scans[1].scan_filter("p"), "p.*.client_event.>");
        assert_eq!(plan.scans[1].collect, Collect::Apps { except });
    }

    #[test]
    fn an_app_with_a_longer_event_scans_its_own_other_events() {
        let mut r = rules(7, &[("client_event", 1)]);
        r.apps
            .insert("b".into(), app(None, &[("member_added", DAY * 30)]));
        let plan = r.nats_plan();
        assert_eq!(plan.everything, Some(DAY * 30));
        // b's client events go with every app's (same age): no purge of b's own for them.
        assert_eq!(
            plan.filters,
            vec![filter(None, Some("client_event"), DAY, RuleKind::Event)]
        );
        let keys: Vec<_> = plan.scans.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["app:b", "others"]);
        assert_eq!(plan.scans[0].scan_filter("p"), "p.b.>");
        assert_eq!(plan.scans[0].max_age, DAY * 7);
        assert_eq!(
            plan.scans[0].collect,
            Collect::Events {
                skip: names(&["client_event", "member_added"])
            }
        );
    }

    #[test]
    fn label_sets_are_bounded_by_the_configuration() {
        let mut r = rules(7, &[("client_event", 1)]);
        r.apps
            .insert("a".into(), app(Some(DAY), &[("client_event", HOUR)]));
        r.apps.insert("off".into(), disabled());
        let labels = r.label_sets(&names(&["a", "off", "z"]));
        let has = |a: &str, k: RuleKind| labels.contains(&(a.to_string(), k));
        assert!(has("a", RuleKind::App) && has("a", RuleKind::AppEvent));
        assert!(has("z", RuleKind::Event) && has("z", RuleKind::Default));
        assert!(has(OTHER_APP, RuleKind::Default));
        assert!(!labels.iter().any(|(a, _)| a == "off"), "{labels:?}");
        assert!(
            !has(ANY_APP, RuleKind::Longest),
            "no whole-stream purge with a disabled app"
        );
        assert!(labels.len() <= 5 * 4);
    }

    #[test]
    fn fingerprints_change_with_any_rule() {
        let mut r = rules(7, &[("client_event", 1)]);
        let before = r.fingerprint();
        assert_eq!(before, rules(7, &[("client_event", 1)]).fingerprint());
        r.apps.insert("a".into(), disabled());
        let with_app = r.fingerprint();
        assert_ne!(before, with_app);
        r.apps.insert("a".into(), app(None, &[]));
        assert_ne!(with_app, r.fingerprint());
    }

    #[test]
    fn filters_escape_the_event_token() {
        assert_eq!(all_filter("pusher"), "pusher.>");
        assert_eq!(
            event_filter("pusher", "client_event"),
            "pusher.*.client_event.>"
        );
        assert_eq!(event_filter("a.b", "x.y%"), "a.b.*.x%2Ey%25.>");
        assert_eq!(
            filter(Some("1.2"), Some("x.y"), DAY, RuleKind::AppEvent).filter("p"),
            "p.1%2E2.x%2Ey.>"
        );
        assert_eq!(
            filter(Some("1"), None, DAY, RuleKind::App).filter("p_dlq"),
            "p_dlq.1.>"
        );
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
        assert_eq!(
            subject_tokens("pusher", "pusher.1.member_added.c"),
            Some(("1", Some("member_added")))
        );
        assert_eq!(
            subject_tokens("p_dlq", "p_dlq.1.malformed"),
            Some(("1", None))
        );
        assert_eq!(subject_tokens("p_dlq", "p_dlq.1"), None);
        assert_eq!(subject_tokens("p", "p..x.c"), None);
    }

    #[test]
    fn verdicts_follow_each_messages_own_rule() {
        let mut r = rules(7, &[("client_event", 1), ("channel_occupied", 30)]);
        let now = 100 * 86_400_000;
        let days_ago = |d: u64| Some(now - d * 86_400_000);
        let v = |r: &Retention, app: Option<&str>, e: Option<&str>, t: Option<u64>| {
            head_action(r, app, e, t, now)
        };
        assert_eq!(
            v(&r, None, Some("client_event"), days_ago(2)),
            HeadAction::Purge
        );
        assert_eq!(v(&r, None, Some("other"), days_ago(8)), HeadAction::Purge);
        assert_eq!(v(&r, None, None, days_ago(8)), HeadAction::Purge);
        assert_eq!(
            v(&r, None, Some("channel_occupied"), days_ago(8)),
            HeadAction::Keep
        );
        assert_eq!(v(&r, None, Some("other"), days_ago(3)), HeadAction::Keep);
        assert_eq!(
            v(&r, None, Some("channel_occupied"), Some(now - 1000)),
            HeadAction::Stop
        );
        assert_eq!(v(&r, None, Some("x"), None), HeadAction::Keep);
        // A publish time in the future (clock skew) is young.
        assert_eq!(v(&r, None, Some("x"), Some(now + 5000)), HeadAction::Stop);

        r.apps
            .insert("a".into(), app(Some(DAY * 40), &[("client_event", HOUR)]));
        r.apps.insert("off".into(), disabled());
        assert_eq!(
            v(&r, Some("a"), Some("other"), days_ago(8)),
            HeadAction::Keep
        );
        assert_eq!(
            v(&r, Some("a"), Some("other"), days_ago(41)),
            HeadAction::Purge
        );
        assert_eq!(
            v(&r, Some("off"), Some("client_event"), days_ago(99)),
            HeadAction::Keep
        );
        // The shortest rule is now the app's hour: a two-hour-old message is no stop.
        assert_eq!(
            v(
                &r,
                None,
                Some("channel_occupied"),
                Some(now - 2 * 3_600_000)
            ),
            HeadAction::Keep
        );
    }
}
