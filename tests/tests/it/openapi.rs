//! The served OpenAPI document matches what the server really answers: every
//! documented operation is routed and answers a documented status, and each
//! answer's body validates against the schema documented for that status.

use serde_json::{json, Value};
use threadline_tests::{token, Reply, TestServer};

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

    let reply = server.anonymous().get("/openapi.json").await;
    assert_eq!(reply.status, 200);
    // utoipa 5 writes OpenAPI 3.1 (the hand-written document was 3.0.3).
    assert_eq!(reply.body["openapi"], "3.1.0");
    let doc = Doc(reply.body);
    let paths = doc.0["paths"].as_object().expect("paths").clone();
    assert!(paths.len() >= 12, "{paths:?}");
    let auditor = server.api(&token("audit", "auditor"));
    for (path, ops) in &paths {
        for (method, op) in ops.as_object().unwrap() {
            let concrete = path
                .replace("{thread_id}", &thread)
                .replace("{run_id}", &run)
                .replace("{user_id}", "alice");
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
                    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
                    let body = match schema["$ref"].as_str() {
                        Some(r) if r.ends_with("/CreateThread") => {
                            json!({"user_id": "alice", "title": "t", "metadata": {"k": 1}})
                        }
                        Some(r) if r.ends_with("/RegisterRun") => json!({"agent_name": "x"}),
                        Some(r) if r.ends_with("/AgentEvent") => {
                            json!({"type": "agent_thinking", "data": {}})
                        }
                        Some(r) if r.ends_with("/ProvideInput") => {
                            json!({"input_id": "in1", "answer": "yes"})
                        }
                        Some(r) if r.ends_with("/Batch") => {
                            json!({"events": [{"run_id": run, "type": "agent_thinking", "data": {}}]})
                        }
                        _ => Value::Null,
                    };
                    // What the test sends is what the document describes.
                    let errors = doc.check(schema, &body);
                    assert!(
                        errors.is_empty(),
                        "{method} {path}: request {body}: {errors:?}"
                    );
                    client.post(&concrete, &body).await
                }
                other => panic!("undocumented method {other}"),
            };
            assert_ne!(
                reply.code(),
                "not_found",
                "{method} {path} is documented but not routed"
            );
            // A plain GET on the socket path is not an upgrade: the server refuses it with a 4xx.
            if path == "/v1/ws" {
                assert!(
                    (400..500).contains(&reply.status),
                    "{method} {path}: {}",
                    reply.status
                );
            }
            doc.assert_documented(method, path, &reply);
        }
    }
}

