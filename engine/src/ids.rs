//! Validated identifiers and roles: every id is checked once at the edge and is a newtype after.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a piece of text was refused as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason}")]
pub struct IdError {
    /// Which id was being parsed, e.g. "thread id".
    pub kind: &'static str,
    pub reason: String,
}

impl IdError {
    fn new(kind: &'static str, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }
}

const MAX_STRUCTURED_LEN: usize = 128;

/// Accepts only the two canonical textual forms; `Uuid::parse_str` alone would also take
/// braced and `urn:uuid:` forms, which would give one id several spellings.
fn parse_uuid(s: &str) -> Option<Uuid> {
    let bytes = s.as_bytes();
    let shape_ok = match bytes.len() {
        32 => bytes.iter().all(u8::is_ascii_hexdigit),
        36 => bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        }),
        _ => false,
    };
    if shape_ok {
        Uuid::parse_str(s).ok()
    } else {
        None
    }
}

/// `prefix` followed by `[A-Za-z0-9]+` segments joined by single underscores.
fn is_structured(s: &str, prefix: &str) -> bool {
    if s.len() > MAX_STRUCTURED_LEN {
        return false;
    }
    match s.strip_prefix(prefix) {
        Some(rest) => rest
            .split('_')
            .all(|seg| !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric())),
        None => false,
    }
}

/// UUID (normalized to lower-case hyphenated) or structured id with `prefix`.
fn parse_uuid_or_structured(s: &str, prefix: &str, kind: &'static str) -> Result<String, IdError> {
    if let Some(uuid) = parse_uuid(s) {
        return Ok(uuid.hyphenated().to_string());
    }
    if is_structured(s, prefix) {
        return Ok(s.to_owned());
    }
    Err(IdError::new(
        kind,
        format!("must be a UUID or {prefix}<segments> (segments of A-Z a-z 0-9 joined by '_', at most {MAX_STRUCTURED_LEN} chars)"),
    ))
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// The JWT `sub`: 1–128 chars of `A-Z a-z 0-9 . _ @ : + -`.
    UserId
);
string_id!(
    /// A UUID or `thread_<segments>`.
    ThreadId
);
string_id!(
    /// A UUID or `run_<segments>`.
    RunId
);
string_id!(
    /// A streamed message within its run: a UUID or `msg_<segments>`.
    MessageId
);
string_id!(
    /// One client's delivery cursor name: `[A-Za-z0-9._-]{1,64}`.
    ClientId
);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._@:+-".contains(c);
        if (1..=128).contains(&s.len()) && s.chars().all(allowed) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::new(
                "user id",
                "must be 1-128 chars of A-Z a-z 0-9 . _ @ : + -",
            ))
        }
    }
}

impl ThreadId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        parse_uuid_or_structured(s, "thread_", "thread id").map(Self)
    }

    /// Time-ordered (v7) so new threads sort after old ones.
    pub fn generate() -> Self {
        Self(Uuid::now_v7().hyphenated().to_string())
    }
}

impl RunId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        parse_uuid_or_structured(s, "run_", "run id").map(Self)
    }

    pub fn generate() -> Self {
        Self(Uuid::now_v7().hyphenated().to_string())
    }
}

impl MessageId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        parse_uuid_or_structured(s, "msg_", "message id").map(Self)
    }

    pub fn generate() -> Self {
        Self(Uuid::now_v7().hyphenated().to_string())
    }
}

impl ClientId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
        if (1..=64).contains(&s.len()) && s.bytes().all(allowed) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::new(
                "client id",
                "must be 1-64 chars of A-Z a-z 0-9 . _ -",
            ))
        }
    }

    /// The cursor used when a socket names no client.
    pub fn default_client() -> Self {
        Self("default".to_owned())
    }
}

impl Default for ClientId {
    fn default() -> Self {
        Self::default_client()
    }
}

/// Identifies one appended event; clients may supply it to make appends idempotent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

impl EventId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        parse_uuid(s)
            .map(Self)
            .ok_or_else(|| IdError::new("event id", "must be a UUID"))
    }

    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// What an authenticated caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Agent,
    Auditor,
    /// The server itself (TTL expiry); never granted by a token, hence absent from `parse`.
    System,
}

impl Role {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        match s {
            "user" => Ok(Self::User),
            "agent" => Ok(Self::Agent),
            "auditor" => Ok(Self::Auditor),
            _ => Err(IdError::new("role", "must be user, agent or auditor")),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Agent => "agent",
            Self::Auditor => "auditor",
            Self::System => "system",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who issued a command: the token's `sub` and role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub user: UserId,
    pub role: Role,
}

impl Actor {
    pub fn new(user: UserId, role: Role) -> Self {
        Self { user, role }
    }

    /// The server acting on its own behalf, e.g. to expire idle runs.
    pub fn system() -> Self {
        Self {
            user: UserId("system".to_owned()),
            role: Role::System,
        }
    }

    /// Reads the form a record keeps (`role:sub`, see the `Display` impl).
    pub fn parse_recorded(s: &str) -> Result<Actor, IdError> {
        let (role, sub) = s
            .split_once(':')
            .ok_or_else(|| IdError::new("actor", "must be role:sub"))?;
        let role = match role {
            "system" => Role::System,
            other => Role::parse(other)?,
        };
        Ok(Actor {
            user: UserId(sub.to_owned()),
            role,
        })
    }
}

/// The form a record keeps of who appended it: `role:sub`, e.g. `agent:planner`.
impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.user)
    }
}
