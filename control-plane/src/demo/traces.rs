//! The demo's traces in Jaeger: the proxies export their spans over OTLP to a Jaeger
//! the user names (`--jaeger`), or to one the demo starts from a `jaeger` binary on PATH
//! (in-memory storage, loopback ports of its own). At the end the demo shows one retried
//! call and one denied call as Jaeger's UI links, after checking Jaeger holds them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tessera_proxy::config::TracingConfig;
use tokio::net::TcpStream;

/// Most of a Jaeger API answer the demo reads.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Where spans go and where people look at them.
pub(super) struct Jaeger {
    /// Query API and UI, e.g. `127.0.0.1:16686`.
    query: String,
    /// OTLP/gRPC receiver, e.g. `http://127.0.0.1:4317`.
    otlp: String,
    /// The Jaeger this demo started; killed when the demo ends.
    started: Option<(tokio::process::Child, PathBuf)>,
}

/// How the user asked for traces.
pub struct Options {
    /// `--jaeger`: a running Jaeger's query/UI address.
    pub query: Option<String>,
    /// `--jaeger-otlp`: its OTLP/gRPC address, when not the query host's port 4317.
    pub otlp: Option<String>,
}

impl Jaeger {
    /// The Jaeger named by `options`, else one started from PATH, else `None` after
    /// saying how to get one. A Jaeger that does not start costs the traces, not the demo.
    pub(super) async fn find(options: Options, workdir: &Path) -> Option<Self> {
        if let Some(query) = options.query {
            let query = query.trim_start_matches("http://").to_string();
            let otlp = options.otlp.unwrap_or_else(|| {
                let host = query.rsplit_once(':').map_or(query.as_str(), |(h, _)| h);
                format!("{host}:4317")
            });
            return Some(Self {
                query,
                otlp: with_scheme(&otlp),
                started: None,
            });
        }
        let Some(binary) = on_path("jaeger") else {
            println!(
                "\nTraces: no `jaeger` on PATH. To see this demo's traces, put one there (tests/telemetry/build.sh builds Jaeger v2 into tests/telemetry/bin; or `go install github.com/jaegertracing/jaeger/cmd/jaeger@v1.75.0`), or pass --jaeger HOST:16686 of a running one."
            );
            return None;
        };
        match start(&binary, workdir).await {
            Ok(jaeger) => Some(jaeger),
            Err(error) => {
                println!(
                    "\nTraces: {} did not start ({error:#}); going on without traces.",
                    binary.display()
                );
                None
            }
        }
    }

    /// What the proxies' `tracing` section says: every request sampled.
    pub(super) fn tracing_config(&self) -> TracingConfig {
        TracingConfig {
            otlp_endpoint: self.otlp.clone(),
            sample_ratio: 1.0,
            max_queue: 4096,
        }
    }

    /// Whether this demo started it (and so ends it).
    pub(super) fn started_here(&self) -> bool {
        self.started.is_some()
    }

    pub(super) fn describe(&self) -> String {
        match &self.started {
            Some((_, binary)) => format!(
                "  Jaeger            UI http://{}/   OTLP {}   (started from {}; stops with the demo)",
                self.query,
                self.otlp,
                binary.display()
            ),
            None => format!(
                "  Jaeger            UI http://{}/   OTLP {}",
                self.query, self.otlp
            ),
        }
    }

    /// Prints the UI link of each trace, with the spans Jaeger holds for it; an error
    /// when Jaeger never received one.
    pub(super) async fn show(&self, traces: &[(&str, Option<String>)]) -> anyhow::Result<()> {
        println!("\nTraces in Jaeger (every proxy hop a span; open them in its UI):");
        let mut missing = Vec::new();
        for (what, trace_id) in traces {
            let Some(trace_id) = trace_id else {
                println!("  {what:<30} (none happened during this run)");
                continue;
            };
            match self.spans(trace_id).await {
                Ok(spans) => println!(
                    "  {what:<30} http://{}/trace/{trace_id}\n  {:<30} {}",
                    self.query,
                    "",
                    spans.join(" → ")
                ),
                Err(error) => {
                    println!("  {what:<30} trace {trace_id}: {error:#}");
                    missing.push(*what);
                }
            }
        }
        if !missing.is_empty() {
            bail!(
                "Jaeger did not receive the traces of: {}",
                missing.join(", ")
            );
        }
        Ok(())
    }

