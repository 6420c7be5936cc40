//! The socket, `GET /v1/ws`: replay from the log, then live, with no gap at
//! the hand-over. One loop serves both: it pages the user's delivery queue
//! after the last `user_seq` it sent, so a slow reader is simply served later
//! from the log, with at most one page in memory.

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::{FutureExt, SinkExt};
use serde::Deserialize;
use serde_json::json;
use threadline_engine::{ClientId, Command, Role, ThreadId, UserId};
use threadline_projections::{Streams, Submission};
use threadline_storage::now_ms;
use tracing::Instrument;
use utoipa::IntoParams;

use crate::app::{AppState, Log};
use crate::auth::{bearer_token, AuthError, Principal};
use crate::conn::ConnHandle;
use crate::error::AppError;
use crate::extract::check_query;
use crate::stream;
use crate::wire;

/// Frames read from the log per step: bounds a socket's memory.
const PAGE: usize = 64;
/// Events read per step by a socket that merges message frames (still at most
/// [`PAGE`] frames, each of at most [`stream::MAX_MERGED_TEXT`] text).
const MERGE_PAGE: usize = 4096;
/// Open runs a `welcome` lists at most.
const MAX_WELCOME_RUNS: usize = 100;
/// How long a socket's `welcome` waits for this gateway's fold to reach the log's head.
const LOG_CATCH_UP: Duration = Duration::from_secs(10);
/// Largest client message and frame (the contract); a larger one closes with 1009.
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Bytes tungstenite buffers before writing to the socket (its default).
const WRITE_BUFFER: usize = 128 * 1024;
/// The most a socket's write buffer may hold: the buffer plus one frame (a frame
/// carries at most 64 KiB of data) with room to spare. Sends wait for the peer to
/// take bytes before queueing more, so this is a bound, not a working size.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;
pub const SUBPROTOCOL: &str = "threadline.v1";

pub mod close {
    /// Not a close code: the connection is dropped without a close frame (the peer is
    /// gone, or does not read, so nothing more can reach it).
    pub const NONE: u16 = 0;
    pub const SHUTDOWN: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const EXPIRED: u16 = 4001;
    pub const BAD_QUERY: u16 = 4400;
    pub const TOO_MANY: u16 = 4029;
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct WsQuery {
    /// The `user_seq` to resume after, `latest`, or `open` (just before the oldest open
    /// message's start); without it, the client's durable cursor.
    after: Option<String>,
    /// Whose durable cursor acks move; `default` when absent.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    client_id: Option<String>,
    /// Only this thread's frames (they keep their `user_seq`: gaps are expected).
    thread_id: Option<String>,
    /// The JWT, when no header or subprotocol can carry it.
    access_token: Option<String>,
    /// `1`: merged and compacted message frames, each covering `from_user_seq..=user_seq`.
    #[param(pattern = "^(0|1|true|false)$")]
    merge: Option<String>,
}

#[derive(Debug)]
enum Resume {
    Cursor,
    Latest,
    /// Before the oldest open message (a late joiner: the text so far, then the tail).
    Open,
    After(u64),
}

#[derive(Debug)]
struct Params {
    resume: Resume,
    client: ClientId,
    thread: Option<ThreadId>,
    /// Merged and compacted message frames (`merge=1`), see `stream.rs`.
    merge: bool,
}

fn parse_params(q: Option<WsQuery>) -> Result<Params, String> {
    let q = q.ok_or("malformed query string")?;
    let resume = match q.after.as_deref() {
        None => Resume::Cursor,
        Some("latest") => Resume::Latest,
        Some("open") => Resume::Open,
        Some(n) => Resume::After(
            n.parse()
                .map_err(|_| format!("after={n:?} is not a user_seq, \"latest\" or \"open\""))?,
        ),
    };
    let client = match q.client_id {
        Some(c) => ClientId::parse(&c).map_err(|e| e.to_string())?,
        None => ClientId::default_client(),
    };
    let thread = q
        .thread_id
        .map(|t| ThreadId::parse(&t))
        .transpose()
        .map_err(|e| e.to_string())?;
    let merge = match q.merge.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(other) => return Err(format!("merge={other:?} is not 0 or 1")),
    };
    Ok(Params {
        resume,
        client,
        thread,
        merge,
    })
}

