//! A real Kubernetes API server for the cluster-mode tests: `tests/kube`'s
//! `kube-harness` (kube-apiserver from `k8s.io/kubernetes` and an embedded etcd, built
//! by `scripts/test.sh`), and a small REST client that talks to it as the cluster admin.
//!
//! Without the harness binary the tests fail in CI (`CI=true`) naming the build command,
//! and say they skipped elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio_rustls::TlsConnector;

use crate::{Process, TempDir};

/// The command that builds the harness (what `scripts/test.sh` runs).
pub const BUILD: &str = "tests/kube/build.sh (needs Go 1.26 and the Go module proxy)";

/// How long a cold start (etcd, the API server's post-start hooks) may take.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A request to the API server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The harness binary, if it has been built.
pub fn harness_binary() -> Option<PathBuf> {
    tool("kube-harness")
}

/// `tests/kube/bin/NAME` (kube-harness, kubectl, helm: `BUILD` makes them), or `None`,
/// saying so, when it has not been built. Under CI it must have been.
pub fn tool(name: &str) -> Option<PathBuf> {
    crate::built_tool("kube/bin", name, BUILD)
}

/// A running kube-apiserver with its etcd, and the admin's client to it.
pub struct ApiServer {
    pub server: String,
    /// The API server's serving CA (PEM), for a kubeconfig or a client.
    pub ca_file: PathBuf,
    pub kubeconfig: PathBuf,
    /// The service-account token issuer (`iss` of the tokens it signs).
    pub issuer: String,
    tls: TlsConnector,
    authority: String,
    /// Flags added to kube-apiserver's, kept for a restart.
    apiserver_flags: Vec<String>,
    pub process: Process,
    dir: TempDir,
}

impl ApiServer {
    /// Starts the harness (no controller manager: tests create what a controller would)
    /// and waits until it is ready; `None` when the harness is not built (see
    /// [`harness_binary`]).
    pub async fn start() -> Option<Self> {
        Self::start_with(&[]).await
    }

    /// [`ApiServer::start`] with flags added to kube-apiserver's (a later one of the
    /// same name wins: `--service-cluster-ip-range=10.0.0.0/16` for more Services).
    pub async fn start_with(apiserver_flags: &[&str]) -> Option<Self> {
        let binary = harness_binary()?;
        let dir = TempDir::new("kube");
        let apiserver_flags: Vec<String> = apiserver_flags.iter().map(|f| f.to_string()).collect();
        let (process, ready) = Self::spawn(&binary, &dir, 0, &apiserver_flags).await;
        let json = &ready[ready.find('{').expect("ready line is JSON")..];
        let ready: Value = serde_json::from_str(json).expect("ready line parses");
        let field = |name: &str| PathBuf::from(ready[name].as_str().expect(name));
        let server = ready["server"].as_str().expect("server").to_string();
        let tls = client_tls(&field("ca"), &field("admin_cert"), &field("admin_key"))
            .expect("admin client TLS");
        let authority = server
            .strip_prefix("https://")
            .expect("https server")
            .to_string();
        Some(Self {
            ca_file: field("ca"),
            kubeconfig: field("kubeconfig"),
            issuer: ready["issuer"].as_str().expect("issuer").to_string(),
            server,
            tls,
            authority,
            apiserver_flags,
            process,
            dir,
        })
    }

    /// Runs the harness on `dir` (its certificates and etcd data kept from an earlier
    /// run there) and `port` (0: any); the process and its ready line.
    async fn spawn(
        binary: &Path,
        dir: &TempDir,
        port: u16,
        apiserver_flags: &[String],
    ) -> (Process, String) {
        let process = Process::spawn(
            "kube-apiserver",
            Command::new(binary)
                .arg("--dir")
                .arg(dir.path())
                .arg("--port")
                .arg(port.to_string())
                .arg("--controller-manager=false")
                .arg("--")
                .args(apiserver_flags),
        );
        let ready = process
            .logs
            .wait_for(&["\"kubeconfig\":"], READY_TIMEOUT)
            .await
            .expect("kube-harness becomes ready");
        (process, ready)
    }

