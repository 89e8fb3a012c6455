//! The kubelet's part of running a pod, played by the test in a network namespace: a
//! pod as the API server stored it (after admission) is run with exactly its containers'
//! commands, arguments, environment (`valueFrom.fieldRef` and `$(VAR)` expanded as the
//! kubelet expands them), users and volume mounts — a projected service-account token
//! from the real TokenRequest API, ConfigMaps read from the API server — and its status
//! is written back (pod IP, phase, Ready) as the kubelet writes it.
//!
//! What is not played: images (a container runs a program of this host; an image of
//! `tessera-proxy` runs the workspace's binary, its entrypoint), cgroups, and a root
//! filesystem of its own (a container sees the host's, with its volumes bind-mounted
//! over their mount paths in a mount namespace of its own).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::kube::ApiServer;
use crate::netns::{Network, Pod};
use crate::{Process, TempDir, binary};

/// Programs of this workspace a container's command may name, as an image would have
/// them on its PATH.
const WORKSPACE_PROGRAMS: [&str; 2] = ["tessera-proxy", "tessera-test-app"];

/// How long a sidecar's startup probe or a container's readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// A pod running in its network namespace: its containers' processes, the files of its
/// volumes, and the object the API server holds.
pub struct RunningPod {
    pub object: Value,
    pub pod: Pod,
    /// Container name and process, in start order.
    pub containers: Vec<(String, Process)>,
    volumes: TempDir,
    mount_points: Vec<PathBuf>,
}

impl RunningPod {
    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }

    /// The process of container `name`.
    pub fn container(&self, name: &str) -> &Process {
        self.containers
            .iter()
            .find(|(container, _)| container == name)
            .map(|(_, process)| process)
            .unwrap_or_else(|| panic!("{} has no running container {name}", self.name()))
    }

    /// A volume's files as the containers see them.
    pub fn volume_file(&self, volume: &str, file: &str) -> PathBuf {
        self.volumes.path().join(volume).join(file)
    }
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        for (_, process) in &mut self.containers {
            process.kill();
        }
        // Mount points this pod made on the host (empty: mounts stayed in the
        // containers' namespaces), deepest first.
        for path in self.mount_points.iter().rev() {
            let _ = std::fs::remove_dir(path);
        }
    }
}

