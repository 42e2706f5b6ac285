//! `dlq purge` (and `dlq list`'s failures) through the real binary, against the real brokers:
//! twelve dead letters of two apps, three reasons and two ages, stored by the bridge's own
//! publisher; each filter removes exactly the letters it matches and the others stay in their
//! order; a dry run counts and changes nothing; no filter needs `--all`; a command that fails
//! prints nothing on stdout. [`per_broker!`] runs every body on NATS, on RabbitMQ, and on
//! RabbitMQ with quorum queues (which requeue at their tail: the kept letters must still keep
//! their order).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pusher_bridge::broker::{Broker, DeadLetter, DlqReason, Message, now_ms};
use pusher_bridge::config::{BrokerKind, Settings};
use pusher_bridge::dlq;
use pusher_bridge::metrics::Metrics;
use pusher_bridge::routing;

use crate::common::process::{self, Env, Run};
use crate::common::*;

per_broker!(
    each_filter_removes_exactly_its_letters_and_the_rest_keep_their_order,
    a_dry_run_counts_and_changes_nothing,
    without_a_filter_only_all_purges,
    bad_arguments_exit_1_and_change_nothing,
    list_and_purge_print_nothing_on_stdout_when_they_fail,
);

const APPS: [&str; 2] = ["111", "222"];
const REASONS: [DlqReason; 3] = [
    DlqReason::NoStream,
    DlqReason::Rejected,
    DlqReason::Malformed,
];
/// The age of an old letter's first failure (`--older-than 7d` takes it).
const OLD_MS: u64 = 10 * 86_400_000;
/// The age of a young letter's first failure (no test's `--older-than` takes it).
const YOUNG_MS: u64 = 60_000;

/// One seeded letter: what the filters look at.
#[derive(Clone, Debug)]
struct Seeded {
    id: String,
    app: &'static str,
    reason: DlqReason,
    old: bool,
}

/// Every app × reason × age once (12 letters), in an order where no filter's letters are
/// neighbours only: the k-th combination sits at position 5k mod 12.
fn grid(prefix: &str) -> Vec<Seeded> {
    (0..12)
        .map(|p| {
            let k = (p * 5) % 12;
            Seeded {
                id: format!("{prefix}-L{p:02}"),
                app: APPS[k % 2],
                reason: REASONS[(k / 2) % 3],
                old: k / 6 == 0,
            }
        })
        .collect()
}