/// Beyond each operation's first answer: the shapes that only show up later
/// (runs with a last event, a repeated event, a second page, null run ids in
/// the history) and the error answers, each against its documented schema.
#[tokio::test]
async fn documented_schemas_validate_real_answers() {
    let server = TestServer::spawn();
    let doc = Doc(server.anonymous().get("/openapi.json").await.body);
    let agent = server.api(&token("bot", "agent"));
    let alice = server.api(&token("alice", "user"));
    let auditor = server.api(&token("audit", "auditor"));

    let created = agent
        .post(
            "/v1/threads",
            &json!({"user_id": "alice", "title": "t", "metadata": {"k": [1, 2]}}),
        )
        .await;
    doc.assert_documented("post", "/v1/threads", &created);
    let thread = created.body["thread_id"].as_str().unwrap().to_owned();
    agent.create_thread(json!({"user_id": "alice"})).await;
    let run = agent.register_run(&thread).await;
    let event = json!({"type": "agent_started", "data": {"a": 1}, "event_id": "0190f1d2-7c3b-7a4e-8f00-000000000001"});
    let path = format!("/v1/runs/{run}/events");
    let first = agent.post(&path, &event).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    doc.assert_documented("post", "/v1/runs/{run_id}/events", &first);
    let repeated = agent.post(&path, &event).await;
    assert_eq!(repeated.status, 200, "{:?}", repeated.body);
    doc.assert_documented("post", "/v1/runs/{run_id}/events", &repeated);

    let cases: Vec<(&str, &str, Reply)> = vec![
        (
            "get",
            "/v1/threads/{thread_id}",
            alice.get(&format!("/v1/threads/{thread}")).await,
        ),
        ("get", "/v1/threads", alice.get("/v1/threads?limit=1").await),
        (
            "get",
            "/v1/threads/{thread_id}/events",
            alice
                .get(&format!("/v1/threads/{thread}/events?limit=1000"))
                .await,
        ),
        (
            "get",
            "/v1/audit/events",
            auditor.get("/v1/audit/events").await,
        ),
        ("get", "/healthz", server.anonymous().get("/healthz").await),
        ("get", "/readyz", server.anonymous().get("/readyz").await),
        // Errors: each body is the Error schema, its code one of the documented codes.
        (
            "get",
            "/v1/threads/{thread_id}",
            alice.get("/v1/threads/thread_nowhere").await,
        ),
        (
            "get",
            "/v1/threads/{thread_id}",
            alice.get("/v1/threads/run_x").await,
        ),
        (
            "get",
            "/v1/threads",
            server.anonymous().get("/v1/threads").await,
        ),
        (
            "get",
            "/v1/threads",
            alice.get("/v1/threads?limit=1001").await,
        ),
        (
            "get",
            "/v1/threads",
            alice.get("/v1/threads?usr_id=x").await,
        ),
        (
            "get",
            "/v1/audit/events",
            alice.get("/v1/audit/events").await,
        ),
        (
            "post",
            "/v1/threads",
            agent
                .post(
                    "/v1/threads",
                    &json!({"user_id": "alice", "thread_id": thread}),
                )
                .await,
        ),
        (
            "post",
            "/v1/runs/{run_id}/events",
            alice
                .post(&path, &json!({"type": "agent_thinking", "data": {}}))
                .await,
        ),
        (
            "post",
            "/v1/runs/{run_id}/events",
            agent
                .post(&path, &json!({"type": "nope", "data": {}}))
                .await,
        ),
        (
            "post",
            "/v1/runs/{run_id}/events",
            agent
                .post(
                    &path,
                    &json!({"type": "tool_completed", "data": {"tool_call_id": "x"}}),
                )
                .await,
        ),
        (
            "post",
            "/v1/events",
            agent
                .post(
                    "/v1/events",
                    &json!({"events": [
                        {"run_id": run, "type": "agent_thinking", "data": {}},
                        {"run_id": "run_missing", "type": "agent_thinking", "data": {}},
                    ]}),
                )
                .await,
        ),
        (
            "post",
            "/v1/threads/{thread_id}/runs",
            agent
                .post_if_match(
                    &format!("/v1/threads/{thread}/runs"),
                    &json!({"agent_name": "x"}),
                    99,
                )
                .await,
        ),
        (
            "get",
            "/v1/audit/deliveries",
            auditor
                .get(&format!("/v1/audit/deliveries?thread_id={thread}"))
                .await,
        ),
        (
            "get",
            "/v1/audit/deliveries",
            auditor
                .get("/v1/audit/deliveries?thread_id=thread_nobody")
                .await,
        ),
    ];
    let mut statuses = Vec::new();
    for (method, path, reply) in &cases {
        doc.assert_documented(method, path, reply);
        statuses.push(reply.status);
    }
    assert_eq!(
        statuses,
        [
            200, 200, 200, 200, 200, 200, 404, 400, 401, 400, 400, 403, 409, 403, 400, 422, 404,
            409, 200, 404
        ]
    );
    let (detail, list, frames, envelopes) = (
        &cases[0].2.body,
        &cases[1].2.body,
        &cases[2].2.body,
        &cases[3].2.body,
    );
    assert_eq!(detail["runs"][0]["last_event"], "agent_started", "{detail}");
    assert!(list["next"].is_string(), "a second page: {list}");
    assert!(
        frames["events"][0]["run_id"].is_null(),
        "thread_created has no run: {frames}"
    );
    assert!(
        envelopes["events"].as_array().unwrap().len() >= 4,
        "{envelopes}"
    );
    assert_eq!(
        cases[16].2.body["error"]["index"], 1,
        "{:?}",
        cases[16].2.body
    );
}

