//! Test applications: an HTTP/1.1 + HTTP/2 server whose behaviour tests switch at run
//! time, a gRPC service with every call kind, gRPC's standard health service, a
//! WebSocket echo, and a server-speaks-first TCP service.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

pub mod echo_proto {
    tonic::include_proto!("tessera.test.v1");
}

pub mod health_proto {
    tonic::include_proto!("grpc.health.v1");
}

use echo_proto::Message;
use echo_proto::echo_server::{Echo, EchoServer as GrpcEchoServer};
use health_proto::health_check_response::ServingStatus;
use health_proto::health_server::{Health, HealthServer};
use health_proto::{HealthCheckRequest, HealthCheckResponse};

/// What the HTTP backend does with `/flaky` and every request when told to reset.
#[derive(Default)]
pub struct Behaviour {
    /// Percentage of `/flaky` requests answered 503.
    pub failure_percent: AtomicU32,
    /// When 1, every request is answered by dropping the connection.
    pub reset: AtomicU32,
    /// Delay before every answer, in milliseconds.
    pub delay_ms: AtomicU32,
    /// Up to this many extra milliseconds, at random.
    pub jitter_ms: AtomicU32,
}

/// A running HTTP backend.
pub struct HttpBackend {
    pub address: SocketAddr,
    pub name: String,
    pub behaviour: Arc<Behaviour>,
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpBackend {
    /// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on a loopback port:
    /// `/echo` streams the body back, `/upload` counts it, `/flaky` fails sometimes,
    /// `/fail` always 503, `/sleep/<ms>` answers late, `/ws` is a WebSocket echo,
    /// anything else answers with the backend's name.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let address = listener.local_addr().expect("backend address");
        let behaviour = Arc::new(Behaviour::default());
        let requests = Arc::new(AtomicU64::new(0));
        let state = (name.to_string(), behaviour.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let (name, behaviour, requests) = state.clone();
                        async move { respond(request, &name, &behaviour, &requests).await }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            address,
            name: name.to_string(),
            behaviour,
            requests,
            task,
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(text: impl Into<Bytes>) -> BoxBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn respond(
    request: Request<Incoming>,
    name: &str,
    behaviour: &Behaviour,
    requests: &AtomicU64,
) -> Result<Response<BoxBody>, std::io::Error> {
    requests.fetch_add(1, Ordering::SeqCst);
    if behaviour.reset.load(Ordering::SeqCst) == 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "told to reset",
        ));
    }
    let jitter = behaviour.jitter_ms.load(Ordering::SeqCst);
    let delay = behaviour.delay_ms.load(Ordering::SeqCst)
        + if jitter > 0 {
            rand::random::<u32>() % jitter
        } else {
            0
        };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
    }
    let path = request.uri().path().to_string();
    let response = match path.as_str() {
        "/echo" => Response::new(request.into_body().boxed()),
        "/upload" => {
            let mut body = request.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame
                    .map_err(|e| std::io::Error::other(e.to_string()))?
                    .into_data()
                {
                    total += data.len() as u64;
                }
            }
            Response::new(full(total.to_string()))
        }
        "/flaky" => {
            let percent = behaviour.failure_percent.load(Ordering::SeqCst);
            if rand::random::<u32>() % 100 < percent {
                status(StatusCode::SERVICE_UNAVAILABLE, "flaky")
            } else {
                Response::new(full(name.to_string()))
            }
        }
        "/fail" => status(StatusCode::SERVICE_UNAVAILABLE, "down"),
        "/ws" => websocket(request),
        // A response head of about this many bytes.
        path if path.starts_with("/header/") => {
            let size = path["/header/".len()..].parse().unwrap_or(0);
            let mut response = Response::new(full("big head"));
            let value = http::HeaderValue::from_str(&"x".repeat(size)).expect("ASCII value");
            response.headers_mut().insert("x-big", value);
            response
        }
        path if path.starts_with("/sleep/") => {
            let ms = path["/sleep/".len()..].parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full("slept"))
        }
        _ => {
            let host = request
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_string();
            let mut response = Response::new(full(name.to_string()));
            response.headers_mut().insert(
                "x-seen-host",
                host.parse().unwrap_or(http::HeaderValue::from_static("")),
            );
            let authority = request
                .uri()
                .authority()
                .map_or(String::new(), |a| a.to_string());
            response.headers_mut().insert(
                "x-seen-authority",
                authority
                    .parse()
                    .unwrap_or(http::HeaderValue::from_static("")),
            );
            response.headers_mut().insert(
                "x-seen-version",
                format!("{:?}", request.version())
                    .parse()
                    .unwrap_or(http::HeaderValue::from_static("")),
            );
            response
        }
    };
    Ok(response)
}

