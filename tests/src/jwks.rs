//! A JWKS identity provider for tests: test-only key pairs of three types (RSA, Ed25519,
//! P-256), tokens signed with them, and [`Provider`], an HTTP server on 127.0.0.1:0
//! publishing whichever of their public keys a test chooses, counting fetches, and able
//! to go down and come back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::now_secs;

/// A test-only key pair (generated with `openssl genpkey`; never used anywhere else).
#[derive(Debug, Clone, Copy)]
pub struct TestKey {
    /// The `kid` it is published under.
    pub kid: &'static str,
    pub alg: Algorithm,
    /// PKCS#8 private key.
    pub private_pem: &'static str,
    /// Its public JWK without `kid`/`alg`/`use` (added by [`TestKey::jwk`]).
    jwk: &'static str,
    /// SPKI public key PEM (RSA only: for the algorithm-confusion test).
    pub public_pem: &'static str,
}

pub const RSA_A: TestKey = TestKey {
    kid: "rsa-a",
    alg: Algorithm::RS256,
    private_pem: "-----BEGIN PRIVATE KEY-----
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQDJB5L+jG6bD8v/
58oEVRuknEI6EeJjaEnBMYazx520yXHrfoy3zEeclfI/VMUgECtMKVl042U/IKXe
3yNDpykcoy3GoQv3o2gkPQlotIcWV7ll0vyNs0RpmbBt7EBGmpnk7oL3qpU+rgJZ
Q+eGsl+2LTYynLoyE9+DXczmPZeqLWXQ9AtBN3F4RKERX3YGunYMipeDstnHI63f
ihI6MAa2L+GY9lbZJVqcdJeFtiJDvd84LiXCDkSGmJMxTP18cdIxmLjxuc5U4OfS
5AEqBTW7ZZ74tBTplR1RK01Mc29JRp9fx5vPvA7yubf5tmgwKya5BXF5027tZJU0
Lcw3rDhBAgMBAAECggEAFFig5wR9mVIS+paSGrgmcRWjmk7/E8KVXGlP0dhNPOP6
lLQdN+kEAnQmrYQ9403fo/i3Zh4xvB7oytLYtdswTQay9lyMYob2XlyTHDbRSVCd
ohGloA3ZybpVYfq8UqkJFGOTe8+XBV4FPNWjlD1vdHfE+YBlU/Yw9BHFUDRBqmZ5
0QGSHrikyLZz6EZEtCiYFwDyUlB+xPYw5GuUMAv3U8AuOy0NWPVnGzRiV0aBLnG1
ux2vgeC/FPL5BFhvhnZ7eDXcfenX5Bkt/iiXykzgiqAUkJBp8kV/f/1riYPoN5YM
1PbzvbwiKp3P5ReF2tVtt/OrMpc/h6X9aFIloPFo9QKBgQD0Lm45iYgdb5g0C5Ac
plnWiUmYkLdHCOf3Pc6FNCk70Vzy8/sObWmKQkak4qY4CXaVf+QTI+hHqcHabI8J
75+aTHZpQke0Q6QfocQrLuL1dnrC7uZndJLTxbB+IRMD9XoS9wmVl80NYit38tia
i27c2AAVtcY1AZL4Y3SWAIEqwwKBgQDSwnbgy/6yzyhyKpWI6K7iTCOS81ZOfVtU
CWtAAKfpbu9+Pgm8XAkATWK5fbVQqRawsqNvOUpEvPUPBA8LVBYcALd0Fso4tsSr
z8PxgNbhnXf+ZseFckBlMtSPh2iI1VoPUo79C4QGXC7mpQ0BxX3b/A+ecqNHUU2n
iGAPOy44qwKBgQDKXqy1fNlVZAZlo+ulAu1T02YuTknHUodFLnE5jlhaHhMFu9Un
SOB+WJ1JzBnsOVORZXP1tP2uXu+tgekuV+0TqSk95VOd/61HFf+Jtosc2ju10N8d
gMyrPJ0ge3LSBiFNFHZaB3xHCkRyXc7MjqCr4Ux4sbT6ezp+J5cZNoPWlwKBgQCl
vl6krGhxkC5bkhek4m/d8UisoQcHlNfEv9+DJsDl9+MJ4ZngcnR1s2XnP+/eLgt1
DBcxOdmpMvx5QZTfMNJuVTXwape/gCQshaivfMYACck63PMdg9sWeqHk+fUAXuCD
Wkauw2ahZc9QfQ48jWZMIO7biYXUaSDrlnkMoVrZHwKBgQCX0U39EY3Oscov6IGd
uKfdcEDppTQO1R5VCNn/jbJC/sicI/d1B4KhHHWQZZtNNcuc789dLfm5e59khN0T
86nLXLu8hm4/Vu+KYEfvvM1iavhYH5JduAfHXztVOCMPop8S7hH97Ep8bpryRuAW
VsZ/9zwEMUvASXvU3LYi1vjesg==
-----END PRIVATE KEY-----
",
    jwk: r#"{"kty": "RSA", "n": "yQeS_oxumw_L_-fKBFUbpJxCOhHiY2hJwTGGs8edtMlx636Mt8xHnJXyP1TFIBArTClZdONlPyCl3t8jQ6cpHKMtxqEL96NoJD0JaLSHFle5ZdL8jbNEaZmwbexARpqZ5O6C96qVPq4CWUPnhrJfti02Mpy6MhPfg13M5j2Xqi1l0PQLQTdxeEShEV92Brp2DIqXg7LZxyOt34oSOjAGti_hmPZW2SVanHSXhbYiQ73fOC4lwg5EhpiTMUz9fHHSMZi48bnOVODn0uQBKgU1u2We-LQU6ZUdUStNTHNvSUafX8ebz7wO8rm3-bZoMCsmuQVxedNu7WSVNC3MN6w4QQ", "e": "AQAB"}"#,
    public_pem: "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAyQeS/oxumw/L/+fKBFUb
pJxCOhHiY2hJwTGGs8edtMlx636Mt8xHnJXyP1TFIBArTClZdONlPyCl3t8jQ6cp
HKMtxqEL96NoJD0JaLSHFle5ZdL8jbNEaZmwbexARpqZ5O6C96qVPq4CWUPnhrJf
ti02Mpy6MhPfg13M5j2Xqi1l0PQLQTdxeEShEV92Brp2DIqXg7LZxyOt34oSOjAG
ti/hmPZW2SVanHSXhbYiQ73fOC4lwg5EhpiTMUz9fHHSMZi48bnOVODn0uQBKgU1
u2We+LQU6ZUdUStNTHNvSUafX8ebz7wO8rm3+bZoMCsmuQVxedNu7WSVNC3MN6w4
QQIDAQAB
-----END PUBLIC KEY-----
",
};

