//! The served OpenAPI document matches what the server really answers.

use serde_json::{json, Value};
use threadline_tests::{token, TestServer};

#[tokio::test]
async fn every_documented_operation_exists_and_answers_a_documented_status() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let thread = agent.create_thread(json!({"user_id": "alice"})).await;
    let run = agent.register_run(&thread).await;
    assert_eq!(
        agent.event(&run, "agent_started", json!({})).await.status,
        201
    );

    let doc = server.anonymous().get("/openapi.json").await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.body["openapi"], "3.0.3");
    let paths = doc.body["paths"].as_object().expect("paths").clone();
    assert!(paths.len() >= 12, "{paths:?}");
    let auditor = server.api(&token("audit", "auditor"));
    for (path, ops) in &paths {
        for (method, op) in ops.as_object().unwrap() {
            let concrete = path
                .replace("{thread_id}", &thread)
                .replace("{run_id}", &run);
            let client = if path.starts_with("/v1/audit")
                || (method == "get" && path.starts_with("/v1/threads"))
            {
                &auditor
            } else {
                &agent
            };
            let reply = match method.as_str() {
                "get" => client.get(&concrete).await,
                "post" => {
                    let body = match op["requestBody"]["content"]["application/json"]["schema"]
                        ["$ref"]
                        .as_str()
                    {
                        Some(r) if r.ends_with("/CreateThread") => json!({"user_id": "alice"}),
                        Some(r) if r.ends_with("/RegisterRun") => json!({"agent_name": "x"}),
                        Some(r) if r.ends_with("/AgentEvent") => {
                            json!({"type": "agent_thinking", "data": {}})
                        }
                        Some(r) if r.ends_with("/Batch") => {
                            json!({"events": [{"run_id": run, "type": "agent_thinking", "data": {}}]})
                        }
                        _ => Value::Null,
                    };
                    client.post(&concrete, &body).await
                }
                other => panic!("undocumented method {other}"),
            };
            assert_ne!(
                reply.code(),
                "not_found",
                "{method} {path} is documented but not routed"
            );
            let documented = op["responses"].as_object().unwrap();
            // A plain GET on the socket path is not an upgrade: the server refuses it with a 4xx.
            if path == "/v1/ws" {
                assert!(
                    (400..500).contains(&reply.status),
                    "{method} {path}: {}",
                    reply.status
                );
                continue;
            }
            assert!(
                documented.contains_key(&reply.status.to_string()),
                "{method} {path} answered {} which the document does not list: {:?}",
                reply.status,
                reply.body
            );
        }
    }
}
