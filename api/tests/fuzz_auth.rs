//! Fuzzing the JWT verifier (stable Rust, proptest via `threadline-fuzz`): arbitrary and
//! mutated tokens never panic, a mutated token is never accepted, and the token's header
//! `alg` never chooses the algorithm. `THREADLINE_FUZZ_SECS=<n>` runs each target for `n` s.

use jsonwebtoken::{Algorithm, EncodingKey};
use proptest::prelude::*;
use serde_json::{json, Value};
use threadline_api::auth::Authenticator;

const SECRET: &str = "fuzz-secret-0123456789abcdef-0123456789";

// Test-only P-256 key pair (the one api/src/auth.rs's unit tests use).
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

fn hs_auth() -> Authenticator {
    Authenticator::hs256(SECRET.as_bytes(), None, None, 0)
}

fn es_auth() -> Authenticator {
    Authenticator::from_public_key_pem(Algorithm::ES256, EC_PUBLIC_PEM.as_bytes(), None, None, 0)
        .unwrap()
}

fn b64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn exp() -> u64 {
    threadline_api::auth::now_secs() + 600
}

/// `header.payload.signature`, the signature made with `alg` and `key` over the first two
/// parts (no signature for `None`): how an attacker builds a token with any header.
fn token(header: &Value, claims: &Value, sign: Option<(Algorithm, &EncodingKey)>) -> String {
    let message = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = match sign {
        Some((alg, key)) => jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap(),
        None => String::new(),
    };
    format!("{message}.{signature}")
}

fn valid_hs_token() -> String {
    token(
        &json!({"alg": "HS256", "typ": "JWT"}),
        &json!({"sub": "bob", "role": "agent", "exp": exp()}),
        Some((
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )),
    )
}

#[test]
fn the_helpers_build_tokens_the_verifiers_accept() {
    assert!(hs_auth().verify(&valid_hs_token()).is_ok());
    let es = token(
        &json!({"alg": "ES256"}),
        &json!({"sub": "bob", "exp": exp()}),
        Some((
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap(),
        )),
    );
    assert!(es_auth().verify(&es).is_ok());
}

/// Token-like text: dots, the base64url alphabet, and anything else.
fn token_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_=+/.-]{0,300}",
        "eyJ[A-Za-z0-9_-]{0,80}\\.eyJ[A-Za-z0-9_-]{0,120}\\.[A-Za-z0-9_-]{0,90}",
        proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 0..6).prop_map(|p| p.join(".")),
    ]
}

mod fuzz {
    use super::*;

    #[test]
    fn arbitrary_tokens_are_refused_without_a_panic() {
        let (hs, es) = (hs_auth(), es_auth());
        threadline_fuzz::run("jwt_arbitrary", token_text(), |t| {
            prop_assert!(hs.verify(&t).is_err());
            prop_assert!(es.verify(&t).is_err());
            Ok(())
        });
    }

    /// A valid token's text changed anywhere (a character replaced, inserted or removed,
    /// the text cut short): never a panic, never accepted.
    #[test]
    fn mutated_tokens_are_never_accepted() {
        let auth = hs_auth();
        let valid = valid_hs_token();
        let edit = (
            0u8..4,
            any::<prop::sample::Index>(),
            prop_oneof![
                proptest::char::ranges(vec!['A'..='Z', 'a'..='z', '0'..='9'].into()),
                Just('-'),
                Just('_'),
                Just('.'),
                Just('='),
                any::<char>()
            ],
        );
        let edits = proptest::collection::vec(edit, 1..5);
        threadline_fuzz::run("jwt_mutated", edits, |edits| {
            let mut chars: Vec<char> = valid.chars().collect();
            for (kind, at, c) in edits {
                let i = at.index(chars.len().max(1)).min(chars.len());
                match kind {
                    0 if i < chars.len() => chars[i] = c,
                    1 => chars.insert(i, c),
                    2 if i < chars.len() => {
                        chars.remove(i);
                    }
                    _ => chars.truncate(i),
                }
            }
            let t: String = chars.into_iter().collect();
            let verdict = auth.verify(&t);
            if t == valid {
                prop_assert!(verdict.is_ok());
            } else {
                prop_assert!(verdict.is_err(), "accepted a mutated token {t:?}");
            }
            Ok(())
        });
    }

