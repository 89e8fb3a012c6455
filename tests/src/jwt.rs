//! Tokens for request-authentication tests: an ES256 key with its JWKS, and tokens good
//! and bad.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "orders";

/// An ES256 signing key and its public JWKS (`kid: k1`).
pub struct Issuer {
    key_pem: String,
    public_pem: String,
    pub jwks: String,
}

impl Default for Issuer {
    fn default() -> Self {
        Self::new()
    }
}

impl Issuer {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let point = key.public_key_raw();
        let (x, y) = point[1..].split_at(32);
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]})
        .to_string();
        Self {
            key_pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
            jwks,
        }
    }

    fn claims(&self, audience: &str, expires_in: i64) -> serde_json::Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        json!({"iss": ISSUER, "sub": "alice", "aud": audience, "iat": now, "exp": now + expires_in})
    }

    fn sign(&self, kid: &str, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        let key = EncodingKey::from_ec_pem(self.key_pem.as_bytes()).expect("encoding key");
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }

    pub fn valid(&self) -> String {
        self.sign("k1", &self.claims(AUDIENCE, 600))
    }

    pub fn expired(&self) -> String {
        self.sign("k1", &self.claims(AUDIENCE, -3600))
    }

    pub fn wrong_audience(&self) -> String {
        self.sign("k1", &self.claims("payments", 600))
    }

    pub fn unknown_kid(&self) -> String {
        self.sign("k2", &self.claims(AUDIENCE, 600))
    }

    /// `alg: none`, no signature.
    pub fn alg_none(&self) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
        let payload = URL_SAFE_NO_PAD.encode(self.claims(AUDIENCE, 600).to_string());
        format!("{header}.{payload}.")
    }

    /// HS256 "signed" with the public key as HMAC secret: the algorithm-confusion attack.
    pub fn hs256_with_public_key(&self) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let key = EncodingKey::from_secret(self.public_pem.as_bytes());
        jsonwebtoken::encode(&header, &self.claims(AUDIENCE, 600), &key).expect("sign")
    }
}
