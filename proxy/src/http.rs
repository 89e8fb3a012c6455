//! HTTP pieces shared by inbound and outbound: the body type, hop-by-hop header
//! handling (RFC 9110 §7.6.1), the HTTP/1.1-over-HTTP/2 marker, and honest error
//! responses with a `tessera-proxy-error` header (or the matching gRPC status).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};

/// Error type inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends: streamed, never buffered whole.
pub type Body = BoxBody<Bytes, BoxError>;

/// Set by the outbound proxy when it carries an HTTP/1.1 request over HTTP/2, so the
/// inbound proxy talks HTTP/1.1 to the application again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("tessera-orig-proto");
/// Names why the proxy answered instead of the application.
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("tessera-proxy-error");
/// A gRPC call's status, in the trailers (or the head of a trailers-only answer). A
/// name, not text: looking up by text parses it first, and this is read per call.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Boxes any body into [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

pub fn empty() -> Body {
    boxed(Empty::<Bytes>::new().map_err(|never| match never {}))
}

/// Removes hop-by-hop headers: those named in `Connection` and the fixed list. `TE:
/// trailers` survives (gRPC needs it); `Upgrade` survives when `keep_upgrade` (the
/// request is being upgraded end to end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names marks the hop-by-hop ones present (most messages carry
    // none, nginx's responses only `Connection`): only those are looked up to remove.
    let mut present = 0u16;
    for (name, value) in headers.iter() {
        if let Some(index) = hop_by_hop_index(name.as_str())
            && !(index == TE_INDEX && value == "trailers")
        {
            present |= 1 << index;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 << CONNECTION_INDEX != 0 {
        remove_connection_listed(headers);
    }
    let te_trailers = present & 1 << TE_INDEX != 0
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    if keep_upgrade {
        present &= !(1 << CONNECTION_INDEX | 1 << UPGRADE_INDEX);
    }
    for (index, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << index != 0 {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes what the `Connection` fields name, but the fixed hop-by-hop names: those
/// [`strip_hop_by_hop`] removes itself when present (`keep-alive`, nginx's usual, is
/// then no lookup at all). Almost always one field: its value is cloned (a reference
/// count, the map changes under it).
fn remove_connection_listed(headers: &mut HeaderMap) {
    let (first, more) = {
        let mut values = headers.get_all(header::CONNECTION).iter();
        (values.next().cloned(), values.next().is_some())
    };
    if more {
        let all: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        for value in &all {
            remove_listed(headers, value);
        }
    } else if let Some(value) = first {
        remove_listed(headers, &value);
    }
}

/// Removes the headers a `Connection` value names (in any letter case), but the fixed
/// ones.
fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue) {
    let Ok(names) = connection.to_str() else {
        return;
    };
    for name in names.split(',').map(str::trim) {
        if !is_fixed_hop_by_hop(name) {
            headers.remove(name);
        }
    }
}

/// True when `name`, in any letter case, is one of the fixed hop-by-hop names. Lower
/// case (nginx's `keep-alive`, the usual) is one `match`; other cases compare with each.
fn is_fixed_hop_by_hop(name: &str) -> bool {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        HOP_BY_HOP
            .iter()
            .any(|hop| hop.as_str().eq_ignore_ascii_case(name))
    } else {
        hop_by_hop_index(name).is_some()
    }
}

/// The fixed hop-by-hop names (RFC 9110 §7.6.1, and the pre-standard ones), all of
/// which [`strip_hop_by_hop`] removes (`TE` unless it is just `trailers`). A static:
/// iterating a const array would build and drop all ten names per call.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("http2-settings"),
];
const CONNECTION_INDEX: usize = 0;
const TE_INDEX: usize = 1;
const UPGRADE_INDEX: usize = 6;

/// The index in [`HOP_BY_HOP`] of a hop-by-hop name (lower case, as a `HeaderName`
/// always is). By text: one `match`, no `HeaderName` comparisons.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => CONNECTION_INDEX,
        "te" => TE_INDEX,
        "transfer-encoding" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "trailer" => 5,
        "upgrade" => UPGRADE_INDEX,
        "keep-alive" => 7,
        "proxy-connection" => 8,
        "http2-settings" => 9,
        _ => return None,
    })
}

