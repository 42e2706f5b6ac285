//! The sweep of a RabbitMQ queue, on the sweeper's own connection.
//!
//! RabbitMQ cannot delete "messages older than X" by itself without a TTL fixed when the queue is
//! declared (see `docs/retention.md` for why the bridge does not rely on one), so the sweep reads
//! the queue head with `basic.get` (oldest first), acks (removes) each message older than its
//! retention (the rule of its app and event, from the `Pusher-App-Id` and `Pusher-Event`
//! headers; dead letters by app only; age from the `timestamp` property), holds
//! messages kept by a longer override unacked so it can look behind them, and stops at the first
//! message younger than every rule. Held messages go back with one `basic.nack(multiple,
//! requeue)`, which RabbitMQ puts back at their original place at the head of the queue.
//!
//! The lease is an exclusive, auto-delete queue declared on the same connection: the broker
//! grants it to one connection at a time and drops it with the connection, so a crashed holder's
//! lease ends with its TCP connection, or after the heartbeat timeout (`lease_ttl / 2` heartbeat,
//! two missed beats) if the host vanished. Sweeping on that same connection means a holder that
//! lost its lease cannot go on sweeping either.

use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use super::policy::{self, HeadAction, Retention, RuleKind, Target};
use super::{LeaseStatus, SweepError, TargetReport, broker_msg, op_err};
use crate::broker::amqp::endpoint;
use crate::broker::amqp::message::header;
use crate::broker::{BrokerError, headers, now_ms};
use crate::config::{QueueType, Settings};
use crate::message::parse_time_ms;

/// Messages looked at per queue and run at most; the rest waits for the next run.
pub(super) const GET_BUDGET: u64 = 100_000;
/// Connecting may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The connection's name in the management UI and `rabbitmqctl list_connections`.
const CONNECTION_NAME: &str = "pusher-bridge-sweeper";
/// One AMQP request (get, declare) may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// AMQP reply code 405: the exclusive queue belongs to another connection.
const RESOURCE_LOCKED: u16 = 405;

/// Why quorum queues are not swept. The head sweep holds the messages it keeps and requeues
/// them; a RabbitMQ 3.10 quorum queue puts requeued messages behind the newest ones (measured:
/// `tests/it/amqp_quorum.rs`), so a sweep would reorder the queue. Nothing is read, so nothing moves.
const QUORUM_REFUSAL: &str = "the head sweep would reorder a quorum queue (requeued messages go \
    to its tail): set retention.events.enabled / retention.dlq.enabled = false and give the \
    queues a `message-ttl` policy instead (docs/scaling.md)";

/// The exclusive queue whose owner is the sweeper (`<events queue>.sweeper-lease`).
pub(crate) fn lease_queue(settings: &Settings) -> String {
    format!("{}.sweeper-lease", settings.broker.amqp.queue)
}

async fn timed<T>(
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, SweepError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(op_err(what, e)),
        Err(_) => Err(broker_msg(format!("{what}: no answer in time"))),
    }
}

/// The AMQP backend.
pub(super) struct AmqpSweeper {
    settings: Arc<Settings>,
    /// Made at the first connect and kept: after a lost connection the next one starts at the
    /// node after the lost one (`broker.amqp.url` may list several).
    endpoint: Option<endpoint::Endpoint>,
    conn: Option<Connection>,
    /// The lease queue was declared on `conn`.
    lease: bool,
}

impl AmqpSweeper {
    /// Connects lazily: nothing happens until the first run.
    pub(super) fn new(settings: Arc<Settings>) -> Self {
        Self {
            settings,
            endpoint: None,
            conn: None,
            lease: false,
        }
    }