/// The dead letter the bridge would have stored for `l`.
fn dead_letter(s: &Settings, l: &Seeded, now: u64) -> DeadLetter {
    let malformed = l.reason == DlqReason::Malformed;
    let channel = format!("ch-{}", l.id);
    DeadLetter {
        message: Message {
            subject: if malformed {
                String::new()
            } else {
                routing::subject(&s.broker.subject_prefix, l.app, "ev", &channel)
            },
            msg_id: l.id.clone(),
            body: Bytes::from(format!(r#"{{"name":"ev","channel":"{channel}"}}"#)),
            app_id: l.app.into(),
            event: if malformed {
                String::new()
            } else {
                "ev".into()
            },
            channel: if malformed { String::new() } else { channel },
            time_ms: "5".into(),
            trace: None,
        },
        reason: l.reason,
        detail: "seeded by the test".into(),
        attempts: 1,
        first_failure_ms: now - if l.old { OLD_MS } else { YOUNG_MS },
    }
}

/// Settings for `kind` whose dead-letter stream / queue holds the [`grid`]'s letters, stored in
/// order by the bridge's own publisher (which declares the topology first).
async fn seeded(kind: BrokerKind) -> (Settings, Vec<Seeded>) {
    let s = settings_for(kind);
    let broker = Broker::connect(&s, Arc::new(Metrics::new()))
        .await
        .expect("broker");
    assert!(
        broker.wait_up(Duration::from_secs(15)).await,
        "broker not up"
    );
    let letters = grid(&s.broker.subject_prefix);
    let now = now_ms();
    for l in &letters {
        broker
            .publish_dead_letter(&dead_letter(&s, l, now), Duration::from_secs(5))
            .await
            .expect("dead letter stored");
    }
    broker.close().await;
    assert_eq!(ids_left(&s).await, ids(letters.iter()), "seeded in order");
    (s, letters)
}

fn ids<'a>(letters: impl Iterator<Item = &'a Seeded>) -> Vec<String> {
    letters.map(|l| l.id.clone()).collect()
}

/// The message ids of the dead letters left, in queue order (`dlq list`'s reading).
async fn ids_left(s: &Settings) -> Vec<String> {
    dlq::list_all(s)
        .await
        .expect("listed")
        .into_iter()
        .map(|r| r.msg_id)
        .collect()
}

/// The environment that points the binary at `s`'s broker: its prefix, NATS streams and, on
/// RabbitMQ, its URL, exchanges, queues and queue type.
fn tool_env(s: &Settings) -> Env {
    let mut env = process::broker_env(s);
    if s.broker.kind == BrokerKind::Amqp {
        env.extend(process::amqp_env(s));
    }
    env
}

/// Runs `pusher-bridge dlq <args>` against `s`'s broker.
async fn dlq_cli(s: &Settings, args: &[&str]) -> Run {
    let mut all = vec!["dlq"];
    all.extend_from_slice(args);
    process::run(&all, &tool_env(s)).await
}

/// `removed N dead letters` as the command prints it.
fn removed(n: usize) -> String {
    format!("removed {n} dead letter{}\n", if n == 1 { "" } else { "s" })
}

async fn each_filter_removes_exactly_its_letters_and_the_rest_keep_their_order(kind: BrokerKind) {
    let (s, letters) = seeded(kind).await;
    type Step = (&'static [&'static str], fn(&Seeded) -> bool);
    let steps: [Step; 6] = [
        (&["--reason", "rejected"], |l| {
            l.reason == DlqReason::Rejected
        }),
        (
            &[
                "--app",
                "111",
                "--reason",
                "no_stream",
                "--older-than",
                "7d",
            ],
            |l| l.app == "111" && l.reason == DlqReason::NoStream && l.old,
        ),
        (&["--app", "222"], |l| l.app == "222"),
        (&["--older-than", "7d"], |l| l.old),
        // Nothing old is left: nothing matches, and that is no error.
        (&["--older-than", "90m"], |l| l.old),
        (&["--reason", "malformed", "--app", "111"], |l| {
            l.app == "111" && l.reason == DlqReason::Malformed
        }),
    ];
    let mut left: Vec<Seeded> = letters;
    for (args, matches) in steps {
        let mut argv = vec!["purge"];
        argv.extend_from_slice(args);
        let run = dlq_cli(&s, &argv).await;
        let gone = left.iter().filter(|l| matches(l)).count();
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert_eq!(run.stdout, removed(gone), "{args:?}: {}", run.stderr);
        left.retain(|l| !matches(l));
        assert_eq!(
            ids_left(&s).await,
            ids(left.iter()),
            "after `dlq purge {}`",
            args.join(" ")
        );
    }
    assert_eq!(left.len(), 1, "one letter of the twelve is left: {left:?}");
    cleanup(kind, &s).await;
}

async fn a_dry_run_counts_and_changes_nothing(kind: BrokerKind) {
    let (s, letters) = seeded(kind).await;
    let all = ids(letters.iter());
    for (args, n) in [
        (&["--reason", "no_stream"][..], 4),
        (&["--app", "111", "--older-than", "7d"][..], 3),
        (&["--app", "222", "--reason", "malformed"][..], 2),
        (&["--all"][..], 12),
        (&["--app", "999"][..], 0),
    ] {
        let mut argv = vec!["purge", "--dry-run"];
        argv.extend_from_slice(args);
        let run = dlq_cli(&s, &argv).await;
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert_eq!(
            run.stdout,
            format!("would remove {n} dead letters (dry run)\n"),
            "{args:?}: {}",
            run.stderr
        );
        assert_eq!(
            ids_left(&s).await,
            all,
            "a dry run with {args:?} changed the queue"
        );
    }
    cleanup(kind, &s).await;
}

