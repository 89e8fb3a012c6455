//! Rewrites the app's probes to go through the proxy's admin port, as Istio does.
//!
//! With STRICT mTLS the proxy refuses the kubelet's plaintext probes on the app's
//! ports (HTTP, and gRPC, which the kubelet speaks as plaintext HTTP/2), and a
//! tcpSocket probe of a captured port only reaches the proxy, which accepts for any
//! application. So the kubelet probes `15020/app-health/<container>/<kind>` with an
//! httpGet instead, and the proxy (inside the pod, outside the capture) performs the
//! original probe on loopback: the same GET, a `grpc.health.v1.Health/Check` call, or a
//! TCP connect. Every probe gets a [`ProbeReport`] saying what was done and, for a
//! probe left alone, why; `tessera inject` prints them and the webhook logs them.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use super::sidecar::ADMIN_PORT;

/// An app probe the proxy performs on the kubelet's behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppProbe {
    pub port: u16,
    /// The pod probe's own `timeoutSeconds`: the proxy gives the app as long.
    pub timeout_seconds: u32,
    pub action: ProbeAction,
}

/// What the proxy does to the app's port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// `GET path` with the probe's headers; the app's status is the answer.
    Http {
        path: String,
        http_headers: Vec<(String, String)>,
    },
    /// `grpc.health.v1.Health/Check` over plaintext HTTP/2; `None` asks about the server
    /// as a whole (the empty service name), as the kubelet does.
    Grpc { service: Option<String> },
    /// A TCP connect.
    Tcp,
}

/// Probe field of a container, and the admin path suffix that stands for it.
const PROBES: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// What injection did to one probe of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The item of a `List` the container belongs to (`items[1] (Pod/q)`), if any.
    pub item: Option<String>,
    pub container: String,
    /// `livenessProbe`, `readinessProbe` or `startupProbe`.
    pub field: &'static str,
    /// The probe as the pod states it: `grpc :9090`, `tcpSocket :5432`, `httpGet :http/healthz`.
    pub probe: String,
    pub decision: Decision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The kubelet now probes this admin path; the proxy performs the original.
    Rewrote { admin_path: String },
    /// The kubelet keeps probing as the pod says.
    Left(LeftReason),
}

/// Why a probe stays with the kubelet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftReason {
    /// The proxy's prober speaks plain HTTP only; the owner excludes the port from
    /// capture under STRICT instead.
    Https,
    /// `host` set: it probes another address, which the proxy's loopback prober cannot.
    OtherHost,
    /// A named port the container does not declare: the kubelet reports that error
    /// itself, and rewriting would hide it behind the admin port.
    UndeclaredPort,
    /// The kubelet's probe reaches the app directly, past the proxy.
    ExcludedPort,
    /// exec runs in the container: no network involved.
    Exec,
    /// No handler, several, or a field of the wrong shape: the API server refuses it.
    Malformed,
}

impl fmt::Display for LeftReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeftReason::Https => "HTTPS, which the proxy does not probe",
            LeftReason::OtherHost => "probes another host",
            LeftReason::UndeclaredPort => "port name not declared by the container",
            LeftReason::ExcludedPort => "port excluded from capture",
            LeftReason::Exec => "runs in the container",
            LeftReason::Malformed => "malformed",
        })
    }
}

impl fmt::Display for ProbeReport {
    /// `rewrote web/livenessProbe (grpc :9090) → :15020/app-health/web/livez`, or
    /// `left web/readinessProbe (tcpSocket :5432, port excluded from capture)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(item) = &self.item {
            write!(f, "{item}: ")?;
        }
        let Self {
            container,
            field,
            probe,
            ..
        } = self;
        match &self.decision {
            Decision::Rewrote { admin_path } => write!(
                f,
                "rewrote {container}/{field} ({probe}) → :{ADMIN_PORT}{admin_path}"
            ),
            Decision::Left(reason) => write!(f, "left {container}/{field} ({probe}, {reason})"),
        }
    }
}

