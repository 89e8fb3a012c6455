//! Certificates for the HAProxy pair: a CA of the run's own (rcgen), and one ECDSA P-256
//! leaf per side — the same key type Tessera's workload certificates use — so both pairs
//! pay for the same kind of handshake.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::error::{BenchError, Result};

/// DNS name the server-side HAProxy proves and the client-side one checks.
pub const SERVER_NAME: &str = "server.bench.local";

/// PEM files for a mutually authenticated pair.
pub struct PairCerts {
    pub ca_pem: String,
    /// Certificate then key, as HAProxy's `crt` wants them.
    pub server_pem: String,
    pub client_pem: String,
}

impl PairCerts {
    pub fn generate() -> Result<Self> {
        let ca_key = key()?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tessera bench CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(rcgen_error)?;
        let issuer = Issuer::new(ca_params, ca_key);
        Ok(Self {
            ca_pem: ca_cert.pem(),
            server_pem: leaf(&issuer, "server")?,
            client_pem: leaf(&issuer, "client")?,
        })
    }
}

fn leaf(issuer: &Issuer<'_, KeyPair>, name: &str) -> Result<String> {
    let key = key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![SanType::DnsName(
        SERVER_NAME.try_into().map_err(rcgen_error)?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, issuer).map_err(rcgen_error)?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

fn key() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_error)
}

fn rcgen_error(error: rcgen::Error) -> BenchError {
    BenchError::failed("generate the HAProxy pair's certificates", error)
}
