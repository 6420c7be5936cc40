//! Extractors that answer bad input in the app's own error format: the
//! authenticated principal, JSON bodies, query strings and `If-Match`.

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::app::Gate;
use crate::auth::{bearer_token, AuthError, Authenticator, Principal};
use crate::error::AppError;

/// The caller, authenticated by `Authorization: Bearer <jwt>`.
#[derive(Debug, Clone)]
pub struct Auth(pub Principal);

impl<S> FromRequestParts<S> for Auth
where
    S: Send + Sync,
    Gate: FromRef<S>,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let app = Gate::from_ref(state);
        let auth: &Authenticator = &app.auth;
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?
            .to_str()
            .map_err(|_| AuthError::Malformed)?;
        let token = bearer_token(value).ok_or_else(|| {
            AuthError::Invalid("the Authorization header must be `Bearer <jwt>`".into())
        })?;
        let principal = auth.authenticate(token).await?;
        tracing::Span::current().record("user_id", principal.actor.user.as_str());
        app.rate
            .check(&principal.actor)
            .map_err(AppError::RateLimited)?;
        Ok(Auth(principal))
    }
}

/// A JSON body; anything unparsable is `400 invalid_request`, too large `413`, and one
/// not complete within the header deadline `408 request_timeout` (a body trickled in a
/// byte at a time must not hold its connection for ever).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    Gate: FromRef<S>,
    T: DeserializeOwned,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON body that may be left out: an empty body reads as `T::default()`
/// (a cancel needs no body); anything else is read like [`JsonBody`].
#[derive(Debug)]
pub struct OptionalJsonBody<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJsonBody<T>
where
    S: Send + Sync,
    Gate: FromRef<S>,
    T: DeserializeOwned + Default,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

async fn body_bytes<S>(req: Request, state: &S) -> Result<Bytes, AppError>
where
    S: Send + Sync,
    Gate: FromRef<S>,
{
    let deadline = Gate::from_ref(state).header_timeout;
    tokio::time::timeout(deadline, Bytes::from_request(req, state))
        .await
        .map_err(|_| AppError::RequestTimeout)?
        .map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::PayloadTooLarge("request body is over 1 MiB".into())
            } else {
                AppError::InvalidRequest(e.body_text())
            }
        })
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    serde_json::from_slice(bytes)
        .map_err(|e| AppError::InvalidRequest(format!("invalid JSON body: {e}")))
}

/// A query string; unknown or mistyped parameters are `400 invalid_request`.
#[derive(Debug)]
pub struct QueryArgs<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryArgs<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| QueryArgs(q.0))
            .map_err(|e| AppError::InvalidRequest(e.body_text()))
    }
}

/// Refuses a query parameter the matched route does not know (`400 invalid_request`),
/// so a typo such as `?usr_id=` is an error rather than a silently unfiltered answer.
/// The known names are the query parameters the OpenAPI document gives the route
/// ([`crate::openapi::query_names`], from its `IntoParams` struct), so what is documented is what
/// is accepted. The socket checks its own query (a bad one
/// closes the socket with 4400 after the upgrade).
pub async fn known_query(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    if let (Some(query), Some(path)) = (req.uri().query(), matched.as_ref()) {
        if path.as_str() != "/v1/ws" {
            if let Err(e) = check_query(req.method().as_str(), path.as_str(), query) {
                return e.into_response();
            }
        }
    }
    next.run(req).await
}

/// Checks the names in `query` against those `method path` knows.
pub(crate) fn check_query(method: &str, path: &str, query: &str) -> Result<(), AppError> {
    let Some(known) = crate::openapi::query_names(method, path) else {
        return Ok(());
    };
    let known: Vec<&str> = known.collect();
    let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(
        &format!("/?{query}")
            .parse()
            .map_err(|_| AppError::InvalidRequest("malformed query string".into()))?,
    )
    .map_err(|e| AppError::InvalidRequest(e.body_text()))?;
    match pairs
        .0
        .iter()
        .find(|(name, _)| !known.contains(&name.as_str()))
    {
        None => Ok(()),
        Some((name, _)) => {
            let name: String = name.chars().take(64).collect();
            Err(AppError::InvalidRequest(if known.is_empty() {
                format!("unknown query parameter {name:?}: this call takes none")
            } else {
                format!(
                    "unknown query parameter {name:?}: this call takes {}",
                    known.join(", ")
                )
            }))
        }
    }
}

/// `If-Match: <thread_version>` (quotes allowed, as for an ETag).
#[derive(Debug)]
pub struct IfMatch(pub Option<u64>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        let Some(value) = parts.headers.get(header::IF_MATCH) else {
            return Ok(IfMatch(None));
        };
        value
            .to_str()
            .ok()
            .map(|v| v.trim().trim_start_matches("W/").trim_matches('"'))
            .and_then(|v| v.parse().ok())
            .map(|v| IfMatch(Some(v)))
            .ok_or_else(|| {
                AppError::InvalidRequest("If-Match must be a thread version number".into())
            })
    }
}

/// A path parameter; one that is not valid UTF-8 after percent-decoding is
/// `400 invalid_id` in the app's JSON format (axum's own rejection is plain text).
#[derive(Debug)]
pub struct PathArg<T>(pub T);

impl<S, T> FromRequestParts<S> for PathArg<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(p) => Ok(PathArg(p.0)),
            Err(PathRejection::FailedToDeserializePathParams(e))
                if matches!(e.kind(), ErrorKind::InvalidUtf8InPathParam { .. }) =>
            {
                Err(AppError::InvalidId(
                    "an id in the path is not valid UTF-8".into(),
                ))
            }
            Err(e) => Err(AppError::InvalidRequest(e.body_text())),
        }
    }
}
