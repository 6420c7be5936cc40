//! The write-side rules: `decide` checks a command against the registry and yields the
//! events to append, or the reason it may not happen. Pure: the clock is a parameter.

use crate::command::{Command, Limits};
use crate::error::DomainError;
use crate::event::{AgentEventKind, Event, NudgeRecord};
use crate::ids::{Actor, ClientId, MessageId, Role, RunId, ThreadId, UserId};
use crate::state::{is_idle, MessageState, Registry, Run, RunStatus};

/// Role checks come first (403), then existence (404), then everything else, so a caller
/// without the right never learns whether a thread or run exists.
pub fn decide(
    state: &Registry,
    actor: &Actor,
    command: Command,
    now_ms: u64,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    authorize(state, actor, &command)?;
    match command {
        Command::CreateThread {
            thread_id,
            owner,
            title,
            metadata,
        } => create_thread(state, thread_id, owner, title, metadata, limits),
        Command::RegisterRun {
            thread_id,
            run_id,
            agent_name,
        } => register_run(state, thread_id, run_id, agent_name, limits),
        Command::RecordAgentEvent {
            run_id,
            kind,
            data,
            tool_call_id,
        } => record_agent_event(state, run_id, kind, data, tool_call_id, now_ms, limits),
        Command::ExpireRun { run_id } => expire_run(state, run_id, now_ms, limits),
        Command::AcknowledgeDelivery {
            user_id,
            client_id,
            user_seq,
        } => acknowledge(user_id, client_id, user_seq),
        Command::StartMessage { run_id, message_id } => {
            start_message(state, run_id, message_id, now_ms, limits)
        }
        Command::AppendDelta {
            run_id,
            message_id,
            seq,
            text,
        } => append_delta(state, run_id, message_id, seq, text, now_ms, limits),
        Command::CompleteMessage { run_id, message_id } => {
            complete_message(state, run_id, message_id, now_ms, limits)
        }
        Command::AwaitInput {
            run_id,
            input_id,
            options,
            data,
        } => await_input(state, run_id, input_id, options, data, now_ms, limits),
        Command::RequestCancel { run_id, reason } => {
            request_cancel(state, actor, run_id, reason, now_ms, limits)
        }
        Command::ProvideInput {
            run_id,
            input_id,
            answer,
        } => provide_input(state, actor, run_id, input_id, answer, limits),
        Command::RecordNudge(record) => record_nudge(record),
    }
}

/// The checks that come before any other: may `actor` issue `command` at all (403), and
/// does it see what the command names (404: another user's thread answers exactly like a
/// missing one). [`decide`] runs them first, and a repeated `event_id` is answered only
/// after they pass, so an idempotency key never reveals what the caller may not see.
pub fn authorize(state: &Registry, actor: &Actor, command: &Command) -> Result<(), DomainError> {
    match actor.role {
        Role::Auditor => return Err(forbidden("auditors are read-only")),
        Role::System if !matches!(command, Command::ExpireRun { .. } | Command::RecordNudge(_)) => {
            return Err(forbidden(
                "the system actor may only expire runs and record nudges",
            ))
        }
        _ => {}
    }
    match command {
        Command::CreateThread { owner, .. } => {
            if actor.role == Role::User && *owner != actor.user {
                return Err(forbidden("users may only create threads for themselves"));
            }
        }
        Command::RegisterRun { thread_id, .. } => {
            let visible = state
                .thread(thread_id)
                .is_some_and(|t| actor.role != Role::User || t.owner == actor.user);
            if !visible {
                return Err(DomainError::ThreadNotFound(thread_id.clone()));
            }
        }
        Command::RecordAgentEvent { run_id, .. }
        | Command::StartMessage { run_id, .. }
        | Command::AppendDelta { run_id, .. }
        | Command::CompleteMessage { run_id, .. }
        | Command::AwaitInput { run_id, .. } => {
            if actor.role != Role::Agent {
                return Err(forbidden("only agents may append agent events"));
            }
            if state.run(run_id).is_none() {
                return Err(DomainError::RunNotFound(run_id.clone()));
            }
        }
        Command::ExpireRun { run_id } => {
            if !matches!(actor.role, Role::System | Role::Agent) {
                return Err(forbidden("only the system or an agent may expire runs"));
            }
            if state.run(run_id).is_none() {
                return Err(DomainError::RunNotFound(run_id.clone()));
            }
        }
        // Only the thread's owner steers its runs; anyone else's run answers like a
        // missing one, and agents (who act, not steer) are refused outright.
        Command::RequestCancel { run_id, .. } | Command::ProvideInput { run_id, .. } => {
            if actor.role != Role::User {
                return Err(forbidden("only the thread's owner may steer its runs"));
            }
            let owned = state
                .run(run_id)
                .and_then(|r| state.thread(&r.thread_id))
                .is_some_and(|t| t.owner == actor.user);
            if !owned {
                return Err(DomainError::RunNotFound(run_id.clone()));
            }
        }
        Command::RecordNudge(_) => {
            if actor.role != Role::System {
                return Err(forbidden("only the system records nudges"));
            }
        }
        Command::AcknowledgeDelivery { user_id, .. } => {
            if actor.role != Role::User || actor.user != *user_id {
                return Err(forbidden(
                    "only the user itself may acknowledge its delivery",
                ));
            }
        }
    }
    Ok(())
}