pub const RSA_B: TestKey = TestKey {
    kid: "rsa-b",
    alg: Algorithm::RS256,
    private_pem: "-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCSkjg1Srae9H9c
+J8b1dEJwKhvBrseTsE3c+hKj4uDvl/Ibi0PPOhO6CsSc/JXD27evrSP9CuO0p+w
Lvap7/j5+jCZzhcaAWCNbdFObadWML38j4AXXlYgvpkWn71yx0WdfxD8VOJeW3QJ
m72rqgltE7+XOkKXI0SMVQuGbyliOO7OrD7YWGx3Usm8mrd1naLF4eqtoCqVe5HY
oWeJrp1GB9fiRf2QZ9CHCAvP5b4wvtSI8GuLqPYwFLS8OnR8xEILxZ+f1w5YIR84
5wSYu5umg4I1LP/l+KdnGGsxQJE62MyS09q5YoBuKJWqZB88KiN5/SyOAnM1p80F
HCsZ37M9AgMBAAECggEABdYsRlUAEjLeyoM9BMT+MsL5AhjUxTdyIsTrFGMEdX3U
fx0CDtgIUTIWGwFCfnyHF/gkpRHeVSzmfoPUPz6m3b98hXdrPJYe8+rSWarsrbY5
ro/BVEzlpZ6pZnj8eJBeYY/wi3fO3t6J76MDycz23KDbcYh4o9+b6HGviI4vKfHW
fhIB4XNcAAoC8YXyi5J4tbISVB/az+nn7ZbZBOI2sEmZzVQvDfccFskQXcl6E96F
DYrqJPP2vWeXwuQ6kFXvteuY5ZhXflHnCz4m83mnADDuGTRdzVukCyNJEmA9CxU7
S9y53Tue66lEs0IyGwofebFxLFEb4fp/ypxZ6x0/cQKBgQDNuP+M4ZsGagU4ZEsO
2fK9zuVMlYL8bdsr+NPkn4cFp9j0kEsqTdn7yeSUzlyVA8v/AotLL9RAQKTawkmB
LI6MdolLuS69makxN/XIaK/e65U0LHJd9tJfC8d/U7TFEFn16Rxu1Ml6ZQ1sSbI2
wUb7aMQvXbcrYETIjI3KOPBeTQKBgQC2ZGtYVbhTvjB1zT/iI1qgSGbG7lUmIkJR
LUtUl3zm83jErEB7sl1eDkWDVNUsFZ4D5ITj8ixjNMfypf+erTokvLZyom83WK6U
zDjl5tuZoMVrnuOvIVrFvf2YP843Ae5oTGDOmpAhjDbctwDJ7N/R4q9s/XQwzCct
qNQrUqiAsQKBgBOqgLt+AazeS7t1UvuLeDoO4jqs/EWXVuFgOxla6rRutD3E4Xqc
0J7SUQispYsVPtYU7y3z142A4IGNGyu/D61702oqvL4hR1xOJi/PWiisSqofKZuz
8a5mWN7iKKDCDGeGrlImA1CxAlR8ww2a8mcsP7zrb4w0+r5VOWTAhrHtAoGATxde
oTCSvOW1V/AIKsTP8L9UqiEBlYa3oUH175m9VNzxWr+jOsCO0lF3/UpVIkfBfMik
g8ApVV+28Nbg8OsHUpTuvOkJN0PieK3SYodoZMcdtNxyuSfKmAMaK+JHRv00Z8/v
Dshhhdqqk61bzzRDnl0hWy7RKrPsrVUPpDW00hECgYARJXj5tta1bA5BkTD2yYjZ
xtcUxUijRHhXhuKuVqOLdkJtGyY446zCIq4yYvrVw7XrL7/8VhZMaurnSjCmxjlJ
oWCJy72/PrwMlMJmhOEsu7F/9eKUiozRp5Zrra2SIRc2cVBDBT02I3ht6RCgJQXD
2UR81mqyL3pgICd8ssavew==
-----END PRIVATE KEY-----
",
    jwk: r#"{"kty": "RSA", "n": "kpI4NUq2nvR_XPifG9XRCcCobwa7Hk7BN3PoSo-Lg75fyG4tDzzoTugrEnPyVw9u3r60j_QrjtKfsC72qe_4-fowmc4XGgFgjW3RTm2nVjC9_I-AF15WIL6ZFp-9csdFnX8Q_FTiXlt0CZu9q6oJbRO_lzpClyNEjFULhm8pYjjuzqw-2Fhsd1LJvJq3dZ2ixeHqraAqlXuR2KFnia6dRgfX4kX9kGfQhwgLz-W-ML7UiPBri6j2MBS0vDp0fMRCC8Wfn9cOWCEfOOcEmLubpoOCNSz_5finZxhrMUCROtjMktPauWKAbiiVqmQfPCojef0sjgJzNafNBRwrGd-zPQ", "e": "AQAB"}"#,
    public_pem: "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAkpI4NUq2nvR/XPifG9XR
CcCobwa7Hk7BN3PoSo+Lg75fyG4tDzzoTugrEnPyVw9u3r60j/QrjtKfsC72qe/4
+fowmc4XGgFgjW3RTm2nVjC9/I+AF15WIL6ZFp+9csdFnX8Q/FTiXlt0CZu9q6oJ
bRO/lzpClyNEjFULhm8pYjjuzqw+2Fhsd1LJvJq3dZ2ixeHqraAqlXuR2KFnia6d
RgfX4kX9kGfQhwgLz+W+ML7UiPBri6j2MBS0vDp0fMRCC8Wfn9cOWCEfOOcEmLub
poOCNSz/5finZxhrMUCROtjMktPauWKAbiiVqmQfPCojef0sjgJzNafNBRwrGd+z
PQIDAQAB
-----END PUBLIC KEY-----
",
};

