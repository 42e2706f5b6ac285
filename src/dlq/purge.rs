//! `dlq purge`: removes the dead letters that match every given filter (reason, app, age) and
//! leaves the others where they are, in their order.
//!
//! The letters are walked with the broker's own `LetterStore`, the reader of `dlq list` and
//! `dlq replay`: a matching letter is removed as replay removes one (NATS: deleted by sequence;
//! RabbitMQ: acknowledged), every other letter is kept as they keep one (NATS: not touched;
//! RabbitMQ: held unacknowledged and put back at the end). So on RabbitMQ nothing is ever
//! published again: a letter that stays is the original message, never a copy, and a purge that
//! dies midway loses nothing (the broker returns every letter it held) and duplicates nothing.
//!
//! On NATS a purge by app and / or reason alone (no `--older-than`) needs no walk: the bridge
//! files each letter under `<prefix>_dlq.<app>.<reason>`, so one filtered purge of that subject
//! removes exactly the same letters, in chunks of sequences, on the server.

use std::time::Duration;

#[cfg(feature = "bench-null-broker")]
use super::null_broker;
use super::{DeadLetterRecord, DlqError, LetterStore, amqp, nats};
use crate::config::{BrokerKind, Settings};
use crate::message::{DlqReason, now_ms};

/// The command line of `dlq purge` was not a purge that can be run; nothing was touched.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// `--reason` is not one of the bridge's reasons.
    #[error(
        "unknown reason `{given}` for --reason: it is one of {}",
        reason_list()
    )]
    UnknownReason {
        /// What was given.
        given: String,
    },
    /// `--older-than` is not a duration.
    #[error("--older-than `{given}` is not a duration (e.g. `7d`, `90m`)")]
    BadAge {
        /// What was given.
        given: String,
        /// humantime's reason.
        #[source]
        source: humantime::DurationError,
    },
    /// `--app ""`: no letter is filed under an empty app id, and it is surely a mistake.
    #[error("--app needs an app id")]
    EmptyApp,
    /// No filter: removing every letter must be asked for in so many words.
    #[error(
        "no filter given: pass --reason, --app and / or --older-than, or --all to remove every dead letter"
    )]
    NoFilter,
    /// `--all` with a filter: which of the two was meant cannot be told.
    #[error("--all removes every dead letter: it does not go with --reason, --app or --older-than")]
    AllWithFilter,
}

/// A purge ended with an error; the command exits 1 and prints the count on stderr only.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// The dead letters could not be reached (no broker, no DLQ stream / queue): nothing was
    /// removed.
    #[error(transparent)]
    Open(#[from] DlqError),
    /// The broker failed while the purge ran. The letters removed before stay removed, every
    /// other letter stays in place: running the purge again finishes it.
    #[error("the purge stopped early, after removing {removed} dead letter(s)")]
    Stopped {
        /// Letters removed before it stopped (0 in a dry run).
        removed: u64,
        /// What failed.
        #[source]
        source: DlqError,
    },
}

/// Which dead letters a purge removes: those that match every filter that is set. The filters
/// read what `dlq list` shows: the reason and app columns, and the first failure's time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgeFilter {
    /// Only letters of this reason.
    pub reason: Option<DlqReason>,
    /// Only letters of this app id.
    pub app: Option<String>,
    /// Only letters whose first failure is longer ago than this. A letter without a known first
    /// failure (no `Pusher-Bridge-First-Failure-Ms`, `-` in the listing) has no age and never
    /// matches: a purge by age removes nothing it cannot date.
    pub older_than: Option<Duration>,
}

impl PurgeFilter {
    /// The filter of `dlq purge`'s arguments, checked before anything is connected: a reason
    /// among the bridge's, a humantime age, and `all` exactly when no filter is given (so that
    /// a forgotten filter never empties the dead-letter queue).
    pub fn from_args(
        reason: Option<&str>,
        app: Option<String>,
        older_than: Option<&str>,
        all: bool,
    ) -> Result<Self, FilterError> {
        let reason = reason
            .map(|r| {
                DlqReason::parse(r).ok_or_else(|| FilterError::UnknownReason {
                    given: r.to_string(),
                })
            })
            .transpose()?;
        if app.as_deref() == Some("") {
            return Err(FilterError::EmptyApp);
        }
        let older_than = older_than
            .map(|d| {
                humantime::parse_duration(d).map_err(|source| FilterError::BadAge {
                    given: d.to_string(),
                    source,
                })
            })
            .transpose()?;
        let filter = Self {
            reason,
            app,
            older_than,
        };
        match (all, filter.is_everything()) {
            (false, true) => Err(FilterError::NoFilter),
            (true, false) => Err(FilterError::AllWithFilter),
            _ => Ok(filter),
        }
    }

    /// No filter set: every letter matches.
    pub fn is_everything(&self) -> bool {
        self.reason.is_none() && self.app.is_none() && self.older_than.is_none()
    }

