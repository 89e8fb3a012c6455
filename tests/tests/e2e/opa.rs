//! The proxy's Rego decisions against the real OPA's: realistic policies written as users
//! of Istio + OPA write them (RBAC by principal and path, JWT claim checks, a
//! method/path table, deny lists in `data` with an OPA-Envoy object result), a few hundred
//! generated requests, and the decision of the mesh crate's evaluator (the code the proxy
//! runs, the input built by the same function) equal to OPA's on every one.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::rego::{self, EvaluationFailure};
use tessera_mesh::policy::{CompiledRego, HttpRequest, RegoModule, RegoProvider, Request};
use tessera_tests::opa::{self, Bundle, OpaClient, OpaServer};

const RBAC: &str = r#"package rbac

import rego.v1

default allow := false

principal := input.attributes.source.principal

http_request := input.attributes.request.http

allow if {
	some grant in data.rbac.grants[principal]
	http_request.method in grant.methods
	startswith(http_request.path, grant.prefix)
}

allow if {
	principal in data.rbac.admins
	not http_request.method in {"DELETE"}
}
"#;

const JWT: &str = r#"package jwt

import rego.v1

default allow := false

claims := input.jwt.claims

scopes := split(claims.scope, " ")

allow if {
	claims.iss == "https://issuer.example"
	"orders:read" in scopes
	input.attributes.request.http.method in {"GET", "HEAD"}
}

allow if {
	"admin" in claims.groups
	claims.aud == "orders"
}

deny contains "no token" if not claims

deny contains msg if {
	claims.iss != "https://issuer.example"
	msg := sprintf("issuer %s is not trusted", [claims.iss])
}
"#;

const ROUTES: &str = r#"package routes

import rego.v1

default allow := false

allow if {
	some route in data.routes.table
	route.method == input.attributes.request.http.method
	count(route.path) == count(input.parsed_path)
	every i, segment in route.path {
		matches(segment, input.parsed_path[i])
	}
}

matches("*", _) := true

matches(segment, value) if segment == value
"#;

const DENYLIST: &str = r#"package envoy.authz

import rego.v1

user := input.attributes.request.http.headers["x-user"]

blocked_path if {
	some prefix in data.denylist.paths
	startswith(input.attributes.request.http.path, prefix)
}

allow := {"allowed": false, "reason": sprintf("user %s is blocked", [user])} if {
	user in data.denylist.users
} else := {"allowed": false, "http_status": 403, "reason": "path is blocked"} if {
	blocked_path
} else := {"allowed": false, "reason": "debugging is off"} if {
	input.parsed_query.debug[_] == "1"
} else := {"allowed": true, "headers": {"x-checked": "true"}}
"#;

/// The policies, each with the query that decides and its `data`.
fn policies() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    vec![
        (
            "rbac.rego",
            RBAC,
            "data.rbac.allow",
            json!({"rbac": {
                "grants": {
                    "spiffe://cluster.local/ns/shop/sa/frontend": [
                        {"methods": ["GET", "HEAD"], "prefix": "/orders"},
                        {"methods": ["POST"], "prefix": "/orders/new"},
                    ],
                    "spiffe://cluster.local/ns/shop/sa/billing": [
                        {"methods": ["GET"], "prefix": "/invoices"},
                    ],
                },
                "admins": ["spiffe://cluster.local/ns/ops/sa/admin"],
            }}),
        ),
        ("jwt.rego", JWT, "data.jwt.allow", json!({})),
        (
            "routes.rego",
            ROUTES,
            "data.routes.allow",
            json!({"routes": {"table": [
                {"method": "GET", "path": ["orders"]},
                {"method": "GET", "path": ["orders", "*"]},
                {"method": "PUT", "path": ["orders", "*", "items", "*"]},
                {"method": "DELETE", "path": ["admin", "cache"]},
            ]}}),
        ),
        (
            "denylist.rego",
            DENYLIST,
            "data.envoy.authz.allow",
            json!({"denylist": {"users": ["mallory", "eve"], "paths": ["/internal", "/orders/export"]}}),
        ),
    ]
}

