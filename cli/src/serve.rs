//! `threadline serve`: the one place the server is wired. Opens the log (the
//! data dir's sled log, or a JetStream stream with `--log nats://…`) and the
//! projections, then hands them to `threadline_api::serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use threadline_api::auth::jwks::JwksFetch;
use threadline_api::auth::Authenticator;
use threadline_api::config::{create_private_dir, DataArgs, KeyArgs, LimitArgs, NudgeArgs};
use threadline_api::{serve, shutdown_signal, AppState};
use threadline_engine::Limits;
use threadline_projections::Projector;
use threadline_storage::{SledLog, SledOptions};
use tokio::net::TcpListener;

use crate::config_file::Effective;
use crate::log_args::LogArgs;
use crate::tools::{explain_open_error, log_dir};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML file of serve options: each key a long option (`max-connections` or
    /// `max_connections`), e.g. `listen = "0.0.0.0:7070"`. A flag or an environment
    /// variable overrides the file; the file overrides the defaults. An unknown key or a
    /// bad value is an error naming its line.
    #[arg(long, env = "THREADLINE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted), each value with where it
    /// came from (flag, env, file or default), and exit without serving.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Address to listen on.
    #[arg(
        long,
        env = "THREADLINE_LISTEN",
        default_value = "127.0.0.1:7070",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// A run idle this long is expired (e.g. `24h`, `30m`, `2s`).
    #[arg(long, env = "THREADLINE_RUN_TTL", default_value = "24h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    run_ttl: Duration,
    /// Log lines as human-readable text, or as one JSON object per line (timestamp,
    /// level, target, message, span fields with the request id).
    #[arg(
        long,
        env = "THREADLINE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    nudge: NudgeArgs,
}

/// How log lines are written to stderr.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Opens everything and serves until ctrl-c or SIGTERM (or, with `--print-config`,
/// prints the effective configuration and returns).
pub async fn run(args: ServeArgs, effective: Option<Effective>) -> anyhow::Result<()> {
    if args.print_config {
        print!("{}", effective.unwrap_or_default().render());
        return Ok(());
    }
    threadline_api::metrics::install();
    // Before anything slow: SIGHUP's default action would end the process.
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let data: PathBuf = args.data.data.clone();
    create_private_dir(&data)?;
    let auth = match &args.keys.jwks_url {
        Some(url) => {
            let fetcher = HttpJwks::new(url, args.keys.jwks_timeout)?;
            Authenticator::with_jwks(&args.keys, Arc::new(fetcher)).await?
        }
        None => Authenticator::from_config(&args.keys, &data, true)?,
    };
    let nudge = args.nudge.config()?;
    tracing::info!(keys = %auth.describe(), "verifying tokens");
    #[cfg(unix)]
    tokio::spawn(reload_on_hangup(hangups, auth.clone()));
    match args.log.nats(&data, true, true)? {
        None => {
            let dir = log_dir(&data);
            let log =
                tokio::task::spawn_blocking(move || SledLog::open(&dir, SledOptions::default()))
                    .await?
                    .map_err(|e| explain_open_error(&data, e, ""))?;
            serve_on(log, auth, nudge, data, args).await
        }
        Some(options) => {
            let k = &args.keys;
            if k.jwks_url.is_none()
                && k.jwt_secret.is_none()
                && k.jwt_secret_file.is_none()
                && k.jwt_public_key.is_none()
            {
                tracing::warn!(
                    data = %data.display(),
                    "no token key given: this gateway verifies tokens with the jwt.secret of its own data dir; \
                     unless every gateway's holds the same one, tokens minted for the others get 401 here. \
                     Give every gateway the same key (--jwt-secret-file), see docs/scaling.md"
                );
            }
            let log =
                tokio::task::spawn_blocking(move || crate::log_args::connect(options)).await??;
            tracing::info!(log = %log.description(), "serving the JetStream log");
            serve_on(log, auth, nudge, data, args).await
        }
    }
}

