//! Command-line and environment configuration shared by every `threadline` subcommand, and the generated JWT secret kept in the data dir.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the keys or the data dir cannot be set up (start-up and `threadline token` only).
/// Each variant's message is for the operator; `{:#}` adds the source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad option, or a bad combination of options.
    #[error("{0}")]
    Invalid(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    Key {
        context: String,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    #[error("{context}")]
    In {
        context: String,
        #[source]
        source: Box<ConfigError>,
    },
    #[error(transparent)]
    Id(#[from] threadline_engine::IdError),
    #[error("signing the token failed")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Returns early with [`ConfigError::Invalid`] and a formatted message.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::config::ConfigError::Invalid(format!($($t)*)))
    };
}
pub(crate) use bail;

/// Adds what was being done to an error (or turns a `None` into an error), keeping the source.
pub(crate) trait Context<T> {
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, ConfigError>;
    fn context(self, context: &str) -> Result<T, ConfigError>
    where
        Self: Sized,
    {
        self.with_context(|| context)
    }
}

impl<T> Context<T> for Result<T, std::io::Error> {
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, ConfigError> {
        self.map_err(|source| ConfigError::Io {
            context: context().into(),
            source,
        })
    }
}

impl<T> Context<T> for Result<T, jsonwebtoken::errors::Error> {
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, ConfigError> {
        self.map_err(|source| ConfigError::Key {
            context: context().into(),
            source,
        })
    }
}

impl<T> Context<T> for Result<T, ConfigError> {
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, ConfigError> {
        self.map_err(|source| ConfigError::In {
            context: context().into(),
            source: Box::new(source),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, ConfigError> {
        self.ok_or_else(|| ConfigError::Invalid(context().into()))
    }
}

/// Name of the generated HS256 secret inside the data dir.
const SECRET_FILE_NAME: &str = "jwt.secret";

/// Leeway above this would make `exp` meaningless for short-lived tokens.
pub const MAX_JWT_LEEWAY: Duration = Duration::from_secs(60);

/// Shortest HS256 secret accepted: HMAC-SHA256's own output size (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// Where Threadline keeps its data.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Directory holding the event log, the projections and the generated `jwt.secret`
    /// (with `--log nats://…` only this gateway's projection checkpoints and the secret).
    /// `serve` creates it on first use (the other tools never do). Only one process may hold it at a time.
    #[arg(
        long,
        env = "THREADLINE_DATA",
        default_value = "./data",
        value_name = "DIR"
    )]
    pub data: PathBuf,
}

/// The asymmetric algorithms a PEM key may be used with.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlg {
    /// RSA PKCS#1 v1.5 with SHA-256.
    #[value(name = "RS256")]
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    #[value(name = "ES256")]
    Es256,
}

impl JwtAlg {
    pub fn algorithm(self) -> jsonwebtoken::Algorithm {
        match self {
            Self::Rs256 => jsonwebtoken::Algorithm::RS256,
            Self::Es256 => jsonwebtoken::Algorithm::ES256,
        }
    }
}

impl fmt::Display for JwtAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        })
    }
}

