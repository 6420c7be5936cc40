//! How a client connects: the server, the token source, where to resume, and the
//! timing of acks, reconnects and keep-alives.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

/// An error a token provider returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

/// Where the JWT comes from. A fixed token cannot be renewed: when it expires the client
/// stops. A provider is asked for a new token shortly before `exp` (sent as `refresh` on
/// the open socket) and again whenever the server refuses or expires the current one.
#[derive(Clone)]
pub enum TokenSource {
    Fixed(String),
    Provider(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

impl TokenSource {
    pub fn fixed(token: impl Into<String>) -> TokenSource {
        TokenSource::Fixed(token.into())
    }

    /// A provider: any async function returning a fresh JWT.
    pub fn provider<F, Fut, E>(f: F) -> TokenSource
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        TokenSource::Provider(Arc::new(move || {
            let fut = f();
            Box::pin(async move { fut.await.map_err(Into::into) })
        }))
    }

    pub(crate) fn is_fixed(&self) -> bool {
        matches!(self, TokenSource::Fixed(_))
    }

    pub(crate) async fn fetch(&self) -> Result<String, BoxError> {
        match self {
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::Provider(f) => f().await,
        }
    }
}

impl fmt::Debug for TokenSource {
    // Never prints a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Fixed(_) => f.write_str("TokenSource::Fixed(..)"),
            TokenSource::Provider(_) => f.write_str("TokenSource::Provider(..)"),
        }
    }
}

/// Where the first connection starts. Every later one resumes after the last
/// `user_seq` this client delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    /// After the durable cursor of this `client_id` (what it acknowledged before).
    #[default]
    Cursor,
    /// After this `user_seq` (0 replays everything).
    After(u64),
    /// After the user's head: live events only.
    Latest,
}

/// When delivered events are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// An event counts as handled once the stream has yielded it.
    OnDelivery,
    /// Only what [`crate::Handle::ack`] marks counts as handled (e.g. once it is printed).
    Manual,
    /// Never ack: the server's cursor for this client does not move.
    Off,
}

/// Acks are batched: one ack covers every event handled before it, and is sent once
/// `max_events` are waiting or `max_delay` after the first of them, whichever is sooner.
#[derive(Debug, Clone, Copy)]
pub struct Acks {
    pub mode: AckMode,
    pub max_events: u64,
    pub max_delay: Duration,
}

impl Default for Acks {
    fn default() -> Acks {
        Acks {
            mode: AckMode::OnDelivery,
            max_events: 100,
            max_delay: Duration::from_millis(250),
        }
    }
}

/// Exponential backoff with jitter between reconnects: the n-th consecutive attempt
/// waits a random time between half and all of `min(max, initial × factorⁿ)`. It starts
/// over once a connection delivers something.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: f64,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
            factor: 2.0,
        }
    }
}

impl Backoff {
    /// The wait before attempt `n` (0-based) of a run of failures.
    pub fn delay(&self, n: u32) -> Duration {
        let ceiling = self
            .initial
            .mul_f64(self.factor.max(1.0).powi(n.min(64) as i32))
            .min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(rand::thread_rng().gen::<f64>())
    }
}

/// Everything a [`crate::Client`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The server, e.g. `ws://127.0.0.1:7070` or `http://127.0.0.1:7070` (`/v1/ws` is
    /// added), or the full `ws://…/v1/ws`.
    pub url: String,
    pub token: TokenSource,
    /// The client id whose durable cursor acks move (`default` when `None`).
    pub client_id: Option<String>,
    pub resume: Resume,
    /// Only this thread's events (`user_seq` then has gaps; `thread_version` stays dense).
    pub thread_id: Option<String>,
    pub acks: Acks,
    pub backoff: Backoff,
    /// With nothing received for this long, the client pings; with no answer for as long
    /// again, it takes the connection for dead and reconnects.
    pub keepalive: Duration,
    /// How long opening a socket, up to its `welcome`, may take.
    pub connect_timeout: Duration,
    /// Updates held for a consumer that does not keep up, before the client stops
    /// reading the socket (the server then keeps the rest in its log).
    pub buffer: usize,
    /// Merged and compacted message frames (`merge=1`); see [`Config::merge`].
    pub merge: bool,
}

