//! JWT authentication: turns a bearer token into an engine [`Actor`] with a static key or an identity provider's key set (each key with its one algorithm), reloads them on SIGHUP, and mints tokens for `threadline token`.

pub mod jwks;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use threadline_engine::{Actor, Role, UserId};
use tokio::sync::watch;

use crate::config::{self, bail, ConfigError, Context, KeyArgs, MAX_JWT_LEEWAY};

/// Longer tokens are refused before any parsing; real ones are a few hundred bytes.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The claims Threadline reads and writes. Unknown claims in incoming tokens are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// What verification reads back. `iss`/`aud` are left to jsonwebtoken (which also accepts an
/// array `aud`), and `sub`/`exp` are optional here so their absence is reported as `Invalid`
/// rather than as a JSON error.
#[derive(Deserialize)]
struct IncomingClaims {
    sub: Option<String>,
    role: Option<String>,
    exp: Option<u64>,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub actor: Actor,
    /// The token's `exp`, unix seconds (leeway not included).
    pub expires_at: u64,
    /// The key that verified the token.
    pub key: KeyTag,
}

/// Why a token was refused. Every variant is a 401; none carries the token.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    /// Bad signature, wrong algorithm, wrong `iss`/`aud`, missing `exp`, bad `sub` or `role`.
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    /// The token's `kid` names no key in the key set (even after fetching it again).
    #[error("invalid token: no key with its kid")]
    UnknownKey,
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        let reason = match e.kind() {
            ErrorKind::ExpiredSignature => return Self::Expired,
            ErrorKind::ImmatureSignature => return Self::NotYetValid,
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => return Self::Malformed,
            ErrorKind::InvalidSignature => "bad signature".to_owned(),
            ErrorKind::InvalidAlgorithm => "algorithm not accepted".to_owned(),
            ErrorKind::InvalidIssuer => "wrong issuer".to_owned(),
            ErrorKind::InvalidAudience => "wrong audience".to_owned(),
            ErrorKind::MissingRequiredClaim(c) => format!("missing {c} claim"),
            ErrorKind::InvalidClaimFormat(c) => format!("bad {c} claim"),
            _ => "rejected".to_owned(),
        };
        Self::Invalid(reason)
    }
}

/// Where the verification key came from; `serve` uses it to tell the operator what is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `--jwt-secret` or a secret handed to [`Authenticator::hs256`].
    Secret,
    /// A PEM public key handed to [`Authenticator::from_public_key_pem`].
    PublicKeyPem,
    /// `--jwt-public-key`.
    PublicKeyFile(PathBuf),
    /// `<data>/jwt.secret`; `created` when this start generated it.
    DataDirSecret { path: PathBuf, created: bool },
    /// `--jwks-url`: the identity provider's key set.
    Jwks(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret => f.write_str("configured secret"),
            Self::PublicKeyPem => f.write_str("public key"),
            Self::PublicKeyFile(p) => write!(f, "public key {}", p.display()),
            Self::DataDirSecret {
                path,
                created: true,
            } => {
                write!(f, "newly generated secret {}", path.display())
            }
            Self::DataDirSecret {
                path,
                created: false,
            } => write!(f, "secret {}", path.display()),
            Self::Jwks(url) => write!(f, "key set {url}"),
        }
    }
}

/// Which key verified a token: a digest of the key's material, algorithm and `kid`. A
/// socket keeps the tag of the key that verified its token, and stays open only while a
/// key with that tag is trusted (see [`Authenticator::trusts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyTag(u64);

impl KeyTag {
    fn of(alg: Algorithm, kid: Option<&str>, material: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!("{alg:?}").as_bytes());
        h.update([0]);
        h.update(kid.unwrap_or_default().as_bytes());
        h.update([0]);
        h.update(material);
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Self(u64::from_be_bytes(first))
    }
}

/// One verification key and the one algorithm it is used with: a token whose header
/// names another algorithm is refused, whatever its signature.
struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    /// `Validation` with `algorithms = [alg]`, the rest as configured.
    validation: Validation,
    tag: KeyTag,
}

impl VerifyKey {
    fn new(
        alg: Algorithm,
        kid: Option<String>,
        key: DecodingKey,
        material: &[u8],
        base: &Validation,
    ) -> Self {
        let mut validation = base.clone();
        validation.algorithms = vec![alg];
        let tag = KeyTag::of(alg, kid.as_deref(), material);
        Self {
            kid,
            alg,
            key,
            validation,
            tag,
        }
    }
}

/// The keys in force. A static key verifies every token (its `kid`, if any, is not
/// read); a key set's keys are chosen by the token's `kid`.
struct KeyRing {
    by_kid: bool,
    keys: Vec<VerifyKey>,
    /// The set's keys that were left out, as `kid: why` (logged when first seen).
    ignored: Vec<String>,
    source: KeySource,
}

impl KeyRing {
    fn fixed(key: VerifyKey, source: KeySource) -> Self {
        Self {
            by_kid: false,
            keys: vec![key],
            ignored: Vec::new(),
            source,
        }
    }