/// How tokens are signed and verified. Exactly one algorithm is in force: HS256 with
/// `--jwt-secret` or `--jwt-secret-file`, RS256/ES256 with a PEM key, or else the HS256
/// secret in `<data>/jwt.secret`.
// Debug is written by hand so the secret never reaches a log line.
#[derive(clap::Args, Clone)]
pub struct KeyArgs {
    /// Shared secret for HS256, at least 32 bytes. Without any key option, the secret
    /// generated into `<data>/jwt.secret` on the first `serve` is used instead. A secret on
    /// the command line is visible to other local users (`ps`); prefer --jwt-secret-file.
    #[arg(
        long,
        env = "THREADLINE_JWT_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        conflicts_with_all = ["jwt_secret_file", "jwt_public_key", "jwt_private_key"]
    )]
    pub jwt_secret: Option<String>,

    /// File holding the HS256 secret (at least 32 bytes; surrounding whitespace and the
    /// final newline are ignored), so the secret stands on no command line.
    #[arg(
        long,
        env = "THREADLINE_JWT_SECRET_FILE",
        value_name = "FILE",
        conflicts_with_all = ["jwt_public_key", "jwt_private_key"]
    )]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM file with the public key (SPKI `BEGIN PUBLIC KEY`, or `BEGIN RSA PUBLIC KEY`) that
    /// verifies tokens; requires --jwt-alg.
    #[arg(long, env = "THREADLINE_JWT_PUBLIC_KEY", value_name = "PEM_FILE")]
    pub jwt_public_key: Option<PathBuf>,

    /// Algorithm of --jwt-public-key / --jwt-private-key.
    #[arg(
        long,
        env = "THREADLINE_JWT_ALG",
        value_enum,
        ignore_case = true,
        value_name = "ALG"
    )]
    pub jwt_alg: Option<JwtAlg>,

    /// PEM file with the private key (PKCS#8 for ES256; PKCS#1 or PKCS#8 for RS256). Only
    /// `threadline token` uses it, to sign tokens that --jwt-public-key verifies.
    #[arg(long, env = "THREADLINE_JWT_PRIVATE_KEY", value_name = "PEM_FILE")]
    pub jwt_private_key: Option<PathBuf>,

    /// Required `iss` claim. When unset, `iss` is not checked (and `token` sets none).
    #[arg(long, env = "THREADLINE_JWT_ISSUER", value_name = "ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim. When unset, `aud` is not checked (and `token` sets none).
    #[arg(long, env = "THREADLINE_JWT_AUDIENCE", value_name = "AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew tolerated on `exp` and `nbf`, e.g. `5s`; at most 60s. Also delays the
    /// 4001 close of a socket whose token expires.
    #[arg(
        long,
        env = "THREADLINE_JWT_LEEWAY",
        default_value = "0s",
        value_parser = parse_leeway,
        value_name = "DURATION"
    )]
    pub jwt_leeway: Duration,

    /// URL of the identity provider's JSON Web Key Set (`https://`, or `http://` to a
    /// loopback address only). Tokens are then verified by their `kid` against the keys
    /// it publishes (RS256, ES256, EdDSA…), each with its own algorithm, instead of with
    /// one configured key. The set is fetched at start (failing the start if it cannot
    /// be), then refreshed on a schedule, on an unknown `kid` and on SIGHUP.
    #[arg(
        long,
        env = "THREADLINE_JWKS_URL",
        value_name = "URL",
        value_parser = parse_jwks_url,
        conflicts_with_all = ["jwt_secret", "jwt_secret_file", "jwt_public_key", "jwt_alg"]
    )]
    pub jwks_url: Option<String>,

    /// How often the key set is fetched again: a key the provider removed stops
    /// verifying (and its sockets close with 4001) within this.
    #[arg(long, env = "THREADLINE_JWKS_REFRESH_INTERVAL", default_value = "5m", value_parser = parse_timeout, value_name = "DURATION")]
    pub jwks_refresh_interval: Duration,

    /// A token naming a `kid` not in the cached set fetches the set again, at most
    /// once per this (other such tokens meanwhile are refused without a fetch).
    #[arg(long, env = "THREADLINE_JWKS_MIN_REFRESH_INTERVAL", default_value = "30s", value_parser = parse_timeout, value_name = "DURATION")]
    pub jwks_min_refresh_interval: Duration,

    /// One fetch of the key set (connecting, sending, reading the body) must complete
    /// within this.
    #[arg(long, env = "THREADLINE_JWKS_TIMEOUT", default_value = "10s", value_parser = parse_timeout, value_name = "DURATION")]
    pub jwks_timeout: Duration,
}

/// The JWKS defaults (the flags' own; a test checks they agree).
pub const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
pub const JWKS_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
pub const JWKS_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for KeyArgs {
    /// The flags' defaults: no key configured (so `<data>/jwt.secret`), no leeway.
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_public_key: None,
            jwt_alg: None,
            jwt_private_key: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::ZERO,
            jwks_url: None,
            jwks_refresh_interval: JWKS_REFRESH_INTERVAL,
            jwks_min_refresh_interval: JWKS_MIN_REFRESH_INTERVAL,
            jwks_timeout: JWKS_TIMEOUT,
        }
    }
}