/// The probes the proxy now performs, keyed by the admin path that stands for each,
/// and a report per probe found.
#[derive(Debug, Default)]
pub struct Rewritten {
    pub app_probes: BTreeMap<String, AppProbe>,
    pub reports: Vec<ProbeReport>,
}

/// Rewrites every rewritable probe of `containers`. `excluded_ports` are the inbound
/// ports the capture leaves alone (`tessera.dev/exclude-inbound-ports`).
pub fn rewrite(containers: &mut [Value], excluded_ports: &[u16]) -> Rewritten {
    let mut rewritten = Rewritten::default();
    // The admin port is never captured either.
    let excluded = |port: u16| port == ADMIN_PORT || excluded_ports.contains(&port);
    for container in containers.iter_mut().filter_map(Value::as_object_mut) {
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let ports = named_ports(container);
        for (field, suffix) in PROBES {
            let Some(probe) = container.get_mut(field) else {
                continue;
            };
            if probe.is_null() {
                continue;
            }
            let (description, verdict) = match probe.as_object() {
                Some(probe) => classify(probe, &ports, &excluded),
                None => ("?".to_string(), Err(LeftReason::Malformed)),
            };
            let decision = match verdict {
                Ok(app_probe) => {
                    let admin_path = format!("/app-health/{name}/{suffix}");
                    if let Some(probe) = probe.as_object_mut() {
                        point_at_admin(probe, &admin_path);
                    }
                    rewritten.app_probes.insert(admin_path.clone(), app_probe);
                    Decision::Rewrote { admin_path }
                }
                Err(reason) => Decision::Left(reason),
            };
            rewritten.reports.push(ProbeReport {
                item: None,
                container: name.clone(),
                field,
                probe: description,
                decision,
            });
        }
    }
    rewritten
}

/// The probe's description, and the probe as the proxy must perform it or why it stays
/// with the kubelet.
fn classify(
    probe: &Map<String, Value>,
    ports: &[(String, u16)],
    excluded: &impl Fn(u16) -> bool,
) -> (String, Result<AppProbe, LeftReason>) {
    let handlers: Vec<&str> = ["httpGet", "grpc", "tcpSocket", "exec"]
        .into_iter()
        .filter(|h| probe.get(*h).is_some_and(|v| !v.is_null()))
        .collect();
    let [handler] = handlers.as_slice() else {
        let description = if handlers.is_empty() {
            "no handler".to_string()
        } else {
            handlers.join(" + ")
        };
        return (description, Err(LeftReason::Malformed));
    };
    let Some(action) = probe.get(*handler).and_then(Value::as_object) else {
        return (handler.to_string(), Err(LeftReason::Malformed));
    };
    let timeout_seconds = probe
        .get("timeoutSeconds")
        .and_then(Value::as_u64)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(1);
    let host = action
        .get("host")
        .and_then(Value::as_str)
        .filter(|host| !host.is_empty());
    let written_port = describe_port(action.get("port"));
    let at = format!("{}:{written_port}", host.unwrap_or_default());
    let (description, verdict) = match *handler {
        "exec" => ("exec".to_string(), Err(LeftReason::Exec)),
        "httpGet" => {
            let path = match action.get("path").and_then(Value::as_str) {
                Some(path) if !path.is_empty() => path.to_string(),
                _ => "/".to_string(),
            };
            let scheme = action.get("scheme").and_then(Value::as_str);
            let verdict = if !matches!(scheme, None | Some("HTTP")) {
                Err(LeftReason::Https)
            } else if host.is_some() {
                Err(LeftReason::OtherHost)
            } else {
                // An HTTP probe is rewritten even on an excluded port: harmless, and
                // the proxy's answer is the app's.
                port(action.get("port"), ports).and_then(|port| {
                    let http_headers =
                        headers(action.get("httpHeaders")).ok_or(LeftReason::Malformed)?;
                    let path = path.clone();
                    Ok((port, ProbeAction::Http { path, http_headers }))
                })
            };
            (format!("httpGet {at}{path}"), verdict)
        }
        "grpc" => {
            let service = action
                .get("service")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let description = match service {
                Some(service) => format!("grpc {at} service {service:?}"),
                None => format!("grpc {at}"),
            };
            // gRPC probes name no host and take only a number (no named ports).
            let verdict = match action.get("port") {
                Some(Value::Number(_)) => port(action.get("port"), ports)
                    .and_then(|port| unless_excluded(port, excluded))
                    .map(|port| {
                        let service = service.map(str::to_string);
                        (port, ProbeAction::Grpc { service })
                    }),
                _ => Err(LeftReason::Malformed),
            };
            (description, verdict)
        }
        _ => {
            let verdict = if host.is_some() {
                Err(LeftReason::OtherHost)
            } else {
                port(action.get("port"), ports)
                    .and_then(|port| unless_excluded(port, excluded))
                    .map(|port| (port, ProbeAction::Tcp))
            };
            (format!("tcpSocket {at}"), verdict)
        }
    };
    let verdict = verdict.map(|(port, action)| AppProbe {
        port,
        timeout_seconds,
        action,
    });
    (description, verdict)
}

