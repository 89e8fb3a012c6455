//! Request authentication: JWTs validated at the inbound proxy against the key sets of
//! the `RequestAuthentication` policies that select this workload.
//!
//! The algorithm is never taken on the token's word: each key admits only the
//! algorithms of its own type (RSA → RS*/PS*, P-256 → ES256, P-384 → ES384, Ed25519 →
//! EdDSA), so `alg: none`, HMAC tokens and algorithm confusion (an HS256 token "signed"
//! with a public key) all fail; symmetric keys are not accepted at all. A token whose
//! `kid` names no key is refused, tokens in the URL are refused, `exp`/`nbf` are checked
//! with a minute of leeway, and issuer and audience must match the rule. A valid token
//! makes `issuer/subject` the request principal.

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, Uri, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tessera_mesh::policy::JwtRule;

const LEEWAY_SECONDS: u64 = 60;
/// Longer tokens are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What the token on a request says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtOutcome {
    /// No token: the request has no request principal.
    Absent,
    /// A token that passed every check.
    Valid(ValidToken),
    /// A token was presented and is not acceptable: the request is refused (401).
    Invalid(&'static str),
}

/// What a valid token establishes: the request principal, and the claims a CUSTOM
/// (Rego) policy may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidToken {
    /// `issuer/subject`.
    pub principal: String,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

struct Issuer {
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<Key>,
}

/// Validates tokens for one workload.
pub struct JwtValidator {
    issuers: Vec<Issuer>,
}

/// The claims checked (`iss`, `sub`) and every other, kept for Rego policies.
#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    #[serde(flatten)]
    others: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct UnverifiedIssuer {
    iss: Option<String>,
}

impl JwtValidator {
    /// Builds a validator from JWT rules; a key set that cannot be used is an error.
    pub fn new(rules: &[&JwtRule]) -> Result<Self, String> {
        let issuers = rules
            .iter()
            .map(|rule| {
                let jwks = rule.jwks.as_deref().ok_or("no key set")?;
                let set: JwkSet =
                    serde_json::from_str(jwks).map_err(|e| format!("{}: {e}", rule.issuer))?;
                let keys = set
                    .keys
                    .iter()
                    .map(|jwk| {
                        let algorithms = algorithms_for(&jwk.algorithm, jwk.common.key_algorithm)?;
                        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
                        Ok(Key {
                            kid: jwk.common.key_id.clone(),
                            algorithms,
                            key,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| format!("{}: {e}", rule.issuer))?;
                Ok(Issuer {
                    issuer: rule.issuer.clone(),
                    audiences: rule.audiences.clone(),
                    keys,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { issuers })
    }

    /// A validator with no trusted issuer: every presented token is refused. In force
    /// when the configured key sets cannot be used, so a broken policy fails closed.
    pub fn reject_all() -> Self {
        Self {
            issuers: Vec::new(),
        }
    }

    /// Checks the request's token, if it carries one.
    pub fn check(&self, headers: &HeaderMap, uri: &Uri) -> JwtOutcome {
        if uri.query().is_some_and(carries_token) {
            return JwtOutcome::Invalid("jwt-in-url");
        }
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return JwtOutcome::Absent;
        };
        if values.next().is_some() {
            // The application might read another one than we validated.
            return JwtOutcome::Invalid("jwt-malformed");
        }
        let Some(token) = value.to_str().ok().and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        }) else {
            return JwtOutcome::Invalid("jwt-malformed");
        };
        self.validate(token.trim())
    }

    fn validate(&self, token: &str) -> JwtOutcome {
        if token.len() > MAX_TOKEN_BYTES {
            return JwtOutcome::Invalid("jwt-malformed");
        }
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            // Includes `alg: none`, which is not an algorithm we parse.
            return JwtOutcome::Invalid("jwt-malformed");
        };
        let Some(issuer_name) = unverified_issuer(token) else {
            return JwtOutcome::Invalid("jwt-malformed");
        };
        let Some(issuer) = self.issuers.iter().find(|i| i.issuer == issuer_name) else {
            return JwtOutcome::Invalid("jwt-unknown-issuer");
        };
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => issuer
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => issuer.keys.iter().collect(),
        };
        if candidates.is_empty() {
            return JwtOutcome::Invalid("jwt-unknown-kid");
        }
        let mut outcome = JwtOutcome::Invalid("jwt-algorithm-not-allowed");
        for key in candidates
            .into_iter()
            .filter(|k| k.algorithms.contains(&header.alg))
        {
            let mut validation = Validation::new(header.alg);
            validation.algorithms = vec![header.alg];
            validation.leeway = LEEWAY_SECONDS;
            validation.validate_nbf = true;
            validation.set_issuer(&[&issuer.issuer]);
            if issuer.audiences.is_empty() {
                validation.validate_aud = false;
            } else {
                validation.set_audience(&issuer.audiences);
            }
            validation.required_spec_claims =
                HashSet::from(["exp".to_string(), "iss".to_string(), "sub".to_string()]);
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let Claims {
                        iss,
                        sub,
                        mut others,
                    } = data.claims;
                    let principal = format!("{iss}/{sub}");
                    others.insert("iss".into(), iss.into());
                    others.insert("sub".into(), sub.into());
                    return JwtOutcome::Valid(ValidToken {
                        principal,
                        claims: others,
                    });
                }
                Err(error) => {
                    outcome = JwtOutcome::Invalid(match error.kind() {
                        ErrorKind::ExpiredSignature => "jwt-expired",
                        ErrorKind::ImmatureSignature => "jwt-not-yet-valid",
                        ErrorKind::InvalidAudience => "jwt-wrong-audience",
                        ErrorKind::InvalidIssuer => "jwt-unknown-issuer",
                        ErrorKind::InvalidSignature => "jwt-bad-signature",
                        _ => "jwt-invalid",
                    })
                }
            }
        }
        outcome
    }
}