fn provider(name: &str, source: &str, query: &str, data: &Value) -> RegoProvider {
    RegoProvider {
        query: query.into(),
        modules: vec![RegoModule {
            name: name.into(),
            source: Some(source.into()),
            file: None,
        }],
        data: Some(data.clone()),
    }
}

/// A request as a proxy sees it: its caller, target, fields and token's claims.
struct Generated {
    source: Option<SpiffeId>,
    method: &'static str,
    path: String,
    query: Option<String>,
    headers: http::HeaderMap,
    claims: Option<Map<String, Value>>,
}

fn generate(rng: &mut StdRng) -> Generated {
    let accounts = [
        ("shop", "frontend"),
        ("shop", "billing"),
        ("ops", "admin"),
        ("shop", "mallory"),
    ];
    let source = rng
        .random_bool(0.9)
        .then(|| {
            let (namespace, account) = accounts.choose(rng).expect("accounts");
            SpiffeId::new("cluster.local", namespace, account).ok()
        })
        .flatten();
    let method = *["GET", "HEAD", "POST", "PUT", "DELETE"]
        .choose(rng)
        .expect("methods");
    let segments = [
        "orders", "new", "7", "items", "export", "invoices", "admin", "cache", "internal", "a b",
    ];
    let path = (0..rng.random_range(0..5))
        .map(|_| *segments.choose(rng).expect("segments"))
        .map(|segment| segment.replace(' ', "%20"))
        .fold(String::new(), |path, segment| format!("{path}/{segment}"));
    // Half the paths are the API's own, so every policy's allow rules are reached.
    let known = [
        "/orders",
        "/orders/7",
        "/orders/7/items/3",
        "/orders/new",
        "/orders/export",
        "/invoices/1",
        "/admin/cache",
        "/internal/metrics",
    ];
    let path = match path.as_str() {
        _ if rng.random_bool(0.5) => known.choose(rng).expect("paths").to_string(),
        "" => "/".to_string(),
        _ => path,
    };
    let query = rng.random_bool(0.3).then(|| {
        (0..rng.random_range(1..4))
            .map(|_| {
                let name = ["debug", "page", "tag"].choose(rng).expect("names");
                let value = ["1", "0", "x+y", "%41"].choose(rng).expect("values");
                format!("{name}={value}")
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    let mut headers = http::HeaderMap::new();
    if rng.random_bool(0.5) {
        let user = ["alice", "bob", "mallory", "eve"]
            .choose(rng)
            .expect("users");
        headers.insert("x-user", http::HeaderValue::from_static(user));
    }
    if rng.random_bool(0.2) {
        headers.append("accept", http::HeaderValue::from_static("text/html"));
        headers.append("accept", http::HeaderValue::from_static("application/json"));
    }
    let claims = rng.random_bool(0.6).then(|| {
        let mut claims = Map::new();
        let issuer = ["https://issuer.example", "https://other.example"]
            .choose(rng)
            .expect("issuers");
        claims.insert("iss".into(), json!(issuer));
        claims.insert("sub".into(), json!("user-1"));
        if rng.random_bool(0.7) {
            let scope = ["orders:read", "orders:read orders:write", "profile"]
                .choose(rng)
                .expect("scopes");
            claims.insert("scope".into(), json!(scope));
        }
        if rng.random_bool(0.4) {
            let groups = [json!(["admin"]), json!(["dev", "admin"]), json!(["dev"])];
            claims.insert("groups".into(), groups.choose(rng).expect("groups").clone());
        }
        let audience = ["orders", "billing"].choose(rng).expect("audiences");
        claims.insert("aud".into(), json!(audience));
        claims
    });
    Generated {
        source,
        method,
        path,
        query,
        headers,
        claims,
    }
}

/// The input document the proxy builds for `request` (the same function).
fn input(request: &Generated) -> Value {
    let destination = SpiffeId::new("cluster.local", "shop", "orders").expect("an id");
    rego::input(&Request {
        source: request.source.as_ref(),
        destination: Some(&destination),
        request_principal: None,
        jwt_claims: request.claims.as_ref(),
        port: 8080,
        http: Some(HttpRequest {
            method: request.method,
            path: &request.path,
            query: request.query.as_deref(),
            host: "orders.shop",
            scheme: "http",
            protocol: "HTTP/1.1",
            header: &|_| None,
            headers: Some(&request.headers),
        }),
    })
    .expect("a request within the input bounds")
}

/// OPA's decision by the rule Tessera applies: `true`, or an object whose `allowed` is
/// `true`, allows; anything else (undefined included) denies.
fn opa_decision(result: Option<&Value>) -> (bool, bool) {
    let allowed = match result {
        Some(Value::Bool(allowed)) => *allowed,
        Some(Value::Object(object)) => object.get("allowed") == Some(&Value::Bool(true)),
        _ => false,
    };
    (allowed, result.is_none())
}

#[tokio::test]
async fn the_proxys_rego_decisions_equal_opas() {
    let Some(binary) = opa::binary() else {
        return;
    };
    let policies = policies();
    let modules: Vec<(&str, &str)> = policies
        .iter()
        .map(|(name, source, ..)| (*name, *source))
        .collect();
    let mut data = Map::new();
    for (.., policy_data) in &policies {
        data.extend(policy_data.as_object().expect("an object").clone());
    }
    let bundle = Bundle::new(&modules, &Value::Object(data));
    let server = OpaServer::start(&binary, &bundle).await.expect("opa runs");
    let mut client = OpaClient::connect(server.address)
        .await
        .expect("connect to opa");
    let compiled: Vec<(CompiledRego, &str)> = policies
        .iter()
        .map(|(name, source, query, data)| {
            let provider = provider(name, source, query, data);
            let compiled =
                CompiledRego::try_from(&provider).unwrap_or_else(|e| panic!("{name}: {e}"));
            (compiled, *query)
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(26);
    let mut allowed = vec![0; compiled.len()];
    const INPUTS: usize = 300;
    for _ in 0..INPUTS {
        let request = input(&generate(&mut rng));
        for (index, (rego, query)) in compiled.iter().enumerate() {
            let expected = client.query(query, &request).await.expect("opa answers");
            let (opa_allowed, opa_undefined) = opa_decision(expected.as_ref());
            let ours = rego.evaluate_input(request.clone());
            assert_eq!(
                (
                    ours.allowed,
                    ours.failure == Some(EvaluationFailure::Undefined)
                ),
                (opa_allowed, opa_undefined),
                "{query} on {request:#}: OPA says {expected:?}, the proxy {ours:?}"
            );
            if let Some(Value::Object(object)) = &expected
                && let Some(Value::String(reason)) = object.get("reason")
            {
                assert_eq!(&ours.reason, reason, "{query} on {request:#}");
            }
            allowed[index] += usize::from(ours.allowed);
        }
    }
    eprintln!("allowed of {INPUTS} inputs, per policy: {allowed:?}");
    // The inputs exercise both outcomes of every policy.
    for ((_, query), allowed) in compiled.iter().zip(&allowed) {
        assert!(
            (INPUTS / 20..INPUTS - INPUTS / 20).contains(allowed),
            "{query} allowed {allowed} of {INPUTS}: the generated requests do not test it"
        );
    }
    // One `opa eval`, as a user would check a policy by hand, agrees too.
    let request = input(&generate(&mut rng));
    let (rego, query) = &compiled[0];
    let evaluated = opa::eval(&binary, &bundle, query, &request).expect("opa eval");
    assert_eq!(
        opa_decision(evaluated.as_ref()).0,
        rego.evaluate_input(request.clone()).allowed,
        "{request:#}"
    );
}
