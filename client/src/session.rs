//! The connection task behind a [`crate::Client`]: connects, checks every frame's
//! place in the sequence, batches acks, answers flushes with ping/pong, renews the
//! token, and reconnects with backoff when anything breaks.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::{AckMode, Config, Resume};
use crate::frame::{Event, Incoming};
use crate::{jwt, Command, Error, Shared, State, Update};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Refusals of a provider's fresh tokens in a row before the client gives up.
const MAX_AUTH_REFUSALS: u32 = 3;
/// Updates held while the consumer is behind before the socket is no longer read
/// (more only while a ping is outstanding, to reach its pong).
const OUTBOX: usize = 64;
/// How soon a failed renewal is tried again (the old token still holds until `exp`).
const RENEW_RETRY: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How an attempt ended.
enum Outcome {
    /// Closed by the caller, or nobody listens any more.
    Stop,
    Fatal(Error),
    Retry {
        error: Error,
        /// The connection delivered something: the backoff starts over.
        progressed: bool,
        /// At least this long before the next attempt (`Retry-After`).
        at_least: Duration,
        /// Reconnect without waiting (a renewed token after 4001).
        now: bool,
    },
}

impl Outcome {
    fn retry(error: Error, progressed: bool) -> Outcome {
        Outcome::Retry {
            error,
            progressed,
            at_least: Duration::ZERO,
            now: false,
        }
    }
}

struct Task {
    config: Config,
    shared: Arc<Shared>,
    updates: mpsc::Sender<Update>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Updates not yet taken by the consumer, oldest first.
    outbox: VecDeque<Update>,
    state: State,
    token: Option<String>,
    exp: Option<u64>,
    /// The last `user_seq` received and queued for delivery (`None` before the first welcome).
    last: Option<u64>,
    /// With a thread filter, the last `thread_version` received.
    last_version: Option<u64>,
    /// Streamed messages still open, accumulated.
    messages: crate::frame::Messages,
    /// The highest ack a pong confirmed durable.
    durable: u64,
    flushes: Vec<(u64, oneshot::Sender<Result<u64, Error>>)>,
    closing: Option<oneshot::Sender<()>>,
    auth_refusals: u32,
}

/// Per connection.
struct Conn {
    ws: Ws,
    resumed_after: u64,
    /// The highest ack sent on this connection (starts at what is durable).
    acked: u64,
    /// Pings sent and not yet answered: the ack each one covers, and when it went.
    pings: VecDeque<(u64, Instant)>,
    last_rx: Instant,
    ack_due: Option<Instant>,
    renew_at: Option<Instant>,
    renewing: Option<JoinHandle<Result<String, String>>>,
    /// A renewed token sent with `refresh`, awaiting `refreshed`.
    offered: Option<String>,
    /// An `invalid_ack` since the last pong: that pong confirms nothing.
    refused_ack: Option<String>,
    /// An `error` frame that may precede a close: (code, message).
    held: Option<(String, String)>,
    progressed: bool,
}

pub(crate) async fn run(
    config: Config,
    shared: Arc<Shared>,
    updates: mpsc::Sender<Update>,
    commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut task = Task {
        config,
        shared,
        updates,
        commands,
        outbox: VecDeque::new(),
        state: State::Connecting,
        token: None,
        exp: None,
        last: None,
        last_version: None,
        messages: Default::default(),
        durable: 0,
        flushes: Vec::new(),
        closing: None,
        auth_refusals: 0,
    };
    task.run().await;
}