/// The served document, with a checker for the part of JSON Schema it uses.
struct Doc(Value);

impl Doc {
    /// Asserts `method path` documents `reply`'s status, and that its body is what
    /// that answer documents (a JSON body valid against the schema, or text).
    #[track_caller]
    fn assert_documented(&self, method: &str, path: &str, reply: &Reply) {
        let op = &self.0["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let Some(answer) = op["responses"].get(reply.status.to_string()) else {
            panic!(
                "{method} {path} answered {} which the document does not list: {:?}",
                reply.status, reply.body
            );
        };
        let content_type = reply
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let content = &answer["content"];
        if let Some(schema) = content["application/json"].get("schema") {
            assert!(
                content_type.starts_with("application/json"),
                "{method} {path} {}: served as {content_type:?}",
                reply.status
            );
            let errors = self.check(schema, &reply.body);
            assert!(
                errors.is_empty(),
                "{method} {path} {}: {} does not match its schema: {errors:#?}",
                reply.status,
                reply.body
            );
        } else if content.get("text/plain").is_some() {
            assert!(
                content_type.starts_with("text/plain"),
                "{method} {path}: {content_type:?}"
            );
        } else {
            assert!(
                reply.body.is_null(),
                "{method} {path} documents no body: {:?}",
                reply.body
            );
        }
    }

    /// Every way `value` breaks `schema`. Objects are closed: a property the
    /// schema does not name is an error, so no answer carries an undocumented field.
    fn check(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.walk(schema, value, "$", true, &mut errors);
        errors
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(r) => {
                let name = r
                    .strip_prefix("#/components/schemas/")
                    .expect("a local ref");
                let target = &self.0["components"]["schemas"][name];
                assert!(target.is_object(), "dangling {r}");
                self.resolve(target)
            }
            None => schema,
        }
    }

    /// The property names `schema` (or any of its `allOf` parts) declares.
    fn names<'a>(&'a self, schema: &'a Value, into: &mut Vec<&'a str>) {
        let schema = self.resolve(schema);
        if let Some(props) = schema["properties"].as_object() {
            into.extend(props.keys().map(String::as_str));
        }
        for part in schema["allOf"].as_array().into_iter().flatten() {
            self.names(part, into);
        }
    }

    fn walk(
        &self,
        schema: &Value,
        value: &Value,
        at: &str,
        closed: bool,
        errors: &mut Vec<String>,
    ) {
        let schema = self.resolve(schema);
        if let Some(choices) = schema["oneOf"].as_array() {
            let matching = choices
                .iter()
                .filter(|choice| {
                    let mut own = Vec::new();
                    self.walk(choice, value, at, closed, &mut own);
                    own.is_empty()
                })
                .count();
            if matching != 1 {
                errors.push(format!(
                    "{at}: {value} matches {matching} of its oneOf choices"
                ));
            }
        }
        if let Some(parts) = schema["allOf"].as_array() {
            for part in parts {
                self.walk(part, value, at, false, errors);
            }
        }
        if let Some(types) = schema.get("type") {
            let types: Vec<&str> = match types {
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                t => t.as_str().into_iter().collect(),
            };
            if !types.iter().any(|t| is_type(t, value)) {
                errors.push(format!("{at}: {value} is not {types:?}"));
                return;
            }
        }
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(value) {
                errors.push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        if let (Some(format), Some(s)) = (schema["format"].as_str(), value.as_str()) {
            let ok = match format {
                "uuid" => is_uuid(s),
                "date-time" => is_date_time(s),
                _ => true,
            };
            if !ok {
                errors.push(format!("{at}: {s:?} is not a {format}"));
            }
        }
        if let Some(n) = value.as_f64() {
            if schema["minimum"].as_f64().is_some_and(|m| n < m)
                || schema["maximum"].as_f64().is_some_and(|m| n > m)
            {
                errors.push(format!("{at}: {n} is out of range"));
            }
        }
        if let Some(items) = value.as_array() {
            if schema["minItems"]
                .as_u64()
                .is_some_and(|m| (items.len() as u64) < m)
                || schema["maxItems"]
                    .as_u64()
                    .is_some_and(|m| items.len() as u64 > m)
            {
                errors.push(format!("{at}: {} items", items.len()));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    self.walk(item_schema, item, &format!("{at}[{i}]"), true, errors);
                }
            }
        }
        let Some(object) = value.as_object() else {
            return;
        };
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap();
            if !object.contains_key(name) {
                errors.push(format!("{at}: required {name} is missing"));
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            for (name, prop) in props {
                if let Some(v) = object.get(name) {
                    self.walk(prop, v, &format!("{at}.{name}"), true, errors);
                }
            }
        }
        let mut declared = Vec::new();
        self.names(schema, &mut declared);
        if closed && (schema.get("properties").is_some() || schema.get("allOf").is_some()) {
            for name in object.keys() {
                if !declared.contains(&name.as_str()) {
                    errors.push(format!("{at}: {name} is not documented"));
                }
            }
        }
    }
}

