//! The policy in force on one inbound port, resolved from the mesh view: its mTLS mode,
//! the authorization policies that select this workload, compiled, its JWT validator
//! and its rate limits. Rebuilt on every snapshot and swapped atomically; connections and requests
//! only read it. Whatever cannot be compiled fails closed: a DENY policy then denies
//! everything, an ALLOW policy opens nothing, unusable JWT rules accept no token.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::{self, Action, CompiledPolicy, Decision, MtlsMode, WorkloadRef};
use tracing::warn;

use crate::discovery::MeshView;
use crate::inbound::authn::JwtValidator;
use crate::inbound::rate_limit::RateLimits;
use crate::telemetry::Metrics;

/// What one inbound port enforces.
pub struct InboundPolicy {
    pub mode: MtlsMode,
    /// The PeerAuthentication that set `mode`; `None` for the STRICT default.
    pub mode_policy: Option<String>,
    authz: Vec<CompiledPolicy>,
    /// `None` when no RequestAuthentication selects the workload.
    pub jwt: Option<JwtValidator>,
    /// Checked after authorization: a denied request takes no token.
    pub rate_limits: RateLimits,
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
    /// The authorization policies that select this workload, in evaluation order.
    pub fn authorization_policies(&self) -> &[CompiledPolicy] {
        &self.authz
    }

    /// Resolves the policy of the workload of `identity` and `labels` for application
    /// port `port`.
    pub fn resolve(
        view: &MeshView,
        identity: &SpiffeId,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> Self {
        let workload = WorkloadRef {
            namespace: identity.namespace(),
            service_account: identity.service_account(),
            labels,
        };
        let (mode, mode_policy) = policy::mtls_mode(&view.peer_authentications, workload, port);
        let authz = view
            .authorization_policies
            .iter()
            .filter(|p| policy::selects(&p.namespace, p.spec.selector.as_ref(), workload))
            .map(|p| {
                CompiledPolicy::try_from(p).unwrap_or_else(|error| {
                    warn!(event = "authorization policy unusable", policy = %p.id(), port, error = %error, "it fails closed");
                    CompiledPolicy::fail_closed(p, error)
                })
            })
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
        authz: Vec<CompiledPolicy>,
        jwt: Option<JwtValidator>,
    ) -> Self {
        let counters = DecisionCounters::new(authz.len());
        Self {
            mode,
            mode_policy,
            authz,
            jwt,
            rate_limits: RateLimits::default(),
            counters,
        }
    }

    /// This policy with the rate limits of its port (kept across snapshots by the
    /// workload's [`crate::inbound::rate_limit::RateLimiters`]).
    pub fn with_rate_limits(self, rate_limits: RateLimits) -> Self {
        Self {
            rate_limits,
            ..self
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
        if let (Some(index), Some(failure)) = (
            decision.policy,
            decision.rego.as_ref().and_then(|v| v.failure),
        ) {
            metrics.policy_evaluation_error(self.authz[index].id(), failure.as_str());
        }
        decision
    }

    /// `namespace/name` of the policy that made the decision, for logs.
    pub fn deciding_policy(&self, decision: &Decision) -> Option<&str> {
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
            let decision = match policy.action() {
                Action::Allow => "allow",
                Action::Deny => "deny",
                Action::Audit => "audit",
                // A CUSTOM policy decides only when it denies.
                Action::Custom => "deny",
            };
            metrics.authz_counter(decision, policy.id().into())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use http::{HeaderMap, Uri, header};
    use tessera_mesh::policy::{AuthorizationPolicySpec, Named, ROOT_NAMESPACE};
    use tessera_mesh::resources::{Spec, parse_file};

    use super::*;
    use crate::inbound::authn::JwtOutcome;

    /// The mesh view a proxy would hold after a snapshot of `documents` (YAML resources).
    /// Built without the control plane's checks, as an older control plane might send it.
    fn view(documents: &str) -> MeshView {
        let mut view = MeshView::default();
        for resource in parse_file(Path::new("mesh.yaml"), documents).expect("resources") {
            let name = resource.metadata.name;
            let namespace = resource.metadata.namespace.unwrap_or_default();
            fn named<S>(name: &str, namespace: &str, spec: S) -> Named<S> {
                Named {
                    name: name.into(),
                    namespace: namespace.into(),
                    spec,
                }
            }
            match resource.spec {
                Spec::PeerAuthentication(spec) => view
                    .peer_authentications
                    .push(named(&name, &namespace, spec)),
                Spec::AuthorizationPolicy(spec) => view
                    .authorization_policies
                    .push(named(&name, &namespace, spec)),
                Spec::RequestAuthentication(spec) => view
                    .request_authentications
                    .push(named(&name, &namespace, spec)),
                _ => unreachable!("policies only"),
            }
        }
        view
    }

    /// A policy document: `kind`, `namespace/name`, and the spec's lines.
    fn document(kind: &str, id: &str, spec: &str) -> String {
        let (namespace, name) = id.split_once('/').expect("namespace/name");
        format!(
            "---\napiVersion: tessera.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
        )
    }

    fn orders() -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", "orders").unwrap()
    }

    fn caller(namespace: &str, account: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", namespace, account).unwrap()
    }

    fn get<'a>(
        source: Option<&'a SpiffeId>,
        port: u16,
        path: &'a str,
        request_principal: Option<&'a str>,
    ) -> policy::Request<'a> {
        policy::Request {
            source,
            destination: None,
            request_principal,
            jwt_claims: None,
            port,
            http: Some(policy::HttpRequest {
                method: "GET",
                path,
                query: None,
                host: "orders.shop",
                scheme: "http",
                protocol: "HTTP/1.1",
                header: &|_| None,
                headers: None,
            }),
        }
    }

