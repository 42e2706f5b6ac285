//! `dlq list` / `dlq replay` over the real NATS JetStream: dead letters made by the running
//! bridge (malformed events, events no stream takes) and dead letters stored by the broker code,
//! listed with their fields, replayed with their ids, and the command line's output and exit codes.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use indicatif::ProgressBar;
use pusher_bridge::broker::nats::NatsBroker;
use pusher_bridge::broker::{DeadLetter, DlqReason, Message, now_ms};
use pusher_bridge::config::Settings;
use pusher_bridge::dlq::{self, DlqError};
use pusher_bridge::metrics::Metrics;
use pusher_bridge::routing;

/// Settings with `declare = false` and both streams created by the test: the events stream
/// takes `events_subject`, the DLQ stream `<prefix>_dlq.>`.
async fn own_streams(js: &jetstream::Context, events_subject: &str) -> Settings {
    let mut s = nats_settings();
    s.broker.declare = false;
    let prefix = s.broker.subject_prefix.clone();
    for (name, subject) in [
        (
            s.broker.nats.stream.clone(),
            events_subject.replace("{p}", &prefix),
        ),
        (
            s.broker.nats.dlq_stream.clone(),
            format!("{}.>", routing::dlq_prefix(&prefix)),
        ),
    ] {
        js.create_stream(stream::Config {
            name,
            subjects: vec![subject],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    s
}

/// Points the events stream at `subject` (`{p}` = the prefix).
async fn set_events_subject(js: &jetstream::Context, s: &Settings, subject: &str) {
    let mut st = js.get_stream(&s.broker.nats.stream).await.unwrap();
    let mut cfg = st.info().await.unwrap().config.clone();
    cfg.subjects = vec![subject.replace("{p}", &s.broker.subject_prefix)];
    js.update_stream(cfg).await.unwrap();
}

/// The bridge's own broker, to store dead letters exactly as the bridge does.
async fn broker(s: &Settings) -> NatsBroker {
    let b = NatsBroker::connect(s, Arc::new(Metrics::new()))
        .await
        .unwrap();
    for _ in 0..250 {
        if b.is_up() {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("NATS broker not up");
}

/// A dead letter of event `i`: `malformed` ones carry raw JSON and no subject.
fn letter(s: &Settings, i: usize, reason: DlqReason) -> DeadLetter {
    let (event, channel) = (format!("ev{i}"), format!("ch-{i}.x"));
    let malformed = reason == DlqReason::Malformed;
    DeadLetter {
        message: Message {
            subject: if malformed {
                String::new()
            } else {
                routing::subject(&s.broker.subject_prefix, APP_ID, &event, &channel)
            },
            msg_id: format!("{}-{i}", s.broker.subject_prefix),
            body: Bytes::from(if malformed {
                format!(r#"{{"name":{i}}}"#)
            } else {
                format!(
                    r#"{{"name":"{event}","channel":"{channel}","n":{i},"app_id":"{APP_ID}","time_ms":5}}"#
                )
            }),
            app_id: APP_ID.into(),
            event: if malformed { String::new() } else { event },
            channel: if malformed { String::new() } else { channel },
            time_ms: "5".into(),
            trace: None,
        },
        reason,
        detail: format!("detail of {i}"),
        attempts: if malformed { 0 } else { 2 },
        first_failure_ms: 1_700_000_000_000 + i as u64,
    }
}

async fn store(b: &NatsBroker, letters: &[DeadLetter]) {
    for dl in letters {
        b.publish_dead_letter(dl, Duration::from_secs(5))
            .await
            .expect("dead letter stored");
    }
}

#[tokio::test]
async fn bridge_dead_letters_are_listed_then_replayed_and_malformed_stay() {
    let js = jetstream_ctx(&nats_url()).await;
    // An events stream that does not take the bridge's subjects: good events become `no_stream`.
    let settings = own_streams(&js, "{p}.elsewhere.>").await;
    let app = TestApp::spawn_ready(settings.clone()).await;
    let before = now_ms();
    let body = webhook_body(
        1_700_000_000_999,
        &[
            r#"{"name":"member_added","channel":"presence-a.b","user_id":"u1"}"#,
            r#"{"name":"channel_occupied"}"#,
            r#"{"name":"channel_vacated","channel":"c2"}"#,
        ],
    );
    let answer = app.post_signed(&body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    app.stop().await;
    let stored = stream_messages(&js, &settings.broker.nats.dlq_stream, 3).await;
    assert_eq!(stored.len(), 3);

    let listed = dlq::list_all(&settings).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.windows(2).all(|w| w[0].position < w[1].position));
    let p = &settings.broker.subject_prefix;
    let digest = routing::webhook_digest(APP_ID, body.as_bytes());
    let malformed = listed.iter().find(|r| r.reason == "malformed").unwrap();
    assert_eq!(malformed.subject, "");
    assert_eq!(malformed.msg_id, routing::message_id(&digest, 1));
    assert_eq!(&malformed.body[..], br#"{"name":"channel_occupied"}"#);
    assert_eq!(malformed.attempts, 0);
    assert!(malformed.replay_blocker().is_some());
    let added = listed.iter().find(|r| r.event == "member_added").unwrap();
    assert_eq!(added.reason, "no_stream");
    assert_eq!(
        added.subject,
        routing::subject(p, APP_ID, "member_added", "presence-a.b")
    );
    assert_eq!(
        added.subject,
        format!("{p}.123456.member_added.presence-a%2Eb")
    );
    assert_eq!(added.msg_id, routing::message_id(&digest, 0));
    assert_eq!(added.app_id, APP_ID);
    assert_eq!(added.channel, "presence-a.b");
    assert_eq!(added.time_ms, "1700000000999");
    assert!(added.attempts >= 1);
    assert!(added.first_failure_ms >= before && added.first_failure_ms <= now_ms());
    assert!(!added.detail.is_empty());
    let added_body: serde_json::Value = serde_json::from_slice(&added.body).unwrap();
    assert_eq!(added_body["user_id"], "u1");
    assert_eq!(added_body["app_id"], APP_ID);

    // Listing removes nothing.
    assert_eq!(dlq::list_all(&settings).await.unwrap(), listed);

    // Still no stream for the subjects: every letter is refused again and stays.
    let summary = dlq::replay(&settings, &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!((summary.seen, summary.replayed, summary.left), (3, 0, 3));
    assert!(!summary.all_replayed());
    assert_eq!(dlq::list_all(&settings).await.unwrap(), listed);

    // Now the events stream takes them.
    set_events_subject(&js, &settings, "{p}.>").await;
    let summary = dlq::replay(&settings, &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!((summary.seen, summary.replayed, summary.left), (3, 2, 1));
    assert!(!summary.all_replayed(), "the malformed letter is left");
    assert_eq!(summary.left_letters[0].msg_id, malformed.msg_id);
    assert!(summary.line().contains("1 left"));

    let events = stream_messages(&js, &settings.broker.nats.stream, 2).await;
    assert_eq!(events.len(), 2);
    for letter in listed.iter().filter(|r| r.reason != "malformed") {
        let m = events
            .iter()
            .find(|m| m.subject == letter.subject)
            .expect("replayed to its subject");
        assert_eq!(m.header("Nats-Msg-Id"), Some(letter.msg_id.as_str()));
        assert_eq!(m.raw, letter.body);
        assert_eq!(m.header("Content-Type"), Some("application/json"));
        assert_eq!(m.header("Pusher-App-Id"), Some(APP_ID));
        assert_eq!(m.header("Pusher-Event"), Some(letter.event.as_str()));
        assert_eq!(m.header("Pusher-Channel"), Some(letter.channel.as_str()));
        assert_eq!(m.header("Pusher-Time-Ms"), Some("1700000000999"));
        assert_eq!(m.header("Pusher-Bridge-Reason"), None);
    }
    let left = dlq::list_all(&settings).await.unwrap();
    assert_eq!(left, vec![malformed.clone()]);

    // Replaying again changes nothing.
    let summary = dlq::replay(&settings, &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!((summary.seen, summary.replayed, summary.left), (1, 0, 1));
    assert_eq!(
        stream_messages(&js, &settings.broker.nats.stream, 2)
            .await
            .len(),
        2
    );

    delete_streams(&js, &settings).await;
}

#[tokio::test]
async fn a_letter_whose_event_got_through_is_deduplicated_and_removed() {
    let js = jetstream_ctx(&nats_url()).await;
    let settings = own_streams(&js, "{p}.>").await;
    let b = broker(&settings).await;
    let dl = letter(&settings, 1, DlqReason::Rejected);
    // The event did reach the stream (say a late ack), and was dead-lettered as well.
    b.publish(&dl.message, Duration::from_secs(5))
        .await
        .unwrap();
    store(&b, std::slice::from_ref(&dl)).await;

    let summary = dlq::replay(&settings, &ProgressBar::hidden())
        .await
        .unwrap();
    assert!(summary.all_replayed(), "{}", summary.report());
    assert_eq!(summary.replayed, 1);
    let events = stream_messages(&js, &settings.broker.nats.stream, 1).await;
    assert_eq!(events.len(), 1, "JetStream dropped the duplicate id");
    assert!(dlq::list_all(&settings).await.unwrap().is_empty());
    b.close().await;
    delete_streams(&js, &settings).await;
}

#[tokio::test]
async fn many_letters_are_replayed_in_their_order() {
    let js = jetstream_ctx(&nats_url()).await;
    let settings = own_streams(&js, "{p}.>").await;
    let b = broker(&settings).await;
    let n = dlq::REPLAY_WINDOW * 2 + 7;
    let letters: Vec<_> = (0..n)
        .map(|i| letter(&settings, i, DlqReason::NoStream))
        .collect();
    store(&b, &letters).await;
    let bar = ProgressBar::hidden();
    let summary = dlq::replay(&settings, &bar).await.unwrap();
    assert!(summary.all_replayed(), "{}", summary.report());
    assert_eq!(summary.replayed, n as u64);
    assert_eq!(bar.position(), n as u64);
    let events = stream_messages(&js, &settings.broker.nats.stream, n).await;
    let ids: Vec<_> = events
        .iter()
        .map(|m| m.header("Nats-Msg-Id").unwrap().to_string())
        .collect();
    let want: Vec<_> = letters.iter().map(|l| l.message.msg_id.clone()).collect();
    assert_eq!(ids, want);
    assert!(dlq::list_all(&settings).await.unwrap().is_empty());
    b.close().await;
    delete_streams(&js, &settings).await;
}

#[tokio::test]
async fn a_missing_dlq_stream_is_named() {
    let settings = nats_settings();
    match dlq::list_all(&settings).await {
        Err(DlqError::Missing { kind, name }) => {
            assert_eq!(kind, "stream");
            assert_eq!(name, settings.broker.nats.dlq_stream);
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    assert!(matches!(
        dlq::replay(&settings, &ProgressBar::hidden()).await,
        Err(DlqError::Missing { .. })
    ));
}

#[tokio::test]
async fn an_unreachable_nats_is_a_connect_error() {
    let mut settings = nats_settings();
    settings.broker.nats.url =
        pusher_bridge::config::SecretUrl::new(format!("nats://127.0.0.1:{}", free_port()));
    assert!(matches!(
        dlq::list_all(&settings).await,
        Err(DlqError::Connect(_))
    ));
}

/// Writes the test's settings as a config file for the binary.
fn config_file(s: &Settings) -> tempfile::NamedTempFile {
    let toml = format!(
        "[broker]\nkind = \"nats\"\nsubject_prefix = \"{}\"\n[broker.nats]\nurl = \"{}\"\nstream = \"{}\"\ndlq_stream = \"{}\"\n",
        s.broker.subject_prefix,
        nats_url(),
        s.broker.nats.stream,
        s.broker.nats.dlq_stream
    );
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), toml).unwrap();
    f
}

/// Runs `pusher-bridge <args> --config <file>` off the runtime; returns (exit code, stdout).
async fn run_cli(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pusher-bridge"));
    cmd.args(args).arg("--config").arg(config);
    for (k, _) in std::env::vars() {
        if k.starts_with("PUSHER_BRIDGE_") {
            cmd.env_remove(k);
        }
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_command_line_lists_as_table_and_json_and_exits_by_what_is_left() {
    let js = jetstream_ctx(&nats_url()).await;
    let settings = own_streams(&js, "{p}.>").await;
    let b = broker(&settings).await;
    let good = letter(&settings, 1, DlqReason::NoStream);
    let bad = letter(&settings, 2, DlqReason::Malformed);
    store(&b, &[good.clone(), bad.clone()]).await;
    let cfg = config_file(&settings);

    let (code, out, err) = run_cli(cfg.path(), &["dlq", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON array");
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["subject"], good.message.subject);
    assert_eq!(a[0]["msg_id"], good.message.msg_id);
    assert_eq!(a[0]["reason"], "no_stream");
    assert_eq!(a[0]["attempts"], 2);
    assert_eq!(a[0]["first_failure_ms"], 1_700_000_000_001u64);
    assert_eq!(a[0]["first_failure"], "2023-11-14 22:13:20.001 UTC");
    assert_eq!(a[0]["detail"], "detail of 1");
    assert_eq!(a[0]["app_id"], APP_ID);
    assert_eq!(a[0]["event"], "ev1");
    assert_eq!(a[0]["channel"], "ch-1.x");
    assert_eq!(a[0]["replayable"], true);
    assert_eq!(
        a[0]["body"],
        std::str::from_utf8(&good.message.body).unwrap()
    );
    assert_eq!(a[1]["reason"], "malformed");
    assert_eq!(a[1]["replayable"], false);
    assert_eq!(a[1]["body"], r#"{"name":2}"#);

    let (code, out, err) = run_cli(cfg.path(), &["dlq", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].contains("FIRST FAILURE") && lines[0].contains("SUBJECT"));
    assert!(lines[1].contains(&good.message.subject));
    assert!(lines[1].contains("2023-11-14 22:13:20.001 UTC"));
    assert!(lines[1].contains("no_stream"));
    assert!(lines[2].contains("malformed") && lines[2].contains(&bad.message.msg_id));
    assert_eq!(lines[3], "2 dead letters (1 cannot be replayed)");

    let (code, out, err) = run_cli(cfg.path(), &["dlq", "replay"]).await;
    assert_eq!(code, 2, "letters left: {out}{err}");
    assert!(
        out.starts_with("replayed 1 of 2 dead letters; 1 left"),
        "{out}"
    );
    assert!(out.contains(&bad.message.msg_id), "{out}");
    assert_eq!(
        stream_messages(&js, &settings.broker.nats.stream, 1)
            .await
            .len(),
        1
    );

    // Only the malformed letter is left; drop it, dead-letter another good one: all go, exit 0.
    js.get_stream(&settings.broker.nats.dlq_stream)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    store(&b, &[letter(&settings, 3, DlqReason::TooLarge)]).await;
    let (code, out, err) = run_cli(cfg.path(), &["dlq", "replay"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "replayed 1 of 1 dead letters; 0 left in the dead-letter queue\n"
    );
    let (code, out, _) = run_cli(cfg.path(), &["dlq", "list", "--json"]).await;
    assert_eq!((code, out.as_str()), (0, "[]\n"));

    // A broker that is not there: exit 1 with a message.
    delete_streams(&js, &settings).await;
    let (code, _, err) = run_cli(cfg.path(), &["dlq", "list"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    // The same for a replay: an error before anything was replayed is 1, not 2.
    let (code, out, err) = run_cli(cfg.path(), &["dlq", "replay"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("does not exist"), "{err}");
    b.close().await;
}

/// The issue-10 regression on NATS: 300 `no_stream` letters, an events stream that takes the
/// even event names only; after each of three replays every letter is in exactly one place
/// (the events stream once, or still in the DLQ). The replayed events come from the bridge's
/// own publisher: with `broker.cloudevents` they carry the `ce-` headers of a live event.
#[tokio::test]
async fn a_replay_of_takeable_and_untakeable_letters_leaves_each_in_exactly_one_place() {
    let js = jetstream_ctx(&nats_url()).await;
    let mut settings = own_streams(&js, "{p}.none.>").await;
    settings.broker.cloudevents = true;
    let n = 300;
    let prefix = settings.broker.subject_prefix.clone();
    let mut st = js.get_stream(&settings.broker.nats.stream).await.unwrap();
    let mut cfg = st.info().await.unwrap().config.clone();
    cfg.subjects = (0..n)
        .step_by(2)
        .map(|i| format!("{prefix}.{APP_ID}.ev{i}.>"))
        .collect();
    js.update_stream(cfg).await.unwrap();
    let b = broker(&settings).await;
    let letters: Vec<_> = (0..n)
        .map(|i| letter(&settings, i, DlqReason::NoStream))
        .collect();
    store(&b, &letters).await;
    let takeable = |i: usize| i.is_multiple_of(2);
    for run in 0..3 {
        let summary = dlq::replay(&settings, &ProgressBar::hidden())
            .await
            .unwrap();
        let want_replayed = if run == 0 { n as u64 / 2 } else { 0 };
        assert_eq!(
            summary.replayed,
            want_replayed,
            "run {run}: {}",
            summary.report()
        );
        let stored = stream_messages(&js, &settings.broker.nats.stream, n / 2).await;
        let mut in_stream = std::collections::HashMap::new();
        for m in &stored {
            *in_stream
                .entry(m.header("Nats-Msg-Id").unwrap().to_string())
                .or_insert(0usize) += 1;
            assert_eq!(
                m.header("ce-specversion"),
                Some("1.0"),
                "ce- headers on replay"
            );
            assert_eq!(m.header("ce-id"), m.header("Nats-Msg-Id"));
        }
        let left: std::collections::HashSet<String> = dlq::list_all(&settings)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.msg_id)
            .collect();
        for (i, l) in letters.iter().enumerate() {
            let id = &l.message.msg_id;
            let s = in_stream.get(id).copied().unwrap_or(0);
            let d = usize::from(left.contains(id));
            assert_eq!(
                s + d,
                1,
                "run {run}: {id} is {s} time(s) in the stream and {d} in the DLQ"
            );
            assert_eq!(s == 1, takeable(i), "{id}");
        }
    }
    b.close().await;
    delete_streams(&js, &settings).await;
}
