//! JWKS: verification keys from an identity provider's key set, chosen by `kid`, each with the one algorithm its JWK fixes; cached, and fetched again on a schedule, on an unknown `kid` (rate-limited) and on SIGHUP, keeping the cached keys while the provider is unreachable.
//!
//! The fetch itself is the binary's (it owns the HTTP client and TLS): this module gets
//! it as a [`JwksFetch`] and never blocks a runtime thread on it.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{leeway_secs, AuthInner, Authenticator, KeyRing, KeySource, Reload, VerifyKey};
use crate::config::{bail, ConfigError, KeyArgs};

/// Gets the key set document. The binary implements it over its HTTP client.
pub trait JwksFetch: Send + Sync + fmt::Debug + 'static {
    /// The body of a successful (2xx) answer, or why there is none, for the log.
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, String>>;
}

/// Why the key set was fetched (the `trigger` label of `threadline_jwks_fetches_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    Start,
    Schedule,
    UnknownKid,
    Reload,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Schedule => "schedule",
            Self::UnknownKid => "unknown_kid",
            Self::Reload => "reload",
        }
    }
}

/// The provider: where its set is, how it is fetched, and when it may be fetched again.
pub(crate) struct Provider {
    url: String,
    fetcher: Arc<dyn JwksFetch>,
    refresh_interval: Duration,
    min_refresh_interval: Duration,
    timeout: Duration,
    /// Held for the whole of a fetch: one at a time, and a token with an unknown `kid`
    /// that may not start one waits for the one under way.
    fetching: tokio::sync::Mutex<()>,
    /// When a token with an unknown `kid` last started a fetch.
    last_on_demand: Mutex<Option<Instant>>,
}