    fn tcp(source: Option<&SpiffeId>, port: u16) -> policy::Request<'_> {
        policy::Request {
            source,
            destination: None,
            request_principal: None,
            jwt_claims: None,
            port,
            http: None,
        }
    }

    fn policy(name: &str, spec: &str) -> CompiledPolicy {
        let documents = document("AuthorizationPolicy", &format!("shop/{name}"), spec);
        let view = view(&documents);
        let named: &Named<AuthorizationPolicySpec> = &view.authorization_policies[0];
        CompiledPolicy::try_from(named).expect("a policy that compiles")
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
            inbound.authorize(&get(None, 8080, path, None), &metrics);
        }
        let denied = inbound.authorize(&get(None, 8080, "/admin", None), &metrics);
        assert_eq!(inbound.deciding_policy(&denied), Some("shop/deny-admin"));

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

    #[test]
    fn a_port_gets_its_workloads_policies_and_its_own_mtls_mode() {
        let documents = [
            document(
                "PeerAuthentication",
                "shop/pa",
                "  mtls: {mode: STRICT}\n  portLevelMtls: {9090: {mode: PERMISSIVE}}\n",
            ),
            document(
                "AuthorizationPolicy",
                "shop/http-port",
                "  selector: {serviceAccount: orders}\n  rules: [{to: [{operation: {ports: [8080]}}]}]\n",
            ),
            document(
                "AuthorizationPolicy",
                "shop/payments-only",
                "  selector: {serviceAccount: payments}\n  action: DENY\n  rules: [{}]\n",
            ),
            document("AuthorizationPolicy", "billing/elsewhere", "  action: DENY\n  rules: [{}]\n"),
            document(
                "AuthorizationPolicy",
                &format!("{ROOT_NAMESPACE}/no-ops"),
                "  action: DENY\n  rules: [{from: [{source: {namespaces: [ops]}}]}]\n",
            ),
        ]
        .concat();
        let view = view(&documents);
        let metrics = Metrics::new();
        let frontend = caller("shop", "frontend");
        let ops = caller("ops", "admin");

        let http_port = InboundPolicy::resolve(&view, &orders(), &BTreeMap::new(), 8080);
        assert_eq!(http_port.mode, MtlsMode::Strict);
        assert_eq!(http_port.mode_policy.as_deref(), Some("shop/pa"));
        let ids: Vec<_> = http_port.authz.iter().map(CompiledPolicy::id).collect();
        assert_eq!(ids, ["shop/http-port", "tessera-system/no-ops"]);
        let allowed = http_port.authorize(&get(Some(&frontend), 8080, "/", None), &metrics);
        assert!(allowed.allowed, "{allowed:?}");
        assert_eq!(http_port.deciding_policy(&allowed), Some("shop/http-port"));
        let denied = http_port.authorize(&get(Some(&ops), 8080, "/", None), &metrics);
        assert_eq!(
            http_port.deciding_policy(&denied),
            Some("tessera-system/no-ops")
        );
        assert!(!denied.allowed);

        // The same workload's other port: its own mTLS mode; the ALLOW names port 8080.
        let other_port = InboundPolicy::resolve(&view, &orders(), &BTreeMap::new(), 9090);
        assert_eq!(other_port.mode, MtlsMode::Permissive);
        for request in [
            get(Some(&frontend), 9090, "/", None),
            tcp(Some(&frontend), 9090),
        ] {
            let decision = other_port.authorize(&request, &metrics);
            assert!(!decision.allowed, "{decision:?}");
            assert_eq!(decision.reason, "no ALLOW policy matched");
        }

        // Another workload of the namespace gets its own policy, not this one's.
        let payments =
            InboundPolicy::resolve(&view, &caller("shop", "payments"), &BTreeMap::new(), 8080);
        let ids: Vec<_> = payments.authz.iter().map(CompiledPolicy::id).collect();
        assert_eq!(ids, ["shop/payments-only", "tessera-system/no-ops"]);
    }

    #[test]
    fn deny_is_evaluated_before_allow_whatever_the_order() {
        let metrics = Metrics::new();
        let allow_all = policy("allow-all", "  rules: [{}]\n");
        let deny_admin = policy(
            "deny-admin",
            "  action: DENY\n  rules: [{to: [{operation: {paths: [/admin*]}}]}]\n",
        );
        for authz in [
            vec![allow_all.clone(), deny_admin.clone()],
            vec![deny_admin.clone(), allow_all.clone()],
        ] {
            let inbound = InboundPolicy::new(MtlsMode::Strict, None, authz, None);
            let frontend = caller("shop", "frontend");
            let denied = inbound.authorize(&get(Some(&frontend), 8080, "/admin/x", None), &metrics);
            assert!(!denied.allowed);
            assert_eq!(inbound.deciding_policy(&denied), Some("shop/deny-admin"));
            let allowed = inbound.authorize(&get(Some(&frontend), 8080, "/orders", None), &metrics);
            assert!(allowed.allowed);
            assert_eq!(inbound.deciding_policy(&allowed), Some("shop/allow-all"));
        }
    }

    #[test]
    fn without_authorization_policies_a_port_allows_and_counts_no_policy() {
        let inbound =
            InboundPolicy::resolve(&MeshView::default(), &orders(), &BTreeMap::new(), 8080);
        assert_eq!(
            inbound.mode,
            MtlsMode::Strict,
            "no PeerAuthentication: STRICT"
        );
        assert!(inbound.jwt.is_none());
        let metrics = Metrics::new();
        let decision = inbound.authorize(&tcp(None, 8080), &metrics);
        assert!(decision.allowed, "{decision:?}");
        assert_eq!(inbound.deciding_policy(&decision), None);
        let text = metrics.encode();
        assert!(
            text.contains(r#"tessera_authz_decisions_total{decision="allow",policy="none"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn a_policy_that_cannot_be_compiled_fails_closed_on_the_port() {
        // An older control plane let these through: the condition key is a typo, and
        // `/admin%zz` has no normal form.
        let documents = [
            document(
                "AuthorizationPolicy",
                "shop/broken-deny",
                "  action: DENY\n  rules: [{when: [{key: \"request.header[x-debug]\", values: [\"1\"]}]}]\n",
            ),
            document("AuthorizationPolicy", "shop/allow-all", "  rules: [{}]\n"),
        ]
        .concat();
        let inbound = InboundPolicy::resolve(&view(&documents), &orders(), &BTreeMap::new(), 8080);
        let error = inbound.authz[0].error().expect("uncompilable").to_string();
        assert!(error.starts_with("spec.rules[0].when[0].key: "), "{error}");
        let metrics = Metrics::new();
        let frontend = caller("shop", "frontend");
        for request in [get(Some(&frontend), 8080, "/", None), tcp(None, 8080)] {
            let decision = inbound.authorize(&request, &metrics);
            assert!(!decision.allowed, "{decision:?}");
            assert_eq!(inbound.deciding_policy(&decision), Some("shop/broken-deny"));
        }

        let broken_allow = document(
            "AuthorizationPolicy",
            "shop/broken-allow",
            "  rules: [{to: [{operation: {paths: [\"/admin%zz\"]}}]}, {}]\n",
        );
        let inbound =
            InboundPolicy::resolve(&view(&broken_allow), &orders(), &BTreeMap::new(), 8080);
        let decision = inbound.authorize(&get(Some(&frontend), 8080, "/", None), &metrics);
        assert!(!decision.allowed, "{decision:?}");
        assert_eq!(decision.reason, "no ALLOW policy matched");
    }

    /// An Ed25519 key, its JWKS, and a token it signs for `https://issuer/bob`.
    fn signed_token() -> (String, String) {
        use jsonwebtoken::{Algorithm, EncodingKey, Header};

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = URL_SAFE_NO_PAD.encode(key.public_key_raw());
        let jwks = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"{x}"}}]}}"#);
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let signing = EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).unwrap();
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims = serde_json::json!({"iss": "https://issuer", "sub": "bob", "aud": "api", "exp": expires});
        let token = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
        (jwks, token)
    }

    #[test]
    fn a_validated_token_is_the_request_principal_policies_match() {
        let (jwks, token) = signed_token();
        let jwks = jwks.replace('"', "\\\"");
        let request_authentication = |id: &str, selector: &str, jwks: &str| {
            document(
                "RequestAuthentication",
                id,
                &format!(
                    "  {selector}\n  jwtRules: [{{issuer: \"https://issuer\", audiences: [api], jwks: \"{jwks}\"}}]\n"
                ),
            )
        };
        let only_bob = document(
            "AuthorizationPolicy",
            "shop/only-bob",
            "  rules: [{from: [{source: {requestPrincipals: [\"https://issuer/bob\"]}}]}]\n",
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        let uri: Uri = "/orders".parse().unwrap();
        let metrics = Metrics::new();

        let documents =
            request_authentication("shop/jwt", "selector: {serviceAccount: orders}", &jwks)
                + &only_bob;
        let inbound = InboundPolicy::resolve(&view(&documents), &orders(), &BTreeMap::new(), 8080);
        let validator = inbound
            .jwt
            .as_ref()
            .expect("a RequestAuthentication selects orders");
        let outcome = validator.check(&headers, &uri);
        let JwtOutcome::Valid(valid) = &outcome else {
            panic!("{outcome:?}");
        };
        let principal = &valid.principal;
        assert_eq!(principal, "https://issuer/bob");
        let with_token = get(None, 8080, "/orders", Some(principal));
        assert!(inbound.authorize(&with_token, &metrics).allowed);
        assert_eq!(validator.check(&HeaderMap::new(), &uri), JwtOutcome::Absent);
        let without = get(None, 8080, "/orders", None);
        assert!(!inbound.authorize(&without, &metrics).allowed);
        // Opaque TCP carries no token: a rule on request principals never allows it.
        assert!(!inbound.authorize(&tcp(None, 8080), &metrics).allowed);

        // Another workload's RequestAuthentication validates nothing here.
        let documents =
            request_authentication("shop/jwt", "selector: {serviceAccount: payments}", &jwks);
        let inbound = InboundPolicy::resolve(&view(&documents), &orders(), &BTreeMap::new(), 8080);
        assert!(inbound.jwt.is_none());

        // A key set that cannot be used: every token is refused, never let through.
        let hmac = r#"{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}]}"#;
        let documents = request_authentication("shop/jwt", "selector: {}", hmac);
        let inbound = InboundPolicy::resolve(&view(&documents), &orders(), &BTreeMap::new(), 8080);
        let validator = inbound.jwt.as_ref().expect("a validator that refuses");
        assert!(matches!(
            validator.check(&headers, &uri),
            JwtOutcome::Invalid(_)
        ));
    }
}