/// A JWKS URL: `https://`, or `http://` to a loopback host (a key set fetched in clear
/// over a network could be swapped by anyone on the path, and with it every identity).
pub fn parse_jwks_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| format!("{s:?} is not a URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.rsplit_once('@') {
        Some((_, h)) => h,
        None => authority,
    };
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host.split(':').next().unwrap_or_default()
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Ok(s.to_owned()),
        "http" => {
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(s.to_owned())
            } else {
                Err(format!(
                    "{s:?}: a key set must be fetched over https (plain http only to a loopback address)"
                ))
            }
        }
        other => Err(format!("{s:?}: unsupported scheme {other:?}; use https")),
    }
}

impl fmt::Debug for KeyArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyArgs")
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_secret_file", &self.jwt_secret_file)
            .field("jwt_public_key", &self.jwt_public_key)
            .field("jwt_alg", &self.jwt_alg)
            .field("jwt_private_key", &self.jwt_private_key)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_leeway", &self.jwt_leeway)
            .field("jwks_url", &self.jwks_url)
            .field("jwks_refresh_interval", &self.jwks_refresh_interval)
            .field("jwks_min_refresh_interval", &self.jwks_min_refresh_interval)
            .field("jwks_timeout", &self.jwks_timeout)
            .finish()
    }
}

