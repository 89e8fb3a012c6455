//! Certificates made by tests: foreign CAs, expired leaves, hand-crafted CSRs.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// A CA the test controls.
pub struct TestCa {
    pub cert: CertificateDer<'static>,
    /// The CA key, PEM (PKCS#8), as a plug-in CA directory holds it.
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A new self-signed root.
    pub fn root(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let params = ca_params(name);
        let cert = params
            .self_signed(&key)
            .expect("self-signed root")
            .der()
            .clone();
        Self::new(cert, params, key)
    }

    /// An intermediate signed by this CA.
    pub fn intermediate(&self, name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let params = ca_params(name);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("intermediate")
            .der()
            .clone();
        Self::new(cert, params, key)
    }

    fn new(cert: CertificateDer<'static>, params: CertificateParams, key: KeyPair) -> Self {
        Self {
            cert,
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Loads the control plane's development root from its state directory.
    pub fn from_state_dir(state_dir: &Path) -> Self {
        let cert_pem = std::fs::read_to_string(state_dir.join("ca-cert.pem")).expect("ca-cert.pem");
        let key_pem = std::fs::read_to_string(state_dir.join("ca-key.pem")).expect("ca-key.pem");
        let key = KeyPair::from_pem(&key_pem).expect("CA key");
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).expect("CA cert");
        let cert = tessera_mesh::tls::certs_from_pem(cert_pem.as_bytes())
            .expect("pem")
            .remove(0);
        Self {
            cert,
            key_pem,
            issuer,
        }
    }

    /// A workload certificate for `spiffe_id`, valid from `not_before` to `not_after`
    /// relative to now.
    pub fn leaf(
        &self,
        spiffe_id: &str,
        not_before: Duration,
        not_after: Duration,
        expired: bool,
    ) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - not_before;
            params.not_after = now - not_after;
        } else {
            params.not_before = now - not_before;
            params.not_after = now + not_after;
        }
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    pub fn pem(&self) -> String {
        tessera_mesh::tls::der_to_pem(&self.cert)
    }
}

/// A leaf certificate with its key, ready for a rustls config.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(30 * 24 * 3600);
    params
}

/// A CSR with the given URI SANs (and optionally asking to be a CA).
pub fn csr(uris: &[&str], is_ca: bool) -> Vec<u8> {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("uri")))
        .collect();
    if is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    params.serialize_request(&key).expect("csr").der().to_vec()
}
