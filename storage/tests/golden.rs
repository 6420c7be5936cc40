//! Golden fixture: bytes written by record format 1 stay decodable forever,
//! and this build still writes exactly those bytes for format 1.
//!
//! The fixture is generated once with `BLESS_FIXTURES=1 cargo test -p
//! threadline-storage --test golden` and then never regenerated: a change to
//! the format needs a new version byte and a new fixture beside this one.

use std::path::PathBuf;

use threadline_storage::{Position, Record, FORMAT_VERSION};
use uuid::Uuid;

const FIXTURE: &str = "record_v1.bin";

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(FIXTURE)
}

/// The record frozen in the fixture: every field set, non-ASCII text, a
/// payload with every byte value so no encoding shortcut goes unnoticed.
fn golden_record() -> Record {
    Record {
        position: Position(4_242),
        stream: "thread:01JD3W8Q0ZK5T2M7F9X4C6B8NA/é".into(),
        stream_version: 17,
        event_id: Uuid::from_u128(0x0193_6b2a_7c4e_7d21_9a3f_5e6d_4c3b_2a19),
        recorded_at_ms: 1_732_536_000_123,
        actor: "user:alice".into(),
        event_type: "message_posted".into(),
        payload: (0..=255u8)
            .chain(b"{\"text\":\"hello\"}".iter().copied())
            .collect(),
    }
}

#[test]
fn format_1_fixture_decodes_and_reencodes_byte_for_byte() {
    let path = fixture_path();
    let record = golden_record();
    if std::env::var_os("BLESS_FIXTURES").is_some_and(|v| v == "1") {
        assert_eq!(
            FORMAT_VERSION, 1,
            "bless a new fixture file for a new format"
        );
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, record.encode()).unwrap();
    }
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "golden fixture {} is missing ({e}); generate it once with BLESS_FIXTURES=1",
            path.display()
        )
    });
    assert_eq!(bytes[0], 1, "the fixture must be a format 1 record");

    let decoded = Record::decode(record.position, &bytes).expect("format 1 bytes must decode");
    assert_eq!(decoded, record);
    assert_eq!(
        record.encode(),
        bytes,
        "format 1 must encode to the frozen fixture bytes"
    );
    // The position is part of the checked identity of the bytes.
    assert!(Record::decode(record.position.next(), &bytes).is_err());
}
