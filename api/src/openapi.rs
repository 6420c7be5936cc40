//! The OpenAPI 3 document served at `/openapi.json`.
//!
//! It is built from [`ROUTES`], the same table of paths, methods and answers
//! that the router's tests walk (`tests/it/openapi.rs` calls every route and
//! checks that each answered status is documented), so the document cannot
//! silently drift from what the server does.

use axum::Json;
use serde_json::{json, Map, Value};

/// One documented operation.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// Request body schema name, if any.
    pub body: Option<&'static str>,
    /// Query parameters: (name, type, description).
    pub query: &'static [(&'static str, &'static str, &'static str)],
    /// Success status and response schema.
    pub ok: (u16, &'static str),
    /// Error statuses this call may answer.
    pub errors: &'static [u16],
    pub auth: bool,
}

const AUTH_ERRORS: &[u16] = &[400, 401, 403];

/// Every HTTP operation the server serves.
pub const ROUTES: &[Route] = &[
    Route { method: "post", path: "/v1/threads", summary: "Create a thread (owner = the token's sub; agents name user_id).", body: Some("CreateThread"), query: &[], ok: (201, "ThreadCreated"), errors: &[400, 401, 403, 409, 413], auth: true },
    Route { method: "get", path: "/v1/threads", summary: "List the caller's threads in creation order (auditors and agents: all in id order, or ?user_id=), a page at a time: `next` is present when more remain.", body: None, query: &[("user_id", "string", "auditor/agent only: one user's threads"), ("limit", "integer", "1 to 1000, default 100"), ("after", "string", "the `next` of the previous page")], ok: (200, "ThreadList"), errors: AUTH_ERRORS, auth: true },
    Route { method: "get", path: "/v1/threads/{thread_id}", summary: "A thread with its runs. Another user's thread is 404, exactly like a missing one.", body: None, query: &[], ok: (200, "ThreadDetail"), errors: &[400, 401, 404], auth: true },
    Route { method: "post", path: "/v1/threads/{thread_id}/runs", summary: "Register a run on a thread. Optional If-Match: <thread_version>.", body: Some("RegisterRun"), query: &[], ok: (201, "RunRegistered"), errors: &[400, 401, 403, 404, 409, 413], auth: true },
    Route { method: "get", path: "/v1/threads/{thread_id}/events", summary: "A thread's events as frames, by thread version.", body: None, query: &[("after_version", "integer", "return events after this thread version (default 0)"), ("limit", "integer", "1 to 1000, default 100")], ok: (200, "Frames"), errors: &[400, 401, 404], auth: true },
    Route { method: "post", path: "/v1/runs/{run_id}/events", summary: "Append an agent event (agents only). A repeated event_id answers 200 with the original result, after the role and visibility checks and only when run, type and data equal the original's; otherwise 409 event_id_conflict. Optional If-Match.", body: Some("AgentEvent"), query: &[], ok: (201, "EventAppended"), errors: &[400, 401, 403, 404, 409, 413, 422], auth: true },
    Route { method: "post", path: "/v1/events", summary: "Append up to 1000 agent events atomically: all or none; errors name the failing index.", body: Some("Batch"), query: &[], ok: (201, "BatchAppended"), errors: &[400, 401, 403, 404, 409, 413, 422], auth: true },
    Route { method: "get", path: "/v1/audit/events", summary: "The history as auditor envelopes (auditors only). next_after is the last position examined.", body: None, query: &[("after", "integer", "position to continue after (default 0)"), ("limit", "integer", "1 to 1000, default 100"), ("user_id", "string", "owner filter"), ("thread_id", "string", "thread filter"), ("run_id", "string", "run filter"), ("type", "string", "event type filter"), ("since", "string", "RFC 3339, recorded at or after"), ("until", "string", "RFC 3339, recorded at or before")], ok: (200, "Envelopes"), errors: AUTH_ERRORS, auth: true },
    Route { method: "get", path: "/v1/audit/deliveries", summary: "The delivery ledger (auditors only): every durable ack (cursor_advanced record) in log order, scanned in bounded steps; next_after is the last position examined. With thread_id: the thread's events after `after`, each with the owner's clients that acknowledged it (and when) and those that have not, under `thread`; `deliveries` then lists the acks those events cite and next_after is the last event's position.", body: None, query: &[("after", "integer", "position to continue after (default 0)"), ("limit", "integer", "1 to 1000, default 100 (acks; with thread_id, events)"), ("user_id", "string", "the acknowledging user (with thread_id: must be the owner)"), ("client_id", "string", "only this client's acks"), ("thread_id", "string", "the ledger of this thread's events"), ("since", "string", "RFC 3339, acks recorded at or after"), ("until", "string", "RFC 3339, acks recorded at or before")], ok: (200, "Deliveries"), errors: &[400, 401, 403, 404], auth: true },
    Route { method: "get", path: "/v1/ws", summary: "WebSocket upgrade (see docs/PROTOCOL.md): welcome, replay, caught_up, live frames.", body: None, query: &[("after", "string", "user_seq to resume after, or `latest`; default: the client's durable cursor"), ("client_id", "string", "[A-Za-z0-9._-]{1,64}, default `default`"), ("thread_id", "string", "only this thread's frames"), ("access_token", "string", "the JWT, when no header or subprotocol can carry it")], ok: (101, ""), errors: &[400, 401, 429], auth: true },
    Route { method: "get", path: "/healthz", summary: "Liveness.", body: None, query: &[], ok: (200, "Status"), errors: &[], auth: false },
    Route { method: "get", path: "/readyz", summary: "Readiness: projections caught up at start; reports the current lag.", body: None, query: &[], ok: (200, "Ready"), errors: &[], auth: false },
    Route { method: "get", path: "/metrics", summary: "Prometheus text; every metric is named threadline_*.", body: None, query: &[], ok: (200, ""), errors: &[], auth: false },
    Route { method: "get", path: "/openapi.json", summary: "This document.", body: None, query: &[], ok: (200, ""), errors: &[], auth: false },
    Route { method: "get", path: "/console", summary: "The auditor console (HTML; its assets are embedded in the binary). It asks for an auditor token and keeps it in sessionStorage only.", body: None, query: &[], ok: (200, ""), errors: &[], auth: false },
    Route { method: "get", path: "/console/app.js", summary: "The console's script.", body: None, query: &[], ok: (200, ""), errors: &[], auth: false },
    Route { method: "get", path: "/console/app.css", summary: "The console's style sheet.", body: None, query: &[], ok: (200, ""), errors: &[], auth: false },
];