/// Finds the token: `Authorization`, then the `bearer.<jwt>` subprotocol, then `access_token`.
fn token<'a>(headers: &'a HeaderMap, query: Option<&'a WsQuery>) -> Option<&'a str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return bearer_token(v);
    }
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix("bearer."));
    offered.or(query.and_then(|q| q.access_token.as_deref()))
}

/// The socket: a WebSocket upgrade (subprotocol `threadline.v1`).
///
/// The server sends a `welcome`, the replayed frames, `caught_up`, then live
/// frames; see docs/PROTOCOL.md. The token comes in `Authorization`, in the
/// subprotocol `bearer.<jwt>`, or in `access_token`. A bad query closes the
/// socket with 4400 after the upgrade.
#[utoipa::path(get, path = "/v1/ws", tag = "socket", operation_id = "socket", params(WsQuery),
    security(("bearer" = [])),
    responses(
        (status = 101, description = "switching protocols: the socket is open"),
        (status = 400, description = "invalid_request: not a WebSocket upgrade", body = wire::ErrorBody),
        (status = 401, description = "unauthorized: no valid token", body = wire::ErrorBody),
    ))]
pub(crate) async fn upgrade<L: Log>(
    State(app): State<AppState<L>>,
    conn: Option<Extension<ConnHandle>>,
    request_id: Option<Extension<crate::http::RequestId>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let query = axum::extract::Query::<WsQuery>::try_from_uri(&uri)
        .ok()
        .map(|q| q.0);
    let auth = match token(&headers, query.as_ref()) {
        Some(t) => app.auth().authenticate(t).await,
        None => Err(AuthError::Missing),
    };
    // Opening a socket counts against the user's request rate; over it, the
    // upgrade is refused with 429 before it happens.
    if let Ok(p) = &auth {
        if let Err(wait) = app.rate().check(&p.actor) {
            return AppError::RateLimited(wait).into_response();
        }
    }
    let params = match uri.query().map(|q| check_query("GET", "/v1/ws", q)) {
        Some(Err(e)) => Err(e.to_string()),
        _ => parse_params(query),
    };
    let ws = match ws {
        Ok(ws) => ws,
        // Not an upgrade: answered like any other call, in JSON.
        Err(_) => {
            let error = match (auth, params) {
                (Err(e), _) => AppError::Unauthorized(e),
                (_, Err(e)) => AppError::InvalidRequest(e),
                _ => AppError::InvalidRequest(
                    "GET /v1/ws is a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)"
                        .into(),
                ),
            };
            return error.into_response();
        }
    };
    let conn = conn.map(|Extension(c)| c);
    // Clients send only small acks and pings: tungstenite's default 128 KiB
    // read buffer per socket was most of an idle socket's memory (docs/benchmarks.md).
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(4 * 1024)
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            if let Some(conn) = &conn {
                conn.upgraded();
            }
            let user = auth
                .as_ref()
                .map(|p| p.actor.user.to_string())
                .unwrap_or_default();
            let client = params
                .as_ref()
                .map(|p| p.client.to_string())
                .unwrap_or_default();
            let request_id = request_id.map(|Extension(id)| id.0).unwrap_or_default();
            let span = tracing::info_span!("socket", request_id = %request_id, user_id = %user, client_id = %client);
            Session::start(app, socket, conn, auth, params)
                .instrument(span)
                .await
        })
}

/// What this connection has delivered and acknowledged, as `user_seq`s.
#[derive(Debug)]
struct Progress {
    /// Where the connection resumed: nothing up to here was delivered on it.
    resumed_after: u64,
    /// The last `user_seq` its pages covered (sent, or withheld by the thread filter).
    sent: u64,
    /// The client's durable cursor as this connection last knew it.
    acked: u64,
}

