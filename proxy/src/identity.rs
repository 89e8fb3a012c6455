//! The workload's identity: a key made here, a certificate from the control plane, and
//! renewal before it runs out.
//!
//! The private key is generated in memory for every certificate and never written or
//! sent anywhere. Renewal happens at 50–70 % of the remaining lifetime (jittered, so a
//! fleet started together does not renew together); while the control plane is
//! unreachable the proxy retries with capped exponential backoff and keeps serving on the
//! certificate it has until that expires.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rand::Rng;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tessera_mesh::SpiffeId;
use tessera_mesh::tls::{self, CurrentCert, Trust, TrustBundle};
use tessera_proto::api::identity::CertifyRequest;
use tessera_proto::api::identity::identity_client::IdentityClient;
use tracing::{info, warn};

use crate::config::Bootstrap;
use crate::control_plane::{self, ControlPlane};
use crate::telemetry::Metrics;

const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why getting a certificate failed this time.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CertifyError {
    #[error("control plane unreachable at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("control plane refused: {0}")]
    Refused(String),
    #[error("control plane answered with an unusable certificate: {0}")]
    BadAnswer(String),
    #[error("cannot make a key or CSR: {0}")]
    Local(String),
}

/// What the admin endpoint shows about the current certificate. No key material.
#[derive(Debug, Clone, Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub serial: String,
    #[serde(with = "rfc3339")]
    pub not_before: SystemTime,
    #[serde(with = "rfc3339")]
    pub not_after: SystemTime,
    #[serde(with = "rfc3339")]
    pub renew_at: SystemTime,
    pub chain_length: usize,
    pub trust_bundle_roots: usize,
    /// Certificates obtained since start.
    pub issued_count: u64,
}

/// Times as operators read them (`2026-12-05T02:11:25Z`), UTC, whole seconds.
mod rfc3339 {
    use std::time::SystemTime;

    use serde::ser::Error as _;
    use time::format_description::well_known::Rfc3339;

    pub(super) fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let at = time::OffsetDateTime::from(*t);
        let at = at.replace_nanosecond(0).unwrap_or(at);
        s.serialize_str(&at.format(&Rfc3339).map_err(S::Error::custom)?)
    }
}

/// Keeps the workload certificate fresh and publishes it to the TLS configs.
pub struct IdentityManager {
    identity: SpiffeId,
    control_plane: ControlPlane,
    bootstrap: Bootstrap,
    trust: Arc<Trust>,
    cert: Arc<CurrentCert>,
    status: ArcSwapOption<CertStatus>,
    metrics: Arc<Metrics>,
}