fn status(code: StatusCode, text: &'static str) -> Response<BoxBody> {
    let mut response = Response::new(full(text));
    *response.status_mut() = code;
    response
}

/// Accepts a WebSocket upgrade and echoes every message.
fn websocket(mut request: Request<Incoming>) -> Response<BoxBody> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return status(StatusCode::BAD_REQUEST, "not a websocket request");
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() || socket.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(accept) = derive_accept_key(key.as_bytes()).parse() {
        headers.insert("sec-websocket-accept", accept);
    }
    response
}

/// The gRPC test service: echoes, counts, and sets a trailer on every answer.
#[derive(Default)]
pub struct EchoService;

type MessageStream = Pin<Box<dyn Stream<Item = Result<Message, Status>> + Send>>;

fn with_trailer<T>(message: T) -> GrpcResponse<T> {
    let mut response = GrpcResponse::new(message);
    response
        .metadata_mut()
        .insert("x-served-by", "echo".parse().expect("ascii"));
    response
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: GrpcRequest<Message>) -> Result<GrpcResponse<Message>, Status> {
        let message = request.into_inner();
        if message.text == "fail" {
            return Err(Status::failed_precondition("asked to fail"));
        }
        Ok(with_trailer(Message {
            text: format!("echo: {}", message.text),
            count: message.count + 1,
        }))
    }

    type ServerStreamStream = MessageStream;

    async fn server_stream(
        &self,
        request: GrpcRequest<Message>,
    ) -> Result<GrpcResponse<MessageStream>, Status> {
        let message = request.into_inner();
        let items = (0..message.count).map(move |i| {
            Ok(Message {
                text: format!("{} #{i}", message.text),
                count: i,
            })
        });
        Ok(with_trailer(Box::pin(tokio_stream::iter(items))))
    }

    async fn client_stream(
        &self,
        request: GrpcRequest<Streaming<Message>>,
    ) -> Result<GrpcResponse<Message>, Status> {
        let mut stream = request.into_inner();
        let (mut texts, mut count) = (Vec::new(), 0);
        while let Some(message) = stream.message().await? {
            texts.push(message.text);
            count += message.count;
        }
        Ok(with_trailer(Message {
            text: texts.join(","),
            count,
        }))
    }

    type BidiStream = MessageStream;

    async fn bidi(
        &self,
        request: GrpcRequest<Streaming<Message>>,
    ) -> Result<GrpcResponse<MessageStream>, Status> {
        let stream = request.into_inner().map(|message| {
            message.map(|m| Message {
                text: m.text.to_uppercase(),
                count: m.count * 2,
            })
        });
        Ok(with_trailer(Box::pin(stream)))
    }
}

/// Serves [`EchoService`] over plaintext HTTP/2 on a loopback port.
pub async fn start_grpc() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let address = listener.local_addr().expect("grpc address");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(GrpcEchoServer::new(EchoService))
            .serve_with_incoming(incoming)
            .await;
    });
    (address, task)
}

/// gRPC's standard health service as applications serve it (tonic-health, grpc-go's
/// health package): a status per service name, `""` for the server as a whole, and
/// NOT_FOUND for a name it does not know.
#[derive(Clone, Default)]
pub struct HealthService {
    statuses: Arc<std::sync::Mutex<std::collections::HashMap<String, ServingStatus>>>,
}

impl HealthService {
    pub fn set(&self, service: &str, status: ServingStatus) {
        if let Ok(mut statuses) = self.statuses.lock() {
            statuses.insert(service.to_string(), status);
        }
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: GrpcRequest<HealthCheckRequest>,
    ) -> Result<GrpcResponse<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        let status = self
            .statuses
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .get(&service)
            .copied()
            .ok_or_else(|| Status::not_found("unknown service"))?;
        Ok(GrpcResponse::new(HealthCheckResponse {
            status: status.into(),
        }))
    }
}

/// Serves [`EchoService`] and `health` over plaintext HTTP/2 on a loopback port, until
/// the task is aborted.
pub async fn start_grpc_with_health(
    health: HealthService,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let address = listener.local_addr().expect("grpc address");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(GrpcEchoServer::new(EchoService))
            .add_service(HealthServer::new(health))
            .serve_with_incoming(incoming)
            .await;
    });
    (address, task)
}

/// A server-speaks-first service (think SMTP): greets on accept, then echoes a line.
pub async fn start_greeter() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind greeter");
    let address = listener.local_addr().expect("greeter address");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"220 tessera-test ESMTP ready\r\n").await;
                let mut buffer = [0u8; 1024];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut buffer).await {
                    if n == 0 || stream.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (address, task)
}
