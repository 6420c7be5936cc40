//! The HTTP routes: each handler extracts, calls one [`AppState`] function and
//! maps the result.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use serde::Deserialize;
use tracing::Instrument;
use utoipa::IntoParams;

use crate::app::{AppState, Log, MAX_LIMIT};
use crate::audit::AuditParams;
use crate::deliveries::DeliveryParams;
use crate::error::AppError;
use crate::extract::{Auth, IfMatch, JsonBody, OptionalJsonBody, PathArg, QueryArgs};
use crate::wire::{self, ErrorBody};

// The answers each route documents (beside the handler, in `#[utoipa::path]`).
// Answers every call may give (an unknown query parameter, the request rate, the
// connection limit, a body's deadline) are added to all by `openapi::CommonAnswers`.
const E400: &str = "invalid_request (a body or query that does not parse), invalid_id";
const E401: &str = "unauthorized: no valid bearer token (with `WWW-Authenticate: Bearer`)";
const E403_WRITE: &str = "forbidden: the token's role may not do this call";
const E413: &str = "payload_too_large: a body over 1 MiB, or data or metadata over its limit";
const E_APPEND_400: &str = "invalid_request, invalid_id, invalid_event_type";
const E_APPEND_409: &str =
    "run_closed, run_expired, version_conflict (If-Match), event_id_conflict, quota_exceeded";
const E_APPEND_422: &str =
    "invalid_lifecycle: agent_started first, nothing after a terminal event, tool calls matched";
const IF_MATCH: &str = "the thread version the thread must be at (else 409 version_conflict)";

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The whole API as a router over any log (tests drive it over the in-memory one).
pub fn router<L: Log>(state: AppState<L>) -> Router {
    Router::new()
        .route(
            "/v1/threads",
            post(create_thread::<L>).get(list_threads::<L>),
        )
        .route("/v1/threads/{thread_id}", get(get_thread::<L>))
        .route("/v1/threads/{thread_id}/runs", post(register_run::<L>))
        .route("/v1/threads/{thread_id}/events", get(thread_events::<L>))
        .route("/v1/runs/{run_id}/events", post(append_event::<L>))
        .route("/v1/runs/{run_id}/cancel", post(cancel_run::<L>))
        .route("/v1/runs/{run_id}/input", post(provide_input::<L>))
        .route("/v1/runs/{run_id}/signals", get(run_signals::<L>))
        .route("/v1/users/{user_id}/presence", get(presence::<L>))
        .route("/v1/events", post(append_batch::<L>))
        .route("/v1/audit/events", get(audit_events::<L>))
        .route("/v1/audit/deliveries", get(audit_deliveries::<L>))
        .route(
            "/v1/admin/verify",
            post(start_verify::<L>).get(verify_status::<L>),
        )
        .route("/v1/ws", get(crate::ws::upgrade::<L>))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<L>))
        .route("/metrics", get(crate::metrics::render))
        .route("/openapi.json", get(crate::openapi::document))
        .route("/console", get(crate::console::index))
        .route("/console/app.js", get(crate::console::script))
        .route("/console/app.css", get(crate::console::style))
        .route_layer(axum::middleware::from_fn(crate::extract::known_query))
        .fallback(|| async { AppError::NoRoute })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(trace))
        .with_state(state)
}

/// Create a thread (owner = the token's sub; agents name `user_id`).
#[utoipa::path(post, path = "/v1/threads", tag = "threads", request_body = wire::CreateThread,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "created", body = wire::ThreadCreated),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = "forbidden: an auditor, or a user naming another user_id", body = ErrorBody),
        (status = 409, description = "thread_exists, quota_exceeded", body = ErrorBody),
        (status = 413, description = E413, body = ErrorBody),
    ))]
async fn create_thread<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    JsonBody(req): JsonBody<wire::CreateThread>,
) -> Result<(StatusCode, Json<wire::ThreadCreated>), AppError> {
    Ok((StatusCode::CREATED, Json(app.create_thread(&p, req).await?)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Auditors and agents only: one user's threads.
    user_id: Option<String>,
    /// The page size.
    // 1000 is `MAX_LIMIT` (an attribute takes only a literal; a test checks they agree).
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<usize>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// List threads, a page at a time.
///
/// The caller's threads in creation order (auditors and agents: all in id order,
/// or `?user_id=`); `next` is present when more remain.
#[utoipa::path(get, path = "/v1/threads", tag = "threads", params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "one page of threads", body = wire::ThreadList),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = "forbidden: a user naming another user_id", body = ErrorBody),
    ))]
