//! The policy in force on one inbound port, resolved from the mesh view: its mTLS mode,
//! the authorization policies that select this workload and its JWT validator. Rebuilt
//! on every snapshot and swapped atomically; connections and requests only read it.

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::{
    self, Action, AuthorizationPolicySpec, Decision, MtlsMode, Named, WorkloadRef,
};
use tracing::warn;

use crate::discovery::MeshView;
use crate::inbound::authn::JwtValidator;
use crate::telemetry::Metrics;

/// What one inbound port enforces.
pub struct InboundPolicy {
    pub mode: MtlsMode,
    /// The PeerAuthentication that set `mode`; `None` for the STRICT default.
    pub mode_policy: Option<String>,
    authz: Vec<Named<AuthorizationPolicySpec>>,
    /// `None` when no RequestAuthentication selects the workload.
    pub jwt: Option<JwtValidator>,
    counters: DecisionCounters,
}

/// The decision counters this policy counts into, each looked up in the metric family
/// (a lock, a hash of the labels, the policy's name built) once, on first use.
struct DecisionCounters {
    /// One per policy in `authz`: what its action decides (allow, deny or audit).
    by_policy: Vec<OnceLock<Counter>>,
    /// Decisions no policy made.
    allowed: OnceLock<Counter>,
    denied: OnceLock<Counter>,
}

impl DecisionCounters {
    fn new(policies: usize) -> Self {
        Self {
            by_policy: (0..policies).map(|_| OnceLock::new()).collect(),
            allowed: OnceLock::new(),
            denied: OnceLock::new(),
        }
    }
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
        Self::new(mode, mode_policy, authz, jwt)
    }

    /// A port's policy from its parts: the mTLS mode (and the PeerAuthentication that
    /// set it), the authorization policies that select the workload, its JWT validator.
    pub fn new(
        mode: MtlsMode,
        mode_policy: Option<String>,
        authz: Vec<Named<AuthorizationPolicySpec>>,
        jwt: Option<JwtValidator>,
    ) -> Self {
        let counters = DecisionCounters::new(authz.len());
        Self {
            mode,
            mode_policy,
            authz,
            jwt,
            counters,
        }
    }

    /// Evaluates a request or connection, counting the decision (and every AUDIT policy
    /// it matched).
    pub fn authorize(&self, request: &policy::Request<'_>, metrics: &Metrics) -> Decision {
        let decision = policy::authorize(&self.authz, request);
        match decision.policy {
            Some(index) => self.policy_counter(index, metrics),
            None => self.no_policy_counter(decision.allowed, metrics),
        }
        .inc();
        for &index in &decision.audited {
            self.policy_counter(index, metrics).inc();
        }
        decision
    }

    /// `namespace/name` of the policy that made the decision, for logs.
    pub fn deciding_policy(&self, decision: &Decision) -> Option<String> {
        decision.policy.map(|index| self.authz[index].id())
    }

    fn no_policy_counter(&self, allowed: bool, metrics: &Metrics) -> &Counter {
        let (slot, decision) = if allowed {
            (&self.counters.allowed, "allow")
        } else {
            (&self.counters.denied, "deny")
        };
        slot.get_or_init(|| metrics.authz_counter(decision, "none".into()))
    }

    fn policy_counter(&self, index: usize, metrics: &Metrics) -> &Counter {
        self.counters.by_policy[index].get_or_init(|| {
            let policy = &self.authz[index];
            let decision = match policy.spec.action {
                Action::Allow => "allow",
                Action::Deny => "deny",
                Action::Audit => "audit",
            };
            metrics.authz_counter(decision, policy.id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, spec: &str) -> Named<AuthorizationPolicySpec> {
        let document = format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}"
        );
        let resources =
            tessera_mesh::resources::parse_file(std::path::Path::new("test.yaml"), &document)
                .expect("policy");
        match &resources[0].spec {
            tessera_mesh::resources::Spec::AuthorizationPolicy(spec) => Named {
                name: name.into(),
                namespace: "shop".into(),
                spec: spec.clone(),
            },
            _ => unreachable!("an AuthorizationPolicy document"),
        }
    }

    fn get(path: &str) -> policy::Request<'_> {
        policy::Request {
            source: None,
            request_principal: None,
            port: 8080,
            http: Some(policy::HttpRequest {
                method: "GET",
                path,
                host: "backend",
                header: &|_| None,
            }),
        }
    }

    #[test]
    fn decisions_are_counted_by_the_policy_that_made_them() {
        let inbound = InboundPolicy::new(
            MtlsMode::Permissive,
            None,
            vec![
                policy("audit-all", "  action: AUDIT\n  rules: [{}]\n"),
                policy(
                    "deny-admin",
                    "  action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n",
                ),
                policy(
                    "readers",
                    "  action: ALLOW\n  rules: [{to: [{operation: {paths: [/orders]}}]}]\n",
                ),
            ],
            None,
        );
        let metrics = Metrics::new();
        for path in ["/orders", "/orders", "/admin", "/other"] {
            inbound.authorize(&get(path), &metrics);
        }
        let denied = inbound.authorize(&get("/admin"), &metrics);
        assert_eq!(
            inbound.deciding_policy(&denied).as_deref(),
            Some("shop/deny-admin")
        );

        let text = metrics.encode();
        for expected in [
            r#"tessera_authz_decisions_total{decision="allow",policy="shop/readers"} 2"#,
            r#"tessera_authz_decisions_total{decision="deny",policy="shop/deny-admin"} 2"#,
            r#"tessera_authz_decisions_total{decision="deny",policy="none"} 1"#,
            r#"tessera_authz_decisions_total{decision="audit",policy="shop/audit-all"} 5"#,
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
        assert!(
            !text.contains(r#"decision="allow",policy="none""#),
            "{text}"
        );
    }
}