struct Session<L> {
    app: AppState<L>,
    socket: WebSocket,
    /// The per-user slot, given back only after `socket` (declared first, so dropped
    /// first) is gone: a socket whose close cannot be delivered still counts.
    slot: Option<Slot<L>>,
    conn: Option<ConnHandle>,
    send_timeout: Duration,
}

/// Why a session ended, when the server ends it.
struct Close(u16, &'static str, String);

fn shutting_down() -> Close {
    Close(
        close::SHUTDOWN,
        "shutting_down",
        "server shutting down".into(),
    )
}

/// 4001 once the key that verified the connection's token is no longer trusted: the
/// identity provider dropped it from its set, or a reload (SIGHUP) replaced the static
/// key. A `refresh` with a token of a trusted key moves the connection onto that key.
fn key_still_trusted<L: Log>(app: &AppState<L>, principal: &Principal) -> Result<(), Close> {
    if app.auth().trusts(principal) {
        return Ok(());
    }
    Err(Close(
        close::EXPIRED,
        "token_expired",
        "the key that signed the token is no longer trusted; reconnect with a new token".into(),
    ))
}

/// The peer is gone or does not take what is sent: drop it without a close.
fn gone(why: &str) -> Close {
    Close(close::NONE, "", why.into())
}

impl<L: Log> Session<L> {
    async fn start(
        app: AppState<L>,
        socket: WebSocket,
        conn: Option<ConnHandle>,
        auth: Result<Principal, AuthError>,
        params: Result<Params, String>,
    ) {
        let send_timeout = app.edge().ws_send_timeout;
        let mut session = Session {
            app,
            socket,
            slot: None,
            conn,
            send_timeout,
        };
        let result = match (auth, params) {
            (Err(e), _) => Err(Close(close::POLICY, "unauthorized", e.to_string())),
            (_, Err(e)) => Err(Close(close::BAD_QUERY, "invalid_request", e)),
            (Ok(principal), Ok(params)) => session.serve(principal, params).await,
        };
        if let Err(Close(code, error, message)) = result {
            session.close(code, error, &message).await;
        }
        // Dropping the session closes the connection, then frees the slot.
    }

    /// Sends the error frame and the close, within the send deadline; a peer that
    /// does not take them by then is dropped all the same.
    async fn close(&mut self, code: u16, error: &str, message: &str) {
        tracing::debug!(code, error, reason = message, "closing socket");
        if code == close::NONE {
            return;
        }
        let socket = &mut self.socket;
        let goodbye = async {
            // Every close the peer can still read is preceded by an error frame
            // (the contract); an empty code means the peer is already gone.
            if !error.is_empty() {
                let frame = json!({"type": "error", "code": error, "message": message});
                socket.send(Message::Text(frame.to_string().into())).await?;
            }
            socket
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: error.to_owned().into(),
                })))
                .await
        };
        match tokio::time::timeout(self.send_timeout, goodbye).await {
            Ok(Ok(())) => {
                if let Some(conn) = &self.conn {
                    conn.linger();
                }
            }
            Ok(Err(_)) => {}
            Err(_) => {
                tracing::debug!("the peer took no close within the send deadline; dropping it")
            }
        }
    }

    async fn serve(&mut self, mut principal: Principal, params: Params) -> Result<(), Close> {
        let app = self.app.clone();
        let user = principal.actor.user.clone();
        let rollup = if params.merge {
            app.edge().stream_rollup
        } else {
            Duration::ZERO
        };
        let slot = Slot::take(&app, &user).ok_or_else(|| {
            Close(
                close::TOO_MANY,
                "too_many_connections",
                format!(
                    "at most {} sockets per user",
                    app.edge().max_connections_per_user
                ),
            )
        })?;
        self.slot = Some(slot);
        caught_up_with_the_log(&app).await;
        let (head, cursor, open_runs, oldest_open) = app.projector().read(|m| {
            let (open_runs, oldest_open) = open_runs(m.streams(), &user, params.thread.as_ref());
            (
                m.delivery().user_head(&user),
                m.delivery().cursor(&user, &params.client),
                open_runs,
                oldest_open,
            )
        });
        let resume_after = match params.resume {
            Resume::Cursor => cursor.min(head),
            Resume::Latest => head,
            Resume::Open => oldest_open.map_or(head, |s| s - 1),
            Resume::After(n) if n > head => {
                return Err(Close(
                    close::BAD_QUERY,
                    "invalid_request",
                    format!("after={n} is beyond the head {head}"),
                ))
            }
            Resume::After(n) => n,
        };
        let welcome = json!({"type": "welcome", "user_id": user.as_str(), "client_id": params.client.as_str(),
            "resume_after": resume_after, "head": head, "protocol": 1,
            "merge": params.merge, "rollup_ms": rollup.as_millis() as u64, "open_runs": open_runs});
        self.send(vec![welcome.to_string()]).await?;

        let expiry = tokio::time::sleep(self.expires_in(&principal));
        tokio::pin!(expiry);
        let mut projected = app.projector().watch_user(&user);
        let mut shutdown = app.shutdown_signal();
        // The trusted keys changed (a refreshed key set, a reload): is this token's still one?
        let mut keys = app.auth().changes();
        // A change between the upgrade's check and this subscription is not missed.
        key_still_trusted(&app, &principal)?;
        let mut progress = Progress {
            resumed_after: resume_after,
            sent: resume_after,
            acked: cursor,
        };
        let mut caught_up = false;
        let mut last_live_page: Option<tokio::time::Instant> = None;
        loop {
            if *shutdown.borrow() {
                return Err(shutting_down());
            }
            if keys.has_changed().unwrap_or(false) {
                keys.borrow_and_update();
                key_still_trusted(&app, &principal)?;
            }
            // Rollup: once live and while a message streams, at most one page per
            // window, so its deltas that land within it go out merged into one frame.
            // Whatever the peer sends meanwhile is answered at once.
            if let Some(next) = last_live_page.map(|t| t + rollup) {
                if caught_up && !rollup.is_zero() && tokio::time::Instant::now() < next {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => {}
                        incoming = self.socket.recv() => {
                            let expires_at = principal.expires_at;
                            if !self.on_incoming(incoming, &mut principal, &params, &mut progress).await? {
                                return Ok(());
                            }
                            if principal.expires_at != expires_at {
                                let deadline = tokio::time::Instant::now() + self.expires_in(&principal);
                                expiry.as_mut().reset(deadline);
                            }
                            continue;
                        }
                        _ = &mut expiry => return Err(Close(close::EXPIRED, "token_expired", "the token expired".into())),
                        Ok(()) = keys.changed() => key_still_trusted(&app, &principal)?,
                        _ = shutdown.changed() => return Err(shutting_down()),
                    }
                }
            }
            // Mark the current position seen before reading, so a fold that
            // lands after the read still wakes the wait below: no lost wake-up.
            projected.borrow_and_update();
            let (frames, last, streaming) = Self::page(&app, &user, progress.sent, &params).await?;
            if let Some(last) = last {
                // Only a page that ended inside a streamed message opens a rollup
                // window; any other event goes out as soon as it is durable.
                last_live_page = (caught_up && streaming).then(tokio::time::Instant::now);
                let send = self.send(frames);
                tokio::select! {
                    sent = send => sent?,
                    _ = &mut expiry => return Err(Close(close::EXPIRED, "token_expired", "the token expired".into())),
                    _ = shutdown.changed() => return Err(shutting_down()),
                }
                progress.sent = last;
                // Answer pings and acks that arrived during a long replay, and
                // notice a peer that left, without waiting for anything.
                while let Some(incoming) = self.socket.recv().now_or_never() {
                    let expires_at = principal.expires_at;
                    if !self
                        .on_incoming(incoming, &mut principal, &params, &mut progress)
                        .await?
                    {
                        return Ok(());
                    }
                    if principal.expires_at != expires_at {
                        let deadline = tokio::time::Instant::now() + self.expires_in(&principal);
                        expiry.as_mut().reset(deadline);
                    }
                }
                continue;
            }
            if !caught_up {
                caught_up = true;
                self.send(vec![
                    json!({"type": "caught_up", "user_seq": progress.sent}).to_string(),
                ])
                .await?;
            }
            tokio::select! {
                changed = projected.changed() => {
                    if changed.is_err() { return Err(shutting_down()) }
                    if let Some(e) = app.projector().fault() {
                        return Err(internal(e.to_string()));
                    }
                },
                incoming = self.socket.recv() => {
                    let expires_at = principal.expires_at;
                    if !self.on_incoming(incoming, &mut principal, &params, &mut progress).await? {
                        return Ok(());
                    }
                    if principal.expires_at != expires_at {
                        let deadline = tokio::time::Instant::now() + self.expires_in(&principal);
                        expiry.as_mut().reset(deadline);
                    }
                }
                _ = &mut expiry => return Err(Close(close::EXPIRED, "token_expired", "the token expired".into())),
                Ok(()) = keys.changed() => key_still_trusted(&app, &principal)?,
                _ = shutdown.changed() => return Err(shutting_down()),
            }
        }
    }

    /// How long until the connection's token expires (with the leeway), from now.
    fn expires_in(&self, principal: &Principal) -> Duration {
        // Saturating: a token may carry any `exp` up to u64::MAX; a far one is simply never reached.
        let expires_at_ms = principal
            .expires_at
            .saturating_add(self.app.auth().leeway_secs())
            .saturating_mul(1000);
        Duration::from_millis(expires_at_ms.saturating_sub(now_ms()))
    }

    /// Handles one thing the peer sent; false when the peer has gone.
    async fn on_incoming(
        &mut self,
        incoming: Option<Result<Message, axum::Error>>,
        principal: &mut Principal,
        params: &Params,
        progress: &mut Progress,
    ) -> Result<bool, Close> {
        if let (Some(Ok(_)), Some(conn)) = (&incoming, &self.conn) {
            conn.message_received();
        }
        match incoming {
            Some(Ok(Message::Text(text))) => {
                self.on_message(principal, params, text.as_str(), progress)
                    .await?;
                Ok(true)
            }
            Some(Ok(Message::Close(_))) | None => Ok(false),
            Some(Err(e)) => Err(read_error(e)),
            Some(Ok(_)) => Ok(true),
        }
    }

    /// The frames of the next page after `after` and the last `user_seq` it covers.
    /// Live pages come from the projector's recent records; only a replay of
    /// older events reads the log (off the runtime, one read for the page).
    /// With `merge`, a page reads up to [`MERGE_PAGE`] events and sends at most
    /// [`PAGE`] frames, so a completed message of up to that many events is one frame.
    async fn page(
        app: &AppState<L>,
        user: &UserId,
        after: u64,
        params: &Params,
    ) -> Result<(Vec<String>, Option<u64>, bool), Close> {
        let limit = if params.merge { MERGE_PAGE } else { PAGE };
        let (entries, head) = app.projector().read(|m| {
            (
                m.delivery().read_after(user, after, limit),
                m.delivery().user_head(user),
            )
        });
        let Some(&(mut last, _)) = entries.last() else {
            return Ok((Vec::new(), None, false));
        };
        let positions: Vec<_> = entries.iter().map(|(_, p)| *p).collect();
        let records = app
            .records(positions)
            .await
            .map_err(|e| internal(e.to_string()))?;
        let mut items = Vec::with_capacity(entries.len());
        for ((seq, _), record) in entries.iter().zip(&records) {
            let event = wire::event_of(record).map_err(|e| internal(e.to_string()))?;
            if params
                .thread
                .as_ref()
                .is_some_and(|t| Some(t) != event.thread_id())
            {
                continue;
            }
            items.push((*seq, &**record, event));
        }
        let mut outs = stream::frames(&items, params.merge);
        if outs.len() > PAGE {
            outs.truncate(PAGE);
            last = outs[PAGE - 1].last;
        } else if entries.len() == limit
            && outs.len() > 1
            && outs.last().is_some_and(|o| o.open_tail)
        {
            // The page cut a message short: leave its tail to the next page, whole.
            if let Some(cut) = outs.pop() {
                last = cut.first - 1;
            }
        }
        // The page ends inside a message still being streamed: its next deltas are
        // worth rolling up (nothing else is ever held back).
        let streaming = outs.last().is_some_and(|o| o.open_tail);
        let mut frames = Vec::with_capacity(outs.len());
        for out in outs {
            frames.push(serde_json::to_string(&out.frame).map_err(|e| internal(e.to_string()))?);
        }
        metrics::histogram!("threadline_replay_lag_events")
            .record(head.saturating_sub(last) as f64);
        Ok((frames, Some(last), streaming))
    }

    /// Sends `texts`, each write within the send deadline: a peer that does not read
    /// is dropped (guarantee 2 holds for a slow reader, which takes bytes within it).
    async fn send(&mut self, texts: Vec<String>) -> Result<(), Close> {
        let n = texts.len() as u64;
        let deadline = self.send_timeout;
        for text in texts {
            match tokio::time::timeout(deadline, self.socket.feed(Message::Text(text.into()))).await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(gone("peer gone")),
                Err(_) => return Err(gone("the peer did not read within the send deadline")),
            }
        }
        match tokio::time::timeout(deadline, self.socket.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(gone("peer gone")),
            Err(_) => return Err(gone("the peer did not read within the send deadline")),
        }
        metrics::counter!("threadline_frames_sent_total").increment(n);
        Ok(())
    }

    /// Whether the frame with `seq` was delivered on this connection: not beyond what its
    /// pages covered and, with a thread filter, one of that thread's frames sent after the
    /// resume point (an ack of a withheld frame would move the cursor past an event the
    /// client never saw, and its unfiltered reconnect would skip it).
    async fn delivered(
        app: &AppState<L>,
        user: &UserId,
        params: &Params,
        progress: &Progress,
        seq: u64,
    ) -> Result<bool, Close> {
        let Some(thread) = &params.thread else {
            return Ok(seq <= progress.sent);
        };
        if seq <= progress.resumed_after || seq > progress.sent {
            return Ok(false);
        }
        let entry = app
            .projector()
            .read(|m| m.delivery().read_after(user, seq - 1, 1));
        let Some((_, position)) = entry.first().filter(|(s, _)| *s == seq) else {
            return Ok(false);
        };
        let record = app
            .records(vec![*position])
            .await
            .map_err(|e| internal(e.to_string()))?
            .pop()
            .ok_or_else(|| internal(format!("position {position} is not readable")))?;
        let event = wire::event_of(&record).map_err(|e| internal(e.to_string()))?;
        Ok(event.thread_id() == Some(thread))
    }

    async fn on_message(
        &mut self,
        principal: &mut Principal,
        params: &Params,
        text: &str,
        progress: &mut Progress,
    ) -> Result<(), Close> {
        #[derive(Deserialize)]
        struct ClientMessage {
            #[serde(rename = "type")]
            kind: String,
            user_seq: Option<u64>,
            token: Option<String>,
            run_id: Option<String>,
            reason: Option<String>,
            input_id: Option<String>,
            answer: Option<String>,
        }
        let reply_error = |code: &str, message: String| {
            json!({"type": "error", "code": code, "message": message}).to_string()
        };
        let msg: ClientMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                return self
                    .send(vec![reply_error("invalid_message", e.to_string())])
                    .await
            }
        };
        match (msg.kind.as_str(), msg.user_seq) {
            // Every earlier ack was submitted and awaited (durable) before this
            // message was read: a pong tells the client its cursor is safe.
            ("ping", _) => self.send(vec![json!({"type": "pong"}).to_string()]).await,
            ("refresh", _) => self.refresh(principal, msg.token.as_deref()).await,
            // Steering from a device: the same calls as over HTTP, answered with a
            // `recorded` message (the event itself arrives as a frame like any other).
            ("cancel" | "input", _) => {
                let run_id = msg.run_id.unwrap_or_default();
                let result = if msg.kind == "cancel" {
                    let req = wire::CancelRun { reason: msg.reason };
                    self.app.cancel_run(principal, &run_id, req).await
                } else {
                    let req = wire::ProvideInput {
                        input_id: msg.input_id.unwrap_or_default(),
                        answer: msg.answer.unwrap_or_default(),
                    };
                    self.app.provide_input(principal, &run_id, req).await
                };
                let reply = match result {
                    Ok((recorded, repeat)) => {
                        let mut reply = serde_json::to_value(recorded).unwrap_or_default();
                        reply["type"] = json!("recorded");
                        reply["repeat"] = json!(repeat);
                        reply.to_string()
                    }
                    Err(e) => reply_error(e.status_and_code().1, e.to_string()),
                };
                self.send(vec![reply]).await
            }
            ("ack", Some(seq))
                if !Self::delivered(&self.app, &principal.actor.user, params, progress, seq)
                    .await? =>
            {
                let message = if seq > progress.sent {
                    format!(
                        "user_seq {seq} was not delivered (last sent: {})",
                        progress.sent
                    )
                } else {
                    format!("user_seq {seq} was not delivered on this connection (its thread filter withheld it, or it precedes the resume point)")
                };
                self.send(vec![reply_error("invalid_ack", message)]).await
            }
            ("ack", Some(seq)) => {
                if seq > progress.acked && principal.actor.role == Role::User {
                    let command = Command::AcknowledgeDelivery {
                        user_id: principal.actor.user.clone(),
                        client_id: params.client.clone(),
                        user_seq: seq,
                    };
                    let result = self
                        .app
                        .submit(&principal.actor, &[Submission::new(command)])
                        .await;
                    if let Err(e) = result {
                        return Err(Close(close::INTERNAL, "internal", e.to_string()));
                    }
                    progress.acked = seq;
                    let head = self
                        .app
                        .projector()
                        .read(|m| m.delivery().user_head(&principal.actor.user));
                    metrics::histogram!("threadline_cursor_lag_events")
                        .record(head.saturating_sub(seq) as f64);
                }
                Ok(())
            }
            _ => {
                self.send(vec![reply_error(
                    "invalid_message",
                    "expected {\"type\":\"ack\",\"user_seq\":N}, {\"type\":\"ping\"}, {\"type\":\"refresh\",\"token\":\"<jwt>\"}, {\"type\":\"cancel\",\"run_id\":…} or {\"type\":\"input\",\"run_id\":…,\"input_id\":…,\"answer\":…}".into(),
                )])
                .await
            }
        }
    }
}