impl Task {
    async fn run(&mut self) {
        self.push(Update::State(State::Connecting));
        let mut failures = 0u32;
        let mut wait = Duration::ZERO;
        let fatal = loop {
            if !self.drain().await || (!wait.is_zero() && !self.pause(wait).await) {
                break None;
            }
            match self.attempt().await {
                Outcome::Stop => break None,
                Outcome::Fatal(e) => break Some(e),
                Outcome::Retry {
                    error,
                    progressed,
                    at_least,
                    now,
                } => {
                    tracing::debug!(%error, "reconnecting");
                    if self.closing.is_some() {
                        break None;
                    }
                    if progressed {
                        failures = 0;
                    }
                    wait = if now {
                        Duration::ZERO
                    } else {
                        failures = failures.saturating_add(1);
                        self.config.backoff.delay(failures - 1).max(at_least)
                    };
                    self.push(Update::Error(error));
                    self.set_state(State::Reconnecting);
                }
            }
        };
        let outcome = match fatal {
            Some(e) => {
                self.push(Update::Error(e.clone()));
                e
            }
            None => Error::ClientClosed,
        };
        for (target, tx) in self.flushes.drain(..) {
            let _ = tx.send(if target <= self.durable {
                Ok(self.durable)
            } else {
                Err(outcome.clone())
            });
        }
        self.set_state(State::Closed);
        // Whoever still listens gets the rest; nobody waits on it.
        while let Some(u) = self.outbox.pop_front() {
            if self.updates.try_send(u).is_err() {
                break;
            }
        }
        if let Some(tx) = self.closing.take() {
            let _ = tx.send(());
        }
    }