    fn tags(&self) -> Vec<KeyTag> {
        let mut tags: Vec<_> = self.keys.iter().map(|k| k.tag).collect();
        tags.sort_unstable_by_key(|t| t.0);
        tags
    }
}

/// What SIGHUP ([`Authenticator::reload`]) reads again.
enum Reload {
    /// A key handed over in code: nothing to read again.
    Fixed,
    /// `--jwt-secret(-file)`, `--jwt-public-key` or `<data>/jwt.secret`, read again.
    Static { keys: KeyArgs, data_dir: PathBuf },
    /// `--jwks-url`, fetched again.
    Jwks(jwks::Provider),
}

/// Verifies bearer tokens. Cheap to clone; every clone sees a reload or a refreshed key set.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<AuthInner>,
}

struct AuthInner {
    ring: RwLock<Arc<KeyRing>>,
    /// Bumped whenever the trusted keys change, so open sockets re-check theirs.
    changes: watch::Sender<u64>,
    /// The checks every key shares (`exp`, `nbf`, leeway, `iss`/`aud`); each key adds its algorithm.
    base: Validation,
    leeway_secs: u64,
    issuer: Option<String>,
    audience: Option<String>,
    reload: Reload,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        let ring = self.ring();
        let algs: Vec<_> = ring.keys.iter().map(|k| (k.kid.clone(), k.alg)).collect();
        f.debug_struct("Authenticator")
            .field("keys", &algs)
            .field("issuer", &i.issuer)
            .field("audience", &i.audience)
            .field("leeway_secs", &i.leeway_secs)
            .field("source", &ring.source)
            .finish_non_exhaustive()
    }
}

/// `exp` (required), `nbf`, the leeway and `iss`/`aud` when configured; no algorithm yet.
fn base_validation(leeway_secs: u64, issuer: Option<&str>, audience: Option<&str>) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = Vec::new();
    validation.leeway = leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    // jsonwebtoken checks iss/aud only when the token carries them, so a configured one
    // must also be required.
    let mut required = vec!["exp"];
    if let Some(iss) = issuer {
        validation.set_issuer(&[iss]);
        required.push("iss");
    }
    match audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            validation.validate_aud = true;
            required.push("aud");
        }
        // Otherwise jsonwebtoken would reject every token that names an audience.
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// The static key `keys` configure (not `--jwks-url`), read from wherever it lives.
fn static_key(
    keys: &KeyArgs,
    data_dir: &Path,
    create_secret: bool,
    base: &Validation,
) -> Result<(VerifyKey, KeySource), ConfigError> {
    let secret = keys.secret()?;
    let hs256 = |secret: &[u8]| {
        VerifyKey::new(
            Algorithm::HS256,
            None,
            DecodingKey::from_secret(secret),
            secret,
            base,
        )
    };
    match (&secret, &keys.jwt_public_key) {
        (Some(_), Some(_)) => {
            bail!("configure exactly one of --jwt-secret and --jwt-public-key")
        }
        (Some(secret), None) => {
            check_secret_only(keys)?;
            Ok((hs256(secret.as_bytes()), KeySource::Secret))
        }
        (None, Some(path)) => {
            let alg = pem_alg(keys, "--jwt-public-key")?;
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read --jwt-public-key {}", path.display()))?;
            let key = pem_key(alg, &pem, base)
                .with_context(|| format!("--jwt-public-key {}", path.display()))?;
            Ok((key, KeySource::PublicKeyFile(path.clone())))
        }
        (None, None) => {
            if keys.jwt_private_key.is_some() {
                bail!(
                    "--jwt-private-key only signs tokens (threadline token); \
                     the server verifies them with --jwt-public-key"
                );
            }
            if let Some(alg) = keys.jwt_alg {
                bail!("--jwt-alg {alg} needs --jwt-public-key");
            }
            let path = config::secret_file(data_dir);
            let (secret, created) = if create_secret {
                config::load_or_create_secret(data_dir)?
            } else {
                let secret = config::load_secret(data_dir)?.with_context(|| {
                    format!(
                        "no key configured and no jwt.secret in {}",
                        data_dir.display()
                    )
                })?;
                (secret, false)
            };
            Ok((
                hs256(secret.as_bytes()),
                KeySource::DataDirSecret { path, created },
            ))
        }
    }
}

/// An RS256 or ES256 PEM public key, checked now.
fn pem_key(alg: Algorithm, pem: &[u8], base: &Validation) -> Result<VerifyKey, ConfigError> {
    let key = match alg {
        Algorithm::RS256 => DecodingKey::from_rsa_pem(pem).context("not an RSA public key PEM")?,
        Algorithm::ES256 => DecodingKey::from_ec_pem(pem).context("not an EC public key PEM")?,
        other => bail!("public keys are used with RS256 or ES256, not {other:?}"),
    };
    // The crypto backend only parses the key when a token arrives; probe it now so a
    // wrong key fails at start-up instead of turning every request into a 401.
    jsonwebtoken::crypto::verify("", b"probe", &key, alg)
        .with_context(|| format!("the public key cannot verify {alg:?}"))?;
    Ok(VerifyKey::new(alg, None, key, pem, base))
}

