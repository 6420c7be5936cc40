//! Serving: `serve(listener, state, shutdown)` runs the router over any log
//! until `shutdown` resolves, then closes sockets with 1001, finishes
//! in-flight appends, checkpoints, and flushes the log last.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use threadline_projections::{CheckpointPolicy, ProjectionError};
use threadline_storage::StorageError;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::{AppState, Log};
use crate::conn::ConnLimits;

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving connections failed")]
    Io(#[from] std::io::Error),
    #[error("the projections failed")]
    Projection(#[from] ProjectionError),
    #[error("closing the event log failed")]
    Storage(#[from] StorageError),
    #[error("a shutdown task panicked")]
    Join(#[from] tokio::task::JoinError),
}

/// Serves `state` on `listener` until `shutdown` resolves, then shuts down in order.
pub async fn serve<L: Log>(
    listener: TcpListener,
    state: AppState<L>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let edge = state.edge().clone();
    let conn_limits = ConnLimits {
        max_connections: edge.max_connections,
        header_timeout: edge.header_timeout,
        idle_timeout: edge.idle_timeout,
        message_timeout: edge.ws_message_timeout,
    };
    let projector = Arc::clone(state.projector());
    let fold = projector.follow(CheckpointPolicy::default())?;
    let sweeper = tokio::spawn(sweep(state.clone(), state.shutdown_signal()));
    let nudger = state.nudges().cloned().map(|config| {
        tokio::spawn(crate::nudge::run(
            state.clone(),
            config,
            state.shutdown_signal(),
        ))
    });
    let app = crate::http::router(state.clone());
    let stopping = state.clone();
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: closing sockets, finishing in-flight requests");
        stopping.begin_shutdown();
    };
    crate::conn::serve(listener, app, conn_limits, stop).await?;
    // Sockets close themselves with 1001 on the signal; give them a moment to say so.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !state
        .connections()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_empty()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = sweeper.await;
    // Before the fold stops: a delivery recording its outcome waits on the fold.
    if let Some(nudger) = nudger {
        let _ = nudger.await;
    }
    tokio::task::spawn_blocking(move || -> Result<(), ServeError> {
        fold.stop();
        projector.catch_up()?;
        projector.checkpoint()?;
        projector.log().close()?;
        Ok(())
    })
    .await??;
    tracing::info!("log flushed and closed");
    Ok(())
}

/// Expires idle runs by appending `run_expired`, a few times per TTL.
async fn sweep<L: Log>(state: AppState<L>, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_millis((state.limits().run_ttl_ms / 4).clamp(100, 30_000));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        state.rate().forget_idle();
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
