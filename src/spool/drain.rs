//! The drainer: publishes spooled records in arrival order, with their original message ids, as
//! soon as the broker takes events again, and moves the spool's cursor only past records the
//! broker acknowledged.
//!
//! [`Drainer::drain_once`] works through the spool in batches of [`DRAIN_BATCH`] records, each
//! delivered by the deliverer every path shares (`crate::delivery`) with the drainer's policy:
//! the batch's events are handed to the broker in order and their acks awaited together, so the
//! stream keeps the arrival order; a refusal that may pass is tried a few times; a refused event
//! becomes a dead letter (its first failure is when it was spooled); an unavailable broker ends
//! the pass (the records stay and are retried on the next one, in order). A dead letter the
//! dead-letter queue refuses for a lasting reason is set aside in the quarantine file so it does
//! not block the records behind it (`pusher-bridge quarantine` lists it,
//! `pusher_bridge_spool_quarantined` counts it, the next start takes it back onto the spool).
//! [`Drainer::run`] drains when an append lands and on an interval, and stops on shutdown.

use std::sync::Arc;
use std::time::Duration;

use super::{Batch, DRAIN_BATCH, Item, Spool, SpoolError, record};
use crate::broker::Broker;
use crate::delivery::{Deliverer, Fate, Pending, Policy};
use crate::message::{DeadLetter, DlqReason, Message, now_ms};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::telemetry::Tracer;

/// How often the drainer looks at the broker while records wait and the broker is down.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// How long the drainer may handle no record while records wait and the broker is up before it
/// counts as stalled. A drain batch takes at most `broker.publish_timeout` (1.5 s by default) per
/// try; a minute without one handled record means something keeps refusing the head of the
/// spool in a way the drainer cannot get past.
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(60);

/// Tells a stuck drainer from a waiting one: stalled once records have waited with the broker
/// up for [`STALL_AFTER`] and none was handled. An empty spool or a broker that is down (the
/// spool is doing its job then) resets the clock, as does every handled record.
#[derive(Debug)]
pub(crate) struct StallWatch {
    since: tokio::time::Instant,
}

impl StallWatch {
    /// A watch whose clock starts `now`.
    pub fn new(now: tokio::time::Instant) -> Self {
        Self { since: now }
    }

    /// After a look at the spool: whether the drainer is stalled now.
    pub(crate) fn observe(
        &mut self,
        now: tokio::time::Instant,
        waiting: bool,
        broker_up: bool,
        handled: usize,
    ) -> bool {
        if !waiting || !broker_up || handled > 0 {
            self.since = now;
        }
        now.duration_since(self.since) >= STALL_AFTER
    }
}

/// What one [`Drainer::drain_once`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Events the broker acknowledged.
    pub published: usize,
    /// Records that went to the dead-letter queue (refused events, spooled dead letters).
    pub dead_lettered: usize,
    /// Records kept in the quarantine file (the dead-letter queue refused them too).
    pub quarantined: usize,
    /// The pass ended because the broker was unavailable; records remain.
    pub interrupted: bool,
}

impl RecordFate {
    /// What a record's fate means for the spool: a letter the dead-letter queue refuses for
    /// good goes to the quarantine file.
    fn of(fate: Fate) -> Self {
        match fate {
            Fate::Published => RecordFate::Published,
            Fate::DeadLettered(reason) => RecordFate::DeadLettered(reason),
            Fate::Kept { .. } => RecordFate::Unavailable,
            Fate::Unplaceable {
                letter: dl,
                refusal,
            } => {
                let dl = DeadLetter {
                    detail: format!("{}; dead-letter queue: {refusal}", dl.detail),
                    ..dl
                };
                tracing::error!(
                    subject = %dl.message.subject,
                    msg_id = %dl.message.msg_id,
                    reason = dl.reason.as_str(),
                    error = %dl.detail,
                    "the dead-letter queue refused a spooled record; keeping it in the quarantine file"
                );
                let mut frame = Vec::new();
                record::encode_into(&mut frame, now_ms(), &record::Record::DeadLetter(dl));
                RecordFate::Quarantine(frame)
            }
        }
    }
}