async fn list_threads<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Json<wire::ThreadList>, AppError> {
    let limit = check_limit(q.limit)?;
    Ok(Json(app.list_threads(&p, q.user_id, limit, q.after)?))
}

/// A thread with its runs. Another user's thread is 404, exactly like a missing one.
#[utoipa::path(get, path = "/v1/threads/{thread_id}", tag = "threads",
    params(("thread_id" = String, Path, description = "a UUID or a structured `thread_…` id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the thread and its runs", body = wire::ThreadDetail),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 404, description = "thread_not_found (also another user's thread)", body = ErrorBody),
    ))]
async fn get_thread<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    PathArg(thread_id): PathArg<String>,
) -> Result<Json<wire::ThreadDetail>, AppError> {
    Ok(Json(app.get_thread(&p, &thread_id).await?))
}

/// Register a run on a thread (agents, or the thread's owner).
#[utoipa::path(post, path = "/v1/threads/{thread_id}/runs", tag = "threads", request_body = wire::RegisterRun,
    params(
        ("thread_id" = String, Path, description = "a UUID or a structured `thread_…` id"),
        ("If-Match" = Option<u64>, Header, description = IF_MATCH),
    ),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "registered", body = wire::RunRegistered),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = E403_WRITE, body = ErrorBody),
        (status = 404, description = "thread_not_found", body = ErrorBody),
        (status = 409, description = "run_exists, version_conflict (If-Match), quota_exceeded", body = ErrorBody),
        (status = 413, description = E413, body = ErrorBody),
    ))]
async fn register_run<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    PathArg(thread_id): PathArg<String>,
    IfMatch(if_match): IfMatch,
    JsonBody(req): JsonBody<wire::RegisterRun>,
) -> Result<(StatusCode, Json<wire::RunRegistered>), AppError> {
    let registered = app.register_run(&p, &thread_id, req, if_match).await?;
    Ok((StatusCode::CREATED, Json(registered)))
}

/// Append an agent event (agents only).
///
/// A repeated `event_id` answers 200 with the original result, after the role and
/// visibility checks and only when run, type and data equal the original's;
/// otherwise 409 `event_id_conflict`.
#[utoipa::path(post, path = "/v1/runs/{run_id}/events", tag = "events", request_body = wire::AgentEvent,
    params(
        ("run_id" = String, Path, description = "a UUID or a structured `run_…` id"),
        ("If-Match" = Option<u64>, Header, description = IF_MATCH),
    ),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "appended", body = wire::EventAppended),
        (status = 200, description = "a repeated event_id: the original result, nothing appended", body = wire::EventAppended),
        (status = 400, description = E_APPEND_400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = E403_WRITE, body = ErrorBody),
        (status = 404, description = "run_not_found", body = ErrorBody),
        (status = 409, description = E_APPEND_409, body = ErrorBody),
        (status = 413, description = E413, body = ErrorBody),
        (status = 422, description = E_APPEND_422, body = ErrorBody),
    ))]
async fn append_event<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    PathArg(run_id): PathArg<String>,
    IfMatch(if_match): IfMatch,
    JsonBody(req): JsonBody<wire::AgentEvent>,
) -> Result<Response, AppError> {
    let (appended, duplicate) = app.append_event(&p, &run_id, req, if_match).await?;
    let status = if duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(appended)).into_response())
}

const E403_STEER: &str = "forbidden: only the thread's owner (a user token) steers a run";
const E404_RUN: &str = "run_not_found (also another user's run)";

/// 201 when the event was recorded now, 200 when the call repeated one recorded before.
fn recorded_status(repeat: bool) -> StatusCode {
    if repeat {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    }
}

