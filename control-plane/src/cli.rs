//! Operator commands that read the mesh rather than run it: `tessera check migration`
//! (who still sends plaintext, and would STRICT break them) and `tessera policy explain`
//! (the decision for one hypothetical request, from the same engine the proxies run),
//! `tessera stat`, and `tessera inject` (sidecars added to Kubernetes YAML files).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use http::HeaderName;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tessera_mesh::SpiffeId;
use tessera_mesh::migration::MigrationReport;
use tessera_mesh::policy::{self, CompiledPolicy, MtlsMode, WorkloadRef};
use tessera_mesh::resources::{Protocol, ServicePort};
use tessera_mesh::snapshot::ServiceEntry;

use crate::inject::{self, Outcome, SkipReason};

/// What `tessera check migration` found.
pub struct MigrationCheck {
    pub report: String,
    /// Ports that still receive plaintext and are not STRICT: switching would break them.
    pub breaking: usize,
}

/// Reads `/migration` from each proxy's admin endpoint and reports, per workload and
/// port, who still sends plaintext and whether STRICT would break an observed flow.
pub async fn check_migration(proxies: &[String]) -> anyhow::Result<MigrationCheck> {
    let mut out = String::new();
    let mut breaking = 0;
    for admin in proxies {
        let body = get(admin, "/migration")
            .await
            .with_context(|| format!("proxy admin {admin}"))?;
        let report: MigrationReport = serde_json::from_slice(&body)
            .with_context(|| format!("proxy admin {admin}: unexpected answer"))?;
        let _ = writeln!(out, "{} (admin {admin})", report.workload);
        for port in &report.ports {
            let by = port.mode_policy.as_deref().unwrap_or("default");
            let _ = writeln!(
                out,
                "  port {} — {} (by {by})",
                port.application_port, port.mode
            );
            for source in &port.mtls {
                let _ = writeln!(
                    out,
                    "    mTLS       {:<55} {:>6} connections, last {}s ago",
                    source.source, source.connections, source.last_seen_seconds_ago
                );
            }
            for source in &port.plaintext {
                let _ = writeln!(
                    out,
                    "    PLAINTEXT  {:<55} {:>6} connections, last {}s ago",
                    source.source, source.connections, source.last_seen_seconds_ago
                );
            }
            let verdict = match (port.plaintext.is_empty(), port.mode.as_str()) {
                (true, "STRICT") => "already STRICT".to_string(),
                (true, _) => "safe to switch to STRICT: every caller uses mTLS".to_string(),
                (false, "STRICT") => {
                    "STRICT (earlier plaintext callers are now refused)".to_string()
                }
                (false, _) => {
                    breaking += 1;
                    let names: Vec<_> = port.plaintext.iter().map(|s| s.source.as_str()).collect();
                    format!(
                        "switching to STRICT would BREAK plaintext callers: {}",
                        names.join(", ")
                    )
                }
            };
            let _ = writeln!(out, "    → {verdict}");
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if breaking == 0 {
            "No port would break under STRICT.".to_string()
        } else {
            format!(
                "{breaking} port(s) still receive plaintext: move those callers into the mesh first."
            )
        }
    );
    Ok(MigrationCheck {
        report: out,
        breaking,
    })
}

/// `tessera check config DIR`: every problem of a configuration directory, checked
/// offline as the control plane checks it; the report and whether it is good.
pub fn check_config(dir: &Path) -> (String, bool) {
    let problems = crate::config::problems(dir);
    if problems.is_empty() {
        let count = tessera_mesh::resources::load_dir(dir).map_or(0, |r| r.len());
        return (
            format!(
                "✔ {}: {count} resources, a configuration the control plane accepts\n",
                dir.display()
            ),
            true,
        );
    }
    let mut report = String::new();
    for problem in &problems {
        let _ = writeln!(report, "× {problem}");
    }
    let _ = writeln!(
        report,
        "{} problem(s): the control plane would refuse this configuration and keep the last good one",
        problems.len()
    );
    (report, false)
}

/// `GET path` from `address` (HOST:PORT; every address a name resolves to is tried).
async fn get(address: &str, path: &str) -> anyhow::Result<bytes::Bytes> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, address)
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        bail!("{path}: status {}", response.status());
    }
    Ok(response.into_body().collect().await?.to_bytes())
}

/// One hypothetical request for `tessera policy explain`.
pub struct Hypothetical<'a> {
    /// A SPIFFE ID, or `None` for a plaintext caller.
    pub from: Option<SpiffeId>,
    /// `name.namespace`.
    pub to: &'a str,
    pub port: u16,
    /// `None` for opaque TCP.
    pub method: Option<&'a str>,
    pub path: &'a str,
    pub host: Option<&'a str>,
    pub headers: &'a [(String, String)],
    pub request_principal: Option<&'a str>,
    /// The called workload's labels, for policies that select by `matchLabels`.
    pub labels: &'a BTreeMap<String, String>,
}

/// `--path` names a request the proxy answers 400 before any policy runs.
#[derive(Debug, thiserror::Error)]
#[error("--path {path:?}: the proxy refuses this request (400) before any policy runs: {reason}")]
pub struct RefusedPath {
    pub path: String,
    pub reason: policy::InvalidPath,
}

/// The path the proxy would authorize and forward for `raw`: query and fragment cut off
/// (the proxy matches the path alone), then normalized as the proxy does.
pub fn forwarded_path(raw: &str) -> Result<std::borrow::Cow<'_, str>, RefusedPath> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    policy::normalize_path(path).map_err(|reason| RefusedPath {
        path: raw.to_string(),
        reason,
    })
}

