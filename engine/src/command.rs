//! Commands (imperative) that `decide` turns into events, and the size limits it enforces.

use crate::event::{AgentEventKind, Event, NudgeRecord};
use crate::ids::{ClientId, MessageId, RunId, ThreadId, UserId};

#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    CreateThread {
        thread_id: ThreadId,
        owner: UserId,
        title: Option<String>,
        metadata: Option<String>,
    },
    RegisterRun {
        thread_id: ThreadId,
        run_id: RunId,
        agent_name: String,
    },
    RecordAgentEvent {
        run_id: RunId,
        kind: AgentEventKind,
        data: String,
        tool_call_id: Option<String>,
    },
    ExpireRun {
        run_id: RunId,
    },
    AcknowledgeDelivery {
        user_id: UserId,
        client_id: ClientId,
        user_seq: u64,
    },
    /// Open a streamed message in a running run.
    StartMessage {
        run_id: RunId,
        message_id: MessageId,
    },
    /// Append delta `seq` (the message's last + 1) to an open message.
    AppendDelta {
        run_id: RunId,
        message_id: MessageId,
        seq: u64,
        text: String,
    },
    /// Complete an open message.
    CompleteMessage {
        run_id: RunId,
        message_id: MessageId,
    },
    /// The agent asks the thread's owner something (`agent_awaiting_input`).
    AwaitInput {
        run_id: RunId,
        input_id: String,
        /// The choices of an approval; empty for a free-form question.
        options: Vec<String>,
        /// JSON object text; opaque to the engine.
        data: String,
    },
    /// The thread's owner asks the agent to stop the run.
    RequestCancel {
        run_id: RunId,
        reason: Option<String>,
    },
    /// The thread's owner answers an `agent_awaiting_input`.
    ProvideInput {
        run_id: RunId,
        input_id: String,
        answer: String,
    },
    /// The system records a nudge's outcome (`nudge_delivered` / `nudge_failed`).
    RecordNudge(NudgeRecord),
}

impl Command {
    /// Whether `event` is exactly what this command records: the same thread or run, the
    /// same type and the same data. A repeated `event_id` is answered with the original
    /// only when this holds; otherwise the id is in conflict.
    pub fn repeats(&self, event: &Event) -> bool {
        match (self, event) {
            (
                Command::CreateThread {
                    thread_id,
                    owner,
                    title,
                    metadata,
                },
                Event::ThreadCreated {
                    thread_id: t,
                    owner: o,
                    title: ti,
                    metadata: m,
                },
            ) => thread_id == t && owner == o && title == ti && metadata == m,
            (
                Command::RegisterRun {
                    thread_id,
                    run_id,
                    agent_name,
                },
                Event::RunRegistered {
                    thread_id: t,
                    run_id: r,
                    agent_name: a,
                },
            ) => thread_id == t && run_id == r && agent_name == a,
            (
                Command::RecordAgentEvent {
                    run_id,
                    kind,
                    data,
                    tool_call_id,
                },
                Event::AgentEventRecorded {
                    run_id: r,
                    kind: k,
                    data: d,
                    tool_call_id: c,
                    ..
                },
            ) => run_id == r && kind == k && data == d && tool_call_id == c,
            (Command::ExpireRun { run_id }, Event::RunExpired { run_id: r, .. }) => run_id == r,
            (
                Command::AcknowledgeDelivery {
                    user_id,
                    client_id,
                    user_seq,
                },
                Event::CursorAdvanced {
                    user_id: u,
                    client_id: c,
                    user_seq: s,
                },
            ) => user_id == u && client_id == c && user_seq == s,
            (
                Command::StartMessage { run_id, message_id },
                Event::MessageStarted {
                    run_id: r,
                    message_id: m,
                    ..
                },
            ) => run_id == r && message_id == m,
            (
                Command::AppendDelta {
                    run_id,
                    message_id,
                    seq,
                    text,
                },
                Event::MessageDeltaAppended {
                    run_id: r,
                    message_id: m,
                    seq: s,
                    text: t,
                    ..
                },
            ) => run_id == r && message_id == m && seq == s && text == t,
            (
                Command::CompleteMessage { run_id, message_id },
                Event::MessageCompleted {
                    run_id: r,
                    message_id: m,
                    ..
                },
            ) => run_id == r && message_id == m,
            (
                Command::AwaitInput {
                    run_id,
                    input_id,
                    options,
                    data,
                },
                Event::InputRequested {
                    run_id: r,
                    input_id: i,
                    options: o,
                    data: d,
                    ..
                },
            ) => run_id == r && input_id == i && options == o && data == d,
            (
                Command::RequestCancel { run_id, reason },
                Event::RunCancelRequested {
                    run_id: r,
                    reason: why,
                    ..
                },
            ) => run_id == r && reason == why,
            (
                Command::ProvideInput {
                    run_id,
                    input_id,
                    answer,
                },
                Event::InputProvided {
                    run_id: r,
                    input_id: i,
                    answer: a,
                    ..
                },
            ) => run_id == r && input_id == i && answer == a,
            // One outcome per subject: whichever was recorded first stands, so a second
            // recording (a retry after a restart) is answered with it, never a conflict.
            (Command::RecordNudge(n), Event::NudgeRecorded(m)) => {
                n.user_id == m.user_id && n.subject_position == m.subject_position
            }
            _ => false,
        }
    }

