//! JSON wire types of the HTTP and socket protocol (`docs/PROTOCOL.md`), and
//! the conversion of stored records into frames and audit envelopes.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use threadline_engine::{Actor, Event};
use threadline_projections::{decode_event, ProjectionError};
use threadline_storage::Record;

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

#[derive(Debug, Deserialize)]
pub struct CreateThread {
    pub thread_id: Option<String>,
    pub title: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub user_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ThreadCreated {
    pub thread_id: String,
    pub user_id: String,
    pub position: u64,
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ThreadSummary {
    pub thread_id: String,
    pub user_id: String,
    pub title: Option<String>,
    pub created_at: String,
    pub run_count: usize,
    pub last_position: u64,
    pub version: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ThreadList {
    pub threads: Vec<ThreadSummary>,
    /// Present when more threads remain: pass it back as `after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    pub agent_name: String,
    pub status: String,
    pub registered_at: String,
    pub last_event: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ThreadDetail {
    #[serde(flatten)]
    pub summary: ThreadSummary,
    pub metadata: Option<Box<RawValue>>,
    pub runs: Vec<RunSummary>,
}

#[derive(Debug, Deserialize)]
pub struct RegisterRun {
    pub run_id: Option<String>,
    pub agent_name: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RunRegistered {
    pub run_id: String,
    pub thread_id: String,
    pub position: u64,
    pub thread_version: u64,
}

#[derive(Debug, Deserialize)]
pub struct AgentEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: serde_json::Map<String, serde_json::Value>,
    pub event_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct BatchEvent {
    pub run_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: serde_json::Map<String, serde_json::Value>,
    pub event_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Batch {
    pub events: Vec<BatchEvent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventAppended {
    pub position: u64,
    pub user_seq: u64,
    pub thread_id: String,
    pub run_id: String,
    pub thread_version: u64,
    pub event_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BatchAppended {
    pub results: Vec<EventAppended>,
}

#[derive(Debug, Serialize)]
pub struct Frames {
    pub events: Vec<Frame>,
    pub next_after_version: u64,
}

#[derive(Debug, Serialize)]
pub struct Envelopes {
    pub events: Vec<Envelope>,
    pub next_after: u64,
}

/// One event as a user sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    #[serde(rename = "type")]
    pub frame_type: &'static str,
    pub user_seq: u64,
    pub position: u64,
    pub thread_id: String,
    pub thread_version: u64,
    pub run_id: Option<String>,
    pub event: &'static str,
    pub data: Box<RawValue>,
    pub event_id: String,
    pub recorded_at: String,
    /// A merged frame (sockets with `merge=1`) covers `from_user_seq..=user_seq`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_user_seq: Option<u64>,
    /// …and `from_thread_version..=thread_version` of its thread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_thread_version: Option<u64>,
}

/// Who appended an event.
#[derive(Debug, Clone, Serialize)]
pub struct ActorRef {
    pub sub: String,
    pub role: String,
}

/// One event as an auditor sees it: the frame plus owner and actor.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    #[serde(flatten)]
    pub frame: Frame,
    pub user_id: String,
    pub actor: ActorRef,
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
        Event::AgentEventRecorded { data, .. } => raw(data.clone()),
        Event::RunExpired { .. } | Event::CursorAdvanced { .. } => raw("{}".into()),
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
