//! The one supervisor of the bridge's background work: the spool drainer, the retention
//! sweeper, the channel state's applier and tombstone sweep, and (in an instance of their own,
//! `crate::broker::BrokerTasks`, since the brokers are built first and tools use them too)
//! the brokers' topology and recovery loops. Each task is started under it with
//! the one shutdown signal ([`crate::shutdown`]). A task that ends or panics while the bridge
//! runs is logged, counted (`pusher_bridge_task_restarts_total{task}`) and started again after a
//! jittered pause; until it runs again, if it is one events need to become durable and move on
//! (`crate::metrics::task::DURABILITY`), `/readyz` answers 503 naming it ([`TaskHealth`]). At
//! shutdown every task sees the signal and returns; `Supervisor::join` waits for them, with a
//! bound, so nothing is aborted half-way.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::{Backoff, RAN_A_WHILE};
use crate::metrics::{Metrics, TaskLabels};
use crate::shutdown::Shutdown;

/// Pauses before a task that ended is started again: 100 ms doubling up to 30 s.
const RESTART: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));

/// Which supervised tasks are down right now (for `/readyz`).
#[derive(Clone, Debug, Default)]
pub struct TaskHealth(Arc<Mutex<BTreeSet<&'static str>>>);

impl TaskHealth {
    /// Notes whether `task` is down (between its end and its restart) or running again.
    pub(crate) fn set(&self, task: &'static str, down: bool) {
        let mut set = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if down {
            set.insert(task);
        } else {
            set.remove(task);
        }
    }

    /// The tasks that ended and are not running again yet, by name.
    pub fn down(&self) -> Vec<&'static str> {
        let set = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        set.iter().copied().collect()
    }
}

/// Starts background tasks, restarts those that end before shutdown, and waits for all at the
/// end.
pub(crate) struct Supervisor {
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    health: TaskHealth,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl Supervisor {
    /// A supervisor whose tasks stop on `shutdown`, reporting to `metrics` and `health`.
    pub(crate) fn new(shutdown: Shutdown, metrics: Arc<Metrics>, health: TaskHealth) -> Self {
        Self {
            shutdown,
            metrics,
            health,
            tasks: Vec::new(),
        }
    }

    /// Runs `task` as `name`: `task(shutdown)` must return once the shutdown is signalled. If
    /// it returns (or panics) before that, it is started again. Its restart series exists from
    /// now on.
    pub(crate) fn spawn<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: Fn(Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let restarts = self
            .metrics
            .task_restarts
            .get_or_create(&TaskLabels { task: name })
            .clone();
        let (mut shutdown, health) = (self.shutdown.clone(), self.health.clone());
        let watch = async move {
            let mut failures = 0;
            loop {
                let started = tokio::time::Instant::now();
                let ended = tokio::spawn(task(shutdown.clone())).await;
                if shutdown.is_triggered() {
                    return;
                }
                // A task that ran a good while before it ended starts over at the short pause.
                if started.elapsed() >= RAN_A_WHILE {
                    failures = 0;
                }
                failures += 1;
                match ended {
                    Err(e) if e.is_panic() => {
                        tracing::error!(task = name, error = %e, "a background task panicked; it is started again");
                    }
                    _ => {
                        tracing::error!(
                            task = name,
                            "a background task ended while the bridge runs; it is started again"
                        );
                    }
                }
                restarts.inc();
                health.set(name, true);
                tokio::select! {
                    () = shutdown.wait() => return,
                    () = tokio::time::sleep(RESTART.delay(failures)) => {}
                }
                health.set(name, false);
            }
        };
        self.tasks.push((name, tokio::spawn(watch)));
    }

    /// After the shutdown was signalled: waits up to `within` for each task to return.
    pub(crate) async fn join(self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        for (name, task) in self.tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!(task = name, "a background task did not stop in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_ends_is_counted_restarted_and_shown_down_meanwhile() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let metrics = Arc::new(Metrics::new());
        let health = TaskHealth::default();
        let mut sup = Supervisor::new(shutdown, metrics.clone(), health.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        sup.spawn("flaky", move |mut shutdown| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => panic!("first run panics"),
                    1 => {}
                    _ => shutdown.wait().await,
                }
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "not restarted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let restarts = metrics
            .task_restarts
            .get_or_create(&TaskLabels { task: "flaky" })
            .get();
        assert_eq!(restarts, 2);
        assert!(health.down().is_empty(), "running again");
        trigger.trigger();
        sup.join(Duration::from_secs(1)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "not restarted after shutdown"
        );
    }

    #[tokio::test]
    async fn a_task_down_is_shown_until_it_runs_again() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let health = TaskHealth::default();
        let mut sup = Supervisor::new(shutdown, Arc::new(Metrics::new()), health.clone());
        sup.spawn("gone", |_| async {});
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while health.down().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never shown down");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(health.down(), ["gone"]);
        trigger.trigger();
        sup.join(Duration::from_secs(1)).await;
    }
}
