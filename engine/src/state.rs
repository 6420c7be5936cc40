//! The registry of threads and runs that `decide` reads, built by folding events with `apply`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::event::{AgentEventKind, Event, EventMeta};
use crate::ids::{MessageId, RunId, ThreadId, UserId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunStatus {
    Registered,
    Running,
    Completed,
    Failed,
    Expired,
}

impl RunStatus {
    pub const ALL: [RunStatus; 5] = [
        Self::Registered,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Expired,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    /// Open runs still accept agent events and can idle out.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Registered | Self::Running)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thread {
    pub thread_id: ThreadId,
    pub owner: UserId,
    pub title: Option<String>,
    // Metadata (up to 16 KiB a thread) is not kept here: it is read from the
    // thread's first record when asked for, so memory does not grow with it.
    pub created_at_ms: u64,
    /// Dense per-thread version: the number of events on the thread so far.
    pub version: u64,
    /// In registration order.
    pub runs: Vec<RunId>,
    pub last_position: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub run_id: RunId,
    pub thread_id: ThreadId,
    pub agent_name: String,
    pub status: RunStatus,
    pub registered_at_ms: u64,
    /// Type name of the last event on the run.
    pub last_event: Option<String>,
    pub last_activity_ms: u64,
    pub open_tool_calls: BTreeSet<String>,
    /// The run's streamed messages while it is open (dropped when it ends: nothing
    /// can be appended to them after that).
    pub messages: BTreeMap<MessageId, MessageState>,
    /// Text bytes of all the run's messages.
    pub message_bytes: u64,
    /// Deltas of the run in the current second.
    pub delta_rate: RateWindow,
    /// Set once the owner asked the agent to stop (`run_cancel_requested`).
    pub cancel: Option<CancelRequest>,
    /// Every input the agent asked for, by `input_id`, answered or not.
    pub inputs: BTreeMap<String, Input>,
    /// How many signals (cancel requests, answers) the run has had: an agent
    /// waiting for news waits for this to pass the value it last saw.
    pub signals: u64,
}

/// Who asked a run to stop, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub by: UserId,
    pub at_ms: u64,
    pub position: u64,
    pub reason: Option<String>,
}

/// One `agent_awaiting_input` of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// The choices of an approval; empty for a question.
    pub options: Vec<String>,
    pub requested_at_ms: u64,
    pub answer: Option<Answer>,
}

/// The owner's answer to an input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub answer: String,
    pub by: UserId,
    pub at_ms: u64,
    /// Where the answer was recorded, so a repeat is answered with the original.
    pub position: u64,
}

/// What `decide` needs of one streamed message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    pub open: bool,
    /// The last delta's `seq` (0 before the first).
    pub seq: u64,
    pub bytes: u64,
    pub delta_rate: RateWindow,
}

/// Events counted in one second of the recorded clock (a fixed window: the fold is
/// deterministic, so replay counts exactly what the live path counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateWindow {
    pub second: u64,
    pub count: u32,
}

impl RateWindow {
    /// How many were counted in the second of `now_ms`.
    pub fn used(&self, now_ms: u64) -> u32 {
        if self.second == now_ms / 1000 {
            self.count
        } else {
            0
        }
    }