/// Ask the agent to stop a run (the thread's owner only).
///
/// Appends `run_cancel_requested` (who asked, when, why), delivered to the owner's
/// sockets like any thread event; the agent learns it from its next append's
/// `cancel_requested` or from `GET /v1/runs/{run_id}/signals`, and ends the run
/// with its terminal event. Asking again answers 200 with the first request.
#[utoipa::path(post, path = "/v1/runs/{run_id}/cancel", tag = "steering", request_body(content = Option<wire::CancelRun>, description = "optional"),
    params(("run_id" = String, Path, description = "a UUID or a structured `run_…` id")),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "run_cancel_requested recorded", body = wire::SteerRecorded),
        (status = 200, description = "already requested: the original request", body = wire::SteerRecorded),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = E403_STEER, body = ErrorBody),
        (status = 404, description = E404_RUN, body = ErrorBody),
        (status = 409, description = "run_closed, run_expired: the run already ended", body = ErrorBody),
        (status = 413, description = E413, body = ErrorBody),
    ))]
async fn cancel_run<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    PathArg(run_id): PathArg<String>,
    OptionalJsonBody(req): OptionalJsonBody<wire::CancelRun>,
) -> Result<Response, AppError> {
    let (recorded, repeat) = app.cancel_run(&p, &run_id, req).await?;
    Ok((recorded_status(repeat), Json(recorded)).into_response())
}

/// Answer an `agent_awaiting_input` (the thread's owner only).
///
/// Appends `user_input_provided`. Idempotent by `input_id`: the same answer again
/// answers 200 with the original; a different one is 409 `input_already_answered`.
#[utoipa::path(post, path = "/v1/runs/{run_id}/input", tag = "steering", request_body = wire::ProvideInput,
    params(("run_id" = String, Path, description = "a UUID or a structured `run_…` id")),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "user_input_provided recorded", body = wire::SteerRecorded),
        (status = 200, description = "the same answer again: the original", body = wire::SteerRecorded),
        (status = 400, description = "invalid_request (also an answer that is not one of an approval's options), invalid_id", body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = E403_STEER, body = ErrorBody),
        (status = 404, description = "run_not_found (also another user's run), input_not_found", body = ErrorBody),
        (status = 409, description = "input_already_answered (with another answer), run_closed, run_expired", body = ErrorBody),
        (status = 413, description = E413, body = ErrorBody),
    ))]
async fn provide_input<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    PathArg(run_id): PathArg<String>,
    JsonBody(req): JsonBody<wire::ProvideInput>,
) -> Result<Response, AppError> {
    let (recorded, repeat) = app.provide_input(&p, &run_id, req).await?;
    Ok((recorded_status(repeat), Json(recorded)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct SignalsQuery {
    /// Wait until the run's `signals` count is above this (a long poll).
    after: Option<u64>,
    /// How long to wait with `after`, in milliseconds (default 25000).
    #[param(minimum = 0, maximum = 60000, default = 25000)]
    wait_ms: Option<u64>,
}

/// What the run's owner asked of it: a cancel request and the answers to its inputs.
///
/// Agents (any run) and the thread's owner may read it. With `after`, the call
/// waits until the run has a signal beyond it, it ends, or `wait_ms` passes.
#[utoipa::path(get, path = "/v1/runs/{run_id}/signals", tag = "steering",
    params(("run_id" = String, Path, description = "a UUID or a structured `run_…` id"), SignalsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the run's signals", body = wire::RunSignals),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 404, description = E404_RUN, body = ErrorBody),
    ))]
async fn run_signals<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    PathArg(run_id): PathArg<String>,
    QueryArgs(q): QueryArgs<SignalsQuery>,
) -> Result<Json<wire::RunSignals>, AppError> {
    let wait = match q.wait_ms.unwrap_or(25_000) {
        ms @ 0..=60_000 => std::time::Duration::from_millis(ms),
        _ => {
            return Err(AppError::InvalidRequest(
                "wait_ms must be 0 to 60000".into(),
            ))
        }
    };
    Ok(Json(app.run_signals(&p, &run_id, q.after, wait).await?))
}

/// Whether a user has a connected device, and when one was last seen.
///
/// Derived from the user's open sockets; a user stays online for a grace period
/// (`--presence-grace`, 5 s) after its last socket closed. The user itself, agents
/// and auditors may ask.
#[utoipa::path(get, path = "/v1/users/{user_id}/presence", tag = "steering",
    params(("user_id" = String, Path, description = "a user id (a JWT `sub`)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the user's presence", body = wire::Presence),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = "forbidden: a user asking for another user", body = ErrorBody),
    ))]
