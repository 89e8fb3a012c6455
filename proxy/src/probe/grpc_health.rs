//! The client side of gRPC's health protocol, as the kubelet's gRPC probe speaks it:
//! one unary `grpc.health.v1.Health/Check` call over plaintext HTTP/2 to the
//! application, on a connection of its own that closes with the call.
//!
//! The two messages are tiny — `HealthCheckRequest { string service = 1; }` and
//! `HealthCheckResponse { ServingStatus status = 1; }` — so they are encoded here by
//! hand instead of generated. The answer is bounded (headers and body) and every
//! malformed one is an error, never a panic: the application is not trusted to send a
//! well-formed message.

use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

const PATH: &str = "/grpc.health.v1.Health/Check";
/// A HealthCheckResponse takes 7 bytes framed; anything much larger is not one.
const MAX_RESPONSE_BYTES: usize = 1024;
/// The response's headers and trailers together.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// How much of a `grpc-message` makes it into the probe's answer.
const MAX_MESSAGE_CHARS: usize = 128;

/// `HealthCheckResponse.ServingStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServingStatus {
    Unknown,
    Serving,
    NotServing,
    ServiceUnknown,
    /// A value this version of the protocol does not define.
    Other(u64),
}

impl From<u64> for ServingStatus {
    fn from(value: u64) -> Self {
        match value {
            0 => Self::Unknown,
            1 => Self::Serving,
            2 => Self::NotServing,
            3 => Self::ServiceUnknown,
            other => Self::Other(other),
        }
    }
}

impl std::fmt::Display for ServingStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown => f.write_str("UNKNOWN"),
            Self::Serving => f.write_str("SERVING"),
            Self::NotServing => f.write_str("NOT_SERVING"),
            Self::ServiceUnknown => f.write_str("SERVICE_UNKNOWN"),
            Self::Other(value) => write!(f, "serving status {value}"),
        }
    }
}

