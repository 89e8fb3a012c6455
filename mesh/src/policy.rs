//! Zero-trust policy: which peers must use mTLS (`PeerAuthentication`), who may call
//! what (`AuthorizationPolicy`), and which JWT issuers are trusted
//! (`RequestAuthentication`) — the resource types and the one evaluation engine that the
//! proxy enforces and `tessera policy explain` reports on.
//!
//! The resource types are the schema, not the engine's working form: an
//! AuthorizationPolicy is compiled once ([`CompiledPolicy`], when the control plane loads
//! configuration and when a proxy receives a snapshot) into checked matchers, so that
//! deciding on a request only compares. A policy that does not compile is refused by the
//! control plane with the field named; a proxy that receives one anyway fails closed.
//!
//! Semantics follow Istio's, which operators already know: DENY policies are evaluated
//! first, then CUSTOM policies (a Rego policy, see [`rego`], decides the requests their
//! rules match); if any ALLOW policy selects a workload, a request must match one of them;
//! AUDIT policies are recorded without effect; no policy at all allows. Unlike Istio, a port
//! with no PeerAuthentication is STRICT: the mesh denies plaintext until told otherwise.

use std::borrow::{Borrow, Cow};
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv6Addr;
use std::sync::Arc;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use crate::SpiffeId;
use crate::spiffe::SpiffeIdError;

pub mod rego;

pub use rego::{CompiledRego, RegoError, RegoModule, RegoProvider, RegoVerdict};

/// Policies in this namespace apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "tessera-system";

/// Which workloads of its namespace a policy applies to; none (or an empty one) means
/// all of them. A workload is selected when it matches every field given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Labels the workload carries, every one with this value (Istio's `matchLabels`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether this selector names no condition, and so selects every workload.
    fn is_empty(&self) -> bool {
        self.service_account.is_none() && self.match_labels.is_empty()
    }

    fn matches(&self, workload: WorkloadRef<'_>) -> bool {
        self.service_account
            .as_deref()
            .is_none_or(|account| account == workload.service_account)
            && self
                .match_labels
                .iter()
                .all(|(key, value)| workload.labels.get(key) == Some(value))
    }
}

/// How a port treats plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// mTLS only.
    Strict,
    /// mTLS and plaintext on the same port (migration).
    Permissive,
    /// No mTLS required.
    Disable,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSetting {
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MtlsSetting>,
    /// Per application port; overrides `mtls`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(
        with = "BTreeMap<String, MtlsSetting>",
        extend("x-kubernetes-validations" = [{
            "rule": crate::resources::PORT_KEYS_RULE,
            "message": "portLevelMtls is keyed by port numbers, 1 to 65535"
        }])
    ))]
    pub port_level_mtls: BTreeMap<u16, MtlsSetting>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    /// The `provider`'s Rego policy decides the requests the rules match.
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// A request matching any rule matches the policy. No rules: matches nothing (an
    /// ALLOW policy without rules therefore denies everything; a CUSTOM policy needs a
    /// rule, `rules: [{}]` for every request).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Who decides for a CUSTOM policy (and only for one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
}

/// Istio's `provider` of a CUSTOM policy; Tessera's decides in the proxy, in Rego.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    /// A name for the provider, as Istio's extension providers have (informational).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub rego: RegoProvider,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

impl Rule {
    /// The fields of this rule that only an HTTP request has (methods, paths, hosts and
    /// their negations, JWT request principals, header conditions), named as written
    /// (`to[0].operation.paths`). On opaque TCP the engine cannot check them: in an ALLOW
    /// (or AUDIT) policy the `from`/`to` entry or `when` condition that names one does
    /// not match; in a DENY policy they are taken as matching, so the rule matches on its
    /// other fields. Uncheckable conditions thus never open access.
    pub fn http_only_fields(&self) -> Vec<String> {
        let mut fields = Vec::new();
        for (index, from) in self.from.iter().enumerate() {
            let source = &from.source;
            for (name, values) in [
                ("requestPrincipals", &source.request_principals),
                ("notRequestPrincipals", &source.not_request_principals),
            ] {
                if !values.is_empty() {
                    fields.push(format!("from[{index}].source.{name}"));
                }
            }
        }
        for (index, to) in self.to.iter().enumerate() {
            let operation = &to.operation;
            for (name, values) in [
                ("methods", &operation.methods),
                ("notMethods", &operation.not_methods),
                ("paths", &operation.paths),
                ("notPaths", &operation.not_paths),
                ("hosts", &operation.hosts),
                ("notHosts", &operation.not_hosts),
            ] {
                if !values.is_empty() {
                    fields.push(format!("to[{index}].operation.{name}"));
                }
            }
        }
        for (index, condition) in self.when.iter().enumerate() {
            fields.push(format!("when[{index}] ({})", condition.key));
        }
        fields
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

/// A principal pattern's shape, for the CRD schema: no blank, at most one `*`, at
/// either end (whether it names a possible SPIFFE ID is the control plane's judgement).
#[cfg(feature = "schema")]
const PRINCIPAL_PATTERN: &str = r"^(\*|\*[^*\s]+|[^*\s]+\*?)$";

/// Who calls. Principals are SPIFFE IDs, with or without `spiffe://`, exact or with one
/// `*` at the start or end; `"*"` is any authenticated peer, so `notPrincipals: ["*"]`
/// selects plaintext callers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(regex(pattern = PRINCIPAL_PATTERN))))]
    pub principals: Vec<String>,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(regex(pattern = PRINCIPAL_PATTERN))))]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// `issuer/subject` of a validated JWT.
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
}

/// What is called. Paths and hosts match exactly or with one `*` at either end, after
/// both the pattern and the request are put in one form: paths as [`normalize_path`]
/// writes them (so a pattern names every spelling of its paths), hosts without port or
/// trailing dot and compared case-insensitively. A path or host that has no such form
/// matches every DENY and no ALLOW that names paths (hosts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub not_ports: Vec<u16>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
}

/// `key` is `request.headers[<name>]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The JWKS document, inline (JSON).
    #[serde(default)]
    pub jwks: Option<String>,
    /// A file holding the JWKS; the control plane reads it and sends it inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<std::path::PathBuf>,
}

/// A named policy as it travels in snapshots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Named<S> {
    pub name: String,
    pub namespace: String,
    pub spec: S,
}

impl<S> Named<S> {
    /// `namespace/name`, how logs and metrics name the policy.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The workload a policy is resolved for.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadRef<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// Its labels (a pod's, as the injector saw them; a host's, from its configuration).
    pub labels: &'a BTreeMap<String, String>,
}

/// How specifically a policy selects a workload; `None` when it does not apply.
fn specificity(
    namespace: &str,
    selector: Option<&WorkloadSelector>,
    workload: WorkloadRef<'_>,
) -> Option<u8> {
    let in_namespace = namespace == workload.namespace;
    match selector.filter(|s| !s.is_empty()) {
        Some(selector) if in_namespace && selector.matches(workload) => Some(3),
        Some(_) => None,
        None if in_namespace => Some(2),
        None if namespace == ROOT_NAMESPACE => Some(1),
        None => None,
    }
}

/// Whether `policy` applies to `workload`.
pub fn selects(
    namespace: &str,
    selector: Option<&WorkloadSelector>,
    workload: WorkloadRef<'_>,
) -> bool {
    // A mesh-wide policy with a selector applies to the workloads it selects in every
    // namespace, as in Istio.
    let mesh_wide_selected = namespace == ROOT_NAMESPACE
        && selector.is_some_and(|s| !s.is_empty() && s.matches(workload));
    mesh_wide_selected || specificity(namespace, selector, workload).is_some()
}

/// The mTLS mode of one application port, and the policy that decided it. The most
/// specific policy wins (workload, then namespace, then mesh); within one, a port-level
/// setting beats the policy-wide one. Nothing configured: STRICT.
pub fn mtls_mode(
    policies: &[Named<PeerAuthenticationSpec>],
    workload: WorkloadRef<'_>,
    port: u16,
) -> (MtlsMode, Option<String>) {
    let mut best: Option<(u8, MtlsMode, String)> = None;
    for policy in policies {
        let Some(level) = specificity(&policy.namespace, policy.spec.selector.as_ref(), workload)
        else {
            continue;
        };
        let candidate = match (policy.spec.port_level_mtls.get(&port), policy.spec.mtls) {
            (Some(setting), _) => Some((level * 2 + 1, setting.mode)),
            (None, Some(setting)) => Some((level * 2, setting.mode)),
            (None, None) => None,
        };
        if let Some((rank, mode)) = candidate
            && best
                .as_ref()
                .is_none_or(|(best_rank, _, _)| rank > *best_rank)
        {
            best = Some((rank, mode, policy.id()));
        }
    }
    match best {
        Some((_, mode, id)) => (mode, Some(id)),
        None => (MtlsMode::Strict, None),
    }
}

/// What is known of one request (or TCP connection) when authorizing it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Verified mTLS peer; `None` for plaintext.
    pub source: Option<&'a SpiffeId>,
    /// The workload called (what a CUSTOM policy's input names as the destination).
    pub destination: Option<&'a SpiffeId>,
    /// `issuer/subject` of a validated JWT.
    pub request_principal: Option<&'a str>,
    /// The claims of that JWT (what a CUSTOM policy's input carries as `jwt.claims`).
    pub jwt_claims: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// The application port.
    pub port: u16,
    /// Absent for opaque TCP.
    pub http: Option<HttpRequest<'a>>,
}

#[derive(Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path as forwarded, without query; normalized here too if it is not already.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
    /// The authority (or `Host`), with or without port.
    pub host: &'a str,
    /// `http` or `https`, as the caller addressed the application.
    pub scheme: &'a str,
    /// `HTTP/1.1`, `HTTP/2`…
    pub protocol: &'a str,
    /// The value of a field, looked up by the name a condition was compiled with.
    pub header: &'a (dyn Fn(&HeaderName) -> Option<&'a str> + Sync),
    /// Every field, for a CUSTOM policy's input; `None` where they are not known (the
    /// CLI's explanations).
    pub headers: Option<&'a http::HeaderMap>,
}

impl fmt::Debug for HttpRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (host {})", self.method, self.path, self.host)
    }
}

/// The outcome, with what decided it. Policies are named by their position in the slice
/// evaluated, so deciding allocates nothing (a request matching no AUDIT policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The deciding policy, if a policy decided.
    pub policy: Option<usize>,
    /// Index of the matching rule in that policy; `None` when a policy that could not be
    /// compiled decided.
    pub rule: Option<usize>,
    pub reason: &'static str,
    /// AUDIT policies that matched.
    pub audited: Vec<usize>,
    /// What the Rego policy of the deciding CUSTOM policy said, when one denied; else
    /// that of the last CUSTOM policy that allowed, if any was asked.
    pub rego: Option<RegoVerdict>,
}

/// Why an AuthorizationPolicy cannot be compiled, naming the field as it is written in
/// the resource (`spec.rules[2].when[0].key`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct PolicyError {
    pub field: String,
    pub problem: PolicyProblem,
}

/// What is wrong with one field of an AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    #[error("path pattern {pattern:?} has no normal form: {reason}")]
    Path {
        pattern: String,
        reason: InvalidPath,
    },
    #[error(
        "host pattern {0:?}: use a host name, a bracketed IPv6 address, `*`, or one of them with `*` at the start or end"
    )]
    Host(String),
    #[error("{0:?} is not an HTTP method (or `*`)")]
    Method(String),
    #[error("principal {pattern:?} can never match: {reason}")]
    Principal {
        pattern: String,
        reason: SpiffeIdError,
    },
    #[error("key {0:?}: the only condition key understood is request.headers[<name>]")]
    ConditionKey(String),
    #[error("key {0:?}: not a valid HTTP header name")]
    HeaderName(String),
    #[error("action CUSTOM needs a provider with a rego policy")]
    MissingProvider,
    #[error("a provider is only for action CUSTOM")]
    UnexpectedProvider,
    #[error(
        "a CUSTOM policy without rules would decide no request: write `rules: [{{}}]` for every request"
    )]
    CustomWithoutRules,
    #[error("{0}")]
    Rego(#[from] RegoError),
}

impl PolicyError {
    fn new(field: impl Into<String>, problem: PolicyProblem) -> Self {
        Self {
            field: field.into(),
            problem,
        }
    }

    /// The same error, its field named from one level up (`rules[2].` + `when[0].key`).
    fn under(mut self, parent: fmt::Arguments<'_>) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

/// An AuthorizationPolicy checked and converted once, when a snapshot or configuration
/// arrives, into the form requests are compared with: patterns split into exact, prefix
/// and suffix matchers, paths and hosts in their normal form, principals parsed, header
/// names parsed. Evaluating one allocates nothing and parses nothing.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// `namespace/name`, how logs and metrics name the policy.
    id: String,
    action: Action,
    rules: Rules,
    /// A CUSTOM policy's Rego, compiled; shared by the clones of this policy.
    rego: Option<Arc<CompiledRego>>,
}

#[derive(Debug, Clone)]
enum Rules {
    Checked(Vec<RuleMatch>),
    /// A policy that could not be compiled: it fails closed, matching every request if it
    /// is a DENY and none otherwise, so it can close access but never open it.
    Unusable(PolicyError),
}

impl TryFrom<&Named<AuthorizationPolicySpec>> for CompiledPolicy {
    type Error = PolicyError;

