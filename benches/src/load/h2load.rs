//! `h2load` (nghttp2): the closed-loop HTTP/2 generator — here gRPC unary calls, POSTed
//! with prior knowledge over `clients` connections × `streams` concurrent streams.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::load::{HttpRequest, LoadResult};
use crate::process::{ScratchDir, system_tool};

pub async fn run(
    request: &HttpRequest,
    clients: usize,
    streams: usize,
    duration: Duration,
) -> Result<LoadResult> {
    let h2load = system_tool("h2load").ok_or_else(|| {
        BenchError::failed(
            "run h2load",
            "not installed (apt-get install nghttp2-client)",
        )
    })?;
    let scratch = ScratchDir::new("h2load")?;
    let body = scratch.write("body", &request.body)?;
    let mut command = Command::new(h2load);
    command
        .arg(format!("--clients={clients}"))
        .arg(format!("--max-concurrent-streams={streams}"))
        .arg(format!("--threads={}", clients.min(2)))
        .arg(format!("--duration={}", duration.as_secs().max(1)))
        .arg("--data")
        .arg(&body);
    for (name, value) in &request.headers {
        command
            .arg("--header")
            .arg(format!("{}: {}", name, value.to_str().unwrap_or_default()));
    }
    command.arg(format!("http://{}{}", request.address, request.path));
    let start = Instant::now();
    let output = tokio::process::Command::from(command)
        .output()
        .await
        .map_err(BenchError::io("run h2load"))?;
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let counts = parse_requests(&text)?;
    Ok(LoadResult {
        generator: format!("h2load {clients} connections × {streams} streams"),
        completed: counts.succeeded,
        errors: counts.failed,
        elapsed: parse_seconds(&text).map_or(elapsed, Duration::from_secs_f64),
        latency: None,
    })
}

struct Counts {
    succeeded: u64,
    failed: u64,
}

/// "requests: 1000 total, 1000 started, 1000 done, 990 succeeded, 10 failed, 10 errored, 0 timeout"
fn parse_requests(text: &str) -> Result<Counts> {
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("requests: "))
        .ok_or_else(|| BenchError::ToolOutput {
            tool: "h2load",
            reason: "no 'requests:' line".into(),
            output: text.to_string(),
        })?;
    let count = |label: &str| -> u64 {
        line.split(',')
            .map(str::trim)
            .find_map(|part| part.strip_suffix(label))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Counts {
        succeeded: count(" succeeded"),
        failed: count(" failed") + count(" timeout"),
    })
}

/// "finished in 5.00s, 20000.00 req/s, 1.2MB/s"
fn parse_seconds(text: &str) -> Option<f64> {
    let rest = text
        .lines()
        .find_map(|line| line.strip_prefix("finished in "))?;
    let value = rest.split(',').next()?.trim();
    if let Some(ms) = value.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|ms| ms / 1e3);
    }
    value.strip_suffix('s')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "finished in 5.00s, 20374.40 req/s, 1.55MB/s
requests: 101872 total, 102032 started, 101872 done, 101870 succeeded, 2 failed, 2 errored, 0 timeout
status codes: 101870 2xx, 0 3xx, 0 4xx, 2 5xx
";

    #[test]
    fn reads_counts_and_time() {
        let counts = parse_requests(OUTPUT).expect("counts");
        assert_eq!((counts.succeeded, counts.failed), (101_870, 2));
        assert_eq!(parse_seconds(OUTPUT), Some(5.0));
    }
}
