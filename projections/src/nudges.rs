//! Pending nudges: the events that may call for a webhook (`agent_completed`,
//! `agent_error`, `agent_awaiting_input`) whose owner has not acknowledged them on
//! any device and whose outcome (`nudge_delivered` / `nudge_failed`) is not in the
//! log yet. Folded from the log like every other projection, so a restart neither
//! loses a due nudge nor sends one whose outcome is recorded.
//!
//! The projection knows no clock and no configuration: when a pending nudge is due
//! (its subject's recorded time + `--nudge-after`) is the webhook worker's question
//! ([`Nudges::due`]).
//!
//! Memory: at most [`MAX_PENDING_PER_USER`] entries per user (a newer subject drops
//! the user's oldest pending one), so a user who never acknowledges anything on a
//! server without a webhook holds a bounded amount.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use threadline_engine::{Event, RunId, ThreadId, UserId};
use uuid::Uuid;

/// Pending nudges one user may have; a newer subject drops the oldest.
pub const MAX_PENDING_PER_USER: usize = 64;

/// One event that no device of its owner has acknowledged yet, and no nudge
/// outcome recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingNudge {
    /// The subject's log position (the key).
    pub position: u64,
    /// The subject's event id (a nudge's id is derived from it).
    pub event_id: Uuid,
    pub user_id: UserId,
    pub thread_id: ThreadId,
    pub run_id: RunId,
    /// The subject's type: `agent_completed`, `agent_error` or `agent_awaiting_input`.
    pub event: String,
    /// The input asked for, for `agent_awaiting_input`.
    pub input_id: Option<String>,
    /// The subject's `user_seq` in the owner's queue: an ack at or past it covers it.
    pub user_seq: u64,
    pub recorded_at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nudges {
    /// By the subject's position.
    pending: BTreeMap<u64, PendingNudge>,
    /// Each user's pending subjects (positions; also `user_seq` order).
    by_user: BTreeMap<UserId, BTreeSet<u64>>,
}

/// Whether an event calls for a nudge when nobody acknowledges it; returns the
/// input asked for (for `agent_awaiting_input`).
pub fn is_subject(event: &Event) -> Option<Option<&str>> {
    match event {
        Event::AgentEventRecorded { kind, .. } if kind.is_terminal() => Some(None),
        Event::InputRequested { input_id, .. } => Some(Some(input_id.as_str())),
        _ => None,
    }
}

impl Nudges {
    /// A thread event of `owner` got `user_seq`: pending if it is a subject that no
    /// device has acknowledged yet (`acked`: the owner's furthest cursor).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn subject(
        &mut self,
        event: &Event,
        owner: &UserId,
        user_seq: u64,
        acked: u64,
        position: u64,
        event_id: Uuid,
        recorded_at_ms: u64,
    ) {
        let Some(input_id) = is_subject(event) else {
            return;
        };
        let (Some(thread_id), Some(run_id)) = (event.thread_id(), event.run_id()) else {
            return;
        };
        if acked >= user_seq {
            return;
        }
        let mine = self.by_user.entry(owner.clone()).or_default();
        mine.insert(position);
        self.pending.insert(
            position,
            PendingNudge {
                position,
                event_id,
                user_id: owner.clone(),
                thread_id: thread_id.clone(),
                run_id: run_id.clone(),
                event: event.type_name().to_owned(),
                input_id: input_id.map(str::to_owned),
                user_seq,
                recorded_at_ms,
            },
        );
        while mine.len() > MAX_PENDING_PER_USER {
            if let Some(oldest) = mine.pop_first() {
                self.pending.remove(&oldest);
            }
        }
    }

    /// A device of `user` acknowledged everything up to `user_seq`.
    pub(crate) fn acknowledged(&mut self, user: &UserId, user_seq: u64) {
        let Some(mine) = self.by_user.get_mut(user) else {
            return;
        };
        while let Some(&first) = mine.first() {
            if self
                .pending
                .get(&first)
                .is_some_and(|p| p.user_seq > user_seq)
            {
                break;
            }
            mine.pop_first();
            self.pending.remove(&first);
        }
        if mine.is_empty() {
            self.by_user.remove(user);
        }
    }

    /// The nudge about the subject at `position` has its outcome in the log.
    pub(crate) fn resolved(&mut self, user: &UserId, position: u64) {
        self.pending.remove(&position);
        if let Some(mine) = self.by_user.get_mut(user) {
            mine.remove(&position);
            if mine.is_empty() {
                self.by_user.remove(user);
            }
        }
    }

    /// The pending nudge about the subject at `position`, if any.
    pub fn get(&self, position: u64) -> Option<&PendingNudge> {
        self.pending.get(&position)
    }

    /// How many nudges are pending in all.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Up to `limit` pending nudges due at `now_ms` (subject recorded at least
    /// `after_ms` before), oldest first, skipping those `skip` says are taken; and
    /// when the next one not yet due will be (ms since the epoch).
    pub fn due(
        &self,
        now_ms: u64,
        after_ms: u64,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> (Vec<PendingNudge>, Option<u64>) {
        let mut due = Vec::new();
        let mut next: Option<u64> = None;
        for p in self.pending.values() {
            let at = p.recorded_at_ms.saturating_add(after_ms);
            if at > now_ms {
                next = Some(next.map_or(at, |n| n.min(at)));
            } else if due.len() < limit && !skip(p.position) {
                due.push(p.clone());
            }
        }
        (due, next)
    }
}