async fn presence<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    PathArg(user_id): PathArg<String>,
) -> Result<Json<wire::Presence>, AppError> {
    Ok(Json(app.presence(&p, &user_id)?))
}

/// Append up to 1000 agent events atomically: all or none; an error names the failing `index`.
#[utoipa::path(post, path = "/v1/events", tag = "events", request_body = wire::Batch,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "all appended", body = wire::BatchAppended),
        (status = 400, description = E_APPEND_400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = E403_WRITE, body = ErrorBody),
        (status = 404, description = "run_not_found", body = ErrorBody),
        (status = 409, description = E_APPEND_409, body = ErrorBody),
        (status = 413, description = E413, body = ErrorBody),
        (status = 422, description = E_APPEND_422, body = ErrorBody),
    ))]
async fn append_batch<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    JsonBody(req): JsonBody<wire::Batch>,
) -> Result<(StatusCode, Json<wire::BatchAppended>), AppError> {
    Ok((StatusCode::CREATED, Json(app.append_batch(&p, req).await?)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct VersionQuery {
    /// Events after this thread version.
    #[serde(default)]
    after_version: u64,
    /// The page size.
    // 1000 is `MAX_LIMIT` (an attribute takes only a literal; a test checks they agree).
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<usize>,
}

/// A thread's events as frames, by thread version.
#[utoipa::path(get, path = "/v1/threads/{thread_id}/events", tag = "threads",
    params(("thread_id" = String, Path, description = "a UUID or a structured `thread_…` id"), VersionQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "one page of frames", body = wire::Frames),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 404, description = "thread_not_found (also another user's thread)", body = ErrorBody),
    ))]
async fn thread_events<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    PathArg(thread_id): PathArg<String>,
    QueryArgs(q): QueryArgs<VersionQuery>,
) -> Result<Json<wire::Frames>, AppError> {
    let limit = check_limit(q.limit)?;
    Ok(Json(
        app.thread_events(&p, &thread_id, q.after_version, limit)
            .await?,
    ))
}

/// The history as auditor envelopes (auditors only).
///
/// `next_after` is the last position examined: one call scans a bounded stretch
/// of the log, so a page may be short, or empty, before the head.
#[utoipa::path(get, path = "/v1/audit/events", tag = "audit", params(AuditParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "one page of envelopes", body = wire::Envelopes),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = "forbidden: not an auditor", body = ErrorBody),
    ))]
async fn audit_events<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    QueryArgs(q): QueryArgs<AuditParams>,
) -> Result<Json<wire::Envelopes>, AppError> {
    Ok(Json(app.audit(&p, q.parse()?).await?))
}

/// The delivery ledger (auditors only): every durable ack in log order.
///
/// Without `thread_id`: every `cursor_advanced` record after `after`, filtered; one call
/// scans a bounded stretch of the log and `next_after` is the last position examined.
/// With `thread_id`: the thread's events after position `after` under `thread`, each with
/// the owner's clients that acknowledged it (the first covering ack) and those that have
/// not; `deliveries` lists the acks those events cite, `next_after` is the last event's
/// position.
#[utoipa::path(get, path = "/v1/audit/deliveries", tag = "audit", params(DeliveryParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "one page of the ledger", body = crate::deliveries::Deliveries),
        (status = 400, description = E400, body = ErrorBody),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = "forbidden: not an auditor", body = ErrorBody),
        (status = 404, description = "thread_not_found (also for a user_id other than the owner)", body = ErrorBody),
    ))]
async fn audit_deliveries<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    QueryArgs(q): QueryArgs<DeliveryParams>,
) -> Result<Json<crate::deliveries::Deliveries>, AppError> {
    Ok(Json(app.deliveries(&p, q.parse()?).await?))
}

/// Start the online verify (auditors only): the offline `threadline verify`'s checks
/// (checksums, dense positions and stream versions, projection digests at one
/// position) against the live log, in the background. One job at a time: while one
/// runs, this answers 200 with its status instead of starting another.
#[utoipa::path(post, path = "/v1/admin/verify", tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "a job was started; poll `GET /v1/admin/verify`", body = crate::verify::VerifyStatus),
        (status = 200, description = "a job is already running: its status", body = crate::verify::VerifyStatus),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = "forbidden: not an auditor", body = ErrorBody),
    ))]
