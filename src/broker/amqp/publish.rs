//! One publishing channel: publisher confirms on, `mandatory` set, many publishes in flight.
//!
//! Each channel has one task (the *collector*) that owns every publish in flight on it. Callers
//! hand it a message and wait (with their timeout) for the verdict on a oneshot. The collector:
//! - starts each `basic.publish` from this one task, so the delivery tag lapin assigns and the
//!   order the frames go out cannot interleave between two publishes (lapin registers the
//!   confirm and queues the frames under two different locks);
//! - keeps every publish until its confirm arrives, also after the caller gave up (a dropped
//!   lapin confirm would hide a returned message from the others);
//! - attributes `basic.return`s by the returned message's `message_id`, not by which confirm
//!   lapin attached it to: lapin hands a return to whichever confirm completes next, and with
//!   a `multiple` ack that may be another message's. RabbitMQ sends a message's return before
//!   its ack, so once the ack batch that settled a message is fully processed, its return (if
//!   any) sits in some settled confirm. `barrier` waits for lapin's I/O thread to finish the
//!   batch in progress; a message is decided only after a barrier and a harvest that followed
//!   it;
//! - retires the channel when a nack comes before any ack (`Health`): RabbitMQ 3.10 nacks
//!   every publish of a channel that first published to a quorum queue while the queue had no
//!   known leader (right after a failover to another node), so such a channel is replaced.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ErrorKind};
use tokio::sync::{mpsc, oneshot};

use crate::broker::{DlqReason, PublishError};
use crate::shutdown::Shutdown;

/// One message ready for `basic.publish`.
pub(crate) struct Outgoing {
    /// Exchange to publish to.
    pub exchange: ShortString,
    /// Routing key (the subject).
    pub routing_key: ShortString,
    /// The `message_id` property, used to recognise the message if it is returned.
    pub msg_id: String,
    /// Body.
    pub body: Bytes,
    /// Properties (id, persistence, headers).
    pub properties: BasicProperties,
}

