//! Local rate limiting (`RateLimitPolicy`): how many requests, or new opaque
//! connections, the selected workloads accept per unit of time, in total or per caller.
//!
//! As with AuthorizationPolicy, the resource type is the schema and [`CompiledLimit`] the
//! working form: the control plane refuses a policy that does not compile, with the
//! field named, and a proxy compiles the same way when a snapshot arrives. The buckets
//! themselves live in the proxy (`inbound::rate_limit`); this module only says what each
//! limit counts, and at which rate.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use crate::policy::{Named, WorkloadSelector};

/// The fastest a limit may refill: one token a microsecond (a million a second).
pub const MIN_TOKEN_INTERVAL: Duration = Duration::from_micros(1);
/// The slowest a limit may refill: one token an hour.
pub const MAX_TOKEN_INTERVAL: Duration = Duration::from_secs(3600);
/// The largest burst a limit may allow.
pub const MAX_BURST: u32 = 1_000_000;
/// Limits in one policy: each per-caller limit holds a fixed table of buckets.
pub const MAX_LIMITS: usize = 32;
/// A limit's name is a metric label: short, and from a small alphabet.
pub const MAX_NAME_LEN: usize = 63;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Every limit a request (or connection) matches must admit it, in this order.
    #[serde(default)]
    pub limits: Vec<LimitSpec>,
}

/// One token bucket: what it counts (requests matching `match` on `ports`, or new
/// opaque connections), how fast it refills and how much it holds, and whose it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitSpec {
    /// The `limit` label of `tessera_rate_limited_total`; `limits[<index>]` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Application ports this limit applies to; none: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Which HTTP requests count; none: every request.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatchSpec>,
    /// HTTP requests a second. Set this, or `rate` and `per`, or `connectionsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    /// HTTP requests per `per` (e.g. 100 per 1m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    #[serde(
        default,
        with = "crate::resources::optional_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>", regex(pattern = crate::resources::DURATION_PATTERN)))]
    pub per: Option<Duration>,
    /// New opaque TCP connections a second (tunnelled ones included); HTTP requests
    /// are not counted by such a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_per_second: Option<u32>,
    /// How many may come at once after a quiet spell; the rate (a second's worth,
    /// at least 1) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Whose bucket: one for all callers, one per caller identity, or one per value of
    /// `header`.
    #[serde(default)]
    pub key: LimitKeySpec,
    /// The header whose value keys the buckets, with `key: header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

/// Which HTTP requests a limit counts: all given conditions hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatchSpec {
    /// Any of these methods (upper case, exact).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The path is this one or below it, segment by segment (`/api` matches `/api` and
    /// `/api/orders`, not `/apis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

/// Whose bucket a request takes a token from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum LimitKeySpec {
    /// One bucket shared by every caller.
    #[default]
    Total,
    /// One bucket per verified caller identity (mTLS principal); plaintext callers
    /// share one.
    Identity,
    /// One bucket per value of the request header named by `header`; requests without
    /// it share one.
    Header,
}

/// A limit compiled: checked, with its rate as the time one token takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledLimit {
    /// The `limit` metric label.
    pub name: String,
    pub ports: Vec<u16>,
    pub counts: Counts,
    /// The time it takes to earn one token.
    pub token_interval: Duration,
    pub burst: u32,
    pub key: LimitKey,
}

/// What a limit counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counts {
    Requests(RouteMatch),
    Connections,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    methods: Vec<String>,
    /// Without a trailing `/` (empty for `/`: everything).
    path_prefix: Option<String>,
}

