//! What the bridge says about its broker connection: a warning naming the broker and its
//! address (password redacted) when it cannot connect and when the connection is lost, at
//! most one every [`WARN_EVERY`] so an outage or a flapping link does not flood the log, and
//! one line when the connection is back (with how long it was away). It also counts
//! `pusher_bridge_broker_reconnects_total`.
//!
//! Both brokers call it from the points where they learn about their connection: the NATS
//! client's event callback, the RabbitMQ recovery loop and connection watcher.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Shortest time between two warnings about one broker connection.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(30);

/// The connection log of one broker.
pub(crate) struct ConnectionLog {
    /// `NATS` or `RabbitMQ`, for the message.
    broker: &'static str,
    /// `nats` or `amqp`, the metric label.
    label: &'static str,
    /// Where it connects, with any password replaced by `***`: the configured address, or for
    /// a broker that picks one of several (RabbitMQ's node list) the one it is on.
    address: Mutex<String>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

struct State {
    up: bool,
    /// Connected at least once: a later connect is a reconnect.
    ever_up: bool,
    /// Since when the connection is down (start-up, or the loss).
    down_since: Instant,
    /// Failed connection attempts since `down_since`.
    failures: u64,
    /// Last "lost the connection" warning.
    last_lost: Option<Instant>,
    /// Last "cannot connect" warning.
    last_failed: Option<Instant>,
    /// A warning was logged about the current outage (so its end is worth a line too).
    warned: bool,
    /// Warnings left out since the last line.
    suppressed: u64,
}

/// Whether `last` is at least [`WARN_EVERY`] ago (or never).
fn due(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
}

impl ConnectionLog {
    /// The log of `broker` (`"NATS"`, label `nats`) at `redacted_address`; the caller redacts.
    pub fn new(
        broker: &'static str,
        label: &'static str,
        redacted_address: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            broker,
            label,
            address: Mutex::new(redacted_address),
            metrics,
            state: Mutex::new(State {
                up: false,
                ever_up: false,
                down_since: Instant::now(),
                failures: 0,
                last_lost: None,
                last_failed: None,
                warned: false,
                suppressed: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where it connects now (password replaced).
    fn address(&self) -> String {
        self.address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The lines from now on name `redacted_address` (the caller redacts): a broker with
    /// several nodes names the node it reached, so a later "lost" names that node.
    pub(crate) fn set_address(&self, redacted_address: String) {
        *self.address.lock().unwrap_or_else(|e| e.into_inner()) = redacted_address;
    }

    /// A connection attempt failed with `error`.
    pub(crate) fn connect_failed(&self, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut s = self.state();
        if s.up {
            // Not an attempt: the client reports the loss itself as a disconnect.
            return;
        }
        s.failures += 1;
        // Right after a "lost" warning, the failed attempts of that outage add nothing.
        if !(due(s.last_failed, now) && due(s.last_lost, now)) {
            s.suppressed += 1;
            return;
        }
        s.last_failed = Some(now);
        s.warned = true;
        let suppressed = std::mem::take(&mut s.suppressed);
        let down_for = now.duration_since(s.down_since);
        let (failures, ever_up) = (s.failures, s.ever_up);
        drop(s);
        let address = self.address();
        tracing::warn!(
            broker = self.label,
            address = %address,
            error = %error,
            failed_attempts = failures,
            down_for_s = down_for.as_secs(),
            suppressed,
            "cannot connect to {} at {}{}; retrying",
            self.broker,
            address,
            if ever_up { " (connection lost)" } else { "" },
        );
    }

    /// The connection was lost (`error` when the client told why). Repeated reports of the same
    /// loss are ignored.
    pub(crate) fn disconnected(&self, error: Option<&dyn std::fmt::Display>) {
        let now = Instant::now();
        let mut s = self.state();
        if !s.up {
            return;
        }
        s.up = false;
        s.down_since = now;
        s.failures = 0;
        s.warned = false;
        if !due(s.last_lost, now) {
            s.suppressed += 1;
            return;
        }
        s.last_lost = Some(now);
        s.warned = true;
        let suppressed = std::mem::take(&mut s.suppressed);
        drop(s);
        let error = error.map(|e| e.to_string()).unwrap_or_default();
        let address = self.address();
        tracing::warn!(
            broker = self.label,
            address = %address,
            error = %error,
            suppressed,
            "lost the connection to {} at {}; reconnecting (webhooks' events go to the spool meanwhile)",
            self.broker,
            address,
        );
    }

    /// The connection is up: after a loss counts a reconnect, and after an outage that was
    /// warned about logs that it is back; otherwise (a clean first connect, or the end of an
    /// outage whose warning was rate-limited away) only at debug (each broker logs its own
    /// start-up line).
    pub fn connected(&self) {
        let now = Instant::now();
        let mut s = self.state();
        if s.up {
            return;
        }
        s.up = true;
        let reconnect = s.ever_up;
        s.ever_up = true;
        let down_for = now.duration_since(s.down_since);
        let failures = std::mem::take(&mut s.failures);
        let warned = std::mem::take(&mut s.warned);
        let suppressed = if warned {
            std::mem::take(&mut s.suppressed)
        } else {
            s.suppressed
        };
        drop(s);
        if reconnect {
            self.metrics.broker_reconnected(self.label);
        }
        let address = self.address();
        if warned {
            tracing::info!(
                broker = self.label,
                address = %address,
                down_for_ms = down_for.as_millis() as u64,
                failed_attempts = failures,
                suppressed,
                "connection to {} at {} is back after {}",
                self.broker,
                address,
                humantime::format_duration(Duration::from_millis(down_for.as_millis() as u64)),
            );
        } else {
            tracing::debug!(broker = self.label, address = %address, "connected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconnects(m: &Metrics, label: &str) -> bool {
        m.encode().contains(&format!(
            "pusher_bridge_broker_reconnects_total{{broker=\"{label}\"}} 1"
        ))
    }

    #[test]
    fn warnings_are_rate_limited_and_reconnects_counted() {
        let metrics = Arc::new(Metrics::new());
        let log = ConnectionLog::new(
            "NATS",
            "nats",
            "nats://u:***@h:4222".into(),
            metrics.clone(),
        );
        log.connect_failed(&"refused");
        log.connect_failed(&"refused");
        {
            let s = log.state();
            assert_eq!(s.failures, 2);
            assert_eq!(
                s.suppressed, 1,
                "the second warning within WARN_EVERY is left out"
            );
        }
        log.connected();
        assert!(
            !reconnects(&metrics, "nats"),
            "a first connect is no reconnect"
        );
        assert_eq!(
            log.state().suppressed,
            0,
            "reported with the line saying it is back"
        );
        // A loss is warned about even right after a failed-connect warning...
        log.disconnected(None);
        log.disconnected(Some(&"again"));
        assert!(log.state().warned && log.state().last_lost.is_some());
        // ...but the failed attempts of that outage are not.
        log.connect_failed(&"refused");
        assert_eq!(log.state().suppressed, 1);
        log.connected();
        assert!(reconnects(&metrics, "nats"));
        // Flapping: the next loss within WARN_EVERY is left out, and so is its end.
        log.disconnected(None);
        assert!(!log.state().warned);
        log.connected();
        let s = log.state();
        assert!(s.up && s.ever_up && s.failures == 0);
        assert_eq!(s.suppressed, 1);
    }

    #[test]
    fn an_error_while_up_is_no_failed_attempt() {
        let metrics = Arc::new(Metrics::new());
        let log = ConnectionLog::new("RabbitMQ", "amqp", "amqp://g:***@h".into(), metrics);
        log.connected();
        log.connect_failed(&"slow consumer");
        let s = log.state();
        assert!(s.up && s.failures == 0);
    }
}