    /// Whether `r` matches every filter set, `now_ms` being the purge's one "now" (taken once,
    /// so a slow walk does not move the line between letters).
    pub fn matches(&self, r: &DeadLetterRecord, now_ms: u64) -> bool {
        self.reason.is_none_or(|want| r.reason == want.as_str())
            && self.app.as_ref().is_none_or(|want| r.app_id == *want)
            && self.older_than.is_none_or(|age| {
                let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                r.first_failure_ms != 0 && r.first_failure_ms < now_ms.saturating_sub(age_ms)
            })
    }
}

/// `dlq purge`: removes the letters of the configured broker that match `filter` (with
/// `dry_run`, only counts them) and returns how many. Only the letters present when it starts
/// are looked at; the others stay in place, in their order.
pub async fn purge(
    settings: &Settings,
    filter: &PurgeFilter,
    dry_run: bool,
) -> Result<u64, PurgeError> {
    let now = now_ms();
    match settings.broker.kind {
        BrokerKind::Nats => {
            let subject = nats::letters_subject(
                &settings.broker.subject_prefix,
                filter.app.as_deref(),
                filter.reason,
            );
            match subject {
                // The subject says all the filter asks: the server removes them.
                Some(subject) if !dry_run && filter.older_than.is_none() => {
                    nats::purge_subject(settings, &subject).await
                }
                // The server skips the letters of other subjects; the walk dates the rest.
                subject => {
                    let store =
                        nats::Store::open_on(settings, subject.as_deref().unwrap_or(">")).await?;
                    purge_store(store, filter, now, dry_run).await
                }
            }
        }
        BrokerKind::Amqp => {
            let store = amqp::Store::open(settings).await?;
            purge_store(store, filter, now, dry_run).await
        }
        #[cfg(feature = "bench-null-broker")]
        BrokerKind::Null => Err(null_broker().into()),
    }
}