/// True for requests asking to switch protocols (WebSocket and friends). `h2c` is not
/// one: it would turn an authorized request into an unchecked HTTP/2 tunnel, so it is
/// stripped like any hop-by-hop header and the request served as plain HTTP/1.1.
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() <= Version::HTTP_11
        && request
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|protocol| !protocol.trim().eq_ignore_ascii_case("h2c"))
}

/// True for gRPC calls, which get errors as gRPC statuses.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Why the proxy answered itself. Each maps to a status and a short reason; bodies and
/// headers never carry internal addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The service has no endpoint at all, or every one is ejected.
    NoEndpoints,
    /// No connection could be made to the chosen endpoint.
    Unreachable,
    /// The upstream reset or closed the request.
    Reset,
    /// The peer refused the request before processing it (GOAWAY, REFUSED_STREAM), and
    /// it could not be sent again: safe for the caller to retry.
    Unprocessed,
    /// The route's timeout passed.
    Timeout,
    /// The local application refused the connection.
    AppUnavailable,
    /// The request itself cannot be forwarded (e.g. no usable authority).
    BadRequest,
    /// The caller's request body failed: malformed framing, a caller that hung up
    /// mid-body, more bytes than it announced. The caller's error, never the upstream's.
    BadRequestBody,
    /// The caller's request body came slower than `limits.requestBodyMinRate` while the
    /// proxy waited for it.
    RequestBodyTimeout,
    /// The application's response head is larger than the proxy takes.
    ResponseHeadTooLarge,
    /// Authorization policy denied the request.
    Forbidden,
    /// The request carried a token that is not acceptable; names why.
    Unauthenticated(&'static str),
    /// The proxy holds as many requests or application connections as it may.
    Overloaded,
    /// A RateLimitPolicy has no token for the request now; one comes in
    /// `retry_after_seconds` (rounded up).
    RateLimited { retry_after_seconds: u64 },
}

