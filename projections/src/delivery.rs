//! Per-user delivery queues: each event of a user's threads gets the user's
//! next dense `user_seq`; plus durable, forward-only cursors per client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use threadline_engine::{ClientId, UserId};
use threadline_storage::Position;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// user → positions of the user's events; `user_seq` = index + 1.
    queues: BTreeMap<UserId, Vec<u64>>,
    /// user → client → last acknowledged `user_seq`.
    cursors: BTreeMap<UserId, BTreeMap<ClientId, u64>>,
}

impl Delivery {
    /// Appends `position` to `user`'s queue and returns its `user_seq`.
    pub(crate) fn enqueue(&mut self, user: &UserId, position: Position) -> u64 {
        let queue = self.queues.entry(user.clone()).or_default();
        queue.push(position.0);
        queue.len() as u64
    }

    /// Moves a cursor forward; a cursor never moves back.
    pub(crate) fn advance(&mut self, user: &UserId, client: &ClientId, user_seq: u64) {
        let cursor = self
            .cursors
            .entry(user.clone())
            .or_default()
            .entry(client.clone())
            .or_default();
        *cursor = (*cursor).max(user_seq);
    }

    /// The user's last `user_seq` (0 when the user has no event).
    pub fn user_head(&self, user: &UserId) -> u64 {
        self.queues.get(user).map_or(0, |q| q.len() as u64)
    }

    /// Up to `limit` `(user_seq, position)` pairs after `after`, in order.
    pub fn read_after(&self, user: &UserId, after: u64, limit: usize) -> Vec<(u64, Position)> {
        let Some(queue) = self.queues.get(user) else {
            return Vec::new();
        };
        let start = usize::try_from(after).map_or(queue.len(), |a| a.min(queue.len()));
        queue[start..]
            .iter()
            .take(limit)
            .enumerate()
            .map(|(i, p)| ((start + i) as u64 + 1, Position(*p)))
            .collect()
    }

    /// The `user_seq` the event at `position` got in `user`'s queue.
    pub fn seq_of(&self, user: &UserId, position: Position) -> Option<u64> {
        let queue = self.queues.get(user)?;
        queue.binary_search(&position.0).ok().map(|i| i as u64 + 1)
    }

    /// The client's acknowledged `user_seq` (0 when it never acknowledged).
    pub fn cursor(&self, user: &UserId, client: &ClientId) -> u64 {
        self.cursors
            .get(user)
            .and_then(|c| c.get(client))
            .copied()
            .unwrap_or(0)
    }

    /// The furthest any client of `user` has acknowledged (0 when none has).
    pub fn furthest_cursor(&self, user: &UserId) -> u64 {
        self.cursors
            .get(user)
            .and_then(|c| c.values().max())
            .copied()
            .unwrap_or(0)
    }

    /// Every user that has a queue.
    pub fn users(&self) -> impl Iterator<Item = &UserId> {
        self.queues.keys()
    }
}
