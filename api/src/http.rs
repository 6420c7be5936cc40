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

use crate::app::{AppState, Log, MAX_LIMIT};
use crate::audit::AuditParams;
use crate::deliveries::DeliveryParams;
use crate::error::AppError;
use crate::extract::{Auth, IfMatch, JsonBody, PathArg, QueryArgs};
use crate::wire;

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
        .route("/v1/events", post(append_batch::<L>))
        .route("/v1/audit/events", get(audit_events::<L>))
        .route("/v1/audit/deliveries", get(audit_deliveries::<L>))
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

async fn create_thread<L: Log>(
    State(app): State<AppState<L>>,
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

async fn list_threads<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Json<wire::ThreadList>, AppError> {
    let limit = check_limit(q.limit)?;
    Ok(Json(app.list_threads(&p, q.user_id, limit, q.after)?))
}

async fn get_thread<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    PathArg(thread_id): PathArg<String>,
) -> Result<Json<wire::ThreadDetail>, AppError> {
    Ok(Json(app.get_thread(&p, &thread_id).await?))
}

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

async fn append_batch<L: Log>(
    State(app): State<AppState<L>>,
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

async fn audit_events<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    QueryArgs(q): QueryArgs<AuditParams>,
) -> Result<Json<wire::Envelopes>, AppError> {
    Ok(Json(app.audit(&p, q.parse()?).await?))
}

async fn audit_deliveries<L: Log>(
    State(app): State<AppState<L>>,
    Auth(p): Auth,
    QueryArgs(q): QueryArgs<DeliveryParams>,
) -> Result<Json<crate::deliveries::Deliveries>, AppError> {
    Ok(Json(app.deliveries(&p, q.parse()?).await?))
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

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// The server listens only after the startup catch-up, so once it answers it is
/// ready, unless its log has stopped accepting writes (a failed commit): then 503.
/// The lag is reported for operators (it is brief and normal under load).
async fn readyz<L: Log>(State(app): State<AppState<L>>) -> Response {
    let (projected, head) = (app.projector().position(), app.projector().log().head());
    let reason = if !app.projector().log().accepting() {
        Some("the event log stopped accepting writes after a failed commit".to_owned())
    } else {
        app.projector()
            .fault()
            .map(|e| format!("the projections stopped: {e}"))
    };
    if let Some(reason) = reason {
        let body = serde_json::json!({"ready": false, "projected": projected.0, "head": head.0,
            "reason": reason});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(serde_json::json!({"ready": true, "projected": projected.0, "head": head.0}))
        .into_response()
}

/// A span per request with method and path; never the query string, which
/// may carry `access_token`.
async fn trace(req: Request, next: Next) -> Response {
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), user_id = tracing::field::Empty);
    let started = Instant::now();
    async move {
        let response = next.run(req).await;
        tracing::debug!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "handled"
        );
        response
    }
    .instrument(span)
    .await
}
