//! Why the broker is not taking events, in words an operator can act on (issue 21).
//!
//! "Cannot reach the broker" sent people looking in the wrong place: right after a start the
//! connection is simply still coming up, a NATS server without JetStream answers every core
//! request, and a wrong password is not a network problem. Each broker records what it last
//! learned about its connection in a `StatusCell` (the NATS client's connect errors and the
//! topology task's JetStream check, RabbitMQ's connect attempts and alarms), and
//! [`crate::broker::Broker::status`] reads it. The bridge says it in three places, with the
//! same sentence ([`BrokerStatus::describe`]): its log, `/readyz`, and the answer to a webhook
//! whose events were spooled (`"broker"` and `"broker_error"`), which `send-test` turns into
//! its explanation.

use std::sync::Mutex;

use crate::config::BrokerKind;

/// What the bridge knows about its broker connection right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerStatus {
    /// Connected, and the streams / exchanges and queues are declared: events are published.
    Up,
    /// The connection is on its way (just started, or connected and declaring), and nothing
    /// has failed yet.
    Connecting,
    /// NATS answers, but its JetStream API does not (a server started without `-js`, or an
    /// account without JetStream). The client's or server's words.
    JetStreamOff(String),
    /// Nothing answers at the broker's address (connection refused, timed out, DNS, lost).
    Unreachable(String),
    /// The broker answered but refused the bridge: authentication or authorization (wrong
    /// password or token, RabbitMQ `ACCESS_REFUSED`, an unknown vhost), or TLS.
    Refused(String),
    /// Connected, but the streams / exchanges and queues cannot be declared.
    NotDeclared(String),
    /// RabbitMQ blocked the connection (a memory or disk alarm).
    Blocked,
}

impl BrokerStatus {
    /// The token of the webhook answer's `"broker"` key.
    pub fn token(&self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Connecting => "connecting",
            Self::JetStreamOff(_) => "jetstream_off",
            Self::Unreachable(_) => "unreachable",
            Self::Refused(_) => "refused",
            Self::NotDeclared(_) => "not_declared",
            Self::Blocked => "blocked",
        }
    }

    /// The status of an answer's `"broker"` token and `"broker_error"` words; `None` for a token
    /// this version does not know.
    pub fn from_token(token: &str, error: Option<&str>) -> Option<Self> {
        let error = error.unwrap_or_default().to_string();
        Some(match token {
            "up" => Self::Up,
            "connecting" => Self::Connecting,
            "jetstream_off" => Self::JetStreamOff(error),
            "unreachable" => Self::Unreachable(error),
            "refused" => Self::Refused(error),
            "not_declared" => Self::NotDeclared(error),
            "blocked" => Self::Blocked,
            _ => return None,
        })
    }

    /// The client's or broker's words, when there are any.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::JetStreamOff(e)
            | Self::Unreachable(e)
            | Self::Refused(e)
            | Self::NotDeclared(e) => Some(e.as_str()).filter(|e| !e.is_empty()),
            _ => None,
        }
    }

    /// What it means for the events and what to do, naming the broker of `kind` and, when
    /// given, its (redacted) address. [`BrokerStatus::Up`] is said of spooled events: they
    /// queued behind earlier ones that are still being published.
    pub fn describe(&self, kind: BrokerKind, address: Option<&str>) -> String {
        let name = broker_name(kind);
        let who = match address {
            Some(a) => format!("{name} at {a}"),
            None => name.to_string(),
        };
        let words = self.error().map(|e| format!(" ({e})")).unwrap_or_default();
        let amqp = matches!(kind, BrokerKind::Amqp);
        match self {
            Self::Up => format!(
                "{who} is up; these events queued behind earlier spooled events the bridge is \
                 still publishing: they are published in turn (pusher_bridge_spool_events falls \
                 to 0)"
            ),
            Self::Connecting => format!(
                "the bridge's connection to {who} is still coming up (was it just started?): the \
                 spooled events are published once it is up, a few seconds after a start"
            ),
            Self::JetStreamOff(_) => format!(
                "{who} is up but JetStream is off{words}: start nats-server with -js (or enable \
                 JetStream for the bridge's account); the spooled events are published once it is on"
            ),
            Self::Unreachable(_) => format!(
                "nothing answers at {who}{words}: check {} and that {name} runs and is reachable \
                 from the bridge",
                if amqp {
                    "broker.amqp.url"
                } else {
                    "broker.nats.url"
                }
            ),
            Self::Refused(_) => format!(
                "{who} refused the bridge's connection{words}: check {}",
                if amqp {
                    "the user, password and vhost in broker.amqp.url, and the user's permissions \
                     on that vhost"
                } else {
                    "broker.nats.user and broker.nats.password, broker.nats.token or \
                     broker.nats.creds_file (or the credentials in broker.nats.url), and the TLS \
                     settings"
                }
            ),
            Self::NotDeclared(_) => format!(
                "connected to {who}, but the bridge cannot declare its {}{words}: see the \
                 bridge's log",
                if amqp {
                    "exchanges and queues"
                } else {
                    "streams"
                }
            ),
            Self::Blocked => format!(
                "{who} blocked the bridge's connection (a memory or disk alarm): see \
                 `rabbitmq-diagnostics alarms`; publishing resumes when the alarm clears"
            ),
        }
    }
}

