//! The connection layer under the router: accepts TCP connections up to a global
//! cap (one more is answered `503 overloaded` and closed, rather than running the
//! process out of file descriptors), serves each with hyper's HTTP/1 (with
//! upgrades, for sockets), and bounds how long a connection may hold its
//! descriptor without making progress, in [`Guarded`], the I/O wrapper of every
//! connection:
//!
//! - a request head must be complete within the header deadline, counted from the
//!   connection's start (silent connections included) or from the first byte of a
//!   later head on a kept-alive connection;
//! - a kept-alive connection may sit idle between requests for the idle deadline,
//!   and no connection may go that long without a byte moving while a request is
//!   read or answered (a stalled body, a client that does not read its answer);
//! - after an upgrade the HTTP deadlines stop (an idle socket is normal) and a
//!   client message that has begun to arrive must be complete within the message
//!   deadline.
//!
//! Why not hyper's own `header_read_timeout`: it runs whenever hyper waits for a
//! head, so it would also cut idle kept-alive connections at the header deadline.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::error::AppError;

/// Connections answered `503 overloaded` at the same time; beyond these, an
/// over-the-cap connection is closed at once without an answer.
const OVERLOAD_RESPONDERS: usize = 64;

/// Descriptors kept out of the connection cap: the log's files, the listener,
/// the runtime's own, and the overload responders.
const RESERVED_FDS: u64 = 64 + OVERLOAD_RESPONDERS as u64;

/// The connection-level limits (`LimitArgs`, `docs/operations.md`).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub message_timeout: Duration,
}

/// What the requests and the socket of one connection tell its [`Guarded`] I/O.
/// Handed to handlers as a request extension.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Request heads hyper has parsed and dispatched.
    requests: AtomicU64,
    /// Requests whose handler has not returned yet.
    in_flight: AtomicUsize,
    /// Set when the connection became a socket.
    upgraded: AtomicBool,
    /// Complete messages the socket received.
    messages: AtomicU64,
    /// The socket sent its close: on drop, half-close and read off what the peer
    /// still sends for a moment, so the close is not lost to a reset.
    linger: AtomicBool,
}

/// The [`ConnState`] of the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<ConnState>);

impl ConnHandle {
    /// The connection is now a socket: the HTTP deadlines end, the message deadline begins.
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Relaxed);
    }

    /// The socket received one complete message.
    pub fn message_received(&self) {
        self.0.messages.fetch_add(1, Ordering::Relaxed);
    }

    /// The socket delivered its close frame. Closing the connection with bytes of the
    /// peer still unread (say, the rest of an oversized message) would send a reset,
    /// which may discard the close frame before the peer reads it; so the connection
    /// is half-closed and drained for up to [`LINGER`] instead of dropped.
    pub fn linger(&self) {
        self.0.linger.store(true, Ordering::Relaxed);
    }
}

/// How long a closed socket's connection is drained before it is dropped.
const LINGER: Duration = Duration::from_secs(1);

/// Half-closes `io` and reads off what the peer sends until it closes, for at most
/// [`LINGER`] and 1 MiB; the connection keeps its place under the cap meanwhile.
async fn drain(mut io: TcpStream, permit: OwnedSemaphorePermit) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = io.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut left = 1usize << 20;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    drop(permit);
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: &Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `t + d`, or a far future when that does not fit (a deadline set to years).
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(30 * 365 * 86_400))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force.
pub fn raise_nofile_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let limit = getrlimit(Resource::Nofile);
        if limit.current != limit.maximum {
            let raised = Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::warn!(error = %e, "could not raise the open-file limit");
            }
        }
        getrlimit(Resource::Nofile).current
    }
    #[cfg(not(unix))]
    None
}

/// The connection cap, lowered to fit the open-file limit.
fn effective_cap(configured: usize) -> usize {
    #[cfg(unix)]
    {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        if let Some(soft) = soft {
            let room = usize::try_from(soft.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
            if room < configured {
                tracing::warn!(
                    configured,
                    open_file_limit = soft,
                    using = room.max(1),
                    "--max-connections does not fit the open-file limit; lowering it"
                );
                return room.max(1);
            }
        }
    }
    configured
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets
/// each connection finish its request and waits for them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let cap = effective_cap(limits.max_connections);
    let permits = Arc::new(Semaphore::new(cap));
    let responders = Arc::new(Semaphore::new(OVERLOAD_RESPONDERS));
    let limits = Arc::new(limits);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a sender; `recv` returns None once all are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<Infallible>(1);
    tracing::info!(max_connections = cap, "accepting connections");
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let io = Guarded::new(stream, limits.clone(), permit);
                tokio::spawn(connection(
                    io,
                    router.clone(),
                    stop_rx.clone(),
                    done_tx.clone(),
                ));
            }
            Err(_) => refuse(stream, &responders, limits.header_timeout),
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_tx);
    let _ = done_rx.recv().await;
    Ok(())
}

async fn accept_error(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    // Out of descriptors despite the cap (another part of the process holds many):
    // back off instead of spinning.
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serves one connection until it ends, or until shutdown lets its request finish.
async fn connection(
    io: Guarded,
    router: Router,
    mut stop: watch::Receiver<bool>,
    _done: mpsc::Sender<Infallible>,
) {
    let state = io.state.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let in_flight = InFlight::start(&state);
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnHandle(state.clone()));
        let response = tower::ServiceExt::oneshot(router.clone(), req);
        async move {
            let response = response.await;
            drop(in_flight);
            response
        }
    });
    let conn = http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended");
            }
            return;
        }
        _ = stop.wait_for(|stop| *stop) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Answers an over-the-cap connection `503 overloaded` and closes it, using one of a
