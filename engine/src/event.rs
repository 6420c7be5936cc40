//! Stored event payloads (past tense). Encoded with a non-self-describing format, so only
//! externally tagged enums and no `skip`/`flatten`/`untagged` tricks.

use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, MessageId, RunId, ThreadId, UserId};

/// The agent event types of the wire contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AgentEventKind {
    Started,
    Thinking,
    ToolExecuting,
    ToolCompleted,
    Completed,
    Error,
}

impl AgentEventKind {
    pub const ALL: [AgentEventKind; 6] = [
        Self::Started,
        Self::Thinking,
        Self::ToolExecuting,
        Self::ToolCompleted,
        Self::Completed,
        Self::Error,
    ];

    /// Wire name to kind; `None` for anything else (the edge answers `invalid_event_type`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Started => "agent_started",
            Self::Thinking => "agent_thinking",
            Self::ToolExecuting => "tool_executing",
            Self::ToolCompleted => "tool_completed",
            Self::Completed => "agent_completed",
            Self::Error => "agent_error",
        }
    }

    /// After a terminal event nothing more may be appended to the run.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Error)
    }
}

/// The agent event type that asks the thread's owner for input. Not an
/// [`AgentEventKind`]: it carries an `input_id` the engine tracks.
pub const INPUT_REQUESTED: &str = "agent_awaiting_input";

/// The outcomes of a nudge webhook (not thread events: see [`NudgeRecord`]).
pub const NUDGE_DELIVERED: &str = "nudge_delivered";
pub const NUDGE_FAILED: &str = "nudge_failed";

/// The events of a thread that are neither agent events nor `thread_created`:
/// every `event` name a frame can carry besides those.
pub const THREAD_EVENT_NAMES: [&str; 5] = [
    "run_registered",
    "run_expired",
    "run_cancel_requested",
    INPUT_REQUESTED,
    "user_input_provided",
];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    ThreadCreated {
        thread_id: ThreadId,
        owner: UserId,
        title: Option<String>,
        /// JSON object text; the engine never looks inside.
        metadata: Option<String>,
    },
    RunRegistered {
        thread_id: ThreadId,
        run_id: RunId,
        agent_name: String,
    },
    AgentEventRecorded {
        thread_id: ThreadId,
        run_id: RunId,
        kind: AgentEventKind,
        /// JSON object text; opaque to the engine.
        data: String,
        tool_call_id: Option<String>,
    },
    RunExpired {
        thread_id: ThreadId,
        run_id: RunId,
    },
    CursorAdvanced {
        user_id: UserId,
        client_id: ClientId,
        user_seq: u64,
    },
    // Streamed messages (issue 18). New variants go last: the encoding numbers them.
    /// An agent opened a streamed message in a running run.
    MessageStarted {
        thread_id: ThreadId,
        run_id: RunId,
        message_id: MessageId,
    },
    /// One delta of a message's text; `seq` counts the message's deltas from 1.
    MessageDeltaAppended {
        thread_id: ThreadId,
        run_id: RunId,
        message_id: MessageId,
        seq: u64,
        text: String,
    },
    /// The message is complete: `seq` deltas, `bytes` of text in all.
    MessageCompleted {
        thread_id: ThreadId,
        run_id: RunId,
        message_id: MessageId,
        seq: u64,
        bytes: u64,
    },
    // Issue 19 (the way back from user to agent). New variants go at the end: the
    // encoding numbers variants, so stored events keep their meaning.
    /// `agent_awaiting_input`: the agent asked the owner something.
    InputRequested {
        thread_id: ThreadId,
        run_id: RunId,
        input_id: String,
        /// The choices of an approval; empty for a question.
        options: Vec<String>,
        /// JSON object text; opaque to the engine.
        data: String,
    },
    /// `run_cancel_requested`: the owner asked the agent to stop (who: the record's actor).
    RunCancelRequested {
        thread_id: ThreadId,
        run_id: RunId,
        requested_by: UserId,
        reason: Option<String>,
    },
    /// `user_input_provided`: the owner answered an input.
    InputProvided {
        thread_id: ThreadId,
        run_id: RunId,
        input_id: String,
        answered_by: UserId,
        answer: String,
    },
    /// `nudge_delivered` / `nudge_failed`: the outcome of the webhook sent because the
    /// owner's devices had not acknowledged an event in time (appended by the system).
    NudgeRecorded(NudgeRecord),
}

/// The outcome of one nudge: the webhook about one event of a thread (the *subject*)
/// that no device of its owner acknowledged in time. Not a thread event: it lives on
/// the stream `nudge:<user>`, so it moves no thread version and reaches no socket; the
/// auditor's history lists it by its subject's thread and run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NudgeRecord {
    /// The owner who was (to be) nudged.
    pub user_id: UserId,
    pub thread_id: ThreadId,
    pub run_id: RunId,
    /// The subject: its log position, its `user_seq` in the owner's queue and its type.
    pub subject_position: u64,
    pub subject_user_seq: u64,
    pub subject_event: String,
    pub delivered: bool,
    /// Requests made (0: none was sent, e.g. the subject was too old when seen).
    pub attempts: u32,
    /// The receiver's HTTP status on the last attempt (none: no answer).
    pub status: Option<u16>,
    /// Why the last attempt failed (none once delivered).
    pub error: Option<String>,
}

