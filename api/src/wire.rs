//! JSON wire types of the HTTP and socket protocol (`docs/PROTOCOL.md`), and
//! the conversion of stored records into frames and audit envelopes. The
//! OpenAPI schemas (`openapi.rs`) are derived from these types (`ToSchema`),
//! so what is documented is what is serialized.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use threadline_engine::{
    Actor, AgentEventKind, Event, NudgeRecord, RunStatus, INPUT_REQUESTED, NUDGE_DELIVERED,
    NUDGE_FAILED, THREAD_EVENT_NAMES,
};
use threadline_projections::{decode_event, ProjectionError};
use threadline_storage::Record;
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::ToSchema;

use crate::error::AppError;

/// RFC 3339 UTC with milliseconds, as every timestamp on the wire.
pub fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Parses an RFC 3339 timestamp into Unix milliseconds.
pub fn parse_timestamp(s: &str) -> Result<u64, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
        .map(|t| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        })
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateThread {
    /// A UUID or a structured `thread_…` id, at most 128 chars; generated (UUID v7) when absent.
    pub thread_id: Option<String>,
    pub title: Option<String>,
    /// Any JSON object, at most 16 KiB.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// The user who will own the thread: required of agents; anyone else may only name themselves.
    pub user_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ThreadCreated {
    pub thread_id: String,
    pub user_id: String,
    pub position: u64,
    #[schema(format = DateTime)]
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ThreadSummary {
    pub thread_id: String,
    pub user_id: String,
    #[schema(required = true)]
    pub title: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub run_count: usize,
    pub last_position: u64,
    /// The thread's version: the number of events on it.
    pub version: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ThreadList {
    pub threads: Vec<ThreadSummary>,
    /// Present when more threads remain: pass it back as `after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunSummary {
    pub run_id: String,
    pub agent_name: String,
    #[schema(schema_with = run_status)]
    pub status: String,
    #[schema(format = DateTime)]
    pub registered_at: String,
    /// The type of the run's last event.
    #[schema(required = true)]
    pub last_event: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ThreadDetail {
    #[serde(flatten)]
    pub summary: ThreadSummary,
    /// The metadata the thread was created with.
    #[schema(value_type = Option<Object>, required = true)]
    pub metadata: Option<Box<RawValue>>,
    pub runs: Vec<RunSummary>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterRun {
    /// A UUID or a structured `run_…` id, at most 128 chars; generated (UUID v7) when absent.
    pub run_id: Option<String>,
    pub agent_name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunRegistered {
    pub run_id: String,
    pub thread_id: String,
    pub position: u64,
    pub thread_version: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct AgentEvent {
    #[serde(rename = "type")]
    #[schema(schema_with = agent_event_type)]
    pub kind: String,
    /// Any JSON object, at most 64 KiB.
    #[schema(value_type = Object)]
    pub data: serde_json::Map<String, serde_json::Value>,
    /// Client-supplied for idempotency; generated (UUID v7) when absent.
    #[schema(format = "uuid")]
    pub event_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchEvent {
    pub run_id: String,
    #[serde(rename = "type")]
    #[schema(schema_with = agent_event_type)]
    pub kind: String,
    /// Any JSON object, at most 64 KiB.
    #[schema(value_type = Object)]
    pub data: serde_json::Map<String, serde_json::Value>,
    /// Client-supplied for idempotency; generated (UUID v7) when absent.
    #[schema(format = "uuid")]
    pub event_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Batch {
    /// 1 to 1000 events, appended all or none.
    // 1000 is `MAX_BATCH` (an attribute takes only a literal; a test checks they agree).
    #[schema(min_items = 1, max_items = 1000)]
    pub events: Vec<BatchEvent>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventAppended {
    pub position: u64,
    pub user_seq: u64,
    pub thread_id: String,
    pub run_id: String,
    pub thread_version: u64,
    #[schema(format = "uuid")]
    pub event_id: String,
    /// The run's owner asked the agent to stop: end the run with `agent_completed`
    /// or `agent_error` (details at `GET /v1/runs/{run_id}/signals`).
    #[serde(default)]
    pub cancel_requested: bool,
    /// How many signals (a cancel request, answers) the run has had; pass it as
    /// `after` to `GET /v1/runs/{run_id}/signals` to wait for the next one.
    #[serde(default)]
    pub signals: u64,
    /// The owner's answers to the run's `agent_awaiting_input` events, by `input_id`
    /// (absent when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<InputAnswer>,
}

/// An owner's answer to an input, as an agent receives it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InputAnswer {
    pub input_id: String,
    pub answer: String,
    pub answered_by: String,
    #[schema(format = DateTime)]
    pub answered_at: String,
}

/// `POST /v1/runs/{run_id}/cancel`: the body may be left out.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRun {
    /// Why, for the agent and the audit trail; at most 16 KiB.
    pub reason: Option<String>,
}

/// `POST /v1/runs/{run_id}/input`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvideInput {
    /// The `input_id` of the run's `agent_awaiting_input`.
    pub input_id: String,
    /// The answer: for an approval, one of its `options`; at most 16 KiB.
    pub answer: String,
}

/// Where a steering event (`run_cancel_requested`, `user_input_provided`) was
/// recorded; a repeat is answered with the original (200).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SteerRecorded {
    pub run_id: String,
    pub thread_id: String,
    #[schema(schema_with = steer_event_name)]
    pub event: String,
    pub position: u64,
    pub user_seq: u64,
    pub thread_version: u64,
    #[schema(format = "uuid")]
    pub event_id: String,
    /// The user who asked (the thread's owner).
    pub by: String,
    #[schema(format = DateTime)]
    pub recorded_at: String,
}

/// `GET /v1/runs/{run_id}/signals`: what the owner asked of the run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunSignals {
    pub run_id: String,
    pub thread_id: String,
    #[schema(schema_with = run_status)]
    pub status: String,
    /// How many signals the run has had (a cancel request, answers).
    pub signals: u64,
    pub cancel_requested: bool,
    /// Present once the owner asked to stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<CancelInfo>,
    /// Every input the agent asked for, in `input_id` order.
    pub inputs: Vec<InputState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CancelInfo {
    pub requested_by: String,
    #[schema(format = DateTime)]
    pub requested_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InputState {
    pub input_id: String,
    /// The choices of an approval; empty for a question.
    pub options: Vec<String>,
    #[schema(format = DateTime)]
    pub requested_at: String,
    /// Present once the owner answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<InputAnswer>,
}

/// `GET /v1/users/{user_id}/presence`: derived from the user's open sockets.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Presence {
    pub user_id: String,
    /// A device is connected, or the last one left less than the grace period ago.
    pub online: bool,
    /// Sockets open now.
    pub devices: usize,
    /// When a device of the user was last connected (now, while one is); absent
    /// when none has been since the server started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub last_seen: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchAppended {
    /// In the order of the request's events.
    pub results: Vec<EventAppended>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Frames {
    pub events: Vec<Frame>,
    /// Pass it back as `after_version` for the next page.
    pub next_after_version: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Envelopes {
    pub events: Vec<Envelope>,
    /// The last position examined: pass it back as `after` for the next page.
    pub next_after: u64,
}

/// One event as a user sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Frame {
    #[serde(rename = "type")]
    #[schema(schema_with = frame_type)]
    pub frame_type: &'static str,
    /// The user's own dense sequence over every event of the user's threads.
    pub user_seq: u64,
    /// The global log position (dense, from 1).
    pub position: u64,
    pub thread_id: String,
    /// Dense per thread.
    pub thread_version: u64,
    /// Absent (null) for `thread_created`.
    #[schema(required = true)]
    pub run_id: Option<String>,
    #[schema(schema_with = event_name)]
    pub event: &'static str,
    #[schema(value_type = Object)]
    pub data: Box<RawValue>,
    #[schema(format = "uuid")]
    pub event_id: String,
    #[schema(format = DateTime)]
    pub recorded_at: String,
    /// A merged frame (sockets with `merge=1`) covers `from_user_seq..=user_seq`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_user_seq: Option<u64>,
    /// …and `from_thread_version..=thread_version` of its thread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_thread_version: Option<u64>,
}

/// Who appended an event.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ActorRef {
    pub sub: String,
    /// `user`, `agent` or `auditor`; `system` for the server's own `run_expired` and nudges.
    pub role: String,
}

/// One event as an auditor sees it: the frame plus owner and actor.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Envelope {
    #[serde(flatten)]
    pub frame: Frame,
    /// The thread's owner.
    pub user_id: String,
    pub actor: ActorRef,
}

/// Every error answer: `{"error":{"code","message"}}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    #[schema(inline)]
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// The stable code: clients branch on it, never on the message.
    #[schema(schema_with = error_code)]
    pub code: String,
    pub message: String,
    /// The failing event of a batch (`POST /v1/events`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    #[schema(schema_with = status_ok)]
    pub status: String,
}

/// `GET /readyz`: the server answers only once its projections caught up at start.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
    /// The position the projections have folded.
    pub projected: u64,
    /// The durable head of the log.
    pub head: u64,
    /// Why the server is not ready (present only then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A string schema that takes one of `values`.
fn one_of(values: impl IntoIterator<Item = &'static str>) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .build()
}

/// The streamed-message event types an agent appends (docs/PROTOCOL.md, issue 18).
pub const MESSAGE_EVENT_TYPES: [&str; 3] =
    ["message_started", "message_delta", "message_completed"];

/// Every agent event type an agent may append: the engine's own list, the
/// streamed-message types and `agent_awaiting_input`.
pub fn agent_event_types() -> impl Iterator<Item = &'static str> {
    AgentEventKind::ALL
        .map(|k| k.as_str())
        .into_iter()
        .chain(MESSAGE_EVENT_TYPES)
        .chain([INPUT_REQUESTED])
}

/// The agent event types.
fn agent_event_type() -> Object {
    one_of(agent_event_types())
}

/// Every `event` a frame can carry: the thread's own events and the agent event types,
/// and (in the auditor's history only) the nudges' outcomes.
fn event_name() -> Object {
    one_of(
        ["thread_created"]
            .into_iter()
            .chain(THREAD_EVENT_NAMES)
            .chain(AgentEventKind::ALL.map(|k| k.as_str()))
            .chain(MESSAGE_EVENT_TYPES)
            .chain([NUDGE_DELIVERED, NUDGE_FAILED]),
    )
}

fn steer_event_name() -> Object {
    one_of(["run_cancel_requested", "user_input_provided"])
}

fn run_status() -> Object {
    one_of(RunStatus::ALL.map(|s| s.as_str()))
}

fn frame_type() -> Object {
    one_of(["event"])
}

fn status_ok() -> Object {
    one_of(["ok"])
}

fn error_code() -> Object {
    one_of(crate::error::CODES.iter().copied())
}

fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json)
        .unwrap_or_else(|_| RawValue::from_string("{}".into()).expect("valid"))
}

/// The `data` object a frame shows for an event.
fn data_of(event: &Event) -> Box<RawValue> {
    match event {
        Event::ThreadCreated {
            title, metadata, ..
        } => raw(format!(
            "{{\"title\":{},\"metadata\":{}}}",
            serde_json::to_string(title).unwrap_or_else(|_| "null".into()),
            metadata.as_deref().unwrap_or("null")
        )),
        Event::RunRegistered { agent_name, .. } => raw(format!(
            "{{\"agent_name\":{}}}",
            serde_json::to_string(agent_name).unwrap_or_else(|_| "null".into())
        )),
        Event::AgentEventRecorded { data, .. } | Event::InputRequested { data, .. } => {
            raw(data.clone())
        }
        Event::RunCancelRequested {
            requested_by,
            reason,
            ..
        } => raw(
            serde_json::json!({"requested_by": requested_by.as_str(), "reason": reason})
                .to_string(),
        ),
        Event::InputProvided {
            input_id,
            answered_by,
            answer,
            ..
        } => raw(
            serde_json::json!({"input_id": input_id, "answer": answer, "answered_by": answered_by.as_str()})
                .to_string(),
        ),
        Event::RunExpired { .. } | Event::CursorAdvanced { .. } => raw("{}".into()),
        Event::NudgeRecorded(n) => raw(
            serde_json::json!({
                "subject": {
                    "event": n.subject_event,
                    "position": n.subject_position,
                    "user_seq": n.subject_user_seq,
                },
                "attempts": n.attempts,
                "status": n.status,
                "error": n.error,
            })
            .to_string(),
        ),
        Event::MessageStarted { message_id, .. } => {
            raw(serde_json::json!({ "message_id": message_id }).to_string())
        }
        Event::MessageDeltaAppended {
            message_id,
            seq,
            text,
            ..
        } => raw(
            serde_json::json!({ "message_id": message_id, "seq": seq, "text": text }).to_string(),
        ),
        Event::MessageCompleted {
            message_id,
            seq,
            bytes,
            ..
        } => raw(
            serde_json::json!({ "message_id": message_id, "seq": seq, "bytes": bytes }).to_string(),
        ),
    }
}

/// Decodes a record's event, as an internal error when it cannot be read.
pub fn event_of(record: &Record) -> Result<Event, AppError> {
    decode_event(&record.payload).map_err(|reason| {
        ProjectionError::Decode {
            position: record.position,
            reason,
        }
        .into()
    })
}

/// The frame of a thread event (None for events outside threads, like cursor moves).
pub fn frame(record: &Record, event: &Event, user_seq: u64) -> Option<Frame> {
    let thread_id = event.thread_id()?;
    Some(Frame {
        frame_type: "event",
        user_seq,
        position: record.position.0,
        thread_id: thread_id.to_string(),
        thread_version: record.stream_version,
        run_id: event.run_id().map(|r| r.to_string()),
        event: event.type_name(),
        data: data_of(event),
        event_id: record.event_id.to_string(),
        recorded_at: timestamp(record.recorded_at_ms),
        from_user_seq: None,
        from_thread_version: None,
    })
}

/// The auditor's frame of a nudge's outcome: its subject's thread and run, `user_seq`
/// 0 and `thread_version` 0 (it is in no user's queue and on no thread's stream).
pub fn nudge_frame(record: &Record, event: &Event, nudge: &NudgeRecord) -> Frame {
    Frame {
        frame_type: "event",
        user_seq: 0,
        position: record.position.0,
        thread_id: nudge.thread_id.to_string(),
        thread_version: 0,
        run_id: Some(nudge.run_id.to_string()),
        event: nudge.type_name(),
        data: data_of(event),
        event_id: record.event_id.to_string(),
        recorded_at: timestamp(record.recorded_at_ms),
        from_user_seq: None,
        from_thread_version: None,
    }
}

/// Who appended `record`, from the stored form of [`threadline_engine::Actor`].
pub fn actor_of(record: &Record) -> ActorRef {
    match Actor::parse_recorded(&record.actor) {
        Ok(actor) => ActorRef {
            sub: actor.user.to_string(),
            role: actor.role.to_string(),
        },
        // A record from before actors were stored, or a placeholder: shown as it is.
        Err(_) => ActorRef {
            sub: record.actor.clone(),
            role: String::new(),
        },
    }
}
