//! Server lifecycle: open the log and projections, serve until shutdown, then
//! close sockets with 1001, finish in-flight appends and flush the log last.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use threadline_engine::Limits;
use threadline_projections::Projector;
use threadline_storage::{EventLog, SledLog, SledOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::app::AppState;
use crate::auth::Authenticator;
use crate::config::{KeyArgs, LimitArgs};
use crate::conn::ConnLimits;
use crate::rate::RateLimits;

/// Checkpoint the projections after this many new events (and at most every few seconds).
const CHECKPOINT_EVENTS: u64 = 10_000;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// Everything `serve` needs, parsed by the binary.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub keys: KeyArgs,
    pub run_ttl: Duration,
    pub limits: LimitArgs,
}

/// Where the event log of a data directory lives.
pub fn log_dir(data: &std::path::Path) -> PathBuf {
    data.join("log")
}

/// Opens everything and serves until ctrl-c or SIGTERM.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    crate::metrics::install();
    crate::config::create_private_dir(&config.data)?;
    let auth = Authenticator::from_config(&config.keys, &config.data, true)?;
    tracing::info!(key = %auth.source(), "verifying tokens with {:?}", auth.algorithm());
    let dir = log_dir(&config.data);
    let log = tokio::task::spawn_blocking(move || SledLog::open(&dir, SledOptions::default()))
        .await?
        .map_err(|e| crate::tools::explain_open_error(&config.data, e, ""))?;
    let projector =
        Arc::new(tokio::task::spawn_blocking(move || Projector::open(Arc::new(log))).await??);
    if let Some(limit) = crate::conn::raise_nofile_limit() {
        tracing::info!(
            open_file_limit = limit,
            "raised the open-file limit to the hard limit"
        );
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data = %config.data.display(), "threadline listening");
    eprintln!(
        "threadline listening on http://{addr} (data in {})",
        config.data.display()
    );
    eprintln!(
        "mint a token: {} token --data {} --sub alice",
        std::env::args()
            .next()
            .unwrap_or_else(|| "threadline".into()),
        config.data.display()
    );
    let limits = Limits {
        run_ttl_ms: u64::try_from(config.run_ttl.as_millis()).unwrap_or(u64::MAX),
        max_threads_per_user: config.limits.max_threads_per_user,
        max_open_tool_calls: config.limits.max_open_tool_calls,
        max_tool_call_id_bytes: config.limits.max_tool_call_id_bytes,
        ..Limits::default()
    };
    serve(
        listener,
        projector,
        auth,
        limits,
        config.limits,
        shutdown_signal(),
    )
    .await
}

/// Serves on `listener` until `shutdown` resolves, then shuts down in order.
pub async fn serve(
    listener: TcpListener,
    projector: Arc<Projector<SledLog>>,
    auth: Authenticator,
    limits: Limits,
    edge: LimitArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = AppState {
        projector: projector.clone(),
        auth,
        limits,
        rate: RateLimits::new(edge.rate_limit, edge.rate_burst, edge.agent_rate_limit),
        edge: Arc::new(edge.clone()),
        connections: Default::default(),
        shutdown: stop_rx.clone(),
    };
    let conn_limits = ConnLimits {
        max_connections: edge.max_connections,
        header_timeout: edge.header_timeout,
        idle_timeout: edge.idle_timeout,
        message_timeout: edge.ws_message_timeout,
    };
    let follower = tokio::spawn(follow(projector.clone(), stop_rx.clone()));
    let sweeper = tokio::spawn(sweep(state.clone(), stop_rx.clone()));
    let app = crate::http::router(state.clone());
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: closing sockets, finishing in-flight requests");
        let _ = stop_tx.send(true);
    };
    crate::conn::serve(listener, app, conn_limits, stop).await?;
    // Sockets close themselves with 1001 on the signal; give them a moment to say so.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !state
        .connections
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_empty()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = tokio::join!(follower, sweeper);
    let projector2 = projector.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        projector2.catch_up()?;
        projector2.checkpoint()?;
        projector2.log().close()?;
        Ok(())
    })
    .await??;
    tracing::info!("log flushed and closed");
    Ok(())
}

/// Keeps the projections caught up with the log and checkpointed.
async fn follow(projector: Arc<Projector<SledLog>>, mut stop: watch::Receiver<bool>) {
    let mut head = projector.log().watch_head();
    loop {
        let p = projector.clone();
        let result = tokio::task::spawn_blocking(move || {
            p.catch_up()?;
            p.maybe_checkpoint(CHECKPOINT_EVENTS, CHECKPOINT_INTERVAL)
        })
        .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "projection catch-up failed"),
            Err(e) => tracing::error!(error = %e, "projection task panicked"),
        }
        metrics::gauge!("threadline_log_head").set(projector.log().head().0 as f64);
        metrics::gauge!("threadline_projected_position").set(projector.position().0 as f64);
        tokio::select! {
            changed = head.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// Expires idle runs by appending `run_expired`, a few times per TTL.
async fn sweep(state: AppState, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_millis((state.limits.run_ttl_ms / 4).clamp(100, 30_000));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        state.rate.forget_idle();
        match state.expire_idle_runs().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "expired idle runs"),
            Err(e) => tracing::warn!(error = %e, "expiring idle runs failed"),
        }
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// A span per request with method and path; never the query string, which
/// may carry `access_token`.
pub async fn trace(req: Request, next: Next) -> Response {
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
