//! The delivery ledger: for each user's client, every forward move of its
//! durable cursor (the `cursor_advanced` records that raised it), so "which
//! clients acknowledged the event with `user_seq` N, and when" is a binary
//! search, folded from the log like every other projection.
//!
//! Memory: one [`Ack`] (24 bytes) per `cursor_advanced` record that moved a
//! cursor forward. An ack that does not raise the cursor adds nothing, so a
//! client holds at most one entry per `user_seq` of its user, and in practice
//! far fewer (clients batch their acks).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use threadline_engine::{ClientId, UserId};
use threadline_storage::Position;

/// One forward move of a client's cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The `user_seq` acknowledged: every event of the user up to it.
    pub user_seq: u64,
    /// The log position of the `cursor_advanced` record.
    pub position: u64,
    /// When that record was recorded (ms since the epoch).
    pub at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acks {
    /// user → client → forward cursor moves, `user_seq` strictly increasing.
    ledger: BTreeMap<UserId, BTreeMap<ClientId, Vec<Ack>>>,
}

impl Acks {
    /// Records an ack; one that does not move the cursor forward changes nothing.
    pub(crate) fn record(
        &mut self,
        user: &UserId,
        client: &ClientId,
        user_seq: u64,
        position: Position,
        at_ms: u64,
    ) {
        let moves = self
            .ledger
            .entry(user.clone())
            .or_default()
            .entry(client.clone())
            .or_default();
        if moves.last().is_none_or(|last| user_seq > last.user_seq) {
            moves.push(Ack {
                user_seq,
                position: position.0,
                at_ms,
            });
        }
    }

    /// The ack that first covered `user_seq` for this client (`None`: not acknowledged yet).
    pub fn covering(&self, user: &UserId, client: &ClientId, user_seq: u64) -> Option<Ack> {
        let moves = self.ledger.get(user)?.get(client)?;
        let i = moves.partition_point(|a| a.user_seq < user_seq);
        moves.get(i).copied()
    }

    /// Each client of `user` that ever acknowledged, with its latest ack, in client id order.
    pub fn clients<'a>(&'a self, user: &UserId) -> impl Iterator<Item = (&'a ClientId, Ack)> + 'a {
        self.ledger
            .get(user)
            .into_iter()
            .flat_map(|clients| clients.iter())
            .filter_map(|(c, moves)| moves.last().map(|a| (c, *a)))
    }

    /// How many forward moves are held in all (what the ledger's memory grows with).
    pub fn len(&self) -> usize {
        self.ledger
            .values()
            .flat_map(|c| c.values())
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
