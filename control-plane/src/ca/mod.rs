//! The certificate authority: turns an authenticated CSR into an X.509-SVID.
//!
//! Either a development root created on first start in the state directory, or a
//! plug-in intermediate loaded from the four PEM files operators know from Istio or from
//! a cert-manager Secret (`layout`), re-read when it changes (`reload`); `create` makes a
//! root and an intermediate for operators who have no PKI. The CA decides every field of
//! the certificate itself; from the CSR it takes only the public key, after checking that
//! the request asks for nothing it may not have.

pub mod create;
pub mod layout;
pub mod reload;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ParsedPublicKey};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use tessera_mesh::SpiffeId;
use tessera_mesh::tls::{self, TrustBundle};
use time::OffsetDateTime;

/// Clock skew tolerated between the CA and the workloads verifying its certificates.
const BACKDATE: Duration = Duration::from_secs(60);
const DEV_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the CA cannot start.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("CA certificate or key unusable: {0}")]
    Material(String),
}

/// Why a CSR is refused. Each maps to a gRPC status the caller can act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrRefusal {
    #[error("CSR cannot be parsed or its signature does not verify")]
    Malformed,
    #[error("CSR key must be ECDSA P-256 with an uncompressed point; it is a {found}")]
    KeyAlgorithm { found: String },
    #[error("CSR must be signed with ecdsa-with-SHA256 by its own key; it is signed with {found}")]
    SignatureAlgorithm { found: String },
    #[error(
        "CSR signature does not verify with the key it carries (tampered, or signed by another key)"
    )]
    Signature,
    #[error("CSR asks for a CA certificate; workloads get end-entity certificates only")]
    AsksForCa,
    #[error("CSR must carry exactly one SAN, a URI; it has {uris} URI and {others} other SANs")]
    SanShape { uris: usize, others: usize },
    #[error("CSR is for {requested}, but the caller is authenticated as {authenticated}")]
    IdentityMismatch {
        requested: String,
        authenticated: SpiffeId,
    },
}

/// A signed workload certificate.
pub struct Issued {
    /// Leaf first, then intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// When a CA's own certificates expire: no certificate it signs verifies past either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaExpiry {
    /// The earliest expiry among the roots that what this CA signs chains to (the
    /// bundle's other roots, announced for a rotation or retired, are not its concern).
    pub root: OffsetDateTime,
    /// The earliest expiry among the signing certificate and the intermediates above
    /// it; `None` when a root signs (the development root).
    pub intermediate: Option<OffsetDateTime>,
}

/// A CA able to sign workload certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate and the intermediates above it, excluding roots.
    chain: Vec<CertificateDer<'static>>,
    trust_bundle: Vec<CertificateDer<'static>>,
    /// The certificate that signs (for fingerprints and change detection).
    signer: CertificateDer<'static>,
    signer_not_after: OffsetDateTime,
}

