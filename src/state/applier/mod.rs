//! Applies the state from a durable copy of the events, so that every event answered 200 is
//! applied eventually, also when the KV was unreachable at that moment:
//!
//! - NATS: on NATS 2.10 and later one durable pull consumer `<durable>` on the events stream,
//!   filtered to `<prefix>.*.<event>.>` for each state event; NATS 2.9 filters a consumer by one
//!   subject, so there it is one consumer per state event, `<durable>_<event>`. Moving to 2.10,
//!   the one consumer starts where the per-event ones had all acked, and they are retired.
//!   Every replica pulls from the same consumers; a message is acked only after its KV write (or
//!   when the write was not needed), else it is redelivered after a pause.
//! - AMQP: a durable queue `<broker.amqp.queue>.<durable>` bound to the events exchange for the
//!   same events, consumed with manual acks on the same terms.
//!
//! Order does not matter: the merge is order-safe and writes are compare-and-set
//! ([`super::store`]), so any number of replicas may apply at once.

pub mod amqp;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use serde::Deserialize;

use super::StateError;
use super::merge::{Change, Stamp, Update};
use super::store::{Applied, StateStore};
use crate::backoff::{self, Backoff, RAN_A_WHILE};
use crate::broker::nats::ServerVersion;
use crate::message::now_ms;
use crate::metrics::{Metrics, StateOutcome};
use crate::routing;
use crate::shutdown::Shutdown;

/// The events the state is made of.
pub(crate) const STATE_EVENTS: [&str; 5] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "subscription_count",
];

/// Messages applied at once per replica (the KV round trips overlap; on a replicated bucket
/// each write also waits for its read-back, see `store`, so the room is generous).
const CONCURRENCY: usize = 256;
/// A message whose KV write failed comes back after this pause (jittered: the messages that
/// failed together when the KV went away do not all come back at the same moment).
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// The pauses before a source's consumer is set up again after it ended or failed: 1 s
/// doubling to 2 s, jittered, so that the replicas that lost the same server do not all come
/// back at the same moment. A consumer ends when its server or connection goes, which the
/// client's own reconnect (or the RabbitMQ node list) mends within seconds; the low cap takes
/// the events up again soon after.
const RECONNECT: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(2));

/// Why a message cannot become a state update (it is dropped: retrying cannot help).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not the JSON object of an event.
    #[error("not an event object: {0}")]
    Json(#[source] serde_json::Error),
    /// A field the state needs is missing or has the wrong type.
    #[error("{0}")]
    Field(&'static str),
}

#[derive(Deserialize)]
struct EventBody {
    name: Option<String>,
    channel: Option<String>,
    user_id: Option<serde_json::Value>,
    subscription_count: Option<serde_json::Value>,
    app_id: Option<String>,
    time_ms: Option<serde_json::Value>,
}

fn as_i64(v: &serde_json::Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))
}

/// Turns a published event (body and message id `<digest>-<index>`) into a state update;
/// `Ok(None)` for events the state does not keep.
pub fn decode(body: &[u8], message_id: Option<&str>) -> Result<Option<Update>, DecodeError> {
    let e: EventBody = serde_json::from_slice(body).map_err(DecodeError::Json)?;
    let Some(name) = e.name.as_deref() else {
        return Err(DecodeError::Field("no event name"));
    };
    if !STATE_EVENTS.contains(&name) {
        return Ok(None);
    }
    let channel = e.channel.ok_or(DecodeError::Field("no channel"))?;
    let app_id = e.app_id.ok_or(DecodeError::Field("no app_id"))?;
    let time_ms = e
        .time_ms
        .as_ref()
        .and_then(as_i64)
        .ok_or(DecodeError::Field("no numeric time_ms"))?;
    let user = || match &e.user_id {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        // Some senders send numbers; the id is the same text either way.
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        _ => Err(DecodeError::Field("no user_id")),
    };
    let change = match name {
        "channel_occupied" => Change::Occupied(true),
        "channel_vacated" => Change::Occupied(false),
        "member_added" => Change::Member {
            user_id: user()?,
            present: true,
        },
        "member_removed" => Change::Member {
            user_id: user()?,
            present: false,
        },
        _ => {
            let count = match &e.subscription_count {
                Some(serde_json::Value::Number(n)) => n.as_u64(),
                Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
                _ => None,
            };
            Change::SubscriptionCount(
                count.ok_or(DecodeError::Field("subscription_count is not a count"))?,
            )
        }
    };
    let (webhook, index) = message_id
        .and_then(|id| id.rsplit_once('-'))
        .and_then(|(digest, index)| Some((digest.to_string(), index.parse().ok()?)))
        .unwrap_or_default();
    Ok(Some(Update {
        app_id,
        channel,
        change,
        stamp: Stamp {
            time_ms,
            index,
            webhook,
        },
    }))
}

