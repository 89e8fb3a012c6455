//! The HAProxy pair, configured like the Tessera pair so the comparison is fair: TLS 1.3
//! only, client certificates verified on both sides, no TLS session resumption (Tessera
//! does a full handshake per connection too), connections to the next hop kept alive
//! and shared (`http-reuse always`). `mode http` for HTTP, `mode tcp` for opaque bytes;
//! HTTP/1.1 between the pair for the HTTP/1.1 workloads, h2 for the HTTP/2 one.

use std::process::Command;
use std::time::Duration;

use crate::certs::{PairCerts, SERVER_NAME};
use crate::error::{BenchError, Result};
use crate::process::{Process, ScratchDir, system_tool};
use crate::topology::{Entry, Path, PathKind, ProxyProcess, free_port, local, wait_listening};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct HaproxyPair {
    pub client: Process,
    pub server: Process,
    pub entry: Entry,
    _dir: ScratchDir,
}

impl HaproxyPair {
    pub async fn start(servers: Entry) -> Result<Self> {
        let haproxy = system_tool("haproxy").ok_or_else(|| {
            BenchError::failed("start HAProxy", "not installed (apt-get install haproxy)")
        })?;
        let dir = ScratchDir::new("haproxy")?;
        let certs = PairCerts::generate()?;
        let ca = dir.write("ca.pem", &certs.ca_pem)?;
        let server_crt = dir.write("server.pem", &certs.server_pem)?;
        let client_crt = dir.write("client.pem", &certs.client_pem)?;
        let entry = Entry {
            http1: local(free_port()),
            grpc: local(free_port()),
            tcp: local(free_port()),
        };
        let mtls = Entry {
            http1: local(free_port()),
            grpc: local(free_port()),
            tcp: local(free_port()),
        };
        let tls_in = format!(
            "ssl crt {} ca-file {} verify required no-tls-tickets",
            server_crt.display(),
            ca.display()
        );
        let tls_out = format!(
            "ssl crt {} ca-file {} verify required verifyhost {SERVER_NAME} sni str({SERVER_NAME}) no-ssl-reuse",
            client_crt.display(),
            ca.display()
        );
        let server_config = format!(
            "{GLOBAL}{}{}{}",
            http_hop(
                "http1",
                &format!("{} {tls_in} alpn http/1.1", mtls.http1),
                &servers.http1.to_string()
            ),
            http_hop(
                "grpc",
                &format!("{} {tls_in} alpn h2", mtls.grpc),
                &format!("{} proto h2", servers.grpc)
            ),
            tcp_hop(
                "tcp",
                &format!("{} {tls_in}", mtls.tcp),
                &servers.tcp.to_string()
            ),
        );
        let client_config = format!(
            "{GLOBAL}{}{}{}",
            http_hop(
                "http1",
                &entry.http1.to_string(),
                &format!("{} {tls_out} alpn http/1.1", mtls.http1)
            ),
            http_hop(
                "grpc",
                &format!("{} proto h2", entry.grpc),
                &format!("{} {tls_out} alpn h2", mtls.grpc)
            ),
            tcp_hop(
                "tcp",
                &entry.tcp.to_string(),
                &format!("{} {tls_out}", mtls.tcp)
            ),
        );
        let mut server = spawn(
            &haproxy,
            "haproxy-server",
            dir.write("server.cfg", server_config)?,
        )?;
        let mut client = spawn(
            &haproxy,
            "haproxy-client",
            dir.write("client.cfg", client_config)?,
        )?;
        for address in [mtls.http1, mtls.grpc, mtls.tcp] {
            wait_listening(&mut server, address, READY_TIMEOUT).await?;
        }
        for address in [entry.http1, entry.grpc, entry.tcp] {
            wait_listening(&mut client, address, READY_TIMEOUT).await?;
        }
        Ok(Self {
            client,
            server,
            entry,
            _dir: dir,
        })
    }

    pub fn path(&self) -> Path {
        Path {
            kind: PathKind::Haproxy,
            entry: self.entry,
            proxies: vec![
                ProxyProcess {
                    side: "client-side",
                    pid: self.client.pid(),
                },
                ProxyProcess {
                    side: "server-side",
                    pid: self.server.pid(),
                },
            ],
        }
    }
}

/// Generous limits and timeouts: the 1,000-idle-connections test must not hit either.
const GLOBAL: &str = "global
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  maxconn 8000
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout http-keep-alive 600s
";

fn http_hop(name: &str, bind: &str, server: &str) -> String {
    format!(
        "frontend {name}_in
  mode http
  bind {bind}
  default_backend {name}_out
backend {name}_out
  mode http
  http-reuse always
  server next {server}
"
    )
}

fn tcp_hop(name: &str, bind: &str, server: &str) -> String {
    format!(
        "frontend {name}_in
  mode tcp
  bind {bind}
  default_backend {name}_out
backend {name}_out
  mode tcp
  server next {server}
"
    )
}

/// Foreground (`-db`), one process: its pid is the one whose CPU is read.
fn spawn(haproxy: &std::path::Path, label: &str, config: std::path::PathBuf) -> Result<Process> {
    Process::spawn(
        label,
        Command::new(haproxy).arg("-db").arg("-f").arg(config),
    )
}