async fn without_a_filter_only_all_purges(kind: BrokerKind) {
    let (s, letters) = seeded(kind).await;
    let all = ids(letters.iter());
    for argv in [&["purge"][..], &["purge", "--dry-run"][..]] {
        let run = dlq_cli(&s, argv).await;
        assert_eq!(run.code, 1, "{argv:?}: {run:?}");
        assert_eq!(run.stdout, "", "{argv:?}");
        assert!(run.stderr.contains("--all"), "{argv:?}: {}", run.stderr);
        assert_eq!(ids_left(&s).await, all, "{argv:?} removed letters");
    }
    let run = dlq_cli(&s, &["purge", "--all"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, removed(12).as_str()),
        "{run:?}"
    );
    assert!(ids_left(&s).await.is_empty());
    // An empty dead-letter queue: nothing to remove, no error.
    let run = dlq_cli(&s, &["purge", "--all"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, removed(0).as_str()),
        "{run:?}"
    );
    cleanup(kind, &s).await;
}

async fn bad_arguments_exit_1_and_change_nothing(kind: BrokerKind) {
    let (s, letters) = seeded(kind).await;
    let all = ids(letters.iter());
    let reasons = DlqReason::ALL.map(DlqReason::as_str);
    for (argv, says) in [
        (&["purge", "--reason", "lost"][..], &reasons[..]),
        (&["purge", "--reason", "Rejected"][..], &reasons[..]),
        (
            &["purge", "--older-than", "a while"][..],
            &["--older-than"][..],
        ),
        (
            &["purge", "--all", "--reason", "rejected"][..],
            &["--all"][..],
        ),
        (&["purge", "--app", ""][..], &["--app"][..]),
    ] {
        let run = dlq_cli(&s, argv).await;
        assert_eq!(run.code, 1, "{argv:?}: {run:?}");
        assert_eq!(run.stdout, "", "{argv:?}");
        for word in says {
            assert!(
                run.stderr.contains(word),
                "{argv:?}: `{word}` not in {}",
                run.stderr
            );
        }
        assert_eq!(ids_left(&s).await, all, "{argv:?} removed letters");
    }
    cleanup(kind, &s).await;
}

async fn list_and_purge_print_nothing_on_stdout_when_they_fail(kind: BrokerKind) {
    // No dead-letter stream / queue yet.
    let s = settings_for(kind);
    for argv in [
        &["list"][..],
        &["list", "--json"][..],
        &["purge", "--all"][..],
        &["purge", "--dry-run", "--reason", "rejected"][..],
    ] {
        let run = dlq_cli(&s, argv).await;
        assert_eq!(run.code, 1, "{argv:?}: {run:?}");
        assert_eq!(
            run.stdout, "",
            "{argv:?} printed on stdout although it failed"
        );
        assert!(
            run.stderr.contains("does not exist"),
            "{argv:?}: {}",
            run.stderr
        );
    }
    // No broker at all (NATS waits 5 s for a connection: the four run side by side).
    let mut away = s.clone();
    unreachable(kind, &mut away);
    let argvs = [
        &["list"][..],
        &["list", "--json"][..],
        &["purge", "--all"][..],
        &["purge", "--app", "111", "--older-than", "1d"][..],
    ];
    let runs = futures::future::join_all(argvs.iter().map(|argv| dlq_cli(&away, argv))).await;
    for (argv, run) in argvs.iter().zip(runs) {
        assert_eq!(run.code, 1, "{argv:?}: {run:?}");
        assert_eq!(
            run.stdout, "",
            "{argv:?} printed on stdout although it failed"
        );
        assert!(
            run.stderr.starts_with("pusher-bridge: "),
            "{argv:?}: {}",
            run.stderr
        );
    }
}