/// A port the proxy can probe: a number, or a name the container declares.
fn port(port: Option<&Value>, ports: &[(String, u16)]) -> Result<u16, LeftReason> {
    let number = match port {
        Some(Value::Number(number)) => number.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(Value::String(name)) => {
            return ports
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, number)| *number)
                .ok_or(LeftReason::UndeclaredPort);
        }
        _ => None,
    };
    number
        .filter(|port| *port != 0)
        .ok_or(LeftReason::Malformed)
}

/// A probe of a port outside the capture already reaches the app: nothing to fix.
fn unless_excluded(port: u16, excluded: &impl Fn(u16) -> bool) -> Result<u16, LeftReason> {
    if excluded(port) {
        Err(LeftReason::ExcludedPort)
    } else {
        Ok(port)
    }
}

/// The port as written: `9090`, `http`, or `?`.
fn describe_port(port: Option<&Value>) -> String {
    match port {
        Some(Value::Number(number)) => number.to_string(),
        Some(Value::String(name)) => name.clone(),
        _ => "?".to_string(),
    }
}

/// The probe's headers; `None` when malformed (the API server will refuse the pod).
fn headers(headers: Option<&Value>) -> Option<Vec<(String, String)>> {
    let Some(headers) = headers else {
        return Some(Vec::new());
    };
    headers
        .as_array()?
        .iter()
        .map(|header| {
            let name = header.get("name")?.as_str()?;
            let value = header.get("value")?.as_str()?;
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

/// Points the probe at the admin port as an httpGet, whatever it was; timing fields
/// (period, thresholds, timeout) stay, and headers move to the proxy's copy.
fn point_at_admin(probe: &mut Map<String, Value>, admin_path: &str) {
    probe.remove("grpc");
    probe.remove("tcpSocket");
    let http_get = probe
        .entry("httpGet")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(http_get) = http_get.as_object_mut() {
        http_get.insert("port".into(), Value::from(ADMIN_PORT));
        http_get.insert("path".into(), Value::from(admin_path));
        http_get.remove("httpHeaders");
    }
}

fn named_ports(container: &Map<String, Value>) -> Vec<(String, u16)> {
    let Some(ports) = container.get("ports").and_then(Value::as_array) else {
        return Vec::new();
    };
    ports
        .iter()
        .filter_map(|port| {
            let name = port.get("name")?.as_str()?;
            let number = u16::try_from(port.get("containerPort")?.as_u64()?).ok()?;
            Some((name.to_string(), number))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn lines(rewritten: &Rewritten) -> Vec<String> {
        rewritten.reports.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn rewrites_http_probes_and_leaves_the_rest() {
        let mut containers = vec![json!({
            "name": "web",
            "ports": [{ "name": "http", "containerPort": 8080 }],
            "livenessProbe": {
                "httpGet": {
                    "path": "/healthz", "port": "http",
                    "httpHeaders": [{ "name": "X-Probe", "value": "1" }]
                },
                "periodSeconds": 3, "timeoutSeconds": 2
            },
            "readinessProbe": { "httpGet": { "port": 8443, "scheme": "HTTPS" } },
            "startupProbe": { "httpGet": { "port": "missing" } }
        })];
        let original = containers.clone();
        let rewritten = rewrite(&mut containers, &[]);

        assert_eq!(
            rewritten.app_probes,
            BTreeMap::from([(
                "/app-health/web/livez".to_string(),
                AppProbe {
                    port: 8080,
                    timeout_seconds: 2,
                    action: ProbeAction::Http {
                        path: "/healthz".into(),
                        http_headers: vec![("X-Probe".into(), "1".into())],
                    },
                }
            )])
        );
        assert_eq!(
            containers[0]["livenessProbe"],
            json!({
                "httpGet": { "path": "/app-health/web/livez", "port": 15020 },
                "periodSeconds": 3, "timeoutSeconds": 2
            })
        );
        assert_eq!(
            containers[0]["readinessProbe"],
            original[0]["readinessProbe"]
        );
        assert_eq!(containers[0]["startupProbe"], original[0]["startupProbe"]);
        assert_eq!(
            lines(&rewritten),
            [
                "rewrote web/livenessProbe (httpGet :http/healthz) → :15020/app-health/web/livez",
                "left web/readinessProbe (httpGet :8443/, HTTPS, which the proxy does not probe)",
                "left web/startupProbe (httpGet :missing/, port name not declared by the container)",
            ]
        );
    }

    #[test]
    fn defaults_path_and_timeout_and_skips_other_hosts() {
        let mut containers = vec![json!({
            "name": "api",
            "readinessProbe": { "httpGet": { "port": 9000, "scheme": "HTTP" } },
            "livenessProbe": { "httpGet": { "port": 9000, "host": "10.0.0.1" } },
        })];
        let rewritten = rewrite(&mut containers, &[]);
        assert_eq!(rewritten.app_probes.len(), 1);
        let probe = &rewritten.app_probes["/app-health/api/readyz"];
        assert_eq!(probe.port, 9000);
        assert_eq!(probe.timeout_seconds, 1);
        assert!(matches!(&probe.action, ProbeAction::Http { path, .. } if path == "/"));
        assert_eq!(containers[0]["livenessProbe"]["httpGet"]["port"], 9000);
        assert_eq!(
            lines(&rewritten)[0],
            "left api/livenessProbe (httpGet 10.0.0.1:9000/, probes another host)"
        );
    }

    /// gRPC and tcpSocket probes of captured ports become httpGet probes of the admin
    /// port; the rest of the probe (timing, thresholds) stays as it was.
    #[test]
    fn rewrites_grpc_and_tcp_probes_of_captured_ports() {
        let mut containers = vec![json!({
            "name": "orders",
            "ports": [{ "name": "db", "containerPort": 5432 }],
            "livenessProbe": {
                "grpc": { "port": 9090, "service": "orders.v1.Orders" },
                "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2
            },
            "readinessProbe": { "grpc": { "port": 9090 } },
            "startupProbe": { "tcpSocket": { "port": "db" }, "timeoutSeconds": 4 }
        })];
        let rewritten = rewrite(&mut containers, &[8081]);
        assert_eq!(
            rewritten.app_probes,
            BTreeMap::from([
                (
                    "/app-health/orders/livez".to_string(),
                    AppProbe {
                        port: 9090,
                        timeout_seconds: 3,
                        action: ProbeAction::Grpc {
                            service: Some("orders.v1.Orders".into())
                        },
                    }
                ),
                (
                    "/app-health/orders/readyz".to_string(),
                    AppProbe {
                        port: 9090,
                        timeout_seconds: 1,
                        action: ProbeAction::Grpc { service: None },
                    }
                ),
                (
                    "/app-health/orders/startupz".to_string(),
                    AppProbe {
                        port: 5432,
                        timeout_seconds: 4,
                        action: ProbeAction::Tcp,
                    }
                ),
            ])
        );
        assert_eq!(
            containers[0]["livenessProbe"],
            json!({
                "httpGet": { "path": "/app-health/orders/livez", "port": 15020 },
                "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2
            })
        );
        assert_eq!(
            containers[0]["startupProbe"],
            json!({
                "httpGet": { "path": "/app-health/orders/startupz", "port": 15020 },
                "timeoutSeconds": 4
            })
        );
        assert_eq!(
            lines(&rewritten),
            [
                "rewrote orders/livenessProbe (grpc :9090 service \"orders.v1.Orders\") → :15020/app-health/orders/livez",
                "rewrote orders/readinessProbe (grpc :9090) → :15020/app-health/orders/readyz",
                "rewrote orders/startupProbe (tcpSocket :db) → :15020/app-health/orders/startupz",
            ]
        );
    }

    /// Each reason a gRPC or tcpSocket probe stays with the kubelet, and the line
    /// that says so.
    #[test]
    fn leaves_grpc_and_tcp_probes_it_cannot_or_need_not_rewrite() {
        let cases = [
            (
                json!({ "tcpSocket": { "port": 5432 } }),
                "left c/livenessProbe (tcpSocket :5432, port excluded from capture)",
            ),
            (
                json!({ "grpc": { "port": 9090 } }),
                "left c/livenessProbe (grpc :9090, port excluded from capture)",
            ),
            (
                // Named, declared, and excluded once resolved.
                json!({ "tcpSocket": { "port": "metrics" } }),
                "left c/livenessProbe (tcpSocket :metrics, port excluded from capture)",
            ),
            (
                json!({ "tcpSocket": { "port": 15020 } }),
                "left c/livenessProbe (tcpSocket :15020, port excluded from capture)",
            ),
            (
                json!({ "tcpSocket": { "port": 6379, "host": "db.internal" } }),
                "left c/livenessProbe (tcpSocket db.internal:6379, probes another host)",
            ),
            (
                json!({ "tcpSocket": { "port": "redis" } }),
                "left c/livenessProbe (tcpSocket :redis, port name not declared by the container)",
            ),
            (
                // gRPC probes take no named port: the API server refuses one.
                json!({ "grpc": { "port": "grpc" } }),
                "left c/livenessProbe (grpc :grpc, malformed)",
            ),
            (
                json!({ "grpc": { "port": 0 } }),
                "left c/livenessProbe (grpc :0, malformed)",
            ),
            (
                json!({ "tcpSocket": { "port": 70000 } }),
                "left c/livenessProbe (tcpSocket :70000, malformed)",
            ),
            (
                json!({ "exec": { "command": ["/bin/check"] } }),
                "left c/livenessProbe (exec, runs in the container)",
            ),
            (
                json!({ "tcpSocket": { "port": 80 }, "grpc": { "port": 81 } }),
                "left c/livenessProbe (grpc + tcpSocket, malformed)",
            ),
            (
                json!({ "periodSeconds": 3 }),
                "left c/livenessProbe (no handler, malformed)",
            ),
            (json!("probe"), "left c/livenessProbe (?, malformed)"),
        ];
        for (probe, line) in cases {
            let mut containers = vec![json!({
                "name": "c",
                "ports": [{ "name": "metrics", "containerPort": 9100 }],
                "livenessProbe": probe,
            })];
            let before = containers.clone();
            let rewritten = rewrite(&mut containers, &[5432, 9090, 9100]);
            assert!(rewritten.app_probes.is_empty(), "{line}");
            assert_eq!(containers, before, "{line}");
            assert_eq!(lines(&rewritten), [line]);
        }
    }

    #[test]
    fn absent_and_null_probes_are_not_reported() {
        let mut containers = vec![json!({ "name": "c", "livenessProbe": null })];
        let rewritten = rewrite(&mut containers, &[]);
        assert!(rewritten.reports.is_empty());
    }
}