struct Request {
    out: Outgoing,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

/// How the broker answered one publish.
#[derive(Debug)]
enum Answer {
    Ack,
    Nack,
    Failed(lapin::Error),
}

/// A publish whose confirm (or error) has arrived.
struct Settled {
    msg_id: String,
    /// The exchange it was published to (to tell its own channel error from another's).
    exchange: String,
    /// Its body's size in bytes (the same, for a message RabbitMQ found too large).
    size: usize,
    reply: oneshot::Sender<Result<(), PublishError>>,
    answer: Answer,
    /// The returned message lapin attached to this confirm: its `message_id` and reply text.
    /// Not necessarily this message's own (see the module comment).
    carried: Option<(String, String)>,
}

/// Where the broker's verdict on one enqueued publish arrives (its confirm, or a return).
pub type PendingConfirm = oneshot::Receiver<Result<(), PublishError>>;

type InFlight = FuturesUnordered<Pin<Box<dyn Future<Output = Settled> + Send>>>;

/// What a nack before any ack on a channel of a settling session says (see [`Health`]).
const SETTLING_NACK: &str = "nacked before any ack on a fresh channel after a reconnect (a \
    quorum queue whose leader was on the lost node, not elected yet?): tried again on a new \
    channel";

/// How long after a reconnect that followed a lost connection a nack before any ack counts as
/// unavailable rather than as a refusal (unless an ack ends it sooner): a quorum queue elects
/// a new leader within seconds of losing one.
pub(crate) const SETTLE_AFTER_LOSS: Duration = Duration::from_secs(30);

/// Whether a session is still settling after a lost connection (see [`Health`]). Shared by the
/// channels of one session: the first ack on any of them ends it.
#[derive(Debug, Default)]
pub(crate) struct Settling {
    until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Settling {
    /// Settling for [`SETTLE_AFTER_LOSS`] from now (a session that follows a lost one).
    pub(crate) fn after_loss() -> Self {
        Self {
            until: std::sync::Mutex::new(Some(tokio::time::Instant::now() + SETTLE_AFTER_LOSS)),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<tokio::time::Instant>> {
        self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn active(&self) -> bool {
        self.slot()
            .is_some_and(|until| tokio::time::Instant::now() < until)
    }

    fn end(&self) {
        *self.slot() = None;
    }
}

/// What the collector learned about its channel, for deciding whether to go on publishing on
/// it.
///
/// Measured on RabbitMQ 3.10 (`tests/it/amqp_cluster.rs`): a channel whose first publish to a
/// quorum queue comes while that queue's leader is down (the bridge has just failed over from
/// the leader's node and the election is under way) keeps the dead leader and nacks every
/// later publish to that queue, for good; a channel opened after the election is acked, and
/// one that had published before keeps working. So a nack before any ack **retires** the
/// channel: no new publish goes to it and the recovery loop replaces it. While the session
/// settles after a lost connection ([`Settling`]), such a nack also counts as *unavailable*
/// rather than as a refusal, so the event is tried again (or stays in the spool) instead of
/// being dead-lettered as `nacked` during the election. Otherwise a nack is the broker's
/// answer about that message, as before.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// RabbitMQ acked a publish on this channel.
    acked: AtomicBool,
    /// No new publish goes to this channel; the recovery loop replaces it.
    retired: AtomicBool,
    /// The session's settling time.
    settling: Arc<Settling>,
}

impl Health {
    fn new(settling: Arc<Settling>) -> Self {
        Self {
            settling,
            ..Self::default()
        }
    }

    /// The verdict of one publish given the broker's `answer`, whether it came back
    /// (`returned`), and what `decide` made of them.
    fn judge(
        &self,
        answer: &Answer,
        returned: bool,
        verdict: Result<(), PublishError>,
    ) -> Result<(), PublishError> {
        match answer {
            Answer::Ack => {
                self.acked.store(true, Ordering::Relaxed);
                self.settling.end();
                verdict
            }
            Answer::Nack if !returned && !self.acked.load(Ordering::Relaxed) => {
                self.retired.store(true, Ordering::Relaxed);
                if self.settling.active() {
                    Err(PublishError::Unavailable(SETTLING_NACK.into()))
                } else {
                    verdict
                }
            }
            _ => verdict,
        }
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

/// A confirm-mode channel and its collector task. The collector ends by itself once the last
/// handle to it is gone and the publishes in flight have their confirms, or at once when the
/// session's connection ends (its `stop`): nothing aborts it half-way.
pub(crate) struct ChannelPublisher {
    channel: Channel,
    requests: mpsc::UnboundedSender<Request>,
    collector: tokio::task::JoinHandle<()>,
    health: Arc<Health>,
    /// The session's end, which also ends [`ChannelPublisher::close_later`]'s wait.
    stop: Shutdown,
}

impl ChannelPublisher {
    /// Opens a channel on `conn`, turns confirms on and starts the collector. At most
    /// `max_in_flight` publishes await their confirm on it; more are refused as unavailable
    /// (memory stays bounded even if the broker stops confirming). `settling`: the session's
    /// ([`Health`]); `stop`: the session's end.
    pub async fn open(
        conn: &Connection,
        max_in_flight: usize,
        settling: Arc<Settling>,
        stop: Shutdown,
    ) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (requests, rx) = mpsc::unbounded_channel();
        let health = Arc::new(Health::new(settling));
        let collecting = tokio::spawn(collect(
            channel.clone(),
            rx,
            max_in_flight.max(1),
            health.clone(),
            stop.clone(),
        ));
        // A collector that panicked is said here; the session sees it ended (`is_open`) and
        // replaces the channel.
        let collector = tokio::spawn(async move {
            if let Err(e) = collecting.await
                && e.is_panic()
            {
                tracing::error!(error = %e, "a RabbitMQ channel's confirm collector panicked; the channel is replaced");
            }
        });
        Ok(Self {
            channel,
            requests,
            collector,
            health,
            stop,
        })
    }

    /// Whether publishes can go out on this channel (open, and not retired after a nack).
    pub(crate) fn is_open(&self) -> bool {
        self.channel.status().connected() && !self.collector.is_finished() && !self.retired()
    }

    /// A nack before any ack retired this channel ([`Health`]): it is to be replaced.
    pub(crate) fn retired(&self) -> bool {
        self.health.retired()
    }

    /// Closes the channel of a retired publisher after `grace`, so the publishes still in
    /// flight on it get their confirms first (a channel left open would hold one of the
    /// connection's channel numbers until the connection ends).
    pub(crate) fn close_later(&self, grace: Duration) {
        let channel = self.channel.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(grace) => {}
                // The connection ends, and the channel with it.
                () = stop.wait() => return,
            }
            if channel.status().connected() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    channel.close(200, "replaced after a nack".into()),
                )
                .await;
            }
        });
    }

