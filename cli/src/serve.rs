//! `threadline serve`: the one place the server is wired over sled. Opens the
//! data dir's log and projections, then hands them to `threadline_api::serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use threadline_api::auth::Authenticator;
use threadline_api::config::{create_private_dir, DataArgs, KeyArgs, LimitArgs, NudgeArgs};
use threadline_api::{serve, shutdown_signal, AppState};
use threadline_engine::Limits;
use threadline_projections::Projector;
use threadline_storage::{SledLog, SledOptions};
use tokio::net::TcpListener;

use crate::tools::{explain_open_error, log_dir};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    keys: KeyArgs,
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
    #[command(flatten)]
    nudge: NudgeArgs,
}

/// Opens everything and serves until ctrl-c or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    threadline_api::metrics::install();
    let data: PathBuf = args.data.data;
    create_private_dir(&data)?;
    let auth = Authenticator::from_config(&args.keys, &data, true)?;
    let nudge = args.nudge.config()?;
    tracing::info!(key = %auth.source(), "verifying tokens with {:?}", auth.algorithm());
    let dir = log_dir(&data);
    let log = tokio::task::spawn_blocking(move || SledLog::open(&dir, SledOptions::default()))
        .await?
        .map_err(|e| explain_open_error(&data, e, ""))?;
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
    let mut state = AppState::new(projector, auth, limits, args.limits);
    if let Some(nudge) = nudge {
        tracing::info!(url = nudge.url(), "nudge webhook configured");
        state = state.with_nudges(nudge);
    }
    serve(listener, state, shutdown_signal()).await?;
    Ok(())
}
