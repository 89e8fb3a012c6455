//! TLS as the mesh speaks it: TLS 1.3 only, certificates chained to the trust bundle, and
//! the peer named by the single SPIFFE URI SAN of its certificate.
//!
//! webpki knows nothing of URI SANs, so both verifiers here first let webpki check the
//! chain, validity and key usage, then read the SPIFFE ID themselves. The current
//! certificate and the trust bundle are held behind atomic pointers: a renewal or a new
//! root reaches the next handshake without rebuilding any config or touching open
//! connections.

use std::fmt;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// The one crypto provider of every Tessera binary: AWS-LC, which also gives the hybrid
/// post-quantum key exchange X25519MLKEM768 (preferred by default).
///
/// TLS 1.3 suites are ordered AES-128-GCM-SHA256 first: both ends are Tessera, and
/// SHA-256 runs on the SHA extensions most x86 and ARM CPUs have while SHA-384 does not
/// (measured: ~8 % of a handshake's CPU was software SHA-512), and AES-128 is cheaper
/// per byte. AES-256 and ChaCha20 stay available for peers that prefer them.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider.cipher_suites.sort_by_key(|suite| {
                suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            });
            Arc::new(provider)
        })
        .clone()
}

/// Installs [`crypto_provider`] as the process default; call first thing in `main`.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is the state we want.
    let _ = CryptoProvider::install_default((*crypto_provider()).clone());
}

/// Why a certificate, key or bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate found in PEM input")]
    NoCertificate,
    #[error("malformed PEM: {0}")]
    Pem(String),
    #[error("trust bundle is empty or unusable: {0}")]
    Bundle(String),
    #[error("certificate cannot be parsed as X.509")]
    Unparsable,
    #[error("certificate has {0} URI SANs; a workload certificate has exactly one")]
    UriSanCount(usize),
    #[error("certificate identity: {0}")]
    Identity(#[from] SpiffeIdError),
    #[error("peer {peer} belongs to trust domain {found:?}, not {expected:?}")]
    ForeignTrustDomain {
        peer: SpiffeId,
        found: String,
        expected: String,
    },
    #[error("peer presented {presented}, but {expected} was expected")]
    UnexpectedPeer {
        presented: SpiffeId,
        expected: SpiffeId,
    },
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// Parses every certificate in a PEM document.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// Parses the first private key in a PEM document.
pub fn private_key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem(e.to_string()))
}

/// Reads the SPIFFE ID out of a workload certificate: its one and only URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|_| TlsError::Unparsable)?;
    let uris: Vec<&str> = match parsed.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return Err(TlsError::Unparsable),
    };
    match uris.as_slice() {
        [uri] => Ok(uri.parse()?),
        _ => Err(TlsError::UriSanCount(uris.len())),
    }
}

/// The roots the mesh trusts. Several while a root is being rotated.
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    /// webpki's chain check for client certificates, built once per bundle.
    client_chain_verifier: Arc<dyn ClientCertVerifier>,
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(roots.iter().cloned());
        if added == 0 || ignored > 0 {
            return Err(TlsError::Bundle(format!(
                "{added} usable roots, {ignored} unusable"
            )));
        }
        let store = Arc::new(store);
        let client_chain_verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), crypto_provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Bundle(e.to_string()))?;
        Ok(Self {
            roots,
            store,
            client_chain_verifier,
        })
    }

    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        Self::new(certs_from_pem(pem)?)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The bundle as PEM, one certificate after the other.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|der| der_to_pem(der)).collect()
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.roots.len())
    }
}