    /// A header whose `alg` (and `kid`, `jku`, `jwk`, `typ` …) is anything, signed with the
    /// key and algorithm an attacker picks: only an HS256 signature by the server's secret
    /// is accepted by the HS256 server, only an ES256 signature by the private key by the
    /// ES256 server, whatever the header says.
    #[test]
    fn the_header_alg_never_chooses_the_algorithm() {
        let (hs, es) = (hs_auth(), es_auth());
        let secret = EncodingKey::from_secret(SECRET.as_bytes());
        // Algorithm confusion: the public key as an HMAC secret.
        let public_as_secret = EncodingKey::from_secret(EC_PUBLIC_PEM.as_bytes());
        let wrong_secret = EncodingKey::from_secret(b"another-secret-0123456789abcdef-0123");
        let ec = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap();
        let alg_names = prop_oneof![
            Just("HS256".to_owned()),
            Just("HS384".to_owned()),
            Just("HS512".to_owned()),
            Just("ES256".to_owned()),
            Just("ES384".to_owned()),
            Just("RS256".to_owned()),
            Just("PS256".to_owned()),
            Just("EdDSA".to_owned()),
            Just("none".to_owned()),
            Just("None".to_owned()),
            Just("hs256".to_owned()),
            ".{0,8}",
        ];
        let extras = proptest::collection::btree_map(
            prop_oneof![
                Just("kid".to_owned()),
                Just("jku".to_owned()),
                Just("x5u".to_owned()),
                Just("jwk".to_owned()),
                Just("typ".to_owned()),
                Just("cty".to_owned()),
                Just("crit".to_owned()),
                "[a-z]{1,5}",
            ],
            prop_oneof![
                any::<String>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                Just(json!({"kty": "oct", "k": b64(b"attacker")})),
                Just(json!(["x"])),
            ],
            0..3,
        );
        // 0 HS256/secret, 1 HS384/secret, 2 HS512/secret, 3 HS256/public key,
        // 4 HS256/wrong secret, 5 ES256/private key, 6 none.
        let input = (alg_names, extras, 0u8..7, any::<bool>());
        threadline_fuzz::run(
            "jwt_header_alg",
            input,
            |(alg, extras, signer, with_alg)| {
                let mut header = json!({});
                for (k, v) in extras {
                    header[k] = v;
                }
                if with_alg {
                    header["alg"] = json!(alg);
                }
                let sign = match signer {
                    0 => Some((Algorithm::HS256, &secret)),
                    1 => Some((Algorithm::HS384, &secret)),
                    2 => Some((Algorithm::HS512, &secret)),
                    3 => Some((Algorithm::HS256, &public_as_secret)),
                    4 => Some((Algorithm::HS256, &wrong_secret)),
                    5 => Some((Algorithm::ES256, &ec)),
                    _ => None,
                };
                let t = token(&header, &json!({"sub": "mallory", "exp": exp()}), sign);
                let header_says = |name: &str| with_alg && alg == name;
                if hs.verify(&t).is_ok() {
                    prop_assert!(
                        signer == 0 && header_says("HS256"),
                        "HS256 server accepted {header}"
                    );
                }
                if es.verify(&t).is_ok() {
                    prop_assert!(
                        signer == 5 && header_says("ES256"),
                        "ES256 server accepted {header}"
                    );
                }
                // A plain header with the configured algorithm and the right key is
                // accepted (the property is not vacuous).
                if signer == 0 && header == json!({"alg": "HS256"}) {
                    prop_assert!(hs.verify(&t).is_ok());
                }
                Ok(())
            },
        );
    }
}
