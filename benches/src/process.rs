//! Child processes of a run: spawned with their output captured (the last lines are
//! kept for error messages), killed when their handle drops — also when a run fails
//! half-way — and located in this workspace's target directory.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};

/// Output lines kept per process: enough to explain a failure.
const KEPT_LINES: usize = 200;

/// The last lines a process wrote (stdout and stderr interleaved).
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<VecDeque<String>>>);

impl Output {
    fn capture(&self, stream: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut lines = lines.lock().unwrap_or_else(|p| p.into_inner());
                if lines.len() == KEPT_LINES {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        });
    }

    pub fn text(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.value_after(needle).is_some()
    }

    /// The rest of the first line containing `needle`, after it.
    pub fn value_after(&self, needle: &str) -> Option<String> {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().find_map(|line| {
            line.split_once(needle)
                .map(|(_, rest)| rest.trim().to_string())
        })
    }
}

/// A running child process, killed at drop.
pub struct Process {
    label: String,
    child: Child,
    pub output: Output,
}

impl Process {
    pub fn spawn(label: &str, command: &mut Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| BenchError::Spawn {
                label: label.to_string(),
                source,
            })?;
        let output = Output::default();
        if let Some(out) = child.stdout.take() {
            output.capture(out);
        }
        if let Some(err) = child.stderr.take() {
            output.capture(err);
        }
        Ok(Self {
            label: label.to_string(),
            child,
            output,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Exited {
                label: self.label.clone(),
                status: status.to_string(),
                output: self.output.text(),
            }),
            Err(error) => Err(BenchError::io(format!("wait for {}", self.label))(error)),
        }
    }

    /// Waits until the process printed a line containing `needle`.
    pub async fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.output.contains(needle) {
            self.ensure_running()?;
            if Instant::now() > deadline {
                return Err(self.not_ready(timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub fn not_ready(&self, timeout: Duration) -> BenchError {
        BenchError::NotReady {
            label: self.label.clone(),
            seconds: timeout.as_secs(),
            output: self.output.text(),
        }
    }
}

impl Process {
    /// SIGKILL, then reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where this workspace's binaries of the running profile are: the directory of the
/// running executable (`target/<profile>/`), which `cargo run` and `cargo build`
/// share, whatever `CARGO_TARGET_DIR` says.
pub fn binary_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(BenchError::io("locate the running executable"))?;
    let dir = exe
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| BenchError::failed("locate the target directory", exe.display()))?;
    // `cargo test` runs from target/<profile>/deps.
    Ok(if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    })
}

/// A workspace binary of the running profile; an error says how to build it.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let path = binary_dir()?.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(BenchError::MissingBinary {
            binary: name.to_string(),
            hint: "build the binaries first: cargo build --bins (add --release for `all`)".into(),
            path,
        })
    }
}

/// A system tool on PATH, if installed.
pub fn system_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A scratch directory for configuration files, removed at drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(label: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "tessera-bench-{label}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&path)
            .map_err(BenchError::io(format!("create {}", path.display())))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` inside the directory; returns the full path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> Result<PathBuf> {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(BenchError::io(format!("create {}", parent.display())))?;
        }
        std::fs::write(&path, contents)
            .map_err(BenchError::io(format!("write {}", path.display())))?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}