    /// Publishes and waits up to `timeout` for the verdict: `Ok` only after the broker's ack of
    /// this very message, with no return for it.
    pub async fn publish(&self, out: Outgoing, timeout: Duration) -> Result<(), PublishError> {
        let answer = self.enqueue(out)?;
        Self::verdict(answer, tokio::time::Instant::now() + timeout).await
    }

    /// Hands one publish to the channel's collector at once (publishes enqueued one after the
    /// other go out in that order); [`ChannelPublisher::verdict`] waits for its confirm.
    pub(crate) fn enqueue(&self, out: Outgoing) -> Result<PendingConfirm, PublishError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { out, reply })
            .map_err(|_| PublishError::Unavailable("the AMQP channel is closed".into()))?;
        Ok(answer)
    }

    /// Waits until `deadline` for the verdict of an enqueued publish.
    pub async fn verdict(
        answer: PendingConfirm,
        deadline: tokio::time::Instant,
    ) -> Result<(), PublishError> {
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => Err(PublishError::Unavailable(format!(
                "no publisher confirm within {} ms",
                timeout.as_millis()
            ))),
            Ok(Err(_)) => Err(PublishError::Unavailable(
                "the AMQP channel closed before the confirm".into(),
            )),
            Ok(Ok(result)) => result,
        }
    }
}

/// The collector task of one channel (see the module comment).
async fn collect(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<Request>,
    cap: usize,
    health: Arc<Health>,
    mut stop: Shutdown,
) {
    let mut in_flight: InFlight = FuturesUnordered::new();
    let mut returns = ReturnBook::default();
    let mut accepting = true;
    // Until every handle is gone and every publish has its confirm.
    while accepting || !in_flight.is_empty() {
        tokio::select! {
            req = rx.recv(), if accepting => match req {
                Some(req) => {
                    start(&channel, &mut in_flight, req, cap);
                    while let Ok(req) = rx.try_recv() {
                        start(&channel, &mut in_flight, req, cap);
                    }
                }
                None => accepting = false,
            },
            Some(first) = in_flight.next() => {
                settle(&channel, &mut in_flight, &mut returns, &health, first).await;
            }
            // The connection is gone: no confirm will come; the callers waiting see the
            // channel closed before it (a transient failure) when their answers are dropped.
            () = stop.wait() => break,
        }
    }
}

/// Queues one publish; the `basic.publish` itself runs when the collector polls it.
fn start(channel: &Channel, in_flight: &mut InFlight, req: Request, cap: usize) {
    if in_flight.len() >= cap {
        let _ = req.reply.send(Err(PublishError::Unavailable(
            "too many publishes awaiting confirms on the AMQP channel".into(),
        )));
        return;
    }
    let channel = channel.clone();
    in_flight.push(Box::pin(async move {
        let Request { out, reply } = req;
        let exchange = out.exchange.to_string();
        let size = out.body.len();
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let result = async {
            channel
                .basic_publish(
                    out.exchange,
                    out.routing_key,
                    options,
                    &out.body,
                    out.properties,
                )
                .await?
                .await
        }
        .await;
        let (answer, returned) = match result {
            Ok(Confirmation::Ack(r)) => (Answer::Ack, r),
            Ok(Confirmation::Nack(r)) => (Answer::Nack, r),
            // Confirms are selected before the first publish; an unconfirmed channel would be
            // a bug, and treating it as acked would claim durability nobody promised.
            Ok(Confirmation::NotRequested) => (
                Answer::Failed(
                    ErrorKind::InvalidChannelState(
                        lapin::ChannelState::Connected,
                        "publisher confirms are off",
                    )
                    .into(),
                ),
                None,
            ),
            Err(e) => (Answer::Failed(e), None),
        };
        let carried = returned.map(|m| id_and_detail(&m));
        Settled {
            msg_id: out.msg_id,
            exchange,
            size,
            reply,
            answer,
            carried,
        }
    }));
}