/// Where one record ended up.
enum RecordFate {
    Published,
    DeadLettered(DlqReason),
    /// No broker destination takes it: keep this frame aside.
    Quarantine(Vec<u8>),
    /// Try again later.
    Unavailable,
}

/// Publishes the spool's records to the broker.
pub struct Drainer {
    spool: Arc<Spool>,
    deliverer: Deliverer,
    metrics: Arc<Metrics>,
    interval: Duration,
    /// `[tracing]`: a spooled event that carries a trace context is published under a
    /// producer span of its own, a child of the one it was spooled under.
    tracer: Tracer,
}

impl Drainer {
    /// A drainer for `spool` publishing to `broker`; `interval` is how often it looks when idle.
    pub fn new(
        spool: Arc<Spool>,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
        publish_timeout: Duration,
        interval: Duration,
    ) -> Self {
        Self {
            spool,
            deliverer: Deliverer::new(broker, publish_timeout, DRAIN_BATCH),
            metrics,
            interval,
            tracer: Tracer::off(),
        }
    }

    /// Records a producer span for each spooled event that carries a trace context.
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    fn broker(&self) -> &Broker {
        self.deliverer.broker()
    }

    /// Drains until the spool is empty or the broker stops taking events.
    pub async fn drain_once(&self) -> Result<DrainReport, SpoolError> {
        let mut report = DrainReport::default();
        while !self.spool.is_empty() {
            if !self.broker().is_up() {
                report.interrupted = true;
                break;
            }
            let batch = self.spool.read_batch(DRAIN_BATCH).await?;
            if batch.is_empty() {
                break;
            }
            let outcomes = self.deliver(&batch).await;
            // The cursor moves only over an unbroken run of handled records.
            let done = outcomes
                .iter()
                .position(|o| matches!(o, RecordFate::Unavailable))
                .unwrap_or(outcomes.len());
            let mut quarantine = Vec::new();
            let mut quarantined = 0;
            // Counted here, for the records committed: one after a break is published again.
            for (item, outcome) in batch.items.iter().zip(&outcomes).take(done) {
                let message = match item {
                    Item::Record(s) => Some(s.record.message()),
                    Item::Undecodable { .. } => None,
                };
                match outcome {
                    RecordFate::Published => {
                        report.published += 1;
                        if let Some(m) = message {
                            self.metrics.published(&m.app_id, &m.event);
                        }
                    }
                    RecordFate::DeadLettered(reason) => {
                        report.dead_lettered += 1;
                        let app = message.map_or("unknown", |m| &*m.app_id);
                        self.metrics.dead_lettered(app, reason.as_str());
                    }
                    RecordFate::Quarantine(frame) => {
                        report.quarantined += 1;
                        quarantined += 1;
                        quarantine.extend_from_slice(frame);
                    }
                    RecordFate::Unavailable => {}
                }
            }
            if !quarantine.is_empty() {
                self.spool.quarantine(quarantine, quarantined).await?;
            }
            self.spool.commit(&batch, done).await?;
            if done < outcomes.len() {
                report.interrupted = true;
                break;
            }
        }
        self.spool.update_gauges();
        Ok(report)
    }