impl Authenticator {
    /// HS256 with a shared secret. `leeway_secs` is capped at 60.
    pub fn hs256(
        secret: &[u8],
        issuer: Option<String>,
        audience: Option<String>,
        leeway_secs: u64,
    ) -> Self {
        Self::build(issuer, audience, leeway_secs, Reload::Fixed, |base| {
            Ok(KeyRing::fixed(
                VerifyKey::new(
                    Algorithm::HS256,
                    None,
                    DecodingKey::from_secret(secret),
                    secret,
                    base,
                ),
                KeySource::Secret,
            ))
        })
        .expect("an HS256 key is always usable")
    }

    /// RS256 or ES256 with a PEM public key. `leeway_secs` is capped at 60.
    pub fn from_public_key_pem(
        alg: Algorithm,
        pem: &[u8],
        issuer: Option<String>,
        audience: Option<String>,
        leeway_secs: u64,
    ) -> Result<Self, ConfigError> {
        Self::build(issuer, audience, leeway_secs, Reload::Fixed, |base| {
            Ok(KeyRing::fixed(
                pem_key(alg, pem, base)?,
                KeySource::PublicKeyPem,
            ))
        })
    }

    /// The configured static key: `--jwt-secret(-file)` (HS256), `--jwt-public-key` with
    /// `--jwt-alg`, or else `<data>/jwt.secret`, generated when `create_secret` and absent.
    /// [`Authenticator::reload`] reads it again from the same place. `--jwks-url` is
    /// [`Authenticator::with_jwks`]'s.
    pub fn from_config(
        keys: &KeyArgs,
        data_dir: &Path,
        create_secret: bool,
    ) -> Result<Self, ConfigError> {
        if let Some(url) = &keys.jwks_url {
            bail!("--jwks-url {url} is fetched by Authenticator::with_jwks");
        }
        let reload = Reload::Static {
            keys: keys.clone(),
            data_dir: data_dir.to_owned(),
        };
        let leeway = leeway_secs(keys)?;
        Self::build(
            keys.jwt_issuer.clone(),
            keys.jwt_audience.clone(),
            leeway,
            reload,
            |base| {
                let (key, source) = static_key(keys, data_dir, create_secret, base)?;
                Ok(KeyRing::fixed(key, source))
            },
        )
    }

    fn build(
        issuer: Option<String>,
        audience: Option<String>,
        leeway_secs: u64,
        reload: Reload,
        ring: impl FnOnce(&Validation) -> Result<KeyRing, ConfigError>,
    ) -> Result<Self, ConfigError> {
        let leeway_secs = leeway_secs.min(MAX_JWT_LEEWAY.as_secs());
        let base = base_validation(leeway_secs, issuer.as_deref(), audience.as_deref());
        let ring = ring(&base)?;
        Ok(Self {
            inner: Arc::new(AuthInner {
                ring: RwLock::new(Arc::new(ring)),
                changes: watch::Sender::new(0),
                base,
                leeway_secs,
                issuer,
                audience,
                reload,
            }),
        })
    }

    fn ring(&self) -> Arc<KeyRing> {
        self.inner
            .ring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `ring` in force; when its keys differ from the ones it replaces, sockets are
    /// told to re-check theirs. Returns whether they differed.
    fn install(&self, ring: KeyRing) -> bool {
        let new_tags = ring.tags();
        let old = std::mem::replace(
            &mut *self.inner.ring.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(ring),
        );
        let changed = old.tags() != new_tags;
        if changed {
            self.inner.changes.send_modify(|g| *g += 1);
        }
        changed
    }

    /// Checks signature, algorithm, `exp` (required), `nbf`, `iss`/`aud` when configured,
    /// then `sub` and `role` (absent = user; `system` is never granted by a token). With a
    /// key set, the key is the one named by the token's `kid`, and the token's `alg` must
    /// be that key's. Uses the keys in hand only; [`Authenticator::authenticate`] also
    /// fetches the set again for an unknown `kid`.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let ring = self.ring();
        let key = if ring.by_kid {
            let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
            let kid = header
                .kid
                .ok_or_else(|| AuthError::Invalid("the token has no kid".to_owned()))?;
            ring.keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or(AuthError::UnknownKey)?
        } else {
            ring.keys.first().ok_or(AuthError::UnknownKey)?
        };
        let claims =
            jsonwebtoken::decode::<IncomingClaims>(token, &key.key, &key.validation)?.claims;
        let sub = claims
            .sub
            .ok_or_else(|| AuthError::Invalid("missing sub claim".to_owned()))?;
        let user = UserId::parse(&sub).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let role = match claims.role.as_deref() {
            None => Role::User,
            Some(r) => Role::parse(r).map_err(|e| AuthError::Invalid(e.to_string()))?,
        };
        let expires_at = claims
            .exp
            .ok_or_else(|| AuthError::Invalid("missing exp claim".to_owned()))?;
        Ok(Principal {
            actor: Actor::new(user, role),
            expires_at,
            key: key.tag,
        })
    }

