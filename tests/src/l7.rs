//! The L7 topology most HTTP tests use: a control plane whose configuration declares
//! service `backend.shop` with one workload per application instance, each behind its
//! own proxy, and a client proxy whose outbound listener targets the service.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{ControlPlane, Proxy, Upstream, free_port};

pub const SERVICE: &str = "backend.shop";

pub struct L7Mesh {
    pub control_plane: ControlPlane,
    pub servers: Vec<Proxy>,
    pub client: Proxy,
}

/// The resources for `backend.shop` with workloads at `inbound_ports` and an optional
/// RoutePolicy `spec` body (indented two spaces).
pub fn service_config(protocol: &str, inbound_ports: &[u16], route_policy: Option<&str>) -> String {
    let mut yaml = format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: backend, namespace: shop}}\nspec:\n  ports: [{{port: 8080, protocol: {protocol}}}]\n"
    );
    for (i, port) in inbound_ports.iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {{name: backend-{i}, namespace: shop}}\nspec: {{service: backend, serviceAccount: backend, address: \"127.0.0.1:{port}\"}}\n"
        ));
    }
    if let Some(spec) = route_policy {
        yaml.push_str(&format!(
            "---\napiVersion: tessera.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: backend, namespace: shop}}\nspec:\n  service: backend\n{spec}"
        ));
    }
    yaml
}

impl L7Mesh {
    /// Starts everything and waits until the client proxy routes to every workload.
    pub async fn start(apps: &[SocketAddr], protocol: &str, route_policy: Option<&str>) -> Self {
        Self::start_with(apps, protocol, route_policy, "").await
    }

    /// Like [`L7Mesh::start`], with `proxy_yaml` appended to every proxy's configuration.
    pub async fn start_with(
        apps: &[SocketAddr],
        protocol: &str,
        route_policy: Option<&str>,
        proxy_yaml: &str,
    ) -> Self {
        crate::init();
        let mut control_plane = ControlPlane::start("1h", "").await;
        control_plane.proxy_extra_yaml = proxy_yaml.to_string();
        Self::start_on(control_plane, apps, protocol, route_policy).await
    }

    /// Like [`L7Mesh::start`], with a control plane of the caller's (cluster mode).
    pub async fn start_on(
        control_plane: ControlPlane,
        apps: &[SocketAddr],
        protocol: &str,
        route_policy: Option<&str>,
    ) -> Self {
        let ports: Vec<u16> = apps.iter().map(|_| free_port()).collect();
        control_plane.write_config(
            "backend.yaml",
            &service_config(protocol, &ports, route_policy),
        );
        control_plane
            .process
            .logs
            .wait_for(&["configuration updated"], Duration::from_secs(10))
            .await
            .expect("control plane takes the service configuration");
        let servers: Vec<Proxy> = apps
            .iter()
            .zip(&ports)
            .map(|(app, port)| control_plane.workload_proxy("backend", *app, *port))
            .collect();
        let client = control_plane.proxy("client", None, &[Upstream::service(SERVICE)]);
        for proxy in servers.iter().chain([&client]) {
            proxy
                .wait_ready(Duration::from_secs(20))
                .await
                .expect("proxy ready");
        }
        Self {
            control_plane,
            servers,
            client,
        }
    }

    /// The client proxy's outbound listener for the service.
    pub fn entry(&self) -> SocketAddr {
        self.client.outbound(0)
    }
}

/// An HTTP/1.1 client on one kept-alive connection.
pub struct Http1Client {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    pub address: SocketAddr,
}

/// Status, headers and whole body of an answer.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

impl Http1Client {
    pub async fn connect(address: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender, address })
    }

    /// True while the connection is open (keep-alive held).
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<Answer> {
        self.send(http::Method::GET, path, bytes::Bytes::new())
            .await
    }

    pub async fn send(
        &mut self,
        method: http::Method,
        path: &str,
        body: bytes::Bytes,
    ) -> anyhow::Result<Answer> {
        self.request(method, path, &[], body).await
    }

    /// A GET with extra headers (tokens, trace context).
    pub async fn get_with(
        &mut self,
        path: &str,
        headers: &[(String, String)],
    ) -> anyhow::Result<Answer> {
        self.request(http::Method::GET, path, headers, bytes::Bytes::new())
            .await
    }

    async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        headers: &[(String, String)],
        body: bytes::Bytes,
    ) -> anyhow::Result<Answer> {
        use http_body_util::BodyExt;
        self.sender.ready().await?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "backend.shop");
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = self
            .sender
            .send_request(request.body(http_body_util::Full::new(body))?)
            .await?;
        let (parts, body) = response.into_parts();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await?.to_bytes(),
        })
    }
}

/// Sends `total` GETs of `path` over `connections` kept-alive connections; returns every
/// status (a transport error counts as status 0).
pub async fn load(address: SocketAddr, path: &str, total: usize, connections: usize) -> Vec<u16> {
    let per_connection = total / connections;
    let mut workers = Vec::new();
    for _ in 0..connections {
        let path = path.to_string();
        workers.push(tokio::spawn(async move {
            let mut statuses = Vec::with_capacity(per_connection);
            let mut client = Http1Client::connect(address).await.ok();
            for _ in 0..per_connection {
                if client.as_ref().is_none_or(|c| !c.is_open()) {
                    client = Http1Client::connect(address).await.ok();
                }
                let status = match client.as_mut() {
                    Some(c) => c.get(&path).await.map_or(0, |a| a.status.as_u16()),
                    None => 0,
                };
                statuses.push(status);
            }
            statuses
        }));
    }
    let mut statuses = Vec::with_capacity(total);
    for worker in workers {
        statuses.extend(worker.await.unwrap_or_default());
    }
    statuses
}

impl L7Mesh {
    /// Writes a resource file and waits until the new configuration is in force on
    /// every proxy.
    pub async fn apply(&self, file: &str, yaml: &str) {
        let proxies = self.servers.len() + 1;
        let before = self.control_plane.generation().await;
        self.control_plane.write_config(file, yaml);
        if let Err(error) = self
            .control_plane
            .wait_in_force(before, proxies, Duration::from_secs(5))
            .await
        {
            panic!(
                "configuration {file} is not in force: {error}; control plane log:\n{}",
                self.control_plane.process.logs.lines().join("\n")
            );
        }
    }
}

/// A resource document in namespace `shop`.
pub fn resource(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}"
    )
}
