//! Table-driven checks of the id grammar in the wire contract.

use proptest::prelude::*;
use threadline_engine::{ClientId, EventId, Role, RunId, ThreadId, UserId};

const UUID_LOWER: &str = "0190f6c2-7a8b-7c3d-9e4f-0123456789ab";
const UUID_UPPER: &str = "0190F6C2-7A8B-7C3D-9E4F-0123456789AB";
const UUID_SIMPLE: &str = "0190F6C27A8B7C3D9E4F0123456789AB";

/// Rejected by every id type.
fn hostile() -> Vec<String> {
    [
        "",
        " ",
        "\t",
        "a b",
        " abc",
        "abc\n",
        "thréad",
        "🧵",
        "'; DROP TABLE x;--",
        "<script>alert(1)</script>",
        "{0190f6c2-7a8b-7c3d-9e4f-0123456789ab}",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        "a".repeat(10 * 1024),
        format!("thread_{}", "a".repeat(10 * 1024)),
    ])
    .collect()
}

fn check<T>(parse: fn(&str) -> Result<T, threadline_engine::IdError>, ok: &[&str], bad: &[&str]) {
    for s in ok {
        assert!(parse(s).is_ok(), "expected {s:?} to be accepted");
    }
    for s in bad
        .iter()
        .copied()
        .chain(hostile().iter().map(String::as_str))
    {
        let shown: String = s.chars().take(40).collect();
        assert!(parse(s).is_err(), "expected {shown:?} to be rejected");
    }
}

#[test]
fn user_ids() {
    let max = "u".repeat(128);
    let over = "u".repeat(129);
    check(
        UserId::parse,
        &[
            "alice",
            "alice@example.com",
            "e2e-user-7",
            "1234567890",
            "auth0-123",
            "google-oauth2:1234+tag_x.y",
            &max,
        ],
        &[&over, "auth0|123", "a/b", "a,b", "a#b"],
    );
    assert_eq!(UserId::parse("e2e-user-7").unwrap().as_str(), "e2e-user-7");
}

#[test]
fn thread_ids() {
    let max = format!("thread_{}", "a".repeat(121));
    let over = format!("thread_{}", "a".repeat(122));
    check(
        ThreadId::parse,
        &[
            UUID_LOWER,
            UUID_UPPER,
            UUID_SIMPLE,
            "thread_session_12345_ab12cd34",
            "thread_abc_xyz",
            "thread_A1",
            &max,
        ],
        &[
            &over,
            "thread_",
            "thread__a",
            "thread_a_",
            "thread_a__b",
            "thread_a-b",
            "Thread_abc",
            "thread",
            "run_abc",
            "abc",
            "0190f6c2-7a8b-7c3d-9e4f-0123456789a",
            "0190f6c2-7a8b-7c3d-9e4f-0123456789abc",
            "0190f6c27a8b-7c3d-9e4f-0123456789ab-",
            "g190f6c2-7a8b-7c3d-9e4f-0123456789ab",
            "urn:uuid:0190f6c2-7a8b-7c3d-9e4f-0123456789ab",
        ],
    );
}

#[test]
fn uuids_are_normalized_to_lower_case_hyphenated() {
    for s in [UUID_LOWER, UUID_UPPER, UUID_SIMPLE] {
        assert_eq!(ThreadId::parse(s).unwrap().as_str(), UUID_LOWER);
        assert_eq!(RunId::parse(s).unwrap().as_str(), UUID_LOWER);
        assert_eq!(EventId::parse(s).unwrap().to_string(), UUID_LOWER);
    }
}

#[test]
fn run_ids() {
    check(
        RunId::parse,
        &[UUID_LOWER, UUID_SIMPLE, "run_abc", "run_session_1_ff00"],
        &[
            "thread_abc",
            "run_",
            "run__a",
            "run_a_",
            "run-abc",
            "RUN_abc",
        ],
    );
}

#[test]
fn event_ids() {
    check(
        EventId::parse,
        &[UUID_LOWER, UUID_UPPER, UUID_SIMPLE],
        &[
            "thread_abc",
            "run_abc",
            "12345",
            "evt_1",
            "urn:uuid:0190f6c2-7a8b-7c3d-9e4f-0123456789ab",
        ],
    );
    let id = EventId::generate();
    assert_eq!(id.as_uuid().get_version_num(), 7);
    assert_eq!(EventId::from_uuid(id.as_uuid()), id);
}

#[test]
fn client_ids() {
    let max = "c".repeat(64);
    let over = "c".repeat(65);
    check(
        ClientId::parse,
        &["default", "web-1", "ios.app_2", &max],
        &[&over, "a@b", "a:b", "a+b"],
    );
    assert_eq!(ClientId::default().as_str(), "default");
    assert_eq!(ClientId::default_client(), ClientId::default());
}

#[test]
fn generated_ids_are_v7_and_parse_back() {
    let t = ThreadId::generate();
    let r = RunId::generate();
    assert_eq!(ThreadId::parse(t.as_str()).unwrap(), t);
    assert_eq!(RunId::parse(r.as_str()).unwrap(), r);
    assert_eq!(
        EventId::parse(t.as_str())
            .unwrap()
            .as_uuid()
            .get_version_num(),
        7
    );
}

#[test]
fn roles_from_tokens_exclude_system() {
    for (s, role) in [
        ("user", Role::User),
        ("agent", Role::Agent),
        ("auditor", Role::Auditor),
    ] {
        assert_eq!(Role::parse(s).unwrap(), role);
        assert_eq!(role.as_str(), s);
    }
    for s in ["system", "", "User", "admin"] {
        assert!(Role::parse(s).is_err(), "{s:?}");
    }
}

#[test]
fn errors_name_the_id_kind() {
    let err = ThreadId::parse("run_abc").unwrap_err();
    assert_eq!(err.kind, "thread id");
    assert!(err
        .to_string()
        .starts_with("invalid thread id: must be a UUID or thread_"));
    assert_eq!(UserId::parse("").unwrap_err().kind, "user id");
}

proptest! {
    #[test]
    fn parsers_never_panic_and_accepted_ids_round_trip(s in "\\PC{0,200}") {
        if let Ok(id) = UserId::parse(&s) { prop_assert_eq!(id.as_str(), s.as_str()); }
        if let Ok(id) = ThreadId::parse(&s) { prop_assert_eq!(ThreadId::parse(id.as_str()).unwrap(), id); }
        if let Ok(id) = RunId::parse(&s) { prop_assert_eq!(RunId::parse(id.as_str()).unwrap(), id); }
        if let Ok(id) = ClientId::parse(&s) { prop_assert_eq!(id.as_str(), s.as_str()); }
        let _ = EventId::parse(&s);
    }

    #[test]
    fn structured_ids_in_the_grammar_are_accepted(segs in proptest::collection::vec("[A-Za-z0-9]{1,8}", 1..10)) {
        let body = segs.join("_");
        let (as_thread, as_run) = (format!("thread_{body}"), format!("run_{body}"));
        prop_assert!(ThreadId::parse(&as_thread).is_ok());
        prop_assert!(RunId::parse(&as_run).is_ok());
        prop_assert!(RunId::parse(&as_thread).is_err());
        prop_assert!(ThreadId::parse(&as_run).is_err());
    }
}