    /// Kills the API server and its etcd, as a crash would.
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Stops the API server and its etcd if they run, then starts them again on the same
    /// port, certificates and data.
    pub async fn restart(&mut self) {
        self.stop();
        let port = self
            .authority
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .expect("the API server's port");
        let binary = harness_binary().expect("the harness ran before");
        (self.process, _) = Self::spawn(&binary, &self.dir, port, &self.apiserver_flags).await;
    }

    /// The key the API server signs service-account tokens with (PEM).
    pub fn service_account_key(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("sa.key")).expect("sa.key")
    }

    /// Creates every CRD of `deploy/kubernetes/crds.yaml` and waits until each is served.
    pub async fn apply_crds(&self) -> Vec<Value> {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/crds.yaml");
        let text = std::fs::read_to_string(&path).expect("read crds.yaml");
        let crds: Vec<Value> = serde_saphyr::from_multiple(&text).expect("crds.yaml parses");
        let base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
        for crd in &crds {
            self.must_create(base, crd).await;
        }
        for crd in &crds {
            let name = crd["metadata"]["name"].as_str().expect("CRD name");
            let established = |_: u16, answer: &Value| {
                answer["status"]["conditions"]
                    .as_array()
                    .is_some_and(|conditions| {
                        conditions
                            .iter()
                            .any(|c| c["type"] == "Established" && c["status"] == "True")
                    })
            };
            self.eventually(
                &format!("{base}/{name}"),
                Duration::from_secs(20),
                established,
            )
            .await
            .unwrap_or_else(|e| panic!("CRD {name} never established: {e:#}"));
        }
        crds
    }

    /// A kubeconfig for the control plane as `deploy/kubernetes` installs it: its
    /// service account in `tessera-system`, with nothing but the roles shipped there.
    pub async fn control_plane_kubeconfig(&self) -> PathBuf {
        let documents = shipped_manifests();
        let kind = |kind: &str| {
            documents
                .iter()
                .find(|d| d["kind"] == kind)
                .cloned()
                .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
        };
        self.apply_crds().await;
        self.must_create("/api/v1/namespaces", &kind("Namespace"))
            .await;
        let account = kind("ServiceAccount");
        self.must_create(
            "/api/v1/namespaces/tessera-system/serviceaccounts",
            &account,
        )
        .await;
        let rbac = "/apis/rbac.authorization.k8s.io/v1";
        self.must_create(&format!("{rbac}/clusterroles"), &kind("ClusterRole"))
            .await;
        self.must_create(
            &format!("{rbac}/clusterrolebindings"),
            &kind("ClusterRoleBinding"),
        )
        .await;
        let own = format!("{rbac}/namespaces/tessera-system");
        self.must_create(&format!("{own}/roles"), &kind("Role"))
            .await;
        self.must_create(&format!("{own}/rolebindings"), &kind("RoleBinding"))
            .await;
        self.service_account_kubeconfig("tessera-system", "tessera-control-plane")
            .await
    }

    /// A kubeconfig holding a token of this (existing) service account.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let request = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": { "expirationSeconds": 3600 }
        });
        let answer = self
            .must_create(
                &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"),
                &request,
            )
            .await;
        let token = answer["status"]["token"].as_str().expect("token");
        let kubeconfig = self
            .dir
            .path()
            .join(format!("{namespace}.{name}.kubeconfig"));
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "harness", "cluster": {
                "server": self.server, "certificate-authority": self.ca_file } }],
            "users": [{ "name": name, "user": { "token": token } }],
            "contexts": [{ "name": "harness", "context": {
                "cluster": "harness", "user": name, "namespace": namespace } }],
            "current-context": "harness"
        });
        std::fs::write(&kubeconfig, serde_json::to_vec(&config).unwrap())
            .expect("write kubeconfig");
        kubeconfig
    }

    /// `POST path` with a JSON object; (status, the answer).
    pub async fn create(&self, path: &str, object: &Value) -> anyhow::Result<(u16, Value)> {
        self.request(http::Method::POST, path, Some(object)).await
    }

    /// `GET path`; (status, the answer).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.request(http::Method::GET, path, None).await
    }

    /// `PATCH path` with a JSON merge patch; (status, the answer).
    pub async fn merge_patch(&self, path: &str, patch: &Value) -> anyhow::Result<(u16, Value)> {
        self.request(http::Method::PATCH, path, Some(patch)).await
    }

    /// Polls `GET path` until `done` holds for (status, answer); the last answer.
    pub async fn eventually(
        &self,
        path: &str,
        timeout: Duration,
        done: impl Fn(u16, &Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, answer) = self.get(path).await?;
            if done(status, &answer) {
                return Ok(answer);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("GET {path} after {timeout:?}: {status} {answer}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `DELETE path`; (status, the answer).
    pub async fn delete(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.request(http::Method::DELETE, path, None).await
    }

    /// [`ApiServer::create`], failing unless the object was created (201).
    pub async fn must_create(&self, path: &str, object: &Value) -> Value {
        let (status, answer) = self
            .create(path, object)
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e:#}"));
        assert_eq!(status, 201, "POST {path}: {answer}");
        answer
    }

    /// A connection kept alive for many requests in a row (an `ApiServer` request opens
    /// one each).
    pub async fn connect(&self) -> anyhow::Result<ApiConnection> {
        let tcp = tokio::net::TcpStream::connect(&self.authority).await?;
        let host = self.authority.rsplit_once(':').map_or("", |(host, _)| host);
        let tls = self
            .tls
            .connect(ServerName::try_from(host.to_string())?, tcp)
            .await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(ApiConnection {
            sender,
            authority: self.authority.clone(),
        })
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        self.connect().await?.request(method, path, body).await
    }
}

/// One HTTP/1.1 connection to the API server as the cluster admin.
pub struct ApiConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
}

impl ApiConnection {
    /// `method path` with a JSON body (a merge patch for `PATCH`); (status, the answer).
    pub async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        self.sender.ready().await?;
        let body = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        let content_type = match method {
            http::Method::PATCH => "application/merge-patch+json",
            _ => "application/json",
        };
        let request = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.sender.send_request(request))
            .await
            .with_context(|| format!("{method} {path}: no answer"))??;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let answer = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, answer))
    }
}

