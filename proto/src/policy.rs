//! Zero-trust policy: which peers must use mTLS (`PeerAuthentication`), who may call
//! what (`AuthorizationPolicy`), and which JWT issuers are trusted
//! (`RequestAuthentication`) — the resource types and the one evaluation engine that the
//! proxy enforces and `tessera policy explain` reports on.
//!
//! Semantics follow Istio's, which operators already know: DENY policies are evaluated
//! first; if any ALLOW policy selects a workload, a request must match one of them; AUDIT
//! policies are recorded without effect; no policy at all allows. Unlike Istio, a port
//! with no PeerAuthentication is STRICT: the mesh denies plaintext until told otherwise.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::SpiffeId;

/// Policies in this namespace apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "tessera-system";

/// Which workloads of its namespace a policy applies to; none means all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub service_account: Option<String>,
}

/// How a port treats plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSetting {
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MtlsSetting>,
    /// Per application port; overrides `mtls`.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u16, MtlsSetting>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// A request matching any rule matches the policy. No rules: matches nothing (an
    /// ALLOW policy without rules therefore denies everything).
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

/// Who calls. Principals are SPIFFE IDs, with or without `spiffe://`, exact or with one
/// `*` at the start or end; `"*"` is any authenticated peer, so `notPrincipals: ["*"]`
/// selects plaintext callers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
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

/// What is called. Paths and hosts match exactly or with one `*` at either end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// How specifically a policy selects a workload; `None` when it does not apply.
fn specificity(
    namespace: &str,
    selector: Option<&WorkloadSelector>,
    workload: WorkloadRef<'_>,
) -> Option<u8> {
    let selected_account = selector.and_then(|s| s.service_account.as_deref());
    match selected_account {
        Some(account) if namespace == workload.namespace && account == workload.service_account => {
            Some(3)
        }
        Some(_) => None,
        None if namespace == workload.namespace => Some(2),
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
    // A mesh-wide policy with a selector applies to that service account in every
    // namespace, as in Istio.
    let mesh_wide_selected = namespace == ROOT_NAMESPACE
        && selector
            .and_then(|s| s.service_account.as_deref())
            .is_some_and(|account| account == workload.service_account);
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
    /// `issuer/subject` of a validated JWT.
    pub request_principal: Option<&'a str>,
    /// The application port.
    pub port: u16,
    /// Absent for opaque TCP.
    pub http: Option<HttpRequest<'a>>,
}

#[derive(Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub header: &'a (dyn Fn(&str) -> Option<&'a str> + Sync),
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
    /// Index of the matching rule in that policy.
    pub rule: Option<usize>,
    pub reason: &'static str,
    /// AUDIT policies that matched.
    pub audited: Vec<usize>,
}