    /// [`Authenticator::verify`], and with a key set, a token whose `kid` is unknown
    /// fetches the set again (at most once per `--jwks-min-refresh-interval`; a fetch
    /// already under way is waited for) and is checked once more.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        match self.verify(token) {
            Err(AuthError::UnknownKey) => {
                if let Reload::Jwks(provider) = &self.inner.reload {
                    self.refresh_for_unknown_kid(provider).await;
                }
                self.verify(token)
            }
            other => other,
        }
    }

    /// Whether the key that verified `principal`'s token is still trusted: false once the
    /// provider dropped it from its set, or a reload replaced the static key.
    pub fn trusts(&self, principal: &Principal) -> bool {
        self.ring().keys.iter().any(|k| k.tag == principal.key)
    }

    /// Changes whenever the trusted keys change (a refreshed set, a reload).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Reads the key configuration again (SIGHUP): the static key from its file (or
    /// secret), or the key set from its URL. On failure the keys in force stay, and the
    /// error says why. Returns what is now in force, for the log.
    pub async fn reload(&self) -> Result<String, ConfigError> {
        let result = match &self.inner.reload {
            Reload::Fixed => Ok(format!(
                "{} (given at start; nothing to read again)",
                self.describe()
            )),
            Reload::Static { keys, data_dir } => {
                let (keys, data_dir) = (keys.clone(), data_dir.clone());
                let base = self.inner.base.clone();
                let read =
                    tokio::task::spawn_blocking(move || static_key(&keys, &data_dir, false, &base))
                        .await
                        .map_err(|e| {
                            ConfigError::Invalid(format!("reading the key failed: {e}"))
                        })?;
                read.map(|(key, source)| {
                    let changed = self.install(KeyRing::fixed(key, source));
                    let what = if changed { "a new key" } else { "the same key" };
                    format!("{what}: {}", self.describe())
                })
            }
            Reload::Jwks(provider) => self
                .refresh(provider, jwks::Trigger::Reload)
                .await
                .map(|_| self.describe())
                .map_err(|e| {
                    ConfigError::Invalid(format!(
                        "fetching the key set {} failed ({e}); the cached keys stay in force",
                        provider.url()
                    ))
                }),
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("threadline_key_reloads_total", "result" => label).increment(1);
        result
    }

    /// What verifies tokens now, for the operator: the source and each key's algorithm.
    pub fn describe(&self) -> String {
        let ring = self.ring();
        let keys: Vec<String> = ring
            .keys
            .iter()
            .map(|k| match &k.kid {
                Some(kid) => format!("{kid} ({:?})", k.alg),
                None => format!("{:?}", k.alg),
            })
            .collect();
        format!("{} with {}", ring.source, keys.join(", "))
    }

    /// Seconds of clock skew tolerated on `exp` and `nbf` (0–60).
    pub fn leeway_secs(&self) -> u64 {
        self.inner.leeway_secs
    }

    /// The one algorithm accepted with a static key; `None` with a key set (each of its
    /// keys has its own).
    pub fn algorithm(&self) -> Option<Algorithm> {
        let ring = self.ring();
        (!ring.by_kid).then(|| ring.keys.first().map(|k| k.alg))?
    }

    /// Where the keys in force came from.
    pub fn source(&self) -> KeySource {
        self.ring().source.clone()
    }
}

/// Mints tokens with the configured key (for `threadline token` and tests).
#[derive(Clone)]
pub struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    issuer: Option<String>,
    audience: Option<String>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("alg", &self.alg)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// `--jwt-secret`, `--jwt-private-key` with `--jwt-alg`, or the existing `<data>/jwt.secret`.
    /// Never creates anything.
    pub fn from_config(keys: &KeyArgs, data_dir: &Path) -> Result<Self, ConfigError> {
        let secret = keys.secret()?;
        let (alg, key) = match (&secret, &keys.jwt_private_key) {
            (Some(_), Some(_)) => {
                bail!("configure exactly one of --jwt-secret and --jwt-private-key")
            }
            (Some(secret), None) => {
                check_secret_only(keys)?;
                (
                    Algorithm::HS256,
                    EncodingKey::from_secret(secret.as_bytes()),
                )
            }
            (None, Some(path)) => {
                let alg = pem_alg(keys, "--jwt-private-key")?;
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read --jwt-private-key {}", path.display()))?;
                let key = match alg {
                    Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
                    _ => EncodingKey::from_ec_pem(&pem),
                }
                .with_context(|| {
                    format!(
                        "--jwt-private-key {} is not a {alg:?} private key PEM",
                        path.display()
                    )
                })?;
                // Parsing is deferred to the first signature; fail here instead.
                jsonwebtoken::crypto::sign(b"probe", &key, alg).with_context(|| {
                    format!("--jwt-private-key {} cannot sign {alg:?}", path.display())
                })?;
                (alg, key)
            }
            (None, None) => {
                if let Some(url) = &keys.jwks_url {
                    bail!(
                        "with --jwks-url {url}, tokens come from the identity provider; \
                         threadline token mints only with --jwt-secret or --jwt-private-key"
                    );
                }
                if keys.jwt_public_key.is_some() {
                    bail!("--jwt-public-key only verifies; minting tokens needs --jwt-private-key");
                }
                if let Some(alg) = keys.jwt_alg {
                    bail!("--jwt-alg {alg} needs --jwt-private-key");
                }
                let secret = config::load_secret(data_dir)?.with_context(|| {
                    format!(
                        "no key configured and no jwt.secret in {}; start `threadline serve` \
                         once to generate it, or pass --jwt-secret",
                        data_dir.display()
                    )
                })?;
                (
                    Algorithm::HS256,
                    EncodingKey::from_secret(secret.as_bytes()),
                )
            }
        };
        Ok(Self {
            alg,
            key,
            issuer: keys.jwt_issuer.clone(),
            audience: keys.jwt_audience.clone(),
        })
    }

    /// A token for `sub` with `role`, `iat` = now, `exp` = now + `ttl` (at least 1 s), and
    /// `iss`/`aud` when configured. No `nbf`: a verifier whose clock lags must still accept it.
    pub fn mint(&self, sub: &str, role: Role, ttl: Duration) -> Result<String, ConfigError> {
        UserId::parse(sub)?;
        if role == Role::System {
            bail!("the system role is never granted by a token");
        }
        if ttl.as_secs() == 0 {
            bail!("token lifetime must be at least 1s");
        }
        let now = now_secs();
        let exp = now
            .checked_add(ttl.as_secs())
            .context("token lifetime too long")?;
        self.sign(&Claims {
            sub: sub.to_owned(),
            role: Some(role.as_str().to_owned()),
            exp,
            nbf: None,
            iat: Some(now),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        })
    }

    /// Signs `claims` exactly as given (tests use it for expired or odd tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String, ConfigError> {
        Ok(jsonwebtoken::encode(
            &Header::new(self.alg),
            claims,
            &self.key,
        )?)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn leeway_secs(keys: &KeyArgs) -> Result<u64, ConfigError> {
    if keys.jwt_leeway > MAX_JWT_LEEWAY {
        bail!("--jwt-leeway must be at most 60s");
    }
    Ok(keys.jwt_leeway.as_secs())
}