/// Walks `store` once: removes each letter that matches (in a dry run: counts it and keeps
/// it), keeps every other one, and closes the store, which puts the kept letters back in their
/// places. Stops at the first error, after closing.
async fn purge_store<S: LetterStore>(
    mut store: S,
    filter: &PurgeFilter,
    now_ms: u64,
    dry_run: bool,
) -> Result<u64, PurgeError> {
    let mut matched = 0u64;
    let walked = loop {
        let (r, handle) = match store.next().await {
            Ok(Some(next)) => next,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if !filter.matches(&r, now_ms) {
            store.keep(handle);
            continue;
        }
        if dry_run {
            store.keep(handle);
        } else if let Err(e) = store.remove(handle).await {
            break Err(DlqError::Operation {
                what: format!(
                    "cannot remove the dead letter at position {} from the {}",
                    r.position,
                    S::KIND
                ),
                source: Some(e),
            });
        }
        matched += 1;
    };
    store.close().await;
    match walked {
        Ok(()) => Ok(matched),
        Err(source) => Err(PurgeError::Stopped {
            removed: if dry_run { 0 } else { matched },
            source,
        }),
    }
}

/// The line `dlq purge` prints: `removed 12 dead letters`, or with `dry_run`
/// `would remove 12 dead letters (dry run)`.
pub fn purge_line(n: u64, dry_run: bool) -> String {
    let letters = if n == 1 {
        "dead letter"
    } else {
        "dead letters"
    };
    if dry_run {
        format!("would remove {n} {letters} (dry run)")
    } else {
        format!("removed {n} {letters}")
    }
}

/// The reasons `--reason` takes, for its error message.
fn reason_list() -> String {
    DlqReason::ALL.map(DlqReason::as_str).join(", ")
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::dlq::list_store::ListStore;

    const NOW: u64 = 1_700_000_000_000;
    const DAY_MS: u64 = 86_400_000;

    fn record(position: u64, app: &str, reason: &str, first_failure_ms: u64) -> DeadLetterRecord {
        DeadLetterRecord::from_headers(
            position,
            |name| match name {
                "Pusher-App-Id" => Some(app.to_string()),
                "Pusher-Bridge-Reason" => Some(reason.to_string()),
                "Pusher-Bridge-First-Failure-Ms" => Some(first_failure_ms.to_string()),
                _ => None,
            },
            None,
            Bytes::new(),
        )
    }

    fn filter(
        reason: Option<&str>,
        app: Option<&str>,
        older_than: Option<&str>,
    ) -> Result<PurgeFilter, FilterError> {
        PurgeFilter::from_args(reason, app.map(str::to_string), older_than, false)
    }

    #[test]
    fn arguments_become_a_filter_or_an_error_naming_the_argument() {
        let f = filter(Some("no_stream"), Some("42"), Some("7d")).unwrap();
        assert_eq!(f.reason, Some(DlqReason::NoStream));
        assert_eq!(f.app.as_deref(), Some("42"));
        assert_eq!(f.older_than, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(
            filter(None, None, Some("90m")).unwrap().older_than,
            Some(Duration::from_secs(90 * 60))
        );

        let unknown = filter(Some("lost"), None, None).unwrap_err().to_string();
        assert!(unknown.contains("`lost`"), "{unknown}");
        for reason in DlqReason::ALL {
            assert!(unknown.contains(reason.as_str()), "{unknown}");
        }
        let age = filter(None, None, Some("a while")).unwrap_err();
        assert!(matches!(age, FilterError::BadAge { .. }), "{age}");
        assert!(std::error::Error::source(&age).is_some());
        assert!(matches!(
            filter(None, Some(""), None),
            Err(FilterError::EmptyApp)
        ));
    }

    #[test]
    fn everything_is_removed_only_with_all_and_all_goes_alone() {
        assert!(matches!(
            PurgeFilter::from_args(None, None, None, false),
            Err(FilterError::NoFilter)
        ));
        let all = PurgeFilter::from_args(None, None, None, true).unwrap();
        assert!(all.is_everything());
        assert!(matches!(
            PurgeFilter::from_args(Some("rejected"), None, None, true),
            Err(FilterError::AllWithFilter)
        ));
        assert!(matches!(
            PurgeFilter::from_args(None, None, Some("1d"), true),
            Err(FilterError::AllWithFilter)
        ));
    }

    #[test]
    fn a_letter_matches_when_every_set_filter_does() {
        let old = record(1, "42", "no_stream", NOW - 8 * DAY_MS);
        let young = record(2, "42", "no_stream", NOW - DAY_MS);
        let other_app = record(3, "7", "no_stream", NOW - 8 * DAY_MS);
        let other_reason = record(4, "42", "rejected", NOW - 8 * DAY_MS);
        let undated = record(5, "42", "no_stream", 0);
        let f = filter(Some("no_stream"), Some("42"), Some("7d")).unwrap();
        assert!(f.matches(&old, NOW));
        for r in [&young, &other_app, &other_reason, &undated] {
            assert!(!f.matches(r, NOW), "{r:?}");
        }
        let by_app = filter(None, Some("42"), None).unwrap();
        assert!(by_app.matches(&undated, NOW) && by_app.matches(&other_reason, NOW));
        assert!(!by_app.matches(&other_app, NOW));
        let all = PurgeFilter::default();
        assert!(
            [&old, &young, &other_app, &undated]
                .iter()
                .all(|r| all.matches(r, NOW))
        );
        // Exactly the age is not older than it.
        let week = record(6, "42", "no_stream", NOW - 7 * DAY_MS);
        assert!(!filter(None, None, Some("7d")).unwrap().matches(&week, NOW));
        // An age beyond the epoch matches nothing.
        assert!(
            !filter(None, None, Some("100000y"))
                .unwrap()
                .matches(&old, NOW)
        );
    }

    #[test]
    fn the_line_says_what_was_or_would_be_removed() {
        assert_eq!(purge_line(12, false), "removed 12 dead letters");
        assert_eq!(purge_line(1, false), "removed 1 dead letter");
        assert_eq!(purge_line(0, false), "removed 0 dead letters");
        assert_eq!(
            purge_line(12, true),
            "would remove 12 dead letters (dry run)"
        );
    }

    fn six() -> Vec<DeadLetterRecord> {
        (1..=6)
            .map(|i| {
                let app = if i % 2 == 0 { "even" } else { "odd" };
                let reason = if i <= 3 { "rejected" } else { "full" };
                record(i, app, reason, NOW - i * DAY_MS)
            })
            .collect()
    }

    #[tokio::test]
    async fn the_walk_removes_the_matches_and_keeps_the_rest_in_order() {
        let mut store = ListStore::new(six());
        let f = filter(None, Some("even"), Some("3d")).unwrap();
        assert_eq!(purge_store(&mut store, &f, NOW, false).await.unwrap(), 2);
        assert_eq!(store.removed, vec![4, 6]);
        assert_eq!(store.kept, vec![1, 2, 3, 5]);
        assert!(store.closed);

        let mut dry = ListStore::new(six());
        assert_eq!(purge_store(&mut dry, &f, NOW, true).await.unwrap(), 2);
        assert!(dry.removed.is_empty(), "a dry run removes nothing");
        assert_eq!(dry.kept, vec![1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn a_failure_midway_says_how_many_went_and_closes_the_store() {
        let mut store = ListStore::new(six());
        store.fail_at = Some(5);
        let f = filter(Some("full"), None, None).unwrap();
        match purge_store(&mut store, &f, NOW, false).await {
            Err(PurgeError::Stopped { removed, .. }) => assert_eq!(removed, 1),
            other => panic!("expected Stopped, got {other:?}"),
        }
        assert_eq!(store.removed, vec![4]);
        assert!(store.closed, "the kept letters are put back");
        let mut dry = ListStore::new(six());
        dry.fail_at = Some(5);
        match purge_store(&mut dry, &f, NOW, true).await {
            Err(PurgeError::Stopped { removed, .. }) => assert_eq!(removed, 0),
            other => panic!("expected Stopped, got {other:?}"),
        }
    }
}