pub const ED: TestKey = TestKey {
    kid: "ed-1",
    alg: Algorithm::EdDSA,
    private_pem: "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIJOabscDMlADaZlUzwn3Nmh5mqoIgv/Cm+yO0Tco435i
-----END PRIVATE KEY-----
",
    jwk: r#"{"kty": "OKP", "crv": "Ed25519", "x": "mL9CMD4gq4lvAQvjqALoCgQ92a9-w-Z-PuzeBtnVhsY"}"#,
    public_pem: "",
};

pub const EC: TestKey = TestKey {
    kid: "ec-1",
    alg: Algorithm::ES256,
    private_pem: "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSyk2nHRWPRdL+alJ
r/TpSibAHXcAw/A3HtoVAG/6wvOhRANCAAR4gye2AAoPPTv/Sucv+BBU+/ajI3S+
tOO78tGY+KdGdUtHZNYbwaaJpG+EoyeR8/kwDQ5wSIei7CaD4jdy0p4A
-----END PRIVATE KEY-----
",
    jwk: r#"{"kty": "EC", "crv": "P-256", "x": "eIMntgAKDz07_0rnL_gQVPv2oyN0vrTju_LRmPinRnU", "y": "S0dk1hvBpomkb4SjJ5Hz-TANDnBIh6LsJoPiN3LSngA"}"#,
    public_pem: "",
};

