//! The mutating admission webhook (HTTPS, port 15017): the Kubernetes API server sends
//! every Pod created in a labelled namespace to `POST /inject` as an AdmissionReview,
//! and gets back a JSONPatch that adds the sidecar — the same mutation as
//! `tessera inject`, from [`crate::inject`].
//!
//! The serving certificate comes from the mesh CA, so the webhook's `caBundle` is the
//! mesh's trust bundle (`<state-dir>/root-cert.pem`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use kube_core::DynamicObject;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rustls::ServerConfig;
use serde_json::Value;
use tessera_mesh::tls::{self, CurrentCert};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::inject::{self, Injection, Outcome};

/// The one path the webhook serves.
pub(crate) const PATH: &str = "/inject";
/// The names the API server may dial the webhook by (the Service), and local ones for
/// tests and port-forwards.
pub(crate) const DNS_NAMES: [&str; 3] = [
    "tessera-control-plane.tessera-system.svc",
    "tessera-control-plane.tessera-system.svc.cluster.local",
    "localhost",
];
pub(crate) const IP_ADDRESSES: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)];

/// Pods are a few KiB; the API server's own limit on a request is 3 MiB.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// The API server keeps a few connections; 64 bodies in flight bound memory to 256 MiB.
const MAX_CONNECTIONS: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Also closes idle keep-alive connections: hyper starts it when waiting for a request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server gives up after the webhook's `timeoutSeconds` (10 s) anyway.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A line per probe, ~100 characters each: a few containers' worth.
const MAX_LOGGED_PROBES: usize = 4096;

/// Why a request is not an AdmissionReview this webhook can answer (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReviewError {
    #[error("body is not an AdmissionReview: {0}")]
    Json(#[from] serde_json::Error),
    #[error("expected an admission.k8s.io/v1 AdmissionReview, got {api_version:?} {kind:?}")]
    Version { api_version: String, kind: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
    /// Not the caller's fault (HTTP 500).
    #[error("cannot build the answer: {0}")]
    Internal(String),
}

impl ReviewError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ReviewError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

fn internal(error: impl std::fmt::Display) -> ReviewError {
    ReviewError::Internal(error.to_string())
}

/// The answer to one review, and what to log about it.
#[derive(Debug)]
pub(crate) struct Reviewed {
    /// The AdmissionReview to send back.
    pub review: Value,
    pub uid: String,
    pub namespace: String,
    pub pod: String,
    pub result: ReviewResult,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReviewResult {
    /// With a line per probe: rewritten through the proxy, or left and why.
    Injected {
        probes: Vec<String>,
    },
    Unchanged(String),
    Refused(String),
}

/// Answers one AdmissionReview body: a patch for a Pod to inject, no patch for
/// anything else, a refusal when the pod's annotations are invalid.
pub(crate) fn review(body: &[u8], options: &inject::Options) -> Result<Reviewed, ReviewError> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)?;
    if review.types.api_version != kube_core::admission::META_API_VERSION_V1
        || review.types.kind != kube_core::admission::META_KIND
    {
        return Err(ReviewError::Version {
            api_version: review.types.api_version,
            kind: review.types.kind,
        });
    }
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| ReviewError::NoRequest)?;
    let (namespace, pod) = describe(&request);
    let (response, result) = decide(&request, options)?;
    Ok(Reviewed {
        review: to_wire(response)?,
        uid: request.uid,
        namespace,
        pod,
        result,
    })
}

fn decide(
    request: &AdmissionRequest<DynamicObject>,
    options: &inject::Options,
) -> Result<(AdmissionResponse, ReviewResult), ReviewError> {
    let allow = AdmissionResponse::from(request);
    let unchanged = |why: &str| Ok((allow.clone(), ReviewResult::Unchanged(why.into())));
    if (request.kind.group.as_str(), request.kind.kind.as_str()) != ("", "Pod") {
        return unchanged("not a pod");
    }
    // A running pod's containers cannot change; only creation is ours to mutate.
    if request.operation != Operation::Create {
        return unchanged("not a creation");
    }
    let Some(object) = &request.object else {
        return unchanged("no object");
    };
    let before = serde_json::to_value(object).map_err(internal)?;
    let mut pod = before.clone();
    match inject::inject_pod_reporting(&mut pod, options) {
        Ok(Injection {
            outcome: Outcome::Injected,
            probes,
        }) => {
            let patch = json_patch::diff(&before, &pod);
            let response = allow.with_patch(patch).map_err(internal)?;
            let probes = probes.iter().map(ToString::to_string).collect();
            Ok((response, ReviewResult::Injected { probes }))
        }
        Ok(Injection {
            outcome: Outcome::Skipped(reason),
            ..
        }) => unchanged(&reason.to_string()),
        Err(error) => {
            let message = format!("tessera sidecar injection refused: {error}");
            Ok((allow.deny(&message), ReviewResult::Refused(message)))
        }
    }
}