impl<L: Log> Session<L> {
    /// `refresh`: the connection's token is replaced by a new one for the same `sub` and
    /// role, whose `exp` becomes the connection's expiry. A token that does not verify (or
    /// is for another role) is an `invalid_token` error frame and the old expiry stands; a
    /// token for another `sub` ends the session with 1008.
    async fn refresh(
        &mut self,
        principal: &mut Principal,
        token: Option<&str>,
    ) -> Result<(), Close> {
        let invalid = |message: String| {
            json!({"type": "error", "code": "invalid_token", "message": message}).to_string()
        };
        let verified = match token {
            Some(t) => self.app.auth().authenticate(t).await,
            None => Err(AuthError::Missing),
        };
        let fresh = match verified {
            Ok(p) => p,
            Err(e) => {
                return self
                    .send(vec![invalid(format!("{e}; the old expiry stands"))])
                    .await
            }
        };
        if fresh.actor.user != principal.actor.user {
            return Err(Close(
                close::POLICY,
                "token_subject_changed",
                "a refresh token must be for the connection's own sub".into(),
            ));
        }
        if fresh.actor.role != principal.actor.role {
            return self
                .send(vec![invalid(
                    "a refresh token must carry the connection's role; the old expiry stands"
                        .into(),
                )])
                .await;
        }
        principal.expires_at = fresh.expires_at;
        // The connection now stands on the new token's key.
        principal.key = fresh.key;
        tracing::debug!(exp = fresh.expires_at, "token refreshed");
        self.send(vec![
            json!({"type": "refreshed", "exp": fresh.expires_at}).to_string()
        ])
        .await
    }
}

