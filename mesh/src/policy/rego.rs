//! CUSTOM authorization in Rego, OPA's policy language, evaluated inside the proxy with
//! `regorus` — the decision Istio gets from an OPA sidecar over `ext_authz`, without the
//! extra hop.
//!
//! A [`RegoProvider`] (modules, a `data` document, a query) is compiled once per
//! snapshot into a [`CompiledRego`]: modules parsed and the query checked, so a syntax
//! error is a configuration error naming the module and line. Each request is then
//! given an input document in the shape OPA-Envoy gives (`attributes.source.principal`,
//! `attributes.request.http.{method,path,host,headers,…}`, `parsed_path`,
//! `parsed_query`, plus `jwt.claims`), so Rego written for Istio + OPA runs unchanged.
//!
//! Evaluation needs a mutable engine: prepared engines are kept in a small pool (cloned
//! from the compiled one on first need, never re-parsed), taken for one evaluation and
//! given back. Evaluation time is bounded; a policy that runs over, errs, or answers
//! anything but a decision denies (fail closed) with the reason said.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{Engine, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::Request;

/// How long one evaluation may run before it is cut off and the request denied. Wall
/// time: far above what a policy needs, so a worker thread descheduled on a busy machine
/// does not turn into denials, and still short enough to cut a runaway policy.
pub const EVALUATION_BUDGET: Duration = Duration::from_millis(100);
/// Interpreter steps between two looks at the clock.
const CLOCK_CHECK_INTERVAL: u32 = 32;
/// Idle engines kept per policy: about one per thread that evaluates concurrently.
const MAX_IDLE_ENGINES: usize = 64;

/// Above these, a request is not turned into an input document: denied, fail closed.
/// The proxy's own limit (64 KiB of request head) keeps real requests well below them.
pub const MAX_INPUT_HEADERS: usize = 1024;
pub const MAX_INPUT_BYTES: usize = 128 * 1024;

/// Where a CUSTOM policy's decision comes from: Rego modules, a data document and the
/// query whose value decides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegoProvider {
    /// A rule path, such as `data.tessera.authz.allow`: its value is `true`/`false`, or an
    /// object with a boolean `allowed` (OPA-Envoy's form).
    pub query: String,
    pub modules: Vec<RegoModule>,
    /// The `data` document policies read (an object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(extend("type" = "object", "x-kubernetes-preserve-unknown-fields" = true))
    )]
    pub data: Option<Json>,
}

/// One Rego module: inline (`name` and `source`) or, in local file mode, a `file`
/// relative to the configuration directory, which the control plane reads and sends
/// inline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegoModule {
    /// How errors name the module (a file name, such as `authz.rego`).
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<std::path::PathBuf>,
}

/// Why a Rego provider cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegoError {
    #[error("no modules")]
    NoModules,
    #[error("module {0:?}: neither source nor a file the control plane could read")]
    NoSource(String),
    #[error("module {name:?}: {message}")]
    Module { name: String, message: String },
    #[error("data: {0}")]
    Data(String),
    #[error("query {query:?}: {message}")]
    Query { query: String, message: String },
}

/// A Rego provider parsed and checked, with its engines.
pub struct CompiledRego {
    query: String,
    /// `data.<package>.deny` or `.reasons`, when the query's package defines one: read on
    /// denial to say which rule denied.
    reasons_rule: Option<String>,
    engines: Mutex<Engines>,
}

struct Engines {
    prepared: Engine,
    idle: Vec<Engine>,
}

impl std::fmt::Debug for CompiledRego {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRego")
            .field("query", &self.query)
            .field("reasons_rule", &self.reasons_rule)
            .finish_non_exhaustive()
    }
}

/// What the policy said of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegoVerdict {
    pub allowed: bool,
    /// Why, in the policy's words when it gave any (its `reason`, its `deny`/`reasons`
    /// messages), else what the query answered or why evaluation failed.
    pub reason: String,
    /// Set when evaluation failed (the request is then denied): a bounded label.
    pub failure: Option<EvaluationFailure>,
}

