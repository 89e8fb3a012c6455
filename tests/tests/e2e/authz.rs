//! Authorization and request authentication enforced by real proxies: allowed and denied
//! HTTP, gRPC and TCP; JWT cases; `tessera policy explain` agreeing with the proxy.

use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use tessera_tests::backend::echo_proto::Message;
use tessera_tests::backend::echo_proto::echo_client::EchoClient;
use tessera_tests::backend::{HttpBackend, start_grpc};
use tessera_tests::jwt::{AUDIENCE, ISSUER, Issuer};
use tessera_tests::l7::{Http1Client, L7Mesh, resource};
use tessera_tests::{EchoServer, binary, echo_roundtrip, spiffe};

fn allow_client_get(paths: &str) -> String {
    resource(
        "AuthorizationPolicy",
        "backend-readers",
        &format!(
            "  selector: {{serviceAccount: backend}}\n  action: ALLOW\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n    to: [{{operation: {{methods: [GET], paths: [{paths}]}}}}]\n",
            spiffe("client")
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn http_calls_are_allowed_or_denied_by_policy() {
    let backend = HttpBackend::start("guarded").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    mesh.apply("policy.yaml", &allow_client_get("\"/public*\""))
        .await;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();

    let allowed = client.get("/public/menu").await.unwrap();
    assert_eq!(allowed.status, StatusCode::OK);
    let served = backend.requests();

    let denied = client.get("/admin").await.unwrap();
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.headers["tessera-proxy-error"], "access-denied");
    assert!(
        !String::from_utf8_lossy(&denied.body).contains("backend-readers"),
        "policy internals in the body"
    );
    // Path tricks do not get around the rule: the path is normalized before matching.
    for sneaky in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "//public/../admin",
    ] {
        let answer = client.get(sneaky).await.unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{sneaky}");
    }
    assert_eq!(
        backend.requests(),
        served,
        "a denied request reached the application"
    );

    let line = mesh.servers[0]
        .process
        .logs
        .wait_for(&["request denied", "/admin"], Duration::from_secs(5))
        .await
        .unwrap();
    for field in [
        spiffe("client"),
        spiffe("backend"),
        "no ALLOW policy matched".to_string(),
    ] {
        assert!(line.contains(&field), "denial log lacks {field}: {line}");
    }
    // Who and where come from the connection's span, not from the event itself.
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    let connection = &entry["spans"][0];
    assert_eq!(connection["name"], "inbound", "{line}");
    assert_eq!(connection["peer_identity"], spiffe("client"), "{line}");
    assert_eq!(connection["destination"], spiffe("backend"), "{line}");
    assert!(entry.get("source").is_none(), "{line}");
    let (_, metrics) = mesh.servers[0].admin("/metrics").await.unwrap();
    assert!(
        metrics.contains("tessera_authz_decisions_total{decision=\"deny\",policy=\"none\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "tessera_authz_decisions_total{decision=\"allow\",policy=\"shop/backend-readers\"} 1"
        ),
        "{metrics}"
    );

    // The CLI explains both from the same engine.
    let explain = |path: &str| {
        Command::new(binary("tessera"))
            .args(["policy", "explain", "--config"])
            .arg(mesh.control_plane.config_dir())
            .args([
                "--from",
                &spiffe("client"),
                "--to",
                "backend.shop",
                "--port",
                "8080",
                "--method",
                "GET",
                "--path",
                path,
            ])
            .output()
            .unwrap()
    };
    let output = explain("/admin");
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(
        text.contains("decision: DENY") && text.contains("no ALLOW policy matched"),
        "{text}"
    );
    let output = explain("/public/menu");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("decision: ALLOW by shop/backend-readers, rule 0"),
        "{text}"
    );

    // A proxy's /config shows what the control plane sent it and what it enforces:
    // the client holds the service it calls, the server its namespace's policies.
    let (status, config) = mesh.client.admin("/config").await.unwrap();
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let backend_service = config["discovery"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "backend" && s["namespace"] == "shop")
        .unwrap_or_else(|| panic!("{config:#}"));
    assert_eq!(backend_service["ports"][0]["port"], 8080, "{config:#}");
    assert_eq!(
        backend_service["endpoints"][0]["identity"],
        spiffe("backend"),
        "{config:#}"
    );
    let (status, config) = mesh.servers[0].admin("/config").await.unwrap();
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let discovery = &config["discovery"];
    assert_eq!(
        discovery["authorizationPolicies"][0]["name"], "backend-readers",
        "{config:#}"
    );
    let port = &config["inboundPolicies"][0];
    assert_eq!(
        port["applicationPort"],
        backend.address.port(),
        "{config:#}"
    );
    assert_eq!(port["mtlsMode"], "STRICT", "{config:#}");
    assert_eq!(
        port["authorizationPolicies"],
        serde_json::json!(["shop/backend-readers (ALLOW)"]),
        "{config:#}"
    );
    // The proxy's own configuration is still there, at the top.
    assert!(config["controlPlane"]["address"].is_string(), "{config:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_header_condition_sees_the_callers_host() {
    // Between the proxies the host travels as the HTTP/2 authority, not as a `Host`
    // field: a condition on `request.headers[host]` must still read it.
    let backend = HttpBackend::start("hosted").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let only_host = |host: &str| {
        resource(
            "AuthorizationPolicy",
            "by-host",
            &format!(
                "  action: ALLOW\n  rules:\n  - when: [{{key: \"request.headers[host]\", values: [\"{host}\"]}}]\n"
            ),
        )
    };
    mesh.apply("policy.yaml", &only_host("backend.shop")).await;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
    let allowed = client.get("/").await.unwrap();
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(allowed.headers["x-seen-host"], "backend.shop");

    mesh.apply("policy.yaml", &only_host("elsewhere.shop"))
        .await;
    let denied = client.get("/").await.unwrap();
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_are_allowed_or_denied_by_policy() {
    let (service, _task) = start_grpc().await;
    let mesh = L7Mesh::start(&[service], "grpc", None).await;
    let policy = resource(
        "AuthorizationPolicy",
        "unary-only",
        "  action: ALLOW\n  rules:\n  - to: [{operation: {paths: [/tessera.test.v1.Echo/Unary]}}]\n",
    );
    mesh.apply("policy.yaml", &policy).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.entry()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel);
    let reply = client
        .unary(Message {
            text: "ok".into(),
            count: 1,
        })
        .await
        .unwrap();
    assert_eq!(reply.get_ref().text, "echo: ok");
    let status = client
        .server_stream(Message {
            text: "no".into(),
            count: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_connections_are_allowed_or_denied_before_a_byte_moves() {
    let echo = EchoServer::start().await;
    let mesh = L7Mesh::start(&[echo.address], "opaque", None).await;
    let allow = resource(
        "AuthorizationPolicy",
        "tcp",
        &format!(
            "  action: ALLOW\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n    to: [{{operation: {{ports: [{}]}}}}]\n",
            spiffe("client"),
            echo.address.port()
        ),
    );
    mesh.apply("policy.yaml", &allow).await;
    let payload = tessera_tests::random_payload(4096);
    assert!(echo_roundtrip(mesh.entry(), &payload).await.unwrap() == payload);
    let received = echo.received();

    let deny = resource(
        "AuthorizationPolicy",
        "tcp",
        &format!(
            "  action: DENY\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n",
            spiffe("client")
        ),
    );
    mesh.apply("policy.yaml", &deny).await;
    let echoed = echo_roundtrip(mesh.entry(), b"must not arrive")
        .await
        .unwrap_or_default();
    assert!(echoed.is_empty());
    mesh.servers[0]
        .process
        .logs
        .wait_for(&["connection denied", "shop/tcp"], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        echo.received(),
        received,
        "bytes reached the application after a denial"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jwts_are_validated_before_authorization() {
    let backend = HttpBackend::start("jwt").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let issuer = Issuer::new();
    let jwks = issuer.jwks.replace('"', "\\\"");
    let policies = [
        resource("RequestAuthentication", "jwt", &format!("  jwtRules:\n  - issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n    jwks: \"{jwks}\"\n")),
        resource("AuthorizationPolicy", "need-jwt", &format!("  action: ALLOW\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"{ISSUER}/*\"]}}}}]\n")),
    ]
    .join("---\n");
    mesh.apply("jwt.yaml", &policies).await;

    let call = |token: Option<String>, query: &'static str| {
        let entry = mesh.entry();
        async move {
            let headers: Vec<(String, String)> = token
                .map(|t| ("authorization".to_string(), format!("Bearer {t}")))
                .into_iter()
                .collect();
            let mut client = Http1Client::connect(entry).await.unwrap();
            let answer = client
                .get_with(&format!("/orders{query}"), &headers)
                .await
                .unwrap();
            let reason = answer
                .headers
                .get("tessera-proxy-error")
                .map(|v| v.to_str().unwrap().to_string());
            (answer.status, reason)
        }
    };
    let (status, _) = call(Some(issuer.valid()), "").await;
    assert_eq!(status, StatusCode::OK);
    let served = backend.requests();

    let cases = [
        (
            "expired",
            Some(issuer.expired()),
            "",
            StatusCode::UNAUTHORIZED,
            "jwt-expired",
        ),
        (
            "wrong audience",
            Some(issuer.wrong_audience()),
            "",
            StatusCode::UNAUTHORIZED,
            "jwt-wrong-audience",
        ),
        (
            "alg none",
            Some(issuer.alg_none()),
            "",
            StatusCode::UNAUTHORIZED,
            "jwt-malformed",
        ),
        (
            "HS256 with the public key",
            Some(issuer.hs256_with_public_key()),
            "",
            StatusCode::UNAUTHORIZED,
            "jwt-algorithm-not-allowed",
        ),
        (
            "unknown kid",
            Some(issuer.unknown_kid()),
            "",
            StatusCode::UNAUTHORIZED,
            "jwt-unknown-kid",
        ),
        (
            "token in the URL",
            None,
            "?access_token=abc",
            StatusCode::UNAUTHORIZED,
            "jwt-in-url",
        ),
        ("no token", None, "", StatusCode::FORBIDDEN, "access-denied"),
    ];
    for (name, token, query, expected_status, expected_reason) in cases {
        let (status, reason) = call(token, query).await;
        assert_eq!(status, expected_status, "{name}");
        assert_eq!(reason.as_deref(), Some(expected_reason), "{name}");
    }
    assert_eq!(
        backend.requests(),
        served,
        "a refused request reached the application"
    );
    let (status, _) = call(Some(issuer.valid()), "").await;
    assert_eq!(status, StatusCode::OK);
}

/// One raw HTTP/1.1 request on a fresh connection: the status line's code and the head.
async fn raw_request(address: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to {request:?}");
    let head = String::from_utf8_lossy(&answer).into_owned();
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (code, head)
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_policy_checks_is_what_the_application_receives() {
    // Issue 21, item 1: a DENY on a host was passed by a second Host field, userinfo in an
    // absolute-form target, or a percent-escaped host; `GET *` was forwarded as `/*`. On
    // both sides (the outbound proxy, and the inbound port taking plaintext) each such
    // request is refused with 400 before any application sees it, and every spelling of
    // the denied host is denied.
    let backend = HttpBackend::start("hosted").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    mesh.apply(
        "peer.yaml",
        &resource(
            "PeerAuthentication",
            "backend",
            "  selector: {serviceAccount: backend}\n  mtls: {mode: PERMISSIVE}\n",
        ),
    )
    .await;
    mesh.apply(
        "policy.yaml",
        &resource(
            "AuthorizationPolicy",
            "no-evil",
            "  selector: {serviceAccount: backend}\n  action: DENY\n  rules:\n  - to: [{operation: {hosts: [\"evil\"]}}]\n",
        ),
    )
    .await;
    let refused = [
        "GET / HTTP/1.1\r\nHost: evil\r\nHost: orders\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: orders\r\nHost: evil\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET http://x@evil/ HTTP/1.1\r\nHost: orders\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: ev%69l\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: evil orders\r\n\r\n",
        "GET * HTTP/1.1\r\nHost: orders\r\n\r\n",
        "GET /%%36%31dmin HTTP/1.1\r\nHost: orders\r\n\r\n",
    ];
    let denied = [
        "GET / HTTP/1.1\r\nHost: evil\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: EVIL:8080\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: evil.\r\n\r\n",
        "GET http://evil/ HTTP/1.1\r\nHost: orders\r\n\r\n",
    ];
    for (side, address) in [
        ("outbound", mesh.entry()),
        ("inbound", mesh.servers[0].inbound()),
    ] {
        let served = backend.requests();
        for request in refused {
            let (code, head) = raw_request(address, request).await;
            assert_eq!(code, 400, "{side}: {request:?} answered {head}");
        }
        for request in denied {
            let (code, head) = raw_request(address, request).await;
            assert_eq!(code, 403, "{side}: {request:?} answered {head}");
        }
        assert_eq!(
            backend.requests(),
            served,
            "{side}: a refused or denied request reached the application"
        );
        // The host that was checked is the one the application gets.
        let (code, head) = raw_request(
            address,
            "GET http://orders:8080/x HTTP/1.1\r\nHost: evil\r\n\r\n",
        )
        .await;
        assert_eq!(code, 200, "{side}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-seen-host: orders:8080"),
            "{side}: the application saw another host: {head}"
        );
    }
}

/// A CUSTOM policy whose Rego allows the client's GETs under `/api/` for users not in
/// `data.blocked`, and names its deny rule; or, with `explode`, one that runs past its
/// evaluation budget.
fn rego_policy(explode: bool) -> String {
    let allow = if explode {
        "allow if count({x | some i in numbers.range(1, 5000); some j in numbers.range(1, 5000); x := i * j}) > 0"
    } else {
        "allow if {\n            input.attributes.source.principal == data.caller\n            input.attributes.request.http.method == \"GET\"\n            input.parsed_path[0] == \"api\"\n            not input.attributes.request.http.headers[\"x-user\"] in data.blocked\n          }"
    };
    resource(
        "AuthorizationPolicy",
        "backend-opa",
        &format!(
            "  selector: {{serviceAccount: backend}}\n  action: CUSTOM\n  rules: [{{}}]\n  provider:\n    rego:\n      query: data.shop.authz.allow\n      modules:\n      - name: authz.rego\n        source: |\n          package shop.authz\n          import rego.v1\n          default allow := false\n          {allow}\n          deny contains \"user is blocked\" if input.attributes.request.http.headers[\"x-user\"] in data.blocked\n      data:\n        caller: \"{}\"\n        blocked: [mallory]\n",
            spiffe("client")
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rego_policy_decides_in_the_proxy() {
    let backend = HttpBackend::start("opa-guarded").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    mesh.apply("policy.yaml", &rego_policy(false)).await;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
    let user = |name: &str| vec![("x-user".to_string(), name.to_string())];

    let allowed = client
        .get_with("/api/orders", &user("alice"))
        .await
        .unwrap();
    assert_eq!(allowed.status, StatusCode::OK);
    let served = backend.requests();
    let secret = vec![
        ("x-user".to_string(), "mallory".to_string()),
        (
            "authorization".to_string(),
            "Basic c2VjcmV0LXZhbHVl".to_string(),
        ),
    ];
    let denied = client.get_with("/api/orders", &secret).await.unwrap();
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.headers["tessera-proxy-error"], "access-denied");
    let elsewhere = client.get_with("/admin", &user("alice")).await.unwrap();
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN);
    assert_eq!(
        backend.requests(),
        served,
        "a denied request reached the application"
    );

    let logs = &mesh.servers[0].process.logs;
    let line = logs
        .wait_for(
            &["request denied", "user is blocked"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    for field in [
        "shop/backend-opa",
        "denied by a CUSTOM policy",
        "deny: user is blocked",
    ] {
        assert!(line.contains(field), "denial log lacks {field}: {line}");
    }
    assert!(
        !logs.lines().iter().any(|l| l.contains("c2VjcmV0LXZhbHVl")),
        "a credential was logged"
    );

    // A policy that explodes is cut off: denied, counted, the proxy serving on.
    mesh.apply("policy.yaml", &rego_policy(true)).await;
    let cut_off = client
        .get_with("/api/orders", &user("alice"))
        .await
        .unwrap();
    assert_eq!(cut_off.status, StatusCode::FORBIDDEN);
    let (_, metrics) = mesh.servers[0].admin("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tessera_policy_evaluation_errors_total{")
                && l.contains("policy=\"shop/backend-opa\"")
                && l.contains("reason=\"timeout\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}
