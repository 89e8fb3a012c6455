//! The policy engine (`tessera_mesh::policy::authorize`) on a fuzzed request against a
//! fixed set of policies, given what the inbound proxy gives it: the normalized path,
//! the authority, and header values joined as the application will read them.
//!
//! Input: a request head in text, `METHOD SP PATH` then `name: value` lines; the first
//! `host` line is the authority.
//!
//! Properties: never panics; the DENY on `/admin*` denies every request whose
//! normalized path starts with `/admin`; the DENY on host `evil` (and on `[fd00::1]`)
//! denies every request whose host is that host in any spelling that names it (any
//! letter case, a port, a trailing dot); the DENY on `x-debug: 1` denies every request
//! whose joined `x-debug` value is `1`; the same request decides the same way twice.
#![no_main]

use std::sync::OnceLock;

use http::HeaderName;
use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{plain_host, policies};
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::{HttpRequest, Request, authorize, normalize_path};

fuzz_target!(|bytes: &[u8]| {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let Some((method, path)) = lines.next().and_then(|l| l.split_once(' ')) else {
        return;
    };
    let mut host = None;
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.to_ascii_lowercase(), value.trim());
        if name == "host" && host.is_none() {
            host = Some(value.to_string());
        }
        // Repeated fields joined as the proxy joins them before asking the policy.
        match headers.iter_mut().find(|(n, _)| *n == name) {
            Some((_, joined)) => {
                joined.push_str(", ");
                joined.push_str(value);
            }
            None => headers.push((name, value.to_string())),
        }
    }
    let host = host.unwrap_or_default();
    let Ok(path) = normalize_path(path) else {
        return; // refused with 400 before any policy
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    static PEER: OnceLock<SpiffeId> = OnceLock::new();
    let peer = PEER.get_or_init(|| {
        SpiffeId::new("cluster.local", "shop", "web").expect("a valid fixed identity")
    });
    let request = Request {
        source: bytes.first().filter(|b| *b & 1 == 1).map(|_| peer),
        destination: None,
        request_principal: None,
        jwt_claims: None,
        port: 8080,
        http: Some(HttpRequest {
            method,
            path: &path,
            query: None,
            host: &host,
            scheme: "http",
            protocol: "HTTP/1.1",
            header: &|name: &HeaderName| header(name.as_str()),
            headers: None,
        }),
    };
    let decision = authorize(policies(), &request);
    assert_eq!(
        decision,
        authorize(policies(), &request),
        "not deterministic"
    );
    let why = || format!("{method} {path:?} host {host:?} headers {headers:?}: {decision:?}");
    if path.starts_with("/admin") {
        assert!(!decision.allowed, "DENY /admin* passed: {}", why());
    }
    let plain = plain_host(&host);
    if plain == "evil" || plain == "[fd00::1]" {
        assert!(!decision.allowed, "DENY on host passed: {}", why());
    }
    if header("x-debug") == Some("1") {
        assert!(!decision.allowed, "DENY on x-debug passed: {}", why());
    }
});