/// Why evaluating a policy gave no decision; each denies the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvaluationFailure {
    /// The evaluation budget ran out.
    Timeout,
    /// A built-in or the interpreter failed.
    Error,
    /// The query is undefined for this input.
    Undefined,
    /// The query answered something other than a boolean or `{allowed: bool}`.
    NotADecision,
    /// The request is too large to become an input document.
    InputTooLarge,
}

impl EvaluationFailure {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Error => "error",
            Self::Undefined => "undefined",
            Self::NotADecision => "not-a-decision",
            Self::InputTooLarge => "input-too-large",
        }
    }
}

impl TryFrom<&RegoProvider> for CompiledRego {
    type Error = RegoError;

    fn try_from(provider: &RegoProvider) -> Result<Self, RegoError> {
        if provider.modules.is_empty() {
            return Err(RegoError::NoModules);
        }
        let mut engine = Engine::new();
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: EVALUATION_BUDGET,
            check_interval: NonZeroU32::new(CLOCK_CHECK_INTERVAL).unwrap_or(NonZeroU32::MIN),
        });
        for (index, module) in provider.modules.iter().enumerate() {
            let name = module_name(module, index);
            let source = module
                .source
                .clone()
                .ok_or_else(|| RegoError::NoSource(name.clone()))?;
            engine
                .add_policy(name.clone(), source)
                .map_err(|error| RegoError::Module {
                    name: name.clone(),
                    message: first_line(&error.to_string()),
                })?;
        }
        if let Some(data) = &provider.data {
            if !data.is_object() {
                return Err(RegoError::Data("must be an object".into()));
            }
            engine
                .add_data(Value::from(data.clone()))
                .map_err(|error| RegoError::Data(first_line(&error.to_string())))?;
        }
        let query = provider.query.trim().to_string();
        let query_error = |message: String| RegoError::Query {
            query: query.clone(),
            message,
        };
        let package = rule_package(&query).ok_or_else(|| {
            query_error("not a rule path such as data.tessera.authz.allow".into())
        })?;
        // Prepares the engine (modules checked, rules scheduled, data merged) once, here:
        // every clone evaluates without parsing or preparing again.
        if let Err(error) = engine.compile_with_entrypoint(&query.as_str().into()) {
            let message = first_line(&error.to_string());
            return Err(query_error(if message.contains("not a valid rule path") {
                "no module defines this rule".into()
            } else {
                message
            }));
        }
        let reasons_rule = ["deny", "reasons"]
            .iter()
            .map(|rule| format!("{package}.{rule}"))
            .find(|rule| {
                *rule != query
                    && engine
                        .compile_with_entrypoint(&rule.as_str().into())
                        .is_ok()
            });
        Ok(Self {
            query,
            reasons_rule,
            engines: Mutex::new(Engines {
                prepared: engine,
                idle: Vec::new(),
            }),
        })
    }
}

impl CompiledRego {
    /// The query whose value decides.
    pub fn query(&self) -> &str {
        &self.query
    }

    /// Decides `request` by the policy.
    pub fn evaluate(&self, request: &Request<'_>) -> RegoVerdict {
        match input(request) {
            Ok(input) => self.evaluate_input(input),
            Err(failure) => RegoVerdict::failed(
                failure,
                format!(
                    "the request exceeds the Rego input bounds ({MAX_INPUT_HEADERS} headers, {MAX_INPUT_BYTES} bytes)"
                ),
            ),
        }
    }

    /// Decides an input document built by [`input`] (or given as is, by tests comparing
    /// with OPA).
    pub fn evaluate_input(&self, input: Json) -> RegoVerdict {
        let mut engine = self.take_engine();
        engine.set_input(Value::from(input));
        match engine.eval_rule(self.query.clone()) {
            Ok(result) => {
                let verdict = self.interpret(&mut engine, &result);
                self.give_back(engine);
                verdict
            }
            // An engine cut off mid-evaluation is not reused: a clone is cheap.
            Err(error) => failure_of(&error),
        }
    }

