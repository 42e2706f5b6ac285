//! The one stop signal of the crate: the bridge's shutdown for its background tasks (retention
//! sweeper, spool drainer, ...), and the end of a RabbitMQ session for the helpers that live
//! with its connection.
//!
//! [`crate::run`] owns the [`ShutdownTrigger`]; every background task gets a [`Shutdown`] clone
//! and selects on [`Shutdown::wait`] next to its interval. Dropping the trigger counts as a
//! shutdown too, so a task can never outlive the server by a forgotten signal.

use tokio::sync::watch;

/// Fires the shutdown (explicitly or by being dropped).
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Waits for the shutdown; cheap to clone, one per task.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and its first listener.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every listener to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// Another listener, for a task started after the first (a RabbitMQ session's channel
    /// opened again).
    pub(crate) fn listener(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Whether the shutdown has been signalled.
    pub(crate) fn is_triggered(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Completes once the shutdown is signalled (or the trigger is gone).
    pub async fn wait(&mut self) {
        // `wait_for` errs only when the trigger was dropped, which also means "stop".
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_and_drop_both_stop_listeners() {
        let (trigger, mut a) = channel();
        let mut b = a.clone();
        assert!(!a.is_triggered());
        trigger.trigger();
        a.wait().await;
        assert!(a.is_triggered());

        let (trigger, mut c) = channel();
        drop(trigger);
        c.wait().await;
        assert!(c.is_triggered());
        b.wait().await;
    }
}
