//! The one error table at the edge: every failure maps to an HTTP status and a
//! stable snake_case `code`, answered as `{"error":{"code","message"}}`.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use threadline_engine::DomainError;
use threadline_projections::{ProjectionError, SubmitError};
use threadline_storage::StorageError;

use crate::auth::AuthError;
use crate::wire::{ErrorBody, ErrorDetail};

/// Every stable `code` an HTTP error answer carries: the enum of the OpenAPI
/// `Error` schema. `status_and_code` answers only these (checked by a test).
pub const CODES: &[&str] = &[
    "invalid_request",
    "invalid_id",
    "invalid_event_type",
    "unauthorized",
    "forbidden",
    "not_found",
    "thread_not_found",
    "run_not_found",
    "method_not_allowed",
    "request_timeout",
    "thread_exists",
    "run_exists",
    "run_closed",
    "run_expired",
    "version_conflict",
    "event_id_conflict",
    "quota_exceeded",
    "payload_too_large",
    "invalid_lifecycle",
    "rate_limited",
    "message_not_found",
    "message_exists",
    "message_closed",
    "sequence_gap",
    "internal",
    "overloaded",
    "storage_unavailable",
];

/// Everything a handler can answer instead of a success.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Unauthorized(#[from] AuthError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidId(String),
    #[error("unknown event type {0:?}")]
    InvalidEventType(String),
    #[error("{0}")]
    InvalidEventTypeMessage(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("no route for this path")]
    NoRoute,
    #[error("the request body did not arrive within the header deadline")]
    RequestTimeout,
    #[error("this method is not allowed here")]
    MethodNotAllowed,
    /// The caller is over its request rate; it may try again after the duration.
    #[error("too many requests; retry after {} s", retry_after_secs(.0))]
    RateLimited(std::time::Duration),
    /// The server is at its connection limit (not the caller's fault, but no 5xx
    /// is ever the answer to a client mistake: this one is the server's state).
    #[error("the server is at its connection limit; retry shortly")]
    Overloaded,
    /// A domain rejection, optionally naming the batch index that failed.
    #[error("{error}")]
    Domain {
        error: DomainError,
        index: Option<usize>,
    },
    #[error("thread is at version {current}, not {expected}")]
    VersionConflict {
        expected: u64,
        current: u64,
        index: Option<usize>,
    },
    /// Writers kept racing for one thread's version; the client may retry.
    #[error("the thread kept changing under every attempt; retry shortly")]
    Contended,
    /// A storage failure: the server's fault, never the client's.
    #[error("storage failed")]
    Storage(#[from] StorageError),
    /// A projection failure (a record the fold cannot read, or the fold stopped).
    #[error("projections failed")]
    Projection(#[from] ProjectionError),
    /// Any other failure of the server's own.
    #[error("{0}")]
    Internal(&'static str),
}

impl AppError {
    /// The HTTP status and stable code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            AppError::Unauthorized(_) => (S::UNAUTHORIZED, "unauthorized"),
            AppError::Forbidden(_) => (S::FORBIDDEN, "forbidden"),
            AppError::InvalidRequest(_) => (S::BAD_REQUEST, "invalid_request"),
            AppError::InvalidId(_) => (S::BAD_REQUEST, "invalid_id"),
            AppError::InvalidEventType(_) | AppError::InvalidEventTypeMessage(_) => {
                (S::BAD_REQUEST, "invalid_event_type")
            }
            AppError::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "payload_too_large"),
            AppError::NoRoute => (S::NOT_FOUND, "not_found"),
            AppError::RequestTimeout => (S::REQUEST_TIMEOUT, "request_timeout"),
            AppError::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            AppError::RateLimited(_) => (S::TOO_MANY_REQUESTS, "rate_limited"),
            AppError::Overloaded | AppError::Contended => (S::SERVICE_UNAVAILABLE, "overloaded"),
            AppError::VersionConflict { .. } => (S::CONFLICT, "version_conflict"),
            // The log could not make the write durable (a failed fsync, a full disk) and
            // stopped: nothing was acknowledged; the server needs its operator.
            _ if self.storage_unavailable() => (S::SERVICE_UNAVAILABLE, "storage_unavailable"),
            AppError::Storage(_) | AppError::Projection(_) | AppError::Internal(_) => {
                (S::INTERNAL_SERVER_ERROR, "internal")
            }
            AppError::Domain { error, .. } => {
                let status = match error {
                    DomainError::InvalidId(_) | DomainError::InvalidInput(_) => S::BAD_REQUEST,
                    DomainError::Forbidden(_) => S::FORBIDDEN,
                    DomainError::ThreadNotFound(_)
                    | DomainError::RunNotFound(_)
                    | DomainError::MessageNotFound(_) => S::NOT_FOUND,
                    DomainError::MessageExists(_)
                    | DomainError::MessageClosed(_)
                    | DomainError::SequenceGap { .. }
                    | DomainError::ThreadExists(_)
                    | DomainError::RunExists(_)
                    | DomainError::RunClosed(_)
                    | DomainError::RunExpired(_)
                    | DomainError::EventIdConflict(_)
                    | DomainError::QuotaExceeded { .. } => S::CONFLICT,
                    DomainError::InvalidLifecycle(_) => S::UNPROCESSABLE_ENTITY,
                    DomainError::TooLarge { .. } => S::PAYLOAD_TOO_LARGE,
                    DomainError::RateLimited { .. } => S::TOO_MANY_REQUESTS,
                };
                (status, error.code())
            }
        }
    }

    /// The log cannot take or serve writes (I/O failed, or it stopped after a failed
    /// commit), whether the write path or the fold met it first.
    fn storage_unavailable(&self) -> bool {
        matches!(
            self,
            AppError::Storage(StorageError::Io(_) | StorageError::Closed)
                | AppError::Projection(ProjectionError::Storage(
                    StorageError::Io(_) | StorageError::Closed
                ))
        )
    }

    fn index(&self) -> Option<usize> {
        match self {
            AppError::Domain { index, .. } | AppError::VersionConflict { index, .. } => *index,
            _ => None,
        }
    }

    /// The same error, naming batch index `i`.
    pub fn at(self, i: usize) -> AppError {
        match self {
            AppError::Domain { error, .. } => AppError::Domain {
                error,
                index: Some(i),
            },
            AppError::InvalidId(m) => AppError::InvalidId(format!("event {i}: {m}")),
            AppError::InvalidRequest(m) => AppError::InvalidRequest(format!("event {i}: {m}")),
            AppError::InvalidEventType(t) => {
                AppError::InvalidEventTypeMessage(format!("event {i}: unknown event type {t:?}"))
            }
            other => other,
        }
    }

    /// A batch error names the failing index; a single-event call does not.
    pub fn without_index(self) -> AppError {
        match self {
            AppError::Domain { error, .. } => AppError::Domain { error, index: None },
            AppError::VersionConflict {
                expected, current, ..
            } => AppError::VersionConflict {
                expected,
                current,
                index: None,
            },
            other => other,
        }
    }
}