/// What to do with the message an update came from.
#[derive(Debug, PartialEq, Eq)]
pub enum Settle {
    /// Done (written, stale, or not a state event): ack.
    Ack,
    /// The KV write failed: redeliver later.
    Retry,
    /// Can never be applied: drop (and count as failed).
    Drop,
}

/// Decodes and applies one message, counting the outcome.
pub(crate) async fn apply_message(
    store: &StateStore,
    metrics: &Metrics,
    body: &[u8],
    message_id: Option<&str>,
) -> Settle {
    let update = match decode(body, message_id) {
        Ok(Some(u)) => u,
        Ok(None) => return Settle::Ack,
        Err(e) => {
            tracing::warn!(error = %e, message_id, "state: dropping an event it cannot read");
            metrics.state_update(StateOutcome::Failed);
            return Settle::Drop;
        }
    };
    match store.apply(&update).await {
        Ok(applied) => {
            metrics.state_update(match applied {
                Applied::Written => StateOutcome::Applied,
                Applied::Stale => StateOutcome::Stale,
            });
            let lag_ms = i64::try_from(now_ms()).unwrap_or(i64::MAX) - update.stamp.time_ms;
            metrics.state_lag.set(lag_ms.max(0) as f64 / 1000.0);
            Settle::Ack
        }
        Err(e) => {
            tracing::warn!(error = %e, app_id = %update.app_id, channel = %update.channel, "state: update failed, will retry");
            metrics.state_update(StateOutcome::Failed);
            Settle::Retry
        }
    }
}

/// Name of the durable consumer of one event (NATS 2.9).
pub(crate) fn consumer_name(durable: &str, event: &str) -> String {
    format!("{durable}_{event}")
}

/// The subject filter of one state event.
fn event_filter(prefix: &str, event: &str) -> String {
    format!("{prefix}.*.{}.>", routing::escape_token(event))
}

/// A state consumer's config: explicit acks, a message comes back 30 s after a lost ack.
fn consumer_config(name: &str, deliver_policy: consumer::DeliverPolicy) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_string()),
        description: Some("pusher-bridge channel state".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 4096,
        deliver_policy,
        ..Default::default()
    }
}

fn consumer_err(what: &'static str) -> impl FnOnce(async_nats::Error) -> StateError {
    move |source| StateError::Kv { what, source }
}

/// Creates (or finds) the durable consumers on the events stream: one filtered by every state
/// event where the server has multi-filter consumers, else one per event.
async fn nats_consumers(
    js: &jetstream::Context,
    stream: &str,
    prefix: &str,
    durable: &str,
) -> Result<Vec<consumer::PullConsumer>, StateError> {
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| consumer_err("cannot find the events stream")(e.into()))?;
    // Never guess: an unknown version would make per-event consumers on a 2.10+ server (and,
    // once the retired ones are gone, replay the stream from its start).
    let Some(version) = ServerVersion::of_connected(&js.client()).await else {
        return Err(StateError::Kv {
            what: "the events' NATS server's version is not known yet",
            source: "no INFO from the server yet".into(),
        });
    };
    if version.has(ServerVersion::MULTI_FILTER) {
        return Ok(vec![multi_filter_consumer(&stream, prefix, durable).await?]);
    }
    let mut out = Vec::with_capacity(STATE_EVENTS.len());
    for event in STATE_EVENTS {
        let name = consumer_name(durable, event);
        let config = consumer::pull::Config {
            filter_subject: event_filter(prefix, event),
            ..consumer_config(&name, consumer::DeliverPolicy::All)
        };
        let c = stream
            .get_or_create_consumer(&name, config)
            .await
            .map_err(|e| consumer_err("cannot create the state consumer")(e.into()))?;
        out.push(c);
    }
    Ok(out)
}