/// Names the signer and counts the roots; never shows the key.
impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("signer_sha256", &layout::sha256_fingerprint(&self.signer))
            .field("signer_not_after", &self.signer_not_after)
            .field("trust_bundle_roots", &self.trust_bundle.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the development root from `state_dir`, creating it on first start.
    pub fn dev_root(state_dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert_path = state_dir.join("ca-cert.pem");
        let key_path = state_dir.join("ca-key.pem");
        if !cert_path.exists() {
            create_dev_root(state_dir, trust_domain)?;
        }
        let cert_pem = read(&cert_path)?;
        let key_pem = crate::state::read_private(&key_path)?;
        let cert = tls::certs_from_pem(cert_pem.as_bytes())
            .map_err(|e| file_error(&cert_path, e))?
            .remove(0);
        Self::from_parts(
            cert.clone(),
            &key_pem,
            Vec::new(),
            vec![cert],
            layout::FileNames::DEV_ROOT,
        )
    }

    /// Loads a plug-in intermediate from `dir`, in whichever layout its files are (see
    /// [`layout`]): Istio's `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
    /// `root-cert.pem`, or a cert-manager Secret's `tls.crt`, `tls.key`, `ca.crt`.
    pub fn plugin(dir: &Path) -> Result<Self, CaError> {
        layout::PluginFiles::read(dir)?.load()
    }

    /// A CA from its parts. `names` are the files they came from, for errors.
    fn from_parts(
        signer: CertificateDer<'static>,
        key_pem: &str,
        intermediates: Vec<CertificateDer<'static>>,
        trust_bundle: Vec<CertificateDer<'static>>,
        names: layout::FileNames,
    ) -> Result<Self, CaError> {
        let material = |e: rcgen::Error| CaError::Material(format!("{}: {e}", names.key));
        let key = KeyPair::from_pem(key_pem).map_err(material)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&signer).map_err(|_| {
            CaError::Material(format!(
                "{}: the CA certificate is not valid X.509",
                names.cert
            ))
        })?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Material(format!(
                "{} is not the key of {}",
                names.key, names.cert
            )));
        }
        if !parsed.is_ca() {
            return Err(CaError::Material(format!(
                "{} is not a CA certificate",
                names.cert
            )));
        }
        let material = |e: rcgen::Error| CaError::Material(e.to_string());
        let signer_not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&signer, key).map_err(material)?;
        // Peers hold the roots already; a chain carries only what leads to them.
        let mut chain = Vec::with_capacity(intermediates.len() + 1);
        if !trust_bundle.contains(&signer) {
            chain.push(signer.clone());
        }
        chain.extend(intermediates);
        let ca = Self {
            issuer,
            chain,
            trust_bundle,
            signer,
            signer_not_after,
        };
        ca.self_check()?;
        Ok(ca)
    }

    /// Every root the mesh trusts.
    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.trust_bundle
    }

    /// When the signing certificate expires: nothing it signs outlives it.
    pub fn signer_not_after(&self) -> OffsetDateTime {
        self.signer_not_after
    }

    /// The signing certificate (the intermediate of a plug-in CA, or the root).
    pub fn signer(&self) -> &CertificateDer<'static> {
        &self.signer
    }

    /// When this CA's root and intermediate certificates expire, for the expiry metric.
    pub fn expiry(&self) -> CaExpiry {
        CaExpiry {
            // The anchors were parsed when the CA loaded; the signer bounds them anyway.
            root: self
                .anchors()
                .iter()
                .filter_map(not_after)
                .min()
                .unwrap_or(self.signer_not_after),
            intermediate: self.chain.iter().filter_map(not_after).min(),
        }
    }

    /// Signs a certificate for `identity`, valid for `ttl` (cut short by the CA's own
    /// expiry), with the public key of an already validated CSR.
    pub fn issue(
        &self,
        csr: &CertificateSigningRequestParams,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Issued, CaError> {
        self.issue_for_key(&csr.public_key, identity, ttl)
    }

    /// Issues a certificate for a key made here: the control plane's own serving
    /// certificate, which needs no CSR round trip.
    pub fn issue_with_new_key(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<(Issued, KeyPair), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Material(e.to_string()))?;
        let issued = self.issue_for_key(&key, identity, ttl)?;
        Ok((issued, key))
    }

    /// Issues a TLS server certificate for `dns_names` and `ips` (the admission
    /// webhook's), for a key made here. Unlike an SVID it names a host, not a workload:
    /// the Kubernetes API server checks it by DNS name against the `caBundle`.
    pub fn issue_server_cert(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(Issued, KeyPair), CaError> {
        let material = |e: rcgen::Error| CaError::Material(e.to_string());
        let key = KeyPair::generate().map_err(material)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        for name in dns_names {
            let name = (*name).try_into().map_err(material)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = self.sign(&key, params, ttl)?;
        Ok((issued, key))
    }

    fn issue_for_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, identity.trust_domain());
        params.subject_alt_names =
            vec![SanType::URI(identity.as_str().try_into().map_err(
                |e: rcgen::Error| CaError::Material(e.to_string()),
            )?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(public_key, params, ttl)
    }

    /// Signs an end-entity certificate: `params` say who it is for, the CA decides the
    /// rest (validity cut short by its own expiry, serial, key usage, not a CA).
    fn sign(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        mut params: CertificateParams,
        ttl: Duration,
    ) -> Result<Issued, CaError> {
        let now = OffsetDateTime::from(SystemTime::now());
        let not_after = (now + ttl).min(self.signer_not_after);
        let serial = random_serial();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = now - BACKDATE;
        params.not_after = not_after;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| CaError::Material(e.to_string()))?;
        let mut chain = Vec::with_capacity(self.chain.len() + 1);
        chain.push(leaf.der().clone());
        chain.extend(self.chain.iter().cloned());
        Ok(Issued {
            chain,
            serial: hex(&serial),
            not_after,
        })
    }

    /// Issues a throwaway certificate and verifies it against the trust bundle, so a
    /// plug-in chain that leads to no trusted root fails at start, not at first use.
    fn self_check(&self) -> Result<(), CaError> {
        let chain = self.probe_chain()?;
        let bundle = TrustBundle::new(self.trust_bundle.clone())
            .map_err(|e| CaError::Material(format!("trust bundle: {e}")))?;
        tls::verify_chain(&bundle, &chain).map_err(|e| {
            CaError::Material(format!(
                "certificates signed by this CA do not verify against the trust bundle: {e}"
            ))
        })
    }
}