fn check_secret_only(keys: &KeyArgs) -> Result<(), ConfigError> {
    if let Some(alg) = keys.jwt_alg {
        bail!("--jwt-secret is HS256; --jwt-alg {alg} applies only to PEM keys");
    }
    Ok(())
}

fn pem_alg(keys: &KeyArgs, flag: &str) -> Result<Algorithm, ConfigError> {
    keys.jwt_alg
        .map(config::JwtAlg::algorithm)
        .with_context(|| format!("{flag} needs --jwt-alg RS256 or ES256"))
}

/// The token in an `Authorization` value: `Bearer <token>`, scheme case-insensitive.
pub fn bearer_token(header_value: &str) -> Option<&str> {
    let (scheme, rest) = header_value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return None;
    }
    Some(token)
}

/// Unix seconds now (0 if the clock is before 1970).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Test-only P-256 key pair (openssl ecparam -name prime256v1 | openssl pkcs8 -topk8 -nocrypt).
    const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgmNLngTXiIHWmP4zx
NMdSx6TmCwTk/Oum5PeEOWLX98qhRANCAAS7yGbe9tx4+N0gIdy//+NgU0uXqyvC
GTvUpPL8oD7qf68rTGVNAUejBh/Z7Qa3lgEx8rUCDTQtqC5pmcO06VkX
-----END PRIVATE KEY-----
";
    const EC_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEu8hm3vbcePjdICHcv//jYFNLl6sr
