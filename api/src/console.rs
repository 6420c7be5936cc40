//! The auditor console at `/console`: three static files embedded in the binary
//! (no build step, no CDN). The page holds no secret: it asks for an auditor
//! token, keeps it in `sessionStorage` and sends it as a bearer header to the
//! same API everyone else uses.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/app.css");

/// Scripts and styles only from this server, no framing, no referrer (a URL never
/// carries the token, but nothing else should leak either).
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The auditor console (HTML). It asks for an auditor token and keeps it in
/// `sessionStorage` only; its assets are embedded in the binary.
#[utoipa::path(get, path = "/console", tag = "console", operation_id = "console",
    responses((status = 200, description = "the console page", content_type = "text/html", body = String)))]
pub(crate) async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

/// The console's script.
#[utoipa::path(get, path = "/console/app.js", tag = "console", operation_id = "console_script",
    responses((status = 200, description = "the console's script", content_type = "text/javascript", body = String)))]
pub(crate) async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// The console's style sheet.
#[utoipa::path(get, path = "/console/app.css", tag = "console", operation_id = "console_style",
    responses((status = 200, description = "the console's style sheet", content_type = "text/css", body = String)))]
pub(crate) async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}