/// Limits that keep hostile or broken clients from exhausting the server
/// (`docs/operations.md`, "Hostile clients"): each a flag, a `THREADLINE_*` variable
/// and a default. Only `serve` reads them.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct LimitArgs {
    /// Open connections in all (HTTP and sockets). One more is answered 503 `overloaded`
    /// at once. Lowered at start, with a warning, to fit the open-file limit.
    #[arg(
        long,
        env = "THREADLINE_MAX_CONNECTIONS",
        default_value_t = 16_384,
        value_name = "N"
    )]
    pub max_connections: usize,

    /// A request head must be complete this long after the connection opened, or after
    /// its first byte on a kept-alive connection; otherwise the connection is dropped.
    /// A request body must be complete this long after the server began reading it
    /// (otherwise 408 `request_timeout`).
    #[arg(long, env = "THREADLINE_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_timeout, value_name = "DURATION")]
    pub header_timeout: Duration,

    /// A kept-alive connection with no request for this long is closed, and so is one on
    /// which no byte moves this long while a request is being read or answered.
    #[arg(long, env = "THREADLINE_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_timeout, value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// Open sockets allowed per user; one more is closed with 4029.
    #[arg(
        long,
        env = "THREADLINE_MAX_CONNECTIONS_PER_USER",
        default_value_t = 16,
        value_name = "N"
    )]
    pub max_connections_per_user: usize,

    /// Each write to a socket, and its close, must complete within this; a peer that
    /// does not read is dropped after it (and its per-user slot freed).
    #[arg(long, env = "THREADLINE_WS_SEND_TIMEOUT", default_value = "30s", value_parser = parse_timeout, value_name = "DURATION")]
    pub ws_send_timeout: Duration,

    /// A client message (at most 64 KiB) that has begun to arrive must be complete
    /// within this; otherwise the socket is closed with 1008.
    #[arg(long, env = "THREADLINE_WS_MESSAGE_TIMEOUT", default_value = "10s", value_parser = parse_timeout, value_name = "DURATION")]
    pub ws_message_timeout: Duration,

    /// Threads one user may own; one more is 409 `quota_exceeded`.
    #[arg(
        long,
        env = "THREADLINE_MAX_THREADS_PER_USER",
        default_value_t = 10_000,
        value_name = "N"
    )]
    pub max_threads_per_user: u64,

    /// Tool calls one run may have open (`tool_executing` without its `tool_completed`);
    /// one more is 409 `quota_exceeded`.
    #[arg(
        long,
        env = "THREADLINE_MAX_OPEN_TOOL_CALLS",
        default_value_t = 128,
        value_name = "N"
    )]
    pub max_open_tool_calls: usize,

    /// Longest `data.tool_call_id`, in bytes; a longer one is 413 `payload_too_large`.
    #[arg(
        long,
        env = "THREADLINE_MAX_TOOL_CALL_ID_BYTES",
        default_value_t = 128,
        value_name = "BYTES"
    )]
    pub max_tool_call_id_bytes: usize,

    /// Requests per second one user (a token of role `user`, by its `sub`) may make on
    /// average, sockets opened included; beyond it, 429 `rate_limited` with
    /// `Retry-After`. 0 turns it off.
    #[arg(
        long,
        env = "THREADLINE_RATE_LIMIT",
        default_value_t = 100,
        value_name = "PER_SECOND"
    )]
    pub rate_limit: u32,

    /// Requests one user may make at once before --rate-limit applies.
    #[arg(
        long,
        env = "THREADLINE_RATE_BURST",
        default_value_t = 200,
        value_name = "N"
    )]
    pub rate_burst: u32,

    /// Requests per second one agent or auditor (by its `sub`) may make on average,
    /// twice that at once; beyond it, 429 `rate_limited`. 0, the default, is no limit:
    /// these are the operator's own services.
    #[arg(
        long,
        env = "THREADLINE_AGENT_RATE_LIMIT",
        default_value_t = 0,
        value_name = "PER_SECOND"
    )]
    pub agent_rate_limit: u32,

    /// Streamed messages: a socket that asked for merged frames (`merge=1`) gets at most
    /// one page of frames per this window, one message's deltas merged into one frame.
    /// `0` turns the rollup off (every page is sent as soon as it is durable).
    #[arg(long, env = "THREADLINE_STREAM_ROLLUP", default_value = "40ms", value_parser = parse_window, value_name = "DURATION")]
    pub stream_rollup: Duration,

    /// Text bytes one streamed message may hold; more is 413 `payload_too_large`.
    #[arg(
        long,
        env = "THREADLINE_MAX_MESSAGE_BYTES",
        default_value_t = 1024 * 1024,
        value_name = "BYTES"
    )]
    pub max_message_bytes: u64,

    /// Text bytes all the messages of one run may hold; more is 413 `payload_too_large`.
    #[arg(
        long,
        env = "THREADLINE_MAX_RUN_MESSAGE_BYTES",
        default_value_t = 8 * 1024 * 1024,
        value_name = "BYTES"
    )]
    pub max_run_message_bytes: u64,

    /// Deltas one message may take per second; more is 429 `rate_limited`.
    #[arg(
        long,
        env = "THREADLINE_MAX_MESSAGE_DELTAS_PER_SEC",
        default_value_t = 200,
        value_name = "N"
    )]
    pub max_message_deltas_per_sec: u32,

    /// Deltas one run (all its messages) may take per second; more is 429 `rate_limited`.
    #[arg(
        long,
        env = "THREADLINE_MAX_RUN_DELTAS_PER_SEC",
        default_value_t = 500,
        value_name = "N"
    )]
    pub max_run_deltas_per_sec: u32,
    /// A user whose last socket closed counts as online this long after, so a device
    /// that reconnects within it does not flap the user's presence.
    #[arg(long, env = "THREADLINE_PRESENCE_GRACE", default_value = "5s", value_parser = parse_timeout, value_name = "DURATION")]
    pub presence_grace: Duration,
}

impl Default for LimitArgs {
    /// The flags' defaults (a test checks they agree).
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections_per_user: 16,
            ws_send_timeout: Duration::from_secs(30),
            ws_message_timeout: Duration::from_secs(10),
            max_threads_per_user: 10_000,
            max_open_tool_calls: 128,
            max_tool_call_id_bytes: 128,
            rate_limit: 100,
            rate_burst: 200,
            agent_rate_limit: 0,
            stream_rollup: Duration::from_millis(40),
            max_message_bytes: 1024 * 1024,
            max_run_message_bytes: 8 * 1024 * 1024,
            max_message_deltas_per_sec: 200,
            max_run_deltas_per_sec: 500,
            presence_grace: Duration::from_secs(5),
        }
    }
}

