//! Rewrites the app's HTTP probes to go through the proxy's admin port, as Istio does.
//!
//! With STRICT mTLS the proxy refuses the kubelet's plaintext probes on the app's
//! ports, so the kubelet probes `15020/app-health/<container>/<kind>` instead and the
//! proxy (inside the pod, outside the capture) calls the app's original endpoint.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::sidecar::ADMIN_PORT;

/// An app probe the proxy performs on the kubelet's behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
    pub timeout_seconds: u32,
    pub http_headers: Vec<(String, String)>,
}

/// Probe field of a container, and the admin path suffix that stands for it.
const PROBES: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// Rewrites every rewritable probe of `containers`; returns the originals keyed by the
/// admin path that now stands for them.
pub fn rewrite(containers: &mut [Value]) -> BTreeMap<String, AppProbe> {
    let mut app_probes = BTreeMap::new();
    for container in containers.iter_mut().filter_map(Value::as_object_mut) {
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let ports = named_ports(container);
        for (field, suffix) in PROBES {
            let Some(probe) = container.get_mut(field).and_then(Value::as_object_mut) else {
                continue;
            };
            let Some(original) = rewritable(probe, &ports) else {
                continue;
            };
            let admin_path = format!("/app-health/{name}/{suffix}");
            point_at_admin(probe, &admin_path);
            app_probes.insert(admin_path, original);
        }
    }
    app_probes
}

/// The probe as the proxy must perform it, or `None` to leave it alone:
/// - HTTPS: the prober would have to downgrade to plain HTTP, so it stays with the
///   kubelet (exclude its port with `tessera.dev/exclude-inbound-ports` under STRICT);
/// - `host` set: it probes another address, which the proxy's localhost prober cannot;
/// - a named port the container does not declare: the kubelet reports that error
///   itself, and rewriting would hide it behind our admin port;
/// - tcpSocket, exec, grpc: not HTTP (and grpc/tcp probes pass the capture untouched
///   only when their port is excluded, which is the owner's call).
fn rewritable(probe: &Map<String, Value>, ports: &[(String, u16)]) -> Option<AppProbe> {
    let http_get = probe.get("httpGet")?.as_object()?;
    if !matches!(http_get.get("scheme"), None | Some(Value::Null))
        && http_get.get("scheme").and_then(Value::as_str) != Some("HTTP")
    {
        return None;
    }
    if http_get
        .get("host")
        .and_then(Value::as_str)
        .is_some_and(|host| !host.is_empty())
    {
        return None;
    }
    let port = match http_get.get("port")? {
        Value::Number(number) => number.as_u64().and_then(|n| u16::try_from(n).ok())?,
        Value::String(name) => ports.iter().find(|(n, _)| n == name)?.1,
        _ => return None,
    };
    if port == 0 {
        return None;
    }
    let path = match http_get.get("path").and_then(Value::as_str) {
        Some(path) if !path.is_empty() => path.to_string(),
        _ => "/".to_string(),
    };
    let timeout_seconds = probe
        .get("timeoutSeconds")
        .and_then(Value::as_u64)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(1);
    Some(AppProbe {
        port,
        path,
        timeout_seconds,
        http_headers: headers(http_get.get("httpHeaders"))?,
    })
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

/// Points the probe at the admin port; timing fields (period, thresholds, timeout)
/// stay, and headers move to the proxy's copy.
fn point_at_admin(probe: &mut Map<String, Value>, admin_path: &str) {
    if let Some(http_get) = probe.get_mut("httpGet").and_then(Value::as_object_mut) {
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
        let app_probes = rewrite(&mut containers);

        assert_eq!(
            app_probes,
            BTreeMap::from([(
                "/app-health/web/livez".to_string(),
                AppProbe {
                    port: 8080,
                    path: "/healthz".into(),
                    timeout_seconds: 2,
                    http_headers: vec![("X-Probe".into(), "1".into())],
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
    }

    #[test]
    fn defaults_path_and_timeout_and_skips_other_hosts() {
        let mut containers = vec![json!({
            "name": "api",
            "readinessProbe": { "httpGet": { "port": 9000, "scheme": "HTTP" } },
            "livenessProbe": { "httpGet": { "port": 9000, "host": "10.0.0.1" } },
            "startupProbe": { "tcpSocket": { "port": 9000 } }
        })];
        let app_probes = rewrite(&mut containers);
        assert_eq!(app_probes.len(), 1);
        let probe = &app_probes["/app-health/api/readyz"];
        assert_eq!((probe.port, probe.path.as_str()), (9000, "/"));
        assert_eq!(probe.timeout_seconds, 1);
        assert_eq!(containers[0]["livenessProbe"]["httpGet"]["port"], 9000);
    }
}
