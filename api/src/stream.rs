//! Streamed messages at the edge: the wire form of `message_started`,
//! `message_delta` and `message_completed` appends (with the event ids derived
//! from run, message and seq, so a retried batch is idempotent), and the merging
//! of one message's consecutive events into one frame covering a `user_seq` range
//! (live rollup and compaction on replay are the same function).

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use threadline_engine::{Command, Event, EventId, MessageId, RunId};
use threadline_projections::Submission;
use threadline_storage::Record;
use uuid::Uuid;

use crate::error::AppError;
use crate::wire::{self, Frame};

/// Most text one merged frame carries; a longer message is sent as several frames.
pub const MAX_MERGED_TEXT: usize = 32 * 1024;

/// The event id of a message's event: `seq` 0 for `message_started`, the delta's
/// `seq`, and `u64::MAX` for `message_completed`. A UUID v8 from SHA-256 of the
/// run, message and seq: the same delta sent twice has the same id, so the log's
/// idempotency answers the retry with the original.
pub fn derived_event_id(run: &RunId, message: &MessageId, seq: u64) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"threadline.message.v1\0");
    h.update(run.as_str());
    h.update([0]);
    h.update(message.as_str());
    h.update([0]);
    h.update(seq.to_be_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

fn invalid(message: &str) -> AppError {
    AppError::InvalidRequest(message.to_owned())
}

/// The command of a `message_*` append, or `None` for any other type.
/// `data` is exactly `{message_id}` (started, completed) or `{message_id, seq, text}`
/// (delta); the event id is derived, so a client-supplied one is refused.
pub fn message_submission(
    run_id: &RunId,
    kind: &str,
    data: &Map<String, Value>,
    event_id: &Option<String>,
) -> Result<Option<Submission>, AppError> {
    let allowed: &[&str] = match kind {
        "message_started" | "message_completed" => &["message_id"],
        "message_delta" => &["message_id", "seq", "text"],
        _ => return Ok(None),
    };
    if event_id.is_some() {
        return Err(invalid(
            "message events take no event_id: theirs is derived from run, message_id and seq",
        ));
    }
    if let Some(k) = data.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(&format!(
            "{kind} data takes only {allowed:?}, not {k:?}"
        )));
    }
    let message_id = match data.get("message_id") {
        Some(Value::String(s)) => MessageId::parse(s)?,
        _ => return Err(invalid("data.message_id must be a string")),
    };
    let (command, seq) = match kind {
        "message_started" => (
            Command::StartMessage {
                run_id: run_id.clone(),
                message_id: message_id.clone(),
            },
            0,
        ),
        "message_completed" => (
            Command::CompleteMessage {
                run_id: run_id.clone(),
                message_id: message_id.clone(),
            },
            u64::MAX,
        ),
        _ => {
            let seq = data
                .get("seq")
                .and_then(Value::as_u64)
                .filter(|s| (1..u64::MAX).contains(s))
                .ok_or_else(|| invalid("data.seq must be an integer from 1"))?;
            let text = match data.get("text") {
                Some(Value::String(t)) => t.clone(),
                _ => return Err(invalid("data.text must be a string")),
            };
            // As a frame carries it (escaped), a delta stays well within the 64 KiB frame.
            let escaped = serde_json::to_string(&text).map_or(usize::MAX, |j| j.len());
            if escaped > threadline_engine::MAX_DELTA_BYTES {
                return Err(threadline_engine::DomainError::TooLarge {
                    what: "a delta's text (as JSON)",
                    limit: threadline_engine::MAX_DELTA_BYTES,
                }
                .into());
            }
            (
                Command::AppendDelta {
                    run_id: run_id.clone(),
                    message_id: message_id.clone(),
                    seq,
                    text,
                },
                seq,
            )
        }
    };
    Ok(Some(Submission {
        event_id: Some(EventId::from_uuid(derived_event_id(
            run_id,
            &message_id,
            seq,
        ))),
        ..Submission::new(command)
    }))
}

/// One frame to send and the `user_seq` range it covers.
#[derive(Debug)]
pub struct Out {
    pub frame: Frame,
    pub first: u64,
    pub last: u64,
    /// A message's events not ended by its completion: the next page may extend it.
    pub open_tail: bool,
}

/// Frames for consecutive `(user_seq, record, event)`s. With `merge`, each run of
/// one message's consecutive events (its start only first, its completion only
/// last, at most [`MAX_MERGED_TEXT`] of text) becomes one frame that covers their
/// `user_seq`s, `from_user_seq..=user_seq`; anything else is a frame of its own.
pub fn frames(items: &[(u64, &Record, Event)], merge: bool) -> Vec<Out> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let mut j = i + 1;
        if merge {
            if let Some(m) = items[i].2.message_id() {
                let mut text = text_of(&items[i].2);
                let mut ended = matches!(items[i].2, Event::MessageCompleted { .. });
                while j < items.len() && !ended {
                    let e = &items[j].2;
                    let more = text_of(e);
                    if e.message_id() != Some(m)
                        || matches!(e, Event::MessageStarted { .. })
                        || text + more > MAX_MERGED_TEXT
                    {
                        break;
                    }
                    text += more;
                    ended = matches!(e, Event::MessageCompleted { .. });
                    j += 1;
                }
            }
        }
        let group = &items[i..j];
        let (last_seq, last_record, last_event) = &group[group.len() - 1];
        let Some(mut frame) = wire::frame(last_record, last_event, *last_seq) else {
            i = j;
            continue;
        };
        if group.len() > 1 {
            frame.from_user_seq = Some(group[0].0);
            frame.from_thread_version = Some(group[0].1.stream_version);
            frame.data = merged_data(group);
        }
        out.push(Out {
            frame,
            first: group[0].0,
            last: *last_seq,
            open_tail: last_event.message_id().is_some()
                && !matches!(last_event, Event::MessageCompleted { .. }),
        });
        i = j;
    }
    out
}

/// A delta's text as a frame carries it: escaped JSON, so that a merged frame's
/// size is bounded by what is sent, not by the raw text.
fn text_of(e: &Event) -> usize {
    match e {
        Event::MessageDeltaAppended { text, .. } => {
            serde_json::to_string(text).map_or(text.len(), |j| j.len())
        }
        _ => 0,
    }
}

fn merged_data(group: &[(u64, &Record, Event)]) -> Box<serde_json::value::RawValue> {
    let mut text = String::new();
    let mut from_seq = None;
    let mut seq = 0;
    let mut bytes = None;
    let mut message_id = None;
    for (_, _, e) in group {
        match e {
            Event::MessageStarted { message_id: m, .. } => {
                message_id = Some(m);
                from_seq.get_or_insert(0);
            }
            Event::MessageDeltaAppended {
                message_id: m,
                seq: s,
                text: t,
                ..
            } => {
                message_id = Some(m);
                from_seq.get_or_insert(*s);
                seq = *s;
                text.push_str(t);
            }
            Event::MessageCompleted {
                message_id: m,
                seq: s,
                bytes: b,
                ..
            } => {
                message_id = Some(m);
                from_seq.get_or_insert(*s + 1);
                seq = *s;
                bytes = Some(*b);
            }
            _ => {}
        }
    }
    let mut data = json!({
        "message_id": message_id.map(|m| m.as_str()),
        "from_seq": from_seq.unwrap_or(0),
        "seq": seq,
        "text": text,
    });
    if let Some(b) = bytes {
        data["bytes"] = json!(b);
    }
    serde_json::value::to_raw_value(&data).expect("a JSON value serializes")
}