    fn try_from(policy: &Named<AuthorizationPolicySpec>) -> Result<Self, PolicyError> {
        let rules = policy
            .spec
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                RuleMatch::try_from(rule).map_err(|e| e.under(format_args!("spec.rules[{index}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rego = match (policy.spec.action, &policy.spec.provider) {
            (Action::Custom, None) => {
                return Err(PolicyError::new(
                    "spec.provider",
                    PolicyProblem::MissingProvider,
                ));
            }
            (Action::Custom, Some(_)) if rules.is_empty() => {
                return Err(PolicyError::new(
                    "spec.rules",
                    PolicyProblem::CustomWithoutRules,
                ));
            }
            (Action::Custom, Some(provider)) => {
                let rego = CompiledRego::try_from(&provider.rego)
                    .map_err(|e| PolicyError::new("spec.provider.rego", e.into()))?;
                Some(Arc::new(rego))
            }
            (_, Some(_)) => {
                return Err(PolicyError::new(
                    "spec.provider",
                    PolicyProblem::UnexpectedProvider,
                ));
            }
            (_, None) => None,
        };
        Ok(Self {
            id: policy.id(),
            action: policy.spec.action,
            rules: Rules::Checked(rules),
            rego,
        })
    }
}

impl CompiledPolicy {
    /// Stands in for a policy that failed to compile (a proxy cannot refuse what the
    /// control plane sent): a DENY or CUSTOM policy denies every request, any other
    /// action matches none.
    pub fn fail_closed(policy: &Named<AuthorizationPolicySpec>, error: PolicyError) -> Self {
        Self {
            id: policy.id(),
            action: policy.spec.action,
            rules: Rules::Unusable(error),
            rego: None,
        }
    }

    /// `namespace/name` of the policy.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn action(&self) -> Action {
        self.action
    }

    /// A CUSTOM policy's Rego, when it compiled.
    pub fn rego(&self) -> Option<&CompiledRego> {
        self.rego.as_deref()
    }

    /// Why the policy could not be compiled, if it could not.
    pub fn error(&self) -> Option<&PolicyError> {
        match &self.rules {
            Rules::Checked(_) => None,
            Rules::Unusable(error) => Some(error),
        }
    }

    /// Which rule matches `request`: `Some(None)` when a policy that could not be
    /// compiled matches (a DENY always does).
    fn matching_rule(&self, request: &Facts<'_, '_>) -> Option<Option<usize>> {
        // A CUSTOM policy's rules say when its Rego is asked: asking too often never
        // opens access, so like a DENY's they take uncheckable fields as matching.
        let lenient = matches!(self.action, Action::Deny | Action::Custom);
        match &self.rules {
            Rules::Checked(rules) => rules
                .iter()
                .position(|rule| rule.matches(request, lenient))
                .map(Some),
            Rules::Unusable(_) => lenient.then_some(None),
        }
    }
}

/// Evaluates the authorization policies that select a workload (callers filter with
/// [`selects`]) against one request.
pub fn authorize<P>(policies: &[P], request: &Request<'_>) -> Decision
where
    P: Borrow<CompiledPolicy>,
{
    let facts = Facts::new(request);
    let with_action = |action| {
        policies
            .iter()
            .map(Borrow::borrow)
            .enumerate()
            .filter(move |(_, p): &(usize, &CompiledPolicy)| p.action == action)
    };
    let audited = with_action(Action::Audit)
        .filter(|(_, p)| p.matching_rule(&facts).is_some())
        .map(|(index, _)| index)
        .collect();
    for (index, policy) in with_action(Action::Deny) {
        if let Some(rule) = policy.matching_rule(&facts) {
            return Decision {
                allowed: false,
                policy: Some(index),
                rule,
                reason: match rule {
                    Some(_) => "matched a DENY policy",
                    None => "a DENY policy that could not be compiled denies every request",
                },
                audited,
                rego: None,
            };
        }
    }
    let mut rego = None;
    for (index, policy) in with_action(Action::Custom) {
        let Some(rule) = policy.matching_rule(&facts) else {
            continue;
        };
        let Some(compiled) = policy.rego() else {
            return Decision {
                allowed: false,
                policy: Some(index),
                rule,
                reason: "a CUSTOM policy that could not be compiled denies every request",
                audited,
                rego: None,
            };
        };
        let verdict = compiled.evaluate(request);
        if !verdict.allowed {
            return Decision {
                allowed: false,
                policy: Some(index),
                rule,
                reason: match verdict.failure {
                    None => "denied by a CUSTOM policy",
                    Some(_) => "a CUSTOM policy gave no decision",
                },
                audited,
                rego: Some(verdict),
            };
        }
        rego = Some(verdict);
    }
    let mut allow_policies = with_action(Action::Allow).peekable();
    if allow_policies.peek().is_none() {
        return Decision {
            allowed: true,
            policy: None,
            rule: None,
            reason: "no ALLOW policy selects this workload",
            audited,
            rego,
        };
    }
    for (index, policy) in allow_policies {
        if let Some(rule) = policy.matching_rule(&facts) {
            return Decision {
                allowed: true,
                policy: Some(index),
                rule,
                reason: "matched an ALLOW policy",
                audited,
                rego,
            };
        }
    }
    Decision {
        allowed: false,
        policy: None,
        rule: None,
        reason: "no ALLOW policy matched",
        audited,
        rego,
    }
}

/// A request as the matchers read it: its host without port, worked out once, and its
/// normal path, worked out on first use (only rules that name paths need it).
struct Facts<'r, 'a> {
    request: &'r Request<'a>,
    /// The requested host without port or trailing dot; `None` when it cannot be compared.
    host: Option<&'a str>,
    /// That host as an IPv6 address, when it is a bracketed one.
    host_address: Option<Ipv6Addr>,
    normal_path: OnceCell<Result<Cow<'a, str>, InvalidPath>>,
}

impl<'r, 'a> Facts<'r, 'a> {
    fn new(request: &'r Request<'a>) -> Self {
        let host = request
            .http
            .map(|http| host_without_port(http.host))
            .filter(|host| is_comparable_host(host));
        Self {
            request,
            host,
            host_address: host.and_then(bracketed_address),
            normal_path: OnceCell::new(),
        }
    }

    /// Callers hand over the path they forward, normally already normal (then this is
    /// one pass, no allocation); any other is normalized here, so no caller can skip it.
    fn normal_path(&self) -> Option<&str> {
        let http = self.request.http?;
        self.normal_path
            .get_or_init(|| normalize_path(http.path))
            .as_deref()
            .ok()
    }
}

/// One rule: a request matches when a `from`, a `to` (each if any) and every `when`
/// match.
#[derive(Debug, Clone)]
struct RuleMatch {
    from: Vec<SourceMatch>,
    to: Vec<OperationMatch>,
    when: Vec<ConditionMatch>,
}

impl TryFrom<&Rule> for RuleMatch {
    type Error = PolicyError;

    fn try_from(rule: &Rule) -> Result<Self, PolicyError> {
        let from = rule
            .from
            .iter()
            .enumerate()
            .map(|(index, from)| {
                SourceMatch::try_from(&from.source)
                    .map_err(|e| e.under(format_args!("from[{index}].source")))
            })
            .collect::<Result<_, _>>()?;
        let to = rule
            .to
            .iter()
            .enumerate()
            .map(|(index, to)| {
                OperationMatch::try_from(&to.operation)
                    .map_err(|e| e.under(format_args!("to[{index}].operation")))
            })
            .collect::<Result<_, _>>()?;
        let when = rule
            .when
            .iter()
            .enumerate()
            .map(|(index, condition)| {
                ConditionMatch::try_from(condition)
                    .map_err(|e| e.under(format_args!("when[{index}]")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { from, to, when })
    }
}

impl RuleMatch {
    /// For opaque TCP, HTTP-only fields cannot be checked: an ALLOW rule that has them
    /// never matches, a DENY rule ignores them (`lenient`), so uncheckable conditions
    /// never open access.
    fn matches(&self, request: &Facts<'_, '_>, lenient: bool) -> bool {
        let from = self.from.is_empty() || self.from.iter().any(|f| f.matches(request, lenient));
        let to = self.to.is_empty() || self.to.iter().any(|t| t.matches(request, lenient));
        let when = self.when.iter().all(|c| c.matches(request, lenient));
        from && to && when
    }
}

#[derive(Debug, Clone)]
struct SourceMatch {
    principals: Vec<PrincipalMatch>,
    not_principals: Vec<PrincipalMatch>,
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    request_principals: Vec<StringMatch>,
    not_request_principals: Vec<StringMatch>,
}

impl TryFrom<&Source> for SourceMatch {
    type Error = PolicyError;

    fn try_from(source: &Source) -> Result<Self, PolicyError> {
        let principals = |field: &str, patterns: &[String]| {
            patterns
                .iter()
                .enumerate()
                .map(|(index, pattern)| {
                    PrincipalMatch::new(pattern).map_err(|reason| {
                        PolicyError::new(
                            format!("{field}[{index}]"),
                            PolicyProblem::Principal {
                                pattern: pattern.clone(),
                                reason,
                            },
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            principals: principals("principals", &source.principals)?,
            not_principals: principals("notPrincipals", &source.not_principals)?,
            namespaces: StringMatch::all(&source.namespaces),
            not_namespaces: StringMatch::all(&source.not_namespaces),
            request_principals: StringMatch::all(&source.request_principals),
            not_request_principals: StringMatch::all(&source.not_request_principals),
        })
    }
}

impl SourceMatch {
    fn matches(&self, facts: &Facts<'_, '_>, lenient: bool) -> bool {
        let request = facts.request;
        let principal = request.source;
        let namespace = principal.map(SpiffeId::namespace);
        let principal_is = |p: &PrincipalMatch| principal.is_some_and(|id| p.matches(id));
        let namespace_is = |n: &StringMatch| namespace.is_some_and(|ns| n.matches(ns));
        let principals_ok = any_or_empty(&self.principals, principal_is)
            && none_of(&self.not_principals, principal_is);
        let namespaces_ok = any_or_empty(&self.namespaces, namespace_is)
            && none_of(&self.not_namespaces, namespace_is);
        let jwt_fields =
            !self.request_principals.is_empty() || !self.not_request_principals.is_empty();
        let request_ok = if request.http.is_none() && jwt_fields {
            lenient
        } else {
            let rp = request.request_principal;
            let rp_is = |p: &StringMatch| rp.is_some_and(|rp| p.matches(rp));
            any_or_empty(&self.request_principals, rp_is)
                && none_of(&self.not_request_principals, rp_is)
        };
        principals_ok && namespaces_ok && request_ok
    }
}

#[derive(Debug, Clone)]
struct OperationMatch {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Vec<MethodMatch>,
    not_methods: Vec<MethodMatch>,
    paths: Vec<PathPattern<'static>>,
    not_paths: Vec<PathPattern<'static>>,
    hosts: Vec<HostPattern>,
    not_hosts: Vec<HostPattern>,
}

impl TryFrom<&Operation> for OperationMatch {
    type Error = PolicyError;

    fn try_from(operation: &Operation) -> Result<Self, PolicyError> {
        fn each<T>(
            field: &str,
            patterns: &[String],
            compile: impl Fn(&str) -> Result<T, PolicyProblem>,
        ) -> Result<Vec<T>, PolicyError> {
            patterns
                .iter()
                .enumerate()
                .map(|(index, pattern)| {
                    compile(pattern)
                        .map_err(|problem| PolicyError::new(format!("{field}[{index}]"), problem))
                })
                .collect()
        }
        let path = |pattern: &str| {
            PathPattern::parse(pattern)
                .map(PathPattern::into_owned)
                .map_err(|reason| PolicyProblem::Path {
                    pattern: pattern.to_string(),
                    reason,
                })
        };
        Ok(Self {
            ports: operation.ports.clone(),
            not_ports: operation.not_ports.clone(),
            methods: each("methods", &operation.methods, MethodMatch::new)?,
            not_methods: each("notMethods", &operation.not_methods, MethodMatch::new)?,
            paths: each("paths", &operation.paths, path)?,
            not_paths: each("notPaths", &operation.not_paths, path)?,
            hosts: each("hosts", &operation.hosts, HostPattern::new)?,
            not_hosts: each("notHosts", &operation.not_hosts, HostPattern::new)?,
        })
    }
}

impl OperationMatch {
    fn names_http_fields(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }

    fn matches(&self, facts: &Facts<'_, '_>, lenient: bool) -> bool {
        let request = facts.request;
        let ports_ok = any_or_empty(&self.ports, |p| *p == request.port)
            && none_of(&self.not_ports, |p| *p == request.port);
        let http_ok = match request.http {
            None => !self.names_http_fields() || lenient,
            Some(http) => {
                let method = |m: &MethodMatch| m.matches(http.method);
                // A path or host with no normal form cannot be compared: it matches for
                // a DENY and never for an ALLOW (`lenient`).
                let path = |p: &PathPattern<'_>| facts.normal_path().map(|path| p.matches(path));
                let host = |h: &HostPattern| {
                    facts
                        .host
                        .map(|host| h.matches(host, facts.host_address.as_ref()))
                };
                any_or_empty(&self.methods, method)
                    && none_of(&self.not_methods, method)
                    && any_or_empty(&self.paths, |p| path(p).unwrap_or(lenient))
                    && none_of(&self.not_paths, |p| path(p).unwrap_or(!lenient))
                    && any_or_empty(&self.hosts, |h| host(h).unwrap_or(lenient))
                    && none_of(&self.not_hosts, |h| host(h).unwrap_or(!lenient))
            }
        };
        ports_ok && http_ok
    }
}

/// `when: [{key: request.headers[<name>], values, notValues}]`.
#[derive(Debug, Clone)]
struct ConditionMatch {
    header: HeaderName,
    values: Vec<StringMatch>,
    not_values: Vec<StringMatch>,
}

impl TryFrom<&Condition> for ConditionMatch {
    type Error = PolicyError;

    fn try_from(condition: &Condition) -> Result<Self, PolicyError> {
        let key = &condition.key;
        // Unknown keys are refused: a typo must not change what a rule matches.
        let name = key
            .strip_prefix("request.headers[")
            .and_then(|rest| rest.strip_suffix(']'))
            .ok_or_else(|| PolicyError::new("key", PolicyProblem::ConditionKey(key.clone())))?;
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| PolicyError::new("key", PolicyProblem::HeaderName(key.clone())))?;
        Ok(Self {
            header,
            values: StringMatch::all(&condition.values),
            not_values: StringMatch::all(&condition.not_values),
        })
    }
}

impl ConditionMatch {
    fn matches(&self, facts: &Facts<'_, '_>, lenient: bool) -> bool {
        let Some(http) = facts.request.http else {
            return lenient;
        };
        let value = (http.header)(&self.header);
        let value_is = |v: &StringMatch| value.is_some_and(|actual| v.matches(actual));
        any_or_empty(&self.values, value_is) && none_of(&self.not_values, value_is)
    }
}

fn any_or_empty<T>(values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(matches)
}

fn none_of<T>(values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    !values.iter().any(matches)
}

/// The path policies are matched against, and the one forwarded to the application, so
/// that what the policy saw is what the application receives. Every spelling a decoding
/// application treats alike has one form (RFC 3986 §6.2.2, on bytes):
/// - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded;
/// - every other escape is kept, its hex in uppercase, and every byte outside visible
///   ASCII (non-ASCII UTF-8, space) is percent-encoded, as are `?` and `#`, which in a
///   path can only be data; so `/é//admin`, `/%C3%A9/admin` and `/%c3%a9/./admin` are
///   all `/%C3%A9/admin`;
/// - `.`/`..` segments are resolved (also when spelled `%2E`) and repeated slashes
///   merged, so `/a/../admin`, `//admin` and `/%61dmin` are all `/admin`.
///
/// Refused, because no form is safe to check and forward:
/// - `%` not followed by two hex digits: kept, the bytes after it could spell a new
///   escape once decoded (`/%%36%31dmin` would be `/%61dmin`, which the application
///   serves as `/admin`);
/// - control characters, raw or encoded (`%00`–`%1F`, `%7F`): they end strings and
///   split log lines;
/// - an encoded slash or backslash (`%2F`, `%5C`) and a raw backslash. Kept encoded (as
///   Envoy does by default) they are one segment to the policy, yet some applications
///   and frameworks decode `%2F` into a separator, or treat `\` as `/`, so a DENY on
///   `/admin/secret` would miss `/admin%2Fsecret`; decoded they would change the path
///   for the applications that do not. No legitimate caller of a mesh service needs
///   them, so they are refused (400) rather than guessed at.
///
/// The result is its own normal form (normalizing twice changes nothing), and an
/// already-normal path is returned borrowed: the common request allocates nothing.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let mut canonical = String::with_capacity(path.len() + 8);
    push_canonical(path, &mut canonical)?;
    // Escapes of `/` are refused, so every `/` left separates segments.
    let ends_with_slash =
        canonical.ends_with('/') || canonical.ends_with("/.") || canonical.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for segment in canonical.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut normalized = String::with_capacity(canonical.len() + 1);
    for segment in &segments {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() || (ends_with_slash && !segments.is_empty()) {
        normalized.push('/');
    }
    debug_assert!(is_normal(&normalized), "{normalized}");
    Ok(Cow::Owned(normalized))
}

/// A request path that has no normal form, so no policy can be checked against it: the
/// proxy refuses the request (400), and the engine treats it as matching every DENY and
/// no ALLOW that names paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPath {
    /// `%` not followed by two hexadecimal digits.
    #[error("malformed percent-encoding at byte {0}: `%` must be followed by two hex digits")]
    MalformedEscape(usize),
    /// A control character (0x00–0x1F, 0x7F), raw or percent-encoded.
    #[error("control character {byte:#04x} at byte {at}")]
    ControlCharacter { at: usize, byte: u8 },
    /// `%2F` or `%5C`, which some applications decode into a path separator.
    #[error(
        "encoded {} at byte {at}: applications disagree on whether it separates segments",
        if *.byte == b'/' { "slash (%2F)" } else { "backslash (%5C)" }
    )]
    EncodedSeparator { at: usize, byte: u8 },
    /// `\`, which some applications and file systems treat as `/`.
    #[error("backslash at byte {0}: some applications treat it as a path separator")]
    Backslash(usize),
}

/// ALPHA / DIGIT / `-` / `.` / `_` / `~` (RFC 3986 §2.3): the same written raw or encoded.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// A byte a normal path carries as itself: visible ASCII, except `%` (always the start
/// of an escape), `\` (refused) and `?`/`#` (which would end the path).
fn is_literal(byte: u8) -> bool {
    byte.is_ascii_graphic() && !matches!(byte, b'%' | b'\\' | b'?' | b'#')
}

/// Whether a byte that arrived percent-encoded stays encoded in a normal path, or why
/// the path has no normal form.
fn kept_encoded(byte: u8, at: usize) -> Result<bool, InvalidPath> {
    match byte {
        0x00..=0x1F | 0x7F => Err(InvalidPath::ControlCharacter { at, byte }),
        b'/' | b'\\' => Err(InvalidPath::EncodedSeparator { at, byte }),
        _ => Ok(!is_unreserved(byte)),
    }
}

const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|value| value as u8)
}

/// Whether `path` is already in [`normalize_path`]'s form: one pass, no allocation.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    let dot_segment = |segment: &[u8]| segment == b"." || segment == b"..";
    let mut segment_start = 1;
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'/' => {
                let segment = &bytes[segment_start..i];
                if segment.is_empty() || dot_segment(segment) {
                    return false;
                }
                segment_start = i + 1;
            }
            b'%' if is_normal_escape(&bytes[i..]) => {
                i += 3;
                continue;
            }
            byte if is_literal(byte) => {}
            _ => return false,
        }
        i += 1;
    }
    !dot_segment(&bytes[segment_start..])
}

/// Whether `bytes` starts with an escape as a normal path writes it: uppercase hex, of a
/// byte that stays encoded.
fn is_normal_escape(bytes: &[u8]) -> bool {
    let upper = |digit: &u8| matches!(digit, b'0'..=b'9' | b'A'..=b'F');
    match bytes {
        [b'%', high, low, ..] if upper(high) && upper(low) => {
            let value = hex_value(*high).unwrap_or(0) << 4 | hex_value(*low).unwrap_or(0);
            kept_encoded(value, 0) == Ok(true)
        }
        _ => false,
    }
}

/// Whether a piece of a path (a suffix pattern) is spelled as in a normal path: no
/// allocation for the patterns written that way.
fn is_normal_fragment(fragment: &str) -> bool {
    let bytes = fragment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if is_normal_escape(&bytes[i..]) => i += 3,
            b'/' if bytes.get(i + 1) == Some(&b'/') => return false,
            byte if is_literal(byte) => i += 1,
            _ => return false,
        }
    }
    true
}

