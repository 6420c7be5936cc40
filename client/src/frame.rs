//! The socket's frames as this client reads them (docs/PROTOCOL.md): the server's
//! messages, and events with typed payloads for the three system and six agent types.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The `data` object of an agent event: free-form JSON, as the agent sent it.
pub type Data = Map<String, Value>;

/// One event of the user's threads, as delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The user's own dense sequence: 1, 2, 3 … over every event of the user's threads.
    pub user_seq: u64,
    /// The global log position.
    pub position: u64,
    pub thread_id: String,
    /// Dense per thread.
    pub thread_version: u64,
    /// The run, for run and agent events.
    pub run_id: Option<String>,
    pub event_id: String,
    /// RFC 3339 UTC with milliseconds.
    pub recorded_at: String,
    pub payload: Payload,
    /// A merged frame (streamed message deltas, see docs/PROTOCOL.md) covers
    /// `from_user_seq..=user_seq`; `None` for a frame of one event.
    pub from_user_seq: Option<u64>,
    /// …and `from_thread_version..=thread_version`.
    pub from_thread_version: Option<u64>,
    /// For `message_started` / `message_delta` / `message_completed`: the message's text
    /// accumulated so far, with what this frame added.
    pub message: Option<Box<MessageText>>,
}

/// A streamed message as this client has accumulated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageText {
    pub message_id: String,
    /// The text this frame added (the `onDelta` of a UI).
    pub delta: String,
    /// Everything received of the message so far, `delta` included.
    pub text: String,
    /// The last delta's `seq`.
    pub seq: u64,
    /// True once `message_completed` arrived (the run's end completes it too).
    pub complete: bool,
    /// True when this client joined after the message began (it has only the tail).
    pub partial: bool,
}

/// What happened, by event type.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// `thread_created`
    ThreadCreated {
        title: Option<String>,
        metadata: Option<Value>,
    },
    /// `run_registered`
    RunRegistered { agent_name: String },
    /// `run_expired`: the run was idle past the server's TTL.
    RunExpired,
    /// `agent_started`
    AgentStarted(Data),
    /// `agent_thinking`
    AgentThinking(Data),
    /// `tool_executing`; `data.tool_call_id` names the call when given.
    ToolExecuting(Data),
    /// `tool_completed`; `data.tool_call_id` matches an earlier `tool_executing`.
    ToolCompleted(Data),
    /// `agent_completed` (terminal)
    AgentCompleted(Data),
    /// `agent_error` (terminal)
    AgentError(Data),
    /// A type this client does not know (a later protocol version), kept as it came.
    Other { event: String, data: Value },
}

impl Payload {
    fn parse(event: String, data: Value) -> Payload {
        let object = |d: &Value| d.as_object().cloned().unwrap_or_default();
        match event.as_str() {
            "thread_created" => Payload::ThreadCreated {
                title: data["title"].as_str().map(str::to_owned),
                metadata: Some(data["metadata"].clone()).filter(|m| !m.is_null()),
            },
            "run_registered" => Payload::RunRegistered {
                agent_name: data["agent_name"].as_str().unwrap_or_default().to_owned(),
            },
            "run_expired" => Payload::RunExpired,
            "agent_started" => Payload::AgentStarted(object(&data)),
            "agent_thinking" => Payload::AgentThinking(object(&data)),
            "tool_executing" => Payload::ToolExecuting(object(&data)),
            "tool_completed" => Payload::ToolCompleted(object(&data)),
            "agent_completed" => Payload::AgentCompleted(object(&data)),
            "agent_error" => Payload::AgentError(object(&data)),
            _ => Payload::Other { event, data },
        }
    }

    /// The wire name of the event type (`thread_created`, `agent_thinking`, …).
    pub fn event_type(&self) -> &str {
        match self {
            Payload::ThreadCreated { .. } => "thread_created",
            Payload::RunRegistered { .. } => "run_registered",
            Payload::RunExpired => "run_expired",
            Payload::AgentStarted(_) => "agent_started",
            Payload::AgentThinking(_) => "agent_thinking",
            Payload::ToolExecuting(_) => "tool_executing",
            Payload::ToolCompleted(_) => "tool_completed",
            Payload::AgentCompleted(_) => "agent_completed",
            Payload::AgentError(_) => "agent_error",
            Payload::Other { event, .. } => event,
        }
    }