/// The nudge webhook (`docs/operations.md`, "Nudges"): off unless `--nudge-url` is set,
/// and then a secret is required. Only `serve` reads them.
// Debug is written by hand so the secret never reaches a log line.
#[derive(clap::Args, Clone, PartialEq, Eq)]
pub struct NudgeArgs {
    /// Where to POST a nudge (http:// only) when a run completes, errors or awaits input
    /// and no device of the owner acknowledged that event within --nudge-after. Unset:
    /// no webhook.
    #[arg(long, env = "THREADLINE_NUDGE_URL", value_name = "URL")]
    pub nudge_url: Option<String>,

    /// The signing secret: `whsec_<base64>` (Standard Webhooks) or any text of at least
    /// 24 bytes. Visible in `ps`: prefer --nudge-secret-file.
    #[arg(
        long,
        env = "THREADLINE_NUDGE_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        conflicts_with = "nudge_secret_file"
    )]
    pub nudge_secret: Option<String>,

    /// File holding the signing secret (surrounding whitespace ignored).
    #[arg(long, env = "THREADLINE_NUDGE_SECRET_FILE", value_name = "FILE")]
    pub nudge_secret_file: Option<PathBuf>,

    /// How long an event may go unacknowledged by every device of its owner before
    /// the owner is nudged.
    #[arg(long, env = "THREADLINE_NUDGE_AFTER", default_value = "30s", value_parser = parse_timeout, value_name = "DURATION")]
    pub nudge_after: Duration,

    /// Requests made for one nudge before it is recorded `nudge_failed`.
    #[arg(
        long,
        env = "THREADLINE_NUDGE_ATTEMPTS",
        default_value_t = 6,
        value_parser = clap::value_parser!(u32).range(1..=20),
        value_name = "N"
    )]
    pub nudge_attempts: u32,

    /// The wait after the first failed attempt; it doubles after each (at most 5 min).
    #[arg(long, env = "THREADLINE_NUDGE_BACKOFF", default_value = "1s", value_parser = parse_timeout, value_name = "DURATION")]
    pub nudge_backoff: Duration,
}