fn is_type(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// RFC 3339: `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)`.
fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && matches!(b.get(10), Some(b'T' | b't'))
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19)
        && (s.ends_with('Z')
            || s.ends_with('z')
            || s.get(s.len().saturating_sub(6)..)
                .is_some_and(|z| z.starts_with(['+', '-']) && z.as_bytes()[3] == b':'))
}

#[test]
fn the_checker_catches_what_it_should() {
    let doc = Doc(json!({"components": {"schemas": {
        "A": {"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string", "format": "uuid"},
            "n": {"type": ["integer", "null"], "minimum": 1},
            "kind": {"type": "string", "enum": ["x"]},
            "at": {"type": "string", "format": "date-time"},
            "list": {"type": "array", "maxItems": 1, "items": {"type": "string"}},
        }},
        "B": {"allOf": [{"$ref": "#/components/schemas/A"}, {"type": "object", "properties": {"b": {"type": "boolean"}}}]},
        "C": {"oneOf": [{"type": "string"}, {"type": "object", "required": ["b"], "properties": {"b": {"type": "boolean"}}}]},
    }}}));
    let a = json!({"$ref": "#/components/schemas/A"});
    let b = json!({"$ref": "#/components/schemas/B"});
    let good = json!({"id": "0190f1d2-7c3b-7a4e-8f00-000000000001", "n": null, "kind": "x", "at": "2026-11-30T10:00:00.123Z", "list": ["a"]});
    assert_eq!(doc.check(&a, &good), Vec::<String>::new());
    let mut with_b = good.clone();
    with_b["b"] = json!(true);
    assert_eq!(doc.check(&b, &with_b), Vec::<String>::new());
    assert_eq!(doc.check(&a, &with_b).len(), 1, "b is not documented on A");
    let c = json!({"$ref": "#/components/schemas/C"});
    assert_eq!(doc.check(&c, &json!("s")), Vec::<String>::new());
    assert_eq!(doc.check(&c, &json!({"b": false})), Vec::<String>::new());
    assert_eq!(
        doc.check(&c, &json!({"b": false, "x": 1})).len(),
        1,
        "x is not documented"
    );
    assert_eq!(doc.check(&c, &json!(1)).len(), 1);
    for bad in [
        json!({}),
        json!({"id": "nope"}),
        json!({"id": "0190f1d2-7c3b-7a4e-8f00-000000000001", "n": 0}),
        json!({"id": "0190f1d2-7c3b-7a4e-8f00-000000000001", "kind": "y"}),
        json!({"id": "0190f1d2-7c3b-7a4e-8f00-000000000001", "at": "yesterday"}),
        json!({"id": "0190f1d2-7c3b-7a4e-8f00-000000000001", "list": ["a", "b"]}),
        json!({"id": "0190f1d2-7c3b-7a4e-8f00-000000000001", "list": [1]}),
        json!({"id": 1}),
    ] {
        assert_eq!(
            doc.check(&b, &bad).len(),
            1,
            "{bad}: {:?}",
            doc.check(&b, &bad)
        );
    }
}