/// A returned message's id (the key of the [`ReturnBook`]) and the broker's reply.
fn id_and_detail(m: &BasicReturnMessage) -> (String, String) {
    let id = m.delivery.properties.message_id().as_ref();
    let id = id.map(|s| s.to_string()).unwrap_or_default();
    (id, format!("{} {}", m.reply_code, m.reply_text))
}

/// Decides `first` and everything settled with it (see the module comment for why a barrier
/// and a second harvest come before each decision).
async fn settle(
    channel: &Channel,
    in_flight: &mut InFlight,
    returns: &mut ReturnBook,
    health: &Health,
    first: Settled,
) {
    returns.note(&first);
    let mut undecided = vec![first];
    loop {
        for (id, detail) in barrier(channel) {
            returns.add(id, detail);
        }
        let fresh = harvest(in_flight).await;
        for s in &fresh {
            returns.note(s);
        }
        for s in undecided.drain(..) {
            let returned = returns.take(&s.msg_id);
            let was_returned = returned.is_some();
            let verdict = decide(&s.answer, &s.exchange, s.size, returned);
            let _ = s.reply.send(health.judge(&s.answer, was_returned, verdict));
        }
        if fresh.is_empty() {
            return;
        }
        undecided = fresh;
    }
}

/// Every publish that has settled by now (also starts newly queued ones).
async fn harvest(in_flight: &mut InFlight) -> Vec<Settled> {
    std::future::poll_fn(|cx| {
        let mut out = Vec::new();
        while let Poll::Ready(Some(s)) = in_flight.poll_next_unpin(cx) {
            out.push(s);
        }
        Poll::Ready(out)
    })
    .await
}

/// Waits until lapin's I/O thread has finished the ack / nack batch it may be processing on
/// this channel: `wait_for_confirms` takes the same lock that lapin holds while it settles a
/// batch. Only its first poll is run (the lock is held for microseconds). Returns the returned
/// messages lapin hands back there (those of dropped confirms; the collector drops none, so
/// normally none).
fn barrier(channel: &Channel) -> Vec<(String, String)> {
    let mut wait = std::pin::pin!(channel.wait_for_confirms());
    match wait.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(messages)) => messages.iter().map(id_and_detail).collect(),
        _ => Vec::new(),
    }
}

/// Returned messages seen on a channel and not yet matched to their publish, by `message_id`
/// (counted: a webhook redelivered while the first copy is in flight has the same ids).
#[derive(Default, Debug)]
struct ReturnBook {
    pending: HashMap<String, (u32, String)>,
}

impl ReturnBook {
    fn note(&mut self, s: &Settled) {
        if let Some((id, detail)) = &s.carried {
            self.add(id.clone(), detail.clone());
        }
    }

    fn add(&mut self, id: String, detail: String) {
        let entry = self.pending.entry(id).or_insert((0, detail));
        entry.0 += 1;
    }

    /// The return of `msg_id`, if one was seen; consumes it.
    fn take(&mut self, msg_id: &str) -> Option<String> {
        let (count, detail) = self.pending.get_mut(msg_id)?;
        *count -= 1;
        let detail = detail.clone();
        if *count == 0 {
            self.pending.remove(msg_id);
        }
        Some(detail)
    }
}

/// The verdict of one publish of `size` bytes to `exchange` from the broker's answer and its
/// own return (if any).
fn decide(
    answer: &Answer,
    exchange: &str,
    size: usize,
    returned: Option<String>,
) -> Result<(), PublishError> {
    match (answer, returned) {
        (Answer::Failed(e), _) => Err(classify(e, exchange, size)),
        (_, Some(detail)) => Err(PublishError::Refused {
            reason: DlqReason::Unroutable,
            detail: format!("returned by the broker: {detail}"),
        }),
        (Answer::Ack, None) => Ok(()),
        (Answer::Nack, None) => Err(PublishError::Refused {
            reason: DlqReason::Nacked,
            detail: "the broker nacked the message".into(),
        }),
    }
}

