//! A minimal HTTP client over one connection (hyper), for the open-loop generator and
//! the idle-connections test: no pool, no retries, so every request is one the caller
//! sent on the connection it chose.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::error::{BenchError, Result};
use crate::load::{HttpRequest, HttpVersion};

/// A sender on one connection.
pub enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    pub async fn connect(request: &HttpRequest) -> Result<Self> {
        let what = || format!("connect to {}", request.address);
        let stream = TcpStream::connect(request.address)
            .await
            .map_err(BenchError::io(what()))?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        Ok(match request.version {
            HttpVersion::Http1 => {
                let (sender, connection) = http1::handshake(io)
                    .await
                    .map_err(|e| BenchError::failed(what(), e))?;
                tokio::spawn(connection);
                Self::Http1(sender)
            }
            HttpVersion::Http2 => {
                let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| BenchError::failed(what(), e))?;
                tokio::spawn(connection);
                Self::Http2(sender)
            }
        })
    }

    /// Sends one request and reads the whole answer; true when it succeeded (2xx, and
    /// for gRPC no error status in the trailers).
    pub async fn send(&mut self, template: &HttpRequest) -> bool {
        let mut builder = http::Request::builder()
            .method(template.method.clone())
            .uri(&template.path);
        if template.version == HttpVersion::Http1 {
            builder = builder.header(http::header::HOST, "bench");
        } else {
            builder = builder.uri(format!("http://bench{}", template.path));
        }
        for (name, value) in &template.headers {
            builder = builder.header(name, value);
        }
        let Ok(request) = builder.body(Full::new(template.body.clone())) else {
            return false;
        };
        let response = match self {
            Self::Http1(sender) => match sender.ready().await {
                Ok(()) => sender.send_request(request).await,
                Err(error) => Err(error),
            },
            Self::Http2(sender) => match sender.ready().await {
                Ok(()) => sender.send_request(request).await,
                Err(error) => Err(error),
            },
        };
        let Ok(response) = response else {
            return false;
        };
        let ok = response.status().is_success();
        match response.into_body().collect().await {
            Ok(collected) => ok && grpc_ok(collected.trailers()),
            Err(_) => false,
        }
    }

    /// Another sender on the same HTTP/2 connection; `None` for HTTP/1.1.
    pub fn another_stream(&self) -> Option<Self> {
        match self {
            Self::Http1(_) => None,
            Self::Http2(sender) => Some(Self::Http2(sender.clone())),
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Self::Http1(sender) => sender.is_closed(),
            Self::Http2(sender) => sender.is_closed(),
        }
    }
}

/// No `grpc-status`, or `0`.
fn grpc_ok(trailers: Option<&http::HeaderMap>) -> bool {
    trailers
        .and_then(|t| t.get("grpc-status"))
        .is_none_or(|status| status == "0")
}
