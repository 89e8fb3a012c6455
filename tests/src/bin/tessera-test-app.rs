//! `tessera-test-app`: plain applications with no knowledge of the mesh, run inside the
//! network-namespace "pods" of the transparent-mode tests.
//!
//! - `http-server LISTEN BODY`: answers every request with BODY (`/healthz`: "healthy");
//! - `grpc-server LISTEN`: the Echo gRPC service, and the standard health service
//!   (SERVING);
//! - `grpc-client URL TEXT`: one unary Echo call, prints the reply's text.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_tests::backend::echo_proto::Message;
use tessera_tests::backend::echo_proto::echo_client::EchoClient;
use tessera_tests::backend::echo_proto::echo_server::EchoServer;
use tessera_tests::backend::health_proto::health_check_response::ServingStatus;
use tessera_tests::backend::health_proto::health_server::HealthServer;
use tessera_tests::backend::{EchoService, HealthService};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["http-server", listen, body] => http_server(listen.parse()?, body.to_string()).await,
        ["grpc-server", listen] => grpc_server(listen.parse()?).await,
        ["grpc-client", url, text] => grpc_client(url, text).await,
        _ => bail!("usage: http-server LISTEN BODY | grpc-server LISTEN | grpc-client URL TEXT"),
    }
}

async fn http_server(listen: SocketAddr, body: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.context("bind")?;
    println!("listening on {listen}");
    let body = Bytes::from(body);
    loop {
        let (stream, _) = listener.accept().await?;
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let answer = if request.uri().path() == "/healthz" {
                    Bytes::from_static(b"healthy")
                } else {
                    body.clone()
                };
                async move { Ok::<_, Infallible>(Response::new(Full::new(answer))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn grpc_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.context("bind")?;
    println!("listening on {listen}");
    let health = HealthService::default();
    health.set("", ServingStatus::Serving);
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(EchoService))
        .add_service(HealthServer::new(health))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .context("serve")
}

async fn grpc_client(url: &str, text: &str) -> anyhow::Result<()> {
    let mut client = EchoClient::connect(url.to_string())
        .await
        .with_context(|| format!("connect {url}"))?;
    let reply = client
        .unary(Message {
            text: text.to_string(),
            count: 0,
        })
        .await
        .context("unary call")?;
    println!("{}", reply.into_inner().text);
    Ok(())
}
