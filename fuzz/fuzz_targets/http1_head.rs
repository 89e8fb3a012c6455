//! The inbound HTTP/1 head: bytes from a caller go through the proxy's HTTP/1 server
//! (`tessera_proxy::limits::http1_server`, hyper, over an in-memory duplex), then the
//! canonical form (`tessera_proxy::inbound::canonical`) and the policy engine, as the inbound
//! proxy does before forwarding.
//!
//! Properties: never panics and never hangs; a request with a canonical form has one
//! authority (at most one `Host`, equal to the target's authority when there is one)
//! and a normal path; canonicalizing it again changes nothing and decides the same;
//! what the application would receive (the `Host` field, the path) meets the DENY on
//! host `evil` and on `/admin*`.
//!
//! Not yet covered: the inbound proxy's own `request` path (its `Inbound` needs an
//! identity, a TLS acceptor and an application to build), and chunked bodies.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{plain_host, policies};
use tessera_mesh::policy::{self, Decision, HttpRequest, normalize_path};
use tessera_proxy::inbound::canonical::{self, canonicalize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    // Paused time: a head timeout fires as soon as nothing else can run.
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a tokio runtime")
    })
}

/// The decision the inbound proxy takes, on the same attributes it reads.
fn decide<B: Sync>(request: &Request<B>) -> Decision {
    let header = |name: &http::HeaderName| canonical::header(request, name);
    let attributes = policy::Request {
        source: None,
        destination: None,
        request_principal: None,
        jwt_claims: None,
        port: 8080,
        http: Some(HttpRequest {
            method: request.method().as_str(),
            path: request.uri().path(),
            query: None,
            host: canonical::host(request),
            scheme: "http",
            protocol: "HTTP/1.1",
            header: &header,
            headers: None,
        }),
    };
    policy::authorize(policies(), &attributes)
}

fn check(mut request: Request<Incoming>) -> StatusCode {
    if canonicalize(&mut request).is_err() {
        return StatusCode::BAD_REQUEST;
    }
    let seen = format!(
        "{} {} {:?}",
        request.method(),
        request.uri(),
        request.headers()
    );
    let hosts: Vec<_> = request.headers().get_all(header::HOST).iter().collect();
    assert!(hosts.len() <= 1, "{seen}: {} Host fields", hosts.len());
    if let (Some(authority), Some(host)) = (request.uri().authority(), hosts.first()) {
        assert_eq!(authority.as_str().as_bytes(), host.as_bytes(), "{seen}");
    }
    let path = request.uri().path();
    let special = path == "*" || (request.method() == Method::CONNECT && path.is_empty());
    if !special {
        let normal = normalize_path(path).unwrap_or_else(|e| panic!("{seen}: path {e}"));
        assert_eq!(normal, path, "{seen}: forwarded path is not normal");
    }
    let decision = decide(&request);
    let (uri, headers) = (request.uri().clone(), request.headers().clone());
    canonicalize(&mut request).unwrap_or_else(|e| panic!("{seen}: canonical form refused: {e}"));
    assert_eq!(
        request.uri(),
        &uri,
        "{seen}: canonicalizing twice moved the target"
    );
    assert_eq!(
        request.headers(),
        &headers,
        "{seen}: canonicalizing twice moved headers"
    );
    assert_eq!(decide(&request), decision, "{seen}: decided differently");

    // What the application reads: the Host field and the path.
    let app_host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if let Some(app_host) = app_host
        && plain_host(app_host) == "evil"
    {
        assert!(
            !decision.allowed,
            "{seen}: the application gets host evil: {decision:?}"
        );
    }
    if request.uri().path().starts_with("/admin") {
        assert!(
            !decision.allowed,
            "{seen}: the application gets /admin: {decision:?}"
        );
    }
    if decision.allowed {
        StatusCode::OK
    } else {
        StatusCode::FORBIDDEN
    }
}

async fn exchange(bytes: &[u8]) {
    let (caller, proxy) = tokio::io::duplex(16 * 1024);
    let service = service_fn(|request: Request<Incoming>| async move {
        let mut response = Response::new(Empty::<Bytes>::new());
        *response.status_mut() = check(request);
        Ok::<_, std::convert::Infallible>(response)
    });
    let server = tokio::spawn(
        tessera_proxy::limits::http1_server(Duration::from_secs(10))
            .serve_connection(TokioIo::new(proxy), service)
            .with_upgrades(),
    );
    let (mut read_half, mut write_half) = tokio::io::split(caller);
    let write = async {
        let _ = write_half.write_all(bytes).await;
        let _ = write_half.shutdown().await;
    };
    let read = async {
        let mut sink = Vec::new();
        let _ = read_half.read_to_end(&mut sink).await;
    };
    tokio::join!(write, read);
    // A panic in the service is a finding: let libFuzzer see it.
    if let Err(error) = server.await
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
}

fuzz_target!(|bytes: &[u8]| {
    let finished = runtime()
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), exchange(bytes)).await });
    assert!(
        finished.is_ok(),
        "the exchange did not finish: {:?}",
        String::from_utf8_lossy(bytes)
    );
});
