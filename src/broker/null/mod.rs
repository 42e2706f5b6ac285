//! Benchmark-only broker (cargo feature `bench-null-broker`, off by default): acknowledges every
//! publish at once and stores nothing.
//!
//! It exists so the benchmark can run the very same binary path (HTTP, signature check, parse,
//! routing, the bridge pipeline) without a broker and show how close the real brokers come to
//! that ceiling. It loses every event by design, so it is compiled only with the feature, which
//! the benchmark builds into its own target directory (`target/bench-null`); `broker.kind =
//! "null"` is an unknown value in every normal build.

use std::time::Duration;

use super::{DeadLetter, Message, PublishError};

/// The broker that acknowledges everything and keeps nothing (benchmarks only).
#[derive(Debug, Default)]
pub struct NullBroker;

impl NullBroker {
    /// Always up.
    pub fn is_up(&self) -> bool {
        true
    }

    /// Acknowledges at once.
    pub async fn publish(&self, _msg: &Message, _timeout: Duration) -> Result<(), PublishError> {
        Ok(())
    }

    /// Acknowledges at once.
    pub async fn publish_dead_letter(
        &self,
        _dl: &DeadLetter,
        _timeout: Duration,
    ) -> Result<(), PublishError> {
        Ok(())
    }

    /// Nothing to close.
    pub async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acknowledges_everything() {
        let b = NullBroker;
        let msg = Message {
            subject: "p.1.e.c".into(),
            msg_id: "x-0".into(),
            body: bytes::Bytes::from_static(b"{}"),
            app_id: "1".into(),
            event: "e".into(),
            channel: "c".into(),
            time_ms: "1".into(),
            trace: None,
        };
        assert!(b.is_up());
        assert!(b.publish(&msg, Duration::from_millis(1)).await.is_ok());
    }
}
