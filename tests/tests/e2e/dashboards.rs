//! The Grafana dashboards (deploy/grafana/) and alerting rules (deploy/prometheus/)
//! against the real Prometheus 3: promtool checks the rules and runs their unit tests;
//! then a control plane and five proxies under demo-like load (a caller, a middle tier
//! with retries to a flaky replica, plaintext callers, a denied path, a refused
//! connection, a proxy with a forged token) are scraped, and every PromQL expression of
//! every dashboard panel, template variable and alerting rule must parse, and every
//! series selector and `by (…)` label in it must match series. Dashboard expressions
//! must return series themselves; each alert's condition must name exactly what the
//! test broke: an intermediate expiring in 12 h, the forged proxy, the workloads serving
//! 5xx, and finally the control plane, stopped (seen by Prometheus and by every proxy).
//!
//! Prometheus and promtool: `tests/telemetry/bin/`, as `tests/telemetry/build.sh` builds
//! them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{Http1Client, resource, service_config};
use tessera_tests::telemetry;
use tessera_tests::{
    ControlPlane, Extra, Proxy, TempDir, Upstream, binary, free_port, local, spiffe,
};

/// What the template variables are set to: a workload that both serves and calls.
const NAMESPACE: &str = "shop";
const WORKLOAD: &str = "frontend";
/// Grafana's `$__rate_interval` at a 1 s scrape interval, long enough for a few scrapes.
const RATE_INTERVAL: &str = "20s";

/// Alert conditions that stay empty while the load runs, and why. Every other alert is
/// provoked by the load and must name exactly what it broke.
const QUIET: [(&str, &str); 1] = [(
    "TesseraControlPlaneDown",
    "the control plane is up; the test stops it afterwards and then it must fire",
)];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