impl RouteMatch {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let method_matches = self.methods.is_empty() || self.methods.iter().any(|m| m == method);
        method_matches
            && self.path_prefix.as_deref().is_none_or(|prefix| {
                path.strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    Total,
    Identity,
    Header(HeaderName),
}

impl CompiledLimit {
    /// Whether this limit counts an HTTP request to application port `port`.
    pub fn counts_request(&self, port: u16, method: &str, path: &str) -> bool {
        self.applies_to(port)
            && matches!(&self.counts, Counts::Requests(route) if route.matches(method, path))
    }

    /// Whether this limit counts a new opaque connection to application port `port`.
    pub fn counts_connection(&self, port: u16) -> bool {
        self.applies_to(port) && self.counts == Counts::Connections
    }

    pub fn applies_to(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

/// What is wrong with a RateLimitPolicy, and in which field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct RateLimitError {
    pub field: String,
    pub problem: String,
}

impl RateLimitError {
    fn at(index: usize, field: impl fmt::Display, problem: impl Into<String>) -> Self {
        Self {
            field: format!("spec.limits[{index}].{field}"),
            problem: problem.into(),
        }
    }
}

/// Compiles every limit of a policy, or names the first field that is wrong.
pub fn compile(policy: &Named<RateLimitPolicySpec>) -> Result<Vec<CompiledLimit>, RateLimitError> {
    let limits = &policy.spec.limits;
    if limits.len() > MAX_LIMITS {
        return Err(RateLimitError {
            field: "spec.limits".into(),
            problem: format!("{} limits; at most {MAX_LIMITS}", limits.len()),
        });
    }
    let mut names = BTreeSet::new();
    limits
        .iter()
        .enumerate()
        .map(|(index, limit)| {
            let compiled = compile_limit(index, limit)?;
            if !names.insert(compiled.name.clone()) {
                return Err(RateLimitError::at(
                    index,
                    "name",
                    format!("{:?} names an earlier limit too", compiled.name),
                ));
            }
            Ok(compiled)
        })
        .collect()
}

fn compile_limit(index: usize, limit: &LimitSpec) -> Result<CompiledLimit, RateLimitError> {
    let name = match &limit.name {
        Some(name) => {
            validate_name(name).map_err(|problem| RateLimitError::at(index, "name", problem))?;
            name.clone()
        }
        None => format!("limits[{index}]"),
    };
    if let Some(at) = limit.ports.iter().position(|&port| port == 0) {
        return Err(RateLimitError::at(
            index,
            format_args!("ports[{at}]"),
            "0 is not a port",
        ));
    }
    let (counts, per_token, field) = rate(index, limit)?;
    let token_interval = per_token.map_err(|problem| RateLimitError::at(index, field, problem))?;
    let counts = match counts {
        Unit::Requests => Counts::Requests(route_match(index, limit.route.as_ref())?),
        Unit::Connections if limit.route.is_some() => {
            return Err(RateLimitError::at(
                index,
                "match",
                "a connection limit counts opaque connections, which have no method or path",
            ));
        }
        Unit::Connections => Counts::Connections,
    };
    let burst = match limit.burst {
        Some(0) => return Err(RateLimitError::at(index, "burst", "must be at least 1")),
        Some(burst) if burst > MAX_BURST => {
            return Err(RateLimitError::at(
                index,
                "burst",
                format!("{burst} is more than {MAX_BURST}"),
            ));
        }
        Some(burst) => burst,
        // A second's worth of tokens, at least one.
        None => (Duration::from_secs(1).as_nanos() / token_interval.as_nanos())
            .clamp(1, MAX_BURST.into()) as u32,
    };
    Ok(CompiledLimit {
        name,
        ports: limit.ports.clone(),
        counts,
        token_interval,
        burst,
        key: key(index, limit)?,
    })
}

enum Unit {
    Requests,
    Connections,
}

/// What the limit counts and the time per token (or what is wrong with it, in `field`).
type Rate = (Unit, Result<Duration, String>, &'static str);

fn rate(index: usize, limit: &LimitSpec) -> Result<Rate, RateLimitError> {
    let second = Duration::from_secs(1);
    match (
        limit.requests_per_second,
        limit.rate,
        limit.per,
        limit.connections_per_second,
    ) {
        (Some(rps), None, None, None) => {
            Ok((Unit::Requests, per_token(rps, second), "requestsPerSecond"))
        }
        (None, Some(rate), Some(per), None) => Ok((Unit::Requests, per_token(rate, per), "rate")),
        (None, None, None, Some(cps)) => Ok((
            Unit::Connections,
            per_token(cps, second),
            "connectionsPerSecond",
        )),
        (None, Some(_), None, None) => Err(RateLimitError::at(
            index,
            "per",
            "rate needs per (e.g. rate: 100, per: 1m)",
        )),
        (None, None, Some(_), None) => Err(RateLimitError::at(
            index,
            "rate",
            "per needs rate (e.g. rate: 100, per: 1m)",
        )),
        (None, None, None, None) => Err(RateLimitError::at(
            index,
            "requestsPerSecond",
            "set requestsPerSecond, rate and per, or connectionsPerSecond",
        )),
        _ => Err(RateLimitError::at(
            index,
            "requestsPerSecond",
            "set only one of requestsPerSecond, rate and per, connectionsPerSecond",
        )),
    }
}

/// The time one token takes at `count` per `per`, within the bounds a bucket keeps
/// exactly.
fn per_token(count: u32, per: Duration) -> Result<Duration, String> {
    if count == 0 {
        return Err("must be at least 1 (to refuse everything, use an AuthorizationPolicy)".into());
    }
    let interval = per / count;
    if interval < MIN_TOKEN_INTERVAL {
        return Err(format!(
            "{count} per {} is more than a million a second",
            humantime::format_duration(per)
        ));
    }
    if interval > MAX_TOKEN_INTERVAL {
        return Err(format!(
            "{count} per {} is less than one an hour",
            humantime::format_duration(per)
        ));
    }
    Ok(interval)
}

fn route_match(index: usize, route: Option<&RouteMatchSpec>) -> Result<RouteMatch, RateLimitError> {
    let Some(route) = route else {
        return Ok(RouteMatch::default());
    };
    for (at, method) in route.methods.iter().enumerate() {
        let is_token = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
        if !is_token {
            return Err(RateLimitError::at(
                index,
                format_args!("match.methods[{at}]"),
                format!("{method:?} is not an upper-case HTTP method"),
            ));
        }
    }
    let path_prefix = match &route.path_prefix {
        None => None,
        Some(prefix) => {
            let plain = prefix.starts_with('/')
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
            if !plain {
                return Err(RateLimitError::at(
                    index,
                    "match.pathPrefix",
                    format!("{prefix:?} must start with / and hold no query, fragment or space"),
                ));
            }
            Some(prefix.trim_end_matches('/').to_string())
        }
    };
    Ok(RouteMatch {
        methods: route.methods.clone(),
        path_prefix,
    })
}

fn key(index: usize, limit: &LimitSpec) -> Result<LimitKey, RateLimitError> {
    match (limit.key, &limit.header) {
        (LimitKeySpec::Total, None) => Ok(LimitKey::Total),
        (LimitKeySpec::Identity, None) => Ok(LimitKey::Identity),
        (LimitKeySpec::Header, Some(name)) => HeaderName::from_bytes(name.as_bytes())
            .map(LimitKey::Header)
            .map_err(|_| {
                RateLimitError::at(
                    index,
                    "header",
                    format!("{name:?} is not a valid HTTP header name"),
                )
            }),
        (LimitKeySpec::Header, None) => Err(RateLimitError::at(
            index,
            "header",
            "key: header needs the header's name",
        )),
        (_, Some(_)) => Err(RateLimitError::at(index, "header", "only with key: header")),
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?}: 1 to {MAX_NAME_LEN} of a-z, 0-9, - and _ (it is a metric label)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(limits: Vec<LimitSpec>) -> Named<RateLimitPolicySpec> {
        Named {
            name: "api".into(),
            namespace: "shop".into(),
            spec: RateLimitPolicySpec {
                selector: None,
                limits,
            },
        }
    }

    fn rps(rate: u32) -> LimitSpec {
        LimitSpec {
            requests_per_second: Some(rate),
            ..LimitSpec::default()
        }
    }

    fn error(limit: LimitSpec) -> String {
        compile(&policy(vec![rps(1), limit]))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn rates_become_the_time_per_token_and_burst_defaults_to_a_second() {
        let limits = compile(&policy(vec![
            rps(50),
            LimitSpec {
                rate: Some(120),
                per: Some(Duration::from_secs(60)),
                burst: Some(5),
                ..LimitSpec::default()
            },
            LimitSpec {
                connections_per_second: Some(4),
                name: Some("db".into()),
                ..LimitSpec::default()
            },
        ]))
        .unwrap();
        assert_eq!(limits[0].token_interval, Duration::from_millis(20));
        assert_eq!(limits[0].burst, 50);
        assert_eq!(limits[0].name, "limits[0]");
        assert_eq!(limits[1].token_interval, Duration::from_millis(500));
        assert_eq!(limits[1].burst, 5);
        assert_eq!(limits[2].counts, Counts::Connections);
        assert_eq!(limits[2].name, "db");
        assert!(limits[2].counts_connection(5432));
        assert!(!limits[2].counts_request(5432, "GET", "/"));
        assert!(!limits[0].counts_connection(5432));
    }

    #[test]
    fn every_wrong_field_is_named() {
        for (limit, expected) in [
            (
                LimitSpec {
                    burst: Some(0),
                    ..rps(10)
                },
                "spec.limits[1].burst: must be at least 1",
            ),
            (
                LimitSpec {
                    burst: Some(MAX_BURST + 1),
                    ..rps(10)
                },
                "spec.limits[1].burst: 1000001 is more than 1000000",
            ),
            (
                rps(2_000_000),
                "spec.limits[1].requestsPerSecond: 2000000 per 1s is more than a million a second",
            ),
            (
                rps(0),
                "spec.limits[1].requestsPerSecond: must be at least 1",
            ),
            (
                LimitSpec {
                    rate: Some(1),
                    per: Some(Duration::from_secs(2 * 3600)),
                    ..LimitSpec::default()
                },
                "spec.limits[1].rate: 1 per 2h is less than one an hour",
            ),
            (
                LimitSpec {
                    rate: Some(1),
                    ..LimitSpec::default()
                },
                "spec.limits[1].per: rate needs per",
            ),
            (
                LimitSpec {
                    connections_per_second: Some(3),
                    ..rps(10)
                },
                "spec.limits[1].requestsPerSecond: set only one of",
            ),
            (
                LimitSpec::default(),
                "spec.limits[1].requestsPerSecond: set requestsPerSecond",
            ),
            (
                LimitSpec {
                    connections_per_second: Some(3),
                    route: Some(RouteMatchSpec::default()),
                    ..LimitSpec::default()
                },
                "spec.limits[1].match: a connection limit",
            ),
            (
                LimitSpec {
                    route: Some(RouteMatchSpec {
                        methods: vec!["get".into()],
                        path_prefix: None,
                    }),
                    ..rps(1)
                },
                "spec.limits[1].match.methods[0]: \"get\" is not an upper-case HTTP method",
            ),
            (
                LimitSpec {
                    route: Some(RouteMatchSpec {
                        methods: vec![],
                        path_prefix: Some("api".into()),
                    }),
                    ..rps(1)
                },
                "spec.limits[1].match.pathPrefix: \"api\" must start with /",
            ),
            (
                LimitSpec {
                    key: LimitKeySpec::Header,
                    ..rps(1)
                },
                "spec.limits[1].header: key: header needs",
            ),
            (
                LimitSpec {
                    key: LimitKeySpec::Header,
                    header: Some("x api".into()),
                    ..rps(1)
                },
                "spec.limits[1].header: \"x api\" is not a valid HTTP header name",
            ),
            (
                LimitSpec {
                    header: Some("x-api-key".into()),
                    ..rps(1)
                },
                "spec.limits[1].header: only with key: header",
            ),
            (
                LimitSpec {
                    name: Some("Tenant Limit".into()),
                    ..rps(1)
                },
                "spec.limits[1].name: \"Tenant Limit\": 1 to 63",
            ),
            (
                LimitSpec {
                    name: Some("limits[0]".into()),
                    ..rps(1)
                },
                "spec.limits[1].name: \"limits[0]\"",
            ),
            (
                LimitSpec {
                    ports: vec![8080, 0],
                    ..rps(1)
                },
                "spec.limits[1].ports[1]: 0 is not a port",
            ),
        ] {
            let error = error(limit);
            assert!(error.starts_with(expected), "{error}\nexpected: {expected}");
        }
        let named_twice = LimitSpec {
            name: Some("a".into()),
            ..rps(1)
        };
        let error = compile(&policy(vec![named_twice.clone(), named_twice]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "spec.limits[1].name: \"a\" names an earlier limit too"
        );
        let error = compile(&policy(vec![rps(1); MAX_LIMITS + 1])).unwrap_err();
        assert_eq!(error.field, "spec.limits");
    }

    /// The README's example is a policy this version accepts, as written.
    #[test]
    fn the_readme_example_compiles() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```yaml\napiVersion: tessera.dev/v1alpha1\nkind: RateLimitPolicy")
            .expect("the README shows a RateLimitPolicy")
            + "```yaml\n".len();
        let example = &readme[start..start + readme[start..].find("```").unwrap()];
        let resources =
            crate::resources::parse_file(std::path::Path::new("README.md"), example).unwrap();
        let crate::resources::Spec::RateLimitPolicy(spec) = &resources[0].spec else {
            panic!("not a RateLimitPolicy");
        };
        let limits = compile(&Named {
            name: "orders-limits".into(),
            namespace: "shop".into(),
            spec: spec.clone(),
        })
        .unwrap();
        let names: Vec<&str> = limits.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            ["per-caller", "per-tenant", "everyone", "db-connections"]
        );
        assert_eq!(limits[3].counts, Counts::Connections);
        assert_eq!(
            limits[1].key,
            LimitKey::Header(HeaderName::from_static("x-tenant-id"))
        );
    }

    #[test]
    fn a_path_prefix_matches_whole_segments_and_methods_exactly() {
        let limit = compile(&policy(vec![LimitSpec {
            route: Some(RouteMatchSpec {
                methods: vec!["POST".into(), "PUT".into()],
                path_prefix: Some("/api/".into()),
            }),
            ports: vec![8080],
            ..rps(1)
        }]))
        .unwrap()
        .remove(0);
        assert!(limit.counts_request(8080, "POST", "/api"));
        assert!(limit.counts_request(8080, "PUT", "/api/orders/1"));
        assert!(!limit.counts_request(8080, "POST", "/apis"));
        assert!(!limit.counts_request(8080, "GET", "/api"));
        assert!(!limit.counts_request(9090, "POST", "/api"));
        let everything = RouteMatch {
            methods: vec![],
            path_prefix: Some(String::new()),
        };
        assert!(everything.matches("GET", "/"));
        assert!(everything.matches("GET", "/x"));
    }
}