/// Evaluates the authorization policies that select a workload (callers filter with
/// [`selects`]) against one request.
pub fn authorize<P>(policies: &[P], request: &Request<'_>) -> Decision
where
    P: std::borrow::Borrow<Named<AuthorizationPolicySpec>>,
{
    let with_action = |action| {
        policies.iter().map(Borrow::borrow).enumerate().filter(
            move |(_, p): &(usize, &Named<AuthorizationPolicySpec>)| p.spec.action == action,
        )
    };
    let audited = with_action(Action::Audit)
        .filter(|(_, p)| matching_rule(&p.spec, request).is_some())
        .map(|(index, _)| index)
        .collect();
    for (index, policy) in with_action(Action::Deny) {
        if let Some(rule) = matching_rule(&policy.spec, request) {
            return Decision {
                allowed: false,
                policy: Some(index),
                rule: Some(rule),
                reason: "matched a DENY policy",
                audited,
            };
        }
    }
    let mut allow_policies = with_action(Action::Allow).peekable();
    if allow_policies.peek().is_none() {
        return Decision {
            allowed: true,
            policy: None,
            rule: None,
            reason: "no ALLOW policy selects this workload",
            audited,
        };
    }
    for (index, policy) in allow_policies {
        if let Some(rule) = matching_rule(&policy.spec, request) {
            return Decision {
                allowed: true,
                policy: Some(index),
                rule: Some(rule),
                reason: "matched an ALLOW policy",
                audited,
            };
        }
    }
    Decision {
        allowed: false,
        policy: None,
        rule: None,
        reason: "no ALLOW policy matched",
        audited,
    }
}

fn matching_rule(policy: &AuthorizationPolicySpec, request: &Request<'_>) -> Option<usize> {
    let lenient = policy.action == Action::Deny;
    policy
        .rules
        .iter()
        .position(|rule| rule_matches(rule, request, lenient))
}

/// For opaque TCP, HTTP-only fields cannot be checked: an ALLOW rule that has them never
/// matches, a DENY rule ignores them (`lenient`), so uncheckable conditions never open
/// access.
fn rule_matches(rule: &Rule, request: &Request<'_>, lenient: bool) -> bool {
    let from = rule.from.is_empty()
        || rule
            .from
            .iter()
            .any(|f| source_matches(&f.source, request, lenient));
    let to = rule.to.is_empty()
        || rule
            .to
            .iter()
            .any(|t| operation_matches(&t.operation, request, lenient));
    let when = rule
        .when
        .iter()
        .all(|c| condition_matches(c, request, lenient));
    from && to && when
}

fn source_matches(source: &Source, request: &Request<'_>, lenient: bool) -> bool {
    let principal = request.source;
    let namespace = principal.map(SpiffeId::namespace);
    let principals_ok = any_or_empty(&source.principals, |p| {
        principal.is_some_and(|id| principal_matches(p, id))
    }) && none_of(&source.not_principals, |p| {
        principal.is_some_and(|id| principal_matches(p, id))
    });
    let namespaces_ok = any_or_empty(&source.namespaces, |n| {
        namespace.is_some_and(|ns| wildcard(n, ns))
    }) && none_of(&source.not_namespaces, |n| {
        namespace.is_some_and(|ns| wildcard(n, ns))
    });
    let jwt_fields =
        !source.request_principals.is_empty() || !source.not_request_principals.is_empty();
    let request_ok = if request.http.is_none() && jwt_fields {
        lenient
    } else {
        let rp = request.request_principal;
        any_or_empty(&source.request_principals, |p| {
            rp.is_some_and(|rp| wildcard(p, rp))
        }) && none_of(&source.not_request_principals, |p| {
            rp.is_some_and(|rp| wildcard(p, rp))
        })
    };
    principals_ok && namespaces_ok && request_ok
}

fn operation_matches(operation: &Operation, request: &Request<'_>, lenient: bool) -> bool {
    let ports_ok = any_or_empty(&operation.ports, |p| *p == request.port)
        && none_of(&operation.not_ports, |p| *p == request.port);
    let http_fields = !(operation.methods.is_empty()
        && operation.not_methods.is_empty()
        && operation.paths.is_empty()
        && operation.not_paths.is_empty()
        && operation.hosts.is_empty()
        && operation.not_hosts.is_empty());
    let http_ok = match request.http {
        None => !http_fields || lenient,
        Some(http) => {
            // Methods are case-sensitive (RFC 9110): `get` is not `GET`.
            let method = |m: &String| m == "*" || m == http.method;
            let path = |p: &String| wildcard(p, http.path);
            let requested = host_without_port(http.host).to_ascii_lowercase();
            let host = |h: &String| wildcard(&h.to_ascii_lowercase(), &requested);
            any_or_empty(&operation.methods, method)
                && none_of(&operation.not_methods, method)
                && any_or_empty(&operation.paths, path)
                && none_of(&operation.not_paths, path)
                && any_or_empty(&operation.hosts, host)
                && none_of(&operation.not_hosts, host)
        }
    };
    ports_ok && http_ok
}

fn condition_matches(condition: &Condition, request: &Request<'_>, lenient: bool) -> bool {
    let Some(http) = request.http else {
        return lenient;
    };
    let Some(name) = condition
        .key
        .strip_prefix("request.headers[")
        .and_then(|rest| rest.strip_suffix(']'))
    else {
        // Unknown keys never match: a typo must not widen access.
        return lenient;
    };
    let value = (http.header)(name);
    any_or_empty(&condition.values, |v| {
        value.is_some_and(|actual| wildcard(v, actual))
    }) && none_of(&condition.not_values, |v| {
        value.is_some_and(|actual| wildcard(v, actual))
    })
}

fn any_or_empty<T>(values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(matches)
}

fn none_of<T>(values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    !values.iter().any(matches)
}

/// The path policies are matched against, and the one forwarded: percent-encoded
/// unreserved characters decoded, `.`/`..` segments resolved and repeated slashes merged
/// (RFC 3986 §6.2.2), so `/a/../admin`, `//admin` and `/%61dmin` are all `/admin`.
pub fn normalize_path(path: &str) -> Result<std::borrow::Cow<'_, str>, InvalidPath> {
    // Most paths are already normal: no allocation for them.
    let suspicious = path.is_empty()
        || !path.starts_with('/')
        || path.contains("//")
        || path.contains("/.")
        || path.contains('%');
    if !suspicious {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path);
    let ends_with_slash =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut normalized = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() || (ends_with_slash && !segments.is_empty()) {
        normalized.push('/');
    }
    Ok(std::borrow::Cow::Owned(normalized))
}

/// A request path that has no normal form, so no policy can be checked against it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPath {
    /// `%` not followed by two hexadecimal digits.
    #[error("malformed percent-encoding at byte {0}")]
    MalformedEscape(usize),
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = path.get(i + 1..i + 3)
            && let Ok(value) = u8::from_str_radix(hex, 16)
        {
            if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
                out.push(value as char);
            } else {
                out.push('%');
                out.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        // Multi-byte characters cannot appear in a request path; copy bytes verbatim.
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// `example.com:8080` and `example.com.` both name `example.com`.
fn host_without_port(host: &str) -> &str {
    let host = match host.rsplit_once(':') {
        Some((name, port))
            if !name.ends_with(']')
                && port.bytes().all(|b| b.is_ascii_digit())
                && !name.contains(':') =>
        {
            name
        }
        _ => host,
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// A principal pattern against a SPIFFE ID, written with or without `spiffe://`.
fn principal_matches(pattern: &str, id: &SpiffeId) -> bool {
    let full = id.as_str();
    let short = &full["spiffe://".len()..];
    if pattern.starts_with("spiffe://") {
        wildcard(pattern, full)
    } else {
        wildcard(pattern, short)
    }
}

/// Exact, `*`, `prefix*` or `*suffix`.
pub fn wildcard(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKLOAD: WorkloadRef<'static> = WorkloadRef {
        namespace: "shop",
        service_account: "orders",
    };

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

    fn decide(policies: &[Named<AuthorizationPolicySpec>], call: &Call) -> Decision {
        let selected: Vec<_> = policies
            .iter()
            .filter(|p| selects(&p.namespace, p.spec.selector.as_ref(), WORKLOAD))
            .collect();
        let headers = call.headers;
        let header = move |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        let request = Request {
            source: call.source.as_ref(),
            request_principal: call.jwt,
            port: call.port,
            http: call.http.map(|(method, path, host)| HttpRequest {
                method,
                path,
                host,
                header: &header,
            }),
        };
        authorize(&selected, &request)
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
            ("/a%2fb", "/a%2Fb"),
            ("/%zz", "/%zz"),
        ] {
            assert_eq!(normalize_path(raw).unwrap(), normal, "{raw}");
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
}
