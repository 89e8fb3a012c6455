//! What several fuzz targets share: the fixed authorization policies they decide
//! against, and an independent spelling of the host a policy names.

use std::sync::OnceLock;

use tessera_mesh::policy::{
    Action, AuthorizationPolicySpec, CompiledPolicy, Condition, Named, Operation, Rule, To,
};

fn deny_to(operation: Operation) -> AuthorizationPolicySpec {
    AuthorizationPolicySpec {
        action: Action::Deny,
        rules: vec![Rule {
            to: vec![To { operation }],
            ..Rule::default()
        }],
        ..AuthorizationPolicySpec::default()
    }
}

/// DENY `/admin*`; DENY hosts `evil` and `[fd00::1]`; DENY `x-debug: 1`; AUDIT
/// `user-agent: curl*`; ALLOW GET/HEAD on `/api/*` and `/` (not `*.internal`) or
/// `x-tenant: gold*`. Compiled once, as a proxy compiles a snapshot's.
pub fn policies() -> &'static [CompiledPolicy] {
    static POLICIES: OnceLock<Vec<CompiledPolicy>> = OnceLock::new();
    POLICIES.get_or_init(|| {
        let when = |key: &str, values: &[&str]| Condition {
            key: key.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
            not_values: Vec::new(),
        };
        let specs = [
            deny_to(Operation {
                paths: vec!["/admin*".into()],
                ..Operation::default()
            }),
            deny_to(Operation {
                hosts: vec!["evil".into(), "[fd00::1]".into()],
                ..Operation::default()
            }),
            AuthorizationPolicySpec {
                action: Action::Deny,
                rules: vec![Rule {
                    when: vec![when("request.headers[x-debug]", &["1"])],
                    ..Rule::default()
                }],
                ..AuthorizationPolicySpec::default()
            },
            AuthorizationPolicySpec {
                action: Action::Audit,
                rules: vec![Rule {
                    when: vec![when("request.headers[user-agent]", &["curl*"])],
                    ..Rule::default()
                }],
                ..AuthorizationPolicySpec::default()
            },
            AuthorizationPolicySpec {
                action: Action::Allow,
                rules: vec![
                    Rule {
                        to: vec![To {
                            operation: Operation {
                                methods: vec!["GET".into(), "HEAD".into()],
                                paths: vec!["/api/*".into(), "/".into()],
                                not_hosts: vec!["*.internal".into()],
                                ..Operation::default()
                            },
                        }],
                        ..Rule::default()
                    },
                    Rule {
                        when: vec![when("request.headers[x-tenant]", &["gold*"])],
                        ..Rule::default()
                    },
                ],
                ..AuthorizationPolicySpec::default()
            },
        ];
        specs
            .into_iter()
            .enumerate()
            .map(|(index, spec)| {
                let named = Named {
                    name: format!("p{index}"),
                    namespace: "shop".into(),
                    spec,
                };
                CompiledPolicy::try_from(&named).expect("fixed policies compile")
            })
            .collect()
    })
}

/// The host a policy names, in the plainest spelling: lowercase, without a port or a
/// trailing dot. Written apart from the engine, so the two can disagree.
pub fn plain_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    let digits = |port: &str| port.bytes().all(|b| b.is_ascii_digit());
    let name = if let Some(inner) = host.strip_prefix('[') {
        match inner.split_once(']') {
            Some((address, "")) => format!("[{address}]"),
            Some((address, port)) if port.starts_with(':') && digits(&port[1..]) => {
                format!("[{address}]")
            }
            _ => host.clone(),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if digits(port) && !name.contains(':') => name.to_string(),
            _ => host.clone(),
        }
    };
    name.strip_suffix('.').map(str::to_string).unwrap_or(name)
}