/// few responders; with none free, closes it at once.
fn refuse(stream: TcpStream, responders: &Arc<Semaphore>, header_timeout: Duration) {
    metrics::counter!("threadline_connections_refused_total").increment(1);
    let Ok(responder) = responders.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let service = hyper::service::service_fn(|_: Request<Incoming>| async {
            Ok::<_, Infallible>(AppError::Overloaded.into_response())
        });
        let conn = http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), service);
        let _ = tokio::time::timeout(header_timeout.min(Duration::from_secs(5)), conn).await;
        drop(responder);
    });
}

/// A connection's I/O with its deadlines and its place under the connection cap.
pub struct Guarded {
    /// Taken only on drop, to linger.
    io: Option<TcpStream>,
    state: Arc<ConnState>,
    limits: Arc<ConnLimits>,
    accepted: Instant,
    /// When a byte last moved either way.
    last_io: Instant,
    /// The first byte of a request head not yet dispatched, with the request count then.
    head_since: Option<(Instant, u64)>,
    /// On a socket: the first byte of a message not yet complete, with the message count then.
    message_since: Option<(Instant, u64)>,
    timer: Pin<Box<Sleep>>,
    /// The deadline `timer` is set to.
    armed: Instant,
    permit: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Which deadline is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    Header,
    Idle,
    Message,
}

impl Deadline {
    fn error(self) -> io::Error {
        let what = match self {
            Deadline::Header => "request head not complete within the header deadline",
            Deadline::Idle => "connection idle beyond the idle deadline",
            Deadline::Message => "socket message not complete within the message deadline",
        };
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

impl Guarded {
    fn new(io: TcpStream, limits: Arc<ConnLimits>, permit: OwnedSemaphorePermit) -> Guarded {
        let now = Instant::now();
        let armed = after(now, limits.header_timeout);
        metrics::gauge!("threadline_connections").increment(1.0);
        Guarded {
            io: Some(io),
            state: Arc::default(),
            accepted: now,
            last_io: now,
            head_since: None,
            message_since: None,
            timer: Box::pin(tokio::time::sleep_until(armed)),
            armed,
            limits,
            permit: Some(permit),
        }
    }

    /// The deadline in force now, if any.
    fn deadline(&mut self) -> Option<(Instant, Deadline)> {
        let s = &self.state;
        if s.upgraded.load(Ordering::Relaxed) {
            let messages = s.messages.load(Ordering::Relaxed);
            if self.message_since.is_some_and(|(_, seen)| seen != messages) {
                self.message_since = None;
            }
            return self
                .message_since
                .map(|(t, _)| (after(t, self.limits.message_timeout), Deadline::Message));
        }
        let requests = s.requests.load(Ordering::Relaxed);
        if self.head_since.is_some_and(|(_, seen)| seen != requests) {
            self.head_since = None;
        }
        Some(match (requests, self.head_since) {
            (0, _) => (
                after(self.accepted, self.limits.header_timeout),
                Deadline::Header,
            ),
            (_, Some((t, _))) => (after(t, self.limits.header_timeout), Deadline::Header),
            _ => (
                after(self.last_io, self.limits.idle_timeout),
                Deadline::Idle,
            ),
        })
    }

    /// Bytes arrived.
    fn on_read(&mut self, now: Instant) {
        self.last_io = now;
        let s = &self.state;
        if s.upgraded.load(Ordering::Relaxed) {
            if self.message_since.is_none() {
                self.message_since = Some((now, s.messages.load(Ordering::Relaxed)));
            }
        } else if self.head_since.is_none() && s.in_flight.load(Ordering::Relaxed) == 0 {
            self.head_since = Some((now, s.requests.load(Ordering::Relaxed)));
        }
    }

    /// With the I/O blocked, checks the running deadline and makes sure the task is
    /// woken when it passes. The timer is only moved earlier here; a timer that fires
    /// early is re-armed for the later deadline (at most once per deadline period).
    fn check(&mut self, cx: &mut Context<'_>, reading: bool) -> io::Result<()> {
        let Some((deadline, kind)) = self.deadline() else {
            return Ok(());
        };
        // A socket's message deadline is only judged when reading finds nothing
        // more: while the server is busy writing, the rest may sit unread.
        if kind == Deadline::Message && !reading {
            return Ok(());
        }
        if deadline < self.armed {
            self.armed = deadline;
            self.timer.as_mut().reset(deadline);
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                tracing::debug!(?kind, "dropping a connection past its deadline");
                return Err(kind.error());
            }
            self.armed = deadline;
            self.timer.as_mut().reset(deadline);
        }
        Ok(())
    }
}

impl Guarded {
    fn io(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.io.as_mut().expect("taken only on drop"))
    }

    /// What every write answers: progress moves the idle clock; a write that
    /// cannot proceed is held to the connection's deadline.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.last_io = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.check(cx, false) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        metrics::gauge!("threadline_connections").decrement(1.0);
        if !self.state.linger.load(Ordering::Relaxed) {
            return;
        }
        if let (Some(io), Some(permit), Ok(runtime)) = (
            self.io.take(),
            self.permit.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            runtime.spawn(drain(io, permit));
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match self.io().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.on_read(Instant::now());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.check(cx, true) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = self.io().poll_write(cx, data);
        self.after_write(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = self.io().poll_write_vectored(cx, bufs);
        self.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}
