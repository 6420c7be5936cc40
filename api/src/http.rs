//! The HTTP routes: each handler extracts, calls one [`AppState`] function and
//! maps the result.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use threadline_engine::{RunId, ThreadId, UserId};
use threadline_storage::EventLog;

use crate::app::{AppState, AuditQuery, MAX_LIMIT};
use crate::error::AppError;
use crate::extract::{Auth, IfMatch, JsonBody, PathArg, QueryArgs};
use crate::wire;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The whole API as a router (tests can drive it without a socket).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/threads", post(create_thread).get(list_threads))
        .route("/v1/threads/{thread_id}", get(get_thread))
        .route("/v1/threads/{thread_id}/runs", post(register_run))
        .route("/v1/threads/{thread_id}/events", get(thread_events))
        .route("/v1/runs/{run_id}/events", post(append_event))
        .route("/v1/events", post(append_batch))
        .route("/v1/audit/events", get(audit_events))
        .route("/v1/ws", get(crate::ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::render))
        .route("/openapi.json", get(crate::openapi::document))
        .route_layer(axum::middleware::from_fn(crate::extract::known_query))
        .fallback(|| async { AppError::NoRoute })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(crate::server::trace))
        .with_state(state)
}

async fn create_thread(
    State(app): State<AppState>,
    Auth(p): Auth,
    JsonBody(req): JsonBody<wire::CreateThread>,
) -> Result<(StatusCode, Json<wire::ThreadCreated>), AppError> {
    Ok((StatusCode::CREATED, Json(app.create_thread(&p, req).await?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    user_id: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_threads(
    State(app): State<AppState>,
    Auth(p): Auth,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Json<wire::ThreadList>, AppError> {
    let limit = check_limit(q.limit)?;
    Ok(Json(app.list_threads(&p, q.user_id, limit, q.after)?))
}

async fn get_thread(
    State(app): State<AppState>,
    Auth(p): Auth,
    PathArg(thread_id): PathArg<String>,
) -> Result<Json<wire::ThreadDetail>, AppError> {
    Ok(Json(app.get_thread(&p, &thread_id)?))
}

async fn register_run(
    State(app): State<AppState>,
    Auth(p): Auth,
    PathArg(thread_id): PathArg<String>,
    IfMatch(if_match): IfMatch,
    JsonBody(req): JsonBody<wire::RegisterRun>,
) -> Result<(StatusCode, Json<wire::RunRegistered>), AppError> {
    let registered = app.register_run(&p, &thread_id, req, if_match).await?;
    Ok((StatusCode::CREATED, Json(registered)))
}

async fn append_event(
    State(app): State<AppState>,
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

async fn append_batch(
    State(app): State<AppState>,
    Auth(p): Auth,
    JsonBody(req): JsonBody<wire::Batch>,
) -> Result<(StatusCode, Json<wire::BatchAppended>), AppError> {
    Ok((StatusCode::CREATED, Json(app.append_batch(&p, req).await?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionQuery {
    #[serde(default)]
    after_version: u64,
    limit: Option<usize>,
}

async fn thread_events(
    State(app): State<AppState>,
    Auth(p): Auth,
    PathArg(thread_id): PathArg<String>,
    QueryArgs(q): QueryArgs<VersionQuery>,
) -> Result<Json<wire::Frames>, AppError> {
    let limit = check_limit(q.limit)?;
    Ok(Json(app.thread_events(
        &p,
        &thread_id,
        q.after_version,
        limit,
    )?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditArgs {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    user_id: Option<String>,
    thread_id: Option<String>,
    run_id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

impl AuditArgs {
    fn parse(self) -> Result<AuditQuery, AppError> {
        let time = |t: Option<String>| {
            t.map(|t| wire::parse_timestamp(&t).map_err(AppError::InvalidRequest))
                .transpose()
        };
        Ok(AuditQuery {
            after: self.after,
            limit: check_limit(self.limit)?,
            user_id: self.user_id.map(|u| UserId::parse(&u)).transpose()?,
            thread_id: self.thread_id.map(|t| ThreadId::parse(&t)).transpose()?,
            run_id: self.run_id.map(|r| RunId::parse(&r)).transpose()?,
            event_type: self.event_type,
            since_ms: time(self.since)?,
            until_ms: time(self.until)?,
        })
    }
}

async fn audit_events(
    State(app): State<AppState>,
    Auth(p): Auth,
    QueryArgs(q): QueryArgs<AuditArgs>,
) -> Result<Json<wire::Envelopes>, AppError> {
    Ok(Json(app.audit(&p, &q.parse()?)?))
}

fn check_limit(limit: Option<usize>) -> Result<usize, AppError> {
    match limit.unwrap_or(100) {
        n @ 1..=MAX_LIMIT => Ok(n),
        _ => Err(AppError::InvalidRequest(format!(
            "limit must be 1 to {MAX_LIMIT}"
        ))),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// The server listens only after the startup catch-up, so once it answers it is
/// ready; the lag is reported for operators (it is brief and normal under load).
async fn readyz(State(app): State<AppState>) -> Json<serde_json::Value> {
    let (projected, head) = (app.projector.position(), app.projector.log().head());
    Json(serde_json::json!({"ready": true, "projected": projected.0, "head": head.0}))
}