    fn take_engine(&self) -> Engine {
        let mut engines = self.engines.lock().unwrap_or_else(|e| e.into_inner());
        match engines.idle.pop() {
            Some(engine) => engine,
            None => engines.prepared.clone(),
        }
    }

    fn give_back(&self, engine: Engine) {
        let mut engines = self.engines.lock().unwrap_or_else(|e| e.into_inner());
        if engines.idle.len() < MAX_IDLE_ENGINES {
            engines.idle.push(engine);
        }
    }

    /// A boolean or OPA-Envoy's `{allowed, …}` object decides; anything else denies.
    fn interpret(&self, engine: &mut Engine, result: &Value) -> RegoVerdict {
        let (allowed, stated_reason) = match result {
            Value::Bool(allowed) => (*allowed, None),
            Value::Object(object) => match object.get(&Value::from("allowed")) {
                Some(Value::Bool(allowed)) => (*allowed, stated_reason(result)),
                _ => {
                    return RegoVerdict::failed(
                        EvaluationFailure::NotADecision,
                        format!("{} is an object without a boolean `allowed`", self.query),
                    );
                }
            },
            Value::Undefined => {
                return RegoVerdict::failed(
                    EvaluationFailure::Undefined,
                    format!("{} is undefined", self.query),
                );
            }
            _ => {
                return RegoVerdict::failed(
                    EvaluationFailure::NotADecision,
                    format!("{} is neither a boolean nor an object", self.query),
                );
            }
        };
        let reason = match (allowed, stated_reason) {
            (_, Some(reason)) => reason,
            (true, None) => format!("{} is true", self.query),
            (false, None) => self
                .reasons(engine)
                .unwrap_or_else(|| format!("{} is false", self.query)),
        };
        RegoVerdict {
            allowed,
            reason,
            failure: None,
        }
    }

    /// The messages of the package's `deny` (or `reasons`) rule, when it has any for
    /// this input: which rule denied, in the policy's words.
    fn reasons(&self, engine: &mut Engine) -> Option<String> {
        let rule = self.reasons_rule.as_ref()?;
        let messages = match engine.eval_rule(rule.clone()).ok()? {
            Value::Set(set) => set.iter().map(message).collect::<Vec<_>>(),
            Value::Array(array) => array.iter().map(message).collect(),
            Value::Undefined | Value::Bool(false) => return None,
            other => vec![message(&other)],
        };
        (!messages.is_empty()).then(|| {
            let name = rule.rsplit('.').next().unwrap_or(rule);
            format!("{name}: {}", messages.join("; "))
        })
    }
}

impl RegoVerdict {
    fn failed(failure: EvaluationFailure, reason: String) -> Self {
        Self {
            allowed: false,
            reason,
            failure: Some(failure),
        }
    }
}

/// An evaluation error: the budget ran out, or the policy failed.
fn failure_of(error: &anyhow::Error) -> RegoVerdict {
    let text = error.to_string();
    if error.chain().any(|cause| {
        cause
            .downcast_ref::<regorus::utils::limits::LimitError>()
            .is_some()
    }) || text.contains("time limit")
    {
        RegoVerdict::failed(
            EvaluationFailure::Timeout,
            format!(
                "evaluation exceeded its budget of {} ms",
                EVALUATION_BUDGET.as_millis()
            ),
        )
    } else {
        RegoVerdict::failed(
            EvaluationFailure::Error,
            format!("evaluation failed: {}", first_line(&text)),
        )
    }
}

fn stated_reason(result: &Value) -> Option<String> {
    ["reason", "body"]
        .iter()
        .find_map(|field| match &result[*field] {
            Value::String(text) if !text.is_empty() => Some(text.to_string()),
            _ => None,
        })
}

fn message(value: &Value) -> String {
    match value {
        Value::String(text) => text.to_string(),
        other => other.to_json_str().unwrap_or_default(),
    }
}