    fn count(&mut self, now_ms: u64) {
        let second = now_ms / 1000;
        if self.second == second {
            self.count = self.count.saturating_add(1);
        } else {
            *self = RateWindow { second, count: 1 };
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    threads: BTreeMap<ThreadId, Thread>,
    runs: BTreeMap<RunId, Run>,
    /// Each user's threads in creation order, for listing without a scan.
    by_user: BTreeMap<UserId, Vec<ThreadId>>,
    /// How many threads each user owns (also in a [`Registry::subset`], for the quota).
    thread_counts: BTreeMap<UserId, u64>,
}

impl Registry {
    /// Folds one event in. Infallible: an event that does not fit the current state (which
    /// `decide` never produces) changes only what it can, so replay never stops on old data.
    pub fn apply(&mut self, event: &Event, meta: &EventMeta) {
        match event {
            Event::ThreadCreated {
                thread_id,
                owner,
                title,
                ..
            } => {
                if !self.threads.contains_key(thread_id) {
                    self.threads.insert(
                        thread_id.clone(),
                        Thread {
                            thread_id: thread_id.clone(),
                            owner: owner.clone(),
                            title: title.clone(),
                            created_at_ms: meta.recorded_at_ms,
                            version: 0,
                            runs: Vec::new(),
                            last_position: 0,
                        },
                    );
                    self.by_user
                        .entry(owner.clone())
                        .or_default()
                        .push(thread_id.clone());
                    *self.thread_counts.entry(owner.clone()).or_default() += 1;
                }
            }
            Event::RunRegistered {
                thread_id,
                run_id,
                agent_name,
            } => {
                if !self.runs.contains_key(run_id) {
                    self.runs.insert(
                        run_id.clone(),
                        Run {
                            run_id: run_id.clone(),
                            thread_id: thread_id.clone(),
                            agent_name: agent_name.clone(),
                            status: RunStatus::Registered,
                            registered_at_ms: meta.recorded_at_ms,
                            last_event: None,
                            last_activity_ms: meta.recorded_at_ms,
                            open_tool_calls: BTreeSet::new(),
                            messages: BTreeMap::new(),
                            message_bytes: 0,
                            delta_rate: RateWindow::default(),
                            cancel: None,
                            inputs: BTreeMap::new(),
                            signals: 0,
                        },
                    );
                    if let Some(thread) = self.threads.get_mut(thread_id) {
                        thread.runs.push(run_id.clone());
                    }
                }
            }
            Event::AgentEventRecorded {
                run_id,
                kind,
                tool_call_id,
                ..
            } => {
                if let Some(run) = self.runs.get_mut(run_id) {
                    match kind {
                        AgentEventKind::Started => run.status = RunStatus::Running,
                        AgentEventKind::Completed => {
                            run.status = RunStatus::Completed;
                            run.messages.clear();
                        }
                        AgentEventKind::Error => {
                            run.status = RunStatus::Failed;
                            run.messages.clear();
                        }
                        AgentEventKind::ToolExecuting => {
                            if let Some(id) = tool_call_id {
                                run.open_tool_calls.insert(id.clone());
                            }
                        }
                        AgentEventKind::ToolCompleted => {
                            if let Some(id) = tool_call_id {
                                run.open_tool_calls.remove(id);
                            }
                        }
                        AgentEventKind::Thinking => {}
                    }
                }
            }
            Event::RunExpired { run_id, .. } => {
                if let Some(run) = self.runs.get_mut(run_id) {
                    run.status = RunStatus::Expired;
                    run.messages.clear();
                }
            }
            Event::MessageStarted {
                run_id, message_id, ..
            } => {
                if let Some(run) = self.runs.get_mut(run_id) {
                    run.messages.insert(
                        message_id.clone(),
                        MessageState {
                            open: true,
                            ..MessageState::default()
                        },
                    );
                }
            }
            Event::MessageDeltaAppended {
                run_id,
                message_id,
                seq,
                text,
                ..
            } => {
                if let Some(run) = self.runs.get_mut(run_id) {
                    run.message_bytes += text.len() as u64;
                    run.delta_rate.count(meta.recorded_at_ms);
                    if let Some(m) = run.messages.get_mut(message_id) {
                        m.seq = *seq;
                        m.bytes += text.len() as u64;
                        m.delta_rate.count(meta.recorded_at_ms);
                    }
                }
            }
            Event::MessageCompleted {
                run_id, message_id, ..
            } => {
                if let Some(m) = self
                    .runs
                    .get_mut(run_id)
                    .and_then(|r| r.messages.get_mut(message_id))
                {
                    m.open = false;
                }
            }
            Event::InputRequested {
                run_id,
                input_id,
                options,
                ..
            } => {
                if let Some(run) = self.runs.get_mut(run_id) {
                    run.inputs.entry(input_id.clone()).or_insert(Input {
                        options: options.clone(),
                        requested_at_ms: meta.recorded_at_ms,
                        answer: None,
                    });
                }
            }
            Event::RunCancelRequested {
                run_id,
                requested_by,
                reason,
                ..
            } => {
                if let Some(run) = self.runs.get_mut(run_id) {
                    if run.cancel.is_none() {
                        run.cancel = Some(CancelRequest {
                            by: requested_by.clone(),
                            at_ms: meta.recorded_at_ms,
                            position: meta.position,
                            reason: reason.clone(),
                        });
                        run.signals += 1;
                    }
                }
            }
            Event::InputProvided {
                run_id,
                input_id,
                answered_by,
                answer,
                ..
            } => {
                if let Some(run) = self.runs.get_mut(run_id) {
                    if let Some(input) = run.inputs.get_mut(input_id) {
                        if input.answer.is_none() {
                            input.answer = Some(Answer {
                                answer: answer.clone(),
                                by: answered_by.clone(),
                                at_ms: meta.recorded_at_ms,
                                position: meta.position,
                            });
                            run.signals += 1;
                        }
                    }
                }
            }
            // Neither touches a thread or a run (a nudge is no activity of its run).
            Event::CursorAdvanced { .. } | Event::NudgeRecorded(_) => return,
        }

        if let Some(run) = event.run_id().and_then(|id| self.runs.get_mut(id)) {
            run.last_event = Some(event.type_name().to_owned());
            run.last_activity_ms = meta.recorded_at_ms;
        }
        // Mirrors the log's per-stream version, so it counts every event on the thread.
        if let Some(thread) = event.thread_id().and_then(|id| self.threads.get_mut(id)) {
            thread.version += 1;
            thread.last_position = meta.position;
        }
    }

    pub fn thread(&self, id: &ThreadId) -> Option<&Thread> {
        self.threads.get(id)
    }

    pub fn run(&self, id: &RunId) -> Option<&Run> {
        self.runs.get(id)
    }

    /// The user's threads in creation order.
    pub fn threads_of(&self, user: &UserId) -> impl Iterator<Item = &Thread> {
        self.by_user
            .get(user)
            .into_iter()
            .flatten()
            .filter_map(|id| self.threads.get(id))
    }

    /// Up to `limit` of the user's threads after the first `skip`, in creation order
    /// (the list only grows at its end, so an offset is a stable cursor).
    pub fn threads_of_page(&self, user: &UserId, skip: usize, limit: usize) -> Vec<&Thread> {
        self.by_user
            .get(user)
            .map(|ids| {
                ids.iter()
                    .skip(skip)
                    .take(limit)
                    .filter_map(|id| self.threads.get(id))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many threads `user` owns.
    pub fn thread_count(&self, user: &UserId) -> u64 {
        self.thread_counts.get(user).copied().unwrap_or(0)
    }

    pub fn threads(&self) -> impl Iterator<Item = &Thread> {
        self.threads.values()
    }

    /// Up to `limit` threads in id order, after `after` when given.
    pub fn threads_after(&self, after: Option<&ThreadId>, limit: usize) -> Vec<&Thread> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, Excluded);
        self.threads
            .range((from, Unbounded))
            .take(limit)
            .map(|(_, t)| t)
            .collect()
    }

    pub fn users(&self) -> impl Iterator<Item = &UserId> {
        self.by_user.keys()
    }

    pub fn owner_of(&self, thread: &ThreadId) -> Option<&UserId> {
        self.threads.get(thread).map(|t| &t.owner)
    }

    /// A registry holding only the named threads and runs (and the threads of
    /// those runs) and the named users' thread counts: enough for `decide` to judge
    /// a batch of commands on a scratch copy without cloning everything.
    pub fn subset<'a>(
        &self,
        threads: impl IntoIterator<Item = &'a ThreadId>,
        runs: impl IntoIterator<Item = &'a RunId>,
        users: impl IntoIterator<Item = &'a UserId>,
    ) -> Registry {
        let mut out = Registry::default();
        for user in users {
            if let Some(n) = self.thread_counts.get(user) {
                out.thread_counts.insert(user.clone(), *n);
            }
        }
        let add_thread = |out: &mut Registry, id: &ThreadId| {
            if let Some(t) = self.threads.get(id) {
                out.threads.insert(id.clone(), t.clone());
            }
        };
        for id in threads {
            add_thread(&mut out, id);
        }
        for id in runs {
            if let Some(run) = self.runs.get(id) {
                out.runs.insert(id.clone(), run.clone());
                add_thread(&mut out, &run.thread_id);
            }
        }
        out
    }

    /// Open runs idle for longer than `ttl_ms` at `now_ms`, in run id order.
    pub fn expirable_runs(&self, now_ms: u64, ttl_ms: u64) -> Vec<RunId> {
        self.runs
            .values()
            .filter(|run| run.status.is_open() && is_idle(run, now_ms, ttl_ms))
            .map(|run| run.run_id.clone())
            .collect()
    }
}

/// Saturating so a clock that steps backwards never makes a run look idle.
pub(crate) fn is_idle(run: &Run, now_ms: u64, ttl_ms: u64) -> bool {
    now_ms.saturating_sub(run.last_activity_ms) > ttl_ms
}