    fn connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.status().connected())
    }

    async fn connection(&mut self) -> Result<&Connection, SweepError> {
        if !self.connected() {
            self.lease = false;
            if self.endpoint.is_none() {
                self.endpoint = Some(endpoint(&self.settings).await?);
            }
            let conn = match &self.endpoint {
                Some(e) => e.open(CONNECT_TIMEOUT).await?,
                None => return Err(BrokerError::connect_msg("no AMQP endpoint").into()),
            };
            self.conn = Some(conn);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| BrokerError::connect_msg("no AMQP connection").into())
    }

    pub(super) async fn acquire(&mut self) -> Result<LeaseStatus, SweepError> {
        if self.lease && self.connected() {
            return Ok(LeaseStatus::Held);
        }
        let queue = lease_queue(&self.settings);
        let conn = self.connection().await?;
        let channel = timed("cannot open a channel", conn.create_channel()).await?;
        let declared = tokio::time::timeout(
            REQUEST_TIMEOUT,
            channel.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    durable: false,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        match declared {
            Ok(Ok(_)) => {
                self.lease = true;
                tracing::info!(queue = %queue, "took the sweeper lease");
                Ok(LeaseStatus::Held)
            }
            Ok(Err(e)) if locked(&e) => Ok(LeaseStatus::Elsewhere(None)),
            Ok(Err(e)) => Err(op_err("cannot declare the lease queue", e)),
            Err(_) => Err(broker_msg(
                "cannot declare the lease queue: no answer in time",
            )),
        }
    }

    pub(super) fn holds_lease(&self) -> bool {
        self.lease && self.connected()
    }

    pub(super) fn keep_lease(&self) -> Result<(), SweepError> {
        if self.holds_lease() {
            Ok(())
        } else {
            Err(SweepError::LeaseLost)
        }
    }

    /// Closes the connection: the lease queue goes with it and held messages are requeued.
    pub(super) async fn release(&mut self) {
        self.lease = false;
        if let Some(conn) = self.conn.take() {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
        }
    }

    /// Sweeps one queue. Every step runs on the lease's connection, so a sweeper whose lease
    /// ended (connection gone) cannot touch the queue any more.
    pub(super) async fn sweep(
        &mut self,
        target: Target,
        dry_run: bool,
    ) -> Result<TargetReport, SweepError> {
        let queue = match target {
            Target::Events => self.settings.broker.amqp.queue.clone(),
            Target::Dlq => self.settings.broker.amqp.dlq_queue.clone(),
        };
        if self.settings.broker.amqp.queue_type == QueueType::Quorum {
            return Err(broker_msg(QUORUM_REFUSAL));
        }
        let retention = Retention::for_target(&self.settings, target);
        let apps: std::collections::BTreeSet<String> =
            self.settings.apps.iter().map(|a| a.id.clone()).collect();
        let conn = self.connection().await?;
        let channel = timed("cannot open a channel", conn.create_channel()).await?;
        let mut report = TargetReport::new(target, format!("queue {queue}"), dry_run);
        let now = now_ms();
        report.untouched = retention
            .apps
            .iter()
            .filter(|(_, r)| !r.enabled)
            .map(|(a, _)| a.clone())
            .collect();
        // (app label, scope, retention, rule) → messages.
        type Line = (String, String, Duration, RuleKind);
        let mut purged: std::collections::BTreeMap<Line, u64> = Default::default();
        // Delivery tag of the last message held (kept, or counted in a dry run).
        let mut held: Option<u64> = None;
        let mut seen = 0u64;
        report.complete = false;
        let outcome: Result<(), SweepError> = async {
            while seen < GET_BUDGET {
                let got = timed(
                    &format!("cannot read queue {queue}"),
                    channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }),
                )
                .await?;
                let Some(msg) = got else {
                    report.complete = true;
                    return Ok(());
                };
                seen += 1;
                let d = &msg.delivery;
                let app = header(d.properties.headers().as_ref(), headers::APP_ID);
                // Dead letters have no per event rules: their event name plays no part.
                let event = match target {
                    Target::Events => header(d.properties.headers().as_ref(), headers::EVENT),
                    Target::Dlq => None,
                };
                let published_ms = d
                    .properties
                    .timestamp()
                    .map(|secs| secs.saturating_mul(1000))
                    .or_else(|| {
                        header(d.properties.headers().as_ref(), headers::TIME_MS)
                            .and_then(|v| parse_time_ms(&v))
                    });
                match policy::head_action(
                    &retention,
                    app.as_deref(),
                    event.as_deref(),
                    published_ms,
                    now,
                ) {
                    HeadAction::Purge => {
                        if dry_run {
                            held = Some(d.delivery_tag);
                        } else {
                            timed(
                                "cannot ack a purged message",
                                d.acker.ack(BasicAckOptions { multiple: false }),
                            )
                            .await?;
                        }
                        if let Some((age, rule)) =
                            retention.rule_of(app.as_deref(), event.as_deref())
                        {
                            let scope = match (target, event) {
                                (Target::Dlq, _) => "*".to_string(),
                                (Target::Events, Some(e)) => e,
                                (Target::Events, None) => "(no Pusher-Event)".to_string(),
                            };
                            let label = policy::app_label(&apps, app.as_deref());
                            *purged.entry((label, scope, age, rule)).or_default() += 1;
                        }
                    }
                    HeadAction::Keep => held = Some(d.delivery_tag),
                    HeadAction::Stop => {
                        held = Some(d.delivery_tag);
                        report.complete = true;
                        return Ok(());
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Some(tag) = held {
            // Back to the head, in their order; if this fails the channel closes and the broker
            // requeues them all the same.
            let requeue = channel.basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            );
            if let Err(e) = timed("cannot requeue kept messages", requeue).await {
                tracing::warn!(error = %e, "requeue after the sweep failed; closing the channel");
            }
        }
        let _ = channel.close(200, "sweep done".into()).await;
        outcome?;
        for ((app, scope, age, rule), n) in purged {
            report.push(&app, &scope, age, rule, n);
        }
        if report.lines.is_empty() {
            report.push(
                policy::ANY_APP,
                "*",
                retention.longest(),
                RuleKind::Longest,
                0,
            );
        }
        Ok(report)
    }
}

/// The broker refused the exclusive queue because another connection owns it.
fn locked(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == RESOURCE_LOCKED)
}

/// Where the sweeper connects: the nodes of `broker.amqp.url`, with a heartbeat of
/// `lease_ttl / 2` (unless the URL sets one), so the broker drops a vanished holder's
/// connection, and with it the lease, within about `lease_ttl`.
async fn endpoint(settings: &Settings) -> Result<endpoint::Endpoint, SweepError> {
    let half_ttl = settings.retention.lease_ttl.as_secs() / 2;
    let heartbeat = u16::try_from(half_ttl).unwrap_or(u16::MAX).max(1);
    Ok(endpoint::Endpoint::new(&settings.broker.amqp, CONNECTION_NAME, heartbeat).await?)
}