fn promtool(promtool: &Path, args: &[&str], dir: &Path) -> (bool, String) {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn promtool_checks_and_unit_tests_the_alerting_rules() {
    let Some(binary) = telemetry::tool("promtool") else {
        return;
    };
    let rules = repo_root().join("deploy/prometheus");
    let (ok, output) = promtool(&binary, &["check", "rules", "tessera-rules.yaml"], &rules);
    println!("{output}");
    assert!(ok, "promtool check rules:\n{output}");
    let (ok, output) = promtool(
        &binary,
        &["test", "rules", "tessera-rules.test.yaml"],
        &rules,
    );
    println!("{output}");
    assert!(ok, "promtool test rules:\n{output}");

    // The same commands refuse a rule that does not parse, and a unit test that expects
    // what the rule does not do: a failure here cannot pass unnoticed.
    let scratch = TempDir::new("promtool");
    std::fs::write(
        scratch.path().join("broken.yaml"),
        "groups:\n  - name: broken\n    rules:\n      - alert: Broken\n        expr: sum(rate(tessera_requests_total[5m])\n",
    )
    .unwrap();
    let (ok, output) = promtool(&binary, &["check", "rules", "broken.yaml"], scratch.path());
    assert!(!ok, "a broken rule passed promtool check rules:\n{output}");
    let original = std::fs::read_to_string(rules.join("tessera-rules.test.yaml")).unwrap();
    std::fs::copy(
        rules.join("tessera-rules.yaml"),
        scratch.path().join("tessera-rules.yaml"),
    )
    .unwrap();
    let wrong = original.replace(
        "summary: \"Tessera CA intermediate certificate expires in 12h 0m 0s\"",
        "summary: \"Tessera CA intermediate certificate expires in 11h 0m 0s\"",
    );
    assert_ne!(wrong, original, "the test file changed: update this check");
    std::fs::write(scratch.path().join("wrong.test.yaml"), wrong).unwrap();
    let (ok, output) = promtool(
        &binary,
        &["test", "rules", "wrong.test.yaml"],
        scratch.path(),
    );
    assert!(
        !ok,
        "a wrong expectation passed promtool test rules:\n{output}"
    );
}

/// Prometheus 3 scraping the mesh every second and evaluating the alerting rules.
struct Prometheus(telemetry::Prometheus);

impl Prometheus {
    async fn start(jobs: &[(&str, Vec<SocketAddr>)]) -> Option<Self> {
        let rules = repo_root().join("deploy/prometheus/tessera-rules.yaml");
        telemetry::Prometheus::start_with_rules(jobs, &[rules])
            .await
            .map(Self)
    }

    /// The `data` of an API answer, or Prometheus' error.
    async fn api(&self, path: &str, promql: &str) -> Result<Value, String> {
        self.0
            .api(&format!("{path}?query={}", telemetry::encode(promql)))
            .await
            .map_err(|error| format!("{error:#}"))
    }

    /// An instant query's result.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/query", promql).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Prometheus' own parse tree of `promql`.
    async fn parse(&self, promql: &str) -> Result<Value, String> {
        self.api("/api/v1/parse_query", promql).await
    }

    /// Whether `selector` (as `{…}`), with `extra` matchers added, matches any series.
    async fn matches(&self, selector: &str, extra: &str) -> bool {
        let selector = match extra {
            "" => selector.to_string(),
            extra => format!("{},{extra}}}", selector.trim_end_matches('}')),
        };
        let matched = self.query(&format!("count({selector})")).await;
        matches!(matched, Ok(series) if !series.is_empty())
    }
}

/// The labels an expression aggregates by (`sum by (l)`), each with the selectors under
/// that aggregation, one of which must carry it: grouping by a label no series carries
/// yields one series without it, so only this check catches a misspelt label there.
/// Labels made by `label_replace` are left out.
fn groupings(tree: &Value) -> Vec<(Vec<String>, String)> {
    let mut made = Vec::new();
    collect_replaced_labels(tree, &mut made);
    let mut aggregations = Vec::new();
    collect_aggregations(tree, &mut aggregations);
    let mut pairs = Vec::new();
    for aggregation in aggregations {
        if aggregation["without"] == true {
            continue;
        }
        let mut selectors = Vec::new();
        collect_selectors(&aggregation["expr"], &mut selectors);
        for label in aggregation["grouping"].as_array().into_iter().flatten() {
            let label = label.as_str().unwrap_or_default();
            if made.iter().any(|m| m == label) {
                continue;
            }
            pairs.push((selectors.clone(), label.to_string()));
        }
    }
    pairs.sort();
    pairs.dedup();
    pairs
}

fn collect_aggregations<'a>(node: &'a Value, found: &mut Vec<&'a Value>) {
    match node {
        Value::Object(fields) => {
            if node["type"] == "aggregation" {
                found.push(node);
            }
            fields.values().for_each(|v| collect_aggregations(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_aggregations(v, found)),
        _ => {}
    }
}

fn collect_replaced_labels(node: &Value, found: &mut Vec<String>) {
    match node {
        Value::Object(fields) => {
            if node["type"] == "call"
                && node["func"]["name"] == "label_replace"
                && let Some(label) = node["args"][1]["val"].as_str()
            {
                found.push(label.to_string());
            }
            fields
                .values()
                .for_each(|v| collect_replaced_labels(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_replaced_labels(v, found)),
        _ => {}
    }
}

fn collect_selectors(node: &Value, found: &mut Vec<String>) {
    match node {
        Value::Object(fields) => {
            if let Some(Value::Array(matchers)) = fields.get("matchers") {
                let terms: Vec<String> = matchers
                    .iter()
                    .map(|m| {
                        format!(
                            "{}{}{}",
                            m["name"].as_str().unwrap_or_default(),
                            m["type"].as_str().unwrap_or_default(),
                            // A JSON string is a valid PromQL string.
                            m["value"]
                        )
                    })
                    .collect();
                found.push(format!("{{{}}}", terms.join(",")));
            }
            fields.values().for_each(|v| collect_selectors(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_selectors(v, found)),
        _ => {}
    }
}

/// One PromQL expression of a dashboard or rule file, and where it comes from.
struct Expression {
    origin: String,
    promql: String,
    /// Must return series (all but the quiet alerts).
    must_return_series: bool,
    /// A template variable's query: the label its values come from, and the value the
    /// test sets it to, which must be among them.
    variable: Option<(String, String)>,
    /// A provoked alert: the label that says what fires, and exactly its values.
    fires_for: Option<(String, Vec<String>)>,
}

/// Grafana's template variables set as an operator would set them.
fn substitute(promql: &str) -> String {
    promql
        .replace("${datasource}", "")
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("${namespace}", NAMESPACE)
        .replace("$namespace", NAMESPACE)
        .replace("${workload}", WORKLOAD)
        .replace("$workload", WORKLOAD)
}

/// Every panel query and template variable query of a dashboard.
fn dashboard_expressions(file: &str, dashboard: &Value) -> Vec<Expression> {
    let mut found = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    // Rows may hold their panels when collapsed.
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            // Imported as is, each query runs on the data source the importer picks.
            for datasource in [&panel["datasource"], &target["datasource"]] {
                assert_eq!(
                    datasource["uid"], "${datasource}",
                    "{file}: panel {}",
                    panel["title"]
                );
            }
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.is_empty(),
                "{file}: panel {} has no expr",
                panel["title"]
            );
            found.push(Expression {
                origin: format!("{file}: panel {} ({})", panel["title"], target["refId"]),
                promql: expr.to_string(),
                must_return_series: true,
                variable: None,
                fires_for: None,
            });
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert!(
            variable["type"] != "query" || variable["datasource"]["uid"] == "${datasource}",
            "{file}: variable {} must use the datasource variable",
            variable["name"]
        );
        if variable["type"] != "query" {
            continue;
        }
        let name = variable["name"].as_str().unwrap_or_default().to_string();
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or_default();
        let (promql, label) = variable_query(query)
            .unwrap_or_else(|| panic!("{file}: variable {name}: unknown query form {query}"));
        // query_result gives whole series; the regex picks the label's value out.
        let regex = variable["regex"].as_str().unwrap_or_default();
        assert!(
            !query.starts_with("query_result(") || regex.contains(&format!("{label}=\"")),
            "{file}: variable {name}: regex {regex:?} does not read label {label}"
        );
        found.push(Expression {
            origin: format!("{file}: variable {name}"),
            promql,
            must_return_series: true,
            variable: Some((
                label,
                match name.as_str() {
                    "namespace" => NAMESPACE.to_string(),
                    "workload" => WORKLOAD.to_string(),
                    other => panic!("{file}: no test value for variable {other}"),
                },
            )),
            fires_for: None,
        });
    }
    found
}

/// A variable query as PromQL and the label its values are read from:
/// `query_result(EXPR)` (values taken by the variable's regex `/label="…"/`) or
/// `label_values(EXPR, label)`.
fn variable_query(query: &str) -> Option<(String, String)> {
    if let Some(inner) = query
        .strip_prefix("query_result(")
        .and_then(|q| q.strip_suffix(')'))
    {
        let label = inner.split("group by (").nth(1)?.split(')').next()?;
        return Some((inner.to_string(), label.trim().to_string()));
    }
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))?;
    let (selector, label) = inner.rsplit_once(',')?;
    let label = label.trim();
    Some((
        format!("group by ({label}) ({selector})"),
        label.to_string(),
    ))
}

/// The load, until `stop`: callers through `web` to `frontend`, `frontend` to the two
/// `backend` replicas (one flaky, so retries and 5xx), a denied path, plaintext callers
/// straight to frontend's PERMISSIVE port, and connections to an impostor refused.
async fn drive(
    stop: Arc<AtomicBool>,
    web_entry: SocketAddr,
    frontend_entry: SocketAddr,
    frontend_inbound: SocketAddr,
    impostor_entry: SocketAddr,
) {
    // One kept-alive connection each, asking for /flaky, and for `every_tenth` one
    // request in ten (/admin is denied).
    let mut workers = Vec::new();
    for (entry, every_tenth) in [
        (web_entry, "/"),
        (frontend_entry, "/admin/users"),
        (frontend_entry, "/flaky"),
        (frontend_inbound, "/"),
    ] {
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut client = None;
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if client.as_ref().is_none_or(|c: &Http1Client| !c.is_open()) {
                    client = Http1Client::connect(entry).await.ok();
                }
                let path = if sent.is_multiple_of(10) {
                    every_tenth
                } else {
                    "/flaky"
                };
                if let Some(c) = client.as_mut()
                    && c.get(path).await.is_err()
                {
                    client = None;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let refused = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(mut c) = Http1Client::connect(impostor_entry).await {
                    let _ = tokio::time::timeout(Duration::from_secs(2), c.get("/")).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    for worker in workers {
        let _ = worker.await;
    }
    let _ = refused.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_and_rule_expression_returns_series() {
    if telemetry::tool("prometheus").is_none() {
        return;
    }
    tessera_tests::init();
    // A plug-in CA from `tessera ca create`, so that both CA expiry series exist; its
    // intermediate expires in 12 h, which the CA expiry alert must catch.
    let pki = TempDir::new("pki");
    let plugin = pki.path().join("cacerts");
    let output = Command::new(binary("tessera"))
        .args(["ca", "create", "--intermediate-validity", "12h", "--out"])
        .arg(&plugin)
        .arg("--root-dir")
        .arg(pki.path().join("root"))
        .output()
        .expect("run tessera ca create");
    assert!(output.status.success(), "{output:?}");
    let mut control_plane = ControlPlane::start(
        "24h",
        &format!(
            "  certificateAuthority:\n    pluginCertsDir: {}\n",
            plugin.display()
        ),
    )
    .await;

    // backend.shop: two replicas, one failing 30 % of /flaky (retried); frontend.shop
    // in front of it, PERMISSIVE so unmeshed callers reach it in plaintext; /admin
    // denied in the whole namespace.
    let steady = HttpBackend::start("backend-steady").await;
    let flaky = HttpBackend::start("backend-flaky").await;
    flaky.behaviour.failure_percent.store(30, Ordering::SeqCst);
    flaky.behaviour.delay_ms.store(3, Ordering::SeqCst);
    flaky.behaviour.jitter_ms.store(5, Ordering::SeqCst);
    let frontend_app = HttpBackend::start("frontend").await;
    frontend_app
        .behaviour
        .failure_percent
        .store(5, Ordering::SeqCst);
    let backend_ports = [free_port(), free_port()];
    let frontend_port = free_port();
    let config = [
        service_config(
            "http",
            &backend_ports,
            Some("  retries:\n    attempts: 3\n    budget: {ratio: 0.5, minPerSecond: 20}\n"),
        ),
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: frontend, namespace: shop}}\nspec:\n  ports: [{{port: 8080, protocol: http}}]\n---\napiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {{name: frontend-0, namespace: shop}}\nspec: {{service: frontend, serviceAccount: frontend, address: \"127.0.0.1:{frontend_port}\"}}\n"
        ),
        resource(
            "PeerAuthentication",
            "frontend",
            "  selector: {serviceAccount: frontend}\n  mtls: {mode: PERMISSIVE}\n",
        ),
        resource(
            "AuthorizationPolicy",
            "no-admin",
            "  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/admin*\"]}}]\n",
        ),
    ]
    .join("---\n");
    control_plane.write_config("mesh-services.yaml", &config);
    control_plane
        .process
        .logs
        .wait_for(&["configuration updated"], Duration::from_secs(10))
        .await
        .expect("the control plane takes the configuration");

    let backends: Vec<Proxy> = [&steady, &flaky]
        .iter()
        .zip(backend_ports)
        .map(|(app, port)| control_plane.workload_proxy("backend", app.address, port))
        .collect();
    let frontend = Proxy::launch(
        &control_plane.address(),
        &control_plane.trust_bundle_file(),
        WORKLOAD,
        &control_plane.token(WORKLOAD, "10m"),
        Some((frontend_app.address, frontend_port)),
        &[
            Upstream::service("backend.shop"),
            // Expects payments, reaches a backend: refused as an unexpected identity.
            Upstream::fixed(local(backend_ports[0]), spiffe("payments")),
        ],
        Extra::default(),
    );
    let web = control_plane.proxy("web", None, &[Upstream::service("frontend.shop")]);
    for proxy in backends.iter().chain([&frontend, &web]) {
        proxy
            .wait_ready(Duration::from_secs(20))
            .await
            .expect("proxy ready");
    }
    // A proxy whose join token is forged: refused by the CA, never connected.
    let forged = Proxy::launch(
        &control_plane.address(),
        &control_plane.trust_bundle_file(),
        "intruder",
        "forged-token",
        None,
        &[],
        Extra::default(),
    );

    let proxies: Vec<SocketAddr> = backends
        .iter()
        .chain([&frontend, &web, &forged])
        .map(|p| local(p.admin_port))
        .collect();
    let Some(prometheus) = Prometheus::start(&[
        (
            "tessera-control-plane",
            vec![local(control_plane.admin_port)],
        ),
        ("tessera-proxy", proxies),
    ])
    .await
    else {
        return;
    };

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(drive(
        stop.clone(),
        web.outbound(0),
        frontend.outbound(0),
        frontend.inbound(),
        frontend.outbound(1),
    ));
    // A configuration change during the load (push latency observed) and one refused.
    tokio::time::sleep(Duration::from_secs(5)).await;
    control_plane.write_config(
        "readers.yaml",
        &resource(
            "AuthorizationPolicy",
            "audit-backend",
            "  selector: {serviceAccount: backend}\n  action: AUDIT\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
        ),
    );
    let logs = &control_plane.process.logs;
    assert!(
        tessera_tests::eventually(Duration::from_secs(10), || {
            logs.count(&["configuration updated"]) >= 2
        })
        .await,
        "the policy is taken"
    );
    control_plane.write_config("broken.yaml", "kind: [unclosed\n");
    logs.wait_for(&["configuration refused"], Duration::from_secs(10))
        .await
        .expect("the broken file is refused");
    std::fs::remove_file(control_plane.config_dir().join("broken.yaml")).unwrap();
    // Enough scrapes for rates over RATE_INTERVAL.
    tokio::time::sleep(Duration::from_secs(20)).await;

    let mut expressions = Vec::new();
    let grafana = repo_root().join("deploy/grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&grafana)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(dashboard["schemaVersion"].as_u64() >= Some(39), "{name}");
        expressions.extend(dashboard_expressions(&name, &dashboard));
    }
    // What the load breaks, as the provoked alerts must name it.
    let forged_instance = vec![local(forged.admin_port).to_string()];
    let provoked = [
        (
            "TesseraCACertificateExpiringSoon",
            "certificate",
            vec!["intermediate".to_string()],
        ),
        // Not the others: their certificates, cut to the intermediate's 12 h, have more
        // than 6 h left.
        (
            "TesseraWorkloadCertificateNotRenewed",
            "instance",
            forged_instance.clone(),
        ),
        (
            "TesseraCertificateRenewalsFailing",
            "instance",
            forged_instance.clone(),
        ),
        (
            "TesseraProxyDisconnectedFromControlPlane",
            "instance",
            forged_instance,
        ),
        // The flaky replica, and the frontend app's own 5 %, at well over 1 request/s.
        (
            "TesseraSuccessRateBelowSLO",
            "destination_workload",
            vec!["backend".to_string(), "frontend".to_string()],
        ),
    ];
    // The rules as Prometheus loaded them: each evaluated without error.
    let groups = prometheus
        .api("/api/v1/rules", "")
        .await
        .expect("rules API")["groups"]
        .clone();
    let mut alerts = 0;
    let mut rule_queries = std::collections::HashMap::new();
    for rule in groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        let name = rule["name"].as_str().unwrap_or_default();
        assert_eq!(rule["health"], "ok", "rule {name}: {rule}");
        alerts += 1;
        rule_queries.insert(name.to_string(), rule["query"].as_str().unwrap_or_default());
        let quiet = QUIET.iter().any(|(alert, _)| *alert == name);
        let fires_for = provoked
            .iter()
            .find(|(alert, _, _)| *alert == name)
            .map(|(_, label, values)| (label.to_string(), values.clone()));
        assert!(
            quiet != fires_for.is_some(),
            "alert {name}: say whether the load provokes it"
        );
        expressions.push(Expression {
            origin: format!("tessera-rules.yaml: alert {name}"),
            promql: rule["query"].as_str().unwrap_or_default().to_string(),
            must_return_series: !quiet,
            variable: None,
            fires_for,
        });
    }
    assert_eq!(alerts, QUIET.len() + provoked.len(), "an alert is missing");

    let mut failures = Vec::new();
    for expression in &expressions {
        let promql = substitute(&expression.promql);
        if let Some(at) = promql.find('$').filter(|at| {
            promql[at + 1..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '{')
        }) {
            failures.push(format!(
                "{}: unknown template variable at {}",
                expression.origin,
                &promql[at..]
            ));
            continue;
        }
        let result = match prometheus.query(&promql).await {
            Ok(result) => result,
            Err(error) => {
                failures.push(format!("{}: {error}\n  {promql}", expression.origin));
                continue;
            }
        };
        match prometheus.parse(&promql).await {
            Ok(tree) => {
                let mut selectors = Vec::new();
                collect_selectors(&tree, &mut selectors);
                selectors.sort();
                selectors.dedup();
                for selector in selectors {
                    if !prometheus.matches(&selector, "").await {
                        failures.push(format!(
                            "{}: selector {selector} matches no series",
                            expression.origin
                        ));
                    }
                }
                for (selectors, label) in groupings(&tree) {
                    let mut carried = false;
                    for selector in &selectors {
                        carried |= prometheus
                            .matches(selector, &format!("{label}!=\"\""))
                            .await;
                    }
                    if !carried {
                        failures.push(format!(
                            "{}: it groups by {label}, which no series of {} carries",
                            expression.origin,
                            selectors.join(" or ")
                        ));
                    }
                }
            }
            Err(error) => failures.push(format!("{}: parse: {error}", expression.origin)),
        }
        if result.is_empty() && expression.must_return_series {
            failures.push(format!("{}: no series\n  {promql}", expression.origin));
        }
        if !expression.must_return_series && !result.is_empty() {
            failures.push(format!(
                "{}: listed as quiet, but fires: {result:?}",
                expression.origin
            ));
        }
        if let Some((label, expected)) = &expression.fires_for {
            let mut firing: Vec<String> = result
                .iter()
                .map(|series| {
                    series["metric"][label.as_str()]
                        .as_str()
                        .unwrap_or_default()
                })
                .map(str::to_string)
                .collect();
            firing.sort();
            if firing != *expected {
                failures.push(format!(
                    "{}: fires for {label} {firing:?}, not {expected:?}",
                    expression.origin
                ));
            }
        }
        if let Some((label, value)) = &expression.variable {
            let values: Vec<&str> = result
                .iter()
                .filter_map(|series| series["metric"][label.as_str()].as_str())
                .collect();
            if !values.contains(&value.as_str()) {
                failures.push(format!(
                    "{}: values {values:?} lack {value}",
                    expression.origin
                ));
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = load.await;
    println!(
        "{} expressions checked ({} from dashboards and variables, {alerts} alerts)",
        expressions.len(),
        expressions.len() - alerts
    );
    for (alert, reason) in QUIET {
        println!("quiet while the load ran, as it should be: {alert} ({reason})");
    }
    assert!(
        failures.is_empty(),
        "{} failures in {} expressions:\n{}",
        failures.len(),
        expressions.len(),
        failures.join("\n")
    );

    // The checker is not vacuous: Prometheus refuses what does not parse, and a
    // selector on a label no series has matches nothing.
    assert!(
        prometheus
            .query("sum(rate(tessera_requests_total[1m])")
            .await
            .is_err()
    );
    assert!(
        prometheus
            .query("count(tessera_requests_total{destination=\"backend.shop\"})")
            .await
            .unwrap()
            .is_empty(),
        "old label `destination` still exported"
    );

    // The control plane stops: both "unreachable" alerts must see it, the one on
    // Prometheus' own target and the one on every proxy's discovery stream.
    control_plane.kill();
    let mut all_proxies: Vec<String> = backends
        .iter()
        .chain([&frontend, &web, &forged])
        .map(|p| local(p.admin_port).to_string())
        .collect();
    all_proxies.sort();
    let down = substitute(rule_queries["TesseraControlPlaneDown"]);
    let disconnected = substitute(rule_queries["TesseraProxyDisconnectedFromControlPlane"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let down_series = prometheus.query(&down).await.unwrap();
        let mut cut_off: Vec<String> = prometheus
            .query(&disconnected)
            .await
            .unwrap()
            .iter()
            .filter_map(|series| series["metric"]["instance"].as_str().map(str::to_string))
            .collect();
        cut_off.sort();
        if down_series.len() == 1 && cut_off == all_proxies {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "control plane stopped 20 s ago: {down} gives {down_series:?}; proxies cut off {cut_off:?}, not {all_proxies:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
