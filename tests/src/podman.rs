//! Container images run as a node runs them: podman with runc, as root, on the host's
//! network, with a read-only root filesystem, no capabilities and no privilege gain unless
//! a test asks. The images are `TESSERA_PROXY_IMAGE` and `TESSERA_IMAGE` when set
//! (scripts/test.sh points them at the shipped builds), otherwise built once per test
//! process from this profile's binaries by scripts/build-images.sh, tagged `e2e` (a
//! rebuild replaces the previous one).
//!
//! Needs root, podman, buildah and runc: without them [`images`] says the test skipped,
//! except under `CI=true`, where it fails naming what to install.
//!
//! Two things of this machine shape the options, and are harmless elsewhere: root here
//! lacks CAP_SYS_RESOURCE, so podman's default open-files limit (1048576, above the hard
//! limit) cannot be set and the limits are passed explicitly, no higher than this
//! process's; and its cgroups are hybrid (v1 controllers, one on v2), which crun refuses
//! and runc accepts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The two images under test, by name.
pub struct Images {
    pub proxy: String,
    pub tessera: String,
}

/// The images, or `None` (after saying why) when containers cannot run here.
pub fn images() -> Option<&'static Images> {
    if let Some(reason) = unavailable() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "container-image tests cannot run: {reason}"
        );
        eprintln!("SKIPPED: container-image test: {reason}");
        return None;
    }
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    match IMAGES.get_or_init(|| resolve().map_err(|error| format!("{error:#}"))) {
        Ok(images) => Some(images),
        Err(error) => panic!("no images to test: {error}"),
    }
}

fn unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("needs root (podman and buildah use /var/lib/containers)".into());
    }
    ["podman", "buildah", "runc"]
        .into_iter()
        .find(|tool| !crate::netns::on_path(tool))
        .map(|tool| {
            format!("{tool} is not installed (apt-get install buildah podman runc; scripts/test.sh does, as root)")
        })
}

fn resolve() -> anyhow::Result<Images> {
    match (
        std::env::var("TESSERA_PROXY_IMAGE"),
        std::env::var("TESSERA_IMAGE"),
    ) {
        (Ok(proxy), Ok(tessera)) => return Ok(Images { proxy, tessera }),
        (Err(_), Err(_)) => {}
        _ => bail!("set both TESSERA_PROXY_IMAGE and TESSERA_IMAGE, or neither"),
    }
    let script = repository().join("scripts/build-images.sh");
    let output = Command::new(&script)
        .args(["--tag", "e2e"])
        .arg(crate::binary("tessera-proxy"))
        .arg(crate::binary("tessera"))
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    let report = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("{} failed: {}", script.display(), report.trim());
    }
    eprintln!("{}", report.trim());
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().collect::<Vec<_>>()[..] {
        [proxy, tessera] => Ok(Images {
            proxy: proxy.into(),
            tessera: tessera.into(),
        }),
        _ => bail!(
            "{} printed {stdout:?}, not two image names",
            script.display()
        ),
    }
}

/// The repository's root.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// `podman` with runc as the runtime (see the module comment).
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc"]);
    command
}

/// Options of every `podman run` here, before the caller's: read-only root, no
/// capabilities, no privilege gain, and limits this process may grant.
fn run_options() -> Vec<String> {
    let files = hard_open_files_limit().min(65_536);
    vec![
        "--read-only".into(),
        "--cap-drop=all".into(),
        "--security-opt=no-new-privileges".into(),
        format!("--ulimit=nofile={files}:{files}"),
        "--ulimit=nproc=4096:4096".into(),
    ]
}

fn hard_open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(4)?.parse().ok()
        })
        .unwrap_or(1024)
}

/// `podman run --rm` in the foreground: `options` before the image, `args` after it.
pub fn run(image: &str, options: &[&str], args: &[&str]) -> anyhow::Result<Output> {
    podman()
        .args(["run", "--rm"])
        .args(run_options())
        .args(options)
        .arg(image)
        .args(args)
        .output()
        .context("run podman")
}

/// A detached container, removed (killed first) on drop.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `podman run -d`: `options` before the image, `args` after it; `env` is passed
    /// through by name (`--env NAME`), so values stay out of podman's arguments.
    pub fn start(
        label: &str,
        image: &str,
        options: &[&str],
        env: &[(&str, &str)],
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let name = format!(
            "tessera-e2e-{label}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut command = podman();
        command
            .args(["run", "--detach", "--name", &name])
            .args(run_options())
            .args(options);
        for (key, value) in env {
            command.arg("--env").arg(key).env(key, value);
        }
        let output = command
            .arg(image)
            .args(args)
            .output()
            .context("run podman")?;
        // From here on the container exists (perhaps stopped): drop removes it.
        let container = Self { name };
        if !output.status.success() {
            bail!(
                "podman run {image} failed: {}\n{}",
                String::from_utf8_lossy(&output.stderr).trim(),
                container.logs()
            );
        }
        Ok(container)
    }

    /// The container's main process, as the host sees it.
    pub fn pid(&self) -> anyhow::Result<u32> {
        let output = podman()
            .args(["inspect", "--format", "{{.State.Pid}}", &self.name])
            .output()
            .context("run podman inspect")?;
        let text = String::from_utf8_lossy(&output.stdout);
        match text.trim().parse() {
            Ok(pid) if pid > 0 => Ok(pid),
            _ => bail!("{} is not running; its log:\n{}", self.name, self.logs()),
        }
    }

    /// What the container wrote to stdout and stderr.
    pub fn logs(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_else(|error| format!("(podman logs failed: {error})"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
    }
}

/// Every file, directory and symlink in an image, by absolute path, with its type.
pub fn image_files(image: &str) -> anyhow::Result<Vec<(String, FileKind)>> {
    let output = Command::new("podman")
        .args(["image", "mount", image])
        .output()
        .context("run podman image mount")?;
    if !output.status.success() {
        bail!(
            "podman image mount {image}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let root = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let mut files = Vec::new();
    let walked = walk(&root, &root, &mut files);
    let _ = Command::new("podman")
        .args(["image", "unmount", image])
        .output();
    walked?;
    files.sort();
    Ok(files)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    Directory,
    File,
    Symlink,
    Other,
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<(String, FileKind)>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        let name = format!(
            "/{}",
            path.strip_prefix(root).unwrap_or(&path).to_string_lossy()
        );
        if kind.is_dir() {
            files.push((name, FileKind::Directory));
            walk(root, &path, files)?;
        } else if kind.is_symlink() {
            files.push((name, FileKind::Symlink));
        } else if kind.is_file() {
            files.push((name, FileKind::File));
        } else {
            files.push((name, FileKind::Other));
        }
    }
    Ok(())
}
