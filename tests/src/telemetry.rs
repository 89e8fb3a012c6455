//! The observability tools users run beside a mesh, run by the tests as users run them:
//! Jaeger v2 all-in-one (in-memory storage), an OpenTelemetry Collector and Prometheus 3,
//! built from their Go modules by `tests/telemetry/build.sh` (the test command runs it).
//! Each binds only loopback ports chosen by the test. Without the binaries the tests fail
//! in CI (`CI=true`) naming the build command, and say they skipped elsewhere.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use tessera_control_plane::demo::JaegerPorts;

use crate::{Process, TempDir, free_port, local};

const BUILD: &str = "tests/telemetry/build.sh";

/// `tests/telemetry/bin/<name>`, or `None` (after saying so) when it has not been built.
/// Under CI it must have been.
pub fn tool(name: &str) -> Option<PathBuf> {
    crate::built_tool("telemetry/bin", name, BUILD)
}

/// GET `path` over HTTP/1.1 (chunked bodies decoded); status and body.
pub async fn get(address: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, address.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .with_context(|| format!("GET {path} on {address}: no answer in 10 s"))??;
    Ok(answer)
}

/// Polls `path` on `address` until it answers 200.
async fn wait_until_serving(
    process: &Process,
    label: &str,
    address: SocketAddr,
    path: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = get(address, path).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{label} did not serve {path} on {address} within 60 s; log:\n{}",
                process.logs.lines().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Jaeger v2 all-in-one: OTLP/gRPC in, the query API (the UI's) out, traces in memory.
pub struct Jaeger {
    pub process: Process,
    /// OTLP/gRPC receiver.
    pub otlp: SocketAddr,
    /// Query API and UI (16686 in a default install).
    pub query: SocketAddr,
    _dir: TempDir,
}

impl Jaeger {
    pub async fn start() -> Option<Self> {
        let binary = tool("jaeger")?;
        let dir = TempDir::new("jaeger");
        let (otlp, query, query_grpc, health) =
            (free_port(), free_port(), free_port(), free_port());
        let config = tessera_control_plane::demo::jaeger_config(JaegerPorts {
            otlp,
            query,
            query_grpc,
            health,
        });
        let file = dir.path().join("jaeger.yaml");
        std::fs::write(&file, config).expect("write the Jaeger configuration");
        // Jaeger traces itself to localhost:4317 unless told not to.
        let process = Process::spawn(
            "jaeger",
            Command::new(binary)
                .arg(format!("--config={}", file.display()))
                .env("OTEL_TRACES_EXPORTER", "none"),
        );
        let query = local(query);
        wait_until_serving(&process, "jaeger", query, "/api/services")
            .await
            .expect("Jaeger serves its query API");
        Some(Self {
            process,
            otlp: local(otlp),
            query,
            _dir: dir,
        })
    }

    /// The OTLP/gRPC endpoint, as a proxy's `tracing.otlpEndpoint` names it.
    pub fn otlp_endpoint(&self) -> String {
        format!("http://{}", self.otlp)
    }

    /// The services Jaeger has seen spans from (`/api/services`).
    pub async fn services(&self) -> anyhow::Result<Vec<String>> {
        let body = self.get("/api/services").await?;
        Ok(body["data"]
            .as_array()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|name| name.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The trace `trace_id` as `/api/traces/<id>` returns it, once it holds at least
    /// `spans` spans (spans arrive batched, from several exporters).
    pub async fn trace(&self, trace_id: &str, spans: usize) -> anyhow::Result<JaegerTrace> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let path = format!("/api/traces/{trace_id}");
        loop {
            let found = self.get(&path).await.ok().and_then(|body| {
                let trace = body["data"].as_array()?.first()?.clone();
                Some(JaegerTrace(trace))
            });
            match found {
                Some(trace) if trace.spans().len() >= spans => return Ok(trace),
                _ if Instant::now() > deadline => bail!(
                    "Jaeger has no trace {trace_id} with {spans} spans after 20 s: {} (services seen: {:?})",
                    found.map_or_else(|| "none".to_string(), |t| t.summary()),
                    self.services().await.unwrap_or_default()
                ),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = get(self.query, path).await?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }
}

/// One trace in Jaeger's query API form (`data[0]` of `/api/traces/<id>`).
#[derive(Debug, Clone)]
pub struct JaegerTrace(pub Value);

/// One span of a [`JaegerTrace`], with its process' service name and tags.
#[derive(Debug, Clone)]
pub struct JaegerSpan {
    pub service: String,
    pub span: Value,
    pub process_tags: Value,
}

impl JaegerTrace {
    pub fn spans(&self) -> Vec<JaegerSpan> {
        let processes = &self.0["processes"];
        self.0["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|span| {
                let process = &processes[span["processID"].as_str().unwrap_or_default()];
                JaegerSpan {
                    service: process["serviceName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    span: span.clone(),
                    process_tags: process["tags"].clone(),
                }
            })
            .collect()
    }

    /// The spans of one service.
    pub fn of(&self, service: &str) -> Vec<JaegerSpan> {
        self.spans()
            .into_iter()
            .filter(|span| span.service == service)
            .collect()
    }

    /// One line per span, for failure messages.
    pub fn summary(&self) -> String {
        self.spans()
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} parent {}",
                    s.service,
                    s.operation(),
                    s.span_id(),
                    s.parent().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl JaegerSpan {
    pub fn span_id(&self) -> &str {
        self.span["spanID"].as_str().unwrap_or_default()
    }

    pub fn operation(&self) -> &str {
        self.span["operationName"].as_str().unwrap_or_default()
    }

    /// The span this one is a CHILD_OF.
    pub fn parent(&self) -> Option<String> {
        self.span["references"]
            .as_array()?
            .iter()
            .find(|r| r["refType"] == "CHILD_OF")
            .and_then(|r| r["spanID"].as_str())
            .map(str::to_string)
    }

    /// A span tag as Jaeger stores it: `{"key", "type", "value"}`.
    pub fn tag(&self, key: &str) -> Option<&Value> {
        find_tag(&self.span["tags"], key)
    }

    /// A resource attribute (Jaeger's process tag).
    pub fn process_tag(&self, key: &str) -> Option<&Value> {
        find_tag(&self.process_tags, key)
    }
}

fn find_tag<'a>(tags: &'a Value, key: &str) -> Option<&'a Value> {
    tags.as_array()?.iter().find(|tag| tag["key"] == key)
}

/// An OpenTelemetry Collector: OTLP/gRPC in, batched, OTLP/gRPC out to `next`.
pub struct Collector {
    pub process: Process,
    pub otlp: SocketAddr,
    _dir: TempDir,
}

impl Collector {
    pub async fn start(next: &str) -> Option<Self> {
        let binary = tool("otelcol")?;
        let dir = TempDir::new("otelcol");
        let otlp = free_port();
        let next = next.trim_start_matches("http://");
        let config = format!(
            "receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp}
processors:
  memory_limiter:
    check_interval: 1s
    limit_mib: 256
  batch:
    timeout: 100ms
exporters:
  debug:
    verbosity: basic
  otlp:
    endpoint: {next}
    tls:
      insecure: true
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter, batch]
      exporters: [otlp, debug]
"
        );
        let file = dir.path().join("otelcol.yaml");
        std::fs::write(&file, config).expect("write the collector configuration");
        let process = Process::spawn(
            "otelcol",
            Command::new(binary).arg(format!("--config={}", file.display())),
        );
        process
            .logs
            .wait_for(&["Everything is ready"], Duration::from_secs(60))
            .await
            .expect("the collector starts");
        Some(Self {
            process,
            otlp: local(otlp),
            _dir: dir,
        })
    }

    pub fn otlp_endpoint(&self) -> String {
        format!("http://{}", self.otlp)
    }
}

/// Prometheus 3, scraping `targets` every second, exemplars kept.
pub struct Prometheus {
    pub process: Process,
    pub address: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// `jobs`: (job name, targets).
    pub async fn start(jobs: &[(&str, Vec<SocketAddr>)]) -> Option<Self> {
        Self::start_with_rules(jobs, &[]).await
    }

    /// Also evaluating the rule files `rules` every second.
    pub async fn start_with_rules(
        jobs: &[(&str, Vec<SocketAddr>)],
        rules: &[PathBuf],
    ) -> Option<Self> {
        let binary = tool("prometheus")?;
        let dir = TempDir::new("prometheus");
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n");
        if !rules.is_empty() {
            let files: Vec<String> = rules.iter().map(|r| format!("'{}'", r.display())).collect();
            config.push_str(&format!("rule_files: [{}]\n", files.join(", ")));
        }
        config.push_str("scrape_configs:\n");
        for (job, targets) in jobs {
            let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).expect("write the Prometheus configuration");
        let port = free_port();
        let process = Process::spawn(
            "prometheus",
            Command::new(binary)
                .arg(format!("--config.file={}", file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--enable-feature=exemplar-storage"),
        );
        let address = local(port);
        wait_until_serving(&process, "prometheus", address, "/-/ready")
            .await
            .expect("Prometheus ready");
        Some(Self {
            process,
            address,
            _dir: dir,
        })
    }

    /// GET an API path; the `data` of a `"status": "success"` answer.
    pub async fn api(&self, path_and_query: &str) -> anyhow::Result<Value> {
        let (status, body) = get(self.address, path_and_query).await?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("GET {path_and_query}: {status} {body}"))?;
        if answer["status"] != "success" {
            bail!("GET {path_and_query}: {status} {body}");
        }
        Ok(answer["data"].clone())
    }

    /// An instant query's result vector.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(promql)))
            .await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The exemplars of `promql`'s series over the last `window`.
    pub async fn exemplars(&self, promql: &str, window: Duration) -> anyhow::Result<Vec<Value>> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let data = self
            .api(&format!(
                "/api/v1/query_exemplars?query={}&start={}&end={}",
                encode(promql),
                now - window.as_secs_f64(),
                now + 1.0
            ))
            .await?;
        Ok(data.as_array().cloned().unwrap_or_default())
    }
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters kept).
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An application instrumented with the OpenTelemetry SDK, as a user's would be: OTLP to
/// `collector`, W3C trace context in and out.
pub struct TracedApp {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl TracedApp {
    pub fn new(service: &str, collector: &str) -> Self {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(collector)
            .build()
            .expect("OTLP exporter");
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service.to_string())
                    .build(),
            )
            .build();
        Self { provider }
    }

    pub fn tracer(&self) -> opentelemetry_sdk::trace::SdkTracer {
        use opentelemetry::trace::TracerProvider;
        self.provider.tracer("tessera-tests")
    }

    /// Exports every ended span now (the batch exporter blocks: off the runtime).
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .expect("flush task")
            .expect("spans exported");
    }

    /// Serves HTTP/1.1 on a loopback port with a server span per request, a child of the
    /// caller's `traceparent`: `/flaky` answers 503 every other time (the first
    /// included), anything else 200.
    pub async fn serve(self: std::sync::Arc<Self>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the traced application");
        let address = listener.local_addr().expect("its address");
        let flaky = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (app, flaky) = (self.clone(), flaky.clone());
                let service = hyper::service::service_fn(move |request| {
                    let answer = app.answer(&request, &flaky);
                    async move { Ok::<_, std::convert::Infallible>(answer) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        (address, task)
    }

    fn answer(
        &self,
        request: &http::Request<hyper::body::Incoming>,
        flaky: &std::sync::atomic::AtomicU64,
    ) -> http::Response<http_body_util::Full<bytes::Bytes>> {
        use opentelemetry::KeyValue;
        use opentelemetry::propagation::TextMapPropagator;
        use opentelemetry::trace::{Span, SpanKind, Tracer};
        let headers: std::collections::HashMap<String, String> = request
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let parent =
            opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&headers);
        let path = request.uri().path().to_string();
        let mut span = self
            .tracer()
            .span_builder(format!("GET {path}"))
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer(), &parent);
        let status: u16 = if path == "/flaky"
            && flaky
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                .is_multiple_of(2)
        {
            503
        } else {
            200
        };
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        span.end();
        http::Response::builder()
            .status(status)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
            .expect("a valid response")
    }
}