/// Appends `raw` to `out` with every byte in its normal spelling (escapes decoded or
/// uppercased, other bytes encoded), leaving segments alone. Error offsets are in `raw`.
fn push_canonical(raw: &str, out: &mut String) -> Result<(), InvalidPath> {
    let bytes = raw.as_bytes();
    let push_escape = |out: &mut String, byte: u8| {
        out.push('%');
        out.push(UPPER_HEX[usize::from(byte >> 4)] as char);
        out.push(UPPER_HEX[usize::from(byte & 0xF)] as char);
    };
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == b'%' {
            let value = match bytes.get(i + 1..i + 3) {
                Some([high, low]) => hex_value(*high).zip(hex_value(*low)),
                _ => None,
            };
            let Some((high, low)) = value else {
                return Err(InvalidPath::MalformedEscape(i));
            };
            let value = high << 4 | low;
            if kept_encoded(value, i)? {
                push_escape(out, value);
            } else {
                out.push(value as char);
            }
            i += 3;
            continue;
        }
        match byte {
            0x00..=0x1F | 0x7F => return Err(InvalidPath::ControlCharacter { at: i, byte }),
            b'\\' => return Err(InvalidPath::Backslash(i)),
            byte if is_literal(byte) => out.push(byte as char),
            // Space, `?`, `#` and each byte of a non-ASCII character.
            byte => push_escape(out, byte),
        }
        i += 1;
    }
    Ok(())
}

/// A configured path pattern in the form requests are compared in: exact, `prefix*`,
/// `*suffix` or `*`.
#[derive(Debug, Clone)]
enum PathPattern<'p> {
    Any,
    Exact(Cow<'p, str>),
    Prefix(Cow<'p, str>),
    Suffix(Cow<'p, str>),
}

impl<'p> PathPattern<'p> {
    /// Puts the literal part of `pattern` through the request's canonicalization, so a
    /// pattern matches every spelling of the paths it names. A prefix keeps its last,
    /// unfinished segment as written (`/a/.*` is "`/a/.` and more", not `/a/`); a
    /// suffix, which may start mid-segment, is canonicalized byte by byte.
    fn parse(pattern: &'p str) -> Result<Self, InvalidPath> {
        if pattern == "*" {
            return Ok(PathPattern::Any);
        }
        if let Some(prefix) = pattern.strip_suffix('*') {
            if is_normal(prefix) {
                return Ok(PathPattern::Prefix(Cow::Borrowed(prefix)));
            }
            let mut canonical = String::with_capacity(prefix.len() + 8);
            let tail = match prefix.rfind('/') {
                Some(last_slash) if prefix.starts_with('/') => {
                    let head = &prefix[..=last_slash];
                    canonical.push_str(&normalize_path(head)?);
                    last_slash + 1
                }
                _ => 0,
            };
            push_canonical(&prefix[tail..], &mut canonical).map_err(|error| error.shifted(tail))?;
            return Ok(PathPattern::Prefix(Cow::Owned(canonical)));
        }
        if let Some(suffix) = pattern.strip_prefix('*') {
            if is_normal_fragment(suffix) {
                return Ok(PathPattern::Suffix(Cow::Borrowed(suffix)));
            }
            let mut canonical = String::with_capacity(suffix.len() + 8);
            push_canonical(suffix, &mut canonical).map_err(|error| error.shifted(1))?;
            // Normal paths have no empty segment.
            while let Some(at) = canonical.find("//") {
                canonical.remove(at);
            }
            return Ok(PathPattern::Suffix(Cow::Owned(canonical)));
        }
        normalize_path(pattern).map(PathPattern::Exact)
    }

    /// The pattern holding its own text, as a compiled policy keeps it.
    fn into_owned(self) -> PathPattern<'static> {
        let owned = |text: Cow<'_, str>| Cow::Owned(text.into_owned());
        match self {
            PathPattern::Any => PathPattern::Any,
            PathPattern::Exact(text) => PathPattern::Exact(owned(text)),
            PathPattern::Prefix(text) => PathPattern::Prefix(owned(text)),
            PathPattern::Suffix(text) => PathPattern::Suffix(owned(text)),
        }
    }

    fn matches(&self, normal_path: &str) -> bool {
        match self {
            PathPattern::Any => true,
            PathPattern::Exact(exact) => normal_path == exact,
            PathPattern::Prefix(prefix) => normal_path.starts_with(&**prefix),
            PathPattern::Suffix(suffix) => normal_path.ends_with(&**suffix),
        }
    }
}

impl InvalidPath {
    /// The same error, with its offset counted from `by` bytes earlier.
    fn shifted(self, by: usize) -> Self {
        match self {
            InvalidPath::MalformedEscape(at) => InvalidPath::MalformedEscape(at + by),
            InvalidPath::ControlCharacter { at, byte } => {
                InvalidPath::ControlCharacter { at: at + by, byte }
            }
            InvalidPath::EncodedSeparator { at, byte } => {
                InvalidPath::EncodedSeparator { at: at + by, byte }
            }
            InvalidPath::Backslash(at) => InvalidPath::Backslash(at + by),
        }
    }
}

/// `example.com:8080`, `example.com.` and `[fd00::1]:80` name `example.com` and
/// `[fd00::1]`. The port is the caller's to write, so it carries no authority: the
/// application port is what `ports` checks.
fn host_without_port(host: &str) -> &str {
    let digits = |port: &str| port.bytes().all(|b| b.is_ascii_digit());
    let name = if host.starts_with('[') {
        match host.find(']') {
            Some(end) if end + 1 == host.len() => host,
            Some(end) if host[end + 1..].strip_prefix(':').is_some_and(digits) => &host[..=end],
            _ => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if digits(port) && !name.contains(':') => name,
            _ => host,
        }
    };
    name.trim_end_matches('.')
}

/// Whether a host (port and trailing dot removed) can be compared at all: a DNS name or
/// a bracketed IP address. A host with `%`, `@`, `/` or anything else an application
/// might decode or split differently has no one reading, so it is not compared.
fn is_comparable_host(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(address) => address
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.')),
        None => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')),
    }
}