/// How long a per-event consumer of an older version lives on without a pull once the bridge
/// has moved to the multi-filter consumer: replicas of the older version that still run (a
/// rolling upgrade) keep using it; when the last is gone, the server deletes it.
const RETIRED_CONSUMER_TTL: Duration = Duration::from_secs(3600);

/// The one consumer of every state event (NATS 2.10+). Where the per-event consumers of an
/// earlier version (or an older server) exist, it starts at the first event some of them had
/// not yet acked, so no event is skipped and only a few that were applied already are applied
/// again (the merge makes that harmless): replaying the whole stream could revive members whose
/// tombstones were swept since. The per-event consumers are not deleted, which would make a
/// replica of the older version still running recreate them from the stream's start; they get
/// an inactivity threshold ([`RETIRED_CONSUMER_TTL`]) instead.
async fn multi_filter_consumer(
    stream: &jetstream::stream::Stream,
    prefix: &str,
    durable: &str,
) -> Result<consumer::PullConsumer, StateError> {
    let deliver_policy = match stream.consumer_info(durable).await {
        // Made already (by this replica before a reconnect, or by another): as it is.
        Ok(_) => consumer::DeliverPolicy::All,
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            handover_start(stream, durable).await?
        }
        // Not knowing would start the consumer at the wrong place: ask again later.
        Err(e) => return Err(consumer_err("cannot read the state consumer")(e.into())),
    };
    let config = consumer::pull::Config {
        filter_subjects: STATE_EVENTS
            .iter()
            .map(|e| event_filter(prefix, e))
            .collect(),
        ..consumer_config(durable, deliver_policy)
    };
    let c = stream
        .get_or_create_consumer(durable, config)
        .await
        .map_err(|e| consumer_err("cannot create the state consumer")(e.into()))?;
    for event in STATE_EVENTS {
        let name = consumer_name(durable, event);
        let Ok(info) = stream.consumer_info(&name).await else {
            continue;
        };
        if info.config.inactive_threshold == RETIRED_CONSUMER_TTL {
            continue;
        }
        let mut retired = info.config.clone();
        retired.inactive_threshold = RETIRED_CONSUMER_TTL;
        match stream.update_consumer(retired).await {
            Ok(_) => {
                tracing::info!(consumer = %name, "state: per-event consumer retired for the multi-filter consumer {durable}; the server deletes it after {RETIRED_CONSUMER_TTL:?} without a pull")
            }
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "state: cannot retire a per-event consumer")
            }
        }
    }
    Ok(c)
}

/// Where the multi-filter consumer starts: `All` on a fresh deployment, else the lowest stream
/// sequence of an event some per-event consumer had not acked (its first matching message past
/// what it acked, or past what it delivered when nothing waits for an ack). The stream's last
/// sequence is read first: whatever comes after it is delivered whatever the consumers said.
async fn handover_start(
    stream: &jetstream::stream::Stream,
    durable: &str,
) -> Result<consumer::DeliverPolicy, StateError> {
    let last = stream
        .get_info()
        .await
        .map_err(|e| consumer_err("cannot read the events stream")(e.into()))?
        .state
        .last_sequence;
    let mut start: Option<u64> = None;
    for event in STATE_EVENTS {
        // Only a consumer the server says is not there is skipped: any other error could
        // hide the one furthest behind, and the handover would skip its events.
        let info = match stream.consumer_info(consumer_name(durable, event)).await {
            Ok(info) => info,
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => continue,
            Err(e) => {
                return Err(consumer_err("cannot read a per-event state consumer")(
                    e.into(),
                ));
            }
        };
        let done = if info.num_ack_pending == 0 {
            info.ack_floor
                .stream_sequence
                .max(info.delivered.stream_sequence)
        } else {
            info.ack_floor.stream_sequence
        };
        let first_open = match stream
            .get_first_raw_message_by_subject(&info.config.filter_subject, done + 1)
            .await
        {
            Ok(m) => m.sequence.min(last + 1),
            // None left: everything it takes from here on is new.
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => last + 1,
            Err(e) => return Err(consumer_err("cannot read the events stream")(e.into())),
        };
        start = Some(start.map_or(first_open, |s| s.min(first_open)));
    }
    Ok(match start {
        Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
        None => consumer::DeliverPolicy::All,
    })
}

