//! `tessera-proxy init`: the iptables (nat table) rules that capture a pod's TCP traffic
//! for its sidecar, as linkerd-init and istio-init program them.
//!
//! Inbound connections are redirected to the proxy's inbound port (15006), outbound ones
//! to its outbound port (15001). The proxy's own traffic (its UID, 1337) is never
//! captured, so what it sends — to peers, to the application, to the control plane —
//! cannot loop back into it; loopback traffic inside the pod stays untouched too.
//!
//! All rules live in chains of our own, installed in one `iptables-restore --noflush`
//! batch after removing whatever an earlier run left: running `init` twice leaves one
//! set of rules, and `--cleanup` removes every trace.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use ipnet::IpNet;

/// Chains of our own, so cleanup never touches anyone else's rules.
const INBOUND: &str = "TESSERA_INBOUND";
const IN_REDIRECT: &str = "TESSERA_IN_REDIRECT";
const OUTPUT: &str = "TESSERA_OUTPUT";
const REDIRECT: &str = "TESSERA_REDIRECT";
const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];
/// The jumps from the built-in chains into ours: (built-in chain, our chain).
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND), ("OUTPUT", OUTPUT)];

/// What to capture and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Traffic of this UID (the proxy's) is never captured.
    pub proxy_uid: u32,
    /// Optionally also exempt a GID, for runtimes that remap UIDs.
    pub proxy_gid: Option<u32>,
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// Destination ports of inbound connections that bypass the proxy (e.g. 15020, so
    /// the kubelet reaches the admin port directly).
    pub exclude_inbound_ports: Vec<u16>,
    /// Source ranges whose inbound connections bypass the proxy.
    pub exclude_inbound_cidrs: Vec<IpNet>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<IpNet>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            proxy_uid: 1337,
            proxy_gid: None,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: Vec::new(),
            exclude_inbound_cidrs: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn includes(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

/// Why the rules could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "cannot run {command}: {source} (is iptables installed, and are we root with NET_ADMIN?)"
    )]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// The `iptables-restore --noflush` input that installs the rules for one family.