fn forbidden(reason: &str) -> DomainError {
    DomainError::Forbidden(reason.to_owned())
}

fn create_thread(
    state: &Registry,
    thread_id: ThreadId,
    owner: UserId,
    title: Option<String>,
    metadata: Option<String>,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    if state.thread(&thread_id).is_some() {
        return Err(DomainError::ThreadExists(thread_id));
    }
    if state.thread_count(&owner) >= limits.max_threads_per_user {
        return Err(DomainError::QuotaExceeded {
            what: "threads per user",
            limit: limits.max_threads_per_user,
        });
    }
    if title
        .as_deref()
        .is_some_and(|t| t.chars().count() > limits.max_title_chars)
    {
        return Err(DomainError::TooLarge {
            what: "title",
            limit: limits.max_title_chars,
        });
    }
    if metadata
        .as_deref()
        .is_some_and(|m| m.len() > limits.max_metadata_bytes)
    {
        return Err(DomainError::TooLarge {
            what: "metadata",
            limit: limits.max_metadata_bytes,
        });
    }
    Ok(vec![Event::ThreadCreated {
        thread_id,
        owner,
        title,
        metadata,
    }])
}

fn register_run(
    state: &Registry,
    thread_id: ThreadId,
    run_id: RunId,
    agent_name: String,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    if agent_name.trim().is_empty() {
        return Err(DomainError::InvalidInput(
            "agent_name must not be empty".to_owned(),
        ));
    }
    if agent_name.chars().count() > limits.max_agent_name_chars {
        return Err(DomainError::TooLarge {
            what: "agent_name",
            limit: limits.max_agent_name_chars,
        });
    }
    // Checked globally: a run id belongs to exactly one thread forever.
    if state.run(&run_id).is_some() {
        return Err(DomainError::RunExists(run_id));
    }
    Ok(vec![Event::RunRegistered {
        thread_id,
        run_id,
        agent_name,
    }])
}