/// Encodes one certificate as PEM.
pub fn der_to_pem(der: &CertificateDer<'_>) -> String {
    use std::fmt::Write;
    const LINE: usize = 64;
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::with_capacity(encoded.len() + encoded.len() / LINE + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in encoded.as_bytes().chunks(LINE) {
        // Chunks of an ASCII string are ASCII.
        let _ = writeln!(pem, "{}", String::from_utf8_lossy(chunk));
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// What a workload trusts: its trust domain and the current bundle, swappable at runtime.
#[derive(Debug)]
pub struct Trust {
    trust_domain: String,
    bundle: ArcSwap<TrustBundle>,
}

impl Trust {
    pub fn new(trust_domain: impl Into<String>, bundle: TrustBundle) -> Arc<Self> {
        Arc::new(Self {
            trust_domain: trust_domain.into(),
            bundle: ArcSwap::from_pointee(bundle),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// Replaces the bundle; the next handshake uses the new one.
    pub fn replace_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Arc::new(bundle));
    }

    /// Checks that a chain-verified certificate names a peer of our trust domain.
    fn peer_identity(&self, end_entity: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
        let peer = spiffe_id_of(end_entity)?;
        if peer.trust_domain() != self.trust_domain {
            return Err(TlsError::ForeignTrustDomain {
                found: peer.trust_domain().to_string(),
                expected: self.trust_domain.clone(),
                peer,
            });
        }
        Ok(peer)
    }
}

fn rejected(error: TlsError) -> rustls::Error {
    match error {
        TlsError::Rustls(inner) => inner,
        other => {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(other))))
        }
    }
}

/// Verifies client certificates: chain to the bundle, clientAuth EKU, one SPIFFE ID of
/// our trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    trust: Arc<Trust>,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Workloads hold exactly one certificate, so hints would change nothing.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.trust.bundle.load();
        bundle
            .client_chain_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        self.trust.peer_identity(end_entity).map_err(rejected)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies a server certificate: chain to the bundle, serverAuth EKU, and exactly the
/// SPIFFE ID the caller expects to reach. The TLS server name plays no part.
#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: Arc<Trust>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let bundle = self.trust.bundle.load();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &bundle.store,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = self.trust.peer_identity(end_entity).map_err(rejected)?;
        if presented != self.expected {
            return Err(rejected(TlsError::UnexpectedPeer {
                presented,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The workload's own certificate and key, replaced atomically on renewal.
#[derive(Debug, Default)]
pub struct CurrentCert(ArcSwapOption<CertifiedKey>);

impl CurrentCert {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set(&self, key: CertifiedKey) {
        self.0.store(Some(Arc::new(key)));
    }

    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// mTLS: no certificate, no connection. The data plane.
    Required,
    /// A certificate is verified if presented. The control plane, where a proxy without a
    /// certificate yet authenticates with a join token instead.
    Optional,
}

/// A TLS 1.3 server config presenting `cert` and verifying clients against `trust`.
///
/// Session resumption is off: every connection proves its identity with a full handshake
/// against the current bundle.
pub fn server_config(
    trust: Arc<Trust>,
    cert: Arc<CurrentCert>,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        trust,
        mandatory: client_auth == ClientAuth::Required,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS 1.3 client config that accepts only a server proving `expected`, presenting
/// `cert` (if any) as client certificate.
pub fn client_config(
    trust: Arc<Trust>,
    expected: SpiffeId,
    cert: Option<Arc<CurrentCert>>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        trust,
        expected,
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(cert),
        None => builder.with_no_client_auth(),
    };
    config.resumption = Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Verifies a chain (leaf first) against the bundle as a TLS peer would, ignoring names.
pub fn verify_chain(bundle: &TrustBundle, chain: &[CertificateDer<'_>]) -> Result<(), TlsError> {
    let (leaf, intermediates) = chain.split_first().ok_or(TlsError::NoCertificate)?;
    let parsed = ParsedCertificate::try_from(leaf)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &bundle.store,
        intermediates,
        UnixTime::now(),
        crypto_provider().signature_verification_algorithms.all,
    )?;
    Ok(())
}

/// The SPIFFE ID of the peer of an established connection, if it presented a certificate.
pub fn peer_identity(connection: &rustls::CommonState) -> Option<SpiffeId> {
    let end_entity = connection.peer_certificates()?.first()?;
    spiffe_id_of(end_entity).ok()
}

/// The server name handed to the TLS client: the peer's address, which rustls does not
/// send as SNI, so identities never travel in clear. Verification ignores it.
pub fn server_name_for(addr: std::net::SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root and a workload certificate for `sa` signed by it.
    struct Pki {
        root: CertificateDer<'static>,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    impl Pki {
        fn new() -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
            let root = params.self_signed(&key).unwrap().der().clone();
            Self {
                root,
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        fn workload(&self, sa: &str) -> Arc<CurrentCert> {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            let uri = format!("spiffe://td/ns/ns/sa/{sa}");
            params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
            let current = CurrentCert::new();
            current.set(
                CertifiedKey::from_der(vec![cert.der().clone()], der, &crypto_provider()).unwrap(),
            );
            current
        }

        fn trust(&self) -> Arc<Trust> {
            Trust::new("td", TrustBundle::new(vec![self.root.clone()]).unwrap())
        }
    }

    /// Runs a handshake in memory; returns both connections or the first error.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut client = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut server = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets()?;
        }
        Ok((client, server))
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("td", "ns", sa).unwrap()
    }

    #[test]
    fn mutual_tls_names_both_peers_over_tls13_with_hybrid_kx() {
        let pki = Pki::new();
        let server =
            server_config(pki.trust(), pki.workload("api"), ClientAuth::Required, &[]).unwrap();
        let client = client_config(pki.trust(), id("api"), Some(pki.workload("web")), &[]).unwrap();
        let (client, server) = handshake(client, server).unwrap();
        assert_eq!(peer_identity(&server), Some(id("web")));
        assert_eq!(peer_identity(&client), Some(id("api")));
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let group = client.negotiated_key_exchange_group().unwrap().name();
        assert_eq!(group, rustls::NamedGroup::X25519MLKEM768);
        let suite = client.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }

    #[test]
    fn refuses_wrong_identity_unknown_root_and_missing_client_cert() {
        let pki = Pki::new();
        let server =
            || server_config(pki.trust(), pki.workload("api"), ClientAuth::Required, &[]).unwrap();

        let expects_db =
            client_config(pki.trust(), id("db"), Some(pki.workload("web")), &[]).unwrap();
        let error = handshake(expects_db, server()).unwrap_err();
        let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = &error else {
            panic!("{error}");
        };
        let reason = other.0.downcast_ref::<TlsError>().unwrap().to_string();
        assert_eq!(
            reason,
            "peer presented spiffe://td/ns/ns/sa/api, but spiffe://td/ns/ns/sa/db was expected"
        );

        let foreign = Pki::new();
        let stranger =
            client_config(pki.trust(), id("api"), Some(foreign.workload("web")), &[]).unwrap();
        assert!(handshake(stranger, server()).is_err());

        let anonymous = client_config(pki.trust(), id("api"), None, &[]).unwrap();
        assert!(handshake(anonymous, server()).is_err());

        // Optional client auth (the control plane) lets the anonymous client in, unnamed.
        let optional =
            server_config(pki.trust(), pki.workload("api"), ClientAuth::Optional, &[]).unwrap();
        let anonymous = client_config(pki.trust(), id("api"), None, &[]).unwrap();
        let (_, server) = handshake(anonymous, optional).unwrap();
        assert_eq!(peer_identity(&server), None);
    }

    #[test]
    fn a_new_bundle_applies_to_the_next_handshake() {
        let old = Pki::new();
        let new = Pki::new();
        let trust = old.trust();
        let server = || {
            server_config(
                trust.clone(),
                old.workload("api"),
                ClientAuth::Required,
                &[],
            )
            .unwrap()
        };
        let client =
            || client_config(new.trust(), id("api"), Some(new.workload("web")), &[]).unwrap();
        // The client trusts only the new root; the server's own cert is from the old one.
        let client_trusting_both = client_config(
            Trust::new(
                "td",
                TrustBundle::new(vec![old.root.clone(), new.root.clone()]).unwrap(),
            ),
            id("api"),
            Some(new.workload("web")),
            &[],
        )
        .unwrap();
        assert!(handshake(client(), server()).is_err());
        assert!(
            handshake(client_trusting_both, server()).is_err(),
            "server does not trust the new root yet"
        );
        trust.replace_bundle(TrustBundle::new(vec![old.root.clone(), new.root.clone()]).unwrap());
        let client_trusting_both = client_config(
            Trust::new(
                "td",
                TrustBundle::new(vec![old.root.clone(), new.root.clone()]).unwrap(),
            ),
            id("api"),
            Some(new.workload("web")),
            &[],
        )
        .unwrap();
        assert!(handshake(client_trusting_both, server()).is_ok());
    }

    #[test]
    fn reads_the_single_uri_san() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://td/ns/a/sa/b".try_into().unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            spiffe_id_of(cert.der()).unwrap().as_str(),
            "spiffe://td/ns/a/sa/b"
        );

        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://td/ns/a/sa/c".try_into().unwrap(),
        ));
        let two = params.self_signed(&key).unwrap();
        assert!(matches!(
            spiffe_id_of(two.der()),
            Err(TlsError::UriSanCount(2))
        ));

        params.subject_alt_names = vec![rcgen::SanType::DnsName("a.b".try_into().unwrap())];
        let none = params.self_signed(&key).unwrap();
        assert!(matches!(
            spiffe_id_of(none.der()),
            Err(TlsError::UriSanCount(0))
        ));
    }

    #[test]
    fn pem_round_trip() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        let pem = der_to_pem(cert.der());
        assert_eq!(pem, cert.pem());
        assert_eq!(
            certs_from_pem(pem.as_bytes()).unwrap(),
            vec![cert.der().clone()]
        );
    }
}
