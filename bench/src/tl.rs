//! Threadline as its clients see it: HS256 JWTs, the HTTP calls an agent makes,
//! and WebSocket sessions, plus the payload both systems carry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use threadline_client::{AckMode, Client, Config, Event, Resume, TokenSource, Update};

/// Microseconds since the Unix epoch (16 digits for centuries to come).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub fn token(secret: &str, sub: &str, role: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 6 * 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "role": role, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// The event `data` both systems carry: `{"t":<send time µs>,"pad":"…"}`,
/// exactly `size` bytes of JSON (at least 31). The pad is pseudo-random
/// `[a-z0-9]` so that neither system's disk figure profits from compression.
pub fn payload(size: usize, t_us: u64) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut x = t_us ^ SEQ.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    let pad: String = (0..size.saturating_sub(31))
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize])
        })
        .collect();
    format!("{{\"t\":{t_us:016},\"pad\":\"{pad}\"}}")
}

/// The send time embedded in a frame or an entry by [`payload`], found without
/// a full JSON parse (the client shares the machine's two cores with the servers).
pub fn embedded_t(text: &str) -> Option<u64> {
    // Map keys may come back sorted (`pad` first), so look for the key anywhere.
    let at = text.find("\"t\":")? + 4;
    text.get(at..at + 16)?.parse().ok()
}

/// Requests [`Http::post_retrying`] sent again after a `503`, over the whole run.
pub static RETRIED_503: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// An HTTP client for one server; one pool shared by all tasks.
#[derive(Debug, Clone)]
pub struct Http {
    pub base: String,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new(base: String) -> Result<Http> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(4096)
            .build()?;
        Ok(Http { base, client })
    }

    /// POSTs a JSON body (already serialized); fails unless the status is `want`.
    pub async fn post(&self, token: &str, path: &str, body: String, want: u16) -> Result<Value> {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        if status != want {
            bail!(
                "POST {path}: {status} {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            );
        }
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// [`Http::post`], but a `503` is retried after 5–20 ms, as a client told "retry
    /// shortly" would, up to 100 times; each retry is counted in [`RETRIED_503`]. Over
    /// JetStream a gateway answers `503` when the write path lost the race for a thread
    /// under every attempt (`overloaded`) or its append lost the race for the stream's
    /// head too often (`storage_unavailable`, "did not land"); both mean not appended.
    /// The request's body (and so its send time) stays the same, so a latency measured
    /// from that time includes the retries. The requests carry no event ids: a `503` for
    /// an append that had landed after all would be appended twice, which scenario 9
    /// notices only if a socket reads the extra event before it stops.
    pub async fn post_retrying(
        &self,
        token: &str,
        path: &str,
        body: String,
        want: u16,
    ) -> Result<Value> {
        for _ in 0..100 {
            let resp = self
                .client
                .post(format!("{}{path}", self.base))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .with_context(|| format!("POST {path}"))?;
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await?;
            if status == want {
                return Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
            }
            if status != 503 {
                bail!(
                    "POST {path}: {status} {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                );
            }
            RETRIED_503.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(fastrand::u64(5..=20))).await;
        }
        bail!("POST {path}: 503 on 100 attempts in a row")
    }

    /// For each user, has `agent` create a thread, register a run and start it
    /// (three events of that user); returns the run ids in order.
    pub async fn started_runs(&self, agent: &str, users: &[String]) -> Result<Vec<String>> {
        let runs = stream::iter(users.iter().cloned())
            .map(|user| async move {
                let t = self
                    .post(
                        agent,
                        "/v1/threads",
                        json!({"user_id": user}).to_string(),
                        201,
                    )
                    .await?;
                let thread = t["thread_id"].as_str().context("thread_id")?.to_owned();
                let r = self
                    .post(
                        agent,
                        &format!("/v1/threads/{thread}/runs"),
                        json!({"agent_name": "bench"}).to_string(),
                        201,
                    )
                    .await?;
                let run = r["run_id"].as_str().context("run_id")?.to_owned();
                self.post(
                    agent,
                    &format!("/v1/runs/{run}/events"),
                    r#"{"type":"agent_started","data":{}}"#.into(),
                    201,
                )
                .await?;
                anyhow::Ok(run)
            })
            .buffered(32)
            .collect::<Vec<_>>()
            .await;
        runs.into_iter().collect()
    }
}

/// Bytes of `data` counted as logical payload for the three setup events of a run.
pub const SETUP_DATA_BYTES: u64 = 2;

/// One single agent event body.
pub fn single_body(data: &str) -> String {
    format!(r#"{{"type":"agent_thinking","data":{data}}}"#)
}

/// A `POST /v1/events` body: one `agent_thinking` per `(run, data)`.
pub fn batch_body<'a>(events: impl Iterator<Item = (&'a str, String)>) -> String {
    let mut body = String::from(r#"{"events":["#);
    for (i, (run, data)) in events.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            r#"{{"run_id":"{run}","type":"agent_thinking","data":{data}}}"#
        ));
    }
    body.push_str("]}");
    body
}

/// Opens a socket with the project's client (`threadline-client`): acks off (the
/// figures are the server's delivery, not cursor writes). It would reconnect as a chat
/// client does, but a run that needs to has already failed to measure what it meant.
pub fn connect(addr: std::net::SocketAddr, token: &str, resume: Resume) -> Client {
    connect_merging(addr, token, resume, true)
}

/// [`connect`], asking for merged message frames (`merge=1`, rolled up live) or not.
pub fn connect_merging(
    addr: std::net::SocketAddr,
    token: &str,
    resume: Resume,
    merge: bool,
) -> Client {
    let mut config = Config::new(format!("ws://{addr}"), TokenSource::fixed(token))
        .resume(resume)
        .ack_mode(AckMode::Off)
        .merge(merge);
    config.connect_timeout = Duration::from_secs(60);
    Client::connect(config)
}

/// Reads a client until its `caught_up`; returns the events before it. A reported
/// error (a reconnect, a gap) fails: the run would not measure what it says.
pub async fn wait_caught_up(client: &mut Client) -> Result<u64> {
    let mut events = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(300), client.next()).await {
            Err(_) => bail!("no caught_up within 300 s"),
            Ok(Some(Update::Event(_))) => events += 1,
            Ok(Some(Update::CaughtUp { .. })) => return Ok(events),
            Ok(Some(Update::Error(e))) => bail!("socket: {e}"),
            Ok(Some(Update::State(_))) => {}
            Ok(None) => bail!("socket ended before caught_up"),
        }
    }
}

/// Reads a client opened at `Latest` until its `caught_up`; returns the `user_seq` it
/// caught up at and the events read before it. On a gateway whose fold is still taking
/// in the user's first events (appended through another gateway) the head can move
/// during the hand-over, and those events come before `caught_up`. Errors fail.
pub async fn caught_up_seq(client: &mut Client) -> Result<(u64, Vec<Event>)> {
    let mut early = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(300), client.next()).await {
            Err(_) => bail!("no caught_up within 300 s"),
            Ok(Some(Update::CaughtUp { user_seq })) => return Ok((user_seq, early)),
            Ok(Some(Update::Event(e))) => early.push(e),
            Ok(Some(Update::Error(e))) => bail!("socket: {e}"),
            Ok(Some(Update::State(_))) => {}
            Ok(None) => bail!("socket ended before caught_up"),
        }
    }
}

/// The send time [`payload`] embedded in an event's `data`.
pub fn event_t(e: &Event) -> Option<u64> {
    e.payload.agent_data()?.get("t")?.as_u64()
}