/// TLS to the API server: its CA, and the admin's client certificate.
fn client_tls(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    for root in tessera_mesh::tls::certs_from_pem(&std::fs::read(ca)?)? {
        roots.add(root)?;
    }
    let chain: Vec<CertificateDer<'static>> =
        tessera_mesh::tls::certs_from_pem(&std::fs::read(cert)?)?;
    let key = tessera_mesh::tls::private_key_from_pem(&std::fs::read(key)?)
        .with_context(|| format!("{}: no private key", key.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate", cert.display());
    }
    let config = rustls::ClientConfig::builder_with_provider(tessera_mesh::tls::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(TlsConnector::from(Arc::new(config)))
}

/// An address of this host other than loopback (the source of its default route), for
/// what Kubernetes refuses to point at loopback (EndpointSlices). Fails in CI without.
pub fn host_address() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing: it only picks the route's source address.
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    let found = socket
        .connect("203.0.113.1:9")
        .and_then(|()| socket.local_addr())
        .ok()
        .map(|address| address.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this host has no address but loopback (no default route)"
        );
        eprintln!("skipped: this host has no address but loopback");
    }
    found
}

/// The kustomize base's objects but the CRDs: `deploy/kubernetes/namespace.yaml` and the
/// chart's default rendering `tessera.yaml`, in that order.
pub fn shipped_manifests() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    ["namespace.yaml", "tessera.yaml"]
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("deploy/kubernetes/{file}: {e}"));
            serde_saphyr::from_multiple::<Value>(&text)
                .unwrap_or_else(|e| panic!("deploy/kubernetes/{file}: {e}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}