/// Explains the decision for `request` from the configuration in `config_dir`; returns
/// the report and whether the request would be allowed. A path the proxy would refuse is
/// a [`RefusedPath`] error.
pub fn explain(config_dir: &Path, request: &Hypothetical<'_>) -> anyhow::Result<(String, bool)> {
    let mesh = crate::app::load_mesh_config(config_dir)?;
    let snapshot = crate::config::load_snapshot(config_dir, &mesh.trust_domain, None)?;
    let Some(service) = snapshot.services.iter().find(|s| s.key() == request.to) else {
        // `--to orders` for `orders.shop`: name the services it could mean.
        let meant: Vec<String> = snapshot
            .services
            .iter()
            .filter(|s| s.name == request.to)
            .map(|s| s.key())
            .collect();
        let hint = match meant.as_slice() {
            [] => String::new(),
            keys => format!(" (did you mean {}?)", keys.join(" or ")),
        };
        bail!(
            "no service {} in {}{hint}",
            request.to,
            config_dir.display()
        );
    };
    let mut accounts: Vec<&str> = service
        .endpoints
        .iter()
        .map(|e| e.identity.service_account())
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    if accounts.is_empty() {
        bail!("service {} has no workloads", request.to);
    }
    let mut out = String::new();
    // What is evaluated, first: the protocol follows the port's declaration, as the
    // callers' proxies decide it.
    let declared = declared_port(service, request.port);
    let protocol = declared.map_or(Protocol::Detect, |p| p.protocol);
    let http = match (request.method, protocol) {
        (Some(_), Protocol::Opaque) => None,
        (method, _) => method,
    };
    // The engine is handed what the proxy hands it, so explain gives the proxy's answer.
    let path = match http {
        Some(_) => forwarded_path(request.path)?,
        None => std::borrow::Cow::Borrowed(request.path),
    };
    let _ = writeln!(
        out,
        "{}",
        evaluated(request, http, &path, declared, service.ports.is_empty())
    );
    if let Some(from) = &request.from
        && from.trust_domain() != mesh.trust_domain
    {
        let _ = writeln!(
            out,
            "decision: DENY — refused in the mTLS handshake: the caller belongs to trust domain {:?}, the mesh is {:?}; no policy runs",
            from.trust_domain(),
            mesh.trust_domain
        );
        return Ok((out, false));
    }
    if declared.is_none() && !service.ports.is_empty() {
        let ports: Vec<String> = service
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, protocol_name(p.protocol)))
            .collect();
        let _ = writeln!(
            out,
            "decision: NOT ROUTED — {} declares port(s) {}, not {}: callers' proxies route only declared ports to it",
            request.to,
            ports.join(", "),
            request.port
        );
        return Ok((out, false));
    }
    let path = path.as_ref();
    let mut all_allowed = true;
    for account in accounts {
        let workload = WorkloadRef {
            namespace: &service.namespace,
            service_account: account,
            labels: request.labels,
        };
        // Policies see the application port: where this workload serves the port called
        // (a Kubernetes targetPort), else that port.
        let app_port = declared
            .and_then(|declared| {
                service
                    .endpoints
                    .iter()
                    .filter(|e| e.identity.service_account() == account)
                    .find_map(|e| e.ports.get(&declared.port).copied())
            })
            .unwrap_or(request.port);
        if app_port == request.port {
            let _ = writeln!(out, "workload sa/{account}:");
        } else {
            let _ = writeln!(out, "workload sa/{account} (application port {app_port}):");
        }
        let (mode, by) = policy::mtls_mode(&snapshot.peer_authentications, workload, app_port);
        let by = by.unwrap_or_else(|| "default".into());
        let _ = writeln!(out, "  mTLS mode: {mode} (by {by})");
        if request.from.is_none() && mode == MtlsMode::Strict {
            let _ = writeln!(
                out,
                "  decision: DENY — plaintext is refused on a STRICT port before any policy runs"
            );
            all_allowed = false;
            continue;
        }
        // Compiled as the proxy compiles them (loading the snapshot refused any that
        // cannot be).
        let selected = snapshot
            .authorization_policies
            .iter()
            .filter(|p| policy::selects(&p.namespace, p.spec.selector.as_ref(), workload))
            .map(CompiledPolicy::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let headers = request.headers;
        let header = |name: &HeaderName| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name.as_str()))
                .map(|(_, v)| v.as_str())
        };
        let host = request.host.unwrap_or(request.to);
        // What a CUSTOM policy's Rego reads besides: every header, the query, this
        // workload's identity.
        let fields = header_map(request.headers)?;
        let query = request
            .path
            .split('#')
            .next()
            .and_then(|p| p.split_once('?'))
            .map(|(_, q)| q);
        let destination = SpiffeId::new(&mesh.trust_domain, &service.namespace, account).ok();
        let attributes = policy::Request {
            source: request.from.as_ref(),
            destination: destination.as_ref(),
            request_principal: request.request_principal,
            jwt_claims: None,
            port: app_port,
            http: http.map(|method| policy::HttpRequest {
                method,
                path,
                query,
                host,
                scheme: "http",
                protocol: "HTTP/1.1",
                header: &header,
                headers: Some(&fields),
            }),
        };
        let decision = policy::authorize(&selected, &attributes);
        let names: Vec<_> = selected
            .iter()
            .map(|p| format!("{} ({:?})", p.id(), p.action()))
            .collect();
        let _ = writeln!(
            out,
            "  policies selecting it: {}",
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        );
        if request.labels.is_empty() {
            let by_labels: Vec<_> = snapshot
                .authorization_policies
                .iter()
                .filter(|p| {
                    (p.namespace == service.namespace || p.namespace == policy::ROOT_NAMESPACE)
                        && p.spec
                            .selector
                            .as_ref()
                            .is_some_and(|s| !s.match_labels.is_empty())
                })
                .map(|p| p.id())
                .collect();
            if !by_labels.is_empty() {
                let _ = writeln!(
                    out,
                    "  not counted (they select by labels; pass the workload's with --label): {}",
                    by_labels.join(", ")
                );
            }
        }
        if http.is_none() {
            for line in http_only_ignored(&snapshot.authorization_policies, &selected) {
                let _ = writeln!(out, "  {line}");
            }
        }
        let verdict = if decision.allowed { "ALLOW" } else { "DENY" };
        let by = match (decision.policy, decision.rule) {
            (Some(policy), Some(rule)) => format!(" by {}, rule {rule}", selected[policy].id()),
            (Some(policy), None) => format!(" by {}", selected[policy].id()),
            (None, _) => String::new(),
        };
        if let Some(rego) = &decision.rego {
            let _ = writeln!(out, "  {}", rego_line(&selected, &decision, rego));
        }
        let _ = writeln!(out, "  decision: {verdict}{by} — {}", decision.reason);
        for &audited in &decision.audited {
            let _ = writeln!(out, "  audited by {}", selected[audited].id());
        }
        all_allowed &= decision.allowed;
    }
    Ok((out, all_allowed))
}

