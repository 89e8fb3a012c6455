//! JWT validation at the inbound proxy (`tessera_proxy::inbound::authn::JwtValidator`): an
//! arbitrary token against a fixed key set (RSA, P-256 and Ed25519 public keys whose
//! private halves nobody holds).
//!
//! Input: the token, as it follows `Authorization: Bearer `; the same bytes also as a
//! query string, which must never count as a token.
//!
//! Properties: never panics; never `Valid` (nobody can sign for these keys).
#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue, Uri, header};
use libfuzzer_sys::fuzz_target;
use tessera_mesh::policy::JwtRule;
use tessera_proxy::inbound::authn::{JwtOutcome, JwtValidator};

const JWKS: &str = include_str!("../jwks.json");

fn validator() -> &'static JwtValidator {
    static VALIDATOR: OnceLock<JwtValidator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let rules = [
            JwtRule {
                issuer: "https://issuer".into(),
                audiences: vec!["api".into()],
                jwks: Some(JWKS.into()),
                jwks_file: None,
            },
            JwtRule {
                issuer: "https://any-audience".into(),
                audiences: Vec::new(),
                jwks: Some(JWKS.into()),
                jwks_file: None,
            },
        ];
        JwtValidator::new(&rules.iter().collect::<Vec<_>>()).expect("the fixed key set loads")
    })
}

fuzz_target!(|bytes: &[u8]| {
    let validator = validator();
    let root = Uri::from_static("/");
    if let Ok(token) = HeaderValue::from_bytes(&[b"Bearer ".as_slice(), bytes].concat()) {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, token);
        let outcome = validator.check(&headers, &root);
        assert!(
            !matches!(outcome, JwtOutcome::Valid(_) | JwtOutcome::Absent),
            "{:?}: {outcome:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    if let Ok(uri) = Uri::try_from([b"/?".as_slice(), bytes].concat()) {
        let outcome = validator.check(&HeaderMap::new(), &uri);
        assert!(
            !matches!(outcome, JwtOutcome::Valid(_)),
            "{uri}: {outcome:?}"
        );
    }
});