    /// The `data` object as it was on the wire.
    pub fn data(&self) -> Value {
        match self {
            Payload::ThreadCreated { title, metadata } => {
                json!({"title": title, "metadata": metadata})
            }
            Payload::RunRegistered { agent_name } => json!({ "agent_name": agent_name }),
            Payload::RunExpired => json!({}),
            Payload::AgentStarted(d)
            | Payload::AgentThinking(d)
            | Payload::ToolExecuting(d)
            | Payload::ToolCompleted(d)
            | Payload::AgentCompleted(d)
            | Payload::AgentError(d) => Value::Object(d.clone()),
            Payload::Other { data, .. } => data.clone(),
        }
    }

    /// The agent data, for the six agent event types.
    pub fn agent_data(&self) -> Option<&Data> {
        match self {
            Payload::AgentStarted(d)
            | Payload::AgentThinking(d)
            | Payload::ToolExecuting(d)
            | Payload::ToolCompleted(d)
            | Payload::AgentCompleted(d)
            | Payload::AgentError(d) => Some(d),
            _ => None,
        }
    }

    /// `data.tool_call_id` of a tool event.
    pub fn tool_call_id(&self) -> Option<&str> {
        match self {
            Payload::ToolExecuting(d) | Payload::ToolCompleted(d) => {
                d.get("tool_call_id").and_then(Value::as_str)
            }
            _ => None,
        }
    }

    /// Whether this ends its run (`agent_completed`, `agent_error`, `run_expired`).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Payload::AgentCompleted(_) | Payload::AgentError(_) | Payload::RunExpired
        )
    }
}

impl Event {
    /// The event as one line of JSON in the frame's own field order
    /// (`{"type":"event","user_seq":…}`).
    pub fn to_frame_json(&self) -> String {
        #[derive(Serialize)]
        struct Frame<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            user_seq: u64,
            position: u64,
            thread_id: &'a str,
            thread_version: u64,
            run_id: Option<&'a str>,
            event: &'a str,
            data: Value,
            event_id: &'a str,
            recorded_at: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            from_user_seq: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            from_thread_version: Option<u64>,
        }
        let frame = Frame {
            kind: "event",
            user_seq: self.user_seq,
            position: self.position,
            thread_id: &self.thread_id,
            thread_version: self.thread_version,
            run_id: self.run_id.as_deref(),
            event: self.payload.event_type(),
            data: self.payload.data(),
            event_id: &self.event_id,
            recorded_at: &self.recorded_at,
            from_user_seq: self.from_user_seq,
            from_thread_version: self.from_thread_version,
        };
        serde_json::to_string(&frame).unwrap_or_default()
    }

    /// The event as the socket frame it came in (`{"type":"event","user_seq":…}`).
    pub fn to_frame(&self) -> Value {
        let mut frame = json!({
            "type": "event",
            "user_seq": self.user_seq,
            "position": self.position,
            "thread_id": self.thread_id,
            "thread_version": self.thread_version,
            "run_id": self.run_id,
            "event": self.payload.event_type(),
            "data": self.payload.data(),
            "event_id": self.event_id,
            "recorded_at": self.recorded_at,
        });
        if let Some(from) = self.from_user_seq {
            frame["from_user_seq"] = json!(from);
        }
        if let Some(from) = self.from_thread_version {
            frame["from_thread_version"] = json!(from);
        }
        frame
    }
}

/// An event frame as it arrives.
#[derive(Debug, Deserialize)]
pub(crate) struct EventFrame {
    user_seq: u64,
    position: u64,
    thread_id: String,
    thread_version: u64,
    #[serde(default)]
    run_id: Option<String>,
    event: String,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    event_id: String,
    #[serde(default)]
    recorded_at: String,
    #[serde(default)]
    from_user_seq: Option<u64>,
    #[serde(default)]
    from_thread_version: Option<u64>,
}