/// `NATS` or `RabbitMQ`.
pub(crate) fn broker_name(kind: BrokerKind) -> &'static str {
    match kind {
        BrokerKind::Amqp => "RabbitMQ",
        // NATS, and the benchmark's null broker (which is always up).
        _ => "NATS",
    }
}

/// The last status a broker recorded, shared by its connection callbacks and loops.
#[derive(Debug)]
pub(crate) struct StatusCell(Mutex<BrokerStatus>);

impl Default for StatusCell {
    /// [`BrokerStatus::Connecting`]: nothing has been tried yet.
    fn default() -> Self {
        Self(Mutex::new(BrokerStatus::Connecting))
    }
}

impl StatusCell {
    /// The recorded status.
    pub(crate) fn get(&self) -> BrokerStatus {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records `status`; returns whether it differs from the one before.
    pub(crate) fn set(&self, status: BrokerStatus) -> bool {
        let mut current = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *current != status;
        *current = status;
        changed
    }

    /// What a broker that is not up reports: the recorded status, except that a recorded
    /// [`BrokerStatus::Up`] (the connection dropped a moment ago and the client has not said
    /// so yet) reads as connecting.
    pub(crate) fn not_up(&self) -> BrokerStatus {
        match self.get() {
            BrokerStatus::Up => BrokerStatus::Connecting,
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every() -> Vec<BrokerStatus> {
        vec![
            BrokerStatus::Up,
            BrokerStatus::Connecting,
            BrokerStatus::JetStreamOff("no responders".into()),
            BrokerStatus::Unreachable("IO error".into()),
            BrokerStatus::Refused("authorization violation".into()),
            BrokerStatus::NotDeclared("stream X: timed out".into()),
            BrokerStatus::Blocked,
        ]
    }

    #[test]
    fn tokens_read_back_as_the_status() {
        for s in every() {
            assert_eq!(
                BrokerStatus::from_token(s.token(), s.error()),
                Some(s.clone()),
                "{s:?}"
            );
        }
        assert_eq!(BrokerStatus::from_token("on_fire", None), None);
    }

    #[test]
    fn each_status_names_the_cause_and_what_to_do() {
        let at = Some("nats://u:***@h:4222");
        let says = |s: BrokerStatus, kind, words: &[&str]| {
            let text = s.describe(kind, at);
            for w in words {
                assert!(text.contains(w), "`{w}` missing in: {text}");
            }
        };
        says(
            BrokerStatus::Connecting,
            BrokerKind::Nats,
            &[
                "NATS at nats://u:***@h:4222 is still coming up",
                "a few seconds",
            ],
        );
        says(
            BrokerStatus::JetStreamOff("no responders".into()),
            BrokerKind::Nats,
            &["is up but JetStream is off (no responders)", "-js"],
        );
        says(
            BrokerStatus::Unreachable("IO error".into()),
            BrokerKind::Nats,
            &["nothing answers at NATS at", "broker.nats.url"],
        );
        says(
            BrokerStatus::Refused("ACCESS_REFUSED".into()),
            BrokerKind::Amqp,
            &["RabbitMQ at", "refused", "(ACCESS_REFUSED)", "vhost"],
        );
        says(
            BrokerStatus::Blocked,
            BrokerKind::Amqp,
            &["alarm", "rabbitmq-diagnostics"],
        );
        says(
            BrokerStatus::Up,
            BrokerKind::Nats,
            &["is up", "pusher_bridge_spool_events"],
        );
        assert!(
            !BrokerStatus::Unreachable(String::new())
                .describe(BrokerKind::Nats, None)
                .contains("()")
        );
    }

    #[test]
    fn a_cell_that_says_up_while_the_broker_is_not_reads_connecting() {
        let cell = StatusCell::default();
        assert_eq!(cell.get(), BrokerStatus::Connecting);
        assert!(cell.set(BrokerStatus::Up));
        assert!(!cell.set(BrokerStatus::Up));
        assert_eq!(cell.not_up(), BrokerStatus::Connecting);
        cell.set(BrokerStatus::Refused("x".into()));
        assert_eq!(cell.not_up(), BrokerStatus::Refused("x".into()));
    }
}