/// Maps a lapin error of a publish of `size` bytes to `exchange` to retry (unavailable) or give
/// up (refused). Channel-level errors are the broker's answer about a message (the exchange is
/// missing, access is refused, the message is too large); everything else is the connection. A
/// channel error closes the channel for every publish in flight on it, so an error that names
/// another exchange, or another message size, was caused by another publish: this one is
/// retried (on a reopened channel).
pub(crate) fn classify(e: &lapin::Error, exchange: &str, size: usize) -> PublishError {
    let detail = e.to_string();
    let ErrorKind::ProtocolError(amqp) = e.kind() else {
        return PublishError::Unavailable(detail);
    };
    let text = amqp.get_message().as_str();
    if names_other_exchange(text, exchange) || names_other_size(text, size) {
        return PublishError::Unavailable(format!(
            "the channel was closed by another publish: {detail}"
        ));
    }
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => PublishError::Refused {
            reason: DlqReason::NoStream,
            detail,
        },
        AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => PublishError::Refused {
            reason: DlqReason::TooLarge,
            detail,
        },
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            if amqp.get_message().as_str().contains("max size") =>
        {
            PublishError::Refused {
                reason: DlqReason::TooLarge,
                detail,
            }
        }
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::PRECONDITIONFAILED) => {
            PublishError::Refused {
                reason: DlqReason::Rejected,
                detail,
            }
        }
        _ => PublishError::Unavailable(detail),
    }
}