impl TestKey {
    /// Its public JWK as a provider publishes it: `kid`, `alg` and `use` added.
    pub fn jwk(&self) -> Value {
        let mut v: Value = serde_json::from_str(self.jwk).expect("fixture JWK");
        v["kid"] = json!(self.kid);
        v["alg"] = json!(format!("{:?}", self.alg));
        v["use"] = json!("sig");
        v
    }

    /// Its public JWK with no `alg` (as Azure AD publishes RSA keys).
    pub fn jwk_without_alg(&self) -> Value {
        let mut v = self.jwk();
        v.as_object_mut().expect("object").remove("alg");
        v
    }

    fn encoding_key(&self) -> EncodingKey {
        let pem = self.private_pem.as_bytes();
        match self.alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
            _ => EncodingKey::from_rsa_pem(pem),
        }
        .expect("fixture private key")
    }

    /// `claims` signed with this key, its algorithm and its `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(self.alg, Some(self.kid), claims)
    }

    /// `claims` signed with this key under header `alg` and `kid` (for confusion tests).
    pub fn sign_as(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding_key()).expect("sign")
    }

    /// A token for `sub` with `role`, valid for an hour.
    pub fn token(&self, sub: &str, role: &str) -> String {
        self.sign(&json!({"sub": sub, "role": role, "exp": now_secs() + 3600}))
    }
}

/// What the provider answers.
#[derive(Debug, Clone)]
enum Answer {
    Set(Value),
    /// 503 with an HTML page, as a proxy in front of a dead provider does.
    Unavailable,
}

#[derive(Debug)]
struct Shared {
    answer: Mutex<Answer>,
    fetches: AtomicU64,
}

/// A JWKS endpoint on 127.0.0.1:0 (`GET` any path), serving the set a test chooses.
#[derive(Debug)]
pub struct Provider {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Provider {
    /// Starts serving `{"keys": keys}`. Needs a tokio runtime.
    pub async fn start(keys: Vec<Value>) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            answer: Mutex::new(Answer::Set(json!({ "keys": keys }))),
            fetches: AtomicU64::new(0),
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        Provider {
            addr,
            shared,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    /// Publishes `{"keys": keys}` from now on.
    pub fn publish(&self, keys: Vec<Value>) {
        *self.shared.answer.lock().unwrap() = Answer::Set(json!({ "keys": keys }));
    }

    /// Publishes a raw document (for malformed sets).
    pub fn publish_raw(&self, doc: Value) {
        *self.shared.answer.lock().unwrap() = Answer::Set(doc);
    }

    /// Answers 503 from now on.
    pub fn fail(&self) {
        *self.shared.answer.lock().unwrap() = Answer::Unavailable;
    }

    /// Requests answered so far (any answer).
    pub fn fetches(&self) -> u64 {
        self.shared.fetches.load(Ordering::SeqCst)
    }

    /// Stops listening: connections are refused, as for a provider that is down.
    pub fn go_down(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listens again on the same address after [`Provider::go_down`].
    pub async fn come_back(&self) {
        // The aborted task drops its listener at its next poll; retry the bind briefly.
        let deadline = std::time::Instant::now() + crate::DEADLINE;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        *self.task.lock().unwrap() = Some(tokio::spawn(serve(listener, self.shared.clone())));
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.go_down();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            // Read the request head; the body (none for GET) is not needed.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
                if head.len() > 64 * 1024 {
                    return;
                }
            }
            shared.fetches.fetch_add(1, Ordering::SeqCst);
            let answer = shared.answer.lock().unwrap().clone();
            let (status, kind, body) = match answer {
                Answer::Set(doc) => ("200 OK", "application/json", doc.to_string()),
                Answer::Unavailable => (
                    "503 Service Unavailable",
                    "text/html",
                    "<html>upstream down</html>".to_owned(),
                ),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