    fn set_state(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.shared.state.send_replace(state);
            self.push(Update::State(state));
        }
    }

    fn push(&mut self, update: Update) {
        self.outbox.push_back(update);
    }

    fn handled(&self) -> u64 {
        self.shared.handled.load(Ordering::Acquire)
    }

    /// A command that arrived while not connected; false to stop.
    fn command_offline(&mut self, command: Option<Command>) -> bool {
        match command {
            Some(Command::Flush(target, tx)) => {
                self.add_flush(target, tx);
                true
            }
            Some(Command::Close(tx)) => {
                self.closing = Some(tx);
                false
            }
            None => false,
        }
    }

    fn add_flush(&mut self, target: u64, tx: oneshot::Sender<Result<u64, Error>>) {
        if target <= self.durable || self.config.acks.mode == AckMode::Off {
            let _ = tx.send(Ok(self.durable));
        } else {
            self.flushes.push((target, tx));
        }
    }

    /// Runs `fut` while serving commands; `None` when the client is to stop.
    async fn serving<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                command = self.commands.recv() => if !self.command_offline(command) { return None },
                // The stream was dropped: nobody will read what comes.
                _ = self.updates.closed() => return None,
            }
        }
    }

    /// Hands every held update to the consumer; false when the client is to stop.
    async fn drain(&mut self) -> bool {
        while let Some(update) = self.outbox.pop_front() {
            let updates = self.updates.clone();
            match self.serving(updates.send(update)).await {
                Some(Ok(())) => {}
                _ => return false,
            }
        }
        true
    }

    async fn pause(&mut self, wait: Duration) -> bool {
        self.serving(tokio::time::sleep(wait)).await.is_some()
    }

    /// The token to connect with: the current one while it is valid, else a new one.
    async fn token(&mut self) -> Result<String, Outcome> {
        let valid = |exp: Option<u64>| exp.is_none_or(|e| e * 1000 > now_ms());
        if let Some(t) = &self.token {
            if valid(self.exp) {
                return Ok(t.clone());
            }
        }
        if self.config.token.is_fixed() && self.token.is_some() {
            return Err(Outcome::Fatal(Error::TokenExpired));
        }
        let source = self.config.token.clone();
        let token = match self.serving(source.fetch()).await {
            None => return Err(Outcome::Stop),
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(Outcome::retry(Error::Token(e.to_string()), false)),
        };
        self.exp = jwt::expiry(&token);
        self.token = Some(token.clone());
        if self.config.token.is_fixed() && !valid(self.exp) {
            return Err(Outcome::Fatal(Error::TokenExpired));
        }
        Ok(token)
    }

    /// One connection, from opening to its end.
    async fn attempt(&mut self) -> Outcome {
        let token = match self.token().await {
            Ok(t) => t,
            Err(outcome) => return outcome,
        };
        let after = match (self.last, self.config.resume) {
            (Some(n), _) | (None, Resume::After(n)) => Some(n.to_string()),
            (None, Resume::Latest) => Some("latest".to_owned()),
            (None, Resume::Cursor) => None,
        };
        let url = match self.config.socket_url(after.as_deref()) {
            Ok(u) => u,
            Err(e) => return Outcome::Fatal(Error::Config(e)),
        };
        let mut request = match url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => return Outcome::Fatal(Error::Config(e.to_string())),
        };
        let headers = request.headers_mut();
        match format!("Bearer {token}").parse() {
            Ok(v) => headers.insert("authorization", v),
            Err(_) => {
                return Outcome::Fatal(Error::Unauthorized(
                    "the token is not a valid header value".into(),
                ))
            }
        };
        headers.insert(
            "sec-websocket-protocol",
            tungstenite::http::HeaderValue::from_static("threadline.v1"),
        );
        let ws_config = WebSocketConfig::default().max_message_size(Some(16 << 20));
        let timeout = self.config.connect_timeout;
        let connect = tokio::time::timeout(
            timeout,
            tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true),
        );
        let ws = match self.serving(connect).await {
            None => return Outcome::Stop,
            Some(Err(_)) => return Outcome::retry(Error::Timeout(timeout), false),
            Some(Ok(Err(e))) => return connect_error(e),
            Some(Ok(Ok((ws, _)))) => ws,
        };
        let cursor = after.is_none();
        let asked = after.and_then(|a| a.parse().ok());
        self.session(ws, asked, cursor).await
    }

    /// Waits for `welcome`, checks it, then serves the connection.
    async fn session(&mut self, mut ws: Ws, asked: Option<u64>, cursor: bool) -> Outcome {
        let deadline = Instant::now() + self.config.connect_timeout;
        let mut held = None;
        let welcome = loop {
            let next = tokio::time::timeout_at(deadline, ws.next());
            let msg = match self.serving(next).await {
                None => return Outcome::Stop,
                Some(Err(_)) => {
                    return Outcome::retry(Error::Timeout(self.config.connect_timeout), false)
                }
                Some(Ok(m)) => m,
            };
            match msg {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<Incoming>(&t) {
                    Ok(Incoming::Welcome { resume_after, head }) => break (resume_after, head),
                    Ok(Incoming::Error { code, message }) => held = Some((code, message)),
                    _ => {}
                },
                Some(Ok(Message::Close(frame))) => return self.closed(frame, held, false),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Outcome::retry(Error::Connection(e.to_string()), false),
                None => {
                    return Outcome::retry(Error::Connection("closed before welcome".into()), false)
                }
            }
        };
        let (resumed_after, _head) = welcome;
        if let Some(asked) = asked.filter(|a| *a != resumed_after) {
            let _ = ws.close(None).await;
            return Outcome::retry(
                Error::ResumeMismatch {
                    asked,
                    got: resumed_after,
                },
                false,
            );
        }
        self.auth_refusals = 0;
        if self.last.is_none() {
            self.last = Some(resumed_after);
            if self.config.thread_id.is_some() && resumed_after == 0 {
                self.last_version = Some(0);
            }
        }
        if cursor {
            // Resumed after the durable cursor: that much is acknowledged already.
            self.durable = self.durable.max(resumed_after);
        }
        let now = Instant::now();
        let mut conn = Conn {
            ws,
            resumed_after,
            acked: self.durable,
            pings: VecDeque::new(),
            last_rx: now,
            ack_due: None,
            renew_at: None,
            renewing: None,
            offered: None,
            refused_ack: None,
            held: None,
            progressed: false,
        };
        self.set_state(State::Replaying);
        self.schedule_renewal(&mut conn);
        let outcome = self.serve(&mut conn).await;
        if let Some(r) = conn.renewing.take() {
            r.abort();
        }
        // Flushes that this filtered connection could not serve stay pending for the next.
        outcome
    }

    async fn serve(&mut self, conn: &mut Conn) -> Outcome {
        // Acks sent on an earlier connection and not confirmed are sent again.
        if let Err(o) = self.consider_ack(conn).await {
            return o;
        }
        if let Err(o) = self.ensure_flush(conn).await {
            return o;
        }
        // A permit borrows its sender into the branch's handler, which needs `self`.
        let updates = self.updates.clone();
        loop {
            let reading = self.outbox.len() < OUTBOX || !conn.pings.is_empty();
            let (timer, what) = self.next_timer(conn);
            let renewing = conn.renewing.is_some();
            tokio::select! {
                msg = conn.ws.next(), if reading => {
                    conn.last_rx = Instant::now();
                    if let Some(outcome) = self.on_message(conn, msg).await {
                        return outcome;
                    }
                }
                permit = updates.reserve(), if !self.outbox.is_empty() => match permit {
                    Ok(p) => if let Some(u) = self.outbox.pop_front() { p.send(u) },
                    Err(_) => return Outcome::Stop,
                },
                command = self.commands.recv() => match command {
                    Some(Command::Flush(target, tx)) => {
                        self.add_flush(target, tx);
                        if let Err(o) = self.ensure_flush(conn).await { return o; }
                    }
                    Some(Command::Close(tx)) => {
                        self.closing = Some(tx);
                        if let Err(o) = self.send_ack(conn).await { return o; }
                        if conn.acked > self.durable {
                            if let Err(o) = self.ping(conn).await { return o; }
                        } else {
                            return self.close_now(conn).await;
                        }
                    }
                    None => return Outcome::Stop,
                },
                _ = updates.closed() => return Outcome::Stop,
                _ = self.shared.wake.notified() => {
                    if let Err(o) = self.consider_ack(conn).await { return o; }
                }
                renewed = Renewal(&mut conn.renewing), if renewing => {
                    conn.renewing = None;
                    let renewed = renewed.unwrap_or_else(|e| Err(e.to_string()));
                    if let Err(o) = self.on_renewed(conn, renewed).await { return o; }
                }
                _ = tokio::time::sleep_until(timer) => {
                    if let Some(outcome) = self.on_timer(conn, what).await {
                        return outcome;
                    }
                }
            }
        }
    }

    /// The earliest deadline and what it is for.
    fn next_timer(&self, conn: &Conn) -> (Instant, Timer) {
        let keepalive = self.config.keepalive;
        let mut next = match conn.pings.front() {
            Some((_, sent)) => (conn.last_rx.max(*sent) + keepalive, Timer::Dead),
            None => (conn.last_rx + keepalive, Timer::Keepalive),
        };
        if let Some(at) = conn.ack_due.filter(|at| *at < next.0) {
            next = (at, Timer::Ack);
        }
        if let Some(at) = conn
            .renew_at
            .filter(|at| *at < next.0 && conn.renewing.is_none())
        {
            next = (at, Timer::Renew);
        }
        next
    }

    async fn on_timer(&mut self, conn: &mut Conn, what: Timer) -> Option<Outcome> {
        let result = match what {
            Timer::Dead => {
                return Some(Outcome::retry(
                    Error::Timeout(self.config.keepalive),
                    conn.progressed,
                ))
            }
            Timer::Keepalive => self.ping(conn).await,
            Timer::Ack => self.send_ack(conn).await,
            Timer::Renew => {
                conn.renew_at = None;
                let source = self.config.token.clone();
                conn.renewing = Some(tokio::spawn(async move {
                    source.fetch().await.map_err(|e| e.to_string())
                }));
                Ok(())
            }
        };
        result.err()
    }

    /// Handles one message; `Some` ends the connection.
    async fn on_message(
        &mut self,
        conn: &mut Conn,
        msg: Option<Result<Message, tungstenite::Error>>,
    ) -> Option<Outcome> {
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(frame))) => {
                let held = conn.held.take();
                return Some(self.closed(frame, held, conn.progressed));
            }
            Some(Ok(_)) => return None,
            Some(Err(e)) => {
                return Some(Outcome::retry(
                    Error::Connection(e.to_string()),
                    conn.progressed,
                ))
            }
            None => {
                return Some(Outcome::retry(
                    Error::Connection("the connection closed without a close frame".into()),
                    conn.progressed,
                ))
            }
        };
        let incoming = match serde_json::from_str::<Incoming>(&text) {
            Ok(i) => i,
            Err(e) => {
                let _ = conn.ws.close(None).await;
                return Some(Outcome::retry(
                    Error::Connection(format!("unreadable frame: {e}")),
                    conn.progressed,
                ));
            }
        };
        match incoming {
            Incoming::Event(frame) => {
                if let Err(error) = self.accept(conn, frame.into()) {
                    // Nothing of the bad frame is delivered; resume after the last good one.
                    let _ = conn.ws.close(None).await;
                    return Some(Outcome::retry(error, conn.progressed));
                }
            }
            Incoming::CaughtUp { user_seq } => {
                let last = self.last.unwrap_or(0);
                let beyond = if self.config.thread_id.is_some() {
                    user_seq < last
                } else {
                    user_seq != last
                };
                if beyond {
                    let _ = conn.ws.close(None).await;
                    return Some(Outcome::retry(
                        Error::CaughtUpBeyond {
                            caught_up: user_seq,
                            last,
                        },
                        conn.progressed,
                    ));
                }
                conn.progressed = true;
                self.push(Update::CaughtUp { user_seq });
                self.set_state(State::Live);
            }
            Incoming::Pong => {
                if let Err(o) = self.on_pong(conn).await {
                    return Some(o);
                }
            }
            Incoming::Refreshed { exp } => {
                if let Some(t) = conn.offered.take() {
                    self.token = Some(t);
                }
                self.exp = Some(exp);
                self.schedule_renewal(conn);
            }
            Incoming::Error { code, message } => match code.as_str() {
                "invalid_ack" => {
                    conn.refused_ack = Some(message.clone());
                    self.push(Update::Error(Error::Server { code, message }));
                }
                "invalid_token" => {
                    // The renewal was refused; the old token holds until its exp.
                    conn.offered = None;
                    conn.renew_at = Some(Instant::now() + RENEW_RETRY);
                    self.push(Update::Error(Error::Server { code, message }));
                }
                "invalid_message" => self.push(Update::Error(Error::Server { code, message })),
                _ => conn.held = Some((code, message)),
            },
            Incoming::Welcome { .. } | Incoming::Unknown => {}
        }
        None
    }

    /// Checks an event's place in the sequence and queues it for delivery.
    fn accept(&mut self, conn: &mut Conn, mut event: Event) -> Result<(), Error> {
        let last = self.last.unwrap_or(0);
        let seq = event.user_seq;
        // A merged frame covers `from_user_seq..=user_seq`: it must begin where the last ended.
        let from = event.from_user_seq.unwrap_or(seq);
        if seq <= last || from <= last {
            return Err(Error::Duplicate { got: from, last });
        }
        if self.config.thread_id.is_none() {
            if from != last + 1 || seq < from {
                return Err(Error::Gap {
                    expected: last + 1,
                    got: from,
                    resume_after: last,
                });
            }
        } else if let Some(v) = self.last_version {
            if event.from_thread_version.unwrap_or(event.thread_version) != v + 1 {
                return Err(Error::VersionGap {
                    thread_id: event.thread_id.clone(),
                    last: v,
                    got: event.thread_version,
                    resume_after: last,
                });
            }
        }
        self.last = Some(seq);
        self.last_version = Some(event.thread_version);
        conn.progressed = true;
        event.message = self.messages.take(&event);
        self.push(Update::Event(event));
        Ok(())
    }

    /// Maps the server's close to what happens next.
    fn closed(
        &mut self,
        frame: Option<CloseFrame>,
        held: Option<(String, String)>,
        progressed: bool,
    ) -> Outcome {
        let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
        let (error_code, message) = held.unwrap_or_default();
        let reason = if message.is_empty() {
            frame.map(|f| f.reason.to_string()).unwrap_or_default()
        } else {
            format!("{error_code}: {message}")
        };
        let fixed = self.config.token.is_fixed();
        match code {
            4001 if fixed => Outcome::Fatal(Error::TokenExpired),
            4001 => {
                self.token = None;
                Outcome::Retry {
                    error: Error::Closed { code, reason },
                    progressed,
                    at_least: Duration::ZERO,
                    now: true,
                }
            }
            1008 if error_code == "unauthorized" || error_code == "token_subject_changed" => {
                self.auth_refusals += 1;
                if fixed
                    || error_code == "token_subject_changed"
                    || self.auth_refusals >= MAX_AUTH_REFUSALS
                {
                    return Outcome::Fatal(Error::Unauthorized(reason));
                }
                self.token = None;
                Outcome::retry(Error::Closed { code, reason }, progressed)
            }
            4400 => Outcome::Fatal(Error::BadRequest(reason)),
            _ => Outcome::retry(Error::Closed { code, reason }, progressed),
        }
    }

    /// Sends an ack now if the batch is full, else arms the batch's timer.
    async fn consider_ack(&mut self, conn: &mut Conn) -> Result<(), Outcome> {
        let handled = self.handled();
        if self.config.acks.mode == AckMode::Off || handled <= conn.acked {
            return Ok(());
        }
        if handled - conn.acked >= self.config.acks.max_events {
            return self.send_ack(conn).await;
        }
        if conn.ack_due.is_none() {
            conn.ack_due = Some(Instant::now() + self.config.acks.max_delay);
        }
        Ok(())
    }

    /// Acks everything handled, if this connection may.
    async fn send_ack(&mut self, conn: &mut Conn) -> Result<(), Outcome> {
        conn.ack_due = None;
        let handled = self.handled();
        if self.config.acks.mode == AckMode::Off || handled <= conn.acked {
            return Ok(());
        }
        // A filtered connection may ack only what it delivered itself.
        if self.config.thread_id.is_some() && handled <= conn.resumed_after {
            return Ok(());
        }
        self.send(conn, json!({"type": "ack", "user_seq": handled}))
            .await?;
        conn.acked = handled;
        Ok(())
    }

    async fn ping(&mut self, conn: &mut Conn) -> Result<(), Outcome> {
        self.send(conn, json!({"type": "ping"})).await?;
        conn.pings.push_back((conn.acked, Instant::now()));
        Ok(())
    }

    /// Makes sure a ping covering every pending flush is on its way.
    async fn ensure_flush(&mut self, conn: &mut Conn) -> Result<(), Outcome> {
        let Some(target) = self.flushes.iter().map(|(t, _)| *t).max() else {
            return Ok(());
        };
        self.send_ack(conn).await?;
        if conn.acked < target {
            // Delivered on an earlier connection, not ackable on this filtered one.
            let durable = self.durable;
            for (t, tx) in std::mem::take(&mut self.flushes) {
                if t <= conn.acked {
                    self.flushes.push((t, tx));
                } else {
                    let _ = tx.send(if t <= durable {
                        Ok(durable)
                    } else {
                        Err(Error::FlushInterrupted)
                    });
                }
            }
            if self.flushes.is_empty() {
                return Ok(());
            }
        }
        if conn.pings.back().is_none_or(|(a, _)| *a < conn.acked) {
            self.ping(conn).await?;
        }
        Ok(())
    }

    async fn on_pong(&mut self, conn: &mut Conn) -> Result<(), Outcome> {
        let Some((acked, _)) = conn.pings.pop_front() else {
            return Ok(());
        };
        match conn.refused_ack.take() {
            None => self.durable = self.durable.max(acked),
            Some(reason) => {
                for (t, tx) in std::mem::take(&mut self.flushes) {
                    if t <= acked && t > self.durable {
                        let _ = tx.send(Err(Error::AckRefused(reason.clone())));
                    } else {
                        self.flushes.push((t, tx));
                    }
                }
            }
        }
        let durable = self.durable;
        let (done, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(t, _)| *t <= durable);
        self.flushes = pending;
        for (_, tx) in done {
            let _ = tx.send(Ok(durable));
        }
        if self.closing.is_some() && conn.pings.is_empty() {
            return Err(self.close_now(conn).await);
        }
        Ok(())
    }

    async fn close_now(&mut self, conn: &mut Conn) -> Outcome {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "client closed".into(),
        };
        let close = conn.ws.close(Some(frame));
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
        Outcome::Stop
    }

    async fn send(&mut self, conn: &mut Conn, value: serde_json::Value) -> Result<(), Outcome> {
        let send = conn.ws.send(Message::Text(value.to_string().into()));
        match tokio::time::timeout(self.config.keepalive, send).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Outcome::retry(
                Error::Connection(e.to_string()),
                conn.progressed,
            )),
            Err(_) => Err(Outcome::retry(
                Error::Timeout(self.config.keepalive),
                conn.progressed,
            )),
        }
    }

    /// Plans the token's renewal shortly before its `exp`: a quarter of its remaining
    /// life before, between one second and a minute.
    fn schedule_renewal(&self, conn: &mut Conn) {
        conn.renew_at = None;
        let Some(exp) = self.exp.filter(|_| !self.config.token.is_fixed()) else {
            return;
        };
        let left = (exp * 1000).saturating_sub(now_ms());
        let margin = (left / 4).clamp(1000, 60_000);
        conn.renew_at = Some(Instant::now() + Duration::from_millis(left.saturating_sub(margin)));
    }

    async fn on_renewed(
        &mut self,
        conn: &mut Conn,
        renewed: Result<String, String>,
    ) -> Result<(), Outcome> {
        match renewed {
            Ok(token) if jwt::expiry(&token) > self.exp => {
                self.send(conn, json!({"type": "refresh", "token": token}))
                    .await?;
                conn.offered = Some(token);
            }
            Ok(_) => {
                // Not newer than the current one: ask again shortly.
                conn.renew_at = Some(Instant::now() + RENEW_RETRY);
            }
            Err(e) => {
                self.push(Update::Error(Error::Token(e)));
                conn.renew_at = Some(Instant::now() + RENEW_RETRY);
            }
        }
        Ok(())
    }
}

/// Awaits a running renewal (only polled while there is one).
struct Renewal<'a>(&'a mut Option<JoinHandle<Result<String, String>>>);

impl Future for Renewal<'_> {
    type Output = Result<Result<String, String>, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.0.as_mut() {
            Some(handle) => std::pin::Pin::new(handle).poll(cx),
            None => std::task::Poll::Pending,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Dead,
    Keepalive,
    Ack,
    Renew,
}

/// Maps a failed opening handshake.
fn connect_error(e: tungstenite::Error) -> Outcome {
    match e {
        tungstenite::Error::Http(response) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let error = Error::Refused {
                status,
                retry_after,
            };
            match status {
                // Not an upgrade endpoint, or refused for good.
                400 | 401 | 403 | 404 => Outcome::Fatal(error),
                _ => Outcome::Retry {
                    error,
                    progressed: false,
                    at_least: retry_after.unwrap_or_default(),
                    now: false,
                },
            }
        }
        tungstenite::Error::Url(e) => Outcome::Fatal(Error::Config(e.to_string())),
        other => Outcome::retry(Error::Connection(other.to_string()), false),
    }
}