/// What the Rego of the CUSTOM policy that denied (or last allowed) answered.
fn rego_line(
    selected: &[CompiledPolicy],
    decision: &policy::Decision,
    rego: &policy::RegoVerdict,
) -> String {
    let custom = match decision.policy {
        Some(index) if selected[index].action() == policy::Action::Custom => Some(&selected[index]),
        _ => selected
            .iter()
            .rev()
            .find(|p| p.action() == policy::Action::Custom),
    };
    let (id, query) = custom.map_or(("?", "?"), |p| {
        (p.id(), p.rego().map_or("?", policy::CompiledRego::query))
    });
    let answer = if rego.allowed { "allows" } else { "denies" };
    format!("rego: {id} ({query}) {answer} — {}", rego.reason)
}

/// The `--header` pairs as the request's fields.
fn header_map(headers: &[(String, String)]) -> anyhow::Result<http::HeaderMap> {
    let mut fields = http::HeaderMap::new();
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .with_context(|| format!("--header {name}: not a header name"))?;
        let value = http::HeaderValue::from_str(value)
            .with_context(|| format!("--header {name}: not a header value"))?;
        fields.append(name, value);
    }
    Ok(fields)
}

/// The lines that say what `explain` evaluated: protocol and request, caller, port.
fn evaluated(
    request: &Hypothetical<'_>,
    http: Option<&str>,
    path: &str,
    declared: Option<&ServicePort>,
    any_port: bool,
) -> String {
    let mut out = String::new();
    let port = match declared {
        Some(p) if p.port == request.port => {
            format!("port {} (declared {})", p.port, protocol_name(p.protocol))
        }
        Some(p) => format!(
            "port {} (a workload's port for declared port {}, {})",
            request.port,
            p.port,
            protocol_name(p.protocol)
        ),
        None if any_port => format!("port {} (the service declares none: any)", request.port),
        None => format!("port {} (not declared by the service)", request.port),
    };
    let _ = writeln!(out, "evaluated: {} {port}", request.to);
    let caller = match &request.from {
        Some(id) => format!("{id} (mTLS)"),
        None => "a plaintext caller (no identity)".to_string(),
    };
    let _ = writeln!(out, "  from: {caller}");
    match http {
        Some(method) => {
            let host = request.host.unwrap_or(request.to);
            let _ = write!(out, "  as: HTTP {method} {path}, host {host}");
            for (name, value) in request.headers {
                let _ = write!(out, ", header {name}: {value}");
            }
            if let Some(principal) = request.request_principal {
                let _ = write!(out, ", JWT principal {principal}");
            }
            if path != request.path {
                let _ = write!(out, "\n  path as the proxy forwards it: {path}");
            }
        }
        None if request.method.is_some() => {
            let _ = write!(
                out,
                "  as: opaque TCP — the port is declared opaque, so proxies relay its bytes unparsed; --method, --path, --host, --header and --request-principal are not seen"
            );
        }
        None => {
            let _ = write!(
                out,
                "  as: opaque TCP (no --method): no method, path, host, headers or JWT are seen"
            );
            if declared.is_some_and(|p| matches!(p.protocol, Protocol::Http | Protocol::Http2)) {
                let _ = write!(
                    out,
                    "\n  (the port is declared {}: callers' proxies send requests to it; pass --method to explain one)",
                    declared.map_or("", |p| protocol_name(p.protocol))
                );
            }
        }
    }
    out
}

/// The service port through which callers' proxies deliver `port` to the workloads: a
/// port the service declares, or the one a workload serves on `port` (policies see the
/// application port); `None` when no declared port leads there.
fn declared_port(service: &ServiceEntry, port: u16) -> Option<&ServicePort> {
    let mapped = |declared: &&ServicePort| {
        service
            .endpoints
            .iter()
            .any(|e| e.ports.get(&declared.port) == Some(&port))
    };
    let ports = &service.ports;
    ports
        .iter()
        .find(|p| p.port == port)
        .or_else(|| ports.iter().find(mapped))
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Detect => "detect",
        Protocol::Http => "http",
        Protocol::Http2 => "http2",
        Protocol::Opaque => "opaque",
    }
}

