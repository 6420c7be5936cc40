//! What can go wrong, as the client reports it. Most errors are reported and then
//! handled (the client reconnects); [`Error::is_fatal`] ones end the stream.

use std::time::Duration;

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A frame skipped `user_seq`s: nothing of it was delivered; the client reconnects
    /// after the last good one.
    #[error("gap: expected user_seq {expected}, got {got}; resuming after {resume_after}")]
    Gap {
        expected: u64,
        got: u64,
        resume_after: u64,
    },
    /// A frame repeated (or went back to) a `user_seq` already delivered: dropped; the
    /// client reconnects after the last good one.
    #[error("duplicate: user_seq {got} after {last}; resuming after {last}")]
    Duplicate { got: u64, last: u64 },
    /// With a thread filter: `thread_version` is not the next one.
    #[error(
        "thread_version {got} after {last} in {thread_id}; resuming after user_seq {resume_after}"
    )]
    VersionGap {
        thread_id: String,
        last: u64,
        got: u64,
        resume_after: u64,
    },
    /// The server's `welcome` resumed elsewhere than asked.
    #[error("asked to resume after {asked}, the server resumed after {got}")]
    ResumeMismatch { asked: u64, got: u64 },
    /// The server ended the session's `caught_up` beyond the last event it sent.
    #[error("caught_up at {caught_up} but the last event was {last}")]
    CaughtUpBeyond { caught_up: u64, last: u64 },
    /// An `error` frame that did not end the connection (e.g. `invalid_token` for a refresh).
    #[error("server error {code}: {message}")]
    Server { code: String, message: String },
    /// The server closed the connection (the client reconnects unless it is fatal).
    #[error("closed by the server: {code} {reason}")]
    Closed { code: u16, reason: String },
    /// The connection could not be opened or broke.
    #[error("connection: {0}")]
    Connection(String),
    /// The upgrade was answered with an HTTP status (429 and 503 are retried after `Retry-After`).
    #[error("the server refused the socket with HTTP {status}")]
    Refused {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// Nothing came back within the keep-alive deadline: the connection is presumed dead.
    #[error("no answer within {0:?}: the connection is presumed dead")]
    Timeout(Duration),
    /// The token provider failed.
    #[error("token provider: {0}")]
    Token(String),
    /// The server refused the token (fatal for a fixed token, or after repeated refusals).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A fixed token expired: there is no way to renew it.
    #[error("the token expired and it is fixed (give the client a token provider to renew it)")]
    TokenExpired,
    /// The server refused the query (4400), e.g. `after` beyond the user's head.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The configuration cannot work (e.g. an unsupported URL).
    #[error("configuration: {0}")]
    Config(String),
    /// An ack was refused by the server (`invalid_ack`), so a flush could not confirm it.
    #[error("an ack was refused: {0}")]
    AckRefused(String),
    /// The connection dropped before an ack was confirmed, and a filtered connection
    /// cannot acknowledge what an earlier connection delivered.
    #[error("the connection dropped before the ack was confirmed")]
    FlushInterrupted,
    /// The client was closed.
    #[error("the client is closed")]
    ClientClosed,
}

impl Error {
    /// Whether the client gives up after this error (the stream then ends).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Unauthorized(_)
                | Error::TokenExpired
                | Error::BadRequest(_)
                | Error::Config(_)
                | Error::ClientClosed
                | Error::Refused {
                    status: 400 | 401 | 403 | 404,
                    ..
                }
        )
    }
}
