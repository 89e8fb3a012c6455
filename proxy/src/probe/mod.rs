//! The application's own probes, performed by the proxy when the kubelet asks for them
//! on the admin port (`/app-health/<container>/<livez|readyz|startupz>`).
//!
//! Injection points the pod's probes here because the kubelet cannot make them itself
//! once the capture is in place: it speaks plaintext HTTP and gRPC, which a STRICT port
//! refuses, and its TCP connect would reach the proxy's inbound listener, which accepts
//! whether or not the application does. The proxy runs as UID 1337, which the capture
//! leaves alone, and probes over loopback (`127.0.0.1:<port>`), as it delivers inbound
//! traffic to the application:
//! - HTTP: the same GET with the same headers; the application's status is the answer;
//! - gRPC: one `grpc.health.v1.Health/Check` call ([`grpc_health`]), 200 only for
//!   SERVING, as the kubelet counts success;
//! - TCP: a connect, 200 when the port accepts.
//!
//! Each probe takes at most the pod probe's own `timeoutSeconds`, and anything the
//! application answers is bounded.

mod grpc_health;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tessera_mesh::process::admin::Reply;
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::{AppProbe, Limits, ProbeScheme};
use grpc_health::ServingStatus;

/// The application's probes by admin path, ready to perform.
pub(crate) struct AppProbes {
    probes: HashMap<String, Probe>,
    http: Client<HttpConnector, Empty<Bytes>>,
}

struct Probe {
    port: u16,
    timeout: Duration,
    kind: Kind,
}

/// What a probe does, built once from the configuration.
enum Kind {
    Http {
        uri: http::Uri,
        headers: http::HeaderMap,
    },
    /// The framed `HealthCheckRequest`, encoded once.
    Grpc {
        request: Bytes,
    },
    Tcp,
}

impl AppProbes {
    /// `None` when there are no probes to serve.
    pub(crate) fn new(config: &BTreeMap<String, AppProbe>, limits: &Limits) -> Option<Arc<Self>> {
        let probes: HashMap<String, Probe> = config
            .iter()
            .filter_map(|(path, probe)| Some((path.clone(), Probe::new(probe)?)))
            .collect();
        if probes.is_empty() {
            return None;
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.connect_timeout));
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Some(Arc::new(Self { probes, http }))
    }

    /// Whether `path` is one of the application's probes.
    pub(crate) fn serves(&self, path: &str) -> bool {
        self.probes.contains_key(path)
    }

    /// The application's answer, or 503 and why when it is not healthy or not
    /// reachable in time.
    pub(crate) async fn check(&self, path: &str) -> Reply {
        let Some(probe) = self.probes.get(path) else {
            return Reply::not_found();
        };
        let answer = async {
            match &probe.kind {
                Kind::Http { uri, headers } => self.http_get(uri, headers, path).await,
                Kind::Grpc { request } => grpc(probe.port, request.clone(), probe.timeout).await,
                Kind::Tcp => tcp(probe.port).await,
            }
        };
        match tokio::time::timeout(probe.timeout, answer).await {
            Ok(reply) => reply,
            Err(_) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "application probe timed out\n",
            ),
        }
    }

    /// The application's status code.
    async fn http_get(&self, uri: &http::Uri, headers: &http::HeaderMap, path: &str) -> Reply {
        let mut request = http::Request::new(Empty::new());
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers.clone();
        match self.http.request(request).await {
            Ok(response) => {
                let status = response.status();
                Reply::text(status, format!("application answered {status}\n"))
            }
            Err(error) => {
                debug!(event = "application probe failed", probe = path, error = %error);
                Reply::text(StatusCode::SERVICE_UNAVAILABLE, "application unreachable\n")
            }
        }
    }
}

/// 200 for SERVING, 503 with the status or the failure otherwise.
async fn grpc(port: u16, request: Bytes, timeout: Duration) -> Reply {
    match grpc_health::check(port, request, timeout).await {
        Ok(ServingStatus::Serving) => Reply::text(StatusCode::OK, "application SERVING\n"),
        Ok(status) => Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application {status}\n"),
        ),
        Err(error) => Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("gRPC health check failed: {error}\n"),
        ),
    }
}

async fn tcp(port: u16) -> Reply {
    match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
        Ok(_) => Reply::text(StatusCode::OK, "application accepts connections\n"),
        Err(error) => Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application unreachable: {}\n", error.kind()),
        ),
    }
}