/// `Retry-After` is whole seconds: the wait rounded up, at least 1.
fn retry_after_secs(wait: &std::time::Duration) -> u64 {
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
        .max(1)
}

impl From<DomainError> for AppError {
    fn from(error: DomainError) -> Self {
        AppError::Domain { error, index: None }
    }
}

impl From<threadline_engine::IdError> for AppError {
    fn from(e: threadline_engine::IdError) -> Self {
        AppError::InvalidId(e.to_string())
    }
}

impl From<SubmitError> for AppError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Domain { index, error } => AppError::Domain {
                error,
                index: Some(index),
            },
            SubmitError::VersionConflict {
                index,
                expected,
                current,
            } => AppError::VersionConflict {
                expected,
                current,
                index: Some(index),
            },
            SubmitError::Contended { .. } => AppError::Contended,
            SubmitError::Storage(e) => e.into(),
            SubmitError::Projection(e) => e.into(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        metrics::counter!("threadline_rejected_requests_total", "code" => code).increment(1);
        let message = match (&self, self.index()) {
            _ if self.storage_unavailable() => {
                tracing::error!(error = %Chain(&self), "storage unavailable");
                "the event log cannot make writes durable; nothing was appended. See the server log"
                    .to_owned()
            }
            (AppError::Storage(_) | AppError::Projection(_) | AppError::Internal(_), _) => {
                // `{:#}`-style: the whole chain of sources, for the operator only.
                tracing::error!(error = %Chain(&self), "internal error");
                "internal error; see the server log".to_owned()
            }
            (_, Some(i)) => format!("event {i}: {self}"),
            _ => self.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message,
                index: self.index(),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        let retry_after = match &self {
            AppError::RateLimited(wait) => Some(retry_after_secs(wait)),
            AppError::Overloaded | AppError::Contended => Some(1),
            AppError::Domain {
                error: DomainError::RateLimited { retry_after_ms, .. },
                ..
            } => Some(retry_after_ms.div_ceil(1000).max(1)),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        response
    }
}

/// An error and each of its sources, joined with `: `.
pub(crate) struct Chain<'a>(pub(crate) &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use threadline_engine::{EventId, RunId, ThreadId};

    /// One error of each kind. `kind` below has no wildcard, so a new variant of
    /// either enum does not compile until it is looked at here.
    fn one_of_each() -> Vec<AppError> {
        let thread = ThreadId::parse("thread_a").unwrap();
        let run = RunId::parse("run_a").unwrap();
        let domain = [
            DomainError::InvalidId(ThreadId::parse("").unwrap_err()),
            DomainError::Forbidden("no".into()),
            DomainError::ThreadNotFound(thread.clone()),
            DomainError::RunNotFound(run.clone()),
            DomainError::ThreadExists(thread),
            DomainError::RunExists(run.clone()),
            DomainError::RunClosed(run.clone()),
            DomainError::RunExpired(run),
            DomainError::EventIdConflict(EventId::generate()),
            DomainError::InvalidLifecycle("no".into()),
            DomainError::TooLarge {
                what: "data",
                limit: 1,
            },
            DomainError::QuotaExceeded {
                what: "threads",
                limit: 1,
            },
            DomainError::InvalidInput("no".into()),
            DomainError::MessageNotFound(threadline_engine::MessageId::parse("msg_a").unwrap()),
            DomainError::MessageExists(threadline_engine::MessageId::parse("msg_a").unwrap()),
            DomainError::MessageClosed(threadline_engine::MessageId::parse("msg_a").unwrap()),
            DomainError::SequenceGap {
                message_id: threadline_engine::MessageId::parse("msg_a").unwrap(),
                expected: 2,
                got: 3,
            },
            DomainError::RateLimited {
                what: "deltas",
                limit: 1,
                retry_after_ms: 10,
            },
        ];
        let mut all: Vec<AppError> = domain.into_iter().map(AppError::from).collect();
        all.extend([
            AppError::Unauthorized(AuthError::Missing),
            AppError::Forbidden("no".into()),
            AppError::InvalidRequest("no".into()),
            AppError::InvalidId("no".into()),
            AppError::InvalidEventType("x".into()),
            AppError::InvalidEventTypeMessage("x".into()),
            AppError::PayloadTooLarge("x".into()),
            AppError::NoRoute,
            AppError::RequestTimeout,
            AppError::MethodNotAllowed,
            AppError::RateLimited(std::time::Duration::from_secs(1)),
            AppError::Overloaded,
            AppError::VersionConflict {
                expected: 1,
                current: 2,
                index: None,
            },
            AppError::Contended,
            AppError::Storage(threadline_storage::StorageError::Closed),
            // Other storage and projection failures answer as Internal does.
            AppError::Internal("x"),
        ]);
        all
    }

    #[allow(dead_code)]
    fn kind(e: &AppError) {
        match e {
            AppError::Unauthorized(_)
            | AppError::Forbidden(_)
            | AppError::InvalidRequest(_)
            | AppError::InvalidId(_)
            | AppError::InvalidEventType(_)
            | AppError::InvalidEventTypeMessage(_)
            | AppError::PayloadTooLarge(_)
            | AppError::NoRoute
            | AppError::RequestTimeout
            | AppError::MethodNotAllowed
            | AppError::RateLimited(_)
            | AppError::Overloaded
            | AppError::VersionConflict { .. }
            | AppError::Contended
            | AppError::Storage(_)
            | AppError::Projection(_)
            | AppError::Internal(_) => {}
            AppError::Domain { error, .. } => match error {
                DomainError::InvalidId(_)
                | DomainError::Forbidden(_)
                | DomainError::ThreadNotFound(_)
                | DomainError::RunNotFound(_)
                | DomainError::ThreadExists(_)
                | DomainError::RunExists(_)
                | DomainError::RunClosed(_)
                | DomainError::RunExpired(_)
                | DomainError::EventIdConflict(_)
                | DomainError::InvalidLifecycle(_)
                | DomainError::TooLarge { .. }
                | DomainError::QuotaExceeded { .. }
                | DomainError::InvalidInput(_)
                | DomainError::MessageNotFound(_)
                | DomainError::MessageExists(_)
                | DomainError::MessageClosed(_)
                | DomainError::SequenceGap { .. }
                | DomainError::RateLimited { .. } => {}
            },
        }
    }

    #[test]
    fn the_documented_codes_are_exactly_those_answered() {
        let answered: std::collections::BTreeSet<&str> = one_of_each()
            .iter()
            .map(|e| e.status_and_code().1)
            .collect();
        let documented: std::collections::BTreeSet<&str> = CODES.iter().copied().collect();
        assert_eq!(answered, documented);
        assert_eq!(documented.len(), CODES.len(), "a code is listed twice");
    }
}