async fn start_verify<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
) -> Result<(StatusCode, Json<crate::verify::VerifyStatus>), AppError> {
    let (started, status) = app.start_verify(&p)?;
    let code = if started {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(status)))
}

/// The online verify's status (auditors only): `running` with its progress, or the
/// last job's result (`passed` or `failed`, with each problem), or `idle`.
#[utoipa::path(get, path = "/v1/admin/verify", tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the running or last job", body = crate::verify::VerifyStatus),
        (status = 401, description = E401, body = ErrorBody),
        (status = 403, description = "forbidden: not an auditor", body = ErrorBody),
    ))]
async fn verify_status<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
) -> Result<Json<crate::verify::VerifyStatus>, AppError> {
    Ok(Json(app.verify_status(&p)?))
}

/// The page size a list call asked for (default 100), within 1 to [`MAX_LIMIT`].
pub(crate) fn check_limit(limit: Option<usize>) -> Result<usize, AppError> {
    match limit.unwrap_or(100) {
        n @ 1..=MAX_LIMIT => Ok(n),
        _ => Err(AppError::InvalidRequest(format!(
            "limit must be 1 to {MAX_LIMIT}"
        ))),
    }
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "alive", body = wire::Status)))]
async fn healthz() -> Json<wire::Status> {
    Json(wire::Status {
        status: "ok".to_owned(),
    })
}

/// Readiness: projections caught up at start; reports the current lag.
///
/// The server listens only after the startup catch-up, so once it answers it is
/// ready, unless its log has stopped accepting writes (a failed commit) or its
/// projections stopped: then 503, with the reason. The lag is reported for
/// operators (it is brief and normal under load).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "ready", body = wire::Ready),
        (status = 503, description = "not ready: the log stopped accepting writes after a failed commit, \
            or the projections stopped (`reason` says which)", body = wire::Ready),
    ))]
async fn readyz<L: Log>(State(app): State<AppState<L>>) -> Response {
    let (projected, head) = (app.projector().position(), app.projector().log().head());
    let reason = if !app.projector().log().accepting() {
        Some("the event log stopped accepting writes after a failed commit".to_owned())
    } else {
        app.projector()
            .fault()
            .map(|e| format!("the projections stopped: {e}"))
    };
    let status = if reason.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let ready = wire::Ready {
        ready: reason.is_none(),
        projected: projected.0,
        head: head.0,
        reason,
    };
    (status, Json(ready)).into_response()
}

/// The response header carrying a request's id, and the request header a caller
/// (or a proxy in front) may set it with.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of one HTTP request (or of the socket it upgraded to): the caller's
/// `x-request-id` when it is sane, else a fresh UUID. In the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// A caller's id is kept when it is 1 to 128 characters of letters, digits and
    /// `-_.:/+=@`, so it can neither break a log line nor be a vehicle for one.
    fn from_header(value: Option<&axum::http::HeaderValue>) -> RequestId {
        value
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                (1..=128).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
            })
            .map(|v| RequestId(v.to_owned()))
            .unwrap_or_else(|| RequestId(uuid::Uuid::new_v4().to_string()))
    }
}

/// A span per request with its id, method and path (never the query string, which
/// may carry `access_token`); the id is echoed in the `x-request-id` response header.
async fn trace(mut req: Request, next: Next) -> Response {
    let id = RequestId::from_header(req.headers().get(REQUEST_ID_HEADER));
    let span = tracing::info_span!("request", request_id = %id.0, method = %req.method(), path = %req.uri().path(), user_id = tracing::field::Empty);
    let header = axum::http::HeaderValue::from_str(&id.0).ok();
    req.extensions_mut().insert(id);
    let started = Instant::now();
    async move {
        let mut response = next.run(req).await;
        tracing::debug!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "handled"
        );
        if let Some(header) = header {
            response.headers_mut().insert(REQUEST_ID_HEADER, header);
        }
        response
    }
    .instrument(span)
    .await
}
