//! HTTP/1.1 through a proxy pair: keep-alive, large streamed uploads with bounded proxy
//! memory, WebSocket, oversized response heads, and honest errors.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{Http1Client, L7Mesh};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread")]
async fn http1_keep_alive_carries_many_requests_on_one_connection() {
    let backend = HttpBackend::start("alpha").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
    for i in 0..50 {
        let body = Bytes::from(format!("ping {i}"));
        let answer = client
            .send(Method::POST, "/echo", body.clone())
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, body);
    }
    assert!(client.is_open(), "keep-alive connection was closed");
    // The application sees HTTP/1.1 and the caller's Host, restored after the HTTP/2 hop.
    let answer = client.get("/").await.unwrap();
    assert_eq!(answer.headers["x-seen-version"], "HTTP/1.1");
    assert_eq!(answer.headers["x-seen-host"], "backend.shop");
    assert_eq!(answer.body, "alpha");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_application_sees_the_callers_authority() {
    let backend = HttpBackend::start("beta").await;
    let mesh = L7Mesh::start(&[backend.address], "detect", None).await;
    let stream = tokio::net::TcpStream::connect(mesh.entry()).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("http://backend.shop/")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // HTTP/2 end to end, and the authority the caller asked for, not the application's
    // own address: what virtual hosting on `:authority` needs. No `Host` added beside it.
    assert_eq!(response.headers()["x-seen-version"], "HTTP/2.0");
    assert_eq!(response.headers()["x-seen-authority"], "backend.shop");
    assert_eq!(response.headers()["x-seen-host"], "");
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_upload_of_100_mb_streams_with_bounded_memory() {
    let backend = HttpBackend::start("upload").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let stream = tokio::net::TcpStream::connect(mesh.entry()).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);

    const CHUNK: usize = 256 * 1024;
    const TOTAL: usize = 100 * 1024 * 1024;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; CHUNK]);
        for _ in 0..TOTAL / CHUNK {
            if tx
                .send(Ok(http_body::Frame::data(chunk.clone())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // No content-length: hyper sends it chunked.
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let request = http::Request::post("/upload")
        .header("host", "backend.shop")
        .body(body)
        .unwrap();
    let started = Instant::now();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let counted = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(counted, TOTAL.to_string());
    let elapsed = started.elapsed();
    let client_rss = mesh.client.process.peak_rss();
    let server_rss = mesh.servers[0].process.peak_rss();
    println!(
        "100 MiB chunked upload in {elapsed:?} ({:.0} MiB/s); peak RSS client proxy {} MiB, server proxy {} MiB",
        100.0 / elapsed.as_secs_f64(),
        client_rss >> 20,
        server_rss >> 20
    );
    // Streaming, not buffering: each proxy stays far below the 100 MiB it carried.
    assert!(
        client_rss < 48 << 20 && server_rss < 48 << 20,
        "client {client_rss} server {server_rss}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_the_mesh() {
    let backend = HttpBackend::start("ws").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let stream = tokio::net::TcpStream::connect(mesh.entry()).await.unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async("ws://backend.shop/ws", stream)
        .await
        .expect("websocket handshake through the proxies");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "through", "two proxies"] {
        socket.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    let binary = vec![1u8, 2, 3, 255];
    socket.send(Message::binary(binary.clone())).await.unwrap();
    let echoed = socket.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_data().to_vec(), binary);
    socket.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_response_head_gets_a_named_502_and_the_connection_goes_on() {
    let backend = HttpBackend::start("heads").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
    let fits = client.get("/header/12000").await.unwrap();
    assert_eq!(fits.status, StatusCode::OK);
    assert_eq!(fits.headers["x-big"].len(), 12000);
    let too_large = client.get("/header/20000").await.unwrap();
    assert_eq!(too_large.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        too_large.headers["tessera-proxy-error"],
        "response-headers-too-large"
    );
    let after = client.get("/").await.unwrap();
    assert_eq!(
        after.status,
        StatusCode::OK,
        "the caller's connection stays usable"
    );
    assert_eq!(after.body, "heads");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_service_and_dead_application_get_honest_errors() {
    let backend = HttpBackend::start("gone").await;
    let address = backend.address;
    let mesh = L7Mesh::start(&[address], "http", None).await;
    drop(backend);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
    let answer = client.get("/").await.unwrap();
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        answer.headers["tessera-proxy-error"],
        "application-unavailable"
    );
    let body = String::from_utf8_lossy(&answer.body);
    assert!(
        !body.contains("127.0.0.1"),
        "internal address in body: {body}"
    );

    // Remove every workload: the service has no endpoint left.
    mesh.control_plane.write_config(
        "backend.yaml",
        &tessera_tests::l7::service_config("http", &[], None),
    );
    let mut status = 0;
    for _ in 0..50 {
        let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
        let answer = client.get("/").await.unwrap();
        status = answer.status.as_u16();
        if status == 503 {
            assert_eq!(
                answer.headers["tessera-proxy-error"],
                "no-healthy-endpoints"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 503);
}