    /// Delivers one batch with the drainer's policy: its events in order (each failed since it
    /// was spooled), its dead letters to the dead-letter queue; one outcome per record, in order.
    async fn deliver(&self, batch: &Batch) -> Vec<RecordFate> {
        let policy = Policy::drain();
        let mut spooled = Vec::new();
        let mut letters = Vec::new();
        for item in &batch.items {
            if let Item::Record(s) = item {
                match &s.record {
                    record::Record::Event(m) => spooled.push((m, s.spooled_at_ms)),
                    record::Record::DeadLetter(dl) => letters.push(dl.clone()),
                }
            }
        }
        // With tracing on, the events that carry a context are published as copies carrying
        // their new producer span's (the rest, and everything with tracing off, as stored).
        let mut retraced: Vec<Message> = Vec::new();
        let mut spans = Vec::new();
        if self.tracer.is_on() && spooled.iter().any(|(m, _)| m.trace.is_some()) {
            retraced = spooled.iter().map(|(m, _)| (*m).clone()).collect();
            spans = self
                .tracer
                .republish(&mut retraced, "publish (from the spool)");
        }
        let events: Vec<Pending> = spooled
            .iter()
            .enumerate()
            .map(|(i, (m, at))| Pending {
                message: retraced.get(i).unwrap_or(m),
                failed_since_ms: Some(*at),
            })
            .collect();
        let (events, letters) = self
            .deliverer
            .events_and_dead_letters(&events, letters, policy)
            .await;
        // Only a try that settled the event is recorded: a record that stays on the spool is
        // tried again every pass, and a span per pass would crowd the webhooks' spans out of
        // the export queue.
        for (span, fate) in spans.into_iter().zip(&events) {
            if let Some(span) = span.filter(|_| fate.settled()) {
                span.end(fate.outcome());
            }
        }
        let (mut events, mut letters) = (events.into_iter(), letters.into_iter());
        batch
            .items
            .iter()
            .map(|item| match item {
                Item::Record(s) => {
                    let fate = match &s.record {
                        record::Record::Event(_) => events.next(),
                        record::Record::DeadLetter(_) => letters.next(),
                    };
                    fate.map_or(RecordFate::Unavailable, RecordFate::of)
                }
                Item::Undecodable { payload, error } => {
                    tracing::error!(%error, "spool record cannot be decoded; keeping it in the quarantine file");
                    let mut frame = Vec::new();
                    record::frame_into(&mut frame, payload);
                    RecordFate::Quarantine(frame)
                }
            })
            .collect()
    }

