//! RabbitMQ (AMQP 0-9-1). Placeholder until the AMQP broker lands: connecting fails with a clear
//! message, so `broker.kind = "amqp"` is refused at start-up rather than silently doing nothing.

use std::sync::Arc;
use std::time::Duration;

use super::{BrokerError, DeadLetter, Message, PublishError};
use crate::config::Settings;
use crate::metrics::Metrics;

/// The RabbitMQ broker.
pub struct AmqpBroker {
    _private: (),
}

impl AmqpBroker {
    /// Connects (not implemented yet).
    pub async fn connect(
        _settings: &Settings,
        _metrics: Arc<Metrics>,
    ) -> Result<Self, BrokerError> {
        Err(BrokerError::Connect(
            "the AMQP broker is not implemented yet".into(),
        ))
    }
    /// Whether the connection is up.
    pub fn is_up(&self) -> bool {
        false
    }
    /// Publishes one event.
    pub async fn publish(&self, _msg: &Message, _timeout: Duration) -> Result<(), PublishError> {
        Err(PublishError::Unavailable("AMQP not implemented".into()))
    }
    /// Publishes one dead letter.
    pub async fn publish_dead_letter(
        &self,
        _dl: &DeadLetter,
        _timeout: Duration,
    ) -> Result<(), PublishError> {
        Err(PublishError::Unavailable("AMQP not implemented".into()))
    }
    /// Closes the connection.
    pub async fn close(&self) {}
}