/// kube-core serializes the patch as a JSON array of bytes; Kubernetes, like Go for
/// any `[]byte`, wants base64.
fn to_wire(response: AdmissionResponse) -> Result<Value, ReviewError> {
    let patch = response.patch.clone();
    let mut review = serde_json::to_value(response.into_review()).map_err(internal)?;
    if let (Some(patch), Some(wire)) = (patch, review.pointer_mut("/response/patch")) {
        *wire = Value::from(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    Ok(review)
}

/// The pod's namespace (from the request when the pod has none, as at creation) and
/// its name, or `generateName` for pods of a ReplicaSet, for the log line.
fn describe(request: &AdmissionRequest<DynamicObject>) -> (String, String) {
    let metadata = request.object.as_ref().map(|object| &object.metadata);
    let namespace = metadata
        .and_then(|m| m.namespace.clone())
        .or_else(|| request.namespace.clone())
        .unwrap_or_default();
    let pod = metadata
        .and_then(|m| m.name.clone().or_else(|| m.generate_name.clone()))
        .unwrap_or_else(|| request.name.clone());
    (namespace, pod)
}

/// TLS for the API server: no client certificate (it presents none by default), TLS 1.2
/// or 1.3, HTTP/1.1.
pub(crate) fn server_config(cert: Arc<CurrentCert>) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(tls::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the webhook on `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    options: Arc<inject::Options>,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return;
        };
        let (stream, caller) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(event = "webhook accept failed", error = %error);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let options = options.clone();
        tokio::spawn(async move {
            serve_connection(stream, caller, acceptor, options).await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    caller: SocketAddr,
    acceptor: TlsAcceptor,
    options: Arc<inject::Options>,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return debug!(event = "webhook TLS handshake failed", %caller, reason = %error);
        }
        Err(_) => {
            return debug!(event = "webhook TLS handshake failed", %caller, reason = "timed out");
        }
    };
    let service = service_fn(move |request| {
        let options = options.clone();
        async move { Ok::<_, Infallible>(handle(request, &options).await) }
    });
    if let Err(error) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(event = "webhook connection error", %caller, error = %error);
    }
}

async fn handle(request: Request<Incoming>, options: &inject::Options) -> Response<Full<Bytes>> {
    if request.uri().path() != PATH {
        return text(StatusCode::NOT_FOUND, format!("not found; POST {PATH}\n"));
    }
    if request.method() != Method::POST {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, format!("POST {PATH}\n"));
        response
            .headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return response;
    }
    let reading = Limited::new(request.into_body(), MAX_BODY).collect();
    let Ok(read) = tokio::time::timeout(BODY_TIMEOUT, reading).await else {
        return text(
            StatusCode::REQUEST_TIMEOUT,
            "body not received in time\n".into(),
        );
    };
    let body = match read {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("AdmissionReview larger than {MAX_BODY} bytes\n"),
            );
        }
        Err(error) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read body: {error}\n"),
            );
        }
    };
    match review(&body, options) {
        Ok(reviewed) => {
            log(&reviewed);
            let json = serde_json::to_vec(&reviewed.review).unwrap_or_default();
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json)))
                .unwrap_or_default()
        }
        Err(error) => {
            warn!(event = "admission review refused", reason = %error);
            text(error.status(), format!("{error}\n"))
        }
    }
}

/// One line per review; never the object, which may carry secrets in env values.
fn log(reviewed: &Reviewed) {
    let (result, reason, probes) = match &reviewed.result {
        ReviewResult::Injected { probes } => ("injected", "", probes.join("; ")),
        ReviewResult::Unchanged(why) => ("unchanged", why.as_str(), String::new()),
        ReviewResult::Refused(why) => ("refused", why.as_str(), String::new()),
    };
    info!(
        event = "admission review",
        uid = %printable(&reviewed.uid),
        namespace = %printable(&reviewed.namespace),
        pod = %printable(&reviewed.pod),
        result,
        reason = %printable(reason),
        probes = %printable_up_to(&probes, MAX_LOGGED_PROBES),
    );
}

/// Text from the request, made safe for a log line: bounded, no control characters.
fn printable(text: &str) -> String {
    printable_up_to(text, 512)
}

fn printable_up_to(text: &str, max_chars: usize) -> String {
    text.chars()
        .take(max_chars)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn admission_review(kind: &str, operation: &str, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": kind },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "shop",
                "operation": operation,
                "userInfo": { "username": "admin" },
                "object": object,
                "oldObject": null
            }
        }))
        .unwrap()
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "generateName": "web-7d4b9-", "annotations": annotations },
            "spec": { "containers": [{ "name": "web", "image": "web:1" }] }
        })
    }

    #[test]
    fn a_pod_gets_a_base64_json_patch_equal_to_the_cli_mutation() {
        let options = inject::Options::default();
        let reviewed =
            review(&admission_review("Pod", "CREATE", pod(json!({}))), &options).unwrap();
        assert_eq!(reviewed.result, ReviewResult::Injected { probes: vec![] });
        assert_eq!(
            (reviewed.namespace.as_str(), reviewed.pod.as_str()),
            ("shop", "web-7d4b9-")
        );
        let response = &reviewed.review["response"];
        assert_eq!(reviewed.review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut patched = pod(json!({}));
        json_patch::patch(&mut patched, &patch).unwrap();
        let mut expected = pod(json!({}));
        inject::inject_pod(&mut expected, &options).unwrap();
        assert_eq!(patched, expected);
    }

    /// The log says what became of each probe, as `tessera inject` does.
    #[test]
    fn the_result_names_each_probe_rewritten_or_left() {
        let mut object = pod(json!({ "tessera.dev/exclude-inbound-ports": "5432" }));
        object["spec"]["containers"][0]["livenessProbe"] = json!({ "grpc": { "port": 9090 } });
        object["spec"]["containers"][0]["readinessProbe"] =
            json!({ "tcpSocket": { "port": 5432 } });
        let reviewed = review(
            &admission_review("Pod", "CREATE", object),
            &inject::Options::default(),
        )
        .unwrap();
        assert_eq!(
            reviewed.result,
            ReviewResult::Injected {
                probes: vec![
                    "rewrote web/livenessProbe (grpc :9090) → :15020/app-health/web/livez".into(),
                    "left web/readinessProbe (tcpSocket :5432, port excluded from capture)".into(),
                ]
            }
        );
    }

    #[test]
    fn other_kinds_operations_and_opted_out_pods_get_no_patch() {
        let options = inject::Options::default();
        for (kind, operation, object, why) in [
            (
                "Pod",
                "CREATE",
                pod(json!({ "tessera.dev/inject": "false" })),
                "opted out",
            ),
            ("Pod", "UPDATE", pod(json!({})), "not a creation"),
            ("Service", "CREATE", json!({ "metadata": {} }), "not a pod"),
        ] {
            let reviewed = review(&admission_review(kind, operation, object), &options).unwrap();
            let ReviewResult::Unchanged(reason) = &reviewed.result else {
                panic!("{kind} {operation}: {:?}", reviewed.result);
            };
            assert!(reason.contains(why), "{reason}");
            assert_eq!(reviewed.review["response"]["allowed"], true);
            assert!(reviewed.review["response"].get("patch").is_none());
        }
    }

    #[test]
    fn invalid_annotations_are_refused_with_the_reason() {
        let body = admission_review(
            "Pod",
            "CREATE",
            pod(json!({ "tessera.dev/exclude-inbound-ports": "http" })),
        );
        let reviewed = review(&body, &inject::Options::default()).unwrap();
        let response = &reviewed.review["response"];
        assert_eq!(response["allowed"], false);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("tessera.dev/exclude-inbound-ports: \"http\" is not valid"),
            "{message}"
        );
        assert!(response.get("patch").is_none());
    }

    #[test]
    fn malformed_reviews_are_errors() {
        let options = inject::Options::default();
        assert!(matches!(
            review(b"{not json", &options),
            Err(ReviewError::Json(_))
        ));
        let no_request = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
        assert!(matches!(
            review(no_request, &options),
            Err(ReviewError::NoRequest)
        ));
        let mut beta: Value =
            serde_json::from_slice(&admission_review("Pod", "CREATE", pod(json!({})))).unwrap();
        beta["apiVersion"] = "admission.k8s.io/v1beta1".into();
        let error = review(&serde_json::to_vec(&beta).unwrap(), &options).unwrap_err();
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert!(error.to_string().contains("v1beta1"), "{error}");
    }

    #[test]
    fn logged_request_text_is_printable_and_bounded() {
        assert_eq!(printable("web-1\nINFO forged"), "web-1?INFO forged");
        assert_eq!(printable(&"x".repeat(10_000)).len(), 512);
    }

    /// `deploy/kubernetes` names the same Service, path and ports as the code.
    #[test]
    fn the_kubernetes_manifests_match_the_webhook() {
        let rendered = include_str!("../../deploy/kubernetes/tessera.yaml");
        let documents: Vec<Value> = serde_saphyr::from_multiple(rendered).unwrap();
        let find = |kind: &str| -> Value {
            documents
                .iter()
                .find(|d| d["kind"] == kind)
                .cloned()
                .unwrap()
        };

        let webhook = &find("MutatingWebhookConfiguration")["webhooks"][0];
        let service = &webhook["clientConfig"]["service"];
        assert_eq!(service["path"], PATH);
        assert_eq!(service["port"], 15017);
        let host = format!(
            "{}.{}.svc",
            service["name"].as_str().unwrap(),
            service["namespace"].as_str().unwrap()
        );
        assert_eq!(host, DNS_NAMES[0]);
        assert_eq!(webhook["failurePolicy"], "Fail");

        let service = find("Service");
        let ports: Vec<&Value> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| &p["port"])
            .collect();
        assert_eq!(ports, [15012, 15014, 15017]);
        let args = find("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].clone();
        let address = format!(
            "--control-plane-address={}",
            inject::DEFAULT_CONTROL_PLANE_ADDRESS
        );
        assert!(
            args.as_array().unwrap().contains(&Value::from(address)),
            "{args}"
        );
    }
}