impl From<EventFrame> for Event {
    fn from(f: EventFrame) -> Event {
        Event {
            user_seq: f.user_seq,
            position: f.position,
            thread_id: f.thread_id,
            thread_version: f.thread_version,
            run_id: f.run_id,
            event_id: f.event_id,
            recorded_at: f.recorded_at,
            payload: Payload::parse(f.event, f.data),
            from_user_seq: f.from_user_seq,
            from_thread_version: f.from_thread_version,
            message: None,
        }
    }
}

/// The open messages' texts, by id (bounded by what the server lets a run hold open;
/// a message leaves when it completes or its run ends).
#[derive(Debug, Default)]
pub(crate) struct Messages {
    open: std::collections::HashMap<String, (Option<String>, MessageText)>,
}

impl Messages {
    /// The message text after `event`, for a `message_*` event (None otherwise).
    pub(crate) fn take(&mut self, event: &Event) -> Option<Box<MessageText>> {
        let Payload::Other { event: kind, data } = &event.payload else {
            if event.payload.is_terminal() {
                self.open.retain(|_, (run, _)| *run != event.run_id);
            }
            return None;
        };
        if !kind.starts_with("message_") {
            return None;
        }
        let id = data.get("message_id")?.as_str()?.to_owned();
        let delta = data.get("text").and_then(Value::as_str).unwrap_or("");
        let first = data
            .get("from_seq")
            .or_else(|| data.get("seq"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let (_, m) = self.open.entry(id.clone()).or_insert_with(|| {
            (
                event.run_id.clone(),
                MessageText {
                    message_id: id.clone(),
                    delta: String::new(),
                    text: String::new(),
                    seq: 0,
                    complete: false,
                    partial: kind != "message_started" && first > 1,
                },
            )
        });
        m.delta = delta.to_owned();
        m.text.push_str(delta);
        if let Some(seq) = data.get("seq").and_then(Value::as_u64) {
            m.seq = seq;
        }
        m.complete = kind == "message_completed";
        let out = Box::new(m.clone());
        if out.complete {
            self.open.remove(&id);
        }
        Some(out)
    }
}

/// What the server sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Incoming {
    Welcome {
        resume_after: u64,
        #[serde(default)]
        head: u64,
    },
    Event(EventFrame),
    CaughtUp {
        user_seq: u64,
    },
    Pong,
    Refreshed {
        exp: u64,
    },
    Error {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    },
    /// A frame of a later protocol version: ignored.
    #[serde(other)]
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_frame_reads_back_as_the_same_frame() {
        let frame = json!({"type":"event","user_seq":42,"position":1093,"thread_id":"t","thread_version":7,
            "run_id":"r","event":"tool_executing","data":{"tool_call_id":"c1","x":[1]},"event_id":"e",
            "recorded_at":"2026-11-24T10:00:00.123Z"});
        let Incoming::Event(e) = serde_json::from_value(frame.clone()).unwrap() else {
            panic!("not an event")
        };
        let e = Event::from(e);
        assert_eq!(e.payload.tool_call_id(), Some("c1"));
        assert_eq!(e.to_frame(), frame);
        let line = e.to_frame_json();
        assert!(
            line.starts_with(r#"{"type":"event","user_seq":42,"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap(), frame);
    }

    #[test]
    fn unknown_types_are_kept_or_ignored() {
        let f: Incoming = serde_json::from_str(r#"{"type":"news","x":1}"#).unwrap();
        assert!(matches!(f, Incoming::Unknown));
        let p = Payload::parse("agent_dreaming".into(), json!({"a": 1}));
        assert_eq!(p.event_type(), "agent_dreaming");
        assert_eq!(p.data(), json!({"a": 1}));
    }
}

/// Fuzzing the frame decoder (stable Rust, proptest via `threadline-fuzz`): what a server,
/// or anything in between, sends is untrusted. `THREADLINE_FUZZ_SECS=<n>` runs each target
/// for `n` seconds.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
        "message_id",
        "text",
        "seq",
        "from_seq",
        "tool_call_id",
        "title",
        "metadata",
        "agent_name",
    ];

    fn json_value() -> impl Strategy<Value = Value> {
        threadline_fuzz::json_value(KEYS)
    }

    const TYPES: &[&str] = &[
        "welcome",
        "event",
        "caught_up",
        "pong",
        "refreshed",
        "error",
        "news",
    ];
    const EVENTS: &[&str] = &[
        "thread_created",
        "run_registered",
        "run_expired",
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_completed",
        "agent_error",
        "message_started",
        "message_delta",
        "message_completed",
    ];
    const FIELDS: &[&str] = &[
        "user_seq",
        "position",
        "thread_id",
        "thread_version",
        "run_id",
        "event",
        "data",
        "event_id",
        "recorded_at",
        "from_user_seq",
        "from_thread_version",
        "resume_after",
        "head",
        "exp",
        "code",
        "message",
    ];

    /// A frame-shaped object: a known `type`, known fields with values of any type.
    fn frame() -> impl Strategy<Value = Value> {
        let field = (
            proptest::sample::select(FIELDS),
            prop_oneof![
                3 => any::<u64>().prop_map(Value::from),
                2 => proptest::sample::select(EVENTS).prop_map(Value::from),
                2 => json_value(),
            ],
        );
        (
            proptest::sample::select(TYPES),
            proptest::collection::vec(field, 0..12),
        )
            .prop_map(|(kind, fields)| {
                let mut f = json!({ "type": kind });
                for (k, v) in fields {
                    f[k] = v;
                }
                f
            })
    }

    /// What the session does with a text frame, up to handing events on: parse, turn an
    /// event frame into an [`Event`], fold its message text. A decoded event re-encodes to
    /// a frame that decodes to the same event.
    fn decode(texts: &[String]) -> Result<(), TestCaseError> {
        let mut messages = Messages::default();
        for text in texts {
            let Ok(Incoming::Event(f)) = serde_json::from_str::<Incoming>(text) else {
                continue;
            };
            let mut event = Event::from(f);
            let _ = event.payload.tool_call_id();
            let _ = event.payload.is_terminal();
            let line = event.to_frame_json();
            let Ok(Incoming::Event(again)) = serde_json::from_str::<Incoming>(&line) else {
                return Err(TestCaseError::fail(format!(
                    "re-encoded frame unreadable: {line}"
                )));
            };
            prop_assert_eq!(Event::from(again), event.clone());
            event.message = messages.take(&event);
            let _ = event.to_frame();
        }
        Ok(())
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let texts = proptest::collection::vec(
            prop_oneof![any::<String>(), "[{}\\[\\]\":,0-9a-z_ ]{0,80}"],
            1..4,
        );
        threadline_fuzz::run("client_frame_text", texts, |texts| decode(&texts));
    }

    #[test]
    fn frame_shaped_objects_never_panic_and_round_trip() {
        let frames = proptest::collection::vec(frame().prop_map(|f| f.to_string()), 1..8);
        threadline_fuzz::run("client_frame_objects", frames, |texts| decode(&texts));
    }

    /// A valid event frame with its text cut, or a byte replaced.
    #[test]
    fn damaged_event_frames_never_panic() {
        let valid = json!({"type":"event","user_seq":42,"position":1093,"thread_id":"t","thread_version":7,
            "run_id":"r","event":"message_delta","data":{"message_id":"m1","seq":3,"text":"hé"},"event_id":"e",
            "recorded_at":"2026-11-24T10:00:00.123Z","from_user_seq":40,"from_thread_version":5})
        .to_string();
        let damage = proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6);
        threadline_fuzz::run("client_frame_damaged", damage, |damage| {
            let mut bytes = valid.clone().into_bytes();
            for (at, b) in damage {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            decode(&[String::from_utf8_lossy(&bytes).into_owned()])
        });
    }
}
