//! Protocol detection on outbound connections: HTTP/2 prior knowledge (which covers
//! gRPC), HTTP/1.x, or else opaque TCP. Bytes are peeked, never consumed.
//!
//! A client that says nothing within the detection timeout is taken for a
//! server-speaks-first protocol (SMTP, MySQL, banners) and proxied as opaque TCP, so its
//! server's greeting is delayed by the timeout only, not stalled.

use std::time::Duration;

use tokio::net::TcpStream;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies the connection from its first bytes, waiting at most `timeout`.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let mut buffer = [0u8; H2_PREFACE.len()];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buffer)).await {
            Ok(result) => result?,
            Err(_) => return Ok(Detected::Opaque),
        };
        match classify(&buffer[..peeked]) {
            Some(detected) => return Ok(detected),
            None if peeked == 0 => return Ok(Detected::Opaque),
            // Not enough bytes to tell yet: wait for more (peek returns at once when
            // bytes are pending, so pause briefly instead of spinning).
            None => {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(Detected::Opaque);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// `None` while the prefix could still become either protocol.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    if prefix.len() >= H2_PREFACE.len() && prefix.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if METHODS.iter().any(|m| prefix.starts_with(m)) {
        return Some(Detected::Http1);
    }
    let could_be = |pattern: &[u8]| pattern.starts_with(&prefix[..prefix.len().min(pattern.len())]);
    if could_be(H2_PREFACE) || METHODS.iter().any(|m| could_be(m)) {
        return None;
    }
    Some(Detected::Opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST /x"), Some(Detected::Http1));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Opaque));
        assert_eq!(classify(b"EHLO x"), Some(Detected::Opaque));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
    }
}