impl Provider {
    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

/// Unix seconds now, as a float for a gauge.
fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Authenticator {
    /// Verifies tokens against the key set at `keys.jwks_url`, fetched with `fetcher`.
    /// The first fetch happens here and must give at least one usable key; otherwise the
    /// start fails with the reason (a server without keys could only refuse every token).
    /// A task then fetches the set again every `--jwks-refresh-interval` (sooner, backing
    /// off from 1 s, after a failure) for as long as this authenticator lives.
    pub async fn with_jwks(
        keys: &KeyArgs,
        fetcher: Arc<dyn JwksFetch>,
    ) -> Result<Self, ConfigError> {
        let Some(url) = keys.jwks_url.clone() else {
            bail!("with_jwks needs --jwks-url");
        };
        if keys.jwt_secret.is_some()
            || keys.jwt_secret_file.is_some()
            || keys.jwt_public_key.is_some()
            || keys.jwt_alg.is_some()
        {
            bail!("configure one of --jwks-url and a static key (--jwt-secret, --jwt-secret-file, --jwt-public-key)");
        }
        let provider = Provider {
            url: url.clone(),
            fetcher,
            refresh_interval: keys.jwks_refresh_interval,
            min_refresh_interval: keys.jwks_min_refresh_interval,
            timeout: keys.jwks_timeout,
            fetching: tokio::sync::Mutex::new(()),
            last_on_demand: Mutex::new(None),
        };
        let every = provider.refresh_interval;
        let leeway = leeway_secs(keys)?;
        let auth = Self::build(
            keys.jwt_issuer.clone(),
            keys.jwt_audience.clone(),
            leeway,
            Reload::Jwks(provider),
            |_| {
                Ok(KeyRing {
                    by_kid: true,
                    keys: Vec::new(),
                    ignored: Vec::new(),
                    source: KeySource::Jwks(url.clone()),
                })
            },
        )?;
        metrics::counter!("threadline_jwks_refresh_failures_total").absolute(0);
        let Reload::Jwks(provider) = &auth.inner.reload else {
            unreachable!("built with a provider")
        };
        if let Err(e) = auth.refresh(provider, Trigger::Start).await {
            bail!(
                "cannot start: the key set at --jwks-url {url} is unusable ({e}). \
                 Nothing could be verified without it; check the URL and that the provider \
                 is reachable from here (a supervisor such as systemd restarts the server)"
            );
        }
        tokio::spawn(refresher(Arc::downgrade(&auth.inner), every));
        Ok(auth)
    }

    /// Fetches the set and puts its usable keys in force. A failed fetch, an unreadable
    /// document, or a set without a usable key leaves the cached keys in force.
    pub(crate) async fn refresh(
        &self,
        provider: &Provider,
        trigger: Trigger,
    ) -> Result<usize, String> {
        let _one = provider.fetching.lock().await;
        metrics::counter!("threadline_jwks_fetches_total", "trigger" => trigger.label())
            .increment(1);
        let fetched = match tokio::time::timeout(provider.timeout, provider.fetcher.fetch()).await {
            Ok(body) => body,
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(provider.timeout)
            )),
        };
        let parsed = fetched.and_then(|body| parse_key_set(&body, &self.inner.base));
        let parsed = parsed.and_then(|(keys, ignored)| {
            if keys.is_empty() {
                Err(format!(
                    "no usable key in the set (ignored: {})",
                    if ignored.is_empty() {
                        "none; the set is empty".to_owned()
                    } else {
                        ignored.join("; ")
                    }
                ))
            } else {
                Ok((keys, ignored))
            }
        });
        let (keys, ignored) = match parsed {
            Ok(p) => p,
            Err(e) => {
                metrics::counter!("threadline_jwks_refresh_failures_total").increment(1);
                let cached = self.ring().keys.len();
                tracing::warn!(
                    url = %provider.url,
                    trigger = trigger.label(),
                    error = %e,
                    cached_keys = cached,
                    "fetching the key set failed; the cached keys stay in force"
                );
                return Err(e);
            }
        };
        let old = self.ring();
        for why in ignored.iter().filter(|w| !old.ignored.contains(w)) {
            tracing::warn!(url = %provider.url, "ignoring a key of the set: {why}");
        }
        let kids = |ring: &KeyRing| -> Vec<String> {
            ring.keys
                .iter()
                .map(|k| format!("{} ({:?})", k.kid.as_deref().unwrap_or_default(), k.alg))
                .collect()
        };
        let before = kids(&old);
        let count = keys.len();
        let ring = KeyRing {
            by_kid: true,
            keys,
            ignored,
            source: KeySource::Jwks(provider.url.clone()),
        };
        let after = kids(&ring);
        let changed = self.install(ring);
        metrics::gauge!("threadline_jwks_keys").set(count as f64);
        metrics::gauge!("threadline_jwks_last_success_timestamp_seconds").set(now_unix());
        if changed || trigger == Trigger::Start {
            let added: Vec<_> = after.iter().filter(|k| !before.contains(k)).collect();
            let removed: Vec<_> = before.iter().filter(|k| !after.contains(k)).collect();
            tracing::info!(
                url = %provider.url,
                trigger = trigger.label(),
                keys = ?after,
                added = ?added,
                removed = ?removed,
                "key set in force"
            );
        } else {
            tracing::debug!(url = %provider.url, trigger = trigger.label(), "key set unchanged");
        }
        Ok(count)
    }

    /// A token named a `kid` the cached set lacks: fetch the set again unless a token did
    /// so within `--jwks-min-refresh-interval`, in which case only a fetch already under
    /// way is waited for.
    pub(crate) async fn refresh_for_unknown_kid(&self, provider: &Provider) {
        let due = {
            let mut last = provider
                .last_on_demand
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= provider.min_refresh_interval);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            let _ = self.refresh(provider, Trigger::UnknownKid).await;
        } else {
            drop(provider.fetching.lock().await);
        }
    }
}