/// Whether a query string carries an access token, however its name is encoded.
fn carries_token(query: &str) -> bool {
    query.split(['&', ';']).any(|pair| {
        let name = pair.split('=').next().unwrap_or("");
        let name = format!("/{name}");
        // A name with a broken escape is not `access_token` in any spelling an
        // application decodes; the request itself is refused for its path if it matters.
        tessera_mesh::policy::normalize_path(&name)
            .unwrap_or(std::borrow::Cow::Borrowed(&name))
            .trim_start_matches('/')
            .replace("%5F", "_")
            .eq_ignore_ascii_case("access_token")
    })
}

/// The algorithms a key may verify, from its own type (and `alg`, if it names one).
fn algorithms_for(
    params: &AlgorithmParameters,
    declared: Option<KeyAlgorithm>,
) -> Result<Vec<Algorithm>, String> {
    use Algorithm::*;
    let by_type = match params {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![EdDSA],
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (HMAC) keys are not accepted".into());
        }
        _ => return Err("unsupported key type".into()),
    };
    let Some(declared) = declared else {
        return Ok(by_type);
    };
    let declared: Algorithm = declared
        .to_string()
        .parse()
        .map_err(|_| format!("unsupported alg {declared:?}"))?;
    if by_type.contains(&declared) {
        Ok(vec![declared])
    } else {
        Err(format!("alg {declared:?} does not fit the key type"))
    }
}

/// The `iss` claim before verification, only to pick the key set.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<UnverifiedIssuer>(&json).ok()?.iss
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn rule(jwks: String) -> JwtRule {
        JwtRule {
            issuer: "https://issuer".into(),
            audiences: vec!["api".into()],
            jwks: Some(jwks),
            jwks_file: None,
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    fn claims() -> serde_json::Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        serde_json::json!({"iss": "https://issuer", "sub": "bob", "aud": "api", "exp": now + 600})
    }

    #[test]
    fn accepts_eddsa_and_rejects_confusion() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = URL_SAFE_NO_PAD.encode(key.public_key_raw());
        let jwks = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"e1","x":"{x}"}}]}}"#);
        let validator = JwtValidator::new(&[&rule(jwks)]).unwrap();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("e1".into());
        let signing = EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&header, &claims(), &signing).unwrap();
        let uri: Uri = "/".parse().unwrap();
        let JwtOutcome::Valid(valid) = validator.check(&bearer(&token), &uri) else {
            panic!("a valid token");
        };
        assert_eq!(valid.principal, "https://issuer/bob");
        assert_eq!(valid.claims["sub"], "bob");
        let mut forged = Header::new(Algorithm::HS256);
        forged.kid = Some("e1".into());
        let secret = EncodingKey::from_secret(key.public_key_raw());
        let token = jsonwebtoken::encode(&forged, &claims(), &secret).unwrap();
        assert_eq!(
            validator.check(&bearer(&token), &uri),
            JwtOutcome::Invalid("jwt-algorithm-not-allowed")
        );
        assert_eq!(validator.check(&HeaderMap::new(), &uri), JwtOutcome::Absent);
        for query in [
            "/?access_token=x",
            "/?a=1;access_token=x",
            "/?access%5Ftoken=x",
            "/?ACCESS_TOKEN=x",
        ] {
            let uri: Uri = query.parse().unwrap();
            assert_eq!(
                validator.check(&HeaderMap::new(), &uri),
                JwtOutcome::Invalid("jwt-in-url"),
                "{query}"
            );
        }
        let mut twice = bearer(&jsonwebtoken::encode(&header, &claims(), &signing).unwrap());
        twice.append(header::AUTHORIZATION, "Bearer other".parse().unwrap());
        assert_eq!(
            validator.check(&twice, &uri),
            JwtOutcome::Invalid("jwt-malformed")
        );
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(
            validator.check(&basic, &uri),
            JwtOutcome::Invalid("jwt-malformed")
        );
    }

    #[test]
    fn refuses_symmetric_keys_and_mismatched_alg() {
        let hmac = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#.to_string();
        let error = JwtValidator::new(&[&rule(hmac)]).err().unwrap();
        assert!(error.contains("HMAC"), "{error}");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = URL_SAFE_NO_PAD.encode(key.public_key_raw());
        let lying =
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","alg":"RS256","x":"{x}"}}]}}"#);
        assert!(JwtValidator::new(&[&rule(lying)]).is_err());
    }
}
