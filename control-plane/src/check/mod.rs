//! `tessera check`: is the mesh installed and healthy on this cluster (`--pre`: can it
//! be installed)? Asks the Kubernetes API, like `linkerd check`, and prints one line per
//! check — ✔ passed, ‼ a warning, × a failure with the hint to fix it — or JSON.
//!
//! `pre` and `installed` gather from the API; this module holds the verdicts that do
//! not need a cluster (certificate lifetimes, the report) so they are unit-tested.

pub mod installed;
pub mod pre;
pub(crate) mod rbac;

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use serde::Serialize;

/// The namespace `tessera install` and the chart use.
pub const NAMESPACE: &str = "tessera-system";
/// The control plane's Deployment, Service and service account.
pub const CONTROL_PLANE: &str = "tessera-control-plane";
/// The sidecar injector's MutatingWebhookConfiguration.
pub const WEBHOOK: &str = crate::kubernetes::root_cert::WEBHOOK_CONFIGURATION;

/// A root or issuer expiring sooner than this is a warning ...
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// ... and sooner than this a failure.
pub const FAIL_BEFORE: Duration = Duration::from_secs(7 * 86_400);

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Error,
}

impl Status {
    fn symbol(self) -> char {
        match self {
            Self::Ok => '✔',
            Self::Warning => '‼',
            Self::Error => '×',
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The group it belongs to (`kubernetes-api`, `tessera-webhook`, ...).
    pub group: &'static str,
    /// What was checked, as a statement that holds when it passes.
    pub name: String,
    pub status: Status,
    /// What was found, when it is more than the name says.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// How to fix a warning or a failure.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
}

impl Check {
    pub fn ok(group: &'static str, name: impl Into<String>) -> Self {
        Self {
            group,
            name: name.into(),
            status: Status::Ok,
            detail: String::new(),
            hint: String::new(),
        }
    }

    pub fn warning(
        group: &'static str,
        name: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status: Status::Warning,
            detail: detail.into(),
            ..Self::ok(group, name)
        }
    }

    pub fn error(group: &'static str, name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status: Status::Error,
            detail: detail.into(),
            ..Self::ok(group, name)
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = hint.into();
        self
    }
}

/// Every check that ran, in order.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub success: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(checks: Vec<Check>) -> Self {
        Self {
            success: checks.iter().all(|c| c.status != Status::Error),
            checks,
        }
    }

    /// The `linkerd check`-like text: a heading per group, a line per check, the detail
    /// and hint indented under warnings and failures.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut group = "";
        for check in &self.checks {
            if check.group != group {
                group = check.group;
                let _ = writeln!(
                    out,
                    "{}{group}\n{}",
                    if out.is_empty() { "" } else { "\n" },
                    "-".repeat(group.len())
                );
            }
            let _ = writeln!(out, "{} {}", check.status.symbol(), check.name);
            if check.status != Status::Ok || !check.detail.is_empty() {
                for line in check.detail.lines() {
                    let _ = writeln!(out, "    {line}");
                }
            }
            if !check.hint.is_empty() {
                let _ = writeln!(out, "    hint: {}", check.hint);
            }
        }
        let verdict = if self.success { '✔' } else { '×' };
        let _ = writeln!(out, "\nStatus check results are {verdict}");
        out
    }
}

/// How long until a certificate expires, as a check: × within [`FAIL_BEFORE`] (or when
/// already expired), ‼ within [`WARN_BEFORE`].
pub fn lifetime_check(
    group: &'static str,
    what: &str,
    not_after: SystemTime,
    now: SystemTime,
) -> Check {
    let name = format!(
        "the {what} is valid for at least {} days",
        WARN_BEFORE.as_secs() / 86_400
    );
    let expiry = humantime::format_rfc3339_seconds(not_after);
    let hint = "renew it (`tessera ca create --help`, or your PKI / cert-manager) and update the CA Secret: the control plane re-reads it";
    match not_after.duration_since(now) {
        Err(_) => Check::error(group, name, format!("{what} expired at {expiry}")).hint(hint),
        Ok(left) if left < FAIL_BEFORE => Check::error(
            group,
            name,
            format!("{what} expires at {expiry}, in {}", days(left)),
        )
        .hint(hint),
        Ok(left) if left < WARN_BEFORE => Check::warning(
            group,
            name,
            format!("{what} expires at {expiry}, in {}", days(left)),
        )
        .hint(hint),
        Ok(_) => Check::ok(group, name).detail(format!("expires at {expiry}")),
    }
}

fn days(duration: Duration) -> String {
    let days = duration.as_secs() / 86_400;
    if days == 0 {
        format!("{} hours", duration.as_secs() / 3600)
    } else {
        format!("{days} days")
    }
}

/// The end of a certificate's validity, or why it has none.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|_| "not a valid X.509 certificate".to_string())?;
    let seconds = parsed.validity().not_after.timestamp();
    u64::try_from(seconds)
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
        .map_err(|_| "expires before 1970".to_string())
}

/// The subject of a certificate, for messages.
pub fn subject(cert: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, parsed)| parsed.subject().to_string())
        .unwrap_or_else(|_| "(unparsable)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn lifetimes_warn_within_30_days_and_fail_within_7() {
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let status = |left: Duration| lifetime_check("g", "root", now + left, now).status;
        assert_eq!(status(365 * DAY), Status::Ok);
        assert_eq!(status(31 * DAY), Status::Ok);
        assert_eq!(status(29 * DAY), Status::Warning);
        assert_eq!(status(8 * DAY), Status::Warning);
        assert_eq!(status(6 * DAY), Status::Error);
        let expired = lifetime_check("g", "root", now - DAY, now);
        assert_eq!(expired.status, Status::Error);
        assert!(expired.detail.contains("expired at"), "{}", expired.detail);
        assert!(!expired.hint.is_empty());
    }

    #[test]
    fn the_report_marks_each_line_and_fails_on_any_error() {
        let report = Report::new(vec![
            Check::ok("kubernetes-api", "can reach the API"),
            Check::warning(
                "tessera-proxies",
                "proxies run this version",
                "shop/web-1 runs 0.0.9",
            )
            .hint("restart the pods"),
            Check::error("tessera-webhook", "caBundle is the root", "it is empty"),
        ]);
        assert!(!report.success);
        let text = report.table();
        assert!(
            text.starts_with("kubernetes-api\n--------------\n✔ can reach the API\n"),
            "{text}"
        );
        assert!(text.contains("‼ proxies run this version\n    shop/web-1 runs 0.0.9\n    hint: restart the pods\n"), "{text}");
        assert!(
            text.contains("× caBundle is the root\n    it is empty\n"),
            "{text}"
        );
        assert!(text.ends_with("Status check results are ×\n"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["success"], false);
        assert_eq!(json["checks"][1]["status"], "warning");
        assert_eq!(json["checks"][2]["group"], "tessera-webhook");
        assert!(json["checks"][0].get("hint").is_none());
        assert!(Report::new(vec![Check::warning("g", "n", "d")]).success);
    }
}