    /// The spans of one trace as `service operation status`, in start order, once the
    /// exporters (batched, once a second) have delivered them.
    async fn spans(&self, trace_id: &str) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = get_json(&self.query, &format!("/api/traces/{trace_id}")).await;
            match answer.as_ref().map(|trace| summarise(&trace["data"][0])) {
                Ok(spans) if spans.len() >= 2 => return Ok(spans),
                _ if Instant::now() > deadline => {
                    return answer
                        .and_then(|trace| bail!("not in Jaeger after 10 s: {}", trace["errors"]));
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.started {
            let _ = child.start_kill();
        }
    }
}

/// `service operation → status` per span, in start order.
fn summarise(trace: &serde_json::Value) -> Vec<String> {
    let processes = &trace["processes"];
    let mut spans: Vec<(u64, String)> = trace["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|span| {
            let service = processes[span["processID"].as_str().unwrap_or_default()]["serviceName"]
                .as_str()
                .unwrap_or("?");
            let status = span["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|tag| tag["key"] == "http.response.status_code")
                .map_or_else(String::new, |tag| match &tag["value"] {
                    serde_json::Value::String(text) => format!(" {text}"),
                    other => format!(" {other}"),
                });
            (
                span["startTime"].as_u64().unwrap_or_default(),
                format!(
                    "{service} {}{status}",
                    span["operationName"].as_str().unwrap_or_default()
                ),
            )
        })
        .collect();
    spans.sort();
    spans.into_iter().map(|(_, span)| span).collect()
}

fn with_scheme(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Starts Jaeger v2 all-in-one with in-memory storage, on loopback ports of its own.
async fn start(binary: &Path, workdir: &Path) -> anyhow::Result<Jaeger> {
    let [otlp, query, query_grpc, health] = free_ports()?;
    let config = all_in_one_config(JaegerPorts {
        otlp,
        query,
        query_grpc,
        health,
    });
    let file = workdir.join("jaeger.yaml");
    std::fs::write(&file, config).context("cannot write its configuration")?;
    let child = tokio::process::Command::new(binary)
        .arg(format!("--config={}", file.display()))
        // Jaeger traces itself to localhost:4317 unless told not to.
        .env("OTEL_TRACES_EXPORTER", "none")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run it")?;
    let jaeger = Jaeger {
        query: format!("127.0.0.1:{query}"),
        otlp: format!("http://127.0.0.1:{otlp}"),
        started: Some((child, binary.to_path_buf())),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_json(&jaeger.query, "/api/services").await.is_err() {
        if Instant::now() > deadline {
            bail!("its query API did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(jaeger)
}

/// The loopback ports a Jaeger all-in-one binds.
pub struct JaegerPorts {
    pub otlp: u16,
    pub query: u16,
    pub query_grpc: u16,
    pub health: u16,
}

/// Jaeger v2 all-in-one's configuration with in-memory storage, minus everything that
/// binds a fixed port (its defaults, 4317 and 16686, may be taken, or be another Jaeger),
/// on `ports` of loopback; the batch flush shortened so spans show within a second.
pub fn all_in_one_config(ports: JaegerPorts) -> String {
    let JaegerPorts {
        otlp,
        query,
        query_grpc,
        health,
    } = ports;
    format!(
        "service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
  jaeger_query:
    storage:
      traces: memory
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memory:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memory
"
    )
}

/// Four loopback ports free now (bound, then released for Jaeger to take).
fn free_ports() -> anyhow::Result<[u16; 4]> {
    let listeners = (0..4)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("no free loopback port")?;
    let mut ports = [0; 4];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

async fn get_json(address: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let address: SocketAddr = tokio::net::lookup_host(address)
        .await?
        .next()
        .with_context(|| format!("{address}: no address"))?;
    let stream = TcpStream::connect(address).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, address.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .context("no answer within 5 s")??;
    let status = response.status();
    // A trace is a few KiB; a Jaeger that streams without end is cut off.
    let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|error| anyhow::anyhow!("GET {path}: {error}"))?
        .to_bytes();
    anyhow::ensure!(status.is_success(), "GET {path}: {status}");
    Ok(serde_json::from_slice(&body)?)
}

/// A W3C `traceparent` for a new sampled trace, and its trace id: what an instrumented
/// application sends, so the demo knows which trace a call became.
pub(super) fn new_trace() -> (String, String) {
    let trace_id = hex(&rand::random::<[u8; 16]>());
    let span_id = hex(&rand::random::<[u8; 8]>());
    (format!("00-{trace_id}-{span_id}-01"), trace_id)
}

/// The trace id of a request's `traceparent`, if it has a valid one.
pub(super) fn trace_id(request: &http::HeaderMap) -> Option<String> {
    let value = request.get("traceparent")?.to_str().ok()?;
    let id = value.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_trace_is_a_valid_sampled_traceparent() {
        let (traceparent, id) = new_trace();
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", traceparent.parse().unwrap());
        assert_eq!(trace_id(&headers), Some(id));
        assert!(traceparent.starts_with("00-") && traceparent.ends_with("-01"));
        headers.insert("traceparent", "00-xyz-0011223344556677-01".parse().unwrap());
        assert_eq!(trace_id(&headers), None);
    }

    #[test]
    fn spans_are_summarised_in_start_order_with_their_status() {
        let trace = serde_json::json!({
            "processes": {"p1": {"serviceName": "frontend.shop"}, "p2": {"serviceName": "orders.shop"}},
            "spans": [
                {"processID": "p2", "operationName": "GET", "startTime": 20,
                 "tags": [{"key": "http.response.status_code", "type": "int64", "value": 503}]},
                {"processID": "p1", "operationName": "GET", "startTime": 10, "tags": []}
            ]
        });
        assert_eq!(
            summarise(&trace),
            ["frontend.shop GET", "orders.shop GET 503"]
        );
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_off_not_buffered() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            stream.write_all(head.as_bytes()).await.unwrap();
            let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, " ".repeat(1 << 20));
            while stream.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        let error = get_json(&address, "/api/traces/x").await.unwrap_err();
        assert!(
            error.to_string().contains("length limit exceeded"),
            "{error:#}"
        );
    }

    #[test]
    fn a_named_jaeger_gets_its_otlp_port_on_the_same_host() {
        let jaeger = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(Jaeger::find(
                Options {
                    query: Some("http://jaeger.example:16686".into()),
                    otlp: None,
                },
                Path::new("/nonexistent"),
            ));
        let jaeger = jaeger.expect("named");
        assert_eq!(jaeger.query, "jaeger.example:16686");
        assert_eq!(
            jaeger.tracing_config().otlp_endpoint,
            "http://jaeger.example:4317"
        );
    }
}