fn record_agent_event(
    state: &Registry,
    run_id: RunId,
    kind: AgentEventKind,
    data: String,
    tool_call_id: Option<String>,
    now_ms: u64,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    let Some(run) = state.run(&run_id) else {
        return Err(DomainError::RunNotFound(run_id));
    };
    if data.len() > limits.max_data_bytes {
        return Err(DomainError::TooLarge {
            what: "data",
            limit: limits.max_data_bytes,
        });
    }
    match run.status {
        RunStatus::Completed | RunStatus::Failed => return Err(DomainError::RunClosed(run_id)),
        RunStatus::Expired => return Err(DomainError::RunExpired(run_id)),
        // Expiry is appended by a sweeper; until it lands, an idle run is already dead.
        RunStatus::Registered | RunStatus::Running if is_idle(run, now_ms, limits.run_ttl_ms) => {
            return Err(DomainError::RunExpired(run_id))
        }
        RunStatus::Registered | RunStatus::Running => {}
    }
    if tool_call_id
        .as_deref()
        .is_some_and(|id| id.len() > limits.max_tool_call_id_bytes)
    {
        return Err(DomainError::TooLarge {
            what: "data.tool_call_id",
            limit: limits.max_tool_call_id_bytes,
        });
    }
    // A quota is a conflict (409), judged before the lifecycle (422).
    if kind == AgentEventKind::ToolExecuting
        && tool_call_id.is_some()
        && run.open_tool_calls.len() >= limits.max_open_tool_calls
    {
        return Err(DomainError::QuotaExceeded {
            what: "open tool calls per run",
            limit: limits.max_open_tool_calls as u64,
        });
    }
    let lifecycle = |msg: String| Err(DomainError::InvalidLifecycle(msg));
    match (run.status, kind, tool_call_id.as_deref()) {
        (RunStatus::Registered, AgentEventKind::Started, _) => {}
        (RunStatus::Registered, _, _) => {
            return lifecycle("agent_started must come first".to_owned())
        }
        (_, AgentEventKind::Started, _) => {
            return lifecycle(format!("run {run_id} has already started"))
        }
        (_, AgentEventKind::ToolExecuting, Some(id)) if run.open_tool_calls.contains(id) => {
            return lifecycle(format!("tool call {id} is already executing"))
        }
        (_, AgentEventKind::ToolCompleted, Some(id)) if !run.open_tool_calls.contains(id) => {
            return lifecycle(format!(
                "tool_completed for {id} has no open tool_executing with that id"
            ))
        }

        _ => {}
    }
    Ok(vec![Event::AgentEventRecorded {
        thread_id: run.thread_id.clone(),
        run_id,
        kind,
        data,
        tool_call_id,
    }])
}

fn expire_run(
    state: &Registry,
    run_id: RunId,
    now_ms: u64,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    let Some(run) = state.run(&run_id) else {
        return Err(DomainError::RunNotFound(run_id));
    };
    // Idempotent so a sweeper racing with another one, or with a late agent event, is harmless.
    if !run.status.is_open() || !is_idle(run, now_ms, limits.run_ttl_ms) {
        return Ok(vec![]);
    }
    Ok(vec![Event::RunExpired {
        thread_id: run.thread_id.clone(),
        run_id,
    }])
}

fn acknowledge(
    user_id: UserId,
    client_id: ClientId,
    user_seq: u64,
) -> Result<Vec<Event>, DomainError> {
    if user_seq == 0 {
        return Err(DomainError::InvalidInput(
            "user_seq must be at least 1".to_owned(),
        ));
    }
    Ok(vec![Event::CursorAdvanced {
        user_id,
        client_id,
        user_seq,
    }])
}

/// The run a message command acts on, if it still takes events: closed runs are
/// 409, and a run that has not started yet is 422 (the lifecycle).
fn running_run<'a>(
    state: &'a Registry,
    run_id: &RunId,
    now_ms: u64,
    limits: &Limits,
) -> Result<&'a Run, DomainError> {
    let Some(run) = state.run(run_id) else {
        return Err(DomainError::RunNotFound(run_id.clone()));
    };
    match run.status {
        RunStatus::Completed | RunStatus::Failed => Err(DomainError::RunClosed(run_id.clone())),
        RunStatus::Expired => Err(DomainError::RunExpired(run_id.clone())),
        _ if is_idle(run, now_ms, limits.run_ttl_ms) => {
            Err(DomainError::RunExpired(run_id.clone()))
        }
        RunStatus::Registered => Err(DomainError::InvalidLifecycle(
            "agent_started must come first".to_owned(),
        )),
        RunStatus::Running => Ok(run),
    }
}

fn start_message(
    state: &Registry,
    run_id: RunId,
    message_id: MessageId,
    now_ms: u64,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    let run = running_run(state, &run_id, now_ms, limits)?;
    if run.messages.contains_key(&message_id) {
        return Err(DomainError::MessageExists(message_id));
    }
    if run.messages.values().filter(|m| m.open).count() >= limits.max_open_messages {
        return Err(DomainError::QuotaExceeded {
            what: "open messages per run",
            limit: limits.max_open_messages as u64,
        });
    }
    Ok(vec![Event::MessageStarted {
        thread_id: run.thread_id.clone(),
        run_id,
        message_id,
    }])
}

/// Most text one delta may carry, so that its frame (and any frame merging it)
/// stays within the contract's 64 KiB frame limit.
pub const MAX_DELTA_BYTES: usize = 32 * 1024;