/// Fetches the set every `every` while the authenticator lives; after a failure, again
/// after 1 s, doubling up to `every`.
async fn refresher(inner: Weak<AuthInner>, every: Duration) {
    let first_retry = Duration::from_secs(1).min(every);
    let mut wait = every;
    let mut retry = first_retry;
    loop {
        tokio::time::sleep(wait).await;
        let Some(inner) = inner.upgrade() else { return };
        let auth = Authenticator { inner };
        let Reload::Jwks(provider) = &auth.inner.reload else {
            return;
        };
        match auth.refresh(provider, Trigger::Schedule).await {
            Ok(_) => {
                wait = every;
                retry = first_retry;
            }
            Err(_) => {
                wait = retry;
                retry = (retry * 2).min(every);
            }
        }
    }
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

/// The usable keys of a JWK set document, and why each other key was left out
/// (`kid: why`). Only a document that is not a JWK set at all is an error.
fn parse_key_set(body: &[u8], base: &Validation) -> Result<(Vec<VerifyKey>, Vec<String>), String> {
    let set: RawSet =
        serde_json::from_slice(body).map_err(|e| format!("not a JWK set document: {e}"))?;
    let mut keys: Vec<VerifyKey> = Vec::new();
    let mut ignored = Vec::new();
    for (i, value) in set.keys.into_iter().enumerate() {
        let name = value
            .get("kid")
            .and_then(|k| k.as_str())
            .map_or_else(|| format!("key #{i} (no kid)"), |k| format!("kid {k:?}"));
        match key_from_jwk(value, base) {
            Ok(key) if keys.iter().any(|k| k.kid == key.kid) => {
                ignored.push(format!("{name}: a second key with the same kid"));
            }
            Ok(key) => keys.push(key),
            Err(why) => ignored.push(format!("{name}: {why}")),
        }
    }
    Ok((keys, ignored))
}

/// One JWK as a verification key, or why it cannot be one.
fn key_from_jwk(value: serde_json::Value, base: &Validation) -> Result<VerifyKey, String> {
    let jwk: Jwk = serde_json::from_value(value)
        .map_err(|e| format!("not a key this server can read ({e})"))?;
    let kid = jwk
        .common
        .key_id
        .clone()
        .ok_or("no kid: a token could never name it")?;
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(other) => return Err(format!("its use is {other:?}, not signatures")),
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("its key_ops do not include verify".into());
        }
    }
    let alg = algorithm_of(&jwk)?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key material ({e})"))?;
    // Parsed only when a token arrives otherwise: a broken key is left out here instead.
    jsonwebtoken::crypto::verify("", b"probe", &key, alg)
        .map_err(|e| format!("unusable {alg:?} key material ({e})"))?;
    let material = serde_json::to_vec(&jwk.algorithm).unwrap_or_default();
    Ok(VerifyKey::new(alg, Some(kid), key, &material, base))
}