impl CertificateAuthority {
    /// A throwaway certificate's chain, as a workload would present it.
    fn probe_chain(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let probe_key = KeyPair::generate().map_err(|e| CaError::Material(e.to_string()))?;
        let probe_id = SpiffeId::new("self-check.invalid", "tessera", "probe")
            .map_err(|e| CaError::Material(e.to_string()))?;
        Ok(self
            .issue_for_key(&probe_key, &probe_id, Duration::from_secs(60))?
            .chain)
    }

    /// The roots of the bundle that what this CA signs verifies against: the ones peers
    /// must trust before it signs (the bundle may hold others, e.g. a root announced for
    /// the next rotation). All of them if the probe cannot be made.
    pub(crate) fn anchors(&self) -> Vec<CertificateDer<'static>> {
        let Ok(chain) = self.probe_chain() else {
            return self.trust_bundle.clone();
        };
        let anchors: Vec<_> = self
            .trust_bundle
            .iter()
            .filter(|root| {
                TrustBundle::new(vec![(*root).clone()])
                    .is_ok_and(|alone| tls::verify_chain(&alone, &chain).is_ok())
            })
            .cloned()
            .collect();
        if anchors.is_empty() {
            self.trust_bundle.clone()
        } else {
            anchors
        }
    }
}

/// Checks a CSR against the identity its caller proved, returning it parsed.
pub fn validate_csr(
    csr_der: &[u8],
    authenticated: &SpiffeId,
) -> Result<CertificateSigningRequestParams, CsrRefusal> {
    check_key_and_signature(csr_der)?;
    let csr =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|_| CsrRefusal::Malformed)?;
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(CsrRefusal::AsksForCa);
    }
    let sans = &csr.params.subject_alt_names;
    let uris: Vec<&str> = sans
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    let [requested] = uris.as_slice() else {
        return Err(CsrRefusal::SanShape {
            uris: uris.len(),
            others: sans.len() - uris.len(),
        });
    };
    if sans.len() != 1 {
        return Err(CsrRefusal::SanShape {
            uris: 1,
            others: sans.len() - 1,
        });
    }
    if *requested != authenticated.as_str() {
        return Err(CsrRefusal::IdentityMismatch {
            requested: requested.chars().take(256).collect(),
            authenticated: authenticated.clone(),
        });
    }
    Ok(csr)
}

