//! The servers every path ends at: nginx for HTTP/1.1 (a small response and a 64 KiB
//! file), and this binary's `serve-backends` child for what nginx does not fit — a
//! tonic gRPC echo (unary over HTTP/2 prior knowledge) and a TCP echo. A separate
//! process, so their CPU never mixes with the load generators'.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::error::{BenchError, Result};
use crate::process::{Process, ScratchDir, system_tool};
use crate::topology::{Entry, free_port, local, wait_listening};

/// Body of `/64k`.
pub const LARGE_BODY_BYTES: usize = 64 * 1024;
/// What `serve-backends` prints once listening, before each address.
pub const GRPC_READY: &str = "grpc listening on ";
pub const ECHO_READY: &str = "echo listening on ";

const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Backends {
    pub entry: Entry,
    /// `None` where nginx is not installed: the HTTP/1.1 workloads are skipped.
    _nginx: Option<Process>,
    _app: Process,
    _dir: ScratchDir,
}

impl Backends {
    pub async fn start(with_nginx: bool) -> Result<Self> {
        let dir = ScratchDir::new("backends")?;
        let http1 = local(free_port());
        let nginx = if with_nginx {
            let mut nginx = start_nginx(&dir, http1)?;
            wait_listening(&mut nginx, http1, READY_TIMEOUT).await?;
            Some(nginx)
        } else {
            None
        };
        let (app, grpc, tcp) = start_app().await?;
        Ok(Self {
            entry: Entry { http1, grpc, tcp },
            _nginx: nginx,
            _app: app,
            _dir: dir,
        })
    }
}

/// One nginx process (no master, no daemon, so it is our child and dies with us).
fn start_nginx(dir: &ScratchDir, listen: SocketAddr) -> Result<Process> {
    let nginx = system_tool("nginx").ok_or_else(|| {
        BenchError::failed("start nginx", "not installed (apt-get install nginx)")
    })?;
    dir.write("www/64k", vec![b'x'; LARGE_BODY_BYTES])?;
    let root = dir.path().display();
    let config = format!(
        "worker_processes 1;
master_process off;
daemon off;
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {root}/tmp-body;
  proxy_temp_path {root}/tmp-proxy;
  fastcgi_temp_path {root}/tmp-fastcgi;
  uwsgi_temp_path {root}/tmp-uwsgi;
  scgi_temp_path {root}/tmp-scgi;
  sendfile on;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  server {{
    listen {listen} backlog=4096;
    location = /small {{ default_type text/plain; return 200 \"hello from nginx\\n\"; }}
    location / {{ root {root}/www; default_type application/octet-stream; }}
  }}
}}
"
    );
    let config_path = dir.write("nginx.conf", config)?;
    Process::spawn(
        "nginx",
        Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(config_path),
    )
}

/// The gRPC and TCP echo servers, in a child running this same binary.
async fn start_app() -> Result<(Process, SocketAddr, SocketAddr)> {
    let exe = std::env::current_exe().map_err(BenchError::io("locate the running executable"))?;
    let mut app = Process::spawn("serve-backends", Command::new(exe).arg("serve-backends"))?;
    app.wait_for_output(ECHO_READY, READY_TIMEOUT).await?;
    app.wait_for_output(GRPC_READY, READY_TIMEOUT).await?;
    let address = |needle: &str| -> Result<SocketAddr> {
        let text = app.output.value_after(needle).unwrap_or_default();
        text.parse()
            .map_err(|_| BenchError::failed("read serve-backends' address", text))
    };
    let (grpc, tcp) = (address(GRPC_READY)?, address(ECHO_READY)?);
    Ok((app, grpc, tcp))
}

/// Body of the `serve-backends` child: runs both servers until killed.
pub async fn serve() -> Result<()> {
    let echo = tessera_tests::EchoServer::start().await;
    let (grpc, grpc_task) = tessera_tests::backend::start_grpc().await;
    println!("{ECHO_READY}{}", echo.address);
    println!("{GRPC_READY}{grpc}");
    grpc_task
        .await
        .map_err(|error| BenchError::failed("gRPC backend", error))
}
