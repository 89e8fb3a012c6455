//! Protocol detection must not stall server-speaks-first protocols: their greeting
//! arrives within half a second with no configuration, and at once on a port declared
//! opaque.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tessera_tests::backend::start_greeter;
use tessera_tests::l7::L7Mesh;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects, waits for the greeting without sending anything, then checks the echo.
async fn time_to_greeting(entry: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(entry).await.unwrap();
    let mut greeting = [0u8; 30];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut greeting))
        .await
        .expect("greeting in time")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(&greeting, b"220 tessera-test ESMTP ready\r\n");
    stream.write_all(b"EHLO mesh\r\n").await.unwrap();
    let mut echo = [0u8; 11];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"EHLO mesh\r\n");
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn server_speaks_first_works_without_configuration() {
    let (greeter, _task) = start_greeter().await;
    let mesh = L7Mesh::start(&[greeter], "detect", None).await;
    let took = time_to_greeting(mesh.entry()).await;
    println!("first byte through the mesh with detection: {took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_speaks_first_on_an_opaque_port_has_no_delay() {
    let (greeter, _task) = start_greeter().await;
    let mesh = L7Mesh::start(&[greeter], "opaque", None).await;
    let took = time_to_greeting(mesh.entry()).await;
    println!("first byte through the mesh on an opaque port: {took:?}");
    // No detection wait (200 ms): only connection setup and two handshakes remain.
    assert!(took < Duration::from_millis(150), "{took:?}");
}
