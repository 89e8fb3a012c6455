//! HTTP/2 between proxies, and to and from HTTP/2 applications, driven on `h2`
//! directly: the [`client`] (pooled connections to a peer proxy or the local
//! application), the [`server`] (connections from peer proxies and HTTP/2
//! applications), and what both carry: request and response bodies ([`StreamBody`]) and
//! TCP connections tunnelled on `CONNECT` streams ([`Tunnel`]).

pub(crate) mod client;
pub(crate) mod server;

mod body;
mod stall;
mod tunnel;

pub(crate) use body::StreamBody;
pub(crate) use body::{BodyPump, PumpError};
pub(crate) use tunnel::Tunnel;