/// A message still open in a running run: the one rule both a delta and a completion keep.
fn open_message<'a>(
    state: &'a Registry,
    run_id: &RunId,
    message_id: &MessageId,
    now_ms: u64,
    limits: &Limits,
) -> Result<(&'a Run, &'a MessageState), DomainError> {
    let run = running_run(state, run_id, now_ms, limits)?;
    let Some(message) = run.messages.get(message_id) else {
        return Err(DomainError::MessageNotFound(message_id.clone()));
    };
    if !message.open {
        return Err(DomainError::MessageClosed(message_id.clone()));
    }
    Ok((run, message))
}

fn append_delta(
    state: &Registry,
    run_id: RunId,
    message_id: MessageId,
    seq: u64,
    text: String,
    now_ms: u64,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    let (run, message) = open_message(state, &run_id, &message_id, now_ms, limits)?;
    if text.len() > MAX_DELTA_BYTES {
        return Err(DomainError::TooLarge {
            what: "a delta's text",
            limit: MAX_DELTA_BYTES,
        });
    }
    let len = text.len() as u64;
    if message.bytes + len > limits.max_message_bytes {
        return Err(DomainError::TooLarge {
            what: "message text",
            limit: usize::try_from(limits.max_message_bytes).unwrap_or(usize::MAX),
        });
    }
    if run.message_bytes + len > limits.max_run_message_bytes {
        return Err(DomainError::TooLarge {
            what: "the run's message text",
            limit: usize::try_from(limits.max_run_message_bytes).unwrap_or(usize::MAX),
        });
    }
    let retry_after_ms = 1000 - now_ms % 1000;
    if message.delta_rate.used(now_ms) >= limits.max_message_deltas_per_sec {
        return Err(DomainError::RateLimited {
            what: "deltas per second per message",
            limit: limits.max_message_deltas_per_sec,
            retry_after_ms,
        });
    }
    if run.delta_rate.used(now_ms) >= limits.max_run_deltas_per_sec {
        return Err(DomainError::RateLimited {
            what: "deltas per second per run",
            limit: limits.max_run_deltas_per_sec,
            retry_after_ms,
        });
    }
    if seq != message.seq + 1 {
        return Err(DomainError::SequenceGap {
            message_id,
            expected: message.seq + 1,
            got: seq,
        });
    }
    Ok(vec![Event::MessageDeltaAppended {
        thread_id: run.thread_id.clone(),
        run_id,
        message_id,
        seq,
        text,
    }])
}

fn complete_message(
    state: &Registry,
    run_id: RunId,
    message_id: MessageId,
    now_ms: u64,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    let (run, message) = open_message(state, &run_id, &message_id, now_ms, limits)?;
    Ok(vec![Event::MessageCompleted {
        thread_id: run.thread_id.clone(),
        run_id,
        message_id,
        seq: message.seq,
        bytes: message.bytes,
    }])
}

/// Whether a run still takes events at `now_ms`: closed and expired runs refuse.
fn ensure_open(run: &Run, now_ms: u64, limits: &Limits) -> Result<(), DomainError> {
    match run.status {
        RunStatus::Completed | RunStatus::Failed => Err(DomainError::RunClosed(run.run_id.clone())),
        RunStatus::Expired => Err(DomainError::RunExpired(run.run_id.clone())),
        _ if is_idle(run, now_ms, limits.run_ttl_ms) => {
            Err(DomainError::RunExpired(run.run_id.clone()))
        }
        RunStatus::Registered | RunStatus::Running => Ok(()),
    }
}