/// The one algorithm a JWK is used with: its `alg` when that fits its `kty` and `crv`;
/// without `alg`, the curve's (P-256 → ES256, P-384 → ES384, Ed25519 → EdDSA), and RS256
/// for an RSA key (the algorithm OpenID Connect requires; some providers publish RSA keys
/// without `alg`). Symmetric (`oct`) keys are never taken from a key set.
fn algorithm_of(jwk: &Jwk) -> Result<Algorithm, String> {
    let stated = match jwk.common.key_algorithm {
        None => None,
        Some(KeyAlgorithm::UNKNOWN_ALGORITHM) => {
            return Err("its alg is not one this server knows".into())
        }
        Some(a) => Some(
            Algorithm::from_str(&a.to_string())
                .map_err(|_| format!("its alg {a} is not a signature algorithm"))?,
        ),
    };
    let fits = |implied: Algorithm, allowed: &[Algorithm]| match stated {
        None => Ok(implied),
        Some(a) if allowed.contains(&a) => Ok(a),
        Some(a) => Err(format!("its alg {a:?} does not fit its key type")),
    };
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => {
            use Algorithm::{PS256, PS384, PS512, RS256, RS384, RS512};
            fits(RS256, &[RS256, RS384, RS512, PS256, PS384, PS512])
        }
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => fits(Algorithm::ES256, &[Algorithm::ES256]),
            EllipticCurve::P384 => fits(Algorithm::ES384, &[Algorithm::ES384]),
            ref other => Err(format!("curve {other:?} is not supported for kty EC")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => fits(Algorithm::EdDSA, &[Algorithm::EdDSA]),
            ref other => Err(format!("curve {other:?} is not supported for kty OKP")),
        },
        AlgorithmParameters::OctetKey(_) => {
            Err("a symmetric (oct) key is never taken from a key set".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::base_validation;
    use serde_json::json;

    // Public halves of test-only keys (tests/src/jwks.rs holds the private ones).
    const RSA_N: &str = "yQeS_oxumw_L_-fKBFUbpJxCOhHiY2hJwTGGs8edtMlx636Mt8xHnJXyP1TFIBArTClZdONlPyCl3t8jQ6cpHKMtxqEL96NoJD0JaLSHFle5ZdL8jbNEaZmwbexARpqZ5O6C96qVPq4CWUPnhrJfti02Mpy6MhPfg13M5j2Xqi1l0PQLQTdxeEShEV92Brp2DIqXg7LZxyOt34oSOjAGti_hmPZW2SVanHSXhbYiQ73fOC4lwg5EhpiTMUz9fHHSMZi48bnOVODn0uQBKgU1u2We-LQU6ZUdUStNTHNvSUafX8ebz7wO8rm3-bZoMCsmuQVxedNu7WSVNC3MN6w4QQ";
    const ED_X: &str = "mL9CMD4gq4lvAQvjqALoCgQ92a9-w-Z-PuzeBtnVhsY";
    const EC_X: &str = "eIMntgAKDz07_0rnL_gQVPv2oyN0vrTju_LRmPinRnU";
    const EC_Y: &str = "S0dk1hvBpomkb4SjJ5Hz-TANDnBIh6LsJoPiN3LSngA";

    fn parse(set: serde_json::Value) -> (Vec<(String, Algorithm)>, Vec<String>) {
        let base = base_validation(0, None, None);
        let (keys, ignored) = parse_key_set(set.to_string().as_bytes(), &base).unwrap();
        (
            keys.into_iter().map(|k| (k.kid.unwrap(), k.alg)).collect(),
            ignored,
        )
    }

    #[test]
    fn every_key_gets_its_algorithm_from_its_jwk() {
        let (keys, ignored) = parse(json!({"keys": [
            // Auth0 / Keycloak: alg stated.
            {"kid": "rs", "kty": "RSA", "alg": "RS256", "use": "sig", "n": RSA_N, "e": "AQAB",
             "x5t": "abc", "x5c": ["MIIC"]},
            // Azure AD: no alg on RSA keys.
            {"kid": "rs-noalg", "kty": "RSA", "use": "sig", "n": RSA_N, "e": "AQAB"},
            {"kid": "ps", "kty": "RSA", "alg": "PS256", "n": RSA_N, "e": "AQAB"},
            {"kid": "ec", "kty": "EC", "crv": "P-256", "x": EC_X, "y": EC_Y},
            {"kid": "ec-alg", "kty": "EC", "crv": "P-256", "alg": "ES256", "x": EC_X, "y": EC_Y,
             "key_ops": ["verify"]},
            {"kid": "ed", "kty": "OKP", "crv": "Ed25519", "x": ED_X},
            {"kid": "ed-alg", "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "x": ED_X},
        ]}));
        assert_eq!(ignored, Vec::<String>::new());
        assert_eq!(
            keys,
            vec![
                ("rs".into(), Algorithm::RS256),
                ("rs-noalg".into(), Algorithm::RS256),
                ("ps".into(), Algorithm::PS256),
                ("ec".into(), Algorithm::ES256),
                ("ec-alg".into(), Algorithm::ES256),
                ("ed".into(), Algorithm::EdDSA),
                ("ed-alg".into(), Algorithm::EdDSA),
            ]
        );
    }

    #[test]
    fn keys_without_a_usable_algorithm_are_left_out_with_a_reason() {
        let (keys, ignored) = parse(json!({"keys": [
            {"kid": "good", "kty": "OKP", "crv": "Ed25519", "x": ED_X},
            // Keycloak publishes its encryption key in the same set.
            {"kid": "enc", "kty": "RSA", "alg": "RSA-OAEP", "use": "enc", "n": RSA_N, "e": "AQAB"},
            {"kid": "oaep", "kty": "RSA", "alg": "RSA-OAEP", "n": RSA_N, "e": "AQAB"},
            {"kid": "hs", "kty": "oct", "alg": "HS256", "k": "c2VjcmV0"},
            {"kid": "mismatch", "kty": "EC", "crv": "P-256", "alg": "RS256", "x": EC_X, "y": EC_Y},
            {"kid": "ec-as-ed", "kty": "OKP", "crv": "Ed25519", "alg": "ES256", "x": ED_X},
            {"kid": "p521", "kty": "EC", "crv": "P-521", "x": EC_X, "y": EC_Y},
            {"kid": "weird-alg", "kty": "RSA", "alg": "XS999", "n": RSA_N, "e": "AQAB"},
            {"kid": "no-verify", "kty": "OKP", "crv": "Ed25519", "x": ED_X, "key_ops": ["sign"]},
            {"kid": "bad-point", "kty": "EC", "crv": "P-256", "x": EC_Y, "y": EC_X},
            {"kid": "unknown-kty", "kty": "XYZ", "x": "abc"},
            {"kty": "OKP", "crv": "Ed25519", "x": ED_X},
            {"kid": "good", "kty": "EC", "crv": "P-256", "x": EC_X, "y": EC_Y},
        ]}));
        assert_eq!(keys, vec![("good".into(), Algorithm::EdDSA)]);
        let reasons = ignored.join("\n");
        for (kid, why) in [
            ("enc", "not signatures"),
            ("oaep", "not a signature algorithm"),
            ("hs", "symmetric"),
            ("mismatch", "does not fit"),
            ("ec-as-ed", "does not fit"),
            ("p521", "not supported"),
            ("weird-alg", "not one this server knows"),
            ("no-verify", "verify"),
            ("bad-point", "unusable"),
            ("unknown-kty", "not a key this server can read"),
            ("key #11 (no kid)", "no kid"),
            ("\"good\"", "same kid"),
        ] {
            assert!(
                ignored.iter().any(|l| l.contains(kid) && l.contains(why)),
                "{kid}: {why}\n{reasons}"
            );
        }
        assert_eq!(ignored.len(), 12, "{reasons}");
    }

    #[test]
    fn a_document_that_is_no_key_set_is_an_error() {
        let base = base_validation(0, None, None);
        for body in ["", "{}", "[]", "{\"keys\": 3}", "<html>"] {
            assert!(parse_key_set(body.as_bytes(), &base).is_err(), "{body}");
        }
        let (keys, ignored) = parse_key_set(b"{\"keys\": []}", &base).unwrap();
        assert!(keys.is_empty() && ignored.is_empty());
    }

    #[test]
    fn the_same_key_keeps_its_tag_and_another_gets_another() {
        let base = base_validation(0, None, None);
        let set = |kid: &str, x: &str| json!({"keys": [{"kid": kid, "kty": "EC", "crv": "P-256", "x": x, "y": EC_Y}]});
        let tag = |v: serde_json::Value| {
            parse_key_set(v.to_string().as_bytes(), &base)
                .unwrap()
                .0
                .first()
                .map(|k| k.tag)
        };
        let a = tag(set("a", EC_X)).unwrap();
        assert_eq!(tag(set("a", EC_X)), Some(a));
        assert_ne!(tag(set("b", EC_X)), Some(a));
    }
}
