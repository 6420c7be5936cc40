//! A Threadline socket client (docs/PROTOCOL.md, "The socket"): a [`Stream`] of
//! [`Update`]s that reconnects on its own with exponential backoff and jitter, resumes
//! after the last `user_seq` it delivered, acknowledges in batches, tells when acks are
//! durable ([`Handle::flush`]: ack, ping, pong), detects a gap or a duplicate and
//! resumes from the last good event rather than hiding it, and renews its token with
//! `refresh` before `exp` (or reconnects with a new one on 4001).
//!
//! ```no_run
//! # async fn demo() {
//! use futures_util::StreamExt;
//! use threadline_client::{Client, Config, TokenSource, Update};
//!
//! let config = Config::new("ws://127.0.0.1:7070", TokenSource::fixed("<jwt>")).client_id("phone");
//! let mut client = Client::connect(config);
//! while let Some(update) = client.next().await {
//!     match update {
//!         Update::Event(e) => println!("{} {}", e.user_seq, e.payload.event_type()),
//!         Update::CaughtUp { user_seq } => println!("live after {user_seq}"),
//!         Update::State(_) | Update::Error(_) => {}
//!     }
//! }
//! # }
//! ```

mod config;
mod error;
mod frame;
mod jwt;
mod session;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, watch, Notify};

pub use config::{AckMode, Acks, Backoff, BoxError, Config, Resume, TokenSource};
pub use error::Error;
pub use frame::{Data, Event, MessageText, Payload};
pub use jwt::expiry as token_expiry;

/// Where the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Opening the first connection.
    Connecting,
    /// Connected, replaying what happened since the resume point.
    Replaying,
    /// Caught up: events arrive as they are appended.
    Live,
    /// The connection dropped; waiting (backoff) or opening the next one.
    Reconnecting,
    /// Stopped for good: closed by the caller or after a fatal error. The stream ends.
    Closed,
}

/// What the stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The next event: `user_seq` is the previous one's + 1 (with a thread filter: larger,
    /// and `thread_version` the previous one's + 1), across reconnects.
    Event(Event),
    /// The replay reached the user's head at the time (once per connection).
    CaughtUp {
        user_seq: u64,
    },
    State(State),
    /// Something went wrong; unless [`Error::is_fatal`], the client has handled it
    /// (usually by reconnecting).
    Error(Error),
}

pub(crate) enum Command {
    Flush(u64, oneshot::Sender<Result<u64, Error>>),
    Close(oneshot::Sender<()>),
}

/// Shared by the stream side and the connection task.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The last `user_seq` the stream yielded.
    delivered: AtomicU64,
    /// The last `user_seq` the consumer counts as handled (what acks cover).
    handled: AtomicU64,
    /// Wakes the task when `handled` moved.
    wake: Notify,
    state: watch::Sender<State>,
    mode: AckMode,
}

/// A handle to a running client: ack, flush, close, state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Handle {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Handle {
    /// In [`AckMode::Manual`], marks every delivered event up to `user_seq` as handled;
    /// an ack covering it follows within the batching limits. Beyond what was delivered,
    /// it counts up to the last delivered event.
    pub fn ack(&self, user_seq: u64) {
        let seq = user_seq.min(self.shared.delivered.load(Ordering::Acquire));
        if self.shared.handled.fetch_max(seq, Ordering::AcqRel) < seq {
            self.shared.wake.notify_one();
        }
    }

    /// Acks everything handled so far and resolves once the server has made it durable
    /// (ping after ack; the pong comes only after the acks before it are durable).
    /// Returns the durable `user_seq`. Survives reconnects.
    pub async fn flush(&self) -> Result<u64, Error> {
        let target = self.shared.handled.load(Ordering::Acquire);
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Flush(target, tx))
            .map_err(|_| Error::ClientClosed)?;
        rx.await.unwrap_or(Err(Error::ClientClosed))
    }

    /// Acks what was handled (waiting a moment for it to be durable), closes the socket
    /// and ends the stream.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub fn state(&self) -> State {
        *self.shared.state.borrow()
    }

    /// The last `user_seq` the stream yielded (0 before the first).
    pub fn last_delivered(&self) -> u64 {
        self.shared.delivered.load(Ordering::Acquire)
    }
}

/// A running client: a [`Stream`] of [`Update`]s. Dropping it stops the client.
#[derive(Debug)]
pub struct Client {
    updates: mpsc::Receiver<Update>,
    handle: Handle,
}

impl Client {
    /// Starts the client on the current tokio runtime; it connects in the background.
    pub fn connect(config: Config) -> Client {
        let (updates_tx, updates) = mpsc::channel(config.buffer.max(1));
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            delivered: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            wake: Notify::new(),
            state: watch::Sender::new(State::Connecting),
            mode: config.acks.mode,
        });
        tokio::spawn(session::run(
            config,
            shared.clone(),
            updates_tx,
            commands_rx,
        ));
        Client {
            updates,
            handle: Handle { commands, shared },
        }
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// See [`Handle::ack`].
    pub fn ack(&self, user_seq: u64) {
        self.handle.ack(user_seq)
    }

    /// See [`Handle::flush`].
    pub async fn flush(&self) -> Result<u64, Error> {
        self.handle.flush().await
    }

    /// See [`Handle::close`].
    pub async fn close(&self) {
        self.handle.close().await
    }

    pub fn state(&self) -> State {
        self.handle.state()
    }
}

impl Stream for Client {
    type Item = Update;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Update>> {
        let polled = self.updates.poll_recv(cx);
        if let Poll::Ready(Some(Update::Event(e))) = &polled {
            let shared = &self.handle.shared;
            shared.delivered.fetch_max(e.user_seq, Ordering::AcqRel);
            if shared.mode == AckMode::OnDelivery {
                shared.handled.fetch_max(e.user_seq, Ordering::AcqRel);
                shared.wake.notify_one();
            }
        }
        polled
    }
}
