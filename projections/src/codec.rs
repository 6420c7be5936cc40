//! The payload codec: an [`Event`] as stored in a record's payload,
//! `[payload format][bincode body]`.

use threadline_engine::Event;

/// The payload format this build writes; older ones keep a decoder here.
pub const PAYLOAD_FORMAT: u8 = 1;

pub fn encode_event(event: &Event) -> Vec<u8> {
    let mut out = vec![PAYLOAD_FORMAT];
    bincode::serde::encode_into_std_write(event, &mut out, bincode::config::standard())
        .expect("encoding into a Vec is infallible");
    out
}

pub fn decode_event(bytes: &[u8]) -> Result<Event, String> {
    match bytes.split_first() {
        Some((&PAYLOAD_FORMAT, body)) => {
            let (event, used) =
                bincode::serde::decode_from_slice(body, bincode::config::standard())
                    .map_err(|e| e.to_string())?;
            if used != body.len() {
                return Err("trailing bytes".into());
            }
            Ok(event)
        }
        Some((v, _)) => Err(format!("unknown payload format {v}")),
        None => Err("empty payload".into()),
    }
}