impl IdentityManager {
    pub fn new(
        identity: SpiffeId,
        control_plane: ControlPlane,
        bootstrap: Bootstrap,
        trust: Arc<Trust>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            identity,
            control_plane,
            bootstrap,
            trust,
            cert: CurrentCert::new(),
            status: ArcSwapOption::empty(),
            metrics,
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn trust(&self) -> Arc<Trust> {
        self.trust.clone()
    }

    /// The certificate resolver shared by every TLS config of this proxy.
    pub fn current_cert(&self) -> Arc<CurrentCert> {
        self.cert.clone()
    }

    pub fn status(&self) -> Option<Arc<CertStatus>> {
        self.status.load_full()
    }

    /// True while the proxy holds a certificate that has not expired.
    pub fn has_valid_cert(&self) -> bool {
        self.status
            .load()
            .as_ref()
            .is_some_and(|s| s.not_after > SystemTime::now())
    }

    /// Renews forever: at the renewal time when all is well, with backoff when not.
    pub async fn run(self: Arc<Self>) {
        let mut retry = FIRST_RETRY;
        loop {
            match self.certify().await {
                Ok(renew_at) => {
                    retry = FIRST_RETRY;
                    let wait = renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::sleep(wait).await;
                }
                Err(error) => {
                    self.metrics.cert_renewal_failures.inc();
                    let expires = self.status().map(|s| s.not_after);
                    let expired = expires.is_none_or(|at| at <= SystemTime::now());
                    warn!(
                        event = "certificate renewal failed",
                        identity = %self.identity,
                        error = %error,
                        current_certificate_expires = expires.map(humantime::format_rfc3339_seconds).map(tracing::field::display),
                        serving = !expired,
                        retry_in_ms = retry.as_millis() as u64,
                    );
                    tokio::time::sleep(jitter(retry, 0.8, 1.2)).await;
                    retry = next_retry(retry, expires);
                }
            }
        }
    }

    /// Obtains one certificate and installs it; returns when to renew it.
    async fn certify(&self) -> Result<SystemTime, CertifyError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CertifyError::Local(e.to_string()))?;
        let csr = self.csr(&key)?;
        // Renewal authenticates with the current certificate; the token only bootstraps
        // (or rescues a proxy whose certificate expired during an outage).
        let renewing = self.has_valid_cert();
        let mut request = CertifyRequest {
            csr_der: csr,
            ..CertifyRequest::default()
        };
        match (&self.bootstrap, renewing) {
            (_, true) => {}
            (Bootstrap::JoinToken(token), false) => {
                request.join_token = token.expose().to_string();
            }
            (Bootstrap::KubernetesTokenFile(path), false) => {
                request.kubernetes_token = std::fs::read_to_string(path)
                    .map_err(|e| {
                        CertifyError::Local(format!(
                            "cannot read the service-account token {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim()
                    .to_string();
            }
        }
        let client_cert = renewing.then(|| self.cert.clone());
        let channel = self
            .control_plane
            .connect(self.trust.clone(), client_cert)
            .await
            .map_err(|e| match e {
                control_plane::ConnectError::Unreachable { address, reason } => {
                    CertifyError::Unreachable { address, reason }
                }
                control_plane::ConnectError::Tls(reason) => CertifyError::Local(reason),
            })?;
        let mut client = IdentityClient::new(channel);
        let call = client.certify(request);
        let response = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| CertifyError::Unreachable {
                address: self.control_plane.address.clone(),
                reason: "no answer in time".into(),
            })?
            .map_err(|status| match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    CertifyError::Unreachable {
                        address: self.control_plane.address.clone(),
                        reason: status.message().to_string(),
                    }
                }
                _ => CertifyError::Refused(format!("{:?}: {}", status.code(), status.message())),
            })?
            .into_inner();
        self.install(key, response.cert_chain_der, response.trust_bundle_der)
    }

    fn csr(&self, key: &KeyPair) -> Result<Vec<u8>, CertifyError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(self.identity.as_str().try_into().map_err(
                |e: rcgen::Error| CertifyError::Local(e.to_string()),
            )?)];
        let csr = params
            .serialize_request(key)
            .map_err(|e| CertifyError::Local(e.to_string()))?;
        Ok(csr.der().to_vec())
    }

    /// Checks the answer and makes it the certificate new handshakes use.
    fn install(
        &self,
        key: KeyPair,
        chain: Vec<Vec<u8>>,
        bundle: Vec<Vec<u8>>,
    ) -> Result<SystemTime, CertifyError> {
        let bad = |reason: String| CertifyError::BadAnswer(reason);
        let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(Into::into).collect();
        let bundle = TrustBundle::new(bundle.into_iter().map(Into::into).collect())
            .map_err(|e| bad(format!("trust bundle: {e}")))?;
        let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
        let named = tls::spiffe_id_of(leaf).map_err(|e| bad(e.to_string()))?;
        if named != self.identity {
            return Err(bad(format!(
                "certificate is for {named}, not {}",
                self.identity
            )));
        }
        tls::verify_chain(&bundle, &chain).map_err(|e| bad(format!("chain: {e}")))?;
        let (serial, not_before, not_after) = validity(leaf).map_err(bad)?;
        let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(chain.clone(), private_key, &tls::crypto_provider())
            .map_err(|e| bad(format!("certificate does not match our key: {e}")))?;

        let now = SystemTime::now();
        let remaining = not_after.duration_since(now).unwrap_or_default();
        let renew_at = now + jitter(remaining, 0.5, 0.7);
        let issued_count = self.status().map_or(0, |s| s.issued_count) + 1;
        let roots = bundle.roots().len();
        // Bundle first: a peer with a certificate from a new root must verify by the time
        // our new certificate (possibly from that root) is presented.
        self.trust.replace_bundle(bundle);
        self.cert.set(certified);
        self.status.store(Some(Arc::new(CertStatus {
            identity: self.identity.to_string(),
            serial: serial.clone(),
            not_before,
            not_after,
            renew_at,
            chain_length: chain.len(),
            trust_bundle_roots: roots,
            issued_count,
        })));
        self.metrics.cert_renewals.inc();
        self.metrics.cert_expiry.set(unix(not_after) as f64);
        info!(
            event = if issued_count == 1 { "certificate issued" } else { "certificate renewed" },
            identity = %self.identity,
            serial = %serial,
            not_after = %humantime::format_rfc3339_seconds(not_after),
            renew_at = %humantime::format_rfc3339_seconds(renew_at),
            trust_bundle_roots = roots,
        );
        Ok(renew_at)
    }
}