/// The `open_runs` a welcome lists (with a thread filter, that thread's only) and the
/// `user_seq` of the oldest open message's start (where `after=open` resumes before).
fn open_runs(
    streams: &Streams,
    user: &UserId,
    thread: Option<&ThreadId>,
) -> (Vec<serde_json::Value>, Option<u64>) {
    let mut oldest: Option<u64> = None;
    let mut runs = Vec::new();
    for (run_id, run) in streams
        .open_runs(user)
        .filter(|(_, r)| thread.is_none_or(|t| *t == r.thread_id))
    {
        for m in run.messages.values() {
            oldest = Some(oldest.map_or(m.from_user_seq, |o| o.min(m.from_user_seq)));
        }
        if runs.len() < MAX_WELCOME_RUNS {
            let messages: Vec<_> = run
                .messages
                .iter()
                .map(|(id, m)| json!({"message_id": id, "from_user_seq": m.from_user_seq, "user_seq": m.user_seq, "seq": m.seq}))
                .collect();
            runs.push(
                json!({"run_id": run_id, "thread_id": run.thread_id, "agent_name": run.agent_name,
                "user_seq": run.user_seq, "messages": messages}),
            );
        }
    }
    (runs, oldest)
}

/// A socket's `welcome` is the log as it was when the socket connected, not this
/// gateway's view of it: `head`, `after=latest` and the replay up to `caught_up`
/// include everything acknowledged before, through any gateway, and `after=N` may
/// name a `user_seq` another gateway delivered. On a log shared with other gateways
/// (JetStream) this one may not have folded all they appended yet: wait until it
/// has, for at most [`LOG_CATCH_UP`]. A log that cannot say its head (no quorum) or
/// a fold that does not get there within it leaves the socket on what this gateway
/// has folded, the rest following live: late, never lost or twice.
async fn caught_up_with_the_log<L: Log>(app: &AppState<L>) {
    let projector = app.projector();
    let caught_up = tokio::time::timeout(LOG_CATCH_UP, async {
        projector.wait_for(projector.committed_head().await).await
    })
    .await;
    match caught_up {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "welcoming a socket on this gateway's view: its fold stopped")
        }
        Err(_) => tracing::warn!(
            within = ?LOG_CATCH_UP,
            "welcoming a socket on this gateway's view: its fold did not reach the log's head"
        ),
    }
}

