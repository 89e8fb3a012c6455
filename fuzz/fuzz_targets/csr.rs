//! The CA's CSR checks and signing (`tessera_control_plane::ca`), on arbitrary DER.
//!
//! Properties: never panics; a CSR that passes `validate_csr` carries an ECDSA P-256
//! key as a 65-byte uncompressed point (read here from the CSR with x509-parser, apart
//! from the CA's own check), and the certificate the CA then issues holds that key.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tessera_control_plane::ca::{CertificateAuthority, validate_csr};
use tessera_mesh::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, SubjectPublicKeyInfo, X509Certificate};

/// The identity the caller proved: the one the seed CSRs ask for.
const IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/fuzz";

struct Fixture {
    ca: CertificateAuthority,
    identity: SpiffeId,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tessera-fuzz-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory for the CA");
        let ca = CertificateAuthority::dev_root(&dir, "cluster.local").expect("a dev root CA");
        let _ = std::fs::remove_dir_all(&dir);
        Fixture {
            ca,
            identity: IDENTITY.parse().expect("a valid fixed identity"),
        }
    })
}

fn assert_p256(spki: &SubjectPublicKeyInfo<'_>, what: &str) {
    assert_eq!(
        spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY,
        "{what}: not an EC key"
    );
    let curve = spki.algorithm.parameters.as_ref().map(|p| p.as_oid());
    assert!(
        matches!(curve, Some(Ok(ref oid)) if *oid == OID_EC_P256),
        "{what}: EC key on curve {curve:?}, not P-256"
    );
    let point = spki.subject_public_key.data.as_ref();
    assert!(
        point.len() == 65 && point[0] == 0x04 && spki.subject_public_key.unused_bits == 0,
        "{what}: {}-byte point, not an uncompressed P-256 point",
        point.len()
    );
}

fuzz_target!(|der: &[u8]| {
    let fixture = fixture();
    let Ok(csr) = validate_csr(der, &fixture.identity) else {
        return;
    };
    let (_, parsed) = X509CertificationRequest::from_der(der)
        .unwrap_or_else(|e| panic!("accepted CSR does not parse: {e}"));
    assert_p256(
        &parsed.certification_request_info.subject_pki,
        "accepted CSR",
    );
    let issued = fixture
        .ca
        .issue(&csr, &fixture.identity, Duration::from_secs(3600))
        .unwrap_or_else(|e| panic!("accepted CSR not issued: {e}"));
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0])
        .unwrap_or_else(|e| panic!("issued certificate does not parse: {e}"));
    assert_p256(leaf.public_key(), "issued certificate");
    assert_eq!(
        leaf.public_key().subject_public_key.data,
        parsed
            .certification_request_info
            .subject_pki
            .subject_public_key
            .data,
        "issued certificate holds another key than the CSR's"
    );
});
