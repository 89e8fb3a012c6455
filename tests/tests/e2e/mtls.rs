//! The mTLS TCP path between two proxies, and everything it must refuse.

use std::sync::Arc;
use std::time::Duration;

use tessera_mesh::SpiffeId;
use tessera_mesh::tls::{self, CurrentCert, Trust, TrustBundle};
use tessera_tests::certs::{Leaf, TestCa};
use tessera_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

/// A control plane, a server proxy in front of an echo server, and a client proxy with
/// upstreams pointing at the server proxy (one expecting the right identity, one not).
struct Mesh {
    control_plane: ControlPlane,
    echo: EchoServer,
    server: Proxy,
    client: Proxy,
}

/// The labels of `tessera_tcp_connections_total` for an mTLS connection from the
/// workload `source` to `destination` (both of the test namespace).
fn connection(source: &str, destination: &str) -> String {
    format!(
        "source_workload=\"{source}\",source_namespace=\"{NAMESPACE}\",source_identity=\"{}\",\
         destination_workload=\"{destination}\",destination_namespace=\"{NAMESPACE}\",\
         destination_identity=\"{}\",security=\"mtls\"",
        spiffe(source),
        spiffe(destination)
    )
}

async fn mesh() -> Mesh {
    init();
    let control_plane = ControlPlane::start("1h", "").await;
    let echo = EchoServer::start().await;
    let ProxyPair { server, client } =
        ProxyPair::start(&control_plane, echo.address, &["server", "impostor-check"]).await;
    Mesh {
        control_plane,
        echo,
        server,
        client,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_cross_mutual_tls_intact_with_half_close() {
    let mesh = mesh().await;
    let payload = random_payload(1 << 20);
    let echoed = echo_roundtrip(mesh.client.outbound(0), &payload)
        .await
        .expect("echo through the mesh");
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echoed bytes differ");

    // Each side names the other by its verified SPIFFE ID.
    let (_, server_metrics) = mesh.server.admin("/metrics").await.unwrap();
    assert!(
        server_metrics.contains(&format!(
            "tessera_tcp_connections_total{{direction=\"inbound\",{}}} 1",
            connection("client", "server")
        )),
        "{server_metrics}"
    );
    let (_, client_metrics) = mesh.client.admin("/metrics").await.unwrap();
    assert!(
        client_metrics.contains(&format!(
            "tessera_tcp_connections_total{{direction=\"outbound\",{}}} 1",
            connection("client", "server")
        )),
        "{client_metrics}"
    );
    assert!(
        client_metrics
            .contains("tessera_tcp_bytes_total{direction=\"outbound\",flow=\"sent\"} 1048576"),
        "{client_metrics}"
    );
    assert!(client_metrics.contains("tessera_identity_cert_expiry_timestamp_seconds"));

    // The connection is counted closed once both directions finished; the pooled mTLS
    // connection that tunnelled it stays open (and counted) for the next one.
    let mut closed = false;
    for _ in 0..50 {
        let (_, metrics) = mesh.server.admin("/metrics").await.unwrap();
        if metrics.contains("tessera_tcp_connections_closed_total{direction=\"inbound\"} 1") {
            assert!(
                metrics.contains("tessera_tcp_connections_active{direction=\"inbound\"} 1"),
                "{metrics}"
            );
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "closed connection not counted");

    // Further connections are tunnelled over that one mTLS connection: no new handshake.
    for _ in 0..5 {
        let echoed = echo_roundtrip(mesh.client.outbound(0), b"again")
            .await
            .unwrap();
        assert_eq!(echoed, b"again");
    }
    let (_, server_metrics) = mesh.server.admin("/metrics").await.unwrap();
    assert!(
        server_metrics.contains(&format!(
            "tessera_tcp_connections_total{{direction=\"inbound\",{}}} 1",
            connection("client", "server")
        )),
        "{server_metrics}"
    );

    // The admin endpoint shows the certificate, never the key or the token.
    let (status, certs) = mesh.server.admin("/certs").await.unwrap();
    assert_eq!(status, 200);
    assert!(certs.contains(&spiffe("server")), "{certs}");
    // Times as operators read them: RFC 3339, UTC.
    let certificate: serde_json::Value = serde_json::from_str(&certs).unwrap();
    for field in ["not_before", "not_after", "renew_at"] {
        let at = certificate[field].as_str().unwrap_or_default();
        let shape = at.len() == 20 && at.as_bytes()[10] == b'T' && at.ends_with('Z');
        assert!(shape && at.starts_with("20"), "{field}: {at}");
    }
    // The admin port says what it serves.
    let (status, index) = mesh.server.admin("/").await.unwrap();
    assert_eq!(status, 200);
    for endpoint in [
        "/live",
        "/ready",
        "/metrics",
        "/certs",
        "/config",
        "/migration",
    ] {
        assert!(index.contains(endpoint), "{index}");
    }
    let (_, config) = mesh.client.admin("/config").await.unwrap();
    let token = std::fs::read_to_string(mesh.client.dir.path().join("token")).unwrap();
    assert!(!config.contains(&token) && !certs.contains("PRIVATE"));

    // The control plane logged each issuance with identity, serial, expiry and caller.
    let issued = mesh
        .control_plane
        .process
        .logs
        .matching(&["certificate issued", &spiffe("server")]);
    assert_eq!(issued.len(), 1, "{issued:?}");
    for field in [
        "serial=",
        "not_after=",
        "caller=127.0.0.1:",
        "authenticated_by=JoinToken",
    ] {
        assert!(
            issued[0].contains(field),
            "missing {field} in {}",
            issued[0]
        );
    }
    for logs in [
        &mesh.control_plane.process.logs,
        &mesh.client.process.logs,
        &mesh.server.process.logs,
    ] {
        for line in logs.lines() {
            assert!(
                !line.contains(&token) && !line.contains("PRIVATE KEY"),
                "secret in log: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_refuses_a_server_with_another_identity() {
    let mesh = mesh().await;
    let result = echo_roundtrip(mesh.client.outbound(1), b"must not arrive").await;
    assert!(
        result.map(|echo| echo.is_empty()).unwrap_or(true),
        "data came back from an unverified server"
    );
    let line = mesh
        .client
        .process
        .logs
        .wait_for(
            &["outbound connection refused", "UnexpectedIdentity"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(
        line.contains(&spiffe("server")) && line.contains(&spiffe("impostor-check")),
        "{line}"
    );
    assert_eq!(mesh.echo.received(), 0, "bytes reached the application");
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_to_an_mtls_port_is_refused() {
    let mesh = mesh().await;
    let mut stream = tokio::net::TcpStream::connect(mesh.server.inbound())
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: server\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
    assert!(reply.is_empty(), "plaintext got an answer");
    mesh.server
        .process
        .logs
        .wait_for(
            &["inbound connection refused", "Plaintext"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(mesh.echo.received(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_and_expired_client_certificates_are_refused() {
    let mesh = mesh().await;
    let foreign_ca = TestCa::root("Tessera development root CA");
    let foreign = foreign_ca.leaf(
        &spiffe("client"),
        Duration::from_secs(60),
        Duration::from_secs(3600),
        false,
    );
    assert_refused_by_server(&mesh, foreign, "UntrustedCertificate").await;

    let mesh_ca = TestCa::from_state_dir(&mesh.control_plane.state_dir());
    let expired = mesh_ca.leaf(
        &spiffe("client"),
        Duration::from_secs(7200),
        Duration::from_secs(3600),
        true,
    );
    let line = assert_refused_by_server(&mesh, expired, "UntrustedCertificate").await;
    assert!(line.to_lowercase().contains("expired"), "{line}");

    // Control: a valid certificate from the same CA, presented the same way, is accepted.
    let valid = mesh_ca.leaf(
        &spiffe("client"),
        Duration::from_secs(60),
        Duration::from_secs(3600),
        false,
    );
    let reply = present(&mesh, valid, b"hello")
        .await
        .expect("valid certificate accepted");
    assert_eq!(reply, b"hello");
}

/// Connects straight to the server proxy's inbound port with `leaf` as client
/// certificate; the echo must stay silent and the server must log the refusal.
async fn assert_refused_by_server(mesh: &Mesh, leaf: Leaf, reason: &str) -> String {
    let before = mesh
        .server
        .process
        .logs
        .count(&["inbound connection refused", reason]);
    let reply = present(mesh, leaf, b"must not arrive").await;
    assert!(
        reply.map(|r| r.is_empty()).unwrap_or(true),
        "refused peer got an answer"
    );
    assert!(
        eventually(Duration::from_secs(5), || mesh
            .server
            .process
            .logs
            .count(&["inbound connection refused", reason])
            > before)
        .await,
        "no refusal logged; log:\n{}",
        mesh.server.process.logs.lines().join("\n")
    );
    assert_eq!(mesh.echo.received(), 0, "bytes reached the application");
    mesh.server
        .process
        .logs
        .matching(&["inbound connection refused", reason])
        .pop()
        .unwrap()
}

/// A TLS client presenting `leaf`, verifying the server as the mesh does.
async fn present(mesh: &Mesh, leaf: Leaf, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    let bundle = TrustBundle::from_pem(&std::fs::read(mesh.control_plane.trust_bundle_file())?)?;
    let trust = Trust::new(TRUST_DOMAIN, bundle);
    let cert = CurrentCert::new();
    cert.set(rustls::sign::CertifiedKey::from_der(
        leaf.chain,
        leaf.key,
        &tls::crypto_provider(),
    )?);
    let expected: SpiffeId = spiffe("server").parse()?;
    // ALPN tessera/tcp: opaque bytes on a connection of their own, as proxies that
    // predate tunnelling over the pooled HTTP/2 connection send them.
    let config = tls::client_config(trust, expected, Some(cert), &[b"tessera/tcp"])?;
    let tcp = tokio::net::TcpStream::connect(mesh.server.inbound()).await?;
    let peer = tcp.peer_addr()?;
    let mut stream = TlsConnector::from(Arc::new(config))
        .connect(tls::server_name_for(peer), tcp)
        .await?;
    stream.write_all(message).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await??;
    Ok(reply)
}

/// Issue 21: every tunnel to a peer rode one pooled HTTP/2 connection, so past the
/// peer's stream limit (250 by default) a new TCP connection waited, silent, for an
/// old one to close. Here the peer allows 2 streams per connection and 7 TCP
/// connections stay open at once: each must be carried, on connections of their own.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_connections_past_the_peers_stream_limit_get_more_pooled_connections() {
    init();
    let mut control_plane = ControlPlane::start("1h", "").await;
    control_plane.proxy_limits = "  maxConcurrentStreamsPerPeerConnection: 2\n".into();
    let echo = EchoServer::start().await;
    let ProxyPair { server, client } =
        ProxyPair::start(&control_plane, echo.address, &["server"]).await;
    let mut open = Vec::new();
    for index in 0..7u8 {
        let mut stream = tokio::net::TcpStream::connect(client.outbound(0))
            .await
            .unwrap();
        let message = [b'a' + index; 16];
        stream.write_all(&message).await.unwrap();
        let mut echoed = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .unwrap_or_else(|_| panic!("connection {index} was not carried"))
            .unwrap();
        assert_eq!(echoed, message);
        open.push(stream);
    }
    // Still all open and carried.
    for (index, stream) in open.iter_mut().enumerate() {
        stream.write_all(b"again").await.unwrap();
        let mut echoed = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .unwrap_or_else(|_| panic!("connection {index} stalled"))
            .unwrap();
        assert_eq!(&echoed, b"again");
    }
    drop(server);
}

/// A peer proxy from before tunnelling offers `h2` but not `tessera/h2`: opaque TCP must
/// then reach it the way it expects, over a connection of its own (ALPN `tessera/tcp`),
/// not as a `CONNECT` it would take for an HTTP request.
#[tokio::test(flavor = "multi_thread")]
async fn opaque_tcp_reaches_a_peer_that_predates_tunnels() {
    init();
    let control_plane = ControlPlane::start("1h", "").await;
    let old_peer = OldPeer::start(&control_plane).await;
    let client = control_plane.proxy(
        "client",
        None,
        &[Upstream::fixed(old_peer.address, spiffe("server"))],
    );
    client.wait_ready(Duration::from_secs(20)).await.unwrap();

    for _ in 0..3 {
        let echoed = echo_roundtrip(client.outbound(0), b"to an older proxy")
            .await
            .unwrap();
        assert_eq!(echoed, b"to an older proxy");
    }
    let seen = old_peer.alpn.lock().unwrap().clone();
    assert_eq!(
        seen.iter()
            .filter(|alpn| alpn.as_slice() == b"tessera/tcp")
            .count(),
        3,
        "{seen:?}"
    );
    assert_eq!(
        old_peer.connects.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// What an inbound proxy of the previous version speaks: HTTP/2 (answering every request,
/// CONNECT included, as HTTP) and opaque bytes on `tessera/tcp` connections (echoed).
struct OldPeer {
    address: std::net::SocketAddr,
    /// ALPN of every accepted connection.
    alpn: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    /// CONNECT requests received over HTTP/2 (an old peer would mishandle them).
    connects: Arc<std::sync::atomic::AtomicUsize>,
}

impl OldPeer {
    async fn start(control_plane: &ControlPlane) -> Self {
        let leaf = TestCa::from_state_dir(&control_plane.state_dir()).leaf(
            &spiffe("server"),
            Duration::from_secs(60),
            Duration::from_secs(3600),
            false,
        );
        let bundle =
            TrustBundle::from_pem(&std::fs::read(control_plane.trust_bundle_file()).unwrap())
                .unwrap();
        let cert = CurrentCert::new();
        cert.set(
            rustls::sign::CertifiedKey::from_der(leaf.chain, leaf.key, &tls::crypto_provider())
                .unwrap(),
        );
        let config = tls::server_config(
            Trust::new(TRUST_DOMAIN, bundle),
            cert,
            tls::ClientAuth::Required,
            &[b"h2", b"http/1.1", b"tessera/tcp"],
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = Self {
            address: listener.local_addr().unwrap(),
            alpn: Arc::default(),
            connects: Arc::default(),
        };
        let (alpn, connects) = (peer.alpn.clone(), peer.connects.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, alpn, connects) = (acceptor.clone(), alpn.clone(), connects.clone());
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let negotiated = stream
                        .get_ref()
                        .1
                        .alpn_protocol()
                        .unwrap_or_default()
                        .to_vec();
                    alpn.lock().unwrap().push(negotiated.clone());
                    if negotiated == b"tessera/tcp" {
                        let mut received = Vec::new();
                        let _ = stream.read_to_end(&mut received).await;
                        let _ = stream.write_all(&received).await;
                        let _ = stream.shutdown().await;
                        return;
                    }
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            if request.method() == http::Method::CONNECT {
                                connects.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            async {
                                let mut response = http::Response::new(http_body_util::Empty::<
                                    bytes::Bytes,
                                >::new(
                                ));
                                *response.status_mut() = http::StatusCode::BAD_GATEWAY;
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        peer
    }
}
