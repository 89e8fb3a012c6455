//! Operator commands that read the mesh rather than run it: `tessera check migration`
//! (who still sends plaintext, and would STRICT break them) and `tessera policy explain`
//! (the decision for one hypothetical request, from the same engine the proxies run).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tessera_proto::SpiffeId;
use tessera_proto::policy::{self, MtlsMode, WorkloadRef};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MigrationReport {
    workload: String,
    ports: Vec<PortReport>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortReport {
    application_port: u16,
    mode: String,
    mode_policy: Option<String>,
    mtls: Vec<SourceReport>,
    plaintext: Vec<SourceReport>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceReport {
    source: String,
    connections: u64,
    last_seen_seconds_ago: u64,
}

/// Reads `/migration` from each proxy's admin endpoint and reports, per workload and
/// port, who still sends plaintext and whether STRICT would break an observed flow.
pub async fn check_migration(proxies: &[SocketAddr]) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut breaking = 0;
    for admin in proxies {
        let body = get(*admin, "/migration")
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
    Ok(out)
}

async fn get(address: SocketAddr, path: &str) -> anyhow::Result<bytes::Bytes> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, address.to_string())
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
}

/// Explains the decision for `request` from the configuration in `config_dir`; returns
/// the report and whether the request would be allowed.
pub fn explain(config_dir: &Path, request: &Hypothetical<'_>) -> anyhow::Result<(String, bool)> {
    let mesh = crate::app::load_mesh_config(config_dir)?;
    let snapshot = crate::config::load_snapshot(config_dir, &mesh.trust_domain)?;
    let service = snapshot
        .services
        .iter()
        .find(|s| s.key() == request.to)
        .with_context(|| format!("no service {} in {}", request.to, config_dir.display()))?;
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
    let mut all_allowed = true;
    for account in accounts {
        let workload = WorkloadRef {
            namespace: &service.namespace,
            service_account: account,
        };
        let _ = writeln!(
            out,
            "{} → {} (workload sa/{account}), port {}",
            request
                .from
                .as_ref()
                .map_or("plaintext caller".into(), ToString::to_string),
            request.to,
            request.port
        );
        let (mode, by) = policy::mtls_mode(&snapshot.peer_authentications, workload, request.port);
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
        let selected: Vec<_> = snapshot
            .authorization_policies
            .iter()
            .filter(|p| policy::selects(&p.namespace, p.spec.selector.as_ref(), workload))
            .collect();
        let headers = request.headers;
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let host = request.host.unwrap_or(request.to);
        let attributes = policy::Request {
            source: request.from.as_ref(),
            request_principal: request.request_principal,
            port: request.port,
            http: request.method.map(|method| policy::HttpRequest {
                method,
                path: request.path,
                host,
                header: &header,
            }),
        };
        let decision = policy::authorize(&selected, &attributes);
        let names: Vec<_> = selected
            .iter()
            .map(|p| format!("{} ({:?})", p.id(), p.spec.action))
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
        let verdict = if decision.allowed { "ALLOW" } else { "DENY" };
        let by = match (&decision.policy, decision.rule) {
            (Some(policy), Some(rule)) => format!(" by {policy}, rule {rule}"),
            _ => String::new(),
        };
        let _ = writeln!(out, "  decision: {verdict}{by} — {}", decision.reason);
        for audited in &decision.audited {
            let _ = writeln!(out, "  audited by {audited}");
        }
        all_allowed &= decision.allowed;
    }
    Ok((out, all_allowed))
}