    /// Drains whenever records wait and the broker is up: woken by appends, every `interval`
    /// (every 100 ms while records wait), until `shutdown` fires.
    /// Tidies an idle spool (deletes the drained segment) and keeps the spool gauges fresh.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut watch = StallWatch::new(tokio::time::Instant::now());
        let mut handled = 0;
        loop {
            let stalled = watch.observe(
                tokio::time::Instant::now(),
                !self.spool.is_empty(),
                self.broker().is_up(),
                std::mem::take(&mut handled),
            );
            if stalled != self.spool.is_stalled() {
                if stalled {
                    tracing::error!(
                        waiting = self.spool.events(),
                        "the spool drainer has handled no record for {}s although the broker is up; /readyz answers 503",
                        STALL_AFTER.as_secs()
                    );
                } else {
                    tracing::info!("the spool drainer is making progress again");
                }
                self.spool.set_stalled(stalled);
            }
            if shutdown.is_triggered() {
                break;
            }
            let wait = if self.spool.is_empty() {
                self.interval
            } else {
                self.interval.min(RETRY_INTERVAL)
            };
            tokio::select! {
                () = shutdown.wait() => break,
                () = tokio::time::sleep(wait) => {},
                () = self.spool.appended() => {},
            }
            if self.spool.is_empty() {
                self.spool.roll_if_idle().await;
                self.spool.update_gauges();
                continue;
            }
            if !self.broker().is_up() {
                self.spool.update_gauges();
                continue;
            }
            let result = tokio::select! {
                () = shutdown.wait() => break,
                result = self.drain_once() => result,
            };
            match result {
                Ok(r) if r.published + r.dead_lettered + r.quarantined > 0 => {
                    handled = r.published + r.dead_lettered + r.quarantined;
                    tracing::info!(
                        published = r.published,
                        dead_lettered = r.dead_lettered,
                        quarantined = r.quarantined,
                        left = self.spool.events(),
                        "drained spooled events"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "spool drain failed; retrying");
                    // A failing spool is not retried in a tight loop, and a shutdown does not
                    // wait for the pause.
                    tokio::select! {
                        () = shutdown.wait() => break,
                        () = tokio::time::sleep(self.interval) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod stall_tests {
    use super::*;

    #[test]
    fn only_records_waiting_with_the_broker_up_and_nothing_handled_stall() {
        let t0 = tokio::time::Instant::now();
        let mut w = StallWatch::new(t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!w.observe(at(30), true, true, 0));
        assert!(
            w.observe(at(60), true, true, 0),
            "a minute without progress"
        );
        assert!(!w.observe(at(61), true, true, 5), "progress clears it");
        assert!(!w.observe(at(100), true, true, 0));
        assert!(
            !w.observe(at(130), true, false, 0),
            "broker down: the spool waits, rightly"
        );
        assert!(!w.observe(at(189), true, true, 0));
        assert!(w.observe(at(190), true, true, 0));
        assert!(
            !w.observe(at(191), false, true, 0),
            "an empty spool is not stuck"
        );
        assert!(!w.observe(at(250), false, true, 0));
    }
}

#[cfg(test)]
mod tests {
    //! The drainer against the in-memory broker ([`crate::broker::fake`]): every outcome, and
    //! a record refused for a lasting reason never blocks the ones behind it.

    use super::*;
    use crate::broker::fake::{FakeBroker, refused, timeout};
    use crate::config::SpoolSettings;
    use crate::message::{DlqReason, Message};
    use crate::spool::Record;

    fn msg(subject: &str) -> Message {
        Message {
            subject: subject.into(),
            msg_id: format!("id-{subject}"),
            body: bytes::Bytes::from_static(b"{}"),
            app_id: "1".into(),
            event: "e".into(),
            channel: subject.into(),
            time_ms: "1".into(),
            trace: None,
        }
    }

    struct Rig {
        drainer: Drainer,
        spool: Arc<Spool>,
        broker: Arc<Broker>,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        async fn new(subjects: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let settings = SpoolSettings {
                dir: dir.path().to_path_buf(),
                ..SpoolSettings::default()
            };
            let metrics = Arc::new(Metrics::new());
            let spool = Arc::new(Spool::open(&settings, 1024, metrics.clone()).await.unwrap());
            let records: Vec<Record> = subjects.iter().map(|s| Record::Event(msg(s))).collect();
            spool.append(&records).await.unwrap();
            let broker = Arc::new(Broker::Fake(Box::default()));
            let drainer = Drainer::new(
                spool.clone(),
                broker.clone(),
                metrics,
                Duration::from_millis(100),
                Duration::from_millis(10),
            );
            Self {
                drainer,
                spool,
                broker,
                _dir: dir,
            }
        }

        fn fake(&self) -> &FakeBroker {
            match &*self.broker {
                Broker::Fake(f) => f,
                _ => unreachable!("the rig uses the fake broker"),
            }
        }
    }

    #[tokio::test]
    async fn acked_records_are_published_in_order_and_leave_the_spool() {
        let rig = Rig::new(&["a", "b", "c"]).await;
        let report = rig.drainer.drain_once().await.unwrap();
        assert_eq!(report.published, 3);
        assert!(!report.interrupted);
        assert_eq!(rig.fake().published(), ["a", "b", "c"]);
        assert!(rig.spool.is_empty());
    }

    #[tokio::test]
    async fn lasting_refusals_are_dead_lettered_without_blocking_the_records_behind() {
        let rig = Rig::new(&["a", "poison", "unroutable", "nacked", "b"]).await;
        rig.fake()
            .script("poison", vec![refused(DlqReason::TooLarge)]);
        rig.fake()
            .script("unroutable", vec![refused(DlqReason::Unroutable)]);
        rig.fake()
            .script("nacked", vec![refused(DlqReason::Nacked); 10]);
        let report = rig.drainer.drain_once().await.unwrap();
        assert_eq!((report.published, report.dead_lettered), (2, 3));
        assert_eq!(rig.fake().published(), ["a", "b"]);
        assert_eq!(
            rig.fake().tries("poison"),
            1,
            "a lasting refusal is not retried"
        );
        assert_eq!(rig.fake().tries("nacked"), crate::delivery::REFUSAL_TRIES);
        let mut dead = rig.fake().dead_letters();
        dead.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            dead,
            [
                ("nacked".to_string(), DlqReason::Nacked),
                ("poison".to_string(), DlqReason::TooLarge),
                ("unroutable".to_string(), DlqReason::Unroutable),
            ]
        );
        assert!(rig.spool.is_empty());
    }

    #[tokio::test]
    async fn a_timeout_keeps_the_record_and_everything_behind_it_for_the_next_pass() {
        let rig = Rig::new(&["a", "slow", "b"]).await;
        rig.fake().script("slow", vec![timeout()]);
        let report = rig.drainer.drain_once().await.unwrap();
        assert!(report.interrupted);
        assert_eq!(report.published, 1);
        assert!(
            rig.fake().dead_letters().is_empty(),
            "transient is not lasting"
        );
        assert_eq!(rig.spool.events(), 2);
        let report = rig.drainer.drain_once().await.unwrap();
        assert_eq!(report.published, 2);
        assert_eq!(rig.fake().published(), ["a", "slow", "b"], "order kept");
        assert!(rig.spool.is_empty());
    }

    #[tokio::test]
    async fn an_unavailable_broker_is_not_drained_and_a_dlq_timeout_keeps_the_record() {
        let rig = Rig::new(&["a", "gone"]).await;
        rig.fake().set_up(false);
        let report = rig.drainer.drain_once().await.unwrap();
        assert!(report.interrupted);
        assert_eq!(rig.fake().tries("a"), 0);
        rig.fake().set_up(true);
        rig.fake()
            .script("gone", vec![refused(DlqReason::Unroutable)]);
        rig.fake().script_dead(vec![timeout()]);
        let report = rig.drainer.drain_once().await.unwrap();
        assert!(report.interrupted);
        assert_eq!((report.published, report.dead_lettered), (1, 0));
        assert_eq!(
            rig.spool.events(),
            1,
            "the refused record waits for the DLQ"
        );
    }

    #[tokio::test]
    async fn what_the_dead_letter_queue_refuses_for_good_goes_to_the_quarantine_file() {
        let rig = Rig::new(&[]).await;
        let letter = DeadLetter {
            message: msg("q"),
            reason: DlqReason::TooLarge,
            detail: "too big".into(),
            attempts: 1,
            first_failure_ms: 1,
        };
        rig.spool
            .append(&[
                Record::DeadLetter(letter),
                Record::Event(msg("gone")),
                Record::Event(msg("b")),
            ])
            .await
            .unwrap();
        rig.fake()
            .script("gone", vec![refused(DlqReason::Unroutable)]);
        // Both letters (the spooled one, the refused event's) are refused for good.
        rig.fake().script_dead(vec![
            refused(DlqReason::NoStream),
            refused(DlqReason::NoStream),
        ]);
        let report = rig.drainer.drain_once().await.unwrap();
        assert_eq!(
            report,
            DrainReport {
                published: 1,
                dead_lettered: 0,
                quarantined: 2,
                interrupted: false,
            },
            "set aside, not blocking the record behind"
        );
        assert_eq!(rig.fake().published(), ["b"]);
        assert!(rig.fake().dead_letters().is_empty());
        assert!(rig.spool.is_empty());
        let kept: Vec<(String, DlqReason, String)> = super::super::read_quarantine(rig.spool.dir())
            .unwrap()
            .into_iter()
            .map(|q| match q.record.unwrap().record {
                Record::DeadLetter(dl) => (dl.message.subject, dl.reason, dl.detail),
                Record::Event(m) => panic!("an event in the quarantine file: {}", m.subject),
            })
            .collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert_eq!(kept[0].0, "q");
        assert_eq!(kept[0].1, DlqReason::TooLarge);
        assert!(
            kept[0].2.starts_with("too big; dead-letter queue: ")
                && kept[0].2.contains("no_stream"),
            "{}",
            kept[0].2
        );
        assert_eq!(kept[1].0, "gone");
        assert_eq!(kept[1].1, DlqReason::Unroutable);
        assert!(kept[1].2.contains("; dead-letter queue: "), "{}", kept[1].2);
    }

    #[tokio::test]
    async fn spooled_dead_letters_do_not_wait_for_the_events() {
        let rig = Rig::new(&["a"]).await;
        let letter = DeadLetter {
            message: msg("q"),
            reason: DlqReason::TooLarge,
            detail: String::new(),
            attempts: 1,
            first_failure_ms: 1,
        };
        rig.spool
            .append(&[Record::DeadLetter(letter)])
            .await
            .unwrap();
        rig.fake().script("a", vec![refused(DlqReason::Nacked)]);
        let report = rig.drainer.drain_once().await.unwrap();
        assert_eq!((report.published, report.dead_lettered), (1, 1));
        assert_eq!(rig.fake().acks(), ["dlq:q", "a"]);
    }
}
