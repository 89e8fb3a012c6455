//! The identity API: authenticates the caller, checks its CSR, has the CA sign it.
//!
//! Callers authenticate with a join token (hosts and VMs: first certificate), a
//! Kubernetes service-account token (pods, in cluster mode: first certificate) or with
//! the certificate they hold (renewal). A single-use join token is consumed, durably,
//! between signing and answering, so two requests with one token get one certificate. Every issuance and
//! every refusal is one structured log line with identity, serial, expiry, caller
//! address and reason — never the token or a key.

use std::sync::Arc;
use std::time::Duration;

use tessera_mesh::SpiffeId;
use tessera_proto::api::identity::identity_server::Identity;
use tessera_proto::api::identity::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::ca::reload::CurrentCa;
use crate::ca::{CsrRefusal, validate_csr};
use crate::grpc::Caller;
use crate::kubernetes::tokens::{ServiceAccountTokens, TokenRefusal as KubernetesRefusal};
use crate::telemetry::{Metrics, RefusalReason};
use crate::token::{ConsumeError, TokenAuthority, TokenRefusal, VerifiedToken};

/// Serves `Certify`.
pub(crate) struct IdentityService {
    /// The CA in force: a plug-in CA may be swapped while the control plane runs.
    pub ca: Arc<CurrentCa>,
    pub tokens: Arc<TokenAuthority>,
    pub trust_domain: String,
    pub certificate_ttl: Duration,
    pub metrics: Arc<Metrics>,
    /// Cluster mode: service-account tokens verified with the Kubernetes API.
    pub kubernetes: Option<Arc<ServiceAccountTokens>>,
}

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy)]
enum Credential {
    JoinToken,
    ServiceAccountToken,
    Certificate,
}

/// What the caller is told about a refused service-account token: its own pod's state,
/// never the token; an unreachable API is worth retrying.
fn kubernetes_status(refusal: &KubernetesRefusal) -> Status {
    match refusal {
        KubernetesRefusal::Unavailable(_) => {
            Status::unavailable("cannot verify the service-account token now; retry")
        }
        _ => Status::unauthenticated(refusal.to_string()),
    }
}

/// How a request authenticated: the identity it proved, and the join token to consume.
type Authenticated = (SpiffeId, Credential, Option<VerifiedToken>);

/// What the caller is told about a refused token: expiry and reuse are the holder's to
/// fix, so they are said; anything else is "rejected" (the log says why).
fn token_status(refusal: &TokenRefusal) -> Status {
    match refusal {
        TokenRefusal::Expired(_) | TokenRefusal::AlreadyUsed => {
            Status::unauthenticated(refusal.to_string())
        }
        _ => Status::unauthenticated("join token rejected"),
    }
}

impl IdentityService {
    async fn authenticate(
        &self,
        caller: &Caller,
        join_token: &str,
        kubernetes_token: &str,
    ) -> Result<Authenticated, (RefusalReason, Status, String)> {
        if join_token.is_empty() && !kubernetes_token.is_empty() && caller.identity.is_none() {
            return self.verify_service_account(kubernetes_token).await;
        }
        if !join_token.is_empty() {
            return self
                .tokens
                .verify(join_token, &self.trust_domain)
                .map(|token| (token.identity().clone(), Credential::JoinToken, Some(token)))
                .map_err(|refusal| {
                    (
                        RefusalReason::Token,
                        token_status(&refusal),
                        refusal.to_string(),
                    )
                });
        }
        match &caller.identity {
            Some(identity) => Ok((identity.clone(), Credential::Certificate, None)),
            None => {
                let reason = "no join token and no client certificate";
                Err((
                    RefusalReason::Unauthenticated,
                    Status::unauthenticated(reason),
                    reason.to_string(),
                ))
            }
        }
    }

    /// Cluster mode: the pod's identity, as the Kubernetes API vouches for its token.
    async fn verify_service_account(
        &self,
        token: &str,
    ) -> Result<Authenticated, (RefusalReason, Status, String)> {
        let Some(kubernetes) = &self.kubernetes else {
            // Verifying it needs the Kubernetes API (TokenReview); never guess from its
            // unverified claims.
            let reason = "Kubernetes service-account tokens are verified with TokenReview, which needs cluster mode; this control plane runs in local mode (use a join token)";
            return Err((
                RefusalReason::Token,
                Status::unauthenticated(reason),
                reason.to_string(),
            ));
        };
        match kubernetes.verify(token).await {
            Ok(identity) => Ok((identity, Credential::ServiceAccountToken, None)),
            Err(refusal) => {
                let reason = match refusal {
                    KubernetesRefusal::Unavailable(_) => RefusalReason::Internal,
                    _ => RefusalReason::Token,
                };
                Err((reason, kubernetes_status(&refusal), refusal.to_string()))
            }
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let Some(caller) = request.extensions().get::<Caller>().cloned() else {
            return Err(Status::internal("caller unknown"));
        };
        let request = request.into_inner();
        let refuse = |reason: RefusalReason, identity: Option<&SpiffeId>, detail: &str| {
            self.metrics.refused(reason);
            warn!(
                event = "certificate refused",
                caller = %caller.address,
                identity = identity.map(tracing::field::display),
                reason = reason.as_str(),
                detail,
            );
        };
        let (identity, credential, token) = self
            .authenticate(&caller, &request.join_token, &request.kubernetes_token)
            .await
            .map_err(|(reason, status, detail)| {
                refuse(reason, None, &detail);
                status
            })?;
        let csr = validate_csr(&request.csr_der, &identity).map_err(|refusal| {
            refuse(RefusalReason::Csr, Some(&identity), &refusal.to_string());
            match refusal {
                CsrRefusal::IdentityMismatch { .. } => {
                    Status::permission_denied(refusal.to_string())
                }
                _ => Status::invalid_argument(refusal.to_string()),
            }
        })?;
        // One read: the bundle sent is the one in force with the authority that signed.
        let active = self.ca.load();
        let issued = active
            .authority()
            .issue(&csr, &identity, self.certificate_ttl)
            .map_err(|error| {
                refuse(RefusalReason::Internal, Some(&identity), &error.to_string());
                Status::internal("certificate authority failed")
            })?;
        if let Some(token) = token.clone() {
            // A file append and fsync: off the async runtime.
            let tokens = self.tokens.clone();
            let consumed = tokio::task::spawn_blocking(move || tokens.consume(&token))
                .await
                .unwrap_or_else(|panicked| {
                    Err(ConsumeError::Record(crate::ca::CaError::Material(
                        panicked.to_string(),
                    )))
                });
            // The certificate just signed is dropped unsent: the token did not pay for it.
            consumed.map_err(|error| match error {
                ConsumeError::Refused(refusal) => {
                    refuse(RefusalReason::Token, Some(&identity), &refusal.to_string());
                    token_status(&refusal)
                }
                ConsumeError::Record(_) => {
                    refuse(RefusalReason::Internal, Some(&identity), &error.to_string());
                    Status::unavailable("cannot record the join token as used; retry")
                }
            })?;
        }
        self.metrics.issued();
        info!(
            event = "certificate issued",
            identity = %identity,
            serial = %issued.serial,
            not_after = %rfc3339(issued.not_after),
            caller = %caller.address,
            authenticated_by = ?credential,
        );
        Ok(Response::new(CertifyResponse {
            cert_chain_der: issued.chain.into_iter().map(|c| c.to_vec()).collect(),
            trust_bundle_der: active.trust_bundle().iter().map(|c| c.to_vec()).collect(),
        }))
    }
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}
