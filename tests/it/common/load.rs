//! Traffic for outage tests: posters that keep sending two-event webhooks while a broker goes
//! away and comes back, the checks every such test makes on the answers, and spool records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;
use pusher_bridge::broker::Message;
use pusher_bridge::config::Settings;

use super::{APP_ID, TestApp, webhook_body};

/// One answer: status, how long it took, body.
pub type Posted = (StatusCode, Duration, String);

/// Events in each webhook the posters send.
pub const EVENTS_PER_WEBHOOK: usize = 2;

/// `posters` tasks posting unique two-event webhooks (5 ms apart) for `run_for`.
pub fn start_posters(
    app: &Arc<TestApp>,
    posters: u64,
    run_for: Duration,
) -> Vec<tokio::task::JoinHandle<Vec<Posted>>> {
    let stop_at = Instant::now() + run_for;
    (0..posters)
        .map(|p| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut i = 0u64;
                while Instant::now() < stop_at {
                    let body = webhook_body(
                        1_700_000_000_000 + p * 1_000_000 + i,
                        &[
                            r#"{"name":"channel_occupied","channel":"load-a"}"#,
                            r#"{"name":"member_added","channel":"presence-load","user_id":"u"}"#,
                        ],
                    );
                    let started = Instant::now();
                    let a = app.post_signed(&body).await;
                    answers.push((a.status, started.elapsed(), a.body));
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                answers
            })
        })
        .collect()
}

/// Waits for the posters, asserts every webhook got 200 within Pusher's 4 s and that the
/// outage reached the spool; returns the answers and the number of events spooled.
pub async fn collect_answers(
    posters: Vec<tokio::task::JoinHandle<Vec<Posted>>>,
) -> (Vec<Posted>, usize) {
    let mut answers = Vec::new();
    for p in posters {
        answers.extend(p.await.expect("poster"));
    }
    for (status, took, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert!(*took < Duration::from_secs(4), "answered after {took:?}");
    }
    let spooled: usize = answers
        .iter()
        .map(|(_, _, b)| {
            serde_json::from_str::<serde_json::Value>(b).expect("JSON answer")["spooled"]
                .as_u64()
                .expect("spooled count") as usize
        })
        .sum();
    assert!(spooled > 0, "the outage never reached the spool");
    (answers, spooled)
}

/// A `channel_occupied` event on channel `ch-<i>` with message id `<tag>-<i>`.
pub fn event_message(settings: &Settings, i: usize, tag: &str) -> Message {
    let channel = format!("ch-{i}");
    Message {
        subject: pusher_bridge::routing::subject(
            &settings.broker.subject_prefix,
            APP_ID,
            "channel_occupied",
            &channel,
        ),
        msg_id: format!("{tag}-{i}"),
        body: Bytes::from(format!(
            r#"{{"name":"channel_occupied","channel":"{channel}","app_id":"{APP_ID}","time_ms":1}}"#
        )),
        app_id: Arc::from(APP_ID),
        event: "channel_occupied".into(),
        channel,
        time_ms: "1".into(),
        trace: None,
    }
}

/// A connected broker, an open spool and a drainer over them, outside any server: for tests
/// that drive `Drainer::drain_once` directly.
pub struct DrainRig {
    /// The metrics all three share.
    pub metrics: Arc<pusher_bridge::metrics::Metrics>,
    /// The broker of `settings.broker.kind`, up.
    pub broker: Arc<pusher_bridge::broker::Broker>,
    /// The spool in `settings.spool.dir`.
    pub spool: Arc<pusher_bridge::spool::Spool>,
    /// A drainer waiting `ack_timeout` per batch.
    pub drainer: pusher_bridge::spool::drain::Drainer,
}

/// Connects the broker (waits until it is up), opens the spool and builds the drainer.
pub async fn drain_rig(settings: &Settings, ack_timeout: Duration) -> DrainRig {
    use pusher_bridge::broker::Broker;
    use pusher_bridge::metrics::Metrics;
    use pusher_bridge::spool::Spool;
    use pusher_bridge::spool::drain::Drainer;

    let metrics = Arc::new(Metrics::new());
    let broker = Arc::new(
        Broker::connect(settings, metrics.clone())
            .await
            .expect("broker"),
    );
    assert!(broker.wait_up(Duration::from_secs(10)).await, "broker up");
    let spool = Arc::new(
        Spool::open(&settings.spool, 1024, metrics.clone())
            .await
            .expect("spool opens"),
    );
    let drainer = Drainer::new(
        spool.clone(),
        broker.clone(),
        metrics.clone(),
        ack_timeout,
        Duration::from_secs(1),
    );
    DrainRig {
        metrics,
        broker,
        spool,
        drainer,
    }
}