/// Runs `object` (a pod the API server admitted) in `pod`'s network namespace: its
/// status gets the namespace's address, its volumes are filled, its init containers run
/// to completion in order (a sidecar — `restartPolicy: Always` — is started and its
/// startup probe awaited instead), then its containers start; the pod is reported Ready
/// once every readiness probe passes.
pub async fn run(
    api: &ApiServer,
    network: &Network,
    pod: &Pod,
    object: Value,
) -> anyhow::Result<RunningPod> {
    let namespace = text(&object, "/metadata/namespace")?;
    let name = text(&object, "/metadata/name")?;
    let status_path = format!("/api/v1/namespaces/{namespace}/pods/{name}/status");
    let ip = pod.ip.to_string();
    patch_status(
        api,
        &status_path,
        json!({ "phase": "Pending", "podIP": ip, "podIPs": [{ "ip": ip }] }),
    )
    .await?;
    let object = api
        .get(&format!("/api/v1/namespaces/{namespace}/pods/{name}"))
        .await?
        .1;

    let volumes = TempDir::new(&format!("volumes-{name}"));
    fill_volumes(api, &object, volumes.path()).await?;
    let mut running = RunningPod {
        object,
        pod: pod.clone(),
        containers: Vec::new(),
        volumes,
        mount_points: Vec::new(),
    };

    let init_containers = array(&running.object["spec"]["initContainers"]);
    for container in &init_containers {
        let mut command = running.command(network, container)?;
        let label = format!("{name}/{}", text(container, "/name")?);
        if container["restartPolicy"] == "Always" {
            running
                .containers
                .push((label.clone(), Process::spawn(&label, &mut command)));
            if let Some(probe) = container.get("startupProbe") {
                await_probe(pod, probe, &label, &running).await?;
            }
        } else {
            let output = command.output().with_context(|| format!("run {label}"))?;
            if !output.status.success() {
                bail!(
                    "init container {label} failed ({}): {}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
    let containers = array(&running.object["spec"]["containers"]);
    for container in &containers {
        let mut command = running.command(network, container)?;
        let label = format!("{name}/{}", text(container, "/name")?);
        running
            .containers
            .push((label.clone(), Process::spawn(&label, &mut command)));
    }
    patch_status(api, &status_path, json!({ "phase": "Running" })).await?;

    for container in init_containers.iter().chain(&containers) {
        if let Some(probe) = container.get("readinessProbe") {
            let label = format!("{name}/{}", text(container, "/name")?);
            await_probe(pod, probe, &label, &running).await?;
        }
    }
    patch_status(
        api,
        &status_path,
        json!({ "conditions": [{ "type": "Ready", "status": "True" }] }),
    )
    .await?;
    Ok(running)
}

impl RunningPod {
    /// The command that runs `container` as the kubelet would: in the pod's network
    /// namespace, with its volumes mounted, as its user, with its environment only.
    fn command(&mut self, network: &Network, container: &Value) -> anyhow::Result<Command> {
        let name = text(container, "/name")?;
        let mut program_and_args = entrypoint(container)?;
        let environment = environment(&self.object, container)
            .with_context(|| format!("container {name}: env"))?;
        for arg in &mut program_and_args[1..] {
            *arg = expand(arg, &environment);
        }
        let program = resolve(&program_and_args[0]);

        // `ip netns exec` gives the command a mount namespace of its own (slave to the
        // host's): the bind mounts below stay there.
        let mut script = String::from("set -e\n");
        let mut mount_args: Vec<String> = Vec::new();
        for mount in array(&container["volumeMounts"]) {
            let volume = text(&mount, "/name")?;
            let target = PathBuf::from(text(&mount, "/mountPath")?);
            self.make_mount_point(&target)?;
            let options = if mount["readOnly"] == true {
                "bind,ro"
            } else {
                "bind"
            };
            let index = mount_args.len();
            script.push_str(&format!(
                "mount -o {options} \"${}\" \"${}\"\n",
                index + 1,
                index + 2
            ));
            mount_args.push(self.volumes.path().join(volume).display().to_string());
            mount_args.push(target.display().to_string());
        }
        let skip = mount_args.len();
        script.push_str(&format!("shift {skip}\nexec \"$@\"\n"));

        let mut command = network.command(&self.pod, "sh");
        command.arg("-c").arg(script).arg("sh").args(&mount_args);
        let security = &container["securityContext"];
        if let Some(user) = security["runAsUser"].as_u64().filter(|&uid| uid != 0) {
            let group = security["runAsGroup"].as_u64().unwrap_or(user);
            command
                .arg("setpriv")
                .arg(format!("--reuid={user}"))
                .arg(format!("--regid={group}"))
                .arg("--clear-groups");
        }
        command.arg(program).args(&program_and_args[1..]);
        command
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOSTNAME", self.name())
            .envs(environment);
        Ok(command)
    }

    /// Creates `path` on the host for a bind mount (the host has no such directory;
    /// an image would), remembering what it made.
    fn make_mount_point(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut missing: Vec<PathBuf> = path
            .ancestors()
            .take_while(|ancestor| !ancestor.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(path).with_context(|| format!("mount point {}", path.display()))?;
        missing.reverse();
        self.mount_points.extend(missing);
        Ok(())
    }
}

/// `command` + `args`, or the image's entrypoint + `args`.
fn entrypoint(container: &Value) -> anyhow::Result<Vec<String>> {
    let strings = |field: &str| -> Vec<String> {
        container[field]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut command = strings("command");
    if command.is_empty() {
        let image = text(container, "/image")?;
        let repository = image
            .rsplit_once(':')
            .map_or(image, |(repository, _)| repository);
        if !repository.ends_with("/tessera-proxy") {
            bail!("image {image}: no command given and no entrypoint known");
        }
        command.push("tessera-proxy".to_string());
    }
    command.extend(strings("args"));
    Ok(command)
}

/// A workspace program by its path, anything else as PATH finds it.
fn resolve(program: &str) -> PathBuf {
    if WORKSPACE_PROGRAMS.contains(&program) {
        binary(program)
    } else {
        PathBuf::from(program)
    }
}

/// A container's environment in order: values, `fieldRef`s of the pod, each value's
/// `$(VAR)` references to earlier variables expanded.
fn environment(pod: &Value, container: &Value) -> anyhow::Result<Vec<(String, String)>> {
    let mut environment: Vec<(String, String)> = Vec::new();
    for variable in array(&container["env"]) {
        let name = text(&variable, "/name")?.to_string();
        let value = if let Some(value) = variable["value"].as_str() {
            expand(value, &environment)
        } else if let Some(path) = variable.pointer("/valueFrom/fieldRef/fieldPath") {
            field(pod, path.as_str().unwrap_or_default())?
        } else {
            bail!("{name}: only value and valueFrom.fieldRef are played");
        };
        environment.retain(|(earlier, _)| *earlier != name);
        environment.push((name, value));
    }
    Ok(environment)
}

/// A pod field as the Downward API gives it.
fn field(pod: &Value, path: &str) -> anyhow::Result<String> {
    let pointer = match path {
        "metadata.name" => "/metadata/name",
        "metadata.namespace" => "/metadata/namespace",
        "metadata.uid" => "/metadata/uid",
        "spec.serviceAccountName" => "/spec/serviceAccountName",
        "spec.nodeName" => "/spec/nodeName",
        "status.podIP" => "/status/podIP",
        other => bail!("fieldRef {other} is not played"),
    };
    Ok(pod
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string())
}

/// The kubelet's expansion: `$(NAME)` of a defined variable becomes its value, `$$`
/// becomes `$`, anything else stays as written.
fn expand(value: &str, environment: &[(String, String)]) -> String {
    let mut expanded = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        expanded.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            expanded.push('$');
            rest = after;
            continue;
        }
        let reference = rest
            .strip_prefix("$(")
            .and_then(|inner| inner.split_once(')'))
            .and_then(|(name, after)| {
                let value = environment
                    .iter()
                    .rev()
                    .find(|(defined, _)| defined == name)?;
                Some((value.1.as_str(), after))
            });
        match reference {
            Some((value, after)) => {
                expanded.push_str(value);
                rest = after;
            }
            None => {
                expanded.push('$');
                rest = &rest[1..];
            }
        }
    }
    expanded.push_str(rest);
    expanded
}

/// Each volume of the pod as a directory named after it: ConfigMaps' keys (waiting for
/// the ConfigMap, as the kubelet does) and projections of service-account tokens (from
/// TokenRequest, bound to the pod), ConfigMaps and the pod's own fields.
async fn fill_volumes(api: &ApiServer, pod: &Value, root: &Path) -> anyhow::Result<()> {
    for volume in array(&pod["spec"]["volumes"]) {
        let name = text(&volume, "/name")?;
        let directory = root.join(name);
        std::fs::create_dir_all(&directory)?;
        let sources = match (volume.get("projected"), volume.get("configMap")) {
            (Some(projected), _) => array(&projected["sources"]),
            (None, Some(config_map)) => vec![json!({ "configMap": config_map })],
            _ => bail!("volume {name}: only projected and configMap volumes are played"),
        };
        for source in sources {
            for (path, contents) in source_files(api, pod, &source)
                .await
                .with_context(|| format!("volume {name}"))?
            {
                write_file(&directory.join(path), &contents)?;
            }
        }
    }
    Ok(())
}

/// The files (path, contents) one volume source projects.
async fn source_files(
    api: &ApiServer,
    pod: &Value,
    source: &Value,
) -> anyhow::Result<Vec<(String, String)>> {
    if let Some(token) = source.get("serviceAccountToken") {
        let value = token_request(api, pod, token).await?;
        return Ok(vec![(text(token, "/path")?.to_string(), value)]);
    }
    if let Some(config_map) = source.get("configMap") {
        let name = text(config_map, "/name")?;
        let namespace = text(pod, "/metadata/namespace")?;
        let path = format!("/api/v1/namespaces/{namespace}/configmaps/{name}");
        let found = api
            .eventually(&path, PROBE_TIMEOUT, |status, _| status == 200)
            .await
            .with_context(|| format!("ConfigMap {name}"))?;
        let value = |key: &str| found["data"][key].as_str().unwrap_or_default().to_string();
        let Some(items) = config_map["items"].as_array() else {
            let data = found["data"].as_object().cloned().unwrap_or_default();
            return Ok(data.keys().map(|key| (key.clone(), value(key))).collect());
        };
        return items
            .iter()
            .map(|item| Ok((text(item, "/path")?.to_string(), value(text(item, "/key")?))))
            .collect();
    }
    if let Some(downward) = source.get("downwardAPI") {
        return array(&downward["items"])
            .iter()
            .map(|item| {
                let path = text(item, "/path")?.to_string();
                Ok((path, field(pod, text(item, "/fieldRef/fieldPath")?)?))
            })
            .collect();
    }
    bail!("only serviceAccountToken, configMap and downwardAPI sources are played: {source}")
}

/// The token the kubelet asks TokenRequest for on behalf of the pod.
async fn token_request(api: &ApiServer, pod: &Value, projection: &Value) -> anyhow::Result<String> {
    let namespace = text(pod, "/metadata/namespace")?;
    let account = text(pod, "/spec/serviceAccountName")?;
    let mut spec = json!({
        "expirationSeconds": projection["expirationSeconds"].as_u64().unwrap_or(3600),
        "boundObjectRef": {
            "apiVersion": "v1", "kind": "Pod",
            "name": text(pod, "/metadata/name")?, "uid": text(pod, "/metadata/uid")?
        }
    });
    if let Some(audience) = projection["audience"].as_str() {
        spec["audiences"] = json!([audience]);
    }
    let request =
        json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec });
    let answer = api
        .must_create(
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"),
            &request,
        )
        .await;
    Ok(text(&answer, "/status/token")?.to_string())
}

/// A volume file the container's user can read (the kubelet's default mode, 0644).
fn write_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// Polls an `httpGet` probe from the host, as the kubelet does, until it answers 2xx.
async fn await_probe(
    pod: &Pod,
    probe: &Value,
    label: &str,
    running: &RunningPod,
) -> anyhow::Result<()> {
    let path = probe
        .pointer("/httpGet/path")
        .and_then(Value::as_str)
        .unwrap_or("/");
    let Some(port) = probe.pointer("/httpGet/port").and_then(Value::as_u64) else {
        bail!("{label}: only httpGet probes on numbered ports are played: {probe}");
    };
    let address = SocketAddr::from((pod.ip, port as u16));
    let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
    loop {
        if let Ok((status, _)) = crate::http_get(address, path).await
            && (200..300).contains(&status)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = running
                .containers
                .iter()
                .flat_map(|(_, process)| process.logs.lines())
                .collect();
            bail!(
                "{label}: probe {address}{path} never passed; logs:\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn patch_status(api: &ApiServer, path: &str, status: Value) -> anyhow::Result<()> {
    let (code, answer) = api.merge_patch(path, &json!({ "status": status })).await?;
    if code != 200 {
        bail!("PATCH {path}: {code} {answer}");
    }
    Ok(())
}

fn text<'a>(object: &'a Value, pointer: &str) -> anyhow::Result<&'a str> {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .with_context(|| format!("{pointer} missing in {object}"))
}

fn array(value: &Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        let defined = env(&[("NS", "shop"), ("SA", "web")]);
        assert_eq!(
            expand("ns: $(NS)\nsa: $(SA)", &defined),
            "ns: shop\nsa: web"
        );
        assert_eq!(expand("$(UNDEFINED) stays", &defined), "$(UNDEFINED) stays");
        assert_eq!(expand("$$(NS) is escaped", &defined), "$(NS) is escaped");
        assert_eq!(expand("cost: 5$ $(NS", &defined), "cost: 5$ $(NS");
    }

    #[test]
    fn environment_resolves_field_refs_and_earlier_variables() {
        let pod = json!({ "metadata": { "name": "web-1", "namespace": "shop" },
                          "spec": { "serviceAccountName": "web" } });
        let container = json!({ "env": [
            { "name": "NS", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
            { "name": "CONFIG", "value": "at $(NS) as $(LATER)" },
            { "name": "LATER", "valueFrom": { "fieldRef": { "fieldPath": "spec.serviceAccountName" } } },
        ]});
        assert_eq!(
            environment(&pod, &container).unwrap(),
            env(&[
                ("NS", "shop"),
                ("CONFIG", "at shop as $(LATER)"),
                ("LATER", "web")
            ])
        );
        let unknown = json!({ "env": [
            { "name": "X", "valueFrom": { "fieldRef": { "fieldPath": "metadata.annotations['a']" } } }
        ]});
        assert!(environment(&pod, &unknown).is_err());
    }
}