impl NudgeRecord {
    pub fn type_name(&self) -> &'static str {
        if self.delivered {
            NUDGE_DELIVERED
        } else {
            NUDGE_FAILED
        }
    }
}

impl Event {
    /// The `event` name a frame carries.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::ThreadCreated { .. } => "thread_created",
            Self::RunRegistered { .. } => "run_registered",
            Self::AgentEventRecorded { kind, .. } => kind.as_str(),
            Self::RunExpired { .. } => "run_expired",
            Self::CursorAdvanced { .. } => "cursor_advanced",
            Self::MessageStarted { .. } => "message_started",
            Self::MessageDeltaAppended { .. } => "message_delta",
            Self::MessageCompleted { .. } => "message_completed",
            Self::InputRequested { .. } => INPUT_REQUESTED,
            Self::RunCancelRequested { .. } => "run_cancel_requested",
            Self::InputProvided { .. } => "user_input_provided",
            Self::NudgeRecorded(n) => n.type_name(),
        }
    }

    /// The stream the event belongs to; per-stream versions are counted on it.
    pub fn stream(&self) -> StreamName {
        match self {
            Self::CursorAdvanced {
                user_id, client_id, ..
            } => StreamName::cursor(user_id, client_id),
            Self::NudgeRecorded(n) => StreamName::nudge(&n.user_id),
            _ => match self.thread_id() {
                Some(t) => StreamName::thread(t),
                None => StreamName(String::new()),
            },
        }
    }

    pub fn thread_id(&self) -> Option<&ThreadId> {
        match self {
            Self::ThreadCreated { thread_id, .. }
            | Self::RunRegistered { thread_id, .. }
            | Self::AgentEventRecorded { thread_id, .. }
            | Self::RunExpired { thread_id, .. }
            | Self::MessageStarted { thread_id, .. }
            | Self::MessageDeltaAppended { thread_id, .. }
            | Self::MessageCompleted { thread_id, .. }
            | Self::InputRequested { thread_id, .. }
            | Self::RunCancelRequested { thread_id, .. }
            | Self::InputProvided { thread_id, .. } => Some(thread_id),
            // A nudge is about a thread but not on it: it moves no thread version.
            Self::CursorAdvanced { .. } | Self::NudgeRecorded(_) => None,
        }
    }

    /// The streamed message the event belongs to, if any.
    pub fn message_id(&self) -> Option<&MessageId> {
        match self {
            Self::MessageStarted { message_id, .. }
            | Self::MessageDeltaAppended { message_id, .. }
            | Self::MessageCompleted { message_id, .. } => Some(message_id),
            _ => None,
        }
    }

    /// Whether the event ends its run (and so completes the run's open messages).
    pub fn ends_run(&self) -> bool {
        match self {
            Self::AgentEventRecorded { kind, .. } => kind.is_terminal(),
            Self::RunExpired { .. } => true,
            _ => false,
        }
    }

    pub fn run_id(&self) -> Option<&RunId> {
        match self {
            Self::RunRegistered { run_id, .. }
            | Self::AgentEventRecorded { run_id, .. }
            | Self::RunExpired { run_id, .. }
            | Self::MessageStarted { run_id, .. }
            | Self::MessageDeltaAppended { run_id, .. }
            | Self::MessageCompleted { run_id, .. }
            | Self::InputRequested { run_id, .. }
            | Self::RunCancelRequested { run_id, .. }
            | Self::InputProvided { run_id, .. } => Some(run_id),
            Self::NudgeRecorded(n) => Some(&n.run_id),
            Self::ThreadCreated { .. } | Self::CursorAdvanced { .. } => None,
        }
    }
}

/// What the log assigned when the event was appended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMeta {
    /// Global log position, dense from 1.
    pub position: u64,
    pub recorded_at_ms: u64,
}

/// The name of a log stream, built in one place: `thread:<id>` holds a
/// thread's history (its version is the thread's version), and
/// `cursor:<user>:<client>` a client's acknowledgements, `nudge:<user>` the outcomes of
/// the webhooks sent about the user's events.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(String);

impl StreamName {
    pub fn thread(thread_id: &ThreadId) -> StreamName {
        StreamName(format!("thread:{thread_id}"))
    }

    pub fn cursor(user_id: &UserId, client_id: &ClientId) -> StreamName {
        StreamName(format!("cursor:{user_id}:{client_id}"))
    }

    pub fn nudge(user_id: &UserId) -> StreamName {
        StreamName(format!("nudge:{user_id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for StreamName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<&str> for StreamName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}