impl Default for NudgeArgs {
    /// The flags' defaults (a test checks they agree).
    fn default() -> Self {
        Self {
            nudge_url: None,
            nudge_secret: None,
            nudge_secret_file: None,
            nudge_after: Duration::from_secs(30),
            nudge_attempts: 6,
            nudge_backoff: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for NudgeArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NudgeArgs")
            .field("nudge_url", &self.nudge_url)
            .field(
                "nudge_secret",
                &self.nudge_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("nudge_secret_file", &self.nudge_secret_file)
            .field("nudge_after", &self.nudge_after)
            .field("nudge_attempts", &self.nudge_attempts)
            .field("nudge_backoff", &self.nudge_backoff)
            .finish()
    }
}

impl NudgeArgs {
    /// The webhook's configuration; `None` when no URL is set. A URL without a secret,
    /// or a secret without a URL, is refused.
    pub fn config(&self) -> Result<Option<crate::nudge::NudgeConfig>, ConfigError> {
        let secret = match (&self.nudge_secret, &self.nudge_secret_file) {
            (Some(_), Some(_)) => bail!("configure one of --nudge-secret and --nudge-secret-file"),
            (Some(s), None) => Some(s.clone()),
            (None, Some(path)) => {
                let text = fs::read_to_string(path).with_context(|| {
                    format!("cannot read --nudge-secret-file {}", path.display())
                })?;
                warn_if_readable_by_others(path);
                Some(text)
            }
            (None, None) => None,
        };
        match (&self.nudge_url, secret) {
            (None, None) => Ok(None),
            (None, Some(_)) => bail!("a nudge secret is set but no --nudge-url"),
            (Some(_), None) => bail!(
                "--nudge-url needs --nudge-secret or --nudge-secret-file: webhooks are always signed"
            ),
            (Some(url), Some(secret)) => crate::nudge::NudgeConfig::new(
                url,
                &secret,
                self.nudge_after,
                self.nudge_attempts,
                self.nudge_backoff,
            )
            .map(Some),
        }
    }
}

/// A humantime duration; `0` (off) allowed.
fn parse_window(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// A humantime duration of at least a millisecond.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(1) {
        return Err(format!("must be at least 1ms, got {s}"));
    }
    Ok(d)
}

impl KeyArgs {
    /// The configured HS256 secret: `--jwt-secret`, or the contents of `--jwt-secret-file`;
    /// `None` when neither is given. Refuses one shorter than [`MIN_SECRET_BYTES`].
    pub fn secret(&self) -> Result<Option<String>, ConfigError> {
        let (secret, origin) = match (&self.jwt_secret, &self.jwt_secret_file) {
            (Some(_), Some(_)) => bail!("configure one of --jwt-secret and --jwt-secret-file"),
            (Some(s), None) => (s.clone(), "--jwt-secret".to_owned()),
            (None, Some(path)) => {
                let text = fs::read_to_string(path)
                    .with_context(|| format!("cannot read --jwt-secret-file {}", path.display()))?;
                warn_if_readable_by_others(path);
                (
                    text.trim().to_owned(),
                    format!("--jwt-secret-file {}", path.display()),
                )
            }
            (None, None) => return Ok(None),
        };
        check_secret_len(&secret, &origin)?;
        Ok(Some(secret))
    }
}

/// Refuses an HS256 secret shorter than [`MIN_SECRET_BYTES`]: a short one can be
/// brute-forced offline from any token it signed.
pub fn check_secret_len(secret: &str, origin: &str) -> Result<(), ConfigError> {
    if secret.is_empty() {
        bail!("the HS256 secret from {origin} is empty");
    }
    if secret.len() < MIN_SECRET_BYTES {
        bail!(
            "the HS256 secret from {origin} must be at least {MIN_SECRET_BYTES} bytes (it is {}); \
             generate one with `openssl rand -hex 32`",
            secret.len()
        );
    }
    Ok(())
}

/// Parses a humantime duration (`5s`, `1m`) no longer than [`MAX_JWT_LEEWAY`].
pub fn parse_leeway(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > MAX_JWT_LEEWAY {
        return Err(format!("must be at most 60s, got {s}"));
    }
    Ok(d)
}

/// Creates `dir` (and its parents) private to this user, mode 0700, and takes group and
/// other bits off it and everything under it when it already exists, so the log and the
/// secret are not readable by other local users (files created later are private by
/// the binary's umask, 077).
pub fn create_private_dir(dir: &Path) -> Result<(), ConfigError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    #[cfg(unix)]
    tighten(dir).with_context(|| format!("making {} private", dir.display()))?;
    Ok(())
}

/// Clears group and other bits of `path` and, for a directory, of everything under it
/// (symlinks are not followed).
#[cfg(unix)]
fn tighten(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", mode & 0o777),
            "was accessible to other users; removing their access"
        );
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o700))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            tighten(&entry?.path())?;
        }
    }
    Ok(())
}

/// Where the generated HS256 secret lives.
pub fn secret_file(data_dir: &Path) -> PathBuf {
    data_dir.join(SECRET_FILE_NAME)
}

