//! Golden files for `tessera inject`: `golden/inject/input/<case>.yaml` must become
//! `golden/inject/expected/<case>.yaml`, or fail with `expected/<case>.error`.
//! Regenerate with `UPDATE_GOLDEN=1 cargo test -p tessera-control-plane --test
//! inject_golden`, then read the diff: the expected files are the specification.

use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_control_plane::inject::manifests::{Injected, inject_manifests};
use tessera_control_plane::inject::{Options, Outcome, SkipReason};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject")
}

/// Fixed, so the goldens do not change with every release.
fn options() -> Options {
    Options {
        proxy_image: "ghcr.io/tessera-mesh/tessera-proxy:golden".into(),
        ..Options::default()
    }
}

fn input(case: &str) -> String {
    let path = golden_dir().join("input").join(format!("{case}.yaml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares `actual` with the expected file, or rewrites it under `UPDATE_GOLDEN`.
fn assert_golden(file_name: &str, actual: &str) {
    let path = golden_dir().join("expected").join(file_name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        actual == expected,
        "{file_name} differs from its golden file; run with UPDATE_GOLDEN=1 and review the diff.\n--- actual:\n{actual}"
    );
}

/// Injects a case, checks the golden, the outcomes, and that injecting the result
/// again changes nothing.
fn check(case: &str, expected_outcomes: &[(&str, Outcome)]) -> Injected {
    let injected =
        inject_manifests(&input(case), &options()).unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_golden(&format!("{case}.yaml"), &injected.yaml);
    let outcomes: Vec<(&str, Outcome)> = injected
        .reports
        .iter()
        .map(|r| (r.object.as_str(), r.outcome))
        .collect();
    assert_eq!(outcomes, expected_outcomes, "{case}");

    let again = inject_manifests(&injected.yaml, &options()).unwrap();
    assert_eq!(again.yaml, injected.yaml, "{case}: injecting twice differs");
    for report in &again.reports {
        assert!(
            matches!(report.outcome, Outcome::Skipped(_)),
            "{case}: {} injected again",
            report.object
        );
    }
    injected
}

const INJECTED: Outcome = Outcome::Injected;

#[test]
fn deployment() {
    check("deployment", &[("Deployment/web", INJECTED)]);
}

#[test]
fn statefulset() {
    check("statefulset", &[("StatefulSet/db", INJECTED)]);
}

#[test]
fn daemonset() {
    check("daemonset", &[("DaemonSet/log-shipper", INJECTED)]);
}

#[test]
fn job() {
    check("job", &[("Job/report", INJECTED)]);
}

#[test]
fn cronjob() {
    check("cronjob", &[("CronJob/nightly", INJECTED)]);
}

#[test]
fn pod() {
    check("pod", &[("Pod/debug", INJECTED)]);
}

#[test]
fn multi_document() {
    let injected = check(
        "multi-document",
        &[
            ("Service/orders", Outcome::Skipped(SkipReason::NotAWorkload)),
            ("Deployment/orders", INJECTED),
            (
                "ConfigMap/orders-settings",
                Outcome::Skipped(SkipReason::NotAWorkload),
            ),
        ],
    );
    // The documents around the injected one are the input's bytes.
    let original = input("multi-document");
    let service = original.split("---\n").next().unwrap();
    assert!(injected.yaml.starts_with(service));
    let config_map = original.rsplit("---\n").next().unwrap();
    assert!(injected.yaml.ends_with(config_map));
}

#[test]
fn opted_out_and_host_network_pods_are_left_alone() {
    let injected = check(
        "opted-out",
        &[
            ("Pod/legacy", Outcome::Skipped(SkipReason::OptedOut)),
            ("Pod/node-agent", Outcome::Skipped(SkipReason::HostNetwork)),
        ],
    );
    assert_eq!(injected.yaml, input("opted-out"));
}

#[test]
fn list() {
    let injected = check("list", &[("List", INJECTED)]);
    let items: serde_json::Value = serde_saphyr::from_str(&injected.yaml).unwrap();
    let init = |i: usize| {
        items["items"][i]
            .pointer("/spec/template/spec/initContainers")
            .cloned()
    };
    assert_eq!(init(0), None);
    assert_eq!(init(1).unwrap().as_array().unwrap().len(), 2);
    assert!(items["items"][2]["spec"].get("initContainers").is_none());
}

#[test]
fn probes() {
    let injected = check("probes", &[("Pod/api", INJECTED)]);
    let lines: Vec<String> = injected.reports[0]
        .probes
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            "rewrote api/livenessProbe (httpGet :http/healthz) → :15020/app-health/api/livez",
            "left api/readinessProbe (httpGet :8443/ready, HTTPS, which the proxy does not probe)",
            "rewrote api/startupProbe (httpGet :8080/started) → :15020/app-health/api/startupz",
            "left worker/livenessProbe (httpGet :admin/alive, port name not declared by the container)",
            "left worker/readinessProbe (exec, runs in the container)",
            "rewrote worker/startupProbe (grpc :9000) → :15020/app-health/worker/startupz",
            "rewrote cache/livenessProbe (tcpSocket :6379) → :15020/app-health/cache/livez",
            "rewrote cache/readinessProbe (httpGet :6380/) → :15020/app-health/cache/readyz",
            "left db/livenessProbe (tcpSocket :postgres, port excluded from capture)",
            "rewrote db/readinessProbe (grpc :50051 service \"db.v1.Admin\") → :15020/app-health/db/readyz",
            "left db/startupProbe (tcpSocket db.internal:5432, probes another host)",
        ]
    );
}

#[test]
fn exclusion_annotations() {
    check("exclusions", &[("Deployment/payments", INJECTED)]);
}

fn check_error(case: &str) -> String {
    let message = inject_manifests(&input(case), &options())
        .expect_err(case)
        .to_string();
    assert_golden(&format!("{case}.error"), &format!("{message}\n"));
    message
}

#[test]
fn invalid_annotation_is_refused_naming_it_and_its_value() {
    let message = check_error("invalid-annotation");
    assert!(message.contains("document 2 (Deployment/typo"), "{message}");
    assert!(
        message.contains("tessera.dev/exclude-outbound-ports: \"5432,postgres\""),
        "{message}"
    );
}

#[test]
fn malformed_yaml_is_refused_naming_document_and_line() {
    let message = check_error("invalid-yaml");
    assert!(message.contains("document 2 (from line 5)"), "{message}");
    assert!(message.contains("line 11 column 5"), "{message}");
}

/// The binary: stdin by default, several files joined, and on any error nothing on
/// stdout and a non-zero exit.
#[test]
fn command_line() {
    let tessera = env!("CARGO_BIN_EXE_tessera");
    let file = |case: &str| golden_dir().join("input").join(format!("{case}.yaml"));

    let output = Command::new(tessera)
        .args([
            "inject",
            "--proxy-image",
            "ghcr.io/tessera-mesh/tessera-proxy:golden",
        ])
        .arg("-f")
        .arg(file("pod"))
        .arg("-f")
        .arg(file("job"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let injected = |case: &str| inject_manifests(&input(case), &options()).unwrap().yaml;
    let (pod, job) = (injected("pod"), injected("job"));
    assert_eq!(stdout, format!("{pod}---\n{job}"));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("Pod/debug: injected"), "{stderr}");

    // A line per probe, after its workload's.
    let output = Command::new(tessera)
        .arg("inject")
        .arg("-f")
        .arg(file("probes"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    let label = file("probes").display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 12, "{stderr}");
    assert_eq!(lines[0], format!("{label}: Pod/api: injected"));
    assert_eq!(
        lines[6],
        format!(
            "{label}: Pod/api: rewrote worker/startupProbe (grpc :9000) → :15020/app-health/worker/startupz"
        )
    );
    assert_eq!(
        lines[9],
        format!(
            "{label}: Pod/api: left db/livenessProbe (tcpSocket :postgres, port excluded from capture)"
        )
    );

    let mut child = Command::new(tessera)
        .args(["inject", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input("pod").as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains(&format!(
        "image: ghcr.io/tessera-mesh/tessera-proxy:{}",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(stdout.contains("tessera-control-plane.tessera-system.svc:15012"));

    let output = Command::new(tessera)
        .arg("inject")
        .arg("-f")
        .arg(file("pod"))
        .arg("-f")
        .arg(file("invalid-yaml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "half-written output");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("invalid-yaml.yaml: nothing was written"),
        "{stderr}"
    );
    assert!(stderr.contains("document 2 (from line 5)"), "{stderr}");

    for bad_flag in [
        ["--control-plane-address", "no-port"],
        ["--trust-domain", "Not A Domain"],
    ] {
        let output = Command::new(tessera)
            .arg("inject")
            .args(bad_flag)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{bad_flag:?}");
        assert!(output.stdout.is_empty());
    }
}
