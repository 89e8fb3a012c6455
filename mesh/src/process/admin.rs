//! The admin port's HTTP server, the same in every Tessera process: plain HTTP/1.1,
//! GET only, each path answered by the process's own router. The proxy serves its
//! probes, metrics and `/migration` on it (port 15020), the control plane its own.
//! Nothing it serves may show a key or a token: routers answer with [`Reply`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use super::accept::AcceptBackoff;

/// The most an admin request's head may take.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// One admin answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(value: &impl serde::Serialize) -> Self {
        match serde_json::to_string_pretty(value) {
            Ok(body) => Self {
                status: StatusCode::OK,
                content_type: "application/json",
                body,
            },
            Err(error) => Self::text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        }
    }

    /// Metrics in the format the scraper asked for: OpenMetrics (with exemplars) when
    /// its `Accept` names it, as Prometheus does, else the classic text format.
    pub fn metrics(openmetrics: String, headers: &HeaderMap) -> Self {
        let wants_openmetrics = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("application/openmetrics-text"));
        if wants_openmetrics {
            Self {
                status: StatusCode::OK,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: openmetrics,
            }
        } else {
            Self {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: to_prometheus_text(&openmetrics),
            }
        }
    }

    pub fn not_found() -> Self {
        Self::text(StatusCode::NOT_FOUND, "not found\n")
    }
}

/// Serves GET requests on `listener`, answering each path (and its headers) with what
/// `route` resolves to. Keeps one descriptor spare, so that `/live` and `/ready` are
/// still answered when a flood on the data path has taken all the others.
pub async fn serve<R, F>(listener: TcpListener, route: R)
where
    R: Fn(&str, &HeaderMap) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let route = Arc::new(route);
    let mut spare = SpareDescriptor::open();
    let mut backoff = AcceptBackoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors: give up the spare one so this probe is answered.
            Err(error) if spare.release() => match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    backoff.failed(&error).await;
                    continue;
                }
            },
            Err(error) => {
                backoff.failed(&error).await;
                spare.reopen();
                continue;
            }
        };
        backoff.succeeded();
        spare.reopen();
        let route = route.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let reply = match *request.method() {
                    Method::GET => Some(route(request.uri().path(), request.headers())),
                    _ => None,
                };
                async move {
                    let reply = match reply {
                        Some(reply) => reply.await,
                        None => Reply::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
                    };
                    let response = Response::builder()
                        .status(reply.status)
                        .header(header::CONTENT_TYPE, reply.content_type)
                        .body(Full::new(Bytes::from(reply.body)));
                    Ok::<_, Infallible>(response.unwrap_or_default())
                }
            });
            if let Err(error) = http1::Builder::new()
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(event = "admin connection error", error = %error);
            }
        });
    }
}

/// A descriptor held back for the admin port: when the process runs out (a flood on
/// the data path), closing it lets one more probe connection in, so `/live` and
/// `/ready` still answer. Taken again as soon as a descriptor is free.
struct SpareDescriptor(Option<std::fs::File>);

impl SpareDescriptor {
    fn open() -> Self {
        Self(std::fs::File::open("/dev/null").ok())
    }

    /// Closes the spare; whether there was one.
    fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    fn reopen(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}

/// OpenMetrics → Prometheus text 0.0.4: no `# EOF` or `# UNIT`, no exemplars, and counter
/// families named with their `_total` suffix as that format expects.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# TYPE ", "# HELP "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match rewritten {
            Some(line) => text.push_str(&line),
            None => text.push_str(line.split(" # {").next().unwrap_or(line)),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One request on its own connection; the whole answer as text.
    async fn ask(address: std::net::SocketAddr, head: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn gets_are_routed_by_path_and_other_methods_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, |path, _headers| {
            let reply = match path {
                "/live" => Reply::text(StatusCode::OK, "live\n"),
                _ => Reply::not_found(),
            };
            async move { reply }
        }));
        let close = "Host: admin\r\nConnection: close\r\n\r\n";
        let live = ask(address, &format!("GET /live HTTP/1.1\r\n{close}")).await;
        assert!(live.starts_with("HTTP/1.1 200 OK\r\n"), "{live}");
        assert!(live.ends_with("\r\n\r\nlive\n"), "{live}");
        let missing = ask(address, &format!("GET /secret HTTP/1.1\r\n{close}")).await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = ask(
            address,
            &format!("POST /live HTTP/1.1\r\nContent-Length: 0\r\n{close}"),
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    }

    #[test]
    fn metrics_come_in_the_format_the_scraper_asks_for() {
        let openmetrics = "# TYPE tessera_up counter\ntessera_up_total 1\n# EOF\n".to_string();
        let mut headers = HeaderMap::new();
        let classic = Reply::metrics(openmetrics.clone(), &headers);
        assert_eq!(
            classic.content_type,
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert!(!classic.body.contains("# EOF"), "{}", classic.body);
        headers.insert(
            header::ACCEPT,
            "application/openmetrics-text;version=1.0.0"
                .parse()
                .unwrap(),
        );
        let open = Reply::metrics(openmetrics.clone(), &headers);
        assert!(
            open.content_type
                .starts_with("application/openmetrics-text")
        );
        assert_eq!(open.body, openmetrics);
    }

    #[test]
    fn converts_openmetrics_to_prometheus_text() {
        let openmetrics = "# HELP tessera_requests Requests.\n# TYPE tessera_requests counter\ntessera_requests_total{code=\"200\"} 3\n# HELP tessera_request_duration_seconds Latency.\n# TYPE tessera_request_duration_seconds histogram\n# UNIT tessera_request_duration_seconds seconds\ntessera_request_duration_seconds_bucket{le=\"0.01\"} 2 # {trace_id=\"abc\"} 0.004\n# EOF\n";
        let text = to_prometheus_text(openmetrics);
        assert_eq!(
            text,
            "# HELP tessera_requests_total Requests.\n# TYPE tessera_requests_total counter\ntessera_requests_total{code=\"200\"} 3\n# HELP tessera_request_duration_seconds Latency.\n# TYPE tessera_request_duration_seconds histogram\ntessera_request_duration_seconds_bucket{le=\"0.01\"} 2\n"
        );
    }
}