/// Accepts only the key workloads make: ECDSA P-256 as an uncompressed point on the
/// curve, with the CSR signed by that very key using ecdsa-with-SHA256. The key is read
/// from the SubjectPublicKeyInfo itself: the signature algorithm says nothing about the
/// curve (a P-384 key signs with ecdsa-with-SHA256 too), and the certificate labels
/// whatever point it is given as the curve its algorithm names.
fn check_key_and_signature(csr_der: &[u8]) -> Result<(), CsrRefusal> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
    };
    use x509_parser::prelude::FromDer;

    let key_refused = |found: String| CsrRefusal::KeyAlgorithm { found };
    let (rest, csr) =
        X509CertificationRequest::from_der(csr_der).map_err(|_| CsrRefusal::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrRefusal::Malformed);
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(key_refused(format!(
            "{} key",
            oid_name(&spki.algorithm.algorithm)
        )));
    }
    match spki.algorithm.parameters.as_ref().map(|p| p.as_oid()) {
        Some(Ok(curve)) if curve == OID_EC_P256 => {}
        Some(Ok(curve)) => {
            return Err(key_refused(format!("EC key on curve {}", oid_name(&curve))));
        }
        _ => return Err(key_refused("EC key without a named curve".into())),
    }
    let point = spki.subject_public_key.data.as_ref();
    if spki.subject_public_key.unused_bits != 0 || point.len() != 65 || point[0] != 0x04 {
        return Err(key_refused(format!(
            "P-256 point of {} bytes, not an uncompressed 65-byte point",
            point.len()
        )));
    }
    // Parsing checks the point lies on the curve.
    let key = ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
        .map_err(|_| key_refused("P-256 point that is not on the curve".into()))?;
    let signature_algorithm = &csr.signature_algorithm;
    if signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256
        || signature_algorithm.parameters.is_some()
    {
        return Err(CsrRefusal::SignatureAlgorithm {
            found: oid_name(&signature_algorithm.algorithm),
        });
    }
    if csr.signature_value.unused_bits != 0 {
        return Err(CsrRefusal::Malformed);
    }
    key.verify_sig(info.raw, &csr.signature_value.data)
        .map_err(|_| CsrRefusal::Signature)
}

/// An OID's short name when the registry knows it, else its dotted form.
fn oid_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry())
        .map_or_else(|_| oid.to_id_string(), str::to_string)
}

fn create_dev_root(state_dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    let material = |e: rcgen::Error| CaError::Material(e.to_string());
    let key = KeyPair::generate().map_err(material)?;
    let now = OffsetDateTime::from(SystemTime::now());
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, "Tessera development root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + DEV_ROOT_LIFETIME;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let cert = params.self_signed(&key).map_err(material)?;
    crate::state::write_private(
        &state_dir.join("ca-key.pem"),
        key.serialize_pem().as_bytes(),
    )?;
    crate::state::write_public(&state_dir.join("ca-cert.pem"), cert.pem().as_bytes())?;
    tracing::info!(
        event = "development root created",
        trust_domain,
        path = %state_dir.display(),
        "created a development root CA; use a plug-in intermediate in production"
    );
    Ok(())
}

/// A certificate's notAfter; `None` when it is not X.509.
pub(crate) fn not_after(cert: &CertificateDer<'_>) -> Option<OffsetDateTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.validity().not_after.to_datetime())
}

fn random_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as RFC 5280 wants.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| file_error(path, e))
}

