//! Issue 16, clock: the server's wall clock jumping backwards, through an injected
//! clock (`MemoryLog::with_clock` and a `ManualClock`), under the real server. The
//! behaviour (`threadline_storage::clock`): `recorded_at` is monotonic per log, so the
//! audit's `since`/`until` filters select a suffix/prefix of the log in order; run TTLs
//! are measured on that same clock, so a jump back delays an expiry, never brings it on.

use std::sync::Arc;

use serde_json::{json, Value};
use threadline_storage::{ManualClock, MemoryLog};
use threadline_tests::{token, TestServer};

const HOUR: u64 = 60 * 60 * 1000;
/// `Limits::default().run_ttl_ms`, the TTL the test server runs with.
const TTL: u64 = 24 * HOUR;
/// 2026-11-01T00:00:00Z.
const T0: u64 = 1_793_491_200_000;

fn ms(e: &Value) -> u64 {
    threadline_api::wire::parse_timestamp(e["recorded_at"].as_str().unwrap()).unwrap()
}

fn positions(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_clock_jumping_back_keeps_recorded_at_in_order_and_never_expires_a_run_early() {
    let clock = ManualClock::new(T0);
    let log = Arc::new(MemoryLog::with_clock(clock.clone()));
    let server = TestServer::spawn_on(log);
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("agent-1", "agent"));
    let auditor = server.api(&token("carol", "auditor"));

    let thread = alice.create_thread(json!({"title": "clock"})).await;
    let run = agent.register_run(&thread).await;
    let r = agent.event(&run, "agent_started", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let before_jump = auditor.audit_events("").await;

    // The wall clock jumps back two hours; the agent goes on.
    clock.back(2 * HOUR);
    let r = agent.event(&run, "agent_thinking", json!({"n": 1})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    clock.advance(HOUR);
    let r = agent.event(&run, "agent_thinking", json!({"n": 2})).await;
    assert_eq!(r.status, 201, "{}", r.body);

    let all = auditor.audit_events("").await;
    assert_eq!(all.len(), before_jump.len() + 2);
    // recorded_at never decreases along positions: the records after the jump keep the
    // last stamp (the clock has not caught up with it yet).
    let stamps: Vec<u64> = all.iter().map(ms).collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    assert_eq!(*stamps.last().unwrap(), T0);
    assert!(positions(&all).windows(2).all(|w| w[0] < w[1]));

    // `since` the last stamp before the jump: every record from there on, including the
    // ones appended after the jump (a wall-clock stamp would have dropped them).
    let since = all[before_jump.len() - 1]["recorded_at"].as_str().unwrap();
    let suffix = auditor.audit_events(&format!("since={since}")).await;
    assert!(suffix.len() >= 3, "{suffix:?}");
    assert_eq!(
        positions(&suffix),
        positions(&all[all.len() - suffix.len()..])
    );
    // `until` a time before the jump's target: a prefix, nothing appended after the jump.
    let until = "2026-10-31T23:00:00.000Z";
    assert!(auditor
        .audit_events(&format!("until={until}"))
        .await
        .is_empty());

    // Real time since the last event: one hour (clock at T0 - 1 h). Another TTL minus a
    // minute of real time passes: the run is idle for less than its TTL, not expired.
    clock.advance(TTL - 60_000);
    let r = agent.event(&run, "agent_thinking", json!({"n": 3})).await;
    assert_eq!(r.status, 201, "expired early: {}", r.body);
    let last = ms(auditor.audit_events("").await.last().unwrap());
    assert_eq!(last, T0 - HOUR + TTL - 60_000);

    // The TTL still applies: idle past it, the run is expired.
    clock.advance(TTL + 1_000);
    let r = agent.event(&run, "agent_thinking", json!({"n": 4})).await;
    r.assert_error(409, "run_expired");
    let types: Vec<Value> = auditor
        .audit_events("type=run_expired")
        .await
        .iter()
        .map(|e| e["run_id"].clone())
        .collect();
    assert_eq!(types, vec![json!(run)]);
}

/// The log clock on its own: a stamp never goes back, and what the log calls `now`
/// (used for decisions and TTLs) is never before the last stamp.
#[test]
fn the_log_clock_never_goes_back() {
    use threadline_storage::{EventLog, NewEvent};
    let clock = ManualClock::new(T0);
    let log = MemoryLog::with_clock(clock.clone());
    let append = |n: u64| {
        let event = NewEvent {
            event_id: uuid::Uuid::new_v4(),
            stream: "s".into(),
            expected_version: None,
            actor: "test".into(),
            event_type: "e".into(),
            payload: n.to_le_bytes().to_vec(),
        };
        futures_util::FutureExt::now_or_never(log.append(vec![event]))
            .expect("memory appends are ready")
            .unwrap();
    };
    append(1);
    clock.back(10_000);
    assert_eq!(log.now_ms(), T0);
    append(2);
    clock.advance(20_000);
    assert_eq!(log.now_ms(), T0 + 10_000);
    append(3);
    let stamps: Vec<u64> = log
        .read_from(threadline_storage::Position(1), 10)
        .unwrap()
        .iter()
        .map(|r| r.recorded_at_ms)
        .collect();
    assert_eq!(stamps, vec![T0, T0, T0 + 10_000]);
}