/// `module-3.rego` for an unnamed module.
fn module_name(module: &RegoModule, index: usize) -> String {
    if !module.name.is_empty() {
        module.name.clone()
    } else if let Some(file) = &module.file {
        file.display().to_string()
    } else {
        format!("module-{index}.rego")
    }
}

/// `data.a.b` of `data.a.b.rule`; `None` when `query` is not a rule path.
fn rule_package(query: &str) -> Option<&str> {
    let path = query.strip_prefix("data.")?;
    let valid = path.split('.').all(|part| {
        !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if !valid {
        return None;
    }
    query
        .rsplit_once('.')
        .map(|(package, _)| package)
        .filter(|p| p.contains('.'))
}

/// regorus' error in one line: `file:line:column: message`, from its excerpt
/// (`--> file:line:column`, the source, `error: message`), else its first line.
fn first_line(text: &str) -> String {
    let lines = || text.lines().map(str::trim);
    let location = lines().find_map(|line| line.strip_prefix("--> "));
    let message = lines().find_map(|line| line.strip_prefix("error: "));
    match (location, message) {
        (Some(location), Some(message)) => format!("{location}: {message}"),
        _ => lines()
            .find(|line| !line.is_empty())
            .unwrap_or("")
            .to_string(),
    }
}

/// The input document for `request`, in OPA-Envoy's shape:
///
/// ```text
/// attributes.source.principal         spiffe://… of the mTLS peer (absent for plaintext)
/// attributes.destination.principal    spiffe://… of this workload
/// attributes.request.http.method      GET
/// attributes.request.http.path        /orders/7?verbose=1 (with the query)
/// attributes.request.http.host        orders.shop:8080
/// attributes.request.http.headers     {"x-user": "alice", ":authority": …} (names in
///                                     lower case, repeated fields joined with ",")
/// attributes.request.http.scheme      http
/// attributes.request.http.protocol    HTTP/1.1 or HTTP/2
/// parsed_path                         ["orders", "7"]
/// parsed_query                        {"verbose": ["1"]}
/// jwt.claims                          the claims of the token a RequestAuthentication
///                                     validated (absent without one)
/// ```
///
/// `attributes.request` is absent for an opaque TCP connection.
pub fn input(request: &Request<'_>) -> Result<Json, EvaluationFailure> {
    let mut attributes = Map::new();
    let principal = |id: Option<&crate::SpiffeId>| {
        let mut peer = Map::new();
        if let Some(id) = id {
            peer.insert("principal".into(), Json::String(id.to_string()));
        }
        Json::Object(peer)
    };
    attributes.insert("source".into(), principal(request.source));
    attributes.insert("destination".into(), principal(request.destination));
    let mut document = Map::new();
    if let Some(http) = &request.http {
        let mut budget = InputBudget::default();
        let full_path = match http.query {
            Some(query) => format!("{}?{query}", http.path),
            None => http.path.to_string(),
        };
        budget.spend(full_path.len())?;
        let mut headers = Map::new();
        for (name, value) in [
            (":authority", http.host),
            (":method", http.method),
            (":path", full_path.as_str()),
            (":scheme", http.scheme),
        ] {
            headers.insert(name.into(), Json::String(value.into()));
        }
        if let Some(fields) = http.headers {
            if fields.len() > MAX_INPUT_HEADERS {
                return Err(EvaluationFailure::InputTooLarge);
            }
            for name in fields.keys() {
                let mut joined = String::new();
                for value in fields.get_all(name) {
                    if !joined.is_empty() {
                        joined.push(',');
                    }
                    joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
                }
                budget.spend(name.as_str().len() + joined.len())?;
                headers.insert(name.as_str().into(), Json::String(joined));
            }
        }
        let mut fields = Map::new();
        fields.insert("method".into(), Json::String(http.method.into()));
        fields.insert("path".into(), Json::String(full_path));
        fields.insert("host".into(), Json::String(http.host.into()));
        fields.insert("scheme".into(), Json::String(http.scheme.into()));
        fields.insert("protocol".into(), Json::String(http.protocol.into()));
        fields.insert("headers".into(), Json::Object(headers));
        let mut request_attributes = Map::new();
        request_attributes.insert("http".into(), Json::Object(fields));
        attributes.insert("request".into(), Json::Object(request_attributes));
        document.insert("parsed_path".into(), parsed_path(http.path));
        document.insert(
            "parsed_query".into(),
            parsed_query(http.query.unwrap_or("")),
        );
    }
    document.insert("attributes".into(), Json::Object(attributes));
    if let Some(claims) = request.jwt_claims {
        let mut jwt = Map::new();
        jwt.insert("claims".into(), Json::Object(claims.clone()));
        document.insert("jwt".into(), Json::Object(jwt));
    }
    Ok(Json::Object(document))
}

/// Bytes of request text put in one input document so far.
#[derive(Default)]
struct InputBudget {
    spent: usize,
}

impl InputBudget {
    fn spend(&mut self, bytes: usize) -> Result<(), EvaluationFailure> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > MAX_INPUT_BYTES {
            Err(EvaluationFailure::InputTooLarge)
        } else {
            Ok(())
        }
    }
}

/// The path's segments after its leading `/`s, each percent-decoded (as OPA-Envoy
/// splits Go's decoded `URL.Path`): `/orders/7` is `["orders", "7"]`, `/` is `[""]`.
pub fn parsed_path(path: &str) -> Json {
    let decoded = percent_decode(path, false);
    Json::Array(
        decoded
            .trim_start_matches('/')
            .split('/')
            .map(|segment| Json::String(segment.into()))
            .collect(),
    )
}

/// Query parameters as Go's `URL.Query()` reads them: `+` is a space, escapes decoded,
/// each name mapped to all its values in order; a pair with `;` or a broken escape is
/// left out.
pub fn parsed_query(query: &str) -> Json {
    let mut parameters = Map::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        if pair.contains(';') {
            continue;
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(name), Some(value)) = (strict_decode(name), strict_decode(value)) else {
            continue;
        };
        if let Json::Array(values) = parameters
            .entry(name)
            .or_insert_with(|| Json::Array(Vec::new()))
        {
            values.push(Json::String(value));
        }
    }
    Json::Object(parameters)
}

