//! `wrk`: the closed-loop HTTP/1.1 generator (a fixed number of kept-alive connections,
//! each sending its next request as soon as the previous answer is in).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::load::LoadResult;
use crate::process::system_tool;

pub const THREADS: usize = 2;

pub async fn run(
    address: SocketAddr,
    path: &str,
    connections: usize,
    duration: Duration,
) -> Result<LoadResult> {
    let wrk = system_tool("wrk")
        .ok_or_else(|| BenchError::failed("run wrk", "not installed (apt-get install wrk)"))?;
    let mut command = tokio::process::Command::from(Command::new(wrk));
    command
        .arg(format!("-t{THREADS}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg(format!("http://{address}{path}"));
    let start = Instant::now();
    let output = command.output().await.map_err(BenchError::io("run wrk"))?;
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(BenchError::failed(
            "wrk",
            format!("{}{}", text, String::from_utf8_lossy(&output.stderr)),
        ));
    }
    let (requests, seconds) = parse_totals(&text)?;
    let errors = parse_errors(&text);
    Ok(LoadResult {
        generator: format!("wrk {THREADS} threads × {connections} connections"),
        completed: requests.saturating_sub(errors),
        errors,
        elapsed: if seconds > 0.0 {
            Duration::from_secs_f64(seconds)
        } else {
            elapsed
        },
        latency: None,
    })
}

/// "  123456 requests in 5.00s, 12.34MB read" → (123456, 5.0).
fn parse_totals(text: &str) -> Result<(u64, f64)> {
    let line = text
        .lines()
        .find(|line| line.contains(" requests in "))
        .ok_or_else(|| not_understood("no 'requests in' line", text))?;
    let mut words = line.split_whitespace();
    let requests = words
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| not_understood("request count", text))?;
    let seconds = words
        .nth(2)
        .map(|d| d.trim_end_matches(','))
        .and_then(parse_duration)
        .unwrap_or(0.0);
    Ok((requests, seconds))
}

fn parse_duration(text: &str) -> Option<f64> {
    for (suffix, scale) in [("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0)] {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * scale);
        }
    }
    None
}

/// Non-2xx/3xx answers plus socket errors.
fn parse_errors(text: &str) -> u64 {
    let numbers_after = |prefix: &str| -> u64 {
        text.lines()
            .filter_map(|line| line.trim().strip_prefix(prefix))
            .flat_map(|rest| rest.split(|c: char| !c.is_ascii_digit()))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    numbers_after("Non-2xx or 3xx responses:") + numbers_after("Socket errors:")
}

fn not_understood(reason: &str, text: &str) -> BenchError {
    BenchError::ToolOutput {
        tool: "wrk",
        reason: reason.to_string(),
        output: text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 5s test @ http://127.0.0.1:8080/small
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  300.00us   8.00ms   90.00%
    Req/Sec    26.00k     1.00k   28.00k    70.00%
  258123 requests in 5.00s, 40.12MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  51624.60
Transfer/sec:      8.02MB
";

    #[test]
    fn reads_totals_and_errors() {
        assert_eq!(parse_totals(OUTPUT).expect("totals"), (258_123, 5.0));
        assert_eq!(parse_errors(OUTPUT), 7);
    }
}
