//! Dead letters on RabbitMQ: the messages of the durable queue `broker.amqp.dlq_queue` (fed by
//! `broker.amqp.dlq_exchange`), read with `basic.get` and manual acknowledgement on a connection
//! of the tool's own.
//!
//! Listing takes every letter without acknowledging it and closes the channel at the end, so
//! RabbitMQ puts them all back in their places: nothing is removed or reordered, but while the
//! listing runs those letters are held by it and invisible to other readers of the queue.
//! Replay publishes each letter through the bridge's own publisher ([`crate::broker::Broker`]:
//! `broker.amqp.exchange`, the original routing key and message id, the properties of a live
//! event, `mandatory`, publisher confirms, returns attributed by message id) and acknowledges
//! the letter only after the broker confirmed the publish and did not return it as unroutable.
//! Letters that stay are held until the end of the run (so the same letter is not fetched again)
//! and then rejected with requeue, which puts them back in order.

use std::time::Duration;

use indicatif::ProgressBar;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Connection};
use tokio::sync::mpsc;

use super::{DeadLetterRecord, DlqError, REPLAY_WINDOW, ReplaySummary};
use crate::broker::Broker;
use crate::broker::amqp::endpoint;
use crate::broker::amqp::message::header_text;
use crate::config::Settings;

/// How long the tools wait for the connection to RabbitMQ before giving up.
pub(crate) const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// The connection's name in the management UI and `rabbitmqctl list_connections`.
const CONNECTION_NAME: &str = "pusher-bridge dlq";

/// Opens the tool's own connection from `[broker.amqp]` (URL with vhost, heartbeat,
/// `tls_ca_file` for a private CA on `amqps://`), as the bridge opens its own.
pub async fn connect(settings: &Settings) -> Result<Connection, DlqError> {
    Ok(endpoint::connect(
        &settings.broker.amqp,
        CONNECTION_NAME,
        endpoint::DEFAULT_HEARTBEAT_SECS,
        CONNECT_WAIT,
    )
    .await?)
}

/// Builds the record of one fetched letter at queue `position`.
pub fn record(position: u64, props: &BasicProperties, body: Vec<u8>) -> DeadLetterRecord {
    let table = props.headers().as_ref();
    let header = |name: &str| {
        table?
            .inner()
            .iter()
            .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))
            .and_then(|(_, v)| header_text(v))
    };
    let stored_id = props.message_id().as_ref().map(ShortString::as_str);
    DeadLetterRecord::from_headers(position, header, stored_id, body.into())
}

/// Opens a channel and returns it with the queue's name and its number of letters.
async fn open_dlq(conn: &Connection, queue: &str) -> Result<(Channel, ShortString, u64), DlqError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| DlqError::op("cannot open a channel", e))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let name = ShortString::try_new(queue)
        .map_err(|e| DlqError::op(format!("queue name {queue}"), e.to_string()))?;
    match ch
        .queue_declare(name.clone(), passive, FieldTable::default())
        .await
    {
        Ok(q) => Ok((ch, name, u64::from(q.message_count()))),
        Err(e) => Err(match e.kind() {
            lapin::ErrorKind::ProtocolError(p)
                if p.kind() == &AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) =>
            {
                DlqError::Missing {
                    kind: "queue",
                    name: queue.to_string(),
                }
            }
            _ => DlqError::op(format!("cannot inspect queue {queue}"), e),
        }),
    }
}

/// Fetches the next letter without acknowledging it.
async fn get(
    ch: &Channel,
    queue: &ShortString,
    position: u64,
) -> Result<Option<(DeadLetterRecord, Acker)>, DlqError> {
    let got = ch
        .basic_get(queue.clone(), BasicGetOptions { no_ack: false })
        .await
        .map_err(|e| DlqError::op(format!("cannot fetch from {queue}"), e))?;
    Ok(got.map(|m| {
        let d = m.delivery;
        (record(position, &d.properties, d.data), d.acker)
    }))
}

/// Closes channels and the connection; the broker requeues whatever is still unacknowledged.
async fn close(conn: &Connection, channels: &[&Channel]) {
    for ch in channels {
        let _ = ch.close(200, "OK".into()).await;
    }
    let _ = conn.close(200, "OK".into()).await;
}

/// See [`super::list`].
pub async fn list(
    settings: &Settings,
    tx: mpsc::Sender<DeadLetterRecord>,
) -> Result<u64, DlqError> {
    let queue = settings.broker.amqp.dlq_queue.as_str();
    let conn = connect(settings).await?;
    let (ch, queue, count) = match open_dlq(&conn, queue).await {
        Ok(x) => x,
        Err(e) => {
            close(&conn, &[]).await;
            return Err(e);
        }
    };
    let mut n = 0;
    let result = async {
        // Only the letters present at the start: new ones would otherwise keep the listing going.
        while n < count {
            let Some((r, _acker)) = get(&ch, &queue, n + 1).await? else {
                break;
            };
            if tx.send(r).await.is_err() {
                break;
            }
            n += 1;
        }
        Ok(n)
    }
    .await;
    // Closing the channel returns every fetched letter to its place in the queue.
    close(&conn, &[&ch]).await;
    result
}