/// For opaque TCP: each selected policy's rules whose HTTP-only fields the engine
/// cannot check, and what it does with them (as [`policy::Rule::http_only_fields`]).
fn http_only_ignored(
    policies: &[policy::Named<policy::AuthorizationPolicySpec>],
    selected: &[CompiledPolicy],
) -> Vec<String> {
    let mut lines = Vec::new();
    for compiled in selected {
        let Some(spec) = policies.iter().find(|p| p.id() == compiled.id()) else {
            continue;
        };
        for (index, rule) in spec.spec.rules.iter().enumerate() {
            let fields = rule.http_only_fields();
            if fields.is_empty() {
                continue;
            }
            let effect = match compiled.action() {
                policy::Action::Deny => {
                    "a DENY takes them as matching (the rule matches on its other fields)"
                }
                policy::Action::Custom => {
                    "a CUSTOM takes them as matching (its Rego decides, without request attributes)"
                }
                policy::Action::Allow | policy::Action::Audit => {
                    "the entries naming them do not match a TCP connection"
                }
            };
            lines.push(format!(
                "HTTP-only fields not checkable on TCP: {} rule {index} names {}; {effect}",
                compiled.id(),
                fields.join(", ")
            ));
        }
    }
    lines
}

/// One workload's RED figures, as `tessera stat` shows them: what its proxies served
/// (their inbound series), by the metric labels `destination_workload`,
/// `destination_namespace` and `destination_identity`.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStat {
    /// The workload (its service account).
    pub workload: String,
    pub namespace: String,
    /// Its SPIFFE ID.
    pub identity: String,
    /// Requests served: counters count whole requests.
    pub requests: u64,
    pub success_rate: Option<f64>,
    pub requests_per_second: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests and opaque connections a RateLimitPolicy refused.
    pub rate_limited: u64,
}

/// The proxies connected to a control plane, as `tessera stat --control-plane-admin`
/// reads them.
#[derive(Debug)]
pub struct Connected {
    /// The admin address of each proxy whose admin port the control plane knows.
    pub admins: Vec<String>,
    /// A line for each whose admin port it does not know.
    pub unknown: Vec<String>,
    pub rollout: Rollout,
}

/// Reads `/proxies` and the configuration generation from the control plane whose
/// admin endpoint is `admin`.
pub async fn connected_proxies(admin: &str) -> anyhow::Result<Connected> {
    let body = get(admin, "/proxies")
        .await
        .with_context(|| format!("control plane admin {admin}"))?;
    let proxies: Vec<crate::discovery_service::ConnectedProxy> = serde_json::from_slice(&body)
        .with_context(|| format!("control plane admin {admin}: unexpected answer"))?;
    let metrics = get(admin, "/metrics")
        .await
        .with_context(|| format!("control plane admin {admin}"))?;
    let generation = parse_samples(&String::from_utf8_lossy(&metrics))
        .into_iter()
        .find(|(name, _, _)| name == "tessera_config_generation")
        .map(|(_, _, value)| value as u64)
        .with_context(|| {
            format!("control plane admin {admin}: no tessera_config_generation in /metrics")
        })?;
    let rollout = Rollout::of(generation, &proxies);
    let mut admins = Vec::new();
    let mut unknown = Vec::new();
    for proxy in proxies {
        match proxy.admin {
            Some(address) => admins.push(address.to_string()),
            None => unknown.push(format!(
                "{} at {}: admin port unknown: {}",
                proxy.identity,
                proxy.address,
                proxy.admin_unknown.as_deref().unwrap_or("not reported")
            )),
        }
    }
    admins.sort_unstable();
    admins.dedup();
    if admins.is_empty() {
        bail!(
            "no proxy connected to the control plane at {admin} has an admin port it can be reached at ({} connected)",
            unknown.len()
        );
    }
    Ok(Connected {
        admins,
        unknown,
        rollout,
    })
}

/// How far the control plane's newest configuration has reached: the proxies that
/// have not acknowledged it yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub generation: u64,
    pub proxies: usize,
    /// `identity at address (generation N)` of each proxy behind, sorted.
    pub behind: Vec<String>,
}

impl Rollout {
    pub(crate) fn of(
        generation: u64,
        proxies: &[crate::discovery_service::ConnectedProxy],
    ) -> Self {
        let mut behind: Vec<String> = proxies
            .iter()
            .filter(|proxy| proxy.generation < generation)
            .map(|proxy| {
                format!(
                    "{} at {} (generation {})",
                    proxy.identity, proxy.address, proxy.generation
                )
            })
            .collect();
        behind.sort_unstable();
        Self {
            generation,
            proxies: proxies.len(),
            behind,
        }
    }

    /// How many proxies have acknowledged the generation.
    pub fn in_force(&self) -> usize {
        self.proxies - self.behind.len()
    }

    /// One line, then a line per proxy behind.
    pub fn summary(&self) -> String {
        let mut summary = format!(
            "configuration generation {} in force on {} of {} connected proxies\n",
            self.generation,
            self.in_force(),
            self.proxies
        );
        for proxy in &self.behind {
            let _ = writeln!(summary, "  behind: {proxy}");
        }
        summary
    }
}

/// Reads inbound request metrics from each proxy, twice `window` apart (once when the
/// window is zero: totals since start), and summarises them per workload served.
pub async fn stat(
    proxies: &[String],
    window: std::time::Duration,
) -> anyhow::Result<Vec<ServiceStat>> {
    if window.is_zero() {
        return Ok(Scrape::take(proxies).await?.since(None));
    }
    let before = Scrape::take(proxies).await?;
    tokio::time::sleep(window).await;
    Ok(Scrape::take(proxies).await?.since(Some(&before)))
}

/// The inbound request metrics of a set of proxies at one moment.
pub struct Scrape {
    samples: Vec<Sample>,
    at: std::time::Instant,
}

impl Scrape {
    pub async fn take(proxies: &[String]) -> anyhow::Result<Self> {
        let mut samples = Vec::new();
        for admin in proxies {
            let body = get(admin, "/metrics")
                .await
                .with_context(|| format!("proxy admin {admin}"))?;
            samples.extend(parse_samples(&String::from_utf8_lossy(&body)));
        }
        Ok(Self {
            samples,
            at: std::time::Instant::now(),
        })
    }

