//! Join tokens: how a workload outside Kubernetes proves its identity the first time.
//!
//! A token names one namespace and service account, expires, and is signed with
//! HMAC-SHA256 under a key that never leaves the control plane's state directory. It is
//! `tessera-join.v1.<payload>.<mac>`, both parts base64url; the payload is JSON. Only the
//! control plane verifies its own tokens, so a symmetric key is all it needs, and a token
//! from another control plane (another key) fails like a tampered one.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tessera_proto::SpiffeId;

use crate::ca::{CaError, file_error};

const PREFIX: &str = "tessera-join.v1.";
const KEY_FILE: &str = "join-token.key";
/// The longest-lived token we hand out; tokens bootstrap, certificates do the rest.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longer inputs are refused before any parsing.
const MAX_TOKEN_LEN: usize = 2048;

/// Why a token is refused. Deliberately coarse on the wire; precise in the log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenRefusal {
    #[error("join token is malformed")]
    Malformed,
    #[error("join token signature does not verify (tampered, or issued by another control plane)")]
    BadSignature,
    #[error("join token expired at {0}")]
    Expired(String),
    #[error("join token is for trust domain {0:?}, not this mesh's")]
    ForeignTrustDomain(String),
}

#[derive(Serialize, Deserialize)]
struct Claims {
    /// SPIFFE ID the token entitles to.
    sub: String,
    /// Expiry, Unix seconds.
    exp: u64,
    /// Issued at, Unix seconds.
    iat: u64,
    /// Random nonce so two tokens for one identity differ.
    jti: String,
}

/// Signs and verifies join tokens.
pub struct TokenAuthority {
    key: hmac::Key,
}

impl TokenAuthority {
    /// Loads the signing key from the state directory, creating it on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, CaError> {
        let path = state_dir.join(KEY_FILE);
        if !path.exists() {
            let secret: [u8; 32] = rand::random();
            crate::state::write_private(&path, URL_SAFE_NO_PAD.encode(secret).as_bytes())?;
        }
        let encoded = std::fs::read_to_string(&path).map_err(|e| file_error(&path, e))?;
        let secret = URL_SAFE_NO_PAD
            .decode(encoded.trim())
            .map_err(|_| file_error(&path, "not a base64url key"))?;
        if secret.len() < 32 {
            return Err(file_error(&path, "key shorter than 32 bytes"));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
        })
    }

    /// Creates a token for `identity`, valid for `ttl`.
    pub fn create(&self, identity: &SpiffeId, ttl: Duration) -> String {
        let now = unix_now();
        let claims = Claims {
            sub: identity.to_string(),
            iat: now,
            exp: now + ttl.as_secs(),
            jti: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 12]>()),
        };
        // Serializing a struct of strings and integers cannot fail.
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let mac = hmac::sign(&self.key, payload.as_bytes());
        format!("{PREFIX}{payload}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
    }

    /// Checks a token and returns the identity it proves.
    pub fn verify(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, TokenRefusal> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenRefusal::Malformed);
        }
        let body = token.strip_prefix(PREFIX).ok_or(TokenRefusal::Malformed)?;
        let (payload, mac) = body.split_once('.').ok_or(TokenRefusal::Malformed)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| TokenRefusal::Malformed)?;
        // Constant-time comparison, before anything in the payload is trusted.
        hmac::verify(&self.key, payload.as_bytes(), &mac)
            .map_err(|_| TokenRefusal::BadSignature)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(TokenRefusal::Malformed)?;
        if claims.exp <= unix_now() {
            return Err(TokenRefusal::Expired(rfc3339(claims.exp)));
        }
        let identity: SpiffeId = claims.sub.parse().map_err(|_| TokenRefusal::Malformed)?;
        if identity.trust_domain() != trust_domain {
            return Err(TokenRefusal::ForeignTrustDomain(
                identity.trust_domain().to_string(),
            ));
        }
        Ok(identity)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn rfc3339(unix_seconds: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_seconds.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> TokenAuthority {
        let dir = std::env::temp_dir().join(format!("tessera-token-{}", rand::random::<u64>()));
        TokenAuthority::load_or_create(&dir).unwrap()
    }

    fn frontend() -> SpiffeId {
        "spiffe://cluster.local/ns/shop/sa/frontend"
            .parse()
            .unwrap()
    }

    #[test]
    fn round_trip() {
        let authority = authority();
        let token = authority.create(&frontend(), Duration::from_secs(60));
        assert_eq!(
            authority.verify(&token, "cluster.local").unwrap(),
            frontend()
        );
    }

    #[test]
    fn refusals() {
        let authority = authority();
        let token = authority.create(&frontend(), Duration::from_secs(60));
        assert_eq!(
            authority.verify(&token, "other.domain").unwrap_err(),
            TokenRefusal::ForeignTrustDomain("cluster.local".into())
        );
        let expired = authority.create(&frontend(), Duration::ZERO);
        assert!(matches!(
            authority.verify(&expired, "cluster.local"),
            Err(TokenRefusal::Expired(_))
        ));
        let foreign = self::authority().create(&frontend(), Duration::from_secs(60));
        assert_eq!(
            authority.verify(&foreign, "cluster.local").unwrap_err(),
            TokenRefusal::BadSignature
        );
        // Swap the payload for one naming another identity, keep the MAC.
        let other = authority.create(
            &"spiffe://cluster.local/ns/shop/sa/admin".parse().unwrap(),
            Duration::from_secs(60),
        );
        let mac = token.rsplit_once('.').unwrap().1;
        let forged = format!("{}.{mac}", other.rsplit_once('.').unwrap().0);
        assert_eq!(
            authority.verify(&forged, "cluster.local").unwrap_err(),
            TokenRefusal::BadSignature
        );
        for garbage in ["", "tessera-join.v1.", "tessera-join.v1.a.b", "x.y.z"] {
            assert!(authority.verify(garbage, "cluster.local").is_err());
        }
        assert_eq!(
            authority
                .verify(&"a".repeat(5000), "cluster.local")
                .unwrap_err(),
            TokenRefusal::Malformed
        );
    }
}
