//! A [`LetterStore`] over a list of letters, for the unit tests of the tools that walk a
//! dead-letter queue (`purge`, `replay`): what they removed, kept and closed is written down,
//! and a read or a removal can be made to fail.

use std::collections::HashSet;

use super::{DeadLetterRecord, DlqError, LetterStore};
use crate::broker::BoxError;

/// Letters walked in order; a letter's handle is its position.
#[derive(Default)]
pub(super) struct ListStore {
    /// The letters, in queue order.
    pub letters: Vec<DeadLetterRecord>,
    /// Letters read so far.
    pub read: usize,
    /// Positions removed, in order.
    pub removed: Vec<u64>,
    /// Positions kept in place, in order.
    pub kept: Vec<u64>,
    /// The position at which reading fails.
    pub fail_at: Option<u64>,
    /// Positions whose removal fails.
    pub remove_fails: HashSet<u64>,
    /// Positions this store cannot take back (its `blocker`).
    pub blocked: HashSet<u64>,
    /// The walk closed the store.
    pub closed: bool,
}

impl ListStore {
    /// A store holding `letters`.
    pub fn new(letters: Vec<DeadLetterRecord>) -> Self {
        Self {
            letters,
            ..Self::default()
        }
    }
}

impl LetterStore for &mut ListStore {
    type Handle = u64;
    const KIND: &'static str = "list";

    fn count(&self) -> u64 {
        self.letters.len() as u64
    }

    async fn next(&mut self) -> Result<Option<(DeadLetterRecord, u64)>, DlqError> {
        let Some(r) = self.letters.get(self.read).cloned() else {
            return Ok(None);
        };
        if self.fail_at == Some(r.position) {
            return Err(DlqError::Operation {
                what: "read".into(),
                source: None,
            });
        }
        self.read += 1;
        let position = r.position;
        Ok(Some((r, position)))
    }

    fn blocker(&self, r: &DeadLetterRecord) -> Option<&'static str> {
        self.blocked
            .contains(&r.position)
            .then_some("this store cannot take it back")
    }

    async fn remove(&mut self, position: u64) -> Result<(), BoxError> {
        if self.remove_fails.contains(&position) {
            return Err("the store went away".into());
        }
        self.removed.push(position);
        Ok(())
    }

    fn keep(&mut self, position: u64) {
        self.kept.push(position);
    }

    async fn close(self) {
        self.closed = true;
    }
}