    /// Per workload, what was served since `earlier` (rates over the time between
    /// the two), or since the proxies started (no rates).
    pub fn since(&self, earlier: Option<&Scrape>) -> Vec<ServiceStat> {
        let Some(earlier) = earlier else {
            return summarise(&[], &self.samples, None);
        };
        let seconds = self.at.duration_since(earlier.at).as_secs_f64();
        summarise(&earlier.samples, &self.samples, Some(seconds))
    }
}

/// Renders stats as the terminal table.
pub fn stat_table(stats: &[ServiceStat]) -> String {
    let mut out = format!(
        "{:<40} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}\n",
        "WORKLOAD", "SUCCESS", "RPS", "P50", "P95", "P99", "REQUESTS", "LIMITED"
    );
    let percent = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
    let number =
        |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.1}{unit}"));
    for stat in stats {
        let _ = writeln!(
            out,
            "{:<40} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
            format!("{}.{}", stat.workload, stat.namespace),
            percent(stat.success_rate),
            number(stat.requests_per_second, ""),
            number(stat.p50_ms, "ms"),
            number(stat.p95_ms, "ms"),
            number(stat.p99_ms, "ms"),
            stat.requests,
            stat.rate_limited
        );
    }
    out
}

/// A parsed sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let line = line.split(" # {").next()?;
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((name.to_string(), labels, value))
        })
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map_or("", |(_, v)| v.as_str())
}

/// A workload served: (workload, namespace, identity), as the inbound series label it.
type Served = (String, String, String);

fn summarise(before: &[Sample], after: &[Sample], window_seconds: Option<f64>) -> Vec<ServiceStat> {
    use std::collections::BTreeMap;
    // Totals per workload served: (requests, successes, buckets le → count, rate
    // limited).
    type Totals = BTreeMap<Served, (f64, f64, BTreeMap<u64, f64>, f64)>;
    let totals = |samples: &[Sample]| {
        let mut totals: Totals = BTreeMap::new();
        for (name, labels, value) in samples {
            let relevant = match name.as_str() {
                "tessera_requests_total" | "tessera_request_duration_seconds_bucket" => {
                    label(labels, "direction") == "inbound"
                }
                // Only ever inbound.
                "tessera_rate_limited_total" => true,
                _ => false,
            };
            if !relevant {
                continue;
            }
            let served = (
                label(labels, "destination_workload").to_string(),
                label(labels, "destination_namespace").to_string(),
                label(labels, "destination_identity").to_string(),
            );
            let entry = totals.entry(served).or_default();
            match name.as_str() {
                "tessera_requests_total" => {
                    entry.0 += value;
                    let code: u16 = label(labels, "code").parse().unwrap_or(0);
                    let grpc = label(labels, "grpc_status");
                    if code < 500 && (grpc.is_empty() || grpc == "0") {
                        entry.1 += value;
                    }
                }
                "tessera_request_duration_seconds_bucket" => {
                    let le = label(labels, "le");
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::INFINITY)
                    };
                    *entry.2.entry(bound.to_bits()).or_default() += value;
                }
                "tessera_rate_limited_total" => entry.3 += value,
                _ => {}
            }
        }
        totals
    };
    let (before, after) = (totals(before), totals(after));
    after
        .into_iter()
        .map(|(served, (requests, successes, buckets, limited))| {
            let (requests_before, successes_before, buckets_before, limited_before) =
                before.get(&served).cloned().unwrap_or_default();
            let requests = requests - requests_before;
            let successes = successes - successes_before;
            let mut delta: Vec<(f64, f64)> = buckets
                .iter()
                .map(|(bound, count)| {
                    (
                        f64::from_bits(*bound),
                        count - buckets_before.get(bound).copied().unwrap_or(0.0),
                    )
                })
                .collect();
            delta.sort_by(|a, b| a.0.total_cmp(&b.0));
            let quantile = |q| histogram_quantile(q, &delta).map(|s| s * 1000.0);
            let (workload, namespace, identity) = served;
            ServiceStat {
                workload,
                namespace,
                identity,
                // Counters hold whole numbers; a proxy restarted between the scrapes
                // counts from zero again, which reads as nothing served.
                requests: requests.max(0.0).round() as u64,
                success_rate: (requests > 0.0).then(|| successes / requests),
                requests_per_second: window_seconds.map(|w| requests / w),
                p50_ms: quantile(0.5),
                p95_ms: quantile(0.95),
                p99_ms: quantile(0.99),
                rate_limited: (limited - limited_before).max(0.0).round() as u64,
            }
        })
        .collect()
}

/// Prometheus' `histogram_quantile`: linear interpolation inside the bucket that holds
/// the quantile. `buckets` are (upper bound, cumulative count), sorted.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let fraction = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                0.0
            };
            return Some(lower.0 + (bound - lower.0) * fraction);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

/// `tessera inject`: the documents of every source (`-` is stdin) with sidecars added,
/// as one YAML stream, and a line per workload saying what was done. Any failure
/// returns an error and no YAML at all, so nothing half-injected is ever written.
pub fn inject(
    sources: &[PathBuf],
    options: &inject::Options,
) -> anyhow::Result<(String, Vec<String>)> {
    let mut yaml = String::new();
    let mut report = Vec::new();
    for source in sources {
        let label = if source.as_os_str() == "-" {
            "<stdin>".to_string()
        } else {
            source.display().to_string()
        };
        let input = read_source(source).with_context(|| format!("cannot read {label}"))?;
        let injected = inject::manifests::inject_manifests(&input, options)
            .with_context(|| format!("{label}: nothing was written"))?;
        if !yaml.is_empty() {
            if !yaml.ends_with('\n') {
                yaml.push('\n');
            }
            yaml.push_str("---\n");
        }
        yaml.push_str(&injected.yaml);
        for document in injected.reports {
            let done = match document.outcome {
                Outcome::Skipped(SkipReason::NotAWorkload) => continue,
                Outcome::Injected => "injected".to_string(),
                Outcome::Skipped(reason) => format!("skipped: {reason}"),
            };
            report.push(format!("{label}: {}: {done}", document.object));
            // What became of each probe: rewritten through the proxy, or left and why.
            for probe in &document.probes {
                report.push(format!("{label}: {}: {probe}", document.object));
            }
        }
    }
    Ok((yaml, report))
}

