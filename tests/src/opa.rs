//! The Open Policy Agent, run as users of Istio + OPA run it beside their workloads
//! (`opa run --server`), to compare the proxy's in-process Rego decisions with. Built
//! from its Go module by `tests/opa/build.sh` (the test command runs it); without the
//! binary the tests fail in CI (`CI=true`) naming the build command, and say they
//! skipped elsewhere.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::{Process, TempDir, free_port, local};

const BUILD: &str = "tests/opa/build.sh";

/// `tests/opa/bin/opa`, or `None` (after saying so) when it has not been built. Under CI
/// it must have been.
pub fn binary() -> Option<PathBuf> {
    crate::built_tool("opa/bin", "opa", BUILD)
}

/// `modules` (file name, Rego) and a `data.json` written in a directory OPA loads.
pub struct Bundle {
    dir: TempDir,
}

impl Bundle {
    pub fn new(modules: &[(&str, &str)], data: &Value) -> Self {
        let dir = TempDir::new("opa");
        for (name, source) in modules {
            std::fs::write(dir.path().join(name), source).expect("write a Rego module");
        }
        std::fs::write(dir.path().join("data.json"), data.to_string()).expect("write data.json");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// `opa run --server` on a loopback port, with a bundle loaded.
pub struct OpaServer {
    pub process: Process,
    pub address: SocketAddr,
}

impl OpaServer {
    pub async fn start(opa: &Path, bundle: &Bundle) -> anyhow::Result<Self> {
        let address = local(free_port());
        let process = Process::spawn(
            "opa",
            Command::new(opa)
                .args(["run", "--server", "--log-level", "error", "--addr"])
                .arg(address.to_string())
                .arg(bundle.path()),
        );
        let server = Self { process, address };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut client = loop {
            if let Ok(client) = OpaClient::connect(address).await {
                break client;
            }
            if Instant::now() > deadline {
                bail!(
                    "opa did not listen on {address} within 60 s; log:\n{}",
                    server.process.logs.lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        client.health().await?;
        Ok(server)
    }
}

/// One kept-alive HTTP/1.1 connection to an OPA server, as a sidecar's client keeps.
pub struct OpaClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    address: SocketAddr,
}

impl OpaClient {
    pub async fn connect(address: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender, address })
    }

    async fn health(&mut self) -> anyhow::Result<()> {
        let (status, _) = self.send(http::Method::GET, "/health", None).await?;
        if status != 200 {
            bail!("opa /health answered {status}");
        }
        Ok(())
    }

    /// The value of `query` (`data.a.b.rule`) for `input`, by OPA's Data API; `None` when
    /// it is undefined.
    pub async fn query(&mut self, query: &str, input: &Value) -> anyhow::Result<Option<Value>> {
        let path = format!("/v1/{}", query.replace('.', "/"));
        let body = json!({ "input": input }).to_string();
        let (status, answer) = self.send(http::Method::POST, &path, Some(body)).await?;
        if status != 200 {
            bail!("opa {path} answered {status}: {answer}");
        }
        let mut answer: Value =
            serde_json::from_str(&answer).with_context(|| format!("opa {path}: {answer}"))?;
        Ok(answer.get_mut("result").map(Value::take))
    }

    async fn send(
        &mut self,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(u16, String)> {
        self.sender.ready().await?;
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.address.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// `opa eval --format json` of `query` over `bundle` for `input`, in a process of its
/// own: the value, or `None` when undefined.
pub fn eval(
    opa: &Path,
    bundle: &Bundle,
    query: &str,
    input: &Value,
) -> anyhow::Result<Option<Value>> {
    let input_file = bundle.path().join("input.json.in");
    std::fs::write(&input_file, input.to_string())?;
    let output = Command::new(opa)
        .args(["eval", "--format", "json", "--data"])
        .arg(bundle.path().join("data.json"))
        .args(
            std::fs::read_dir(bundle.path())?
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|e| e == "rego"))
                .flat_map(|path| [PathBuf::from("--data"), path]),
        )
        .arg("--input")
        .arg(&input_file)
        .arg(query)
        .output()
        .context("run opa eval")?;
    if !output.status.success() {
        bail!("opa eval: {}", String::from_utf8_lossy(&output.stderr));
    }
    let answer: Value = serde_json::from_slice(&output.stdout)?;
    Ok(answer["result"][0]["expressions"][0].get("value").cloned())
}