/// The query parameters `method path` knows (`None` when the route is not in the table).
/// A HEAD is answered by the GET route.
pub fn query_names(method: &str, path: &str) -> Option<impl Iterator<Item = &'static str>> {
    let method = if method.eq_ignore_ascii_case("head") {
        "get"
    } else {
        method
    };
    ROUTES
        .iter()
        .find(|r| r.path == path && r.method.eq_ignore_ascii_case(method))
        .map(|r| r.query.iter().map(|(name, _, _)| *name))
}

pub async fn document() -> Json<Value> {
    Json(spec())
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn obj(required: &[&str], props: Value) -> Value {
    json!({"type": "object", "required": required, "properties": props})
}

fn schemas() -> Value {
    let s = |t: &str| json!({"type": t});
    let nullable = |t: &str| json!({"type": t, "nullable": true});
    let frame = obj(
        &[
            "type",
            "user_seq",
            "position",
            "thread_id",
            "thread_version",
            "event",
            "data",
            "event_id",
            "recorded_at",
        ],
        json!({"type": {"type": "string", "enum": ["event"]}, "user_seq": s("integer"), "position": s("integer"), "thread_id": s("string"),
               "thread_version": s("integer"), "run_id": nullable("string"),
               "event": {"type": "string", "enum": ["thread_created", "run_registered", "run_expired", "agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed", "agent_error"]},
               "data": s("object"), "event_id": {"type": "string", "format": "uuid"}, "recorded_at": {"type": "string", "format": "date-time"}}),
    );
    let mut envelope = frame.clone();
    envelope["properties"]["user_id"] = s("string");
    envelope["properties"]["actor"] = obj(
        &["sub", "role"],
        json!({"sub": s("string"), "role": s("string")}),
    );
    let summary = json!({"thread_id": s("string"), "user_id": s("string"), "title": nullable("string"), "created_at": {"type": "string", "format": "date-time"}, "run_count": s("integer"), "last_position": s("integer"), "version": s("integer")});
    let mut detail = summary.clone();
    detail["metadata"] = nullable("object");
    detail["runs"] = json!({"type": "array", "items": schema_ref("RunSummary")});
    let appended = obj(
        &[
            "position",
            "user_seq",
            "thread_id",
            "run_id",
            "thread_version",
            "event_id",
        ],
        json!({"position": s("integer"), "user_seq": s("integer"), "thread_id": s("string"), "run_id": s("string"), "thread_version": s("integer"), "event_id": s("string")}),
    );
    let event_type = json!({"type": "string", "enum": ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed", "agent_error"]});
    json!({
        "Error": obj(&["error"], json!({"error": obj(&["code", "message"], json!({"code": s("string"), "message": s("string"), "index": s("integer")}))})),
        "CreateThread": obj(&[], json!({"thread_id": s("string"), "title": s("string"), "metadata": s("object"), "user_id": s("string")})),
        "ThreadCreated": obj(&["thread_id", "user_id", "position", "created_at"], json!({"thread_id": s("string"), "user_id": s("string"), "position": s("integer"), "created_at": {"type": "string", "format": "date-time"}})),
        "ThreadSummary": {"type": "object", "properties": summary},
        "ThreadList": obj(&["threads"], json!({"threads": {"type": "array", "items": schema_ref("ThreadSummary")}, "next": {"type": "string", "description": "present when more threads remain: pass it as `after`"}})),
        "RunSummary": obj(&["run_id", "agent_name", "status", "registered_at"], json!({"run_id": s("string"), "agent_name": s("string"), "status": {"type": "string", "enum": ["registered", "running", "completed", "failed", "expired"]}, "registered_at": {"type": "string", "format": "date-time"}, "last_event": nullable("string")})),
        "ThreadDetail": {"type": "object", "properties": detail},
        "RegisterRun": obj(&["agent_name"], json!({"run_id": s("string"), "agent_name": s("string")})),
        "RunRegistered": obj(&["run_id", "thread_id", "position", "thread_version"], json!({"run_id": s("string"), "thread_id": s("string"), "position": s("integer"), "thread_version": s("integer")})),
        "AgentEvent": obj(&["type", "data"], json!({"type": event_type, "data": s("object"), "event_id": {"type": "string", "format": "uuid"}})),
        "Batch": obj(&["events"], json!({"events": {"type": "array", "maxItems": 1000, "items": obj(&["run_id", "type", "data"], json!({"run_id": s("string"), "type": event_type, "data": s("object"), "event_id": {"type": "string", "format": "uuid"}}))}})),
        "EventAppended": appended,
        "BatchAppended": obj(&["results"], json!({"results": {"type": "array", "items": schema_ref("EventAppended")}})),
        "Frame": frame,
        "Frames": obj(&["events", "next_after_version"], json!({"events": {"type": "array", "items": schema_ref("Frame")}, "next_after_version": s("integer")})),
        "Envelope": envelope,
        "Envelopes": obj(&["events", "next_after"], json!({"events": {"type": "array", "items": schema_ref("Envelope")}, "next_after": s("integer")})),
        "Delivery": obj(&["position", "user_id", "client_id", "user_seq", "acked_at"], json!({"position": s("integer"), "user_id": s("string"), "client_id": s("string"), "user_seq": s("integer"), "acked_at": {"type": "string", "format": "date-time"}})),
        "EventAck": obj(&["client_id", "position", "user_seq", "acked_at"], json!({"client_id": s("string"), "position": {"type": "integer", "description": "the ack that first covered the event"}, "user_seq": s("integer"), "acked_at": {"type": "string", "format": "date-time"}})),
        "ThreadLedger": obj(&["thread_id", "user_id", "user_head", "clients", "events"], json!({"thread_id": s("string"), "user_id": s("string"), "user_head": s("integer"),
            "clients": {"type": "array", "items": obj(&["client_id", "acked_user_seq", "position", "acked_at"], json!({"client_id": s("string"), "acked_user_seq": s("integer"), "position": s("integer"), "acked_at": {"type": "string", "format": "date-time"}}))},
            "events": {"type": "array", "items": obj(&["position", "user_seq", "thread_version", "event", "recorded_at", "acks", "unacked"], json!({"position": s("integer"), "user_seq": s("integer"), "thread_version": s("integer"), "event": s("string"), "recorded_at": {"type": "string", "format": "date-time"}, "acks": {"type": "array", "items": schema_ref("EventAck")}, "unacked": {"type": "array", "items": s("string")}}))}})),
        "Deliveries": obj(&["deliveries", "next_after"], json!({"deliveries": {"type": "array", "items": schema_ref("Delivery")}, "next_after": s("integer"), "thread": schema_ref("ThreadLedger")})),
        "Status": obj(&["status"], json!({"status": s("string")})),
        "Ready": obj(&["ready"], json!({"ready": s("boolean"), "projected": s("integer"), "head": s("integer")})),
    })
}

fn operation(route: &Route) -> Value {
    let mut params: Vec<Value> = route
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    params.extend(route.query.iter().map(|(name, ty, desc)| {
        json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": ty}})
    }));
    if matches!(route.body, Some("AgentEvent")) || route.path.ends_with("/runs") {
        params.push(json!({"name": "If-Match", "in": "header", "required": false, "description": "the thread version the thread must be at", "schema": {"type": "integer"}}));
    }
    let mut responses = Map::new();
    let (ok, schema) = route.ok;
    let ok_body = if schema.is_empty() {
        json!({"description": "success"})
    } else {
        json!({"description": "success", "content": {"application/json": {"schema": schema_ref(schema)}}})
    };
    responses.insert(ok.to_string(), ok_body);
    if route.body == Some("AgentEvent") {
        responses.insert("200".into(), json!({"description": "repeated event_id: the original result", "content": {"application/json": {"schema": schema_ref("EventAppended")}}}));
    }
    // Every call may meet an unknown query parameter (400) and the connection limit
    // (503 overloaded); every authenticated call the caller's request rate (429).
    let common: &[u16] = match (route.auth, route.body.is_some()) {
        (true, true) => &[400, 408, 429, 503],
        (true, false) => &[400, 429, 503],
        _ => &[400, 503],
    };
    for code in route.errors.iter().chain(common) {
        let description = match code {
            408 => "request_timeout: the body did not arrive within the header deadline",
            429 => "rate_limited: over the caller's request rate; see Retry-After",
            503 => "overloaded: the server is at its connection limit; see Retry-After",
            _ => "error",
        };
        responses.insert(code.to_string(), json!({"description": description, "content": {"application/json": {"schema": schema_ref("Error")}}}));
    }
    let mut op = json!({"summary": route.summary, "parameters": params, "responses": responses});
    if let Some(body) = route.body {
        op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema_ref(body)}}});
    }
    if route.auth {
        op["security"] = json!([{"bearer": []}]);
    }
    op
}

/// The whole document.
pub fn spec() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let entry = paths.entry(route.path).or_insert_with(|| json!({}));
        entry[route.method] = operation(route);
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Threadline", "version": env!("CARGO_PKG_VERSION"), "description": "Event-sourced routing of AI agents' run events to users' sockets. Wire contract: docs/PROTOCOL.md."},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
        }
    })
}