impl Probe {
    /// `None` for a probe that cannot be made (a header that is not valid HTTP): its
    /// path then answers 404, and the kubelet reports the probe failing.
    fn new(config: &AppProbe) -> Option<Self> {
        let kind = match config.scheme {
            ProbeScheme::Http => {
                let path = config.path.as_deref().unwrap_or("/");
                let uri = format!("http://127.0.0.1:{}{path}", config.port)
                    .parse()
                    .ok()?;
                let mut headers = http::HeaderMap::new();
                for header in &config.http_headers {
                    let name = http::HeaderName::from_bytes(header.name.as_bytes()).ok()?;
                    let value = http::HeaderValue::from_str(&header.value).ok()?;
                    headers.append(name, value);
                }
                Kind::Http { uri, headers }
            }
            ProbeScheme::Grpc => Kind::Grpc {
                request: grpc_health::encode_request(config.service.as_deref().unwrap_or(""))?,
            },
            ProbeScheme::Tcp => Kind::Tcp,
        };
        Some(Self {
            port: config.port,
            timeout: Duration::from_secs(u64::from(config.timeout_seconds.max(1))),
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    fn probes(scheme: ProbeScheme, port: u16, service: Option<&str>) -> Arc<AppProbes> {
        let config = BTreeMap::from([(
            "/app-health/app/livez".to_string(),
            AppProbe {
                port,
                path: None,
                scheme,
                service: service.map(str::to_string),
                timeout_seconds: 5,
                http_headers: Vec::new(),
            },
        )]);
        AppProbes::new(&config, &Limits::default()).unwrap()
    }

    async fn check(probes: &AppProbes) -> (u16, String) {
        let reply = probes.check("/app-health/app/livez").await;
        (reply.status.as_u16(), reply.body)
    }

    /// A port nothing listens on.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        listener.local_addr().unwrap().port()
    }

    /// How the test health server answers.
    #[derive(Clone, Copy)]
    enum Health {
        /// A standard health server: SERVING for "" and "orders", NOT_SERVING for
        /// "payments", NOT_FOUND (as grpc-status, trailers-only) for any other service.
        Standard,
        /// A gRPC server without the health service: UNIMPLEMENTED.
        Unimplemented,
        /// 1 MiB of body.
        Oversized,
        /// A body that is no HealthCheckResponse, with grpc-status 0.
        Garbage,
        /// The request is taken and never answered.
        Silent,
    }

    /// An in-process plaintext HTTP/2 server answering health checks; reports each
    /// request it receives, and each connection that closes.
    async fn health_server(health: Health) -> (u16, mpsc::UnboundedReceiver<&'static str>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (events, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let events = events.clone();
                tokio::spawn(async move {
                    let requests = events.clone();
                    let service = service_fn(move |request: http::Request<Incoming>| {
                        let requests = requests.clone();
                        async move { Ok::<_, Infallible>(answer(health, request, requests).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    let _ = events.send("connection closed");
                });
            }
        });
        (port, received)
    }

    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    type Answer = http::Response<http_body_util::combinators::BoxBody<Bytes, BoxError>>;

    async fn answer(
        health: Health,
        request: http::Request<Incoming>,
        events: mpsc::UnboundedSender<&'static str>,
    ) -> Answer {
        let headers = request.headers();
        assert_eq!(request.uri().path(), "/grpc.health.v1.Health/Check");
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["te"], "trailers");
        assert_eq!(headers["grpc-timeout"], "5000m");
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let _ = events.send("request");
        let service = match &body[..] {
            [0, 0, 0, 0, 0] => "",
            [0, 0, 0, 0, _, 0x0a, _, service @ ..] => std::str::from_utf8(service).unwrap(),
            other => panic!("not a HealthCheckRequest: {other:?}"),
        };
        let message = |status: u8| Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
        match (health, service) {
            (Health::Standard, "" | "orders") => with_status(message(1), "0"),
            (Health::Standard, "payments") => with_status(message(2), "0"),
            (Health::Standard, _) => trailers_only("5"),
            (Health::Unimplemented, _) => trailers_only("12"),
            (Health::Oversized, _) => with_status(Bytes::from(vec![0; 1 << 20]), "0"),
            (Health::Garbage, _) => {
                with_status(Bytes::from_static(b"\0\0\0\0\x03\x08\x80\x80"), "0")
            }
            (Health::Silent, _) => std::future::pending().await,
        }
    }

    fn with_status(body: Bytes, grpc_status: &'static str) -> Answer {
        let trailers = http::HeaderMap::from_iter([(
            http::HeaderName::from_static("grpc-status"),
            http::HeaderValue::from_static(grpc_status),
        )]);
        let body = Full::new(body)
            .map_err(|never: Infallible| -> BoxError { match never {} })
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        http::Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    }

    /// An error in the response headers, no body: how gRPC servers refuse a call. Its
    /// message is long and not UTF-8, as a hostile application may send.
    fn trailers_only(grpc_status: &'static str) -> Answer {
        let mut message = b"unknown service \xff".to_vec();
        message.extend_from_slice(&[b'x'; 300]);
        http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", grpc_status)
            .header(
                "grpc-message",
                http::HeaderValue::from_bytes(&message).unwrap(),
            )
            .body(
                Empty::new()
                    .map_err(|never: Infallible| -> BoxError { match never {} })
                    .boxed(),
            )
            .unwrap()
    }

    /// How the answer shows the application's `grpc-message`: bounded, valid text.
    fn shown_message() -> String {
        format!("unknown service \u{fffd}{}", "x".repeat(111))
    }

    #[tokio::test]
    async fn grpc_probe_is_200_only_for_serving() {
        let (port, _) = health_server(Health::Standard).await;
        let cases = [
            (None, 200, "application SERVING\n".to_string()),
            (Some("orders"), 200, "application SERVING\n".to_string()),
            (
                Some("payments"),
                503,
                "application NOT_SERVING\n".to_string(),
            ),
            (
                Some("shipping"),
                503,
                format!(
                    "gRPC health check failed: grpc-status NOT_FOUND: {}\n",
                    shown_message()
                ),
            ),
        ];
        for (service, status, body) in cases {
            let probes = probes(ProbeScheme::Grpc, port, service);
            assert_eq!(check(&probes).await, (status, body), "{service:?}");
        }
    }

    #[tokio::test]
    async fn grpc_probe_fails_without_a_health_server() {
        let (port, _) = health_server(Health::Unimplemented).await;
        assert_eq!(
            check(&probes(ProbeScheme::Grpc, port, None)).await,
            (
                503,
                format!(
                    "gRPC health check failed: grpc-status UNIMPLEMENTED: {}\n",
                    shown_message()
                )
            )
        );
        let closed = probes(ProbeScheme::Grpc, closed_port().await, None);
        assert_eq!(
            check(&closed).await,
            (
                503,
                "gRPC health check failed: cannot connect: connection refused\n".into()
            )
        );
    }

    /// What the application sends is bounded and checked: an oversized or malformed
    /// answer is a failed probe, not a panic or a buffered megabyte.
    #[tokio::test]
    async fn grpc_probe_refuses_oversized_and_garbage_answers() {
        let (port, _) = health_server(Health::Oversized).await;
        assert_eq!(
            check(&probes(ProbeScheme::Grpc, port, None)).await,
            (
                503,
                "gRPC health check failed: response larger than 1024 bytes\n".into()
            )
        );
        let (port, _) = health_server(Health::Garbage).await;
        let (status, body) = check(&probes(ProbeScheme::Grpc, port, None)).await;
        assert_eq!(status, 503);
        assert!(body.contains("malformed response"), "{body}");

        // Not HTTP/2 at all.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let (status, body) = check(&probes(ProbeScheme::Grpc, port, None)).await;
        assert_eq!(status, 503);
        assert!(
            body.starts_with("gRPC health check failed: HTTP/2"),
            "{body}"
        );
    }

    /// A server that takes the call and never answers: the probe fails when its
    /// timeout passes, and its connection is closed.
    #[tokio::test]
    async fn grpc_probe_times_out_and_closes_its_connection() {
        let (port, mut events) = health_server(Health::Silent).await;
        let probes = probes(ProbeScheme::Grpc, port, None);
        let probing = tokio::spawn(async move { check(&probes).await });
        assert_eq!(events.recv().await, Some("request"));
        // The call is waiting for its answer: only time can end it now.
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(5)).await;
        // Bounded too: a probe that ignored its timeout fails here instead of hanging.
        let answer = tokio::time::timeout(Duration::from_secs(1), probing).await;
        assert_eq!(
            answer.expect("the probe's timeout").unwrap(),
            (503, "application probe timed out\n".into())
        );
        tokio::time::resume();
        let closed = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
        assert_eq!(closed, Ok(Some("connection closed")));
    }

    #[tokio::test]
    async fn tcp_probe_is_200_while_the_port_accepts() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let probes = probes(ProbeScheme::Tcp, port, None);
        assert_eq!(
            check(&probes).await,
            (200, "application accepts connections\n".into())
        );
        drop(listener);
        assert_eq!(
            check(&probes).await,
            (503, "application unreachable: connection refused\n".into())
        );
    }

    #[tokio::test]
    async fn http_probe_answers_with_the_application_status() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = service_fn(|request: http::Request<Incoming>| async move {
                    let status = if request.uri().path() == "/" {
                        204
                    } else {
                        404
                    };
                    let mut response = http::Response::new(Empty::<Bytes>::new());
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    Ok::<_, Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        let probes = probes(ProbeScheme::Http, port, None);
        assert_eq!(
            check(&probes).await,
            (204, "application answered 204 No Content\n".into())
        );
        assert_eq!(
            probes.check("/app-health/other/livez").await.status,
            StatusCode::NOT_FOUND
        );
    }
}