async fn serve_on<L: threadline_api::Log>(
    log: L,
    auth: Authenticator,
    nudge: Option<threadline_api::nudge::NudgeConfig>,
    data: PathBuf,
    args: ServeArgs,
) -> anyhow::Result<()> {
    let projector =
        Arc::new(tokio::task::spawn_blocking(move || Projector::open(Arc::new(log))).await??);
    // Process-wide, so the binary's to set: each socket is a descriptor.
    if let Some(limit) = threadline_api::raise_nofile_limit() {
        tracing::info!(
            open_file_limit = limit,
            "raised the open-file limit to the hard limit"
        );
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data = %data.display(), "threadline listening");
    // For a person at a terminal; with JSON logs stderr holds JSON lines only (the
    // line above has the address).
    if args.log_format == LogFormat::Text {
        eprintln!(
            "threadline listening on http://{addr} (data in {})",
            data.display()
        );
        eprintln!("{}", token_hint(&args.keys, &data));
    }
    let limits = Limits {
        run_ttl_ms: u64::try_from(args.run_ttl.as_millis()).unwrap_or(u64::MAX),
        max_threads_per_user: args.limits.max_threads_per_user,
        max_open_tool_calls: args.limits.max_open_tool_calls,
        max_tool_call_id_bytes: args.limits.max_tool_call_id_bytes,
        max_message_bytes: args.limits.max_message_bytes,
        max_run_message_bytes: args.limits.max_run_message_bytes,
        max_message_deltas_per_sec: args.limits.max_message_deltas_per_sec,
        max_run_deltas_per_sec: args.limits.max_run_deltas_per_sec,
        ..Limits::default()
    };
    let mut state = AppState::new(projector, auth, limits, args.limits);
    if let Some(nudge) = nudge {
        tracing::info!(url = nudge.url(), "nudge webhook configured");
        state = state.with_nudges(nudge);
    }
    serve(listener, state, shutdown_signal()).await?;
    Ok(())
}

/// SIGHUP: reads the key configuration again (the key file or secret, or the key set from
/// its URL) without a restart; open sockets stay open unless their token's key is gone.
#[cfg(unix)]
async fn reload_on_hangup(mut hangups: tokio::signal::unix::Signal, auth: Authenticator) {
    while hangups.recv().await.is_some() {
        match auth.reload().await {
            Ok(keys) => tracing::info!(keys = %keys, "SIGHUP: key configuration reloaded"),
            Err(e) => tracing::error!(
                error = %format!("{:#}", anyhow::Error::new(e)),
                "SIGHUP: reloading the key configuration failed; the keys in force stay"
            ),
        }
    }
}

/// The key set fetched over HTTPS (rustls, the system's trusted roots; `SSL_CERT_FILE`
/// adds a private CA) or plain HTTP to loopback, on the runtime, never blocking it.
#[derive(Debug)]
struct HttpJwks {
    url: String,
    client: reqwest::Client,
}

/// Largest key set read; real ones are a few KiB.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

impl HttpJwks {
    fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let https = url.to_ascii_lowercase().starts_with("https://");
        let client = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .https_only(https)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("threadline/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client for --jwks-url")?;
        Ok(Self {
            url: url.to_owned(),
            client,
        })
    }

    async fn get(&self) -> Result<Vec<u8>, String> {
        let mut response = self
            .client
            .get(&self.url)
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/jwk-set+json",
            )
            .send()
            .await
            .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the provider answered {status}"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading the answer: {:#}", anyhow::Error::from(e)))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the answer is over {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

impl JwksFetch for HttpJwks {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(self.get())
    }
}

/// How to mint a token this server accepts, with the key it was given.
fn token_hint(keys: &KeyArgs, data: &std::path::Path) -> String {
    let bin = std::env::args()
        .next()
        .unwrap_or_else(|| "threadline".into());
    if keys.jwks_url.is_some() {
        "tokens come from the identity provider behind --jwks-url".into()
    } else if let Some(file) = &keys.jwt_secret_file {
        format!(
            "mint a token: {bin} token --jwt-secret-file {} --sub alice",
            file.display()
        )
    } else if keys.jwt_secret.is_some() {
        format!("mint a token: {bin} token --jwt-secret <the same secret> --sub alice")
    } else if let Some(public) = &keys.jwt_public_key {
        format!(
            "mint a token: {bin} token --jwt-public-key {} --jwt-alg <alg> --jwt-private-key <its private key> --sub alice",
            public.display()
        )
    } else {
        format!(
            "mint a token: {bin} token --data {} --sub alice",
            data.display()
        )
    }
}