/// A query component decoded, `+` as space; `None` for a broken escape.
fn strict_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let valid = bytes.get(index + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(index + 2).is_some_and(u8::is_ascii_hexdigit);
            if !valid {
                return None;
            }
            index += 3;
        } else {
            index += 1;
        }
    }
    Some(percent_decode(text, true))
}

/// Percent-escapes decoded (invalid UTF-8 replaced); broken escapes kept as written.
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        let escaped = (byte == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(value) => {
                decoded.push(value);
                index += 3;
            }
            None => {
                decoded.push(if plus_is_space && byte == b'+' {
                    b' '
                } else {
                    byte
                });
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName, HeaderValue};
    use serde_json::json;

    use super::*;
    use crate::SpiffeId;
    use crate::policy::HttpRequest;

    const RBAC: &str = r#"
package tessera.authz

default allow := false

allow if {
    input.attributes.source.principal == "spiffe://cluster.local/ns/shop/sa/frontend"
    input.attributes.request.http.method == "GET"
    input.parsed_path[0] == "orders"
}

deny contains "admin paths are closed" if input.parsed_path[0] == "admin"
"#;

    fn provider(query: &str, modules: &[(&str, &str)], data: Option<Json>) -> RegoProvider {
        RegoProvider {
            query: query.into(),
            modules: modules
                .iter()
                .map(|(name, source)| RegoModule {
                    name: (*name).into(),
                    source: Some((*source).into()),
                    file: None,
                })
                .collect(),
            data,
        }
    }

    fn compile(query: &str, source: &str) -> CompiledRego {
        CompiledRego::try_from(&provider(query, &[("authz.rego", source)], None))
            .expect("a policy that compiles")
    }

    fn frontend() -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", "frontend").unwrap()
    }

    fn orders() -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", "orders").unwrap()
    }

    /// Decides `method path?query` from `source` with `headers`.
    fn decide(
        rego: &CompiledRego,
        source: Option<&SpiffeId>,
        method: &str,
        target: &str,
        headers: &HeaderMap,
    ) -> RegoVerdict {
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        let destination = orders();
        rego.evaluate(&Request {
            source,
            destination: Some(&destination),
            request_principal: None,
            jwt_claims: None,
            port: 8080,
            http: Some(HttpRequest {
                method,
                path,
                query,
                host: "orders.shop",
                scheme: "http",
                protocol: "HTTP/1.1",
                header: &|_: &HeaderName| None,
                headers: Some(headers),
            }),
        })
    }

    #[test]
    fn decides_by_principal_method_and_path() {
        let rego = compile("data.tessera.authz.allow", RBAC);
        let none = HeaderMap::new();
        let frontend = frontend();
        let allowed = decide(&rego, Some(&frontend), "GET", "/orders/7", &none);
        assert!(allowed.allowed, "{allowed:?}");
        assert_eq!(allowed.failure, None);
        for (source, method, path) in [
            (Some(&frontend), "POST", "/orders/7"),
            (Some(&frontend), "GET", "/payments"),
            (None, "GET", "/orders/7"),
        ] {
            let denied = decide(&rego, source, method, path, &none);
            assert!(!denied.allowed, "{method} {path} from {source:?}");
            assert_eq!(denied.reason, "data.tessera.authz.allow is false");
            assert_eq!(denied.failure, None);
        }
    }

    #[test]
    fn a_denial_names_the_deny_rule_that_fired() {
        let rego = compile("data.tessera.authz.allow", RBAC);
        let denied = decide(
            &rego,
            Some(&frontend()),
            "GET",
            "/admin/x",
            &HeaderMap::new(),
        );
        assert!(!denied.allowed);
        assert_eq!(denied.reason, "deny: admin paths are closed");
    }

    #[test]
    fn an_object_result_decides_with_its_reason() {
        let rego = compile(
            "data.envoy.authz.allow",
            r#"
package envoy.authz

allow := {"allowed": false, "reason": "tenant suspended"} if input.attributes.request.http.headers["x-tenant"] == "acme"
else := {"allowed": true}
"#,
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", HeaderValue::from_static("acme"));
        let denied = decide(&rego, None, "GET", "/", &headers);
        assert_eq!(
            (denied.allowed, denied.reason.as_str()),
            (false, "tenant suspended")
        );
        let allowed = decide(&rego, None, "GET", "/", &HeaderMap::new());
        assert!(allowed.allowed, "{allowed:?}");
    }

    #[test]
    fn anything_but_a_decision_denies() {
        for (source, failure, reason) in [
            (
                "package p\nallow if input.nothing",
                EvaluationFailure::Undefined,
                "data.p.allow is undefined",
            ),
            (
                "package p\nallow := \"yes\"",
                EvaluationFailure::NotADecision,
                "data.p.allow is neither a boolean nor an object",
            ),
            (
                "package p\nallow := {\"ok\": true}",
                EvaluationFailure::NotADecision,
                "data.p.allow is an object without a boolean `allowed`",
            ),
        ] {
            let verdict = decide(
                &compile("data.p.allow", source),
                None,
                "GET",
                "/",
                &HeaderMap::new(),
            );
            assert!(!verdict.allowed, "{source}");
            assert_eq!(verdict.failure, Some(failure), "{source}");
            assert_eq!(verdict.reason, reason);
        }
    }

    #[test]
    fn a_policy_that_explodes_is_cut_off_and_denies() {
        let rego = compile(
            "data.p.allow",
            "package p\nallow if count({x | some i in numbers.range(1, 3000); some j in numbers.range(1, 3000); x := i * j}) > 0",
        );
        let started = std::time::Instant::now();
        let verdict = decide(&rego, None, "GET", "/", &HeaderMap::new());
        assert!(!verdict.allowed);
        assert_eq!(
            verdict.failure,
            Some(EvaluationFailure::Timeout),
            "{verdict:?}"
        );
        assert!(verdict.reason.contains("budget"), "{}", verdict.reason);
        // Cut off near its budget, not after the minutes the comprehension would take.
        assert!(
            started.elapsed() < EVALUATION_BUDGET * 50,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn syntax_errors_name_the_module_and_line() {
        let error = CompiledRego::try_from(&provider(
            "data.p.allow",
            &[
                ("good.rego", "package p\nallow := true\n"),
                ("broken.rego", "package q\n\nx := [1,\n y if {\n"),
            ],
            None,
        ))
        .unwrap_err();
        let RegoError::Module { name, message } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(name, "broken.rego");
        assert_eq!(
            message,
            "broken.rego:4:4: expecting `]` while parsing array"
        );
    }

    /// regorus looks built-ins up when it calls them: one it lacks (`io.jwt.*`) denies,
    /// fail closed, naming it.
    #[test]
    fn a_missing_builtin_denies_when_called() {
        let rego = compile(
            "data.p.allow",
            "package p\nallow if io.jwt.decode(input.attributes.request.http.method)\n",
        );
        let verdict = decide(&rego, None, "GET", "/", &HeaderMap::new());
        assert!(!verdict.allowed);
        assert_eq!(
            verdict.failure,
            Some(EvaluationFailure::Error),
            "{verdict:?}"
        );
        assert!(
            verdict.reason.contains("io.jwt.decode"),
            "{}",
            verdict.reason
        );
    }

    #[test]
    fn a_query_no_module_defines_is_refused() {
        for query in ["data.p.alow", "data.p", "allow", "data.p.allow; true", ""] {
            let error = CompiledRego::try_from(&provider(
                query,
                &[("p.rego", "package p\nallow := true\n")],
                None,
            ))
            .unwrap_err();
            assert!(matches!(error, RegoError::Query { .. }), "{query}: {error}");
        }
    }

    #[test]
    fn data_is_an_object_the_policy_reads() {
        let source = "package p\nallow if input.attributes.request.http.method in data.methods";
        let rego = CompiledRego::try_from(&provider(
            "data.p.allow",
            &[("p.rego", source)],
            Some(json!({"methods": ["GET", "HEAD"]})),
        ))
        .unwrap();
        assert!(decide(&rego, None, "HEAD", "/", &HeaderMap::new()).allowed);
        assert!(!decide(&rego, None, "PUT", "/", &HeaderMap::new()).allowed);
        let error = CompiledRego::try_from(&provider(
            "data.p.allow",
            &[("p.rego", source)],
            Some(json!(["GET"])),
        ))
        .unwrap_err();
        assert_eq!(error, RegoError::Data("must be an object".into()));
    }

    #[test]
    fn the_input_has_opa_envoys_shape() {
        let mut headers = HeaderMap::new();
        headers.append("x-user", HeaderValue::from_static("alice"));
        headers.append("accept", HeaderValue::from_static("text/html"));
        headers.append("accept", HeaderValue::from_static("application/json"));
        let frontend = frontend();
        let destination = orders();
        let claims: Map<String, Json> =
            serde_json::from_value(json!({"sub": "bob", "groups": ["admin"]})).unwrap();
        let document = input(&Request {
            source: Some(&frontend),
            destination: Some(&destination),
            request_principal: Some("https://issuer/bob"),
            jwt_claims: Some(&claims),
            port: 8080,
            http: Some(HttpRequest {
                method: "GET",
                path: "/orders/a%20b/",
                query: Some("verbose=1&tag=x&tag=y+z&bad=%zz"),
                host: "orders.shop:8080",
                scheme: "http",
                protocol: "HTTP/2",
                header: &|_: &HeaderName| None,
                headers: Some(&headers),
            }),
        })
        .unwrap();
        assert_eq!(
            document,
            json!({
                "attributes": {
                    "source": {"principal": "spiffe://cluster.local/ns/shop/sa/frontend"},
                    "destination": {"principal": "spiffe://cluster.local/ns/shop/sa/orders"},
                    "request": {"http": {
                        "method": "GET",
                        "path": "/orders/a%20b/?verbose=1&tag=x&tag=y+z&bad=%zz",
                        "host": "orders.shop:8080",
                        "scheme": "http",
                        "protocol": "HTTP/2",
                        "headers": {
                            ":authority": "orders.shop:8080",
                            ":method": "GET",
                            ":path": "/orders/a%20b/?verbose=1&tag=x&tag=y+z&bad=%zz",
                            ":scheme": "http",
                            "x-user": "alice",
                            "accept": "text/html,application/json",
                        },
                    }},
                },
                "parsed_path": ["orders", "a b", ""],
                "parsed_query": {"verbose": ["1"], "tag": ["x", "y z"]},
                "jwt": {"claims": {"sub": "bob", "groups": ["admin"]}},
            })
        );
    }

    #[test]
    fn a_connection_has_no_request_attributes() {
        let frontend = frontend();
        let document = input(&Request {
            source: Some(&frontend),
            destination: None,
            request_principal: None,
            jwt_claims: None,
            port: 5432,
            http: None,
        })
        .unwrap();
        assert_eq!(
            document,
            json!({"attributes": {
                "source": {"principal": "spiffe://cluster.local/ns/shop/sa/frontend"},
                "destination": {},
            }})
        );
    }

    #[test]
    fn hostile_requests_are_refused_before_an_input_is_built() {
        let rego = compile("data.p.allow", "package p\nallow := true");
        let mut many = HeaderMap::new();
        for index in 0..=MAX_INPUT_HEADERS {
            many.insert(
                HeaderName::from_bytes(format!("x-{index}").as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        let mut huge = HeaderMap::new();
        for index in 0..4 {
            let value = HeaderValue::from_str(&"v".repeat(MAX_INPUT_BYTES / 3)).unwrap();
            huge.insert(
                HeaderName::from_bytes(format!("x-{index}").as_bytes()).unwrap(),
                value,
            );
        }
        let long_path = format!("/{}", "a".repeat(MAX_INPUT_BYTES));
        for (headers, path) in [
            (&many, "/"),
            (&huge, "/"),
            (&HeaderMap::new(), long_path.as_str()),
        ] {
            let verdict = decide(&rego, None, "GET", path, headers);
            assert!(!verdict.allowed);
            assert_eq!(verdict.failure, Some(EvaluationFailure::InputTooLarge));
        }
        assert!(decide(&rego, None, "GET", "/", &HeaderMap::new()).allowed);
    }

    #[test]
    fn concurrent_evaluations_share_the_compiled_policy() {
        let rego = std::sync::Arc::new(compile("data.tessera.authz.allow", RBAC));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let rego = rego.clone();
                std::thread::spawn(move || {
                    let frontend = frontend();
                    (0..50).all(|index| {
                        let path = if index % 2 == 0 {
                            "/orders/1"
                        } else {
                            "/admin"
                        };
                        decide(&rego, Some(&frontend), "GET", path, &HeaderMap::new()).allowed
                            == (index % 2 == 0)
                    })
                })
            })
            .collect();
        for thread in threads {
            assert!(thread.join().unwrap());
        }
        assert!(rego.engines.lock().unwrap().idle.len() <= 4);
    }

    #[test]
    fn queries_parse_as_rule_paths() {
        assert_eq!(
            rule_package("data.tessera.authz.allow"),
            Some("data.tessera.authz")
        );
        assert_eq!(rule_package("data.p.allow"), Some("data.p"));
        assert_eq!(rule_package("data.allow"), None);
        assert_eq!(rule_package("data.p[0]"), None);
        assert_eq!(rule_package("input.x"), None);
    }
}