/// See [`super::replay`]: letters fetched here, published by `publisher` (the bridge's own).
pub async fn replay(
    settings: &Settings,
    publisher: &Broker,
    progress: &ProgressBar,
) -> Result<ReplaySummary, DlqError> {
    let a = &settings.broker.amqp;
    let conn = connect(settings).await?;
    let (get_ch, dlq_queue, count) = match open_dlq(&conn, &a.dlq_queue).await {
        Ok(x) => x,
        Err(e) => {
            close(&conn, &[]).await;
            return Err(e);
        }
    };
    progress.set_length(count);
    let timeout = settings.broker.publish_timeout;
    let mut summary = ReplaySummary {
        total: count,
        ..Default::default()
    };
    // Letters that stay, unacknowledged until the end so `basic.get` does not hand them out again.
    let mut held: Vec<Acker> = Vec::new();
    // Up to a window of letters published in their order on one channel, confirms awaited
    // together, then settled in order: the events queue gets them in the DLQ's order.
    let mut batch: Vec<(DeadLetterRecord, Acker)> = Vec::with_capacity(REPLAY_WINDOW);
    let mut position = 0;
    loop {
        let next = if position < count {
            get(&get_ch, &dlq_queue, position + 1)
                .await
                .unwrap_or_else(|e| {
                    summary.stopped = Some(e.to_string());
                    None
                })
        } else {
            None
        };
        let done = next.is_none();
        if let Some((r, acker)) = next {
            position += 1;
            summary.seen += 1;
            match r.replay_blocker() {
                Some(why) => {
                    summary.leave(&r, why);
                    held.push(acker);
                    progress.inc(1);
                }
                None => batch.push((r, acker)),
            }
        }
        if done || batch.len() >= REPLAY_WINDOW {
            let results = super::republish(publisher, batch.iter().map(|(r, _)| r), timeout).await;
            for ((r, acker), result) in batch.drain(..).zip(results) {
                settle(r, acker, result, &mut held, &mut summary).await;
                progress.inc(1);
            }
        }
        if done {
            break;
        }
    }
    // Back in their places, in order.
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    for acker in held {
        let _ = acker.nack(requeue).await;
    }
    close(&conn, &[&get_ch]).await;
    progress.finish_and_clear();
    Ok(summary)
}

/// After the confirm: acknowledges (removes) the letter; after a failure: holds it.
async fn settle(
    r: DeadLetterRecord,
    acker: Acker,
    result: Result<(), String>,
    held: &mut Vec<Acker>,
    summary: &mut ReplaySummary,
) {
    match result {
        Err(e) => {
            summary.leave(&r, format!("refused again: {e}"));
            held.push(acker);
        }
        Ok(()) => match acker.ack(BasicAckOptions::default()).await {
            Ok(_) => summary.replayed += 1,
            Err(e) => summary.leave(
                &r,
                format!("published, but could not be removed from the dead-letter queue: {e}"),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, LongString};

    use super::*;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes()))
    }

    #[test]
    fn amqp_headers_land_in_the_record() {
        let props = BasicProperties::default()
            .with_message_id("dlq-abc-2".into())
            .with_headers(table(&[
                ("Pusher-App-Id", long("42")),
                ("Pusher-Bridge-Subject", long("p.42.e.c")),
                ("Pusher-Bridge-Reason", long("unroutable")),
                ("Pusher-Bridge-Attempts", AMQPValue::LongInt(2)),
                ("Pusher-Bridge-First-Failure-Ms", long("1700000000123")),
                (
                    "Pusher-Bridge-Detail",
                    AMQPValue::ShortString("NO_ROUTE".into()),
                ),
            ]));
        let r = record(3, &props, b"{}".to_vec());
        assert_eq!(r.position, 3);
        assert_eq!(r.app_id, "42");
        assert_eq!(r.subject, "p.42.e.c");
        assert_eq!(r.reason, "unroutable");
        assert_eq!(r.attempts, 2);
        assert_eq!(r.first_failure_ms, 1_700_000_000_123);
        assert_eq!(r.detail, "NO_ROUTE");
        assert_eq!(r.msg_id, "abc-2", "falls back to the stored message id");
        assert_eq!(&r.body[..], b"{}");
    }

    #[test]
    fn no_headers_gives_an_unreplayable_record() {
        let r = record(1, &BasicProperties::default(), Vec::new());
        assert!(r.replay_blocker().is_some());
    }
}