/// Reads `<data>/jwt.secret`, or creates the data dir and a fresh random secret (mode 0600).
/// Returns the secret and whether it was created by this call.
pub fn load_or_create_secret(data_dir: &Path) -> Result<(String, bool), ConfigError> {
    if let Some(secret) = load_secret(data_dir)? {
        return Ok((secret, false));
    }
    create_private_dir(data_dir)?;
    let path = secret_file(data_dir);
    let secret = random_hex(32);

    // Written completely under a private name, then hard-linked into place: linking fails if
    // the name exists, so a concurrent creator never reads a half-written secret, and the
    // file is 0600 from its first byte.
    let tmp = data_dir.join(format!(
        ".{SECRET_FILE_NAME}.{}.tmp",
        uuid::Uuid::new_v4().simple()
    ));
    let written = write_private(&tmp, secret.as_bytes());
    let linked = written.and_then(|()| fs::hard_link(&tmp, &path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(data_dir);
            Ok((secret, true))
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            // Lost a race with another process: use its secret.
            let secret = load_secret(data_dir)?
                .with_context(|| format!("{} vanished while being created", path.display()))?;
            Ok((secret, false))
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Reads `<data>/jwt.secret` if it exists; never creates the file or the dir.
pub fn load_secret(data_dir: &Path) -> Result<Option<String>, ConfigError> {
    let path = secret_file(data_dir);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let secret = text.trim();
    if secret.is_empty() {
        bail!(
            "{} is empty; delete it to generate a new secret",
            path.display()
        );
    }
    warn_if_readable_by_others(&path);
    check_secret_len(
        secret,
        &format!("{} (delete it to generate a new one)", path.display()),
    )?;
    Ok(Some(secret.to_owned()))
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    use std::fmt::Write as _;

    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    let mut hex = String::with_capacity(bytes * 2);
    for b in buf {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(())
}

/// Best effort: makes the new directory entry durable.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{mode:o}"),
                    "secret file is accessible to other users; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir().join(format!("threadline-cfg-{}", uuid::Uuid::new_v4()));
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        nudge: NudgeArgs,
    }

    #[test]
    fn nudge_defaults_are_the_flags_defaults_and_off() {
        let cli = Cli::try_parse_from(["t"]).unwrap();
        assert_eq!(cli.nudge, NudgeArgs::default());
        assert!(cli.nudge.config().unwrap().is_none());
        let url = ["t", "--nudge-url", "http://127.0.0.1:9/h"];
        let cli = Cli::try_parse_from(url).unwrap();
        assert!(cli.nudge.config().is_err(), "a URL without a secret");
        let secret = "0123456789abcdef0123456789abcdef";
        let cli = Cli::try_parse_from(["t", "--nudge-secret", secret]).unwrap();
        assert!(cli.nudge.config().is_err(), "a secret without a URL");
        let cli = Cli::try_parse_from(url.into_iter().chain([
            "--nudge-secret",
            secret,
            "--nudge-after",
            "1s",
        ]))
        .unwrap();
        let config = cli.nudge.config().unwrap().unwrap();
        assert_eq!(config.after, Duration::from_secs(1));
        assert!(!format!("{:?}", cli.nudge).contains(secret));
        assert!(Cli::try_parse_from(["t", "--nudge-attempts", "0"]).is_err());
    }

    #[test]
    fn limit_defaults_are_the_flags_defaults() {
        let cli = Cli::try_parse_from(["t"]).unwrap();
        assert_eq!(cli.limits, LimitArgs::default());
        let cli =
            Cli::try_parse_from(["t", "--header-timeout", "2s", "--rate-limit", "0"]).unwrap();
        assert_eq!(cli.limits.header_timeout, Duration::from_secs(2));
        assert_eq!(cli.limits.rate_limit, 0);
        assert!(Cli::try_parse_from(["t", "--idle-timeout", "0s"]).is_err());
    }

    #[test]
    fn secret_is_created_private_and_reused() {
        let tmp = TempDir::new();
        let dir = tmp.0.join("nested").join("data");

        let (first, created) = load_or_create_secret(&dir).unwrap();
        assert!(created);
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(secret_file(&dir))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let (second, created) = load_or_create_secret(&dir).unwrap();
        assert!(!created);
        assert_eq!(first, second);
        assert_eq!(load_secret(&dir).unwrap().as_deref(), Some(first.as_str()));
        // No temp files left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn an_existing_data_dir_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = TempDir::new();
        let dir = tmp.0.join("data");
        fs::create_dir_all(dir.join("log")).unwrap();
        fs::write(dir.join("log").join("db"), "x").unwrap();
        for (p, mode) in [(dir.clone(), 0o755), (dir.join("log"), 0o755)] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::set_permissions(
            dir.join("log").join("db"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        create_private_dir(&dir).unwrap();
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.clone()), 0o700);
        assert_eq!(mode(dir.join("log")), 0o700);
        assert_eq!(mode(dir.join("log").join("db")), 0o600);
        let fresh = tmp.0.join("a").join("b");
        create_private_dir(&fresh).unwrap();
        assert_eq!(mode(fresh), 0o700);
    }

    #[test]
    fn two_data_dirs_get_different_secrets() {
        let a = TempDir::new();
        let b = TempDir::new();
        assert_ne!(
            load_or_create_secret(&a.0).unwrap().0,
            load_or_create_secret(&b.0).unwrap().0
        );
    }

    #[test]
    fn load_secret_never_creates() {
        let tmp = TempDir::new();
        let dir = tmp.0.join("absent");
        assert_eq!(load_secret(&dir).unwrap(), None);
        assert!(!dir.exists());
        assert_eq!(load_secret(&tmp.0).unwrap(), None);
        assert!(!secret_file(&tmp.0).exists());
    }

    #[test]
    fn empty_secret_file_is_an_error() {
        let tmp = TempDir::new();
        fs::write(secret_file(&tmp.0), "\n").unwrap();
        assert!(load_secret(&tmp.0).is_err());
    }

    #[test]
    fn args_parse_with_defaults() {
        let cli = Cli::try_parse_from(["t"]).unwrap();
        assert_eq!(cli.data.data, PathBuf::from("./data"));
        assert_eq!(cli.keys.jwt_leeway, Duration::ZERO);
        assert!(cli.keys.jwt_secret.is_none());

        let cli = Cli::try_parse_from([
            "t",
            "--jwt-public-key",
            "k.pem",
            "--jwt-alg",
            "es256",
            "--jwt-leeway",
            "5s",
        ])
        .unwrap();
        assert_eq!(cli.keys.jwt_alg, Some(JwtAlg::Es256));
        assert_eq!(cli.keys.jwt_leeway, Duration::from_secs(5));
    }

    #[test]
    fn args_reject_bad_combinations() {
        assert!(Cli::try_parse_from(["t", "--jwt-leeway", "61s"]).is_err());
        assert!(Cli::try_parse_from(["t", "--jwt-alg", "HS256"]).is_err());
        assert!(
            Cli::try_parse_from(["t", "--jwt-secret", "s", "--jwt-public-key", "k.pem"]).is_err()
        );
    }

    #[test]
    fn jwks_defaults_are_the_flags_defaults_and_urls_are_checked() {
        let cli = Cli::try_parse_from(["t"]).unwrap();
        let d = KeyArgs::default();
        assert_eq!(cli.keys.jwks_refresh_interval, d.jwks_refresh_interval);
        assert_eq!(
            cli.keys.jwks_min_refresh_interval,
            d.jwks_min_refresh_interval
        );
        assert_eq!(cli.keys.jwks_timeout, d.jwks_timeout);
        assert_eq!(cli.keys.jwt_leeway, d.jwt_leeway);
        let cli = Cli::try_parse_from([
            "t",
            "--jwks-url",
            "https://idp.example/.well-known/jwks.json",
            "--jwks-refresh-interval",
            "1m",
        ])
        .unwrap();
        assert_eq!(
            cli.keys.jwks_url.as_deref(),
            Some("https://idp.example/.well-known/jwks.json")
        );
        assert_eq!(cli.keys.jwks_refresh_interval, Duration::from_secs(60));
        for ok in [
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9/x",
            "HTTPS://a.example",
        ] {
            assert!(parse_jwks_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example/jwks",
            "http://127.0.0.1.evil.example/",
            "http://user@10.0.0.1/",
            "ftp://127.0.0.1/",
            "idp.example",
            "https:///jwks",
        ] {
            assert!(parse_jwks_url(bad).is_err(), "{bad}");
        }
        // One key source at a time.
        assert!(
            Cli::try_parse_from(["t", "--jwks-url", "https://a", "--jwt-secret", "s"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["t", "--jwks-url", "https://a", "--jwt-public-key", "k.pem"])
                .is_err()
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let keys = KeyArgs {
            jwt_secret: Some("hunter2-very-secret".into()),
            ..KeyArgs::default()
        };
        let shown = format!("{keys:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
