//! Fuzzing the query and path extractors and the routes behind them (stable Rust,
//! proptest via `threadline-fuzz`): `router(state)` over a `MemoryLog`, driven with
//! tower's `oneshot` by arbitrary methods, path segments, query strings, headers and
//! bodies. Never a panic, never a 5xx, and every error in the app's JSON shape
//! (`{"error": {"code", "message"}}`). `THREADLINE_FUZZ_SECS=<n>` runs it for `n` s.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use proptest::prelude::*;
use serde_json::{json, Value};
use threadline_api::auth::Authenticator;
use threadline_api::config::LimitArgs;
use threadline_api::AppState;
use threadline_projections::{CheckpointPolicy, Projector};
use threadline_storage::MemoryLog;
use tower::ServiceExt;

const SECRET: &str = "fuzz-secret-0123456789abcdef-0123456789";

fn token(sub: &str, role: &str) -> String {
    let claims = json!({"sub": sub, "role": role, "exp": threadline_api::auth::now_secs() + 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Percent-encodes every byte outside the unreserved set, except those in `raw`.
fn encode(s: &str, raw: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || raw.as_bytes().contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One request as the strategy draws it.
#[derive(Debug, Clone)]
struct Call {
    method: u8,
    template: prop::sample::Index,
    segment: Segment,
    query: Query,
    auth: u8,
    if_match: Option<String>,
    body: Body_,
}

#[derive(Debug, Clone)]
enum Segment {
    Known(u8),
    Text(String),
    /// Raw bytes, percent-encoded (invalid UTF-8 included).
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Query {
    None,
    /// Raw printable text after `?` (only what parses as a URI reaches the router).
    Raw(String),
    /// Pairs; names mostly the documented ones; values anything, percent-encoded.
    Pairs(Vec<(prop::sample::Index, Option<String>, String)>),
}

#[derive(Debug, Clone)]
enum Body_ {
    Empty,
    /// A well-formed body for whichever write the path is.
    Valid(u8),
    Text(String),
    Json(Value),
}

/// Field names the routes read, so that bodies reach past the first field check.
const KEYS: &[&str] = &[
    "title",
    "agent_name",
    "type",
    "event",
    "data",
    "event_id",
    "run_id",
    "events",
    "metadata",
    "input_id",
    "answer",
    "reason",
];

fn json_value() -> impl Strategy<Value = Value> {
    threadline_fuzz::json_value(KEYS)
}

fn call() -> impl Strategy<Value = Call> {
    let segment = prop_oneof![
        (0u8..3).prop_map(Segment::Known),
        ".{0,30}".prop_map(Segment::Text),
        "[A-Za-z0-9_:.-]{0,140}".prop_map(Segment::Text),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(Segment::Bytes),
    ];
    let query = prop_oneof![
        Just(Query::None),
        "[ -~]{0,60}".prop_map(Query::Raw),
        proptest::collection::vec(
            (
                any::<prop::sample::Index>(),
                prop::option::weighted(0.2, ".{0,8}"),
                prop_oneof![
                    ".{0,20}",
                    "-?[0-9]{1,25}",
                    "20[0-9]{2}-[0-9]{2}-[0-9]{2}T[0-9:.]{0,12}Z?",
                    Just("true".to_owned()),
                ],
            ),
            0..5
        )
        .prop_map(Query::Pairs),
    ];
    let body = prop_oneof![
        Just(Body_::Empty),
        (0u8..4).prop_map(Body_::Valid),
        ".{0,40}".prop_map(Body_::Text),
        json_value().prop_map(Body_::Json),
    ];
    (
        0u8..8,
        any::<prop::sample::Index>(),
        segment,
        query,
        0u8..6,
        prop::option::weighted(0.1, ".{0,10}"),
        body,
    )
        .prop_map(
            |(method, template, segment, query, auth, if_match, body)| Call {
                method,
                template,
                segment,
                query,
                auth,
                if_match,
                body,
            },
        )
}

struct World {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    _follower: threadline_projections::Follower,
    /// Each documented path with its documented methods.
    templates: Vec<(String, Vec<Method>)>,
    names: Vec<String>,
    known: [String; 3],
    tokens: [String; 4],
}

impl World {
    fn new() -> World {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let log = Arc::new(MemoryLog::new());
        let projector = Arc::new(Projector::open(log).unwrap());
        let follower = projector.follow(CheckpointPolicy::default()).unwrap();
        let auth = Authenticator::hs256(SECRET.as_bytes(), None, None, 0);
        let edge = LimitArgs {
            rate_limit: 1_000_000,
            rate_burst: 1_000_000,
            ..LimitArgs::default()
        };
        let state = AppState::new(projector, auth, threadline_engine::Limits::default(), edge);
        let app = threadline_api::router(state);
        let spec = threadline_api::openapi::spec();
        let templates: Vec<(String, Vec<Method>)> = spec["paths"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(path, item)| {
                let methods = item
                    .as_object()
                    .unwrap()
                    .keys()
                    .filter_map(|m| m.to_uppercase().parse().ok())
                    .collect();
                (path.clone(), methods)
            })
            .collect();
        let mut names: Vec<String> = Vec::new();
        for item in spec["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if p["in"] == "query" {
                        names.push(p["name"].as_str().unwrap().to_owned());
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        let tokens = [
            token("alice", "user"),
            token("agent-1", "agent"),
            token("carol", "auditor"),
            token("bob", "user"),
        ];
        let mut world = World {
            rt,
            app,
            _follower: follower,
            templates,
            names,
            known: Default::default(),
            tokens,
        };
        // A thread and a run of alice's, so some paths name things that exist.
        let thread = world.json(Method::POST, "/v1/threads", 0, json!({"title": "fuzz"}));
        let thread_id = thread["thread_id"].as_str().unwrap().to_owned();
        let run = world.json(
            Method::POST,
            &format!("/v1/threads/{thread_id}/runs"),
            1,
            json!({"agent_name": "fuzzer"}),
        );
        let run_id = run["run_id"].as_str().unwrap().to_owned();
        world.known = [thread_id, run_id, "alice".to_owned()];
        world
    }

    fn json(&self, method: Method, path: &str, auth: usize, body: Value) -> Value {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.tokens[auth]),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let (status, bytes) = self.send(req);
        assert!(status.is_success(), "{status}: {bytes:?}");
        serde_json::from_slice(&bytes).unwrap()
    }

    fn send(&self, req: Request<Body>) -> (StatusCode, axum::body::Bytes) {
        self.rt.block_on(async {
            let res = self.app.clone().oneshot(req).await.unwrap();
            let status = res.status();
            let ct = res
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap_or("").to_owned());
            let bytes = axum::body::to_bytes(res.into_body(), 4 << 20)
                .await
                .unwrap();
            if status.is_client_error() || status.is_server_error() {
                assert!(
                    ct.as_deref()
                        .is_some_and(|c| c.starts_with("application/json")),
                    "{status} with content type {ct:?}: {bytes:?}"
                );
            }
            (status, bytes)
        })
    }

    fn request(&self, c: &Call) -> Option<Request<Body>> {
        let (template, methods) = &self.templates[c.template.index(self.templates.len())];
        let segment = match &c.segment {
            Segment::Known(i) => self.known[usize::from(*i)].clone(),
            Segment::Text(s) => encode(s, ":@!$'()*+,;="),
            Segment::Bytes(b) => b.iter().map(|b| format!("%{b:02X}")).collect(),
        };
        let mut path = String::new();
        for part in template.split('/').skip(1) {
            path.push('/');
            if part.starts_with('{') {
                path.push_str(&segment);
            } else {
                path.push_str(part);
            }
        }
        match &c.query {
            Query::None => {}
            Query::Raw(q) => {
                path.push('?');
                path.push_str(q);
            }
            Query::Pairs(pairs) => {
                let q: Vec<String> = pairs
                    .iter()
                    .map(|(i, other, v)| {
                        let name = match other {
                            Some(n) => n.clone(),
                            None => self.names[i.index(self.names.len())].clone(),
                        };
                        format!("{}={}", encode(&name, ""), encode(v, ":+"))
                    })
                    .collect();
                path.push('?');
                path.push_str(&q.join("&"));
            }
        }
        // Mostly a method the path documents; sometimes one it does not.
        let method = match c.method {
            0..=5 if !methods.is_empty() => methods[usize::from(c.method) % methods.len()].clone(),
            0..=2 => Method::GET,
            3..=6 => Method::POST,
            _ => Method::DELETE,
        };
        let mut req = Request::builder().method(method).uri(path);
        match c.auth {
            0..=3 => {
                req = req.header(
                    header::AUTHORIZATION,
                    format!("Bearer {}", self.tokens[usize::from(c.auth)]),
                )
            }
            4 => req = req.header(header::AUTHORIZATION, "Bearer not.a.jwt"),
            _ => {}
        }
        if let Some(v) = &c.if_match {
            if let Ok(v) = header::HeaderValue::from_str(v) {
                req = req.header(header::IF_MATCH, v);
            }
        }
        let body = match &c.body {
            Body_::Empty => Body::empty(),
            Body_::Text(t) => Body::from(t.clone()),
            Body_::Valid(k) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                let body = match (template.as_str(), k) {
                    ("/v1/threads", _) => json!({"title": "t"}),
                    ("/v1/threads/{thread_id}/runs", _) => json!({"agent_name": "a"}),
                    ("/v1/runs/{run_id}/events", 0) => json!({"type": "agent_started", "data": {}}),
                    ("/v1/runs/{run_id}/events", 1) => {
                        json!({"type": "tool_executing", "data": {"tool_call_id": "c"}})
                    }
                    ("/v1/runs/{run_id}/events", _) => {
                        json!({"type": "agent_thinking", "data": {"x": 1}})
                    }
                    ("/v1/runs/{run_id}/cancel", _) => json!({"reason": "r"}),
                    ("/v1/runs/{run_id}/input", _) => json!({"input_id": "i", "answer": "a"}),
                    ("/v1/events", _) => {
                        json!({"events": [{"run_id": self.known[1], "type": "agent_thinking", "data": {}}]})
                    }
                    _ => json!({}),
                };
                Body::from(body.to_string())
            }
            Body_::Json(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
        };
        // A URI that does not parse never reaches the router (hyper refuses it).
        req.body(body).ok()
    }
}

mod fuzz {
    use super::*;

    #[test]
    fn routes_answer_arbitrary_paths_and_queries_in_json_never_5xx() {
        let world = World::new();
        let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new());
        threadline_fuzz::run_with(
            "routes",
            proptest::test_runner::Config {
                cases: 256,
                ..Default::default()
            },
            call(),
            |c| {
                let Some(req) = world.request(&c) else {
                    return Ok(());
                };
                let (status, bytes) = world.send(req);
                *statuses.lock().unwrap().entry(status.as_u16()).or_default() += 1;
                prop_assert!(
                    !status.is_server_error(),
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
                if status.is_client_error() {
                    let v: Value = serde_json::from_slice(&bytes)
                        .map_err(|e| TestCaseError::fail(format!("{status}: not JSON: {e}")))?;
                    prop_assert!(v["error"]["code"].is_string(), "{status}: {v}");
                    prop_assert!(v["error"]["message"].is_string(), "{status}: {v}");
                }
                Ok(())
            },
        );
        eprintln!("fuzz routes: statuses {:?}", statuses.lock().unwrap());
    }
}
