//! The nudge webhook: when a run completes, errors or awaits input and no device of
//! the thread's owner has acknowledged that event within `--nudge-after`, a signed
//! POST goes to `--nudge-url` (Standard Webhooks headers), retried with exponential
//! backoff, and its outcome is appended as `nudge_delivered` / `nudge_failed` (actor
//! `system`, stream `nudge:<user>`).
//!
//! What is pending comes from the log (the `nudges` projection), never from memory
//! of this process: a nudge whose outcome is not recorded is sent again after a
//! restart, so the receiver gets it **at least once** and dedups on `webhook-id`
//! (= the payload's `nudge_id` = the event id of the outcome record). The outcome
//! is recorded **at most once** per subject: its event id is derived from the
//! subject's, and the log stores an event id once.
//!
//! Runs as tokio tasks: the HTTP exchange is async (hyper's client connection, one
//! per attempt, each with a deadline), the outcome goes through the write path like
//! any command, and nothing here blocks a runtime thread or the fold.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::body::Bytes;
use sha2::{Digest, Sha256};
use threadline_engine::{Actor, Command, EventId, NudgeRecord, MAX_NUDGE_ERROR_BYTES};
use threadline_projections::{PendingNudge, Submission};
use threadline_storage::now_ms;
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::app::{AppState, Log};
use crate::config::{bail, ConfigError};
use crate::wire::timestamp;

/// Shortest signing key accepted, in bytes (a Standard Webhooks `whsec_` secret is 24).
pub const MIN_KEY_BYTES: usize = 24;
/// One attempt (connect, send, the answer's head) must finish within this.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between two attempts (the backoff doubles up to it).
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A subject older than this when its nudge comes due (the server was down, or the
/// webhook was just configured) is not sent: it is recorded `nudge_failed`
/// (`attempts` 0, `error` "stale") instead.
pub const STALE_AFTER: Duration = Duration::from_secs(3600);
/// Deliveries in flight at once; more due nudges wait for one to end.
const MAX_IN_FLIGHT: usize = 32;

/// Where and how nudges are sent. `Debug` never shows the key.
#[derive(Clone)]
pub struct NudgeConfig {
    url: String,
    authority: String,
    host: String,
    port: u16,
    path: String,
    key: Vec<u8>,
    pub after: Duration,
    pub attempts: u32,
    pub backoff: Duration,
}

impl fmt::Debug for NudgeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NudgeConfig")
            .field("url", &self.url)
            .field("key", &"<redacted>")
            .field("after", &self.after)
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl NudgeConfig {
    /// Checks the URL (`http://host[:port]/path`) and the secret (a `whsec_<base64>`
    /// Standard Webhooks secret, or any other text used as the key's bytes; at least
    /// [`MIN_KEY_BYTES`] either way).
    pub fn new(
        url: &str,
        secret: &str,
        after: Duration,
        attempts: u32,
        backoff: Duration,
    ) -> Result<NudgeConfig, ConfigError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("--nudge-url {url:?}: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!(
                "--nudge-url: https is not built in; point it at a local TLS-terminating \
                 proxy (http://127.0.0.1:…) that forwards to the receiver"
            ),
            _ => bail!("--nudge-url {url:?} must be an http:// URL"),
        }
        let Some(authority) = uri.authority() else {
            bail!("--nudge-url {url:?} has no host");
        };
        if authority.as_str().contains('@') {
            bail!("--nudge-url must not carry credentials; the signature authenticates the sender");
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let key = key_of(secret)?;
        if attempts == 0 {
            bail!("--nudge-attempts must be at least 1");
        }
        Ok(NudgeConfig {
            // Shown in log lines: without the query, which may carry a token.
            url: format!("http://{}{}", authority.as_str(), uri.path()),
            authority: authority.as_str().to_owned(),
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            key,
            after,
            attempts,
            backoff,
        })
    }

    /// The receiver's URL without its query (credentials in it are refused), for log lines.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The wait after attempt `attempt` (1-based) failed: `backoff`, doubling, at most
    /// [`MAX_BACKOFF`].
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(MAX_BACKOFF)
    }
}