whk71KTy/KA+6n+vK0xlTQFHowYf2e0Gt5YBMfK1Ag00LaguaZnDtOlZFw==
-----END PUBLIC KEY-----
";
    const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir().join(format!("threadline-auth-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn secret_keys() -> KeyArgs {
        KeyArgs {
            jwt_secret: Some(SECRET.to_owned()),
            ..KeyArgs::default()
        }
    }

    fn hs_auth() -> Authenticator {
        Authenticator::hs256(SECRET.as_bytes(), None, None, 0)
    }

    /// HS256-signs arbitrary JSON claims with `secret`.
    fn hs_token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn in_secs(delta: i64) -> u64 {
        now_secs().checked_add_signed(delta).unwrap()
    }

    fn invalid(r: Result<Principal, AuthError>) -> bool {
        matches!(r, Err(AuthError::Invalid(_)))
    }

    #[test]
    fn minted_token_verifies_to_its_user_and_role() {
        let dir = TempDir::new();
        let signer = Signer::from_config(&secret_keys(), &dir.0).unwrap();
        let auth = Authenticator::from_config(&secret_keys(), &dir.0, false).unwrap();
        let token = signer
            .mint("alice", Role::Agent, Duration::from_secs(3600))
            .unwrap();
        let p = auth.verify(&token).unwrap();
        assert_eq!(p.actor.user.as_str(), "alice");
        assert_eq!(p.actor.role, Role::Agent);
        assert!(p.expires_at.abs_diff(in_secs(3600)) <= 2);
        assert_eq!(auth.source(), KeySource::Secret);
        assert!(!config::secret_file(&dir.0).exists());
    }

    #[test]
    fn minted_token_has_no_nbf() {
        let signer = Signer::from_config(&secret_keys(), Path::new("/nonexistent")).unwrap();
        let token = signer
            .mint("bob", Role::User, Duration::from_secs(60))
            .unwrap();
        let claims = jsonwebtoken::dangerous::insecure_decode::<Claims>(&token)
            .unwrap()
            .claims;
        assert_eq!(claims.nbf, None);
        assert!(claims.iat.is_some());
        assert_eq!(claims.role.as_deref(), Some("user"));
    }

    #[test]
    fn missing_role_means_user() {
        let t = hs_token(SECRET, json!({"sub": "bob", "exp": in_secs(60)}));
        assert_eq!(hs_auth().verify(&t).unwrap().actor.role, Role::User);
    }

    #[test]
    fn system_and_unknown_roles_are_invalid() {
        for role in ["system", "admin", "User", ""] {
            let t = hs_token(
                SECRET,
                json!({"sub": "bob", "role": role, "exp": in_secs(60)}),
            );
            assert!(invalid(hs_auth().verify(&t)), "role {role:?}");
        }
        let t = hs_token(SECRET, json!({"sub": "bob", "role": 3, "exp": in_secs(60)}));
        assert!(hs_auth().verify(&t).is_err());
        let signer = Signer::from_config(&secret_keys(), Path::new("/nonexistent")).unwrap();
        assert!(signer
            .mint("bob", Role::System, Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn expired_and_not_yet_valid() {
        let t = hs_token(SECRET, json!({"sub": "bob", "exp": in_secs(-5)}));
        assert_eq!(hs_auth().verify(&t), Err(AuthError::Expired));
        let t = hs_token(
            SECRET,
            json!({"sub": "bob", "exp": in_secs(600), "nbf": in_secs(60)}),
        );
        assert_eq!(hs_auth().verify(&t), Err(AuthError::NotYetValid));
        let t = hs_token(
            SECRET,
            json!({"sub": "bob", "exp": in_secs(600), "nbf": in_secs(-60)}),
        );
        assert!(hs_auth().verify(&t).is_ok());
    }

    #[test]
    fn leeway_is_honoured_and_zero_by_default() {
        let expired = hs_token(SECRET, json!({"sub": "bob", "exp": in_secs(-10)}));
        let early = hs_token(
            SECRET,
            json!({"sub": "bob", "exp": in_secs(600), "nbf": in_secs(10)}),
        );
        let lenient = Authenticator::hs256(SECRET.as_bytes(), None, None, 30);
        assert_eq!(lenient.leeway_secs(), 30);
        assert!(lenient.verify(&expired).is_ok());
        assert!(lenient.verify(&early).is_ok());
        assert_eq!(hs_auth().verify(&expired), Err(AuthError::Expired));
        assert_eq!(hs_auth().verify(&early), Err(AuthError::NotYetValid));

        let dir = TempDir::new();
        let keys = KeyArgs {
            jwt_leeway: Duration::from_secs(30),
            ..secret_keys()
        };
        let auth = Authenticator::from_config(&keys, &dir.0, false).unwrap();
        assert_eq!(auth.leeway_secs(), 30);
        assert!(auth.verify(&expired).is_ok());
        assert_eq!(
            Authenticator::from_config(&secret_keys(), &dir.0, false)
                .unwrap()
                .leeway_secs(),
            0
        );
        let too_much = KeyArgs {
            jwt_leeway: Duration::from_secs(61),
            ..secret_keys()
        };
        assert!(Authenticator::from_config(&too_much, &dir.0, false).is_err());
        assert_eq!(
            Authenticator::hs256(b"k", None, None, 600).leeway_secs(),
            60
        );
    }

    #[test]
    fn other_secret_is_invalid() {
        let t = hs_token("another-secret", json!({"sub": "bob", "exp": in_secs(60)}));
        assert_eq!(
            hs_auth().verify(&t),
            Err(AuthError::Invalid("bad signature".to_owned()))
        );
    }

    #[test]
    fn alg_none_is_rejected() {
        let valid = hs_token(SECRET, json!({"sub": "bob", "exp": in_secs(60)}));
        let payload = valid.split('.').nth(1).unwrap();
        // base64url of {"alg":"none","typ":"JWT"}
        let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        for t in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            let r = hs_auth().verify(&t);
            assert!(
                matches!(r, Err(AuthError::Malformed | AuthError::Invalid(_))),
                "{r:?}"
            );
        }
    }

    #[test]
    fn missing_exp_is_rejected() {
        let t = hs_token(SECRET, json!({"sub": "bob"}));
        assert_eq!(
            hs_auth().verify(&t),
            Err(AuthError::Invalid("missing exp claim".to_owned()))
        );
        let t = hs_token(SECRET, json!({"sub": "bob", "exp": "tomorrow"}));
        assert!(hs_auth().verify(&t).is_err());
    }

    #[test]
    fn bad_sub_is_invalid() {
        let long = "a".repeat(200);
        for sub in ["", "a b", "bob/../x", long.as_str()] {
            let t = hs_token(SECRET, json!({"sub": sub, "exp": in_secs(60)}));
            assert!(invalid(hs_auth().verify(&t)), "sub {sub:?}");
        }
        let t = hs_token(SECRET, json!({"exp": in_secs(60)}));
        assert!(invalid(hs_auth().verify(&t)));
    }

    #[test]
    fn malformed_tokens() {
        for t in [
            "",
            "abc",
            "a.b.c",
            "....",
            "eyJ.eyJ.",
            "x".repeat(10_000).as_str(),
        ] {
            assert_eq!(hs_auth().verify(t), Err(AuthError::Malformed), "{t:.20}");
        }
    }

    #[test]
    fn issuer_and_audience_checked_only_when_configured() {
        let auth = Authenticator::hs256(
            SECRET.as_bytes(),
            Some("https://issuer".into()),
            Some("threadline".into()),
            0,
        );
        let exp = in_secs(60);
        let ok = hs_token(
            SECRET,
            json!({"sub": "bob", "exp": exp, "iss": "https://issuer", "aud": "threadline"}),
        );
        assert!(auth.verify(&ok).is_ok());
        let aud_list = hs_token(
            SECRET,
            json!({"sub": "bob", "exp": exp, "iss": "https://issuer", "aud": ["x", "threadline"]}),
        );
        assert!(auth.verify(&aud_list).is_ok());
        for claims in [
            json!({"sub": "bob", "exp": exp, "iss": "https://evil", "aud": "threadline"}),
            json!({"sub": "bob", "exp": exp, "iss": "https://issuer", "aud": "other"}),
            json!({"sub": "bob", "exp": exp, "aud": "threadline"}),
            json!({"sub": "bob", "exp": exp, "iss": "https://issuer"}),
        ] {
            let t = hs_token(SECRET, claims.clone());
            assert!(invalid(auth.verify(&t)), "{claims}");
        }
        // Not configured: whatever iss/aud the token carries is ignored.
        let t = hs_token(
            SECRET,
            json!({"sub": "bob", "exp": exp, "iss": "anyone", "aud": ["a", "b"]}),
        );
        assert!(hs_auth().verify(&t).is_ok());
    }

    #[test]
    fn signer_sets_configured_issuer_and_audience() {
        let keys = KeyArgs {
            jwt_issuer: Some("iss1".into()),
            jwt_audience: Some("aud1".into()),
            ..secret_keys()
        };
        let dir = TempDir::new();
        let token = Signer::from_config(&keys, &dir.0)
            .unwrap()
            .mint("carol", Role::Auditor, Duration::from_secs(60))
            .unwrap();
        let auth = Authenticator::from_config(&keys, &dir.0, false).unwrap();
        assert_eq!(auth.verify(&token).unwrap().actor.role, Role::Auditor);
        // A server without those settings still accepts it.
        assert!(hs_auth().verify(&token).is_ok());
    }

    fn es_files(dir: &Path) -> KeyArgs {
        let public = dir.join("pub.pem");
        let private = dir.join("priv.pem");
        std::fs::write(&public, EC_PUBLIC_PEM).unwrap();
        std::fs::write(&private, EC_PRIVATE_PEM).unwrap();
        KeyArgs {
            jwt_public_key: Some(public),
            jwt_private_key: Some(private),
            jwt_alg: Some(config::JwtAlg::Es256),
            ..KeyArgs::default()
        }
    }

    #[test]
    fn es256_round_trip_and_algorithm_confusion() {
        let dir = TempDir::new();
        let keys = es_files(&dir.0);
        let signer = Signer::from_config(&keys, &dir.0).unwrap();
        assert_eq!(signer.algorithm(), Algorithm::ES256);
        let auth = Authenticator::from_config(&keys, &dir.0, true).unwrap();
        assert_eq!(auth.algorithm(), Some(Algorithm::ES256));
        assert!(matches!(auth.source(), KeySource::PublicKeyFile(_)));
        assert!(!config::secret_file(&dir.0).exists());

        let token = signer
            .mint("dave", Role::User, Duration::from_secs(60))
            .unwrap();
        assert_eq!(auth.verify(&token).unwrap().actor.user.as_str(), "dave");
        // An ES256 token is no good to an HS256 server.
        assert!(invalid(hs_auth().verify(&token)));

        // HS256 tokens, including one keyed with the public key itself, are refused.
        let hs = hs_token(SECRET, json!({"sub": "dave", "exp": in_secs(60)}));
        assert_eq!(
            auth.verify(&hs),
            Err(AuthError::Invalid("algorithm not accepted".to_owned()))
        );
        let confused = hs_token(EC_PUBLIC_PEM, json!({"sub": "dave", "exp": in_secs(60)}));
        assert!(invalid(auth.verify(&confused)));

        let direct = Authenticator::from_public_key_pem(
            Algorithm::ES256,
            EC_PUBLIC_PEM.as_bytes(),
            None,
            None,
            0,
        )
        .unwrap();
        assert!(direct.verify(&token).is_ok());
    }

    #[test]
    fn public_key_must_fit_its_algorithm() {
        let pem = EC_PUBLIC_PEM.as_bytes();
        assert!(Authenticator::from_public_key_pem(Algorithm::HS256, pem, None, None, 0).is_err());
        assert!(Authenticator::from_public_key_pem(Algorithm::RS256, pem, None, None, 0).is_err());
        assert!(Authenticator::from_public_key_pem(Algorithm::ES384, pem, None, None, 0).is_err());
        assert!(
            Authenticator::from_public_key_pem(Algorithm::ES256, b"not a pem", None, None, 0)
                .is_err()
        );
    }

    #[test]
    fn config_combinations() {
        let dir = TempDir::new();
        let es = es_files(&dir.0);
        let no_alg = KeyArgs {
            jwt_alg: None,
            ..es.clone()
        };
        assert!(Authenticator::from_config(&no_alg, &dir.0, true).is_err());
        assert!(Signer::from_config(&no_alg, &dir.0).is_err());
        let secret_with_alg = KeyArgs {
            jwt_alg: Some(config::JwtAlg::Rs256),
            ..secret_keys()
        };
        assert!(Authenticator::from_config(&secret_with_alg, &dir.0, true).is_err());
        let empty = KeyArgs {
            jwt_secret: Some(String::new()),
            ..KeyArgs::default()
        };
        assert!(Authenticator::from_config(&empty, &dir.0, true).is_err());
        let public_only = KeyArgs {
            jwt_private_key: None,
            ..es.clone()
        };
        assert!(Signer::from_config(&public_only, &dir.0).is_err());
        let private_only = KeyArgs {
            jwt_public_key: None,
            ..es
        };
        assert!(Authenticator::from_config(&private_only, &dir.0, true).is_err());
        assert!(!config::secret_file(&dir.0).exists());
    }

    #[test]
    fn short_secrets_are_refused_and_a_secret_file_is_read() {
        let dir = TempDir::new();
        let short = KeyArgs {
            jwt_secret: Some("x".repeat(config::MIN_SECRET_BYTES - 1)),
            ..KeyArgs::default()
        };
        let err = Authenticator::from_config(&short, &dir.0, true).unwrap_err();
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
        assert!(Signer::from_config(&short, &dir.0).is_err());

        let file = dir.0.join("secret");
        std::fs::write(&file, format!("  {SECRET}\n")).unwrap();
        let from_file = KeyArgs {
            jwt_secret_file: Some(file.clone()),
            ..KeyArgs::default()
        };
        let token = Signer::from_config(&from_file, &dir.0)
            .unwrap()
            .mint("alice", Role::User, Duration::from_secs(60))
            .unwrap();
        // The same secret, given either way, verifies the same tokens.
        assert!(hs_auth().verify(&token).is_ok());
        assert!(Authenticator::from_config(&from_file, &dir.0, true)
            .unwrap()
            .verify(&token)
            .is_ok());

        std::fs::write(&file, "too-short\n").unwrap();
        assert!(Authenticator::from_config(&from_file, &dir.0, true).is_err());
        let missing = KeyArgs {
            jwt_secret_file: Some(dir.0.join("absent")),
            ..KeyArgs::default()
        };
        assert!(Authenticator::from_config(&missing, &dir.0, true).is_err());
        // A hand-written jwt.secret that is too short is refused too.
        std::fs::write(config::secret_file(&dir.0), "short\n").unwrap();
        assert!(Authenticator::from_config(&KeyArgs::default(), &dir.0, true).is_err());
    }

    #[test]
    fn data_dir_secret_is_created_only_when_asked() {
        let tmp = TempDir::new();
        let dir = tmp.0.join("data");
        let none = KeyArgs::default();

        let err = Authenticator::from_config(&none, &dir, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("no key configured and no jwt.secret in"),
            "{err}"
        );
        assert!(!dir.exists());
        assert!(Signer::from_config(&none, &dir).is_err());
        assert!(!dir.exists());

        let auth = Authenticator::from_config(&none, &dir, true).unwrap();
        assert!(matches!(
            auth.source(),
            KeySource::DataDirSecret { created: true, .. }
        ));
        let token = Signer::from_config(&none, &dir)
            .unwrap()
            .mint("erin", Role::User, Duration::from_secs(60))
            .unwrap();
        assert!(auth.verify(&token).is_ok());

        let again = Authenticator::from_config(&none, &dir, true).unwrap();
        assert!(matches!(
            again.source(),
            KeySource::DataDirSecret { created: false, .. }
        ));
        assert!(again.verify(&token).is_ok());
        assert!(Authenticator::from_config(&none, &dir, false)
            .unwrap()
            .verify(&token)
            .is_ok());
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let auth = hs_auth();
        let signer = Signer::from_config(&secret_keys(), Path::new("/nonexistent")).unwrap();
        for shown in [format!("{auth:?}"), format!("{signer:?}")] {
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(!shown.contains("test-secret"), "{shown}");
        }
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer a b"), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn errors_map_to_auth_errors() {
        use jsonwebtoken::errors::new_error;
        assert_eq!(
            AuthError::from(new_error(ErrorKind::ExpiredSignature)),
            AuthError::Expired
        );
        assert_eq!(
            AuthError::from(new_error(ErrorKind::ImmatureSignature)),
            AuthError::NotYetValid
        );
        assert_eq!(
            AuthError::from(new_error(ErrorKind::InvalidToken)),
            AuthError::Malformed
        );
        assert!(matches!(
            AuthError::from(new_error(ErrorKind::InvalidSignature)),
            AuthError::Invalid(_)
        ));
    }
}
