//! Prometheus metrics, every one named `threadline_*`, rendered at `/metrics`.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls reuse it.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("threadline_appends_total", "Events appended to the log.");
    describe_histogram!(
        "threadline_append_seconds",
        Unit::Seconds,
        "Time from a command's submission to its durable acknowledgement."
    );
    describe_gauge!(
        "threadline_sockets_connected",
        "Open WebSocket connections."
    );
    describe_gauge!(
        "threadline_users_online",
        "Users with a connected device, or whose last one left within the presence grace."
    );
    describe_counter!(
        "threadline_frames_sent_total",
        "Event frames sent on sockets."
    );
    describe_histogram!(
        "threadline_replay_lag_events",
        "Events a socket still had to send after each page (replay lag)."
    );
    describe_histogram!(
        "threadline_cursor_lag_events",
        "Events between a client's acknowledged cursor and its head, at each ack."
    );
    describe_counter!(
        "threadline_rejected_requests_total",
        "Requests answered with an error, by code."
    );
    describe_gauge!(
        "threadline_log_head",
        "The durable head position of the log."
    );
    describe_gauge!(
        "threadline_projected_position",
        "The position the projections have folded."
    );
    describe_gauge!(
        "threadline_verify_running",
        "1 while an online verify (POST /v1/admin/verify) runs, else 0."
    );
    describe_gauge!(
        "threadline_verify_checked_position",
        "The last position the running (or last) online verify has checked."
    );
    describe_gauge!(
        "threadline_verify_target_position",
        "The log head the running (or last) online verify checks up to."
    );
    describe_gauge!(
        "threadline_verify_digest_position",
        "The position at which the online verify compares projection digests."
    );
    describe_gauge!(
        "threadline_verify_problems",
        "Problems the last finished online verify found (0: it passed)."
    );
    describe_counter!(
        "threadline_verify_runs_total",
        "Online verify jobs finished, by result (passed, failed)."
    );
    metrics::gauge!("threadline_verify_running").set(0.0);
}

/// Prometheus text; every metric is named `threadline_*`.
#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "metrics",
    responses((status = 200, description = "the Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn render() -> Response {
    let body = install().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