/// The HMAC key a secret stands for: the base64 after `whsec_`, else the text's bytes.
fn key_of(secret: &str) -> Result<Vec<u8>, ConfigError> {
    let secret = secret.trim();
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| {
                ConfigError::Invalid(format!("the nudge secret's base64 after whsec_: {e}"))
            })?,
        None => secret.as_bytes().to_vec(),
    };
    if key.len() < MIN_KEY_BYTES {
        bail!(
            "the nudge secret must hold at least {MIN_KEY_BYTES} bytes of key (it holds {}); \
             generate one with `echo whsec_$(openssl rand -base64 32)`",
            key.len()
        );
    }
    Ok(key)
}

/// `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`
/// (Standard Webhooks).
pub fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// A nudge's id (the receiver's idempotency key and the outcome record's event id):
/// a UUID v8 of SHA-256 over the subject's event id, the same on every attempt and
/// after every restart.
pub fn nudge_id(subject_event_id: Uuid) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"threadline.nudge.v1\0");
    h.update(subject_event_id.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The JSON body sent about `p` (docs/PROTOCOL.md, "Nudges").
pub fn payload(p: &PendingNudge, id: Uuid, after: Duration) -> Vec<u8> {
    let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    let mut subject = serde_json::json!({
        "event_id": p.event_id.to_string(),
        "event": p.event,
        "position": p.position,
        "user_seq": p.user_seq,
        "recorded_at": timestamp(p.recorded_at_ms),
    });
    if let Some(input_id) = &p.input_id {
        subject["input_id"] = serde_json::json!(input_id);
    }
    serde_json::json!({
        "type": "nudge",
        "nudge_id": id.to_string(),
        "user_id": p.user_id.as_str(),
        "thread_id": p.thread_id.as_str(),
        "run_id": p.run_id.as_str(),
        "subject": subject,
        "due_at": timestamp(p.recorded_at_ms.saturating_add(after_ms)),
    })
    .to_string()
    .into_bytes()
}

/// Sends due nudges until `stop` is raised. A delivery cut short by the stop records
/// nothing: its nudge is still pending in the log and is sent again after a restart.
pub(crate) async fn run<L: Log>(
    state: AppState<L>,
    config: Arc<NudgeConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let after_ms = u64::try_from(config.after.as_millis()).unwrap_or(u64::MAX);
    let taken: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut deliveries = JoinSet::new();
    tracing::info!(url = %config.url, after = ?config.after, "nudge webhook on");
    loop {
        let now = now_ms();
        let room = MAX_IN_FLIGHT.saturating_sub(deliveries.len());
        let (due, next) = {
            let taken = taken.lock().unwrap_or_else(|p| p.into_inner());
            state
                .projector()
                .read(|m| m.nudges().due(now, after_ms, room, |p| taken.contains(&p)))
        };
        for p in due {
            taken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(p.position);
            let (state, config, taken, stop) =
                (state.clone(), config.clone(), taken.clone(), stop.clone());
            deliveries.spawn(async move {
                let position = p.position;
                deliver(&state, &config, p, stop).await;
                taken
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&position);
            });
        }
        // New subjects are due `after` from now at the earliest: sleeping that long at
        // most never misses one.
        let wait = next.map_or(after_ms, |at| at.saturating_sub(now).min(after_ms));
        let sleep = tokio::time::sleep(Duration::from_millis(wait.max(1)));
        tokio::select! {
            _ = sleep => {}
            Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    // Each delivery sees the stop and ends without recording; wait for them.
    while deliveries.join_next().await.is_some() {}
}

/// How one nudge ended, before it is recorded.
struct Outcome {
    delivered: bool,
    attempts: u32,
    status: Option<u16>,
    error: Option<String>,
}

/// Sends one nudge with its retries and records the outcome; returns early (recording
/// nothing) when the server stops.
async fn deliver<L: Log>(
    state: &AppState<L>,
    config: &NudgeConfig,
    p: PendingNudge,
    mut stop: watch::Receiver<bool>,
) {
    let id = nudge_id(p.event_id);
    let age = Duration::from_millis(now_ms().saturating_sub(p.recorded_at_ms));
    let outcome = if age > config.after + STALE_AFTER {
        Outcome {
            delivered: false,
            attempts: 0,
            status: None,
            error: Some(format!(
                "stale: the event was {}s old when its nudge came due; not sent",
                age.as_secs()
            )),
        }
    } else {
        let body = Bytes::from(payload(&p, id, config.after));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let answer = tokio::select! {
                a = attempt(config, id, body.clone()) => a,
                _ = stop.changed() => return,
            };
            let (status, error) = match answer {
                Ok(s) if (200..300).contains(&s) => {
                    metrics::counter!("threadline_nudge_attempts_total", "result" => "delivered")
                        .increment(1);
                    break Outcome {
                        delivered: true,
                        attempts,
                        status: Some(s),
                        error: None,
                    };
                }
                Ok(s) => (Some(s), format!("the receiver answered {s}")),
                Err(e) => (None, e),
            };
            metrics::counter!("threadline_nudge_attempts_total", "result" => "failed").increment(1);
            tracing::warn!(nudge_id = %id, attempts, error = %error, "nudge attempt failed");
            if attempts >= config.attempts {
                break Outcome {
                    delivered: false,
                    attempts,
                    status,
                    error: Some(error),
                };
            }
            tokio::select! {
                _ = tokio::time::sleep(config.delay_after(attempts)) => {}
                _ = stop.changed() => return,
            }
        }
    };
    record(state, &p, id, outcome, &mut stop).await;
}

/// Appends the outcome (the system's command, the nudge id as its event id). A failed
/// append is retried a few times; after that the nudge stays pending and is sent again.
async fn record<L: Log>(
    state: &AppState<L>,
    p: &PendingNudge,
    id: Uuid,
    o: Outcome,
    stop: &mut watch::Receiver<bool>,
) {
    let mut error = o.error;
    if let Some(e) = &mut error {
        if e.len() > MAX_NUDGE_ERROR_BYTES {
            let mut cut = MAX_NUDGE_ERROR_BYTES;
            while !e.is_char_boundary(cut) {
                cut -= 1;
            }
            e.truncate(cut);
        }
    }
    let command = Command::RecordNudge(NudgeRecord {
        user_id: p.user_id.clone(),
        thread_id: p.thread_id.clone(),
        run_id: p.run_id.clone(),
        subject_position: p.position,
        subject_user_seq: p.user_seq,
        subject_event: p.event.clone(),
        delivered: o.delivered,
        attempts: o.attempts,
        status: o.status,
        error,
    });
    let submission = Submission {
        command,
        event_id: Some(EventId::from_uuid(id)),
        expected_thread_version: None,
    };
    for wait in [1, 2, 4] {
        match state
            .submit(&Actor::system(), std::slice::from_ref(&submission))
            .await
        {
            Ok(outcomes) => {
                let duplicate = outcomes.iter().flatten().any(|o| o.duplicate);
                let result = if o.delivered { "delivered" } else { "failed" };
                metrics::counter!("threadline_nudges_total", "result" => result).increment(1);
                tracing::info!(nudge_id = %id, user = %p.user_id, result, attempts = o.attempts, duplicate, "nudge recorded");
                return;
            }
            Err(e) => {
                tracing::warn!(nudge_id = %id, error = %e, "recording a nudge failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// One signed POST; the receiver's status, or why there was none.
async fn attempt(config: &NudgeConfig, id: Uuid, body: Bytes) -> Result<u16, String> {
    let id = id.to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let request = hyper::Request::post(config.path.as_str())
        .header(hyper::header::HOST, config.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("threadline/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", id.as_str())
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", signature(&config.key, &id, now, &body))
        .body(Full::new(body))
        .map_err(|e| format!("building the request: {e}"))?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((config.host.as_str(), config.port))
            .await
            .map_err(|e| format!("connecting to {}: {e}", config.authority))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
        let driver = tokio::spawn(connection);
        let answer = sender
            .send_request(request)
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| format!("sending: {e}"));
        driver.abort();
        answer
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The test vector of the Standard Webhooks reference libraries: a receiver's
        // existing library verifies what we send.
        let key = key_of("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            signature(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        // Any byte of the id, the time or the body changes it.
        let base = signature(&key, "a", 1, b"{}");
        assert_ne!(base, signature(&key, "b", 1, b"{}"));
        assert_ne!(base, signature(&key, "a", 2, b"{}"));
        assert_ne!(base, signature(&key, "a", 1, b"{ }"));
    }

    #[test]
    fn secrets_are_whsec_base64_or_raw_and_long_enough() {
        assert_eq!(
            key_of("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .unwrap()
                .len(),
            24
        );
        assert_eq!(
            key_of("  a-raw-secret-of-thirty-two-bytes!\n").unwrap(),
            b"a-raw-secret-of-thirty-two-bytes!".to_vec()
        );
        assert!(key_of("short").is_err());
        assert!(key_of("whsec_c2hvcnQ=").is_err());
        assert!(key_of("whsec_not base64!").is_err());
    }

    #[test]
    fn only_plain_http_urls_without_credentials_are_taken() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let d = Duration::from_secs(1);
        let c = NudgeConfig::new("http://127.0.0.1:9000/hook?x=1", secret, d, 3, d).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 9000));
        assert_eq!(c.path, "/hook?x=1");
        assert_eq!(c.url(), "http://127.0.0.1:9000/hook");
        let c = NudgeConfig::new("http://[::1]/", secret, d, 3, d).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 80));
        for bad in [
            "https://example.com/",
            "ftp://example.com/",
            "http://user:pw@example.com/",
            "not a url",
        ] {
            assert!(NudgeConfig::new(bad, secret, d, 3, d).is_err(), "{bad}");
        }
        assert!(NudgeConfig::new("http://h/", secret, d, 0, d).is_err());
        assert!(!format!("{c:?}").contains("MfKQ"));
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let c = NudgeConfig::new(
            "http://h/",
            secret,
            Duration::from_secs(30),
            6,
            Duration::from_secs(1),
        )
        .unwrap();
        let delays: Vec<u64> = (1..=5).map(|a| c.delay_after(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16]);
        assert_eq!(c.delay_after(40), MAX_BACKOFF);
    }

    #[test]
    fn a_nudge_id_is_stable_and_the_payload_names_its_subject() {
        let subject = Uuid::now_v7();
        assert_eq!(nudge_id(subject), nudge_id(subject));
        assert_ne!(nudge_id(subject), nudge_id(Uuid::now_v7()));
        assert_ne!(nudge_id(subject), subject);
        let p = PendingNudge {
            position: 7,
            event_id: subject,
            user_id: threadline_engine::UserId::parse("alice").unwrap(),
            thread_id: threadline_engine::ThreadId::parse("thread_a").unwrap(),
            run_id: threadline_engine::RunId::parse("run_a").unwrap(),
            event: "agent_awaiting_input".into(),
            input_id: Some("q1".into()),
            user_seq: 3,
            recorded_at_ms: 1_000,
        };
        let body: serde_json::Value =
            serde_json::from_slice(&payload(&p, nudge_id(subject), Duration::from_secs(30)))
                .unwrap();
        assert_eq!(body["nudge_id"], nudge_id(subject).to_string());
        assert_eq!(body["subject"]["event_id"], subject.to_string());
        assert_eq!(body["subject"]["input_id"], "q1");
        assert_eq!(body["subject"]["user_seq"], 3);
        assert_eq!(body["due_at"], "1970-01-01T00:00:31.000Z");
    }
}