    /// The run a command acts on, if any.
    pub fn run_id(&self) -> Option<&RunId> {
        match self {
            Command::RegisterRun { run_id, .. }
            | Command::RecordAgentEvent { run_id, .. }
            | Command::ExpireRun { run_id }
            | Command::StartMessage { run_id, .. }
            | Command::AppendDelta { run_id, .. }
            | Command::CompleteMessage { run_id, .. }
            | Command::AwaitInput { run_id, .. }
            | Command::RequestCancel { run_id, .. }
            | Command::ProvideInput { run_id, .. } => Some(run_id),
            Command::CreateThread { .. }
            | Command::AcknowledgeDelivery { .. }
            | Command::RecordNudge(_) => None,
        }
    }
}

/// What `decide` bounds: sizes, per-user quotas and the run TTL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_data_bytes: usize,
    pub max_title_chars: usize,
    pub max_metadata_bytes: usize,
    pub max_agent_name_chars: usize,
    /// A run idle longer than this is expired.
    pub run_ttl_ms: u64,
    /// Threads one user may own.
    pub max_threads_per_user: u64,
    /// `tool_executing` calls a run may have open (not yet completed) at once.
    pub max_open_tool_calls: usize,
    /// Longest `data.tool_call_id` (and `input_id`), in bytes.
    pub max_tool_call_id_bytes: usize,
    /// Streamed messages: total text bytes of one message…
    pub max_message_bytes: u64,
    /// …and of all messages of one run.
    pub max_run_message_bytes: u64,
    /// Deltas one message may take per second (of the clock), and one run.
    pub max_message_deltas_per_sec: u32,
    pub max_run_deltas_per_sec: u32,
    /// Messages one run may have open at once.
    pub max_open_messages: usize,
    /// `agent_awaiting_input` requests one run may make.
    pub max_inputs_per_run: usize,
    /// Longest answer to an input, and longest cancel reason, in bytes.
    pub max_answer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_data_bytes: 64 * 1024,
            max_title_chars: 512,
            max_metadata_bytes: 16 * 1024,
            max_agent_name_chars: 128,
            run_ttl_ms: 24 * 60 * 60 * 1000,
            max_threads_per_user: 10_000,
            max_open_tool_calls: 128,
            max_tool_call_id_bytes: 128,
            max_message_bytes: 1024 * 1024,
            max_run_message_bytes: 8 * 1024 * 1024,
            max_message_deltas_per_sec: 200,
            max_run_deltas_per_sec: 500,
            max_open_messages: 16,
            max_inputs_per_run: 32,
            max_answer_bytes: 16 * 1024,
        }
    }
}