impl ProxyError {
    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::NoEndpoints => "no-healthy-endpoints",
            ProxyError::Unreachable => "upstream-unreachable",
            ProxyError::Reset => "upstream-reset",
            ProxyError::Unprocessed => "upstream-refused",
            ProxyError::Timeout => "timeout",
            ProxyError::AppUnavailable => "application-unavailable",
            ProxyError::BadRequest => "bad-request",
            ProxyError::BadRequestBody => "bad-request-body",
            ProxyError::RequestBodyTimeout => "request-timeout",
            ProxyError::ResponseHeadTooLarge => "response-headers-too-large",
            ProxyError::Forbidden => "access-denied",
            ProxyError::Unauthenticated(reason) => reason,
            ProxyError::Overloaded => "proxy-overloaded",
            ProxyError::RateLimited { .. } => "rate-limited",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoEndpoints | ProxyError::Overloaded | ProxyError::Unprocessed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Unreachable
            | ProxyError::Reset
            | ProxyError::AppUnavailable
            | ProxyError::ResponseHeadTooLarge => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest | ProxyError::BadRequestBody => StatusCode::BAD_REQUEST,
            ProxyError::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// gRPC status code: UNAVAILABLE, DEADLINE_EXCEEDED, INVALID_ARGUMENT,
    /// PERMISSION_DENIED, UNAUTHENTICATED or RESOURCE_EXHAUSTED.
    fn grpc_status(self) -> &'static str {
        match self {
            ProxyError::Timeout | ProxyError::RequestBodyTimeout => "4",
            ProxyError::BadRequest | ProxyError::BadRequestBody => "3",
            ProxyError::Forbidden => "7",
            ProxyError::Unauthenticated(_) => "16",
            ProxyError::RateLimited { .. } => "8",
            _ => "14",
        }
    }

    /// The response for a caller speaking `version`, gRPC or not.
    pub fn response(self, grpc: bool) -> Response<Body> {
        let mut response = Response::new(empty());
        let headers = response.headers_mut();
        headers.insert(PROXY_ERROR, HeaderValue::from_static(self.reason()));
        if grpc {
            // Trailers-only response: status in the headers, as gRPC allows.
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(
                GRPC_STATUS.clone(),
                HeaderValue::from_static(self.grpc_status()),
            );
            headers.insert(
                GRPC_MESSAGE.clone(),
                HeaderValue::from_static(self.reason()),
            );
        } else {
            *response.status_mut() = self.status();
            match self {
                ProxyError::Unauthenticated(_) => {
                    response.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer error=\"invalid_token\""),
                    );
                }
                ProxyError::RateLimited {
                    retry_after_seconds,
                } => {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
                }
                _ => {}
            }
            *response.body_mut() = boxed(
                http_body_util::Full::new(Bytes::from_static(self.reason().as_bytes()))
                    .map_err(|never| match never {}),
            );
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(index), "{name}");
        }
        assert_eq!(hop_by_hop_index(header::HOST.as_str()), None);
    }

    #[test]
    fn fixed_hop_by_hop_names_match_in_any_letter_case() {
        for name in ["keep-alive", "Keep-Alive", "TE", "te", "HTTP2-Settings"] {
            assert!(is_fixed_hop_by_hop(name), "{name}");
        }
        for name in ["x-secret-hop", "X-Keep-Alive", "host", ""] {
            assert!(!is_fixed_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn strips_hop_by_hop_but_keeps_te_trailers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-app", "te"]);
        assert_eq!(headers[header::TE], "trailers");
    }

    #[test]
    fn te_trailers_survives_a_connection_field_naming_te() {
        // RFC 9110 §10.1.4: a sender of TE also lists it in Connection.
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("TE, Keep-Alive"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["te"]);
        assert_eq!(headers[header::TE], "trailers");
    }

    #[test]
    fn leaves_end_to_end_headers_and_te_trailers_alone() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let before = headers.clone();
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers, before);
        // Any one hop-by-hop header is still found among end-to-end ones.
        for name in [
            "keep-alive",
            "proxy-connection",
            "http2-settings",
            "trailer",
        ] {
            let mut with_hop = before.clone();
            with_hop.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut with_hop, false);
            assert_eq!(with_hop, before, "{name} must go");
        }
    }

    #[test]
    fn removes_what_every_connection_field_names() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("X-First-Hop"));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static(" x-second-hop , not a name ,"),
        );
        headers.insert("x-first-hop", HeaderValue::from_static("1"));
        headers.insert("x-second-hop", HeaderValue::from_static("2"));
        headers.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-app"]);
    }

    #[test]
    fn a_lone_connection_field_goes_and_nothing_else() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert(header::SERVER, HeaderValue::from_static("nginx"));
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["content-length", "server"]);
    }

    #[test]
    fn keeps_upgrade_when_upgrading() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "Upgrade");
        assert!(!headers.contains_key(header::TRANSFER_ENCODING));
    }

    #[test]
    fn grpc_errors_are_trailers_only_statuses() {
        let response = ProxyError::Timeout.response(true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "4");
        let response = ProxyError::NoEndpoints.response(false);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[PROXY_ERROR], "no-healthy-endpoints");
    }
}

/// A future on the heap. Made in a plain function (`fn … -> BoxFuture { Box::pin(…) }`),
/// the large future is built straight into its box: boxed inside an `async fn`, it would
/// still take its full size in the caller's state as a temporary.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Request bodies for tests.
#[cfg(test)]
pub mod test_bodies {
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};

    use bytes::Bytes;
    use http_body::Frame;
    use tokio::sync::oneshot;

    use super::BoxError;

    /// Sends one chunk, then waits: fails once told to (a client that broke off), or
    /// never ends while the teller is kept (a stalled upload).
    pub struct Upload {
        chunk: Option<Bytes>,
        fail: oneshot::Receiver<()>,
    }

    /// The body, and what tells it to fail.
    pub fn upload(chunk: &'static [u8]) -> (Upload, oneshot::Sender<()>) {
        let (fail, failed) = oneshot::channel();
        let body = Upload {
            chunk: Some(Bytes::from_static(chunk)),
            fail: failed,
        };
        (body, fail)
    }

    impl http_body::Body for Upload {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if let Some(chunk) = self.chunk.take() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            let _ = ready!(Pin::new(&mut self.fail).poll(cx));
            Poll::Ready(Some(Err("client went away".into())))
        }
    }
}
