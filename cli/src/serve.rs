//! `threadline serve`: the one place the server is wired. Opens the log (the
//! data dir's sled log, or a JetStream stream with `--log nats://…`) and the
//! projections, then hands them to `threadline_api::serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use threadline_api::auth::Authenticator;
use threadline_api::config::{create_private_dir, DataArgs, KeyArgs, LimitArgs};
use threadline_api::{serve, shutdown_signal, AppState};
use threadline_engine::Limits;
use threadline_projections::Projector;
use threadline_storage::{SledLog, SledOptions};
use tokio::net::TcpListener;

use crate::log_args::LogArgs;
use crate::tools::{explain_open_error, log_dir};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
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
    #[command(flatten)]
    limits: LimitArgs,
}

/// Opens everything and serves until ctrl-c or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    threadline_api::metrics::install();
    let data: PathBuf = args.data.data.clone();
    create_private_dir(&data)?;
    let auth = Authenticator::from_config(&args.keys, &data, true)?;
    tracing::info!(key = %auth.source(), "verifying tokens with {:?}", auth.algorithm());
    match args.log.nats(&data, true)? {
        None => {
            let dir = log_dir(&data);
            let log =
                tokio::task::spawn_blocking(move || SledLog::open(&dir, SledOptions::default()))
                    .await?
                    .map_err(|e| explain_open_error(&data, e, ""))?;
            serve_on(log, auth, data, args).await
        }
        Some(options) => {
            let log =
                tokio::task::spawn_blocking(move || crate::log_args::connect(options)).await??;
            tracing::info!(log = %log.description(), "serving the JetStream log");
            serve_on(log, auth, data, args).await
        }
    }
}

async fn serve_on<L: threadline_api::Log>(
    log: L,
    auth: Authenticator,
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
    eprintln!(
        "threadline listening on http://{addr} (data in {})",
        data.display()
    );
    eprintln!(
        "mint a token: {} token --data {} --sub alice",
        std::env::args()
            .next()
            .unwrap_or_else(|| "threadline".into()),
        data.display()
    );
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
    let state = AppState::new(projector, auth, limits, args.limits);
    serve(listener, state, shutdown_signal()).await?;
    Ok(())
}
