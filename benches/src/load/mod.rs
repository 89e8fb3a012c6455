//! Load generators. Closed loop (a fixed number of connections, each sending its next
//! request when the previous answer arrives): `wrk` for HTTP/1.1, `h2load` for HTTP/2,
//! and our own for TCP echo. Open loop (requests sent at fixed times whatever the
//! answers do): our own, `open_loop`, which measures latency from each request's
//! intended send time. Every result names the generator that produced it.

pub mod echo;
pub mod h2load;
pub mod http_client;
pub mod idle;
pub mod open_loop;
pub mod wrk;

use std::time::Duration;

use serde::Serialize;

/// What a load run served.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// The tool, or which of ours, with its settings.
    pub generator: String,
    /// Requests (or echo round trips, or connections) answered successfully.
    pub completed: u64,
    /// Failed requests: transport errors and non-2xx answers.
    pub errors: u64,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
    /// Open-loop runs only.
    pub latency: Option<Latency>,
}

impl LoadResult {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

fn seconds<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

/// A request to repeat: HTTP/1.1 or HTTP/2 (prior knowledge) to one address.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub version: HttpVersion,
    pub address: std::net::SocketAddr,
    pub method: http::Method,
    pub path: String,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub body: bytes::Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// The gRPC path `h2load` and the open-loop generator call.
pub const GRPC_UNARY_PATH: &str = "/tessera.test.v1.Echo/Unary";

/// A length-prefixed gRPC message: `Echo/Unary` with a short text.
pub fn grpc_unary_body() -> bytes::Bytes {
    use prost::Message as _;
    let message = tessera_tests::backend::echo_proto::Message {
        text: "benchmark".into(),
        count: 1,
    };
    let encoded = message.encode_to_vec();
    let mut framed = Vec::with_capacity(5 + encoded.len());
    framed.push(0); // not compressed
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    framed.into()
}

impl HttpRequest {
    pub fn get(address: std::net::SocketAddr, path: &str) -> Self {
        Self {
            version: HttpVersion::Http1,
            address,
            method: http::Method::GET,
            path: path.to_string(),
            headers: Vec::new(),
            body: bytes::Bytes::new(),
        }
    }

    pub fn grpc_unary(address: std::net::SocketAddr) -> Self {
        Self {
            version: HttpVersion::Http2,
            address,
            method: http::Method::POST,
            path: GRPC_UNARY_PATH.to_string(),
            headers: vec![
                (
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                ),
                (http::header::TE, http::HeaderValue::from_static("trailers")),
            ],
            body: grpc_unary_body(),
        }
    }
}
