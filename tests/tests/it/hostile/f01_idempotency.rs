//! Finding 1: a reused `event_id` is answered only after the caller's role and
//! visibility checks, and with the original only for an identical request.

use serde_json::json;
use threadline_tests::{started_run, token, TestServer};

use super::reveals_nothing;

// Finding 1: idempotency must not leak another caller's data.
#[tokio::test]
async fn f1_a_reused_event_id_reveals_nothing_and_only_an_identical_repeat_is_answered() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let bob = server.api(&token("bob", "user"));
    let mallory = server.api(&token("mallory", "agent"));
    let auditor = server.api(&token("carol", "auditor"));
    let (thread_a, run_a) = started_run(&agent, "alice").await;
    let (_, run_b) = started_run(&agent, "bob").await;
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({"type": "agent_thinking", "data": {"secret": "alice-only"}, "event_id": id});
    let path_a = format!("/v1/runs/{run_a}/events");
    let first = agent.post(&path_a, &body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let secrets = [thread_a.as_str(), run_a.as_str(), "alice-only"];
    let head = auditor.audit_events("").await.len();

    // The identical repeat is answered with the original, appending nothing.
    let again = agent.post(&path_a, &body).await;
    assert_eq!((again.status, &again.body), (200, &first.body));

    // A user may not append agent events at all: 403 before any dedup, on any run.
    reveals_nothing(
        &bob.post("/v1/runs/run_whatever/events", &body).await,
        403,
        "forbidden",
        &secrets,
    );
    reveals_nothing(&bob.post(&path_a, &body).await, 403, "forbidden", &secrets);
    // A missing run is 404 whatever the id.
    reveals_nothing(
        &mallory.post("/v1/runs/run_whatever/events", &body).await,
        404,
        "run_not_found",
        &secrets,
    );
    // The same id on another run, with another type or other data: 409, nothing revealed.
    let other_run = mallory
        .post(&format!("/v1/runs/{run_b}/events"), &body)
        .await;
    reveals_nothing(&other_run, 409, "event_id_conflict", &secrets);
    let other_type =
        json!({"type": "agent_error", "data": {"secret": "alice-only"}, "event_id": id});
    reveals_nothing(
        &agent.post(&path_a, &other_type).await,
        409,
        "event_id_conflict",
        &secrets,
    );
    let other_data = json!({"type": "agent_thinking", "data": {"secret": "guess"}, "event_id": id});
    reveals_nothing(
        &agent.post(&path_a, &other_data).await,
        409,
        "event_id_conflict",
        &secrets,
    );
    // In a batch: the whole batch is refused, naming the index.
    let batch = json!({"events": [
        {"run_id": run_b, "type": "agent_thinking", "data": {}},
        {"run_id": run_b, "type": "agent_thinking", "data": {"secret": "alice-only"}, "event_id": id},
    ]});
    let r = mallory.post("/v1/events", &batch).await;
    r.assert_error(409, "event_id_conflict");
    assert_eq!(r.body["error"]["index"], 1, "{}", r.body);
    for s in &secrets {
        assert!(!r.body.to_string().contains(s), "{}", r.body);
    }
    // An identical repeat inside a batch is still answered with the original.
    let batch = json!({"events": [{"run_id": run_a, "type": "agent_thinking", "data": {"secret": "alice-only"}, "event_id": id}]});
    let r = agent.post("/v1/events", &batch).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["results"][0], first.body);

    assert_eq!(
        auditor.audit_events("").await.len(),
        head,
        "a refused call appended"
    );
}