/// Declaring our chains flushes them, so the batch never stacks rules on old ones.
pub fn rules(config: &CaptureConfig, family: Family) -> String {
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        out,
        "-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        config.inbound_port
    );
    let _ = writeln!(
        out,
        "-A {REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        config.outbound_port
    );

    // Inbound: everything but the proxy's own ports and the exclusions.
    let mut inbound_ports = vec![config.inbound_port, config.outbound_port];
    inbound_ports.extend(&config.exclude_inbound_ports);
    inbound_ports.sort_unstable();
    inbound_ports.dedup();
    for port in inbound_ports {
        let _ = writeln!(out, "-A {INBOUND} -p tcp --dport {port} -j RETURN");
    }
    for cidr in config
        .exclude_inbound_cidrs
        .iter()
        .filter(|c| family.includes(c))
    {
        let _ = writeln!(out, "-A {INBOUND} -s {cidr} -j RETURN");
    }
    let _ = writeln!(out, "-A {INBOUND} -p tcp -j {IN_REDIRECT}");

    // Outbound: the proxy's connection to its own pod's address (the pod called its own
    // service) goes to the inbound side like any peer's; otherwise never the proxy's own
    // traffic (no loops), never loopback (calls within the pod), never the exclusions.
    // The inbound side reaches the application over 127.0.0.1 / ::1, which this leaves
    // alone.
    let _ = writeln!(
        out,
        "-A {OUTPUT} -o lo ! -d {} -m owner --uid-owner {} -j {IN_REDIRECT}",
        family.loopback(),
        config.proxy_uid
    );
    let _ = writeln!(
        out,
        "-A {OUTPUT} -m owner --uid-owner {} -j RETURN",
        config.proxy_uid
    );
    if let Some(gid) = config.proxy_gid {
        let _ = writeln!(out, "-A {OUTPUT} -m owner --gid-owner {gid} -j RETURN");
    }
    let _ = writeln!(out, "-A {OUTPUT} -o lo -j RETURN");
    for port in &config.exclude_outbound_ports {
        let _ = writeln!(out, "-A {OUTPUT} -p tcp --dport {port} -j RETURN");
    }
    for cidr in config
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| family.includes(c))
    {
        let _ = writeln!(out, "-A {OUTPUT} -d {cidr} -j RETURN");
    }
    let _ = writeln!(out, "-A {OUTPUT} -p tcp -j {REDIRECT}");

    for (builtin, chain) in JUMPS {
        let _ = writeln!(out, "-A {builtin} -p tcp -j {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// Installs the rules for `family`, replacing any an earlier run left. Returns the
/// batch that was applied, for the operator to read.
pub fn install(config: &CaptureConfig, family: Family) -> Result<String, CaptureError> {
    remove(family)?;
    let batch = rules(config, family);
    restore(family, &batch)?;
    Ok(batch)
}

/// Removes every rule and chain of ours for `family`; a no-op when there are none.
pub fn remove(family: Family) -> Result<(), CaptureError> {
    let current = save(family)?;
    for (builtin, chain) in JUMPS {
        let jump = format!("-A {builtin} -p tcp -j {chain}");
        // One delete per copy, in case something appended the jump more than once.
        for _ in current.lines().filter(|line| *line == jump) {
            run(
                family.iptables(),
                &["-t", "nat", "-D", builtin, "-p", "tcp", "-j", chain],
            )?;
        }
    }
    let exists = |chain: &str| {
        let declaration = format!(":{chain} ");
        current.lines().any(|line| line.starts_with(&declaration))
    };
    // Flush all before deleting any: our chains jump to each other.
    for chain in CHAINS.into_iter().filter(|c| exists(c)) {
        run(family.iptables(), &["-t", "nat", "-F", chain])?;
    }
    for chain in CHAINS.into_iter().filter(|c| exists(c)) {
        run(family.iptables(), &["-t", "nat", "-X", chain])?;
    }
    Ok(())
}

/// Our rules as `iptables-save` prints them (for tests and `--dry-run` comparisons).
pub fn installed(family: Family) -> Result<Vec<String>, CaptureError> {
    Ok(save(family)?
        .lines()
        .filter(|line| line.contains("TESSERA_"))
        .map(str::to_string)
        .collect())
}

/// Whether the host has the tools for `family` at all (many hosts lack ip6tables).
pub fn available(family: Family) -> bool {
    Command::new(family.save())
        .arg("-t")
        .arg("nat")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn save(family: Family) -> Result<String, CaptureError> {
    run(family.save(), &["-t", "nat"])
}

fn restore(family: Family, batch: &str) -> Result<(), CaptureError> {
    let command = format!("{} --noflush", family.restore());
    let spawn_error = |source| CaptureError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(family.restore())
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(batch.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(CaptureError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<String, CaptureError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CaptureError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(CaptureError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Parses a comma-separated list (`"8080, 9090"`), naming the bad item.
pub fn parse_list<T: std::str::FromStr>(text: &str) -> Result<Vec<T>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| item.parse().map_err(|_| format!("{item:?} is not valid")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CaptureConfig {
        CaptureConfig {
            exclude_inbound_ports: vec![15020, 22],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            ..CaptureConfig::default()
        }
    }

    #[test]
    fn proxy_traffic_returns_before_any_redirect() {
        let rules = rules(&config(), Family::V4);
        let lines: Vec<&str> = rules.lines().collect();
        let position = |needle: &str| lines.iter().position(|l| *l == needle).unwrap();
        let uid = position("-A TESSERA_OUTPUT -m owner --uid-owner 1337 -j RETURN");
        let to_self = position(
            "-A TESSERA_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j TESSERA_IN_REDIRECT",
        );
        assert!(
            to_self < uid,
            "the pod's own address must reach the inbound side"
        );
        let redirect = position("-A TESSERA_OUTPUT -p tcp -j TESSERA_REDIRECT");
        assert!(uid < redirect);
        assert!(position("-A TESSERA_OUTPUT -o lo -j RETURN") < redirect);
        assert!(position("-A TESSERA_OUTPUT -p tcp --dport 5432 -j RETURN") < redirect);
        assert!(position("-A TESSERA_OUTPUT -d 10.96.0.0/12 -j RETURN") < redirect);
        assert!(
            position("-A TESSERA_INBOUND -p tcp --dport 15020 -j RETURN")
                < position("-A TESSERA_INBOUND -p tcp -j TESSERA_IN_REDIRECT")
        );
        assert!(rules.contains("-A TESSERA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(rules.contains("-A TESSERA_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn each_family_gets_only_its_own_cidrs() {
        assert!(!rules(&config(), Family::V4).contains("fd00::/8"));
        let v6 = rules(&config(), Family::V6);
        assert!(v6.contains("-A TESSERA_OUTPUT -d fd00::/8 -j RETURN"));
        assert!(!v6.contains("10.96.0.0/12"));
    }

    #[test]
    fn the_proxy_ports_are_never_captured_inbound() {
        let rules = rules(&CaptureConfig::default(), Family::V4);
        assert!(rules.contains("-A TESSERA_INBOUND -p tcp --dport 15006 -j RETURN"));
        assert!(rules.contains("-A TESSERA_INBOUND -p tcp --dport 15001 -j RETURN"));
    }

    #[test]
    fn lists_parse_or_name_the_bad_item() {
        assert_eq!(parse_list::<u16>("8080, 9090,").unwrap(), vec![8080, 9090]);
        assert!(
            parse_list::<u16>("8080,http")
                .unwrap_err()
                .contains("\"http\"")
        );
        assert!(parse_list::<IpNet>("10.0.0.0/33").is_err());
    }
}
