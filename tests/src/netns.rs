//! Pods as network namespaces: a Linux bridge in the root namespace, one namespace per
//! "pod" joined to it by a veth pair, each with its own `/etc/hosts` (via
//! `/etc/netns/<name>/hosts`, which `ip netns exec` mounts over `/etc/hosts`). The root
//! namespace owns the bridge address, so processes there (the control plane, an outside
//! server, tcpdump) sit on the same wire as the pods.
//!
//! Needs root (CI is); [`Network::create`] returns `None` otherwise so tests can say they
//! skipped. Everything is torn down on drop — processes in the namespaces killed,
//! namespaces, veths, bridge and hosts files removed — also when a test fails; names
//! that an earlier crashed run left behind are removed before use.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Context, bail};

/// A bridge and the pods on it, all in 10.77.<index>.0/24.
pub struct Network {
    index: u8,
    bridge: String,
    pods: Vec<Pod>,
}

/// One network namespace on the bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

/// Why the harness cannot run here, or `None` when it can.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces, iptables)".into());
    }
    for tool in ["ip", "iptables", "iptables-restore"] {
        if !on_path(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether a program can be found on PATH (also checks /usr/sbin, root's tools).
pub fn on_path(tool: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|dir| std::path::Path::new(dir).join(tool).exists())
}

/// Runs a command, failing with its stderr.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        let rendered: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        bail!(
            "{program} {} failed: {}",
            rendered.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Network {
    /// A new bridge; `None` (with the reason printed) when the harness cannot run here.
    pub fn create() -> anyhow::Result<Option<Self>> {
        if let Some(reason) = unavailable() {
            eprintln!("SKIPPED: network-namespace test: {reason}");
            return Ok(None);
        }
        // Distinct per test and per test process, so parallel runs never share names.
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let index = (std::process::id() % 100) as u8 + 100 + NEXT.fetch_add(1, Ordering::Relaxed);
        let bridge = format!("tsbr{index}");
        let network = Self {
            index,
            bridge: bridge.clone(),
            pods: Vec::new(),
        };
        let _ = run("ip", &["link", "del", &bridge]);
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", network.gateway()),
                "dev",
                &bridge,
            ],
        )?;
        // `nodad`: usable at once, no duplicate-address detection delay.
        let gateway6 = format!("{}/64", network.gateway6());
        run(
            "ip",
            &["-6", "addr", "add", &gateway6, "dev", &bridge, "nodad"],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        Ok(Some(network))
    }

    /// The bridge's address in the root namespace: pods' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 1)
    }

    pub fn gateway6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, u16::from(self.index), 0, 0, 0, 0, 0, 1)
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Adds a pod named `name` (namespace `ts<index>-<name>`), up with loopback, an
    /// address on the bridge and a default route through the gateway.
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<Pod> {
        let number = self.pods.len() as u8 + 10;
        let pod = Pod {
            name: name.to_string(),
            netns: format!("ts{}-{name}", self.index),
            ip: Ipv4Addr::new(10, 77, self.index, number),
            ip6: Ipv6Addr::new(
                0xfd77,
                u16::from(self.index),
                0,
                0,
                0,
                0,
                0,
                u16::from(number),
            ),
        };
        let host_end = format!("tsv{}-{number}", self.index);
        remove_netns(&pod.netns);
        let _ = run("ip", &["link", "del", &host_end]);
        run("ip", &["netns", "add", &pod.netns])?;
        self.pods.push(pod.clone());
        run(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns",
                &pod.netns,
            ],
        )?;
        run(
            "ip",
            &["link", "set", &host_end, "master", &self.bridge, "up"],
        )?;
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &pod.netns, "ip"];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
        inside(&["link", "set", "eth0", "up"])?;
        inside(&[
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ])?;
        let ip6 = format!("{}/64", pod.ip6);
        inside(&["-6", "addr", "add", &ip6, "dev", "eth0", "nodad"])?;
        let gateway6 = self.gateway6().to_string();
        inside(&["-6", "route", "add", "default", "via", &gateway6])?;
        Ok(pod)
    }

    /// The pod's `/etc/hosts`: its own name plus `entries` (address, names).
    pub fn set_hosts(&self, pod: &Pod, entries: &[(IpAddr, &str)]) -> anyhow::Result<()> {
        let dir = format!("/etc/netns/{}", pod.netns);
        std::fs::create_dir_all(&dir).context("create /etc/netns dir")?;
        let mut hosts = format!("127.0.0.1 localhost\n{} {}\n", pod.ip, pod.name);
        for (address, names) in entries {
            hosts.push_str(&format!("{address} {names}\n"));
        }
        std::fs::write(format!("{dir}/hosts"), hosts).context("write hosts")
    }

    /// `program` run inside the pod, as root.
    pub fn command(&self, pod: &Pod, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &pod.netns]).arg(program);
        command
    }

    /// `program` run inside the pod as `uid` (and the same gid), like a container user.
    pub fn command_as(&self, pod: &Pod, uid: u32, program: impl AsRef<OsStr>) -> Command {
        let mut command = self.command(pod, "setpriv");
        command
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(program);
        command
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for pod in &self.pods {
            remove_netns(&pod.netns);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

/// Kills what runs in a namespace, then removes it and its hosts file.
fn remove_netns(netns: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", netns]) {
        for pid in pids.split_whitespace() {
            let _ = run("kill", &["-9", pid]);
        }
    }
    let _ = run("ip", &["netns", "del", netns]);
    let _ = std::fs::remove_dir_all(format!("/etc/netns/{netns}"));
}
