//! The policy in force on one inbound port, resolved from the mesh view: its mTLS mode,
//! the authorization policies that select this workload and its JWT validator. Rebuilt
//! on every snapshot and swapped atomically; connections and requests only read it.

use tessera_proto::SpiffeId;
use tessera_proto::policy::{
    self, AuthorizationPolicySpec, Decision, MtlsMode, Named, WorkloadRef,
};
use tracing::warn;

use crate::authn::JwtValidator;
use crate::discovery::MeshView;
use crate::telemetry::Metrics;

/// What one inbound port enforces.
pub struct InboundPolicy {
    pub mode: MtlsMode,
    /// The PeerAuthentication that set `mode`; `None` for the STRICT default.
    pub mode_policy: Option<String>,
    authz: Vec<Named<AuthorizationPolicySpec>>,
    /// `None` when no RequestAuthentication selects the workload.
    pub jwt: Option<JwtValidator>,
}

impl InboundPolicy {
    /// Resolves the policy of `identity`'s workload for application port `port`.
    pub fn resolve(view: &MeshView, identity: &SpiffeId, port: u16) -> Self {
        let workload = WorkloadRef {
            namespace: identity.namespace(),
            service_account: identity.service_account(),
        };
        let (mode, mode_policy) = policy::mtls_mode(&view.peer_authentications, workload, port);
        let authz = view
            .authorization_policies
            .iter()
            .filter(|p| policy::selects(&p.namespace, p.spec.selector.as_ref(), workload))
            .cloned()
            .collect();
        let rules: Vec<_> = view
            .request_authentications
            .iter()
            .filter(|p| policy::selects(&p.namespace, p.spec.selector.as_ref(), workload))
            .flat_map(|p| p.spec.jwt_rules.iter())
            .collect();
        let jwt = if rules.is_empty() {
            None
        } else {
            match JwtValidator::new(&rules) {
                Ok(validator) => Some(validator),
                Err(error) => {
                    // Fail closed: a validator that accepts nothing.
                    warn!(event = "request authentication unusable", error = %error, "every token will be refused");
                    Some(JwtValidator::reject_all())
                }
            }
        };
        Self {
            mode,
            mode_policy,
            authz,
            jwt,
        }
    }

    /// Evaluates a request or connection, counting the decision.
    pub fn authorize(&self, request: &policy::Request<'_>, metrics: &Metrics) -> Decision {
        let decision = policy::authorize(&self.authz, request);
        metrics.authz_decision(&decision);
        decision
    }
}