/// How long, at shutdown, the applier hands back messages it had pulled but not started to
/// apply (all of them together: the pull stream keeps delivering, so it is a bound, not a
/// drain).
const HAND_BACK: Duration = Duration::from_millis(200);
/// A handed-back message is redelivered after this pause, to whichever replica pulls then,
/// rather than straight back to this one's open pull requests.
const HANDED_BACK_DELAY: Duration = Duration::from_secs(1);

/// Pulls from the durable consumers and applies until a consumer's stream ends or `shutdown`.
/// At shutdown it takes no new message, lets the applies in flight finish (and ack), and naks
/// what it had pulled but not started (for up to [`HAND_BACK`]), so the next start (this
/// replica's or another's) gets those a second later instead of after `ack_wait`.
async fn consume_nats_once(
    js: &jetstream::Context,
    settings: &crate::config::Settings,
    store: &StateStore,
    metrics: &Metrics,
    mut shutdown: Shutdown,
) -> Result<(), StateError> {
    let consumers = tokio::select! {
        () = shutdown.wait() => return Ok(()),
        c = nats_consumers(
            js,
            &settings.broker.nats.stream,
            &settings.broker.subject_prefix,
            &settings.state.durable,
        ) => c?,
    };
    let mut streams = Vec::with_capacity(consumers.len());
    for c in &consumers {
        streams.push(c.messages().await.map_err(|e| StateError::Kv {
            what: "cannot pull from the state consumer",
            source: Box::new(e),
        })?);
    }
    let mut pulled = futures::stream::select_all(streams);
    let mut stop = shutdown.clone();
    pulled
        .by_ref()
        .take_until(async move { stop.wait().await })
        .for_each_concurrent(CONCURRENCY, |msg| async move {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    // Missed heartbeats while NATS is away and the like: the stream goes on.
                    tracing::debug!(error = %e, "state consumer");
                    return;
                }
            };
            let id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string());
            let kind = match apply_message(store, metrics, &msg.payload, id.as_deref()).await {
                Settle::Ack => AckKind::Ack,
                Settle::Retry => AckKind::Nak(Some(backoff::jitter(RETRY_PAUSE))),
                Settle::Drop => AckKind::Term,
            };
            if let Err(e) = msg.ack_with(kind).await {
                // Redelivered after ack_wait; applying it again changes nothing.
                tracing::debug!(error = %e, "state: ack failed");
            }
        })
        .await;
    let until = tokio::time::Instant::now() + HAND_BACK;
    while let Ok(Some(next)) = tokio::time::timeout_at(until, pulled.next()).await {
        if let Ok(msg) = next {
            let _ = msg.ack_with(AckKind::Nak(Some(HANDED_BACK_DELAY))).await;
        }
    }
    Ok(())
}

/// The NATS applier: until `shutdown`, (re)creates the consumers and applies what they deliver.
pub(crate) async fn run_nats(
    settings: Arc<crate::config::Settings>,
    events: async_nats::Client,
    store: StateStore,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let js = jetstream::new(events);
    keep_consuming(shutdown, |stop| {
        consume_nats_once(&js, &settings, &store, &metrics, stop)
    })
    .await;
}

/// The reconnect loop of both sources: runs `consume` (which returns at `shutdown`, or when
/// its connection or consumer ends or fails) again after a pause of [`RECONNECT`], until
/// `shutdown`.
pub(super) async fn keep_consuming<F, Fut>(mut shutdown: Shutdown, consume: F)
where
    F: Fn(Shutdown) -> Fut,
    Fut: Future<Output = Result<(), StateError>>,
{
    let mut ends: u32 = 0;
    loop {
        let started = tokio::time::Instant::now();
        let result = consume(shutdown.clone()).await;
        if shutdown.is_triggered() {
            return;
        }
        if started.elapsed() >= RAN_A_WHILE {
            ends = 0;
        }
        ends = ends.saturating_add(1);
        let pause = RECONNECT.delay(ends);
        if let Err(e) = result {
            tracing::warn!(error = %e, "state applier: retrying in {pause:.1?}");
        }
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
