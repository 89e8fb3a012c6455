//! Who reaches each inbound port, and how: mTLS peers by identity, plaintext callers by
//! address. `tessera check migration` reads this (admin `/migration`) to tell whether
//! switching a port to STRICT would break a flow that is still live.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use tessera_mesh::migration::SourceReport;

/// Distinct sources remembered per kind; more are folded into "other".
const MAX_SOURCES: usize = 256;

#[derive(Default)]
struct Seen {
    connections: u64,
    last: Option<Instant>,
}

/// Sources of one port. Touched once per connection, never per request.
#[derive(Default)]
pub struct SourceLog {
    mtls: Mutex<HashMap<String, Seen>>,
    plaintext: Mutex<HashMap<String, Seen>>,
}

impl SourceLog {
    pub fn mtls(&self, identity: &str) {
        record(&self.mtls, identity.to_string());
    }

    pub fn plaintext(&self, address: IpAddr) {
        record(&self.plaintext, address.to_string());
    }

    /// (mTLS sources, plaintext sources), busiest first.
    pub fn report(&self) -> (Vec<SourceReport>, Vec<SourceReport>) {
        (snapshot(&self.mtls), snapshot(&self.plaintext))
    }
}

fn record(sources: &Mutex<HashMap<String, Seen>>, source: String) {
    let Ok(mut sources) = sources.lock() else {
        return;
    };
    let key = if sources.len() >= MAX_SOURCES && !sources.contains_key(&source) {
        "other".to_string()
    } else {
        source
    };
    let seen = sources.entry(key).or_default();
    seen.connections += 1;
    seen.last = Some(Instant::now());
}

fn snapshot(sources: &Mutex<HashMap<String, Seen>>) -> Vec<SourceReport> {
    let Ok(sources) = sources.lock() else {
        return Vec::new();
    };
    let mut report: Vec<SourceReport> = sources
        .iter()
        .map(|(source, seen)| SourceReport {
            source: source.clone(),
            connections: seen.connections,
            last_seen_seconds_ago: seen.last.map_or(0, |t| t.elapsed().as_secs()),
        })
        .collect();
    report.sort_by_key(|r| std::cmp::Reverse(r.connections));
    report
}