pub(crate) fn file_error(path: &Path, reason: impl std::fmt::Display) -> CaError {
    CaError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    fn csr(sans: Vec<SanType>, is_ca: IsCa) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.is_ca = is_ca;
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uri(id: &SpiffeId) -> SanType {
        SanType::URI(id.as_str().try_into().unwrap())
    }

    #[test]
    fn issues_an_svid_as_spec_says() {
        let dir = tempdir();
        let ca = CertificateAuthority::dev_root(&dir, "cluster.local").unwrap();
        let request = validate_csr(&csr(vec![uri(&id("api"))], IsCa::NoCa), &id("api")).unwrap();
        let issued = ca
            .issue(&request, &id("api"), Duration::from_secs(3600))
            .unwrap();
        assert_eq!(issued.chain.len(), 1);
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        assert!(!cert.is_ca());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(tls::spiffe_id_of(&issued.chain[0]).unwrap(), id("api"));
        let lifetime =
            cert.validity().not_after.timestamp() - OffsetDateTime::now_utc().unix_timestamp();
        assert!((3590..=3600).contains(&lifetime), "{lifetime}");
        let bundle = TrustBundle::new(ca.trust_bundle().to_vec()).unwrap();
        tls::verify_chain(&bundle, &issued.chain).unwrap();
        // The key stays private to the state directory.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A restart loads the same root.
        let again = CertificateAuthority::dev_root(&dir, "cluster.local").unwrap();
        assert_eq!(again.trust_bundle(), ca.trust_bundle());
    }

    #[test]
    fn refuses_csrs_asking_too_much() {
        let me = id("api");
        assert_eq!(
            validate_csr(&csr(vec![uri(&id("db"))], IsCa::NoCa), &me).unwrap_err(),
            CsrRefusal::IdentityMismatch {
                requested: id("db").to_string(),
                authenticated: me.clone()
            }
        );
        assert_eq!(
            validate_csr(
                &csr(vec![uri(&me)], IsCa::Ca(BasicConstraints::Unconstrained)),
                &me
            )
            .unwrap_err(),
            CsrRefusal::AsksForCa
        );
        assert_eq!(
            validate_csr(&csr(vec![uri(&me), uri(&id("db"))], IsCa::NoCa), &me).unwrap_err(),
            CsrRefusal::SanShape { uris: 2, others: 0 }
        );
        let dns = SanType::DnsName("evil.example".try_into().unwrap());
        assert_eq!(
            validate_csr(&csr(vec![uri(&me), dns], IsCa::NoCa), &me).unwrap_err(),
            CsrRefusal::SanShape { uris: 1, others: 1 }
        );
        assert_eq!(
            validate_csr(&csr(vec![], IsCa::NoCa), &me).unwrap_err(),
            CsrRefusal::SanShape { uris: 0, others: 0 }
        );
        assert_eq!(
            validate_csr(b"garbage", &me).unwrap_err(),
            CsrRefusal::Malformed
        );
        let mut tampered = csr(vec![uri(&me)], IsCa::NoCa);
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            validate_csr(&tampered, &me).unwrap_err(),
            CsrRefusal::Signature
        );
    }

    /// A CSR with `key`'s public key but a signature made with `signer`: the request
    /// info of one, the signature of the other, spliced (same lengths for P-256).
    fn mismatched_signature_csr(sans: Vec<SanType>) -> Vec<u8> {
        let signer = KeyPair::generate().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let mut csr = params.serialize_request(&signer).unwrap().der().to_vec();
        let theirs = signer.public_key_raw().to_vec();
        let at = csr.windows(theirs.len()).position(|w| w == theirs).unwrap();
        csr[at..at + theirs.len()].copy_from_slice(key.public_key_raw());
        csr
    }

    /// Every shape of CSR key and signature: only an ECDSA P-256 key with an
    /// uncompressed point on the curve, signed by itself with ecdsa-with-SHA256, passes.
    /// The openssl-made fixtures name spiffe://cluster.local/ns/shop/sa/api, so the key
    /// is the only thing wrong with them (see testdata/csr/README.md).
    #[test]
    fn refuses_every_key_but_p256() {
        let me = id("api");
        let ed25519 = {
            let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![uri(&me)];
            params.serialize_request(&key).unwrap().der().to_vec()
        };
        let p384_sha384 = {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![uri(&me)];
            params.serialize_request(&key).unwrap().der().to_vec()
        };
        let key_refused = |found: &str| {
            Err(CsrRefusal::KeyAlgorithm {
                found: found.to_string(),
            })
        };
        let table: Vec<(&str, Vec<u8>, Result<(), CsrRefusal>)> = vec![
            ("P-256", csr(vec![uri(&me)], IsCa::NoCa), Ok(())),
            (
                "P-384, ecdsa-with-SHA256",
                include_bytes!("../testdata/csr/p384-sha256.der").to_vec(),
                key_refused("EC key on curve secp384r1"),
            ),
            (
                "P-384, ecdsa-with-SHA384",
                p384_sha384,
                key_refused("EC key on curve secp384r1"),
            ),
            (
                "P-521",
                include_bytes!("../testdata/csr/p521-sha256.der").to_vec(),
                key_refused("EC key on curve secp521r1"),
            ),
            (
                "secp256k1",
                include_bytes!("../testdata/csr/secp256k1-sha256.der").to_vec(),
                key_refused("EC key on curve 1.3.132.0.10"),
            ),
            (
                "RSA-2048",
                include_bytes!("../testdata/csr/rsa2048-sha256.der").to_vec(),
                key_refused("rsaEncryption key"),
            ),
            ("Ed25519", ed25519, key_refused("ed25519 key")),
            (
                "P-256, compressed point",
                include_bytes!("../testdata/csr/p256-compressed-sha256.der").to_vec(),
                key_refused("P-256 point of 33 bytes, not an uncompressed 65-byte point"),
            ),
            (
                "P-256, signature by another key",
                mismatched_signature_csr(vec![uri(&me)]),
                Err(CsrRefusal::Signature),
            ),
            (
                "P-256, ecdsa-with-SHA384",
                include_bytes!("../testdata/csr/p256-sha384.der").to_vec(),
                Err(CsrRefusal::SignatureAlgorithm {
                    found: "ecdsa-with-SHA384".to_string(),
                }),
            ),
        ];
        let mut wrong = Vec::new();
        for (shape, der, expected) in table {
            let outcome = validate_csr(&der, &me).map(|_| ());
            if outcome != expected {
                wrong.push(format!("{shape}: got {outcome:?}, want {expected:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// A P-256 "point" that is not on the curve: the key is refused, even when the
    /// signature would be checked second.
    #[test]
    fn refuses_a_p256_point_off_the_curve() {
        let me = id("api");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri(&me)];
        let mut der = params.serialize_request(&key).unwrap().der().to_vec();
        let point = key.public_key_raw().to_vec();
        let at = der.windows(point.len()).position(|w| w == point).unwrap();
        // Keep x, change y: (x, y+1) is not on the curve.
        der[at + 64] ^= 1;
        assert_eq!(
            validate_csr(&der, &me).unwrap_err(),
            CsrRefusal::KeyAlgorithm {
                found: "P-256 point that is not on the curve".to_string()
            }
        );
    }

    /// The certificate holds exactly the CSR's 65-byte P-256 point, and its SPKI is the
    /// CSR's byte for byte (what `openssl x509` failed to load when they differed).
    #[test]
    fn the_certificate_holds_the_csr_key() {
        let ca = CertificateAuthority::dev_root(&tempdir(), "cluster.local").unwrap();
        let der = csr(vec![uri(&id("api"))], IsCa::NoCa);
        let request = validate_csr(&der, &id("api")).unwrap();
        let issued = ca
            .issue(&request, &id("api"), Duration::from_secs(3600))
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let (_, parsed_csr) =
            <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(&der)
                .unwrap();
        assert_eq!(
            cert.public_key().raw,
            parsed_csr.certification_request_info.subject_pki.raw
        );
        assert_eq!(cert.public_key().subject_public_key.data.len(), 65);
    }

    #[test]
    fn issues_a_server_certificate_for_names_and_addresses() {
        let ca = CertificateAuthority::dev_root(&tempdir(), "cluster.local").unwrap();
        let localhost = IpAddr::from([127, 0, 0, 1]);
        let (issued, key) = ca
            .issue_server_cert(
                &["webhook.tessera-system.svc", "localhost"],
                &[localhost],
                Duration::from_secs(3600),
            )
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|name| name.to_string())
            .collect();
        assert_eq!(
            sans,
            [
                "DNSName(webhook.tessera-system.svc)",
                "DNSName(localhost)",
                "IPAddress(7f:00:00:01)"
            ]
        );
        assert!(tls::spiffe_id_of(&issued.chain[0]).is_err());
        let bundle = TrustBundle::new(ca.trust_bundle().to_vec()).unwrap();
        tls::verify_chain(&bundle, &issued.chain).unwrap();
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-ca-test-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
