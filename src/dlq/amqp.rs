//! Dead letters on RabbitMQ: the messages of the durable queue `broker.amqp.dlq_queue` (fed by
//! `broker.amqp.dlq_exchange`), read with `basic.get` and manual acknowledgement on a connection
//! of the tool's own.
//!
//! Listing takes every letter without acknowledging it and rejects them all with requeue at the
//! end, so RabbitMQ puts them back in their places: nothing is removed or reordered, but while
//! the listing runs those letters are held by it and invisible to other readers of the queue.
//! Replay (`super::replay`) publishes each letter through the bridge's own publisher
//! ([`crate::broker::Broker`]: `broker.amqp.exchange`, the original routing key and message id,
//! the properties of a live event, `mandatory`, publisher confirms, returns attributed by
//! message id) and acknowledges the letter only after the broker confirmed the publish and did
//! not return it as unroutable. Letters that stay are held the same way until the end of the
//! run (so the same letter is not fetched again), then put back in order.

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{DeliveryTag, FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Connection};

use super::{DeadLetterRecord, DlqError, LetterStore};
use crate::broker::BoxError;
use crate::broker::amqp::endpoint;
use crate::broker::amqp::message::header;
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
    let stored_id = props.message_id().as_ref().map(ShortString::as_str);
    let header = |name: &str| header(props.headers().as_ref(), name);
    DeadLetterRecord::from_headers(position, header, stored_id, body.into())
}

/// The dead-letter queue walked with `basic.get` on a channel of the tool's own connection:
/// only the letters present when it was opened, none acknowledged unless removed.
pub(super) struct Store {
    conn: Connection,
    ch: Channel,
    queue: ShortString,
    /// Letters in the queue when it was opened.
    count: u64,
    /// Letters fetched so far (the next one's 1-based position is `fetched + 1`).
    fetched: u64,
    /// The kept letter with the highest delivery tag: at the end, one `basic.nack` with
    /// `multiple` puts it and every earlier unacknowledged letter back, without holding an
    /// acker per letter. (Letters are kept out of tag order: a blocked letter at once, a
    /// refused one after its batch.)
    last_kept: Option<(DeliveryTag, Acker)>,
}

impl Store {
    /// Connects (see [`connect`]) and opens `broker.amqp.dlq_queue` passively.
    pub(super) async fn open(settings: &Settings) -> Result<Self, DlqError> {
        let conn = connect(settings).await?;
        match open_dlq(&conn, &settings.broker.amqp.dlq_queue).await {
            Ok((ch, queue, count)) => Ok(Self {
                conn,
                ch,
                queue,
                count,
                fetched: 0,
                last_kept: None,
            }),
            Err(e) => {
                let _ = conn.close(200, "OK".into()).await;
                Err(e)
            }
        }
    }
}

impl LetterStore for Store {
    /// The delivery's tag and acker: `ack` removes the letter.
    type Handle = (DeliveryTag, Acker);
    const KIND: &'static str = "queue";

    fn count(&self) -> u64 {
        self.count
    }

    /// Letters dead-lettered after the open are not fetched: they would keep a listing going.
    async fn next(&mut self) -> Result<Option<(DeadLetterRecord, Self::Handle)>, DlqError> {
        if self.fetched >= self.count {
            return Ok(None);
        }
        let got = self
            .ch
            .basic_get(self.queue.clone(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| DlqError::op(format!("cannot fetch from {}", self.queue), e))?;
        let Some(m) = got else {
            return Ok(None);
        };
        self.fetched += 1;
        let d = m.delivery;
        let handle = (d.delivery_tag, d.acker);
        Ok(Some((record(self.fetched, &d.properties, d.data), handle)))
    }

    async fn remove(&mut self, (_, acker): Self::Handle) -> Result<(), BoxError> {
        if acker.ack(BasicAckOptions::default()).await? {
            Ok(())
        } else {
            Err("the channel refused the acknowledgement".into())
        }
    }

    /// Held unacknowledged until [`LetterStore::close`], so `basic.get` does not hand the same
    /// letter out again.
    fn keep(&mut self, (tag, acker): Self::Handle) {
        if self.last_kept.as_ref().is_none_or(|(last, _)| tag > *last) {
            self.last_kept = Some((tag, acker));
        }
    }

    /// Back in their places, in order; closing the channel would requeue them too, this says so
    /// explicitly and at once.
    async fn close(self) {
        if let Some((_, acker)) = self.last_kept {
            let requeue = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            let _ = acker.nack(requeue).await;
        }
        let _ = self.ch.close(200, "OK".into()).await;
        let _ = self.conn.close(200, "OK".into()).await;
    }
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
