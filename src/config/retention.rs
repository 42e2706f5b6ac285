//! `[retention]`: the sweeper's trim schedules, per target (events, dead letters), per app and
//! per event name.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[retention]`: one trim schedule for the events stream / queue, one for the dead letters.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Trim of the events stream / queue.
    #[serde(deserialize_with = "target_with_default::events")]
    pub events: RetentionTarget,
    /// Trim of the dead-letter stream / queue.
    #[serde(deserialize_with = "target_with_default::dlq")]
    pub dlq: RetentionTarget,
    /// How long a replica's sweeper lease lasts without renewal (a crashed holder's lease expires).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

mod target_with_default {
    //! A `[retention.<target>]` table without `max_age` gets that target's default (30 days for
    //! the dead letters), not the events' 7 days that `RetentionTarget::default` carries.
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    use super::{RetentionSettings, RetentionTarget};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Partial {
        enabled: Option<bool>,
        method: Option<super::RetentionMethod>,
        #[serde(default, with = "humantime_serde")]
        max_age: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        interval: Option<Duration>,
        #[serde(default, with = "super::duration_map")]
        overrides: std::collections::BTreeMap<String, Duration>,
        #[serde(default)]
        apps: std::collections::BTreeMap<String, super::AppRetention>,
    }

    fn fill(p: Partial, d: RetentionTarget) -> RetentionTarget {
        RetentionTarget {
            enabled: p.enabled.unwrap_or(d.enabled),
            method: p.method.unwrap_or(d.method),
            max_age: p.max_age.unwrap_or(d.max_age),
            interval: p.interval.unwrap_or(d.interval),
            overrides: p.overrides,
            apps: p.apps,
        }
    }

    /// `[retention.events]`, defaults from the events' target.
    pub(super) fn events<'de, D: Deserializer<'de>>(d: D) -> Result<RetentionTarget, D::Error> {
        Ok(fill(
            Partial::deserialize(d)?,
            RetentionSettings::default().events,
        ))
    }

    /// `[retention.dlq]`, defaults from the dead letters' target (30 days).
    pub(super) fn dlq<'de, D: Deserializer<'de>>(d: D) -> Result<RetentionTarget, D::Error> {
        Ok(fill(
            Partial::deserialize(d)?,
            RetentionSettings::default().dlq,
        ))
    }
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            events: RetentionTarget {
                max_age: Duration::from_secs(7 * 86_400),
                ..RetentionTarget::default()
            },
            dlq: RetentionTarget {
                max_age: Duration::from_secs(30 * 86_400),
                ..RetentionTarget::default()
            },
            lease_ttl: Duration::from_secs(60),
        }
    }
}

/// `retention.<target>.method`: who removes a target's old messages.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RetentionMethod {
    /// The sweeper purges them every `interval` (both brokers, any server).
    #[default]
    Sweep,
    /// Every message carries `Nats-TTL` from the same rules and the server expires it (NATS
    /// 2.11 or newer): no sweep runs for the target, but a changed rule applies to new messages
    /// only.
    MessageTtl,
}

/// One trim timer: enable flag, retention period and schedule.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionTarget {
    /// Whether the sweeper trims this target at all.
    pub enabled: bool,
    /// How old messages go: the sweeper's purges (any server), or each message's own `Nats-TTL`
    /// (NATS 2.11 or newer), which the server expires without a sweep.
    pub method: RetentionMethod,
    /// Messages older than this are purged.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How often the sweep runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Per event name retention, e.g. `client_event = "1d"` (events target only).
    #[serde(with = "duration_map")]
    pub overrides: BTreeMap<String, Duration>,
    /// Per app (tenant) rules, keyed by an app id of `[[apps]]`: the seed's trim timers are
    /// configured per tenant, so one bridge can keep one customer's events 30 days and another's
    /// one day. The most specific rule wins: app + event, app, event, then `max_age`.
    pub apps: BTreeMap<String, AppRetention>,
}

/// `[retention.<target>.apps."<app_id>"]`: one app's retention on one target.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AppRetention {
    /// `false`: this app's messages are never purged (a tenant that keeps everything).
    pub enabled: bool,
    /// This app's default retention; unset, the target's event overrides and `max_age` apply.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// Per event name retention of this app (events target only), above every other rule.
    #[serde(with = "duration_map", skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, Duration>,
}

impl Default for AppRetention {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age: None,
            overrides: BTreeMap::new(),
        }
    }
}

impl Default for RetentionTarget {
    fn default() -> Self {
        Self {
            enabled: true,
            method: RetentionMethod::Sweep,
            max_age: Duration::from_secs(7 * 86_400),
            interval: Duration::from_secs(3600),
            overrides: BTreeMap::new(),
            apps: BTreeMap::new(),
        }
    }
}

mod duration_map {
    //! humantime durations as map values.
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeMap};

    /// Each duration as humantime text (`1h 30m`).
    pub(super) fn serialize<S: Serializer>(
        map: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut out = s.serialize_map(Some(map.len()))?;
        for (k, v) in map {
            out.serialize_entry(k, &humantime::format_duration(*v).to_string())?;
        }
        out.end()
    }

    /// Each value as humantime text.
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                humantime::parse_duration(&v)
                    .map(|d| (k, d))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn a_partial_retention_table_keeps_its_targets_defaults() {
        let s = Settings::from_toml(
            "[retention.dlq]\ninterval = \"2h\"\n[retention.events]\nenabled = false\n",
        )
        .unwrap();
        assert_eq!(s.retention.dlq.max_age, Duration::from_secs(30 * 86_400));
        assert_eq!(s.retention.dlq.interval, Duration::from_secs(7200));
        assert_eq!(s.retention.events.max_age, Duration::from_secs(7 * 86_400));
        assert!(!s.retention.events.enabled && s.retention.dlq.enabled);
        let err = Settings::from_toml("[retention.dlq]\nmaxage = \"1d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("maxage"), "{err}");
    }

    #[test]
    fn per_app_retention_parses_and_names_unknown_apps() {
        let s = Settings::from_toml(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n\
             [retention.events.apps.\"1\"]\nmax_age = \"1d\"\n\
             [retention.events.apps.\"1\".overrides]\nclient_event = \"1h\"\n\
             [retention.dlq.apps.\"1\"]\nenabled = false\n",
        )
        .unwrap();
        let app = &s.retention.events.apps["1"];
        assert!(app.enabled);
        assert_eq!(app.max_age, Some(Duration::from_secs(86_400)));
        assert_eq!(app.overrides["client_event"], Duration::from_secs(3600));
        assert!(!s.retention.dlq.apps["1"].enabled);
        assert_eq!(s.retention.dlq.apps["1"].max_age, None);
        // And back: check-config's output is a config.
        let back = Settings::from_toml(&s.to_redacted_toml()).unwrap();
        assert_eq!(back.retention.events.apps, s.retention.events.apps);

        let err = Settings::from_toml("[retention.events.apps.\"9\"]\nmax_age = \"1d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retention.events.apps.\"9\""), "{err}");
    }

    #[test]
    fn durations_and_overrides_parse() {
        let s = Settings::from_toml(
            "[retention.events]\nmax_age = \"2d\"\ninterval = \"5m\"\n[retention.events.overrides]\nclient_event = \"1d\"\n",
        )
        .unwrap();
        assert_eq!(s.retention.events.max_age, Duration::from_secs(2 * 86400));
        assert_eq!(
            s.retention.events.overrides["client_event"],
            Duration::from_secs(86400)
        );
    }
}
