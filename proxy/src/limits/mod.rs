//! What one caller can make the proxy hold: header bytes, HTTP/2 flow-control windows,
//! and a request body's minimum rate ([`body_rate`]). The configurable limits
//! (connections, streams, timeouts) are [`crate::config::Limits`].

pub mod body_rate;

/// Request headers beyond this are refused (431 for HTTP/1, a stream error for HTTP/2).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// HTTP/2 flow-control windows, ours to grant: what a peer may send before we read it,
/// so what one stream / one connection can make us buffer. 256 KiB per stream still
/// fills a 1 ms round trip at 250 MB/s; hyper's client defaults (2 MiB / 5 MiB) let one
/// slow reader pin megabytes.
pub const STREAM_WINDOW: u32 = 256 * 1024;
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// How both listeners serve HTTP/1.1: a request head must arrive within `head_timeout`
/// (a slow client does not hold a connection open) and fit in
/// [`MAX_HEADER_BYTES`].
pub fn http1_server(head_timeout: std::time::Duration) -> hyper::server::conn::http1::Builder {
    let mut server = hyper::server::conn::http1::Builder::new();
    server
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    server
}
