//! Test-only in-memory broker: the seam that lets [`crate::bridge::Bridge::handle`] and the
//! spool drainer be unit-tested for every broker outcome (ack, nack, return, timeout,
//! unavailable, lasting refusal) without a server. Compiled only under `#[cfg(test)]`.
//!
//! Each publish to a subject takes the next scripted outcome for that subject (an empty script
//! acknowledges); dead letters take theirs from their own script. What was acknowledged is
//! kept, and in which order, so a test sees where every event ended and when.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{DeadLetter, DlqReason, Message, PublishError};

/// The in-memory broker of the unit tests.
#[derive(Debug)]
pub struct FakeBroker {
    up: AtomicBool,
    script: Mutex<HashMap<String, VecDeque<Result<(), PublishError>>>>,
    dead_script: Mutex<VecDeque<Result<(), PublishError>>>,
    published: Mutex<Vec<Message>>,
    dead: Mutex<Vec<DeadLetter>>,
    tries: Mutex<HashMap<String, u32>>,
    acks: Mutex<Vec<String>>,
    /// The subject whose next publish takes the broker down (the connection lost under it).
    outage_at: Mutex<Option<String>>,
}

/// A publish that got no ack in time, as both brokers report it.
pub fn timeout() -> PublishError {
    PublishError::Unavailable("no ack in time".into())
}

/// A broker refusal of `reason`.
pub fn refused(reason: DlqReason) -> PublishError {
    PublishError::Refused {
        reason,
        detail: format!("fake broker: {}", reason.as_str()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Default for FakeBroker {
    /// A connected broker that acknowledges everything until scripted otherwise.
    fn default() -> Self {
        Self {
            up: AtomicBool::new(true),
            script: Mutex::new(HashMap::new()),
            dead_script: Mutex::new(VecDeque::new()),
            published: Mutex::new(Vec::new()),
            dead: Mutex::new(Vec::new()),
            tries: Mutex::new(HashMap::new()),
            acks: Mutex::new(Vec::new()),
            outage_at: Mutex::new(None),
        }
    }
}

impl FakeBroker {
    /// The next publishes to `subject` fail with `outcomes`, in order; later ones are acked.
    pub fn script(&self, subject: &str, outcomes: Vec<PublishError>) {
        lock(&self.script)
            .entry(subject.to_string())
            .or_default()
            .extend(outcomes.into_iter().map(Err));
    }

    /// The next dead-letter publishes fail with `outcomes`, in order.
    pub(crate) fn script_dead(&self, outcomes: Vec<PublishError>) {
        lock(&self.dead_script).extend(outcomes.into_iter().map(Err));
    }

    /// The next publish to `subject` loses the connection: it fails as `Unavailable`, and the
    /// broker is down from then on.
    pub(crate) fn go_down_at(&self, subject: &str) {
        *lock(&self.outage_at) = Some(subject.to_string());
    }

    /// Connects or disconnects the broker (`is_up`; a down broker answers every publish
    /// `Unavailable`).
    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    /// The subjects of the acknowledged events, in the order acked.
    pub fn published(&self) -> Vec<String> {
        lock(&self.published)
            .iter()
            .map(|m| m.subject.clone())
            .collect()
    }

    /// The stored dead letters: (subject, reason).
    pub(crate) fn dead_letters(&self) -> Vec<(String, DlqReason)> {
        lock(&self.dead)
            .iter()
            .map(|d| (d.message.subject.clone(), d.reason))
            .collect()
    }

    /// The stored dead letters, whole.
    pub(crate) fn dead_letter_records(&self) -> Vec<DeadLetter> {
        lock(&self.dead).clone()
    }

    /// Every acknowledgement in the order given: an event's subject, or `dlq:` and the subject
    /// of a dead letter's event.
    pub(crate) fn acks(&self) -> Vec<String> {
        lock(&self.acks).clone()
    }

    /// How many publishes of `subject` were tried.
    pub fn tries(&self, subject: &str) -> u32 {
        lock(&self.tries).get(subject).copied().unwrap_or(0)
    }

    /// Whether the broker is connected ([`FakeBroker::set_up`]).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Takes the next scripted outcome for the message's subject; keeps what is acked.
    pub async fn publish(&self, msg: &Message, _timeout: Duration) -> Result<(), PublishError> {
        *lock(&self.tries).entry(msg.subject.clone()).or_default() += 1;
        if !self.is_up() {
            return Err(PublishError::Unavailable("not connected".into()));
        }
        if lock(&self.outage_at)
            .take_if(|at| *at == msg.subject)
            .is_some()
        {
            self.set_up(false);
            return Err(PublishError::Unavailable("connection lost".into()));
        }
        let next = lock(&self.script)
            .get_mut(&msg.subject)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Ok(()));
        if next.is_ok() {
            lock(&self.published).push(msg.clone());
            lock(&self.acks).push(msg.subject.clone());
        }
        next
    }

    /// Like the real brokers: after the first transient failure the rest are not sent.
    pub(crate) async fn publish_in_order(
        &self,
        msgs: &[&Message],
        timeout: Duration,
    ) -> Vec<Result<(), PublishError>> {
        let mut out = Vec::with_capacity(msgs.len());
        let mut stopped = false;
        for m in msgs {
            if stopped {
                out.push(Err(PublishError::Unavailable(
                    "not sent: an earlier event could not be".into(),
                )));
                continue;
            }
            let r = self.publish(m, timeout).await;
            stopped = r.as_ref().is_err_and(PublishError::is_transient);
            out.push(r);
        }
        out
    }

    /// Takes the next scripted dead-letter outcome; keeps what is acked.
    pub async fn publish_dead_letter(
        &self,
        dl: &DeadLetter,
        _timeout: Duration,
    ) -> Result<(), PublishError> {
        if !self.is_up() {
            return Err(PublishError::Unavailable("not connected".into()));
        }
        let next = lock(&self.dead_script).pop_front().unwrap_or(Ok(()));
        if next.is_ok() {
            lock(&self.dead).push(dl.clone());
            lock(&self.acks).push(format!("dlq:{}", dl.message.subject));
        }
        next
    }
}