fn internal(e: String) -> Close {
    Close(close::INTERNAL, "internal", e)
}

/// How a failed read ends the session: a message over the cap closes with 1009, an
/// unfinished one past its deadline with 1008; anything else means the peer is gone.
fn read_error(e: axum::Error) -> Close {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => match *e {
            tungstenite::Error::Capacity(_) => Close(
                close::TOO_BIG,
                "message_too_big",
                format!("client messages are at most {MAX_CLIENT_MESSAGE} bytes"),
            ),
            tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => Close(
                close::POLICY,
                "message_timeout",
                "a message was left unfinished past the message deadline".into(),
            ),
            _ => gone("peer gone"),
        },
        Err(_) => gone("peer gone"),
    }
}

/// One of a user's connection slots, given back on drop.
struct Slot<L> {
    app: AppState<L>,
    user: UserId,
}

impl<L: Log> Slot<L> {
    fn take(app: &AppState<L>, user: &UserId) -> Option<Slot<L>> {
        let mut map = app.connections().lock().unwrap_or_else(|p| p.into_inner());
        let count = map.entry(user.clone()).or_default();
        if *count >= app.edge().max_connections_per_user {
            return None;
        }
        *count += 1;
        app.devices().connected(user);
        metrics::gauge!("threadline_sockets_connected").increment(1.0);
        Some(Slot {
            app: app.clone(),
            user: user.clone(),
        })
    }
}

impl<L> Drop for Slot<L> {
    fn drop(&mut self) {
        let mut map = self
            .app
            .connections_any()
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.user);
            }
        }
        drop(map);
        self.app.devices_any().disconnected(&self.user);
        metrics::gauge!("threadline_sockets_connected").decrement(1.0);
    }
}