/// `[fd00::1]` as an address, so every spelling of it compares equal.
fn bracketed_address(host: &str) -> Option<Ipv6Addr> {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse().ok())
}

/// A host pattern, compared with a request's host (without port) case-insensitively:
/// the pattern also without port or trailing dot, IPv6 addresses compared as addresses.
#[derive(Debug, Clone)]
enum HostPattern {
    Any,
    /// `admin.*`, lowercased.
    Prefix(Box<str>),
    /// `*.shop`, lowercased, without port or trailing dot.
    Suffix(Box<str>),
    /// A name, lowercased; or an address, when it is a bracketed IPv6 one.
    Exact {
        name: Box<str>,
        address: Option<Ipv6Addr>,
    },
}

impl HostPattern {
    fn new(pattern: &str) -> Result<Self, PolicyProblem> {
        if pattern == "*" {
            return Ok(HostPattern::Any);
        }
        // `admin.*`: nothing to strip from a name that is not finished.
        let literal = match (pattern.strip_suffix('*'), pattern.strip_prefix('*')) {
            (Some(prefix), _) => prefix,
            (None, Some(suffix)) => host_without_port(suffix),
            (None, None) => host_without_port(pattern),
        };
        let literal_ok = literal.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        });
        if !literal_ok {
            return Err(PolicyProblem::Host(pattern.to_string()));
        }
        let lowercase: Box<str> = literal.to_ascii_lowercase().into();
        Ok(if pattern.ends_with('*') {
            HostPattern::Prefix(lowercase)
        } else if pattern.starts_with('*') {
            HostPattern::Suffix(lowercase)
        } else {
            HostPattern::Exact {
                name: lowercase,
                address: bracketed_address(literal),
            }
        })
    }

    /// `host` is without port and comparable; `address` is it parsed, if it is an IPv6
    /// address.
    fn matches(&self, host: &str, address: Option<&Ipv6Addr>) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Prefix(prefix) => host
                .as_bytes()
                .get(..prefix.len())
                .is_some_and(|start| start.eq_ignore_ascii_case(prefix.as_bytes())),
            HostPattern::Suffix(suffix) => host
                .len()
                .checked_sub(suffix.len())
                .and_then(|start| host.as_bytes().get(start..))
                .is_some_and(|end| end.eq_ignore_ascii_case(suffix.as_bytes())),
            HostPattern::Exact {
                address: Some(pattern),
                ..
            } if address.is_some() => address == Some(pattern),
            HostPattern::Exact { name, .. } => name.eq_ignore_ascii_case(host),
        }
    }
}

/// A principal pattern: a SPIFFE ID, written with or without `spiffe://`, or a pattern
/// with `*` at the start or end matched against the ID as it was written.
#[derive(Debug, Clone)]
enum PrincipalMatch {
    Exact(SpiffeId),
    /// `with_scheme`: the pattern starts with `spiffe://`, so it is matched against the
    /// whole ID; otherwise against the ID without it.
    Pattern {
        pattern: StringMatch,
        with_scheme: bool,
    },
}

impl PrincipalMatch {
    fn new(pattern: &str) -> Result<Self, SpiffeIdError> {
        let with_scheme = pattern.starts_with("spiffe://");
        match StringMatch::new(pattern) {
            StringMatch::Exact(_) if with_scheme => pattern.parse().map(PrincipalMatch::Exact),
            StringMatch::Exact(_) => format!("spiffe://{pattern}")
                .parse()
                .map(PrincipalMatch::Exact),
            pattern => Ok(PrincipalMatch::Pattern {
                pattern,
                with_scheme,
            }),
        }
    }

    fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            PrincipalMatch::Exact(exact) => exact == id,
            PrincipalMatch::Pattern {
                pattern,
                with_scheme,
            } => {
                let full = id.as_str();
                let written = if *with_scheme {
                    full
                } else {
                    &full["spiffe://".len()..]
                };
                pattern.matches(written)
            }
        }
    }
}

/// Exact, `*`, `prefix*` or `*suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StringMatch {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl StringMatch {
    fn new(pattern: &str) -> Self {
        if pattern == "*" {
            StringMatch::Any
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.into())
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.into())
        } else {
            StringMatch::Exact(pattern.into())
        }
    }

    fn all(patterns: &[String]) -> Vec<Self> {
        patterns.iter().map(|p| Self::new(p)).collect()
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Any => true,
            StringMatch::Exact(exact) => value == &**exact,
            StringMatch::Prefix(prefix) => value.starts_with(&**prefix),
            StringMatch::Suffix(suffix) => value.ends_with(&**suffix),
        }
    }
}

/// A method, compared case-sensitively (RFC 9110: `get` is not `GET`), or `*`.
#[derive(Debug, Clone)]
enum MethodMatch {
    Any,
    Exact(Box<str>),
}

impl MethodMatch {
    fn new(method: &str) -> Result<Self, PolicyProblem> {
        if method == "*" {
            return Ok(MethodMatch::Any);
        }
        http::Method::from_bytes(method.as_bytes())
            .map(|_| MethodMatch::Exact(method.into()))
            .map_err(|_| PolicyProblem::Method(method.to_string()))
    }

    fn matches(&self, method: &str) -> bool {
        match self {
            MethodMatch::Any => true,
            MethodMatch::Exact(exact) => method == &**exact,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
    const WORKLOAD: WorkloadRef<'static> = WorkloadRef {
        namespace: "shop",
        service_account: "orders",
        labels: &NO_LABELS,
    };

    /// Istio's `matchLabels`: every label given, with its value; with a service account,
    /// both; in the root namespace, in every namespace; an empty selector selects all.
    #[test]
    fn selectors_match_labels_and_service_accounts_together() {
        let labels: BTreeMap<String, String> = [("app", "orders"), ("version", "v2")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let workload = WorkloadRef {
            labels: &labels,
            ..WORKLOAD
        };
        let selector = |yaml: &str| serde_saphyr::from_str::<WorkloadSelector>(yaml).unwrap();
        let cases = [
            ("shop", "{matchLabels: {app: orders}}", true),
            ("shop", "{matchLabels: {app: orders, version: v2}}", true),
            ("shop", "{matchLabels: {app: orders, version: v1}}", false),
            ("shop", "{matchLabels: {tier: web}}", false),
            (
                "shop",
                "{serviceAccount: orders, matchLabels: {app: orders}}",
                true,
            ),
            (
                "shop",
                "{serviceAccount: payments, matchLabels: {app: orders}}",
                false,
            ),
            ("shop", "{}", true),
            ("other", "{matchLabels: {app: orders}}", false),
            (ROOT_NAMESPACE, "{matchLabels: {app: orders}}", true),
            (ROOT_NAMESPACE, "{matchLabels: {app: payments}}", false),
        ];
        for (namespace, yaml, expected) in cases {
            let selector = selector(yaml);
            assert_eq!(
                selects(namespace, Some(&selector), workload),
                expected,
                "{namespace} {yaml}"
            );
            // Labels select nothing in a workload that has none.
            if !selector.match_labels.is_empty() {
                assert!(!selects(namespace, Some(&selector), WORKLOAD), "{yaml}");
            }
        }
        // A label selector is as specific as a service-account one: it beats the
        // namespace's policy for the mTLS mode.
        let peer = |namespace: &str, yaml: &str| Named {
            name: "p".into(),
            namespace: namespace.into(),
            spec: serde_saphyr::from_str::<PeerAuthenticationSpec>(yaml).unwrap(),
        };
        let policies = [
            peer("shop", "mtls: {mode: STRICT}\n"),
            peer(
                "shop",
                "selector: {matchLabels: {app: orders}}\nmtls: {mode: PERMISSIVE}\n",
            ),
        ];
        assert_eq!(mtls_mode(&policies, workload, 8080).0, MtlsMode::Permissive);
        assert_eq!(mtls_mode(&policies, WORKLOAD, 8080).0, MtlsMode::Strict);
    }

    fn policy(namespace: &str, name: &str, yaml: &str) -> Named<AuthorizationPolicySpec> {
        Named {
            name: name.into(),
            namespace: namespace.into(),
            spec: serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}")),
        }
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    struct Call {
        source: Option<SpiffeId>,
        jwt: Option<&'static str>,
        port: u16,
        http: Option<(&'static str, &'static str, &'static str)>,
        headers: &'static [(&'static str, &'static str)],
    }

    fn http(source: Option<SpiffeId>, method: &'static str, path: &'static str) -> Call {
        Call {
            source,
            jwt: None,
            port: 8080,
            http: Some((method, path, "orders.shop")),
            headers: &[],
        }
    }

    fn tcp(source: Option<SpiffeId>, port: u16) -> Call {
        Call {
            source,
            jwt: None,
            port,
            http: None,
            headers: &[],
        }
    }

    /// Compiles `policies` as a proxy does: one that cannot be compiled fails closed.
    fn compile(policies: &[Named<AuthorizationPolicySpec>]) -> Vec<CompiledPolicy> {
        policies
            .iter()
            .map(|p| {
                CompiledPolicy::try_from(p).unwrap_or_else(|e| CompiledPolicy::fail_closed(p, e))
            })
            .collect()
    }

    fn decide(policies: &[Named<AuthorizationPolicySpec>], call: &Call) -> Decision {
        let selected: Vec<_> = policies
            .iter()
            .filter(|p| selects(&p.namespace, p.spec.selector.as_ref(), WORKLOAD))
            .cloned()
            .collect();
        let selected = compile(&selected);
        let headers = call.headers;
        let header = move |name: &HeaderName| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name.as_str()))
                .map(|(_, v)| *v)
        };
        let request = Request {
            source: call.source.as_ref(),
            destination: None,
            request_principal: call.jwt,
            jwt_claims: None,
            port: call.port,
            http: call.http.map(|(method, path, host)| HttpRequest {
                method,
                path,
                query: None,
                host,
                scheme: "http",
                protocol: "HTTP/1.1",
                header: &header,
                headers: None,
            }),
        };
        authorize(&selected, &request)
    }

    /// What `http_only_fields` names is exactly what the engine cannot check on TCP: an
    /// ALLOW rule naming one does not match a connection; one naming none does; a DENY
    /// matches a connection whatever HTTP-only fields it names.
    #[test]
    fn http_only_fields_are_those_tcp_cannot_match() {
        let cases = [
            ("- to: [{operation: {ports: [9090]}}]\n", vec![]),
            ("- from: [{source: {principals: ['*']}}]\n", vec![]),
            (
                "- to: [{operation: {ports: [9090], methods: [GET], notPaths: [/x]}}]\n",
                vec!["to[0].operation.methods", "to[0].operation.notPaths"],
            ),
            (
                "- to: [{operation: {hosts: [a]}}, {operation: {notHosts: [b], notMethods: [PUT]}}]\n",
                vec![
                    "to[0].operation.hosts",
                    "to[1].operation.notMethods",
                    "to[1].operation.notHosts",
                ],
            ),
            (
                "- from: [{source: {requestPrincipals: ['*']}}, {source: {notRequestPrincipals: [x/y]}}]\n",
                vec![
                    "from[0].source.requestPrincipals",
                    "from[1].source.notRequestPrincipals",
                ],
            ),
            (
                "- when: [{key: 'request.headers[x-a]', values: [b]}]\n",
                vec!["when[0] (request.headers[x-a])"],
            ),
        ];
        for (rules, expected) in cases {
            let allow = policy("shop", "a", &format!("action: ALLOW\nrules:\n{rules}"));
            assert_eq!(allow.spec.rules[0].http_only_fields(), expected, "{rules}");
            let allowed = decide(&[allow], &tcp(Some(id("shop", "frontend")), 9090)).allowed;
            assert_eq!(allowed, expected.is_empty(), "ALLOW {rules}");
            let deny = policy("shop", "d", &format!("action: DENY\nrules:\n{rules}"));
            let decision = decide(&[deny], &tcp(Some(id("shop", "frontend")), 9090));
            assert!(!decision.allowed, "DENY {rules}");
        }
    }