fn read_source(source: &Path) -> std::io::Result<String> {
    if source.as_os_str() == "-" {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input)?;
        Ok(input)
    } else {
        std::fs::read_to_string(source)
    }
}

/// A trust domain a SPIFFE ID can be made of.
pub fn parse_trust_domain(text: &str) -> Result<String, String> {
    SpiffeId::control_plane(text)
        .map(|_| text.to_string())
        .map_err(|e| e.to_string())
}

/// `HOST:PORT`, as the proxies will dial the control plane.
pub fn parse_host_port(text: &str) -> Result<String, String> {
    let valid = text.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0)
    });
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not HOST:PORT"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proxies that have not acknowledged the newest generation are named, the others
    /// counted; one ahead of the metric (a reload between the two reads) is not behind.
    #[test]
    fn a_rollout_names_the_proxies_behind() {
        let proxy = |identity: &str, generation: u64| crate::discovery_service::ConnectedProxy {
            identity: format!("spiffe://cluster.local/ns/shop/sa/{identity}"),
            address: "10.0.0.5:40000".parse().unwrap(),
            admin: None,
            admin_unknown: None,
            connected_since: String::new(),
            generation,
        };
        let rollout = Rollout::of(
            7,
            &[
                proxy("web", 7),
                proxy("orders", 5),
                proxy("api", 8),
                proxy("db", 0),
            ],
        );
        assert_eq!(
            rollout.summary(),
            "configuration generation 7 in force on 2 of 4 connected proxies\n  behind: spiffe://cluster.local/ns/shop/sa/db at 10.0.0.5:40000 (generation 0)\n  behind: spiffe://cluster.local/ns/shop/sa/orders at 10.0.0.5:40000 (generation 5)\n"
        );
        assert_eq!(
            Rollout::of(3, &[]).summary(),
            "configuration generation 3 in force on 0 of 0 connected proxies\n"
        );
    }

    fn explain_get(path: &str) -> anyhow::Result<(String, bool)> {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/mesh");
        let frontend: SpiffeId = "spiffe://cluster.local/ns/shop/sa/frontend".parse()?;
        explain(
            &config,
            &Hypothetical {
                from: Some(frontend),
                to: "orders.shop",
                port: 8080,
                method: Some("GET"),
                path,
                host: None,
                headers: &[],
                request_principal: None,
                labels: &BTreeMap::new(),
            },
        )
    }

    /// A configuration directory holding the shipped example plus `cache.shop`: port
    /// 6379 opaque and 8080 http, an ALLOW on GET and a DENY on `/flush` for it.
    fn cache_config() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-explain-{}", rand::random::<u64>()));
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/mesh");
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["mesh.yaml", "services.yaml"] {
            std::fs::copy(example.join(file), dir.join(file)).unwrap();
        }
        std::fs::write(
            dir.join("cache.yaml"),
            "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {name: cache, namespace: shop}\nspec: {ports: [{port: 6379, protocol: opaque}, {port: 8080, protocol: http}]}\n---\n\
             apiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {name: cache-1, namespace: shop}\nspec: {service: cache, serviceAccount: cache, address: '127.0.0.1:16379', ports: {8080: 18080}}\n---\n\
             apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: readers, namespace: shop}\nspec:\n  selector: {serviceAccount: cache}\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n---\n\
             apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-flush, namespace: shop}\nspec:\n  selector: {serviceAccount: cache}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/batch]}}], to: [{operation: {paths: [/flush]}}]}]\n",
        )
        .unwrap();
        dir
    }

    fn explain_cache(from: &str, port: u16, method: Option<&str>) -> (String, bool) {
        let dir = cache_config();
        let explained = explain(
            &dir,
            &Hypothetical {
                from: Some(from.parse().unwrap()),
                to: "cache.shop",
                port,
                method,
                path: "/flush",
                host: None,
                headers: &[],
                request_principal: None,
                labels: &BTreeMap::new(),
            },
        );
        std::fs::remove_dir_all(dir).unwrap();
        explained.unwrap()
    }

    #[test]
    fn explain_shows_the_rego_decision_and_the_rule_that_denied() {
        let dir = cache_config();
        std::fs::write(
            dir.join("opa.yaml"),
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: opa, namespace: shop}\nspec:\n  selector: {serviceAccount: cache}\n  action: CUSTOM\n  rules: [{}]\n  provider:\n    rego:\n      query: data.cache.allow\n      modules:\n      - file: cache.rego\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("cache.rego"),
            "package cache\nimport rego.v1\ndefault allow := false\nallow if input.attributes.request.http.headers[\"x-team\"] == \"ops\"\ndeny contains \"only ops may flush\" if not allow\n",
        )
        .unwrap();
        let explain_as = |team: &str| {
            let headers = [("x-team".to_string(), team.to_string())];
            explain(
                &dir,
                &Hypothetical {
                    from: Some("spiffe://cluster.local/ns/shop/sa/batch".parse().unwrap()),
                    to: "cache.shop",
                    port: 8080,
                    method: Some("GET"),
                    path: "/keys?limit=1",
                    host: None,
                    headers: &headers,
                    request_principal: None,
                    labels: &BTreeMap::new(),
                },
            )
            .unwrap()
        };
        let (denied, allowed) = explain_as("dev");
        assert!(!allowed, "{denied}");
        assert!(
            denied.contains("  rego: shop/opa (data.cache.allow) denies — deny: only ops may flush\n  decision: DENY by shop/opa, rule 0 — denied by a CUSTOM policy"),
            "{denied}"
        );
        let (report, allowed) = explain_as("ops");
        assert!(allowed, "{report}");
        assert!(
            report.contains("  rego: shop/opa (data.cache.allow) allows — data.cache.allow is true\n  decision: ALLOW by shop/readers"),
            "{report}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn explain_echoes_what_it_evaluated() {
        let (report, allowed) = explain_get("/%6Frders/1").unwrap();
        assert!(allowed, "{report}");
        let mut lines = report.lines();
        assert_eq!(
            lines.next(),
            Some("evaluated: orders.shop port 8080 (declared http)")
        );
        assert_eq!(
            lines.next(),
            Some("  from: spiffe://cluster.local/ns/shop/sa/frontend (mTLS)")
        );
        assert_eq!(
            lines.next(),
            Some("  as: HTTP GET /orders/1, host orders.shop")
        );
        assert_eq!(
            lines.next(),
            Some("  path as the proxy forwards it: /orders/1")
        );
        let batch = "spiffe://cluster.local/ns/shop/sa/batch";
        let (report, _) = explain_cache(batch, 6379, None);
        assert!(
            report.starts_with("evaluated: cache.shop port 6379 (declared opaque)\n  from: spiffe://cluster.local/ns/shop/sa/batch (mTLS)\n  as: opaque TCP (no --method)"),
            "{report}"
        );
    }

    /// On an opaque port the ALLOW that names methods does not match, and the DENY on
    /// a path takes it as matching; explain says so, and decides as the engine does.
    #[test]
    fn explain_says_which_http_fields_tcp_cannot_check() {
        let frontend = "spiffe://cluster.local/ns/shop/sa/frontend";
        let (report, allowed) = explain_cache(frontend, 6379, None);
        assert!(!allowed, "{report}");
        assert!(
            report.contains("HTTP-only fields not checkable on TCP: shop/readers rule 0 names to[0].operation.methods; the entries naming them do not match a TCP connection"),
            "{report}"
        );
        assert!(
            report.contains("HTTP-only fields not checkable on TCP: shop/no-flush rule 0 names to[0].operation.paths; a DENY takes them as matching (the rule matches on its other fields)"),
            "{report}"
        );
        assert!(
            report.contains("decision: DENY — no ALLOW policy matched"),
            "{report}"
        );
        let batch = "spiffe://cluster.local/ns/shop/sa/batch";
        let (report, _) = explain_cache(batch, 6379, None);
        assert!(
            report.contains("decision: DENY by shop/no-flush, rule 0"),
            "{report}"
        );
        // --method on an opaque port: the proxies never see it.
        let (report, allowed) = explain_cache(frontend, 6379, Some("GET"));
        assert!(!allowed, "{report}");
        assert!(
            report.contains("as: opaque TCP — the port is declared opaque"),
            "{report}"
        );
        // The same request on the HTTP port is a request, and no field is ignored.
        let (report, allowed) = explain_cache(frontend, 8080, Some("GET"));
        assert!(allowed, "{report}");
        assert!(!report.contains("not checkable"), "{report}");
    }

    #[test]
    fn a_caller_of_another_trust_domain_is_refused_by_the_handshake() {
        let (report, allowed) = explain_cache(
            "spiffe://example.org/ns/shop/sa/frontend",
            8080,
            Some("GET"),
        );
        assert!(!allowed, "{report}");
        assert!(
            report.contains("decision: DENY — refused in the mTLS handshake: the caller belongs to trust domain \"example.org\", the mesh is \"cluster.local\"; no policy runs"),
            "{report}"
        );
        assert!(!report.contains("ALLOW"), "{report}");
    }

    #[test]
    fn a_port_the_service_does_not_declare_is_not_routed() {
        let frontend = "spiffe://cluster.local/ns/shop/sa/frontend";
        // Declared, and served by the workload on another port (a targetPort): the
        // policies see that one; and that port called directly is the same port.
        let (report, allowed) = explain_cache(frontend, 8080, Some("GET"));
        assert!(allowed, "{report}");
        assert!(
            report.contains("workload sa/cache (application port 18080):"),
            "{report}"
        );
        let (report, allowed) = explain_cache(frontend, 18080, Some("GET"));
        assert!(allowed, "{report}");
        assert!(
            report.contains("port 18080 (a workload's port for declared port 8080, http)"),
            "{report}"
        );
        let (report, allowed) = explain_cache(frontend, 9999, Some("GET"));
        assert!(!allowed, "{report}");
        assert!(
            report.contains("port 9999 (not declared by the service)"),
            "{report}"
        );
        assert!(
            report.contains("decision: NOT ROUTED — cache.shop declares port(s) 6379/opaque, 8080/http, not 9999"),
            "{report}"
        );
    }

    #[test]
    fn a_service_named_without_its_namespace_gets_a_hint() {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/mesh");
        let request = Hypothetical {
            from: None,
            to: "orders",
            port: 8080,
            method: Some("GET"),
            path: "/",
            host: None,
            headers: &[],
            request_principal: None,
            labels: &BTreeMap::new(),
        };
        let error = explain(&config, &request).unwrap_err().to_string();
        assert!(error.ends_with("(did you mean orders.shop?)"), "{error}");
    }

    #[test]
    fn explain_decides_on_the_path_the_proxy_forwards() {
        // The example configuration denies `/admin*` in namespace shop.
        for path in [
            "/admin",
            "/%61dmin",
            "//x/../admin?debug=1",
            "/ADMIN/../admin",
        ] {
            let (report, allowed) = explain_get(path).unwrap();
            assert!(!allowed, "{path}: {report}");
            assert!(report.contains("DENY by shop/no-admin"), "{path}: {report}");
        }
        let (report, _) = explain_get("/%61dmin").unwrap();
        assert!(
            report.contains("path as the proxy forwards it: /admin"),
            "{report}"
        );
        let (report, allowed) = explain_get("/orders/1").unwrap();
        assert!(allowed, "{report}");
    }

    #[test]
    fn explain_refuses_a_path_the_proxy_refuses() {
        for path in ["/%%36%31dmin", "/admin%2Fx", "/a%00"] {
            let error = explain_get(path).unwrap_err();
            let refused = error.downcast_ref::<RefusedPath>();
            assert!(refused.is_some(), "{path}: {error:#}");
        }
        assert_eq!(forwarded_path("/é//a?x=%zz").unwrap(), "/%C3%A9/a");
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let buckets = [
            (0.01, 10.0),
            (0.02, 90.0),
            (0.05, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(histogram_quantile(0.1, &buckets), Some(0.01));
        let p50 = histogram_quantile(0.5, &buckets).unwrap();
        assert!((p50 - 0.015).abs() < 1e-9, "{p50}");
        let p95 = histogram_quantile(0.95, &buckets).unwrap();
        assert!((p95 - 0.035).abs() < 1e-9, "{p95}");
        assert_eq!(histogram_quantile(0.5, &[]), None);
    }

    /// A sample line of a proxy of `destination` (a workload of namespace shop).
    fn served(name: &str, direction: &str, destination: &str, rest: &str, value: u32) -> String {
        format!(
            "{name}{{direction=\"{direction}\",source_workload=\"web\",source_namespace=\"shop\",\
             source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",\
             destination_workload=\"{destination}\",destination_namespace=\"shop\",\
             destination_identity=\"spiffe://cluster.local/ns/shop/sa/{destination}\",\
             destination_service=\"\",security=\"mtls\",{rest}}} {value}\n"
        )
    }

    #[test]
    fn summarises_inbound_requests_per_workload() {
        let requests = "tessera_requests_total";
        let buckets = "tessera_request_duration_seconds_bucket";
        let text = [
            served(
                requests,
                "inbound",
                "orders",
                "code_class=\"2xx\",code=\"200\",grpc_status=\"\"",
                8,
            ),
            served(
                requests,
                "inbound",
                "orders",
                "code_class=\"5xx\",code=\"503\",grpc_status=\"\"",
                2,
            ),
            served(
                requests,
                "inbound",
                "orders",
                "code_class=\"2xx\",code=\"200\",grpc_status=\"14\"",
                1,
            ),
            // The client's view of the same edge is not counted twice.
            served(
                requests,
                "outbound",
                "orders",
                "code_class=\"2xx\",code=\"200\",grpc_status=\"\"",
                99,
            ),
            served(
                requests,
                "inbound",
                "cache",
                "code_class=\"2xx\",code=\"200\",grpc_status=\"\"",
                5,
            ),
            served(
                buckets,
                "inbound",
                "orders",
                "code_class=\"2xx\",le=\"0.01\"",
                9,
            )
            .replace('\n', " # {trace_id=\"t\"} 0.004\n"),
            served(
                buckets,
                "inbound",
                "orders",
                "code_class=\"2xx\",le=\"+Inf\"",
                9,
            ),
            served(
                buckets,
                "inbound",
                "orders",
                "code_class=\"5xx\",le=\"0.01\"",
                2,
            ),
            served(
                buckets,
                "inbound",
                "orders",
                "code_class=\"5xx\",le=\"+Inf\"",
                2,
            ),
        ]
        .concat()
            + "tessera_rate_limited_total{destination_workload=\"orders\",destination_namespace=\"shop\",\
               destination_identity=\"spiffe://cluster.local/ns/shop/sa/orders\",policy=\"shop/api\",\
               limit=\"per-caller\"} 3\n";
        let stats = summarise(&[], &parse_samples(&text), None);
        assert_eq!(stats.len(), 2, "{stats:?}");
        let orders = stats.iter().find(|s| s.workload == "orders").unwrap();
        assert_eq!(orders.namespace, "shop");
        assert_eq!(orders.identity, "spiffe://cluster.local/ns/shop/sa/orders");
        assert_eq!(orders.requests, 11);
        // 503 and gRPC UNAVAILABLE are failures.
        assert_eq!(orders.success_rate, Some(8.0 / 11.0));
        assert!(orders.p99_ms.unwrap() <= 10.0);
        let json = serde_json::to_value(orders).unwrap();
        assert_eq!(
            json["requests"],
            serde_json::json!(11),
            "an integer: {json}"
        );
        assert!(json["requests"].is_u64(), "{json}");
        assert_eq!(json["rateLimited"], serde_json::json!(3), "{json}");
        let cache = stats.iter().find(|s| s.workload == "cache").unwrap();
        assert_eq!(cache.rate_limited, 0);
        let table = stat_table(&stats);
        assert!(table.contains("LIMITED"), "{table}");
        assert!(table.contains("orders.shop"), "{table}");
        assert!(table.contains("cache.shop"), "{table}");
    }

    #[test]
    fn a_window_counts_what_was_served_in_it() {
        let text = |count| {
            served(
                "tessera_requests_total",
                "inbound",
                "orders",
                "code_class=\"2xx\",code=\"200\",grpc_status=\"\"",
                count,
            )
        };
        let stats = summarise(
            &parse_samples(&text(40)),
            &parse_samples(&text(100)),
            Some(2.0),
        );
        assert_eq!(stats[0].requests, 60);
        assert_eq!(stats[0].requests_per_second, Some(30.0));
    }
}
