//! CPU time and memory of a process, from /proc: what a proxy costs, read before and
//! after each measurement.

use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;

use crate::error::{BenchError, Result};

/// User plus system CPU time a process has used so far (utime + stime of
/// /proc/<pid>/stat, in clock ticks).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = read(pid, "stat")?;
    // The command name (field 2) may hold spaces; fields are counted after its ')'.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| proc_error(pid, "stat", "no ')' after the command name"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field 14 (utime) and 15 (stime), counting from 1 with field 3 (state) at index 0.
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| proc_error(pid, "stat", "utime/stime missing"))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(
        total as f64 / clock_ticks_per_second(),
    ))
}

/// Resident memory of a process, bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss: u64,
    /// VmHWM: the most it has been resident since it started.
    pub peak_rss: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let status = read(pid, "status")?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| proc_error(pid, "status", "VmRSS/VmHWM missing"))
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        peak_rss: field("VmHWM:")?,
    })
}

fn read(pid: u32, file: &'static str) -> Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .map_err(|error| proc_error(pid, file, error))
}

fn proc_error(pid: u32, file: &'static str, reason: impl ToString) -> BenchError {
    BenchError::Proc {
        pid,
        file,
        reason: reason.to_string(),
    }
}

/// `getconf CLK_TCK`, read once; 100 on every Linux this runs on.
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        let before = cpu_time(pid).expect("cpu time");
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(cpu_time(pid).expect("cpu time") >= before);
        let memory = memory(pid).expect("memory");
        assert!(memory.rss > 0 && memory.peak_rss >= memory.rss);
    }
}