/// Why the health check has no status to report.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HealthError {
    #[error("cannot connect: {0}")]
    Connect(std::io::ErrorKind),
    #[error("HTTP/2: {0}")]
    Http2(#[source] hyper::Error),
    #[error("answered HTTP {0}, not gRPC")]
    HttpStatus(StatusCode),
    /// A gRPC error instead of a response: UNIMPLEMENTED when the server has no health
    /// service, NOT_FOUND for a service it does not know.
    #[error("grpc-status {}{}", code_name(*.code), message_suffix(.message))]
    Status { code: u32, message: String },
    #[error("no grpc-status in the answer")]
    NoStatus,
    #[error("response larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("cannot read the response: {0}")]
    Body(String),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// One `Check` call to `127.0.0.1:port` with the framed `request`. The caller bounds
/// the time; `timeout` is passed on as `grpc-timeout`, as a gRPC client would.
pub(crate) async fn check(
    port: u16,
    request: Bytes,
    timeout: Duration,
) -> Result<ServingStatus, HealthError> {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| HealthError::Connect(e.kind()))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(HealthError::Http2)?;
    // Driven beside the call and closed with it, whether it ends or is dropped on timeout.
    let _connection = AbortOnDrop(tokio::spawn(connection));
    let request = http::Request::builder()
        .method(Method::POST)
        .uri(format!("http://127.0.0.1:{port}{PATH}"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header("grpc-timeout", format!("{}m", timeout.as_millis()))
        .body(Full::new(request))
        .map_err(|_| HealthError::Malformed("cannot build the request"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(HealthError::Http2)?;
    if response.status() != StatusCode::OK {
        return Err(HealthError::HttpStatus(response.status()));
    }
    let (head, body) = response.into_parts();
    // Trailers-only: a gRPC error in the headers, and no message.
    if head.headers.contains_key("grpc-status") {
        grpc_status(&head.headers)?;
        return Err(HealthError::Malformed("grpc-status 0 without a message"));
    }
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<LengthLimitError>() {
                HealthError::TooLarge
            } else {
                HealthError::Body(error.to_string())
            }
        })?;
    let trailers = body.trailers().cloned().ok_or(HealthError::NoStatus)?;
    grpc_status(&trailers)?;
    decode_response(&body.to_bytes())
}

/// Aborts the connection's task when the call is over.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `Ok` for grpc-status 0; the error the application sent otherwise.
fn grpc_status(headers: &HeaderMap) -> Result<(), HealthError> {
    let code = headers
        .get("grpc-status")
        .ok_or(HealthError::NoStatus)?
        .to_str()
        .ok()
        .and_then(|code| code.parse::<u32>().ok())
        .ok_or(HealthError::Malformed("grpc-status is not a number"))?;
    if code == 0 {
        return Ok(());
    }
    // The application's text, made safe for the probe's answer: bounded, printable.
    let message = headers
        .get("grpc-message")
        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
        .unwrap_or_default()
        .chars()
        .take(MAX_MESSAGE_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    Err(HealthError::Status { code, message })
}

fn code_name(code: u32) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|index| NAMES.get(index))
        .map_or_else(|| code.to_string(), |name| (*name).to_string())
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// The framed request: gRPC's 5-byte prefix (not compressed, message length) and the
/// `HealthCheckRequest`. `None` only for a service name beyond 4 GiB.
pub(crate) fn encode_request(service: &str) -> Option<Bytes> {
    let mut message = Vec::with_capacity(service.len() + 6);
    // proto3 leaves out a field at its default: the empty service is an empty message.
    if !service.is_empty() {
        message.push(0x0a); // field 1, wire type 2 (length-delimited)
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let length = u32::try_from(message.len()).ok()?;
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(&message);
    Some(Bytes::from(framed))
}

/// The status of one framed `HealthCheckResponse`; other fields are skipped, as
/// protobuf requires of a reader that does not know them.
pub(crate) fn decode_response(framed: &[u8]) -> Result<ServingStatus, HealthError> {
    let [compressed, l0, l1, l2, l3, message @ ..] = framed else {
        return Err(HealthError::Malformed("no gRPC message"));
    };
    if *compressed != 0 {
        return Err(HealthError::Malformed("compressed, which was not offered"));
    }
    let length = u32::from_be_bytes([*l0, *l1, *l2, *l3]);
    if usize::try_from(length).ok() != Some(message.len()) {
        return Err(HealthError::Malformed(
            "the length prefix disagrees with the body",
        ));
    }
    let mut status = 0;
    let mut rest = message;
    while !rest.is_empty() {
        let key = take_varint(&mut rest)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = take_varint(&mut rest)?,
            (_, 0) => {
                take_varint(&mut rest)?;
            }
            (_, 1) => skip(&mut rest, 8)?,
            (_, 2) => {
                let length = take_varint(&mut rest)?;
                skip(&mut rest, length)?;
            }
            (_, 5) => skip(&mut rest, 4)?,
            _ => return Err(HealthError::Malformed("unknown protobuf wire type")),
        }
    }
    Ok(ServingStatus::from(status))
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint of at most 10 bytes (64 bits).
fn take_varint(input: &mut &[u8]) -> Result<u64, HealthError> {
    let mut value = 0u64;
    for (index, byte) in input.iter().enumerate().take(10) {
        let bits = u64::from(byte & 0x7f);
        if index == 9 && bits > 1 {
            break;
        }
        value |= bits << (7 * index);
        if byte & 0x80 == 0 {
            *input = &input[index + 1..];
            return Ok(value);
        }
    }
    Err(HealthError::Malformed("truncated or overlong varint"))
}

fn skip(input: &mut &[u8], length: u64) -> Result<(), HealthError> {
    let length = usize::try_from(length)
        .ok()
        .filter(|length| *length <= input.len())
        .ok_or(HealthError::Malformed("a field runs past the message"))?;
    *input = &input[length..];
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_request_as_protobuf_would() {
        assert_eq!(&encode_request("").unwrap()[..], [0, 0, 0, 0, 0]);
        assert_eq!(
            &encode_request("orders").unwrap()[..],
            b"\0\0\0\0\x08\x0a\x06orders"
        );
        // A length that takes two varint bytes: 200 = 0xc8 0x01.
        let long = "s".repeat(200);
        let framed = encode_request(&long).unwrap();
        assert_eq!(&framed[..8], [0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
        assert_eq!(framed.len(), 5 + 3 + 200);
    }

    #[test]
    fn decodes_each_status_and_skips_unknown_fields() {
        let framed = |message: &[u8]| {
            let mut framed = vec![0];
            framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
            framed.extend_from_slice(message);
            framed
        };
        for (message, status) in [
            (&[][..], ServingStatus::Unknown),
            (&[0x08, 1][..], ServingStatus::Serving),
            (&[0x08, 2][..], ServingStatus::NotServing),
            (&[0x08, 3][..], ServingStatus::ServiceUnknown),
            (&[0x08, 0x96, 0x01][..], ServingStatus::Other(150)),
            // Unknown fields of every wire type around it; the last status wins.
            (
                &[
                    0x08, 2, 0x10, 0xff, 0x01, 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x22, 2, b'h', b'i',
                    0x2d, 1, 2, 3, 4, 0x08, 1,
                ][..],
                ServingStatus::Serving,
            ),
        ] {
            assert_eq!(
                decode_response(&framed(message)).unwrap(),
                status,
                "{message:?}"
            );
        }
    }

    /// Hostile or broken answers are errors, never panics or long loops.
    #[test]
    fn refuses_malformed_responses() {
        for (framed, reason) in [
            (&b""[..], "no gRPC message"),
            (&b"\0\0\0\0"[..], "no gRPC message"),
            (&b"\x01\0\0\0\x02\x08\x01"[..], "compressed"),
            (&b"\0\0\0\0\x03\x08\x01"[..], "length prefix"),
            (&b"\0\0\0\0\x02\x08\x01\x00"[..], "length prefix"),
            (&b"\0\xff\xff\xff\xff\x08\x01"[..], "length prefix"),
            (&b"\0\0\0\0\x02\x08\x80"[..], "varint"),
            (
                &b"\0\0\0\0\x0b\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f"[..],
                "varint",
            ),
            (&b"\0\0\0\0\x01\x0b"[..], "wire type"),
            (&b"\0\0\0\0\x03\x12\x05a"[..], "runs past"),
            (
                &b"\0\0\0\0\x0a\x12\xff\xff\xff\xff\xff\xff\xff\xff\x01"[..],
                "runs past",
            ),
            (&b"\0\0\0\0\x02\x1d\x01"[..], "runs past"),
        ] {
            let error = decode_response(framed).unwrap_err().to_string();
            assert!(error.contains(reason), "{framed:?}: {error}");
        }
    }

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut encoded = Vec::new();
            put_varint(&mut encoded, value);
            let mut input = &encoded[..];
            assert_eq!(take_varint(&mut input).unwrap(), value);
            assert!(input.is_empty());
        }
    }

    #[test]
    fn names_grpc_status_codes() {
        let error = |code: u32, message: &str| {
            HealthError::Status {
                code,
                message: message.into(),
            }
            .to_string()
        };
        assert_eq!(error(12, ""), "grpc-status UNIMPLEMENTED");
        assert_eq!(
            error(5, "unknown service"),
            "grpc-status NOT_FOUND: unknown service"
        );
        assert_eq!(error(99, ""), "grpc-status 99");
    }
}