/// Doubles the retry delay, capped at [`MAX_RETRY`] and at a quarter of what is left of
/// the current certificate, so a short outage never outlasts a short-lived certificate.
fn next_retry(retry: Duration, expires: Option<SystemTime>) -> Duration {
    let left = expires
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .map_or(MAX_RETRY, |left| (left / 4).max(FIRST_RETRY));
    (retry * 2).min(MAX_RETRY).min(left)
}

/// Serial (hex), notBefore and notAfter of a certificate.
fn validity(cert: &CertificateDer<'_>) -> Result<(String, SystemTime, SystemTime), String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| "unparsable certificate")?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let serial = parsed
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((
        serial,
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random point between `low` and `high` times `base`.
fn jitter(base: Duration, low: f64, high: f64) -> Duration {
    base.mul_f64(rand::rng().random_range(low..high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backs_off_within_the_certificate_lifetime() {
        let far = Some(SystemTime::now() + Duration::from_secs(3600));
        assert_eq!(
            next_retry(Duration::from_secs(1), far),
            Duration::from_secs(2)
        );
        assert_eq!(next_retry(Duration::from_secs(8), far), MAX_RETRY);
        assert_eq!(next_retry(Duration::from_secs(8), None), MAX_RETRY);
        let soon = Some(SystemTime::now() + Duration::from_secs(8));
        assert!(next_retry(Duration::from_secs(8), soon) <= Duration::from_secs(2));
        let expired = Some(SystemTime::now() - Duration::from_secs(1));
        assert_eq!(next_retry(Duration::from_secs(8), expired), MAX_RETRY);
    }

    #[tokio::test(start_paused = true)]
    async fn every_failed_attempt_is_counted() {
        let metrics = Arc::new(Metrics::new());
        let trust = Trust::new(
            "td",
            TrustBundle::new(vec![crate::outbound::balance::tests::test_root()]).unwrap(),
        );
        // The token file is missing: each attempt fails before reaching the network.
        let manager = IdentityManager::new(
            "spiffe://td/ns/shop/sa/web".parse().unwrap(),
            ControlPlane {
                address: "127.0.0.1:1".into(),
                identity: SpiffeId::control_plane("td").unwrap(),
            },
            Bootstrap::KubernetesTokenFile("/nonexistent/tessera-test-token".into()),
            trust,
            metrics.clone(),
        );
        let renewing = tokio::spawn(manager.run());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(metrics.cert_renewal_failures.get(), 1);
        // Retries after 0.4–0.6 s, then 0.8–1.2 s later.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(metrics.cert_renewal_failures.get(), 3);
        assert_eq!(metrics.cert_renewals.get(), 0);
        let text = metrics.encode();
        assert!(
            text.contains("tessera_identity_cert_renewal_failures_total 3"),
            "{text}"
        );
        renewing.abort();
    }

    #[test]
    fn jitter_stays_in_range() {
        let base = Duration::from_secs(100);
        for _ in 0..1000 {
            let d = jitter(base, 0.5, 0.7);
            assert!(
                d >= Duration::from_secs(50) && d < Duration::from_secs(70),
                "{d:?}"
            );
        }
    }
}