fn await_input(
    state: &Registry,
    run_id: RunId,
    input_id: String,
    options: Vec<String>,
    data: String,
    now_ms: u64,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    let Some(run) = state.run(&run_id) else {
        return Err(DomainError::RunNotFound(run_id));
    };
    if data.len() > limits.max_data_bytes {
        return Err(DomainError::TooLarge {
            what: "data",
            limit: limits.max_data_bytes,
        });
    }
    ensure_open(run, now_ms, limits)?;
    if input_id.is_empty() || input_id.len() > limits.max_tool_call_id_bytes {
        return Err(DomainError::InvalidInput(format!(
            "data.input_id must be 1 to {} bytes",
            limits.max_tool_call_id_bytes
        )));
    }
    if options.iter().any(|o| o.is_empty()) {
        return Err(DomainError::InvalidInput(
            "data.options must be non-empty strings".to_owned(),
        ));
    }
    if run.inputs.len() >= limits.max_inputs_per_run {
        return Err(DomainError::QuotaExceeded {
            what: "inputs per run",
            limit: limits.max_inputs_per_run as u64,
        });
    }
    if run.status == RunStatus::Registered {
        return Err(DomainError::InvalidLifecycle(
            "agent_started must come first".to_owned(),
        ));
    }
    if run.inputs.contains_key(&input_id) {
        return Err(DomainError::InvalidLifecycle(format!(
            "input {input_id} was already requested on this run"
        )));
    }
    Ok(vec![Event::InputRequested {
        thread_id: run.thread_id.clone(),
        run_id,
        input_id,
        options,
        data,
    }])
}

/// A second request to cancel the same run changes nothing (no event): the
/// first one stands, and the caller is answered with it.
fn request_cancel(
    state: &Registry,
    actor: &Actor,
    run_id: RunId,
    reason: Option<String>,
    now_ms: u64,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    let Some(run) = state.run(&run_id) else {
        return Err(DomainError::RunNotFound(run_id));
    };
    if reason
        .as_deref()
        .is_some_and(|r| r.len() > limits.max_answer_bytes)
    {
        return Err(DomainError::TooLarge {
            what: "reason",
            limit: limits.max_answer_bytes,
        });
    }
    ensure_open(run, now_ms, limits)?;
    if run.cancel.is_some() {
        return Ok(vec![]);
    }
    Ok(vec![Event::RunCancelRequested {
        thread_id: run.thread_id.clone(),
        run_id,
        requested_by: actor.user.clone(),
        reason,
    }])
}

/// Idempotent by `input_id`: the same answer again records nothing (the caller
/// is answered with the original), a different one is `InputAnswered` (409).
/// A repeat is judged before the run's lifecycle, so it is answered the same
/// after the run ended.
fn provide_input(
    state: &Registry,
    actor: &Actor,
    run_id: RunId,
    input_id: String,
    answer: String,
    limits: &Limits,
) -> Result<Vec<Event>, DomainError> {
    let Some(run) = state.run(&run_id) else {
        return Err(DomainError::RunNotFound(run_id));
    };
    if answer.len() > limits.max_answer_bytes {
        return Err(DomainError::TooLarge {
            what: "answer",
            limit: limits.max_answer_bytes,
        });
    }
    let Some(input) = run.inputs.get(&input_id) else {
        return Err(DomainError::InputNotFound(input_id));
    };
    match &input.answer {
        Some(given) if given.answer == answer => return Ok(vec![]),
        Some(_) => return Err(DomainError::InputAnswered(input_id)),
        None => {}
    }
    // An input is open only while its run is: no expiry check here, since an owner
    // answering is activity that keeps the run alive (like any event on it).
    match run.status {
        RunStatus::Completed | RunStatus::Failed => return Err(DomainError::RunClosed(run_id)),
        RunStatus::Expired => return Err(DomainError::RunExpired(run_id)),
        RunStatus::Registered | RunStatus::Running => {}
    }
    if !input.options.is_empty() && !input.options.contains(&answer) {
        return Err(DomainError::InvalidInput(format!(
            "answer must be one of the input's options: {}",
            input.options.join(", ")
        )));
    }
    Ok(vec![Event::InputProvided {
        thread_id: run.thread_id.clone(),
        run_id,
        input_id,
        answered_by: actor.user.clone(),
        answer,
    }])
}

/// Longest `error` a nudge record keeps, in bytes (a receiver's message is cut to fit).
pub const MAX_NUDGE_ERROR_BYTES: usize = 512;

/// A nudge's outcome, as the webhook worker saw it. The log's event id (derived from
/// the subject) keeps it to one record per subject.
fn record_nudge(record: NudgeRecord) -> Result<Vec<Event>, DomainError> {
    if record
        .error
        .as_deref()
        .is_some_and(|e| e.len() > MAX_NUDGE_ERROR_BYTES)
    {
        return Err(DomainError::TooLarge {
            what: "a nudge's error",
            limit: MAX_NUDGE_ERROR_BYTES,
        });
    }
    Ok(vec![Event::NudgeRecorded(record)])
}