    #[test]
    fn evaluation_semantics_table() {
        let frontend = || Some(id("shop", "frontend"));
        let admin = || Some(id("ops", "admin"));
        let allow_frontend_post_orders = policy(
            "shop",
            "frontend-orders",
            "selector: {serviceAccount: orders}\naction: ALLOW\nrules:\n- from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]\n  to: [{operation: {methods: [POST], paths: [/orders]}}]\n",
        );
        let deny_delete = policy(
            "shop",
            "no-delete",
            "action: DENY\nrules:\n- to: [{operation: {methods: [DELETE]}}]\n",
        );
        let allow_nothing = policy("shop", "allow-nothing", "action: ALLOW\n");
        let allow_all = policy("shop", "allow-all", "action: ALLOW\nrules: [{}]\n");
        let allow_ops_ns = policy(
            "shop",
            "ops",
            "action: ALLOW\nrules:\n- from: [{source: {namespaces: [ops]}}]\n",
        );
        let allow_prefix = policy(
            "shop",
            "prefix",
            "action: ALLOW\nrules:\n- from: [{source: {principals: [\"cluster.local/ns/shop/*\"]}}]\n",
        );
        let allow_suffix = policy(
            "shop",
            "suffix",
            "action: ALLOW\nrules:\n- from: [{source: {principals: [\"*/sa/admin\"]}}]\n",
        );
        let allow_any_authenticated = policy(
            "shop",
            "mtls-only",
            "action: ALLOW\nrules:\n- from: [{source: {principals: [\"*\"]}}]\n",
        );
        let deny_plaintext = policy(
            "shop",
            "no-plaintext",
            "action: DENY\nrules:\n- from: [{source: {notPrincipals: [\"*\"]}}]\n",
        );
        let audit_all = policy("shop", "audit", "action: AUDIT\nrules: [{}]\n");
        let allow_api_prefix = policy(
            "shop",
            "api",
            "action: ALLOW\nrules:\n- to: [{operation: {paths: [\"/api/*\"]}}]\n",
        );
        let allow_suffix_path = policy(
            "shop",
            "txt",
            "action: ALLOW\nrules:\n- to: [{operation: {paths: [\"*.txt\"]}}]\n",
        );
        let allow_port_9090 = policy(
            "shop",
            "tcp-9090",
            "action: ALLOW\nrules:\n- to: [{operation: {ports: [9090]}}]\n",
        );
        let allow_get_only = policy(
            "shop",
            "get-only",
            "action: ALLOW\nrules:\n- to: [{operation: {methods: [GET]}}]\n",
        );
        let deny_get_tcp = policy(
            "shop",
            "deny-get",
            "action: DENY\nrules:\n- from: [{source: {namespaces: [ops]}}]\n  to: [{operation: {methods: [GET]}}]\n",
        );
        let other_workload = policy(
            "shop",
            "payments-only",
            "selector: {serviceAccount: payments}\naction: ALLOW\n",
        );
        let other_namespace = policy("billing", "elsewhere", "action: ALLOW\n");
        let mesh_wide_deny = policy(
            ROOT_NAMESPACE,
            "mesh-deny-admin",
            "action: DENY\nrules:\n- from: [{source: {principals: [cluster.local/ns/ops/sa/admin]}}]\n",
        );
        let header_rule = policy(
            "shop",
            "canary",
            "action: ALLOW\nrules:\n- when: [{key: \"request.headers[x-canary]\", values: [\"yes\"]}]\n",
        );
        let bad_key = policy(
            "shop",
            "typo",
            "action: ALLOW\nrules:\n- when: [{key: \"request.header[x]\", values: [\"1\"]}]\n",
        );
        let jwt_rule = policy(
            "shop",
            "jwt",
            "action: ALLOW\nrules:\n- from: [{source: {requestPrincipals: [\"https://issuer.example/*\"]}}]\n",
        );
        let not_path = policy(
            "shop",
            "not-admin",
            "action: ALLOW\nrules:\n- to: [{operation: {notPaths: [\"/admin*\"]}}]\n",
        );
        let host_rule = policy(
            "shop",
            "host",
            "action: ALLOW\nrules:\n- to: [{operation: {hosts: [\"*.shop\"]}}]\n",
        );
        let deny_admin_host = policy(
            "shop",
            "admin-host",
            "action: DENY\nrules:\n- to: [{operation: {hosts: [admin.shop]}}]\n",
        );
        let mesh_selected_deny = policy(
            ROOT_NAMESPACE,
            "orders-everywhere",
            "selector: {serviceAccount: orders}\naction: DENY\nrules: [{}]\n",
        );
        let not_namespace = policy(
            "shop",
            "not-ops",
            "action: DENY\nrules:\n- from: [{source: {notNamespaces: [shop]}}]\n",
        );

        type Case = (
            &'static str,
            Vec<Named<AuthorizationPolicySpec>>,
            Call,
            bool,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "no policy allows",
                vec![],
                http(frontend(), "GET", "/"),
                true,
                None,
            ),
            (
                "no policy allows plaintext",
                vec![],
                http(None, "GET", "/"),
                true,
                None,
            ),
            (
                "no policy allows tcp",
                vec![],
                tcp(admin(), 9090),
                true,
                None,
            ),
            (
                "allow rule matches",
                vec![allow_frontend_post_orders.clone()],
                http(frontend(), "POST", "/orders"),
                true,
                Some("shop/frontend-orders"),
            ),
            (
                "wrong method not allowed",
                vec![allow_frontend_post_orders.clone()],
                http(frontend(), "GET", "/orders"),
                false,
                None,
            ),
            (
                "wrong path not allowed",
                vec![allow_frontend_post_orders.clone()],
                http(frontend(), "POST", "/orders/1"),
                false,
                None,
            ),
            (
                "wrong principal not allowed",
                vec![allow_frontend_post_orders.clone()],
                http(admin(), "POST", "/orders"),
                false,
                None,
            ),
            (
                "plaintext not allowed by principal rule",
                vec![allow_frontend_post_orders.clone()],
                http(None, "POST", "/orders"),
                false,
                None,
            ),
            (
                "method match is case-sensitive",
                vec![allow_frontend_post_orders.clone()],
                http(frontend(), "post", "/orders"),
                false,
                None,
            ),
            (
                "deny beats allow",
                vec![allow_all.clone(), deny_delete.clone()],
                http(frontend(), "DELETE", "/orders"),
                false,
                Some("shop/no-delete"),
            ),
            (
                "allow when deny does not match",
                vec![allow_all.clone(), deny_delete.clone()],
                http(frontend(), "GET", "/orders"),
                true,
                Some("shop/allow-all"),
            ),
            (
                "deny alone allows the rest",
                vec![deny_delete.clone()],
                http(frontend(), "GET", "/"),
                true,
                None,
            ),
            (
                "deny alone denies its match",
                vec![deny_delete.clone()],
                http(None, "DELETE", "/x"),
                false,
                Some("shop/no-delete"),
            ),
            (
                "empty allow policy denies all",
                vec![allow_nothing.clone()],
                http(frontend(), "GET", "/"),
                false,
                None,
            ),
            (
                "empty allow plus allow-all allows",
                vec![allow_nothing.clone(), allow_all.clone()],
                http(frontend(), "GET", "/"),
                true,
                Some("shop/allow-all"),
            ),
            (
                "namespace source matches",
                vec![allow_ops_ns.clone()],
                http(admin(), "GET", "/"),
                true,
                Some("shop/ops"),
            ),
            (
                "namespace source rejects other namespace",
                vec![allow_ops_ns.clone()],
                http(frontend(), "GET", "/"),
                false,
                None,
            ),
            (
                "namespace source rejects plaintext",
                vec![allow_ops_ns.clone()],
                http(None, "GET", "/"),
                false,
                None,
            ),
            (
                "principal prefix wildcard",
                vec![allow_prefix.clone()],
                http(frontend(), "GET", "/"),
                true,
                Some("shop/prefix"),
            ),
            (
                "principal prefix wildcard rejects other ns",
                vec![allow_prefix.clone()],
                http(admin(), "GET", "/"),
                false,
                None,
            ),
            (
                "principal suffix wildcard",
                vec![allow_suffix.clone()],
                http(admin(), "GET", "/"),
                true,
                Some("shop/suffix"),
            ),
            (
                "any authenticated allows mtls",
                vec![allow_any_authenticated.clone()],
                http(frontend(), "GET", "/"),
                true,
                Some("shop/mtls-only"),
            ),
            (
                "any authenticated rejects plaintext",
                vec![allow_any_authenticated.clone()],
                http(None, "GET", "/"),
                false,
                None,
            ),
            (
                "deny unauthenticated denies plaintext",
                vec![deny_plaintext.clone()],
                http(None, "GET", "/"),
                false,
                Some("shop/no-plaintext"),
            ),
            (
                "deny unauthenticated spares mtls",
                vec![deny_plaintext.clone()],
                http(frontend(), "GET", "/"),
                true,
                None,
            ),
            (
                "deny unauthenticated on tcp",
                vec![deny_plaintext.clone()],
                tcp(None, 9090),
                false,
                Some("shop/no-plaintext"),
            ),
            (
                "audit does not block",
                vec![audit_all.clone(), allow_nothing.clone()],
                http(frontend(), "GET", "/"),
                false,
                None,
            ),
            (
                "audit alone allows",
                vec![audit_all.clone()],
                http(frontend(), "GET", "/"),
                true,
                None,
            ),
            (
                "path prefix",
                vec![allow_api_prefix.clone()],
                http(frontend(), "GET", "/api/v1/orders"),
                true,
                Some("shop/api"),
            ),
            (
                "path prefix mismatch",
                vec![allow_api_prefix.clone()],
                http(frontend(), "GET", "/apix"),
                false,
                None,
            ),
            (
                "path suffix",
                vec![allow_suffix_path.clone()],
                http(frontend(), "GET", "/docs/readme.txt"),
                true,
                Some("shop/txt"),
            ),
            (
                "tcp port rule matches tcp",
                vec![allow_port_9090.clone()],
                tcp(admin(), 9090),
                true,
                Some("shop/tcp-9090"),
            ),
            (
                "tcp port rule rejects other port",
                vec![allow_port_9090.clone()],
                tcp(admin(), 9091),
                false,
                None,
            ),
            (
                "allow with http fields never matches tcp",
                vec![allow_get_only.clone()],
                tcp(frontend(), 9090),
                false,
                None,
            ),
            (
                "allow with http fields matches http",
                vec![allow_get_only.clone()],
                http(frontend(), "GET", "/"),
                true,
                Some("shop/get-only"),
            ),
            (
                "deny ignores http fields for tcp",
                vec![deny_get_tcp.clone()],
                tcp(admin(), 9090),
                false,
                Some("shop/deny-get"),
            ),
            (
                "deny with http fields still needs its source on tcp",
                vec![deny_get_tcp.clone()],
                tcp(frontend(), 9090),
                true,
                None,
            ),
            (
                "policy for another workload does not apply",
                vec![other_workload.clone()],
                http(frontend(), "GET", "/"),
                true,
                None,
            ),
            (
                "policy in another namespace does not apply",
                vec![other_namespace.clone()],
                http(frontend(), "GET", "/"),
                true,
                None,
            ),
            (
                "mesh-wide deny applies",
                vec![mesh_wide_deny.clone(), allow_all.clone()],
                http(admin(), "GET", "/"),
                false,
                Some("tessera-system/mesh-deny-admin"),
            ),
            (
                "mesh-wide deny spares others",
                vec![mesh_wide_deny.clone(), allow_all.clone()],
                http(frontend(), "GET", "/"),
                true,
                Some("shop/allow-all"),
            ),
            (
                "header condition matches",
                vec![header_rule.clone()],
                Call {
                    headers: &[("x-canary", "yes")],
                    ..http(frontend(), "GET", "/")
                },
                true,
                Some("shop/canary"),
            ),
            (
                "header condition mismatch",
                vec![header_rule.clone()],
                Call {
                    headers: &[("x-canary", "no")],
                    ..http(frontend(), "GET", "/")
                },
                false,
                None,
            ),
            (
                "header condition absent header",
                vec![header_rule.clone()],
                http(frontend(), "GET", "/"),
                false,
                None,
            ),
            (
                "unknown condition key never allows",
                vec![bad_key.clone()],
                Call {
                    headers: &[("x", "1")],
                    ..http(frontend(), "GET", "/")
                },
                false,
                None,
            ),
            (
                "jwt principal matches",
                vec![jwt_rule.clone()],
                Call {
                    jwt: Some("https://issuer.example/alice"),
                    ..http(None, "GET", "/")
                },
                true,
                Some("shop/jwt"),
            ),
            (
                "jwt principal required",
                vec![jwt_rule.clone()],
                http(frontend(), "GET", "/"),
                false,
                None,
            ),
            (
                "jwt rule never allows tcp",
                vec![jwt_rule.clone()],
                tcp(frontend(), 9090),
                false,
                None,
            ),
            (
                "notPaths allows others",
                vec![not_path.clone()],
                http(frontend(), "GET", "/orders"),
                true,
                Some("shop/not-admin"),
            ),
            (
                "notPaths excludes",
                vec![not_path.clone()],
                http(frontend(), "GET", "/admin/users"),
                false,
                None,
            ),
            (
                "host wildcard",
                vec![host_rule.clone()],
                http(frontend(), "GET", "/"),
                true,
                Some("shop/host"),
            ),
            (
                "host with port still matches",
                vec![deny_admin_host.clone()],
                Call {
                    http: Some(("GET", "/", "admin.shop:8080")),
                    ..http(frontend(), "GET", "/")
                },
                false,
                Some("shop/admin-host"),
            ),
            (
                "host with trailing dot still matches",
                vec![deny_admin_host.clone()],
                Call {
                    http: Some(("GET", "/", "admin.shop.")),
                    ..http(frontend(), "GET", "/")
                },
                false,
                Some("shop/admin-host"),
            ),
            (
                "mesh-wide deny with a selector applies in every namespace",
                vec![mesh_selected_deny.clone()],
                http(frontend(), "GET", "/"),
                false,
                Some("tessera-system/orders-everywhere"),
            ),
            (
                "notNamespaces denies outsiders",
                vec![not_namespace.clone()],
                http(admin(), "GET", "/"),
                false,
                Some("shop/not-ops"),
            ),
            (
                "notNamespaces spares insiders",
                vec![not_namespace.clone()],
                http(frontend(), "GET", "/"),
                true,
                None,
            ),
            (
                "notNamespaces denies plaintext",
                vec![not_namespace.clone()],
                http(None, "GET", "/"),
                false,
                Some("shop/not-ops"),
            ),
        ];
        assert!(cases.len() >= 40);
        for (name, policies, call, allowed, by) in &cases {
            let decision = decide(policies, call);
            assert_eq!(decision.allowed, *allowed, "{name}: {decision:?}");
            let deciding = decision.policy.map(|index| policies[index].id());
            assert_eq!(deciding.as_deref(), *by, "{name}: {decision:?}");
        }
        let policies = [allow_all, audit_all];
        let audited = decide(&policies, &http(frontend(), "GET", "/"));
        assert_eq!(audited.policy, Some(0));
        assert_eq!(audited.audited, vec![1]);
    }

    #[test]
    fn compile_errors_name_the_field() {
        let cases = [
            (
                "action: DENY\nrules:\n- {}\n- {}\n- when: [{key: \"request.headers[x]\"}, {key: \"request.header[x]\"}]\n",
                "spec.rules[2].when[1].key",
                "the only condition key understood is request.headers[<name>]",
            ),
            (
                "rules:\n- when: [{key: \"request.headers[x y]\", values: [a]}]\n",
                "spec.rules[0].when[0].key",
                "not a valid HTTP header name",
            ),
            (
                "rules:\n- to: [{operation: {paths: [/ok]}}, {operation: {notPaths: [/ok, \"/a%zz\"]}}]\n",
                "spec.rules[0].to[1].operation.notPaths[1]",
                "\"/a%zz\" has no normal form: malformed percent-encoding at byte 2",
            ),
            (
                "rules:\n- to: [{operation: {hosts: [orders, \"ev%69l\"]}}]\n",
                "spec.rules[0].to[0].operation.hosts[1]",
                "host pattern \"ev%69l\"",
            ),
            (
                "rules:\n- to: [{operation: {notMethods: [\"GE T\"]}}]\n",
                "spec.rules[0].to[0].operation.notMethods[0]",
                "not an HTTP method",
            ),
            (
                "rules:\n- from: [{source: {principals: [\"cluster.local/ns/*/sa/admin\"]}}]\n",
                "spec.rules[0].from[0].source.principals[0]",
                "can never match: invalid namespace \"*\"",
            ),
            (
                "rules:\n- from: [{source: {notPrincipals: [\"spiffe://cluster.local/sa/admin\"]}}]\n",
                "spec.rules[0].from[0].source.notPrincipals[0]",
                "is not of the form",
            ),
        ];
        for (yaml, field, reason) in cases {
            let named = policy("shop", "broken", yaml);
            let error = CompiledPolicy::try_from(&named).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            let message = error.to_string();
            assert!(message.starts_with(&format!("{field}: ")), "{message}");
            assert!(message.contains(reason), "{message}");
        }
        // What every spelling above replaced compiles.
        for yaml in [
            "rules:\n- when: [{key: \"request.headers[X-Tenant]\", values: [a]}]\n",
            "rules:\n- to: [{operation: {notMethods: [\"*\", PATCH], hosts: [\"[fd00::1]:80\", \"*.shop\", \"admin.*\"]}}]\n",
            "rules:\n- from: [{source: {principals: [\"spiffe://cluster.local/ns/ops/sa/admin\", \"cluster.local/ns/ops/*\", \"*/sa/admin\", \"*\"]}}]\n",
        ] {
            let named = policy("shop", "fine", yaml);
            assert!(CompiledPolicy::try_from(&named).is_ok(), "{yaml}");
        }
    }

    #[test]
    fn a_policy_that_cannot_be_compiled_closes_access_and_never_opens_it() {
        let frontend = || Some(id("shop", "frontend"));
        let broken_deny = policy(
            "shop",
            "broken-deny",
            "action: DENY\nrules:\n- to: [{operation: {paths: [/never]}}]\n  when: [{key: \"request.header[x]\", values: [\"1\"]}]\n",
        );
        let broken_allow = policy(
            "shop",
            "broken-allow",
            "action: ALLOW\nrules:\n- to: [{operation: {paths: [\"/public%g*\"]}}]\n- {}\n",
        );
        let broken_audit = policy(
            "shop",
            "broken-audit",
            "action: AUDIT\nrules:\n- to: [{operation: {hosts: [\"a/b\"]}}]\n",
        );
        let allow_all = policy("shop", "allow-all", "action: ALLOW\nrules: [{}]\n");
        for policies in [
            vec![broken_deny.clone()],
            vec![allow_all.clone(), broken_deny.clone()],
        ] {
            for call in [http(frontend(), "GET", "/"), tcp(frontend(), 9090)] {
                let decision = decide(&policies, &call);
                assert!(!decision.allowed, "{decision:?}");
                assert_eq!(
                    decision.policy.map(|index| policies[index].id()).as_deref(),
                    Some("shop/broken-deny")
                );
                assert_eq!(decision.rule, None);
            }
        }
        // Not even its rule that matches everything opens access.
        let decision = decide(
            std::slice::from_ref(&broken_allow),
            &http(frontend(), "GET", "/"),
        );
        assert!(!decision.allowed, "{decision:?}");
        assert_eq!(decision.policy, None);
        // The other policies keep working.
        let decision = decide(
            &[broken_allow, allow_all, broken_audit],
            &http(frontend(), "GET", "/"),
        );
        assert!(decision.allowed, "{decision:?}");
        assert_eq!(decision.policy, Some(1));
        assert!(decision.audited.is_empty(), "{decision:?}");
    }

    #[test]
    fn paths_are_normalized_before_matching() {
        for (raw, normal) in [
            ("/admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("//admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../../etc", "/etc"),
            ("/", "/"),
            ("", "/"),
            ("/a%3bb", "/a%3Bb"),
            ("/a;b/%7E", "/a;b/~"),
        ] {
            assert_eq!(normalize_path(raw).unwrap(), normal, "{raw}");
        }
    }

    /// One HTTP request from the caller's raw strings, decided against `policies`.
    fn decide_raw(policies: &[Named<AuthorizationPolicySpec>], path: &str, host: &str) -> Decision {
        evaluate(&compile(policies), path, host)
    }

    /// One HTTP request from the caller's raw strings, decided against compiled policies.
    fn evaluate(policies: &[CompiledPolicy], path: &str, host: &str) -> Decision {
        let header = |_: &HeaderName| None;
        let request = Request {
            source: None,
            destination: None,
            request_principal: None,
            jwt_claims: None,
            port: 8080,
            http: Some(HttpRequest {
                method: "GET",
                path,
                query: None,
                host,
                scheme: "http",
                protocol: "HTTP/1.1",
                header: &header,
                headers: None,
            }),
        };
        authorize(policies, &request)
    }

    fn deny_paths(paths: &[&str]) -> Named<AuthorizationPolicySpec> {
        let mut spec = AuthorizationPolicySpec {
            action: Action::Deny,
            ..Default::default()
        };
        spec.rules.push(Rule {
            to: vec![To {
                operation: Operation {
                    paths: paths.iter().map(ToString::to_string).collect(),
                    ..Default::default()
                },
            }],
            ..Default::default()
        });
        Named {
            name: "deny-paths".into(),
            namespace: "shop".into(),
            spec,
        }
    }

    fn deny_hosts(hosts: &[&str]) -> Named<AuthorizationPolicySpec> {
        let mut policy = deny_paths(&[]);
        policy.spec.rules[0].to[0].operation.hosts =
            hosts.iter().map(ToString::to_string).collect();
        policy
    }

    #[test]
    fn a_malformed_escape_is_refused() {
        for raw in [
            "/%%36%31dmin",
            "/%%32%65%%32%65/admin",
            "/%zz",
            "/a%4",
            "/a%",
            "/%4g/x",
            "/%%",
            "/%-1",
        ] {
            let normal = normalize_path(raw);
            assert!(normal.is_err(), "{raw} normalized to {normal:?}");
        }
    }

    #[test]
    fn control_characters_and_encoded_separators_are_refused() {
        for raw in [
            "/a%00b",
            "/a%0Ab",
            "/a%0db",
            "/a%1f",
            "/a%7F",
            "/a\u{1}b",
            "/a\tb",
            "/a\u{7f}b",
            "/admin%2Fsecret",
            "/admin%2fsecret",
            "/admin%5Csecret",
            "/admin%5csecret",
            "/admin\\secret",
        ] {
            let normal = normalize_path(raw);
            assert!(normal.is_err(), "{raw:?} normalized to {normal:?}");
        }
    }

    #[test]
    fn non_ascii_bytes_are_percent_encoded_once() {
        for raw in [
            "/é//admin",
            "/é/admin",
            "/é/./admin",
            "/%C3%A9/admin",
            "/%c3%a9/./admin",
            "/%c3%A9//x/../admin",
        ] {
            assert_eq!(normalize_path(raw).unwrap(), "/%C3%A9/admin", "{raw}");
        }
        assert_eq!(normalize_path("/a b/日").unwrap(), "/a%20b/%E6%97%A5");
        assert_eq!(normalize_path("/%7e%41%2d%5f%2E").unwrap(), "/~A-_.");
        assert_eq!(
            normalize_path("/%%36%31dmin"),
            Err(InvalidPath::MalformedEscape(1))
        );
        assert_eq!(
            normalize_path("/a/%2fb"),
            Err(InvalidPath::EncodedSeparator { at: 3, byte: b'/' })
        );
        assert_eq!(
            normalize_path("/a%00"),
            Err(InvalidPath::ControlCharacter { at: 2, byte: 0 })
        );
        assert_eq!(normalize_path("/a\\b"), Err(InvalidPath::Backslash(2)));
        assert_eq!(
            normalize_path("/a%3a%40%25%3F%23").unwrap(),
            "/a%3A%40%25%3F%23"
        );
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for raw in [
            "/%%36%31dmin",
            "/%%32%65%%32%65/admin",
            "/%2541dmin",
            "/%25%32%65%25%32%65/admin",
            "/é//admin",
            "/%2e%2e/%2E/admin",
            "/a?b#c",
            "/a/.%2e/b",
        ] {
            if let Ok(once) = normalize_path(raw) {
                let twice = normalize_path(&once);
                assert_eq!(twice.as_deref(), Ok(&*once), "{raw}");
                assert!(matches!(twice, Ok(Cow::Borrowed(_))), "{raw}: {twice:?}");
            }
        }
    }

    /// Counts this thread's allocations, so a test can assert that a decision allocates
    /// nothing while other tests run beside it.
    struct CountingAllocator;

    thread_local! {
        static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    // SAFETY: every call is forwarded to the system allocator unchanged.
    #[allow(unsafe_code)]
    unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
            // SAFETY: the caller's contract is the system allocator's.
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: `ptr` came from the system allocator, through `alloc`.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: CountingAllocator = CountingAllocator;

    #[test]
    fn deciding_on_a_normal_request_allocates_nothing() {
        let deny = policy(
            "shop",
            "deny",
            "action: DENY\nrules:\n- to: [{operation: {paths: [/admin*, \"*.php\", /debug], notHosts: [\"*.internal\"], hosts: [\"[fd00::1]\", Admin.Shop, \"api.*\"]}}]\n",
        );
        let allow = policy(
            "shop",
            "allow",
            "action: ALLOW\nrules:\n- from: [{source: {notPrincipals: [cluster.local/ns/ops/sa/admin, \"*/sa/intruder\"]}}]\n  to: [{operation: {methods: [GET], paths: [/api/*], notPaths: [/api/v1/secret], hosts: [orders.shop]}}]\n  when: [{key: \"request.headers[X-Tenant]\", notValues: [\"blocked*\"]}]\n",
        );
        let policies = compile(&[deny, allow]);
        assert!(policies.iter().all(|p| p.error().is_none()));
        let allocations = ALLOCATIONS.with(std::cell::Cell::get);
        let decision = evaluate(&policies, "/api/v1/orders/42", "Orders.Shop:8080");
        assert_eq!(ALLOCATIONS.with(std::cell::Cell::get), allocations);
        assert!(decision.allowed, "{decision:?}");
        // The count is real: a path that needs normalizing does allocate.
        let decision = evaluate(&policies, "/api//v1/orders/42", "orders.shop");
        assert!(ALLOCATIONS.with(std::cell::Cell::get) > allocations);
        assert!(decision.allowed, "{decision:?}");
    }

    #[test]
    fn normal_paths_and_patterns_are_borrowed() {
        for path in [
            "/",
            "/api/v1/orders/42",
            "/a%20b/%C3%A9",
            "/.well-known/x",
            "/a/",
        ] {
            assert!(
                matches!(normalize_path(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
        for pattern in ["/admin", "/api/*", "/api*", "*.txt", "*/%C3%A9", "*"] {
            let borrowed = match PathPattern::parse(pattern) {
                Ok(PathPattern::Any) => true,
                Ok(
                    PathPattern::Exact(text)
                    | PathPattern::Prefix(text)
                    | PathPattern::Suffix(text),
                ) => matches!(text, Cow::Borrowed(_)),
                Err(_) => false,
            };
            assert!(borrowed, "{pattern}");
        }
    }

    #[test]
    fn a_deny_on_a_path_denies_every_spelling() {
        let non_ascii = deny_paths(&["/é/admin"]);
        for path in [
            "/é/admin",
            "/é//admin",
            "/é/./admin",
            "/%C3%A9/admin",
            "/%c3%a9/admin",
            "/x/../%c3%A9/admin",
        ] {
            let decision = decide_raw(std::slice::from_ref(&non_ascii), path, "orders");
            assert!(!decision.allowed, "DENY /é/admin missed {path}");
        }
        let prefix = deny_paths(&["/admin*"]);
        for path in [
            "/admin",
            "/%61dmin",
            "//admin/x",
            "/x/../admin",
            "/%%36%31dmin",
            "/%%32%65%%32%65/admin",
            "/%2e%2e/admin",
        ] {
            let decision = decide_raw(std::slice::from_ref(&prefix), path, "orders");
            assert!(!decision.allowed, "DENY /admin* missed {path}");
        }
        let decision = decide_raw(std::slice::from_ref(&prefix), "/orders", "orders");
        assert!(decision.allowed, "{decision:?}");
        // The pattern is canonicalized too: written with escapes, doubled slashes or in
        // lowercase hex, it names the same path.
        let spelled = deny_paths(&["/%C3%A9//adm%69n", "*/%c3%a9/x"]);
        for path in ["/é/admin", "/a/é/x"] {
            let decision = decide_raw(std::slice::from_ref(&spelled), path, "orders");
            assert!(!decision.allowed, "{path}: {decision:?}");
        }
    }

    #[test]
    fn a_path_or_pattern_without_normal_form_never_allows_and_always_denies() {
        let allow_public = policy(
            "shop",
            "public",
            "action: ALLOW\nrules:\n- to: [{operation: {paths: [\"/public*\"]}}]\n",
        );
        let allow_but_admin = policy(
            "shop",
            "not-admin",
            "action: ALLOW\nrules:\n- to: [{operation: {notPaths: [\"/admin*\"]}}]\n",
        );
        for policies in [vec![allow_public.clone()], vec![allow_but_admin.clone()]] {
            let decision = decide_raw(&policies, "/public/%zz", "orders");
            assert!(!decision.allowed, "{decision:?}");
        }
        let deny_but_public = policy(
            "shop",
            "not-public",
            "action: DENY\nrules:\n- to: [{operation: {notPaths: [\"/public*\"]}}]\n",
        );
        let decision = decide_raw(&[deny_but_public], "/public/%zz", "orders");
        assert!(!decision.allowed, "{decision:?}");
        // A malformed pattern in the configuration: a DENY fails closed, an ALLOW opens
        // nothing.
        let broken_deny = deny_paths(&["/admin%zz"]);
        let decision = decide_raw(&[broken_deny], "/orders", "orders");
        assert!(!decision.allowed, "{decision:?}");
        let broken_not_paths = policy(
            "shop",
            "broken",
            "action: DENY\nrules:\n- to: [{operation: {notPaths: [\"/public%g\"]}}]\n",
        );
        let decision = decide_raw(&[broken_not_paths], "/orders", "orders");
        assert!(!decision.allowed, "{decision:?}");
        let broken_allow = policy(
            "shop",
            "broken",
            "action: ALLOW\nrules:\n- to: [{operation: {paths: [\"/public%g*\"]}}]\n",
        );
        let decision = decide_raw(&[broken_allow], "/public%g", "orders");
        assert!(!decision.allowed, "{decision:?}");
    }

    #[test]
    fn a_deny_on_a_host_ignores_port_case_brackets_and_trailing_dot() {
        for (patterns, hosts) in [
            (
                &["[fd00::1]"][..],
                &[
                    "[fd00::1]",
                    "[fd00::1]:8080",
                    "[FD00::1]:80",
                    "[fd00:0:0::1]",
                    "[FD00:0:0:0:0:0:0:1]:443",
                ][..],
            ),
            (&["[FD00::1]:9090"], &["[fd00::1]", "[fd00::1]:8080"]),
            (
                &["Admin.Shop."],
                &[
                    "admin.shop",
                    "ADMIN.SHOP:80",
                    "admin.shop.",
                    "admin.shop..:1",
                ],
            ),
            (&["admin.shop:8080"], &["admin.shop", "admin.shop:9090"]),
            (&["*.Shop."], &["x.SHOP", "x.shop.:8080", "a.b.shop"]),
            (&["*.shop:443"], &["x.shop:80"]),
            (&["ADMIN.*"], &["admin.shop", "Admin.Shop:8080"]),
            (&["evil"], &["EVIL:", "evil..:80"]),
            // Hosts an application may read otherwise cannot be compared: a DENY that
            // names hosts fails closed.
            (
                &["evil"],
                &[
                    "ev%69l",
                    "x@evil",
                    "evil:80@orders",
                    "evil/x",
                    "[fd00::1]x",
                    "evil\u{0}",
                ],
            ),
        ] {
            let deny = deny_hosts(patterns);
            for host in hosts {
                let decision = decide_raw(std::slice::from_ref(&deny), "/", host);
                assert!(!decision.allowed, "DENY {patterns:?} missed host {host}");
            }
        }
        let deny = deny_hosts(&["[fd00::1]", "*.shop", "admin.*"]);
        for host in ["[fd00::2]:8080", "orders.mesh", "shop", "", "admin"] {
            let decision = decide_raw(std::slice::from_ref(&deny), "/", host);
            assert!(decision.allowed, "{host}: {decision:?}");
        }
    }

    fn peer(namespace: &str, yaml: &str) -> Named<PeerAuthenticationSpec> {
        Named {
            name: "pa".into(),
            namespace: namespace.into(),
            spec: serde_saphyr::from_str(yaml).unwrap(),
        }
    }

    #[test]
    fn the_most_specific_peer_authentication_wins() {
        let mesh = peer(ROOT_NAMESPACE, "mtls: {mode: PERMISSIVE}\n");
        let namespace = peer(
            "shop",
            "mtls: {mode: STRICT}\nportLevelMtls: {8081: {mode: DISABLE}}\n",
        );
        let workload = peer(
            "shop",
            "selector: {serviceAccount: orders}\nportLevelMtls: {8080: {mode: PERMISSIVE}}\n",
        );
        let other = peer(
            "shop",
            "selector: {serviceAccount: payments}\nmtls: {mode: DISABLE}\n",
        );
        let mode = |policies: &[Named<PeerAuthenticationSpec>], port| {
            mtls_mode(policies, WORKLOAD, port).0
        };
        let cases: Vec<(&str, Vec<Named<PeerAuthenticationSpec>>, u16, MtlsMode)> = vec![
            (
                "nothing configured is strict",
                vec![],
                8080,
                MtlsMode::Strict,
            ),
            (
                "mesh level applies",
                vec![mesh.clone()],
                8080,
                MtlsMode::Permissive,
            ),
            (
                "namespace beats mesh",
                vec![mesh.clone(), namespace.clone()],
                8080,
                MtlsMode::Strict,
            ),
            (
                "namespace port level beats namespace",
                vec![namespace.clone()],
                8081,
                MtlsMode::Disable,
            ),
            (
                "workload port level beats namespace",
                vec![mesh.clone(), namespace.clone(), workload.clone()],
                8080,
                MtlsMode::Permissive,
            ),
            (
                "workload without that port falls back to namespace",
                vec![namespace.clone(), workload.clone()],
                9000,
                MtlsMode::Strict,
            ),
            (
                "other workload's policy ignored",
                vec![other.clone()],
                8080,
                MtlsMode::Strict,
            ),
        ];
        for (name, policies, port, expected) in cases {
            assert_eq!(mode(&policies, port), expected, "{name}");
        }
    }

    /// A CUSTOM policy whose Rego allows only `x-team: gold` callers, for paths under
    /// `/api/`.
    fn custom(rules: &str) -> Named<AuthorizationPolicySpec> {
        policy(
            "shop",
            "rego",
            &format!(
                r#"action: CUSTOM
provider:
  name: opa
  rego:
    query: data.shop.authz.allow
    modules:
    - name: authz.rego
      source: |
        package shop.authz
        default allow := false
        allow if input.attributes.request.http.headers["x-team"] == "gold"
        deny contains "team is not gold" if not allow
{rules}"#
            ),
        )
    }

    fn with_headers(mut call: Call, headers: &'static [(&'static str, &'static str)]) -> Call {
        call.headers = headers;
        call
    }

    /// Decides like [`decide`], with the call's headers given to CUSTOM policies too.
    fn decide_with_fields(policies: &[Named<AuthorizationPolicySpec>], call: &Call) -> Decision {
        let selected = compile(policies);
        let mut fields = http::HeaderMap::new();
        for (name, value) in call.headers {
            fields.append(
                HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
        }
        let header = |name: &HeaderName| fields.get(name).and_then(|v| v.to_str().ok());
        let request = Request {
            source: call.source.as_ref(),
            destination: None,
            request_principal: call.jwt,
            jwt_claims: None,
            port: call.port,
            http: call.http.map(|(method, path, host)| HttpRequest {
                method,
                path,
                query: None,
                host,
                scheme: "http",
                protocol: "HTTP/1.1",
                header: &header,
                headers: Some(&fields),
            }),
        };
        authorize(&selected, &request)
    }

    #[test]
    fn custom_is_asked_after_deny_and_before_allow() {
        let rules = "rules:
- to: [{operation: {paths: [\"/api/*\"]}}]
";
        let deny_admin = policy(
            "shop",
            "deny",
            "action: DENY
rules:
- to: [{operation: {paths: [\"/api/admin\"]}}]
",
        );
        let allow_frontend = policy(
            "shop",
            "allow",
            "rules:
- from: [{source: {principals: [\"cluster.local/ns/shop/sa/frontend\"]}}]
",
        );
        let policies = [allow_frontend, custom(rules), deny_admin];
        let gold = &[("x-team", "gold")];
        let frontend = Some(id("shop", "frontend"));
        // DENY first: the Rego is not asked.
        let decision = decide_with_fields(
            &policies,
            &with_headers(http(frontend.clone(), "GET", "/api/admin"), gold),
        );
        assert_eq!(
            (decision.allowed, decision.policy, decision.rego),
            (false, Some(2), None)
        );
        // CUSTOM next: its denial stands whatever ALLOW says, naming the deny rule.
        let decision = decide_with_fields(&policies, &http(frontend.clone(), "GET", "/api/orders"));
        assert!(!decision.allowed);
        assert_eq!(decision.policy, Some(1));
        assert_eq!(decision.rule, Some(0));
        assert_eq!(decision.reason, "denied by a CUSTOM policy");
        assert_eq!(decision.rego.unwrap().reason, "deny: team is not gold");
        // Its allow does not bypass ALLOW policies.
        let decision = decide_with_fields(
            &policies,
            &with_headers(http(Some(id("shop", "ops")), "GET", "/api/orders"), gold),
        );
        assert_eq!(
            (decision.allowed, decision.reason),
            (false, "no ALLOW policy matched")
        );
        assert!(decision.rego.unwrap().allowed);
        let decision = decide_with_fields(
            &policies,
            &with_headers(http(frontend.clone(), "GET", "/api/orders"), gold),
        );
        assert_eq!((decision.allowed, decision.policy), (true, Some(0)));
        // Requests its rules do not match are not its to decide.
        let decision = decide_with_fields(&policies, &http(frontend, "GET", "/health"));
        assert_eq!((decision.allowed, decision.rego), (true, None));
    }

    #[test]
    fn custom_policies_that_cannot_be_compiled_deny_everything() {
        let cases = [
            (
                "no rules",
                custom(""),
                "spec.rules: a CUSTOM policy without rules would decide no request",
            ),
            (
                "no provider",
                policy("shop", "p", "action: CUSTOM\nrules: [{}]\n"),
                "spec.provider: action CUSTOM needs a provider",
            ),
            (
                "syntax error",
                policy(
                    "shop",
                    "p",
                    "action: CUSTOM\nrules: [{}]\nprovider:\n  rego:\n    query: data.p.allow\n    modules:\n    - name: p.rego\n      source: \"package p\\nallow if {\"\n",
                ),
                "spec.provider.rego: module \"p.rego\": p.rego:2:",
            ),
        ];
        for (name, custom, error) in cases {
            let compiled = CompiledPolicy::try_from(&custom).unwrap_err();
            assert!(
                compiled.to_string().starts_with(error),
                "{name}: {compiled}"
            );
            let decision = decide_with_fields(
                &[custom],
                &with_headers(http(None, "GET", "/"), &[("x-team", "gold")]),
            );
            assert!(!decision.allowed, "{name}");
            assert_eq!(
                decision.reason,
                "a CUSTOM policy that could not be compiled denies every request"
            );
        }
        let misplaced = policy(
            "shop",
            "p",
            "action: ALLOW\nrules: [{}]\nprovider: {rego: {query: data.p.allow, modules: []}}\n",
        );
        assert_eq!(
            CompiledPolicy::try_from(&misplaced)
                .unwrap_err()
                .to_string(),
            "spec.provider: a provider is only for action CUSTOM"
        );
    }

    #[test]
    fn custom_rules_on_opaque_tcp_ask_the_rego_without_request_attributes() {
        let custom = custom("rules:\n- to: [{operation: {paths: [\"/api/*\"]}}]\n");
        let decision = decide_with_fields(&[custom], &tcp(Some(id("shop", "frontend")), 8080));
        assert!(!decision.allowed);
        assert_eq!(decision.rego.unwrap().reason, "deny: team is not gold");
    }
}

/// Properties of normalization over generated spellings: the cases are few (the suite
/// must stay fast); the fuzz target explores further.
#[cfg(test)]
mod properties {
    use std::borrow::Cow;
    use std::net::Ipv6Addr;

    use proptest::prelude::*;

    use super::*;

    /// 256 cases each (about a second in all); `PROPTEST_CASES` asks for more.
    fn config() -> ProptestConfig {
        let default = ProptestConfig::default();
        let asked = std::env::var_os("PROPTEST_CASES").is_some();
        ProptestConfig {
            cases: if asked { default.cases } else { 256 },
            failure_persistence: None,
            ..default
        }
    }

    /// Path-like input made of the pieces that normalization treats specially.
    fn path_ish() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%".to_string()),
            Just("%2e".to_string()),
            Just("%2E".to_string()),
            Just("%25".to_string()),
            Just("%2f".to_string()),
            Just("%5C".to_string()),
            Just("%00".to_string()),
            Just("\\".to_string()),
            Just("é".to_string()),
            Just("?".to_string()),
            "[0-9a-fA-F]{1,2}",
            "%[0-9a-fA-F]{2}",
            "[a-z~_:;@ -]{1,3}",
            any::<char>().prop_map(String::from),
        ];
        prop::collection::vec(piece, 0..16).prop_map(|pieces| pieces.concat())
    }

    /// A path segment, as it would be written plainly: never `.` or `..`.
    fn segment() -> impl Strategy<Value = String> {
        // No `*`: at a pattern's end it is the wildcard.
        "([a-zA-Z0-9._~-]|[:@!$&'()+,;=]|é|日|🦀){1,6}"
            .prop_filter("dot segment", |s| s != "." && s != "..")
    }

    /// One way of writing `character`: unreserved and non-ASCII characters raw or
    /// percent-encoded (either hex case); other characters mean something else encoded.
    fn spell_char(character: char, encode: bool, lower_hex: bool) -> String {
        let mut buffer = [0; 4];
        let bytes = character.encode_utf8(&mut buffer).as_bytes();
        let encodable = bytes.len() > 1 || is_unreserved(bytes[0]);
        if !(encode && encodable) {
            return character.to_string();
        }
        bytes
            .iter()
            .map(|b| {
                if lower_hex {
                    format!("%{b:02x}")
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    /// Another spelling of the path `/segments…` (with a trailing slash if `trailing`):
    /// characters re-encoded, and `./`, `x/../` and extra slashes inserted before
    /// segments, driven by `choices`.
    fn respell(segments: &[String], trailing: bool, choices: &[u8]) -> String {
        let mut choice = choices.iter().copied().cycle();
        let mut next = || choice.next().unwrap_or(0);
        let mut path = String::new();
        for segment in segments {
            path.push('/');
            match next() % 5 {
                0 => path.push_str("./"),
                1 => path.push_str("dir/../"),
                2 => path.push('/'),
                3 => path.push_str("%2E/x/%2e%2E/"),
                _ => {}
            }
            for character in segment.chars() {
                let bits = next();
                path.push_str(&spell_char(character, bits & 1 == 1, bits & 2 == 2));
            }
        }
        if trailing || segments.is_empty() {
            path.push('/');
            if next() % 3 == 0 {
                path.push_str("./");
            }
        }
        path
    }

    fn plain(segments: &[String], trailing: bool) -> String {
        let mut path: String = segments.iter().map(|s| format!("/{s}")).collect();
        if trailing || segments.is_empty() {
            path.push('/');
        }
        path
    }

    fn decide(policy: &Named<AuthorizationPolicySpec>, path: &str, host: &str) -> Decision {
        let policy = CompiledPolicy::try_from(policy)
            .unwrap_or_else(|error| CompiledPolicy::fail_closed(policy, error));
        let header = |_: &HeaderName| None;
        let request = Request {
            source: None,
            destination: None,
            request_principal: None,
            jwt_claims: None,
            port: 8080,
            http: Some(HttpRequest {
                method: "GET",
                path,
                query: None,
                host,
                scheme: "http",
                protocol: "HTTP/1.1",
                header: &header,
                headers: None,
            }),
        };
        authorize(std::slice::from_ref(&policy), &request)
    }

    fn deny(paths: Vec<String>, hosts: Vec<String>) -> Named<AuthorizationPolicySpec> {
        let operation = Operation {
            paths,
            hosts,
            ..Default::default()
        };
        Named {
            name: "deny".into(),
            namespace: "shop".into(),
            spec: AuthorizationPolicySpec {
                action: Action::Deny,
                rules: vec![Rule {
                    to: vec![To { operation }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        }
    }

    /// A host name or a bracketed IPv6 address, and the spelling of it a policy is
    /// written with.
    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::collection::vec("[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", 1..4)
                .prop_map(|labels| labels.join(".")),
            any::<[u16; 8]>().prop_map(|s| format!(
                "[{}]",
                Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
            )),
        ]
    }

    /// `host` as a caller may send it: any case, a port, a trailing dot on a name, an
    /// IPv6 address uncompressed.
    fn respell_host(host: &str, choices: (bool, bool, Option<u16>, bool)) -> String {
        let (upper, dot, port, expand) = choices;
        let mut spelled = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(address) if expand => {
                let address: Ipv6Addr = address.parse().unwrap_or(Ipv6Addr::LOCALHOST);
                let groups: Vec<String> = address
                    .segments()
                    .iter()
                    .map(|g| format!("{g:x}"))
                    .collect();
                format!("[{}]", groups.join(":"))
            }
            Some(_) => host.to_string(),
            None if dot => format!("{host}."),
            None => host.to_string(),
        };
        if upper {
            spelled = spelled.to_ascii_uppercase();
        }
        if let Some(port) = port {
            spelled.push_str(&format!(":{port}"));
        }
        spelled
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn normalizing_is_idempotent(raw in path_ish()) {
            if let Ok(once) = normalize_path(&raw) {
                prop_assert!(once.starts_with('/'));
                prop_assert!(once.bytes().all(|b| b.is_ascii_graphic() && b != b'\\'), "{once}");
                let twice = normalize_path(&once);
                prop_assert!(matches!(twice, Ok(Cow::Borrowed(p)) if p == once), "{raw:?} → {once} → {twice:?}");
            }
        }

        #[test]
        fn arbitrary_strings_normalize_idempotently(raw in any::<String>()) {
            if let Ok(once) = normalize_path(&raw) {
                let twice = normalize_path(&once);
                prop_assert!(matches!(twice, Ok(Cow::Borrowed(p)) if p == once), "{raw:?} → {once} → {twice:?}");
            }
        }

        #[test]
        fn every_spelling_of_a_path_normalizes_alike(
            segments in prop::collection::vec(segment(), 0..5),
            trailing in any::<bool>(),
            choices in prop::collection::vec(any::<u8>(), 1..64),
        ) {
            let plain = plain(&segments, trailing);
            let spelled = respell(&segments, trailing, &choices);
            let expected = normalize_path(&plain);
            prop_assert!(expected.is_ok(), "{plain}: {expected:?}");
            prop_assert_eq!(normalize_path(&spelled), expected, "{} vs {}", plain, spelled);
        }

        #[test]
        fn a_deny_on_a_path_denies_every_spelling(
            segments in prop::collection::vec(segment(), 1..5),
            trailing in any::<bool>(),
            pattern_choices in prop::collection::vec(any::<u8>(), 1..64),
            request_choices in prop::collection::vec(any::<u8>(), 1..64),
        ) {
            let written = respell(&segments, trailing, &pattern_choices);
            let requested = respell(&segments, trailing, &request_choices);
            let exact = deny(vec![written.clone()], vec![]);
            prop_assert!(!decide(&exact, &requested, "orders").allowed, "DENY {} missed {}", written, requested);
            // A prefix pattern: the first segment, and everything under it.
            let prefix = format!("{}*", respell(&segments[..1], false, &pattern_choices));
            let policy = deny(vec![prefix.clone()], vec![]);
            prop_assert!(!decide(&policy, &requested, "orders").allowed, "DENY {} missed {}", prefix, requested);
            // A suffix pattern: the last segment, written in its own spelling.
            let last = &segments[segments.len() - 1];
            let suffix: String = last.chars().zip(pattern_choices.iter().cycle())
                .map(|(c, bits)| spell_char(c, bits & 1 == 1, bits & 2 == 2)).collect();
            let suffix = format!("*/{suffix}{}", if trailing { "/" } else { "" });
            let policy = deny(vec![suffix.clone()], vec![]);
            prop_assert!(!decide(&policy, &requested, "orders").allowed, "DENY {} missed {}", suffix, requested);
            // And the DENY is no wider than its path.
            let other = format!("{}/other", plain(&segments, false));
            prop_assert!(decide(&exact, &other, "orders").allowed, "DENY {} caught {}", written, other);
        }

        #[test]
        fn a_deny_on_a_host_denies_every_spelling(
            host in host(),
            pattern in (any::<bool>(), any::<bool>(), prop::option::of(any::<u16>()), any::<bool>()),
            request in (any::<bool>(), any::<bool>(), prop::option::of(any::<u16>()), any::<bool>()),
        ) {
            let written = respell_host(&host, pattern);
            let requested = respell_host(&host, request);
            let policy = deny(vec![], vec![written.clone()]);
            prop_assert!(!decide(&policy, "/", &requested).allowed, "DENY {} missed {}", written, requested);
            let other = respell_host(&format!("x{host}"), request);
            if !host.starts_with('[') {
                prop_assert!(decide(&policy, "/", &other).allowed, "DENY {} caught {}", written, other);
                // `*.suffix` with the suffix spelled as the policy writer did.
                if let Some((_, parent)) = host.split_once('.') {
                    let pattern = format!("*.{}", respell_host(parent, pattern));
                    let policy = deny(vec![], vec![pattern.clone()]);
                    prop_assert!(!decide(&policy, "/", &requested).allowed, "DENY {} missed {}", pattern, requested);
                }
            }
        }
    }
}
