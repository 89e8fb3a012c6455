//! The protocols proxies name in TLS ALPN, on both sides of a connection.

/// ALPN between proxies: multiplexed HTTP/2 that also carries opaque TCP connections as
/// `CONNECT` streams. Offered first; a peer that predates tunnels answers `h2`.
pub(crate) const ALPN_H2_TUNNELS: &[u8] = b"tessera/h2";
/// ALPN between proxies: multiplexed HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// ALPN between proxies: one HTTP/1.1 connection, for upgrades (WebSocket).
pub(crate) const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN between proxies: opaque bytes on a connection of their own, to and from proxies
/// that predate tunnelling opaque TCP over the pooled HTTP/2 connection.
pub(crate) const ALPN_TCP: &[u8] = b"tessera/tcp";
