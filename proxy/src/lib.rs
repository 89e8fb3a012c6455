//! The Tessera proxy: a per-workload data plane that carries traffic between workloads
//! over mutual TLS, each side proven by a SPIFFE certificate from the control plane.
//!
//! The request path, as the folders lay it out:
//! - [`outbound`]: a local application's connection (explicit listener, or captured by
//!   [`transparent`]) is [`detect`]ed as HTTP/1, HTTP/2 or opaque TCP; a request is
//!   forwarded ([`outbound::forward`]: retries, timeouts) to an endpoint picked by
//!   [`outbound::balance`], over that endpoint's pooled mTLS HTTP/2 connections
//!   ([`http2::client`], TLS from [`outbound::endpoint`]); opaque TCP rides a `CONNECT`
//!   stream on the same connections ([`http2::Tunnel`]).
//! - [`inbound`]: the peer proxy's connection is accepted (mTLS, ALPN, or plaintext on a
//!   PERMISSIVE port), its streams served ([`http2::server`], or HTTP/1.1), each request
//!   put in [`inbound::canonical`] form, authenticated ([`inbound::authn`]) and
//!   authorized ([`inbound::authorize`]) and held to its rate limits
//!   ([`inbound::rate_limit`]), then sent to the application ([`inbound::app_client`]).
//! - Around it: [`identity`] keeps the certificate fresh, [`discovery`] the part of the
//!   mesh's configuration the proxy uses (transparent mode resolving [`destinations`]
//!   on first use), [`telemetry`] and [`trace`] show what happens, [`admin`] serves
//!   probes and metrics (and the application's probes, which [`probe`] performs),
//!   [`limits`] bound what a caller can make the proxy hold, and [`app`] wires it all
//!   from [`config`], making each listener from what they share ([`listeners`]).
//!
//! `unsafe` is denied everywhere but in [`allocator`] (a global allocator is unsafe to
//! implement) and [`os`] (the C library calls std does not wrap), each saying why.

#![deny(unsafe_code)]
// Modules and items are `pub(crate)` unless another crate uses them.
#![warn(unreachable_pub)]

pub(crate) mod admin;
pub(crate) mod assertions;
// Written for glibc's malloc on 64-bit Linux: elsewhere the proxy uses the system
// allocator as it is.
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
#[allow(unsafe_code)]
pub mod allocator;
pub(crate) mod alpn;
pub(crate) mod app;
pub mod capture;
pub mod config;
pub mod control_plane;
pub(crate) mod destinations;
pub mod detect;
pub(crate) mod discovery;
pub mod http;
pub(crate) mod http2;
pub(crate) mod identity;
pub mod inbound;
pub(crate) mod lifecycle;
pub mod limits;
pub(crate) mod listeners;
pub(crate) mod memory;
pub(crate) mod migration;
#[allow(unsafe_code)]
pub(crate) mod os;
pub(crate) mod outbound;
pub(crate) mod probe;
pub(crate) mod tcp;
pub mod telemetry;
pub mod trace;
pub(crate) mod transparent;
pub(crate) mod upgrade;

pub use app::{RunningProxy, start};
pub use config::ProxyConfig;