impl Config {
    pub fn new(url: impl Into<String>, token: TokenSource) -> Config {
        Config {
            url: url.into(),
            token,
            client_id: None,
            resume: Resume::Cursor,
            thread_id: None,
            acks: Acks::default(),
            backoff: Backoff::default(),
            keepalive: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            buffer: 256,
            merge: true,
        }
    }

    /// Whether to ask for merged and compacted message frames (`merge=1`, the default):
    /// a message's deltas arrive as one frame per rollup window, and a replay of a
    /// completed message as one frame. Off, every delta is a frame of its own.
    pub fn merge(mut self, merge: bool) -> Config {
        self.merge = merge;
        self
    }

    pub fn client_id(mut self, id: impl Into<String>) -> Config {
        self.client_id = Some(id.into());
        self
    }

    pub fn resume(mut self, resume: Resume) -> Config {
        self.resume = resume;
        self
    }

    pub fn thread_id(mut self, id: impl Into<String>) -> Config {
        self.thread_id = Some(id.into());
        self
    }

    pub fn acks(mut self, acks: Acks) -> Config {
        self.acks = acks;
        self
    }

    pub fn ack_mode(mut self, mode: AckMode) -> Config {
        self.acks.mode = mode;
        self
    }

    pub fn backoff(mut self, backoff: Backoff) -> Config {
        self.backoff = backoff;
        self
    }

    pub fn keepalive(mut self, every: Duration) -> Config {
        self.keepalive = every;
        self
    }

    /// The socket URL for a connection resuming as `after` says (`None`: the cursor).
    pub(crate) fn socket_url(&self, after: Option<&str>) -> Result<String, String> {
        let url = self.url.trim();
        if url.contains('?') || url.contains('#') {
            return Err(
                "the url takes no query: set client_id, thread_id and resume in the Config".into(),
            );
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not a ws:// or http:// URL"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => "ws",
            "wss" | "https" => {
                return Err(
                    "wss:// needs TLS, which this build of the client does not include".into(),
                )
            }
            other => return Err(format!("unsupported URL scheme {other:?}")),
        };
        let rest = rest.trim_end_matches('/');
        let path = if rest.ends_with("/v1/ws") {
            ""
        } else {
            "/v1/ws"
        };
        let mut query = Vec::new();
        if let Some(after) = after {
            query.push(format!("after={after}"));
        }
        if let Some(c) = &self.client_id {
            query.push(format!("client_id={}", encode(c)));
        }
        if let Some(t) = &self.thread_id {
            query.push(format!("thread_id={}", encode(t)));
        }
        if self.merge {
            query.push("merge=1".to_owned());
        }
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        Ok(format!("{scheme}://{rest}{path}{query}"))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_urls() {
        let c = Config::new("http://127.0.0.1:7070/", TokenSource::fixed("t"))
            .client_id("phone")
            .thread_id("thread_a b");
        assert_eq!(
            c.socket_url(Some("12")).unwrap(),
            "ws://127.0.0.1:7070/v1/ws?after=12&client_id=phone&thread_id=thread_a%20b&merge=1"
        );
        let c = Config::new("ws://h:1/v1/ws", TokenSource::fixed("t"));
        assert_eq!(c.socket_url(None).unwrap(), "ws://h:1/v1/ws?merge=1");
        assert!(Config::new("ws://h/?a=1", TokenSource::fixed("t"))
            .socket_url(None)
            .is_err());
        assert!(Config::new("h:1", TokenSource::fixed("t"))
            .socket_url(None)
            .is_err());
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_its_ceiling() {
        let b = Backoff::default();
        for n in 0..20 {
            let d = b.delay(n);
            let ceiling = (b.initial * 2u32.pow(n.min(10))).min(b.max);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {n}: {d:?}");
        }
    }
}