/// Whether RabbitMQ's error text (`PRECONDITION_FAILED - message size 200 is larger than
/// configured max size 100`; the size is the body's) is about a message of another size.
fn names_other_size(text: &str, size: usize) -> bool {
    let Some(at) = text.find("message size ") else {
        return false;
    };
    let digits = text[at + "message size ".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or("");
    digits.parse::<usize>().is_ok_and(|named| named != size)
}

/// Whether RabbitMQ's error text (`NOT_FOUND - no exchange 'x' in vhost '/'`) is about an
/// exchange other than `exchange`.
fn names_other_exchange(text: &str, exchange: &str) -> bool {
    let Some(at) = text.find("exchange '") else {
        return false;
    };
    let named = text[at + "exchange '".len()..]
        .split('\'')
        .next()
        .unwrap_or("");
    named != exchange
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPHardError};

    use super::*;

    fn protocol(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    fn settled(id: &str, carried: Option<&str>) -> Settled {
        Settled {
            msg_id: id.into(),
            exchange: "x".into(),
            size: 0,
            reply: oneshot::channel().0,
            answer: Answer::Ack,
            carried: carried.map(|c| (c.to_string(), "312 NO_ROUTE".to_string())),
        }
    }

    #[test]
    fn a_nack_before_any_ack_retires_the_channel_and_while_settling_is_no_refusal() {
        let nacked = || decide(&Answer::Nack, "x", 0, None);
        let is_nacked = |r: &Result<(), PublishError>| {
            matches!(
                r,
                Err(PublishError::Refused {
                    reason: DlqReason::Nacked,
                    ..
                })
            )
        };
        // After a lost connection: unavailable (tried again), and the channel is retired.
        let settling = Arc::new(Settling::after_loss());
        let fresh = Health::new(settling.clone());
        let first = fresh.judge(&Answer::Nack, false, nacked());
        assert!(
            matches!(&first, Err(PublishError::Unavailable(w)) if w.contains("new channel")),
            "{first:?}"
        );
        assert!(fresh.retired());
        // An ack on any channel of the session ends the settling: a nack is a refusal again,
        // and a channel that had an ack is not retired by one.
        let other = Health::new(settling.clone());
        assert!(other.judge(&Answer::Ack, false, Ok(())).is_ok());
        assert!(!settling.active());
        assert!(is_nacked(&other.judge(&Answer::Nack, false, nacked())));
        assert!(!other.retired());
        let third = Health::new(settling);
        assert!(is_nacked(&third.judge(&Answer::Nack, false, nacked())));
        assert!(third.retired(), "a fresh channel nacked is replaced anyway");
        // A first connection does not settle: the nack is the broker's answer.
        let first_connect = Health::default();
        assert!(is_nacked(&first_connect.judge(
            &Answer::Nack,
            false,
            nacked()
        )));
        // A returned message stays unroutable, whatever the channel's history.
        let returned = Health::new(Arc::new(Settling::after_loss()));
        let r = returned.judge(
            &Answer::Nack,
            true,
            decide(&Answer::Nack, "x", 0, Some("312 NO_ROUTE".into())),
        );
        assert!(matches!(
            r,
            Err(PublishError::Refused {
                reason: DlqReason::Unroutable,
                ..
            })
        ));
        assert!(!returned.retired());
    }

    #[tokio::test(start_paused = true)]
    async fn settling_ends_after_its_time() {
        let s = Settling::after_loss();
        assert!(s.active());
        tokio::time::advance(SETTLE_AFTER_LOSS).await;
        assert!(!s.active());
    }

    #[test]
    fn a_return_counts_for_its_own_message_whoever_carried_it() {
        let mut book = ReturnBook::default();
        // lapin attached b's return to a's confirm.
        book.note(&settled("a", Some("b")));
        book.note(&settled("b", None));
        assert_eq!(book.take("a"), None);
        assert_eq!(book.take("b").as_deref(), Some("312 NO_ROUTE"));
        assert_eq!(book.take("b"), None, "consumed once");
        assert!(book.pending.is_empty());
    }

    #[test]
    fn duplicate_ids_in_flight_are_counted() {
        let mut book = ReturnBook::default();
        book.add("x".into(), "312 NO_ROUTE".into());
        book.add("x".into(), "312 NO_ROUTE".into());
        assert!(book.take("x").is_some());
        assert!(book.take("x").is_some());
        assert!(book.take("x").is_none());
    }

    #[test]
    fn verdicts() {
        assert!(decide(&Answer::Ack, "x", 0, None).is_ok());
        match decide(&Answer::Nack, "x", 0, None) {
            Err(PublishError::Refused { reason, .. }) => assert_eq!(reason, DlqReason::Nacked),
            other => panic!("{other:?}"),
        }
        match decide(&Answer::Ack, "x", 0, Some("312 NO_ROUTE".into())) {
            Err(PublishError::Refused { reason, detail }) => {
                assert_eq!(reason, DlqReason::Unroutable);
                assert!(detail.contains("NO_ROUTE"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        let closed: lapin::Error =
            ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into();
        assert!(
            decide(&Answer::Failed(closed), "x", 0, None)
                .unwrap_err()
                .is_transient()
        );
    }

    #[test]
    fn classify_channel_errors_as_refusals_and_the_rest_as_unavailable() {
        let reason = |e: &lapin::Error| match classify(e, "x", 200) {
            PublishError::Refused { reason, .. } => Some(reason),
            PublishError::Unavailable(_) => None,
        };
        assert_eq!(
            reason(&protocol(
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no exchange 'x' in vhost '/'"
            )),
            Some(DlqReason::NoStream)
        );
        // Another publish's missing exchange closed the shared channel: retry this one.
        assert_eq!(
            reason(&protocol(
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no exchange 'pusher.dlq' in vhost '/'"
            )),
            None
        );
        assert_eq!(
            reason(&protocol(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - message size 200 is larger than configured max size 100"
            )),
            Some(DlqReason::TooLarge)
        );
        // Another, larger message closed the shared channel: this one (200 bytes) is retried.
        assert_eq!(
            reason(&protocol(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - message size 5000 is larger than configured max size 100"
            )),
            None
        );
        assert_eq!(
            reason(&protocol(
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED"
            )),
            Some(DlqReason::Rejected)
        );
        assert_eq!(
            reason(&protocol(
                AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
                "CONNECTION_FORCED - closed via management plugin"
            )),
            None
        );
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert_eq!(reason(&io), None);
    }
}
