//! `tessera check --pre`: can the mesh be installed here? The API answers, its version
//! is supported, and whoever runs the check may create what `tessera install` creates.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec, SubjectAccessReview,
    SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, PostParams};

use super::rbac::Access;
use super::{Check, NAMESPACE};

const API: &str = "kubernetes-api";
const PRE: &str = "pre-install";

/// The oldest Kubernetes the chart supports (`kubeVersion` in Chart.yaml).
pub const MIN_MINOR: u32 = 29;

/// The API's checks, shared with the post-install run; `None` when it cannot be reached
/// (nothing else can be checked then).
pub async fn api(client: &Client) -> (Vec<Check>, bool) {
    let info = match client.apiserver_version().await {
        Ok(info) => info,
        Err(error) => {
            let check = Check::error(API, "can reach the Kubernetes API", format!("{error}")).hint(
                "check the kubeconfig (--kubeconfig, KUBECONFIG) and that the API server is up",
            );
            return (vec![check], false);
        }
    };
    let reached = Check::ok(API, "can reach the Kubernetes API").detail(info.git_version.clone());
    let minor: Option<u32> = info
        .minor
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok();
    let name = format!("Kubernetes is 1.{MIN_MINOR} or newer");
    let version = match (info.major.as_str(), minor) {
        ("1", Some(minor)) if minor >= MIN_MINOR => Check::ok(API, name),
        _ => Check::error(API, name, format!("the API server is {}", info.git_version))
            .hint("upgrade the cluster"),
    };
    (vec![reached, version], true)
}

/// Every pre-install check.
pub async fn run(client: &Client) -> Vec<Check> {
    let (mut checks, reached) = api(client).await;
    if !reached {
        return checks;
    }
    checks.push(can_install(client).await);
    checks.push(namespace_free(client).await);
    checks
}

async fn can_install(client: &Client) -> Check {
    let name = "you may create everything `tessera install` creates";
    let mut denied = Vec::new();
    for access in super::rbac::install_needs() {
        match self_review(client, &access).await {
            Ok(true) => {}
            Ok(false) => denied.push(access.describe()),
            Err(error) => return Check::error(PRE, name, format!("cannot ask the API: {error}")),
        }
    }
    if denied.is_empty() {
        Check::ok(PRE, name)
    } else {
        Check::error(PRE, name, format!("denied: {}", denied.join(", ")))
            .hint("install as a cluster administrator (the chart creates CRDs, cluster roles and a webhook configuration)")
    }
}

async fn namespace_free(client: &Client) -> Check {
    let name = format!("the namespace {NAMESPACE} is not in use yet");
    match Api::<Namespace>::all(client.clone()).get_opt(NAMESPACE).await {
        Ok(None) => Check::ok(PRE, name),
        Ok(Some(_)) => Check::warning(PRE, name, format!("{NAMESPACE} exists"))
            .hint("an earlier install? `tessera check` (without --pre) says how it is doing; applying again upgrades it"),
        Err(error) => Check::error(PRE, name, format!("cannot read namespaces: {error}")),
    }
}

fn attributes(access: &Access) -> ResourceAttributes {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    ResourceAttributes {
        verb: some(access.verb),
        group: Some(access.group.to_string()),
        resource: some(access.resource),
        subresource: some(access.subresource),
        namespace: access.namespace.map(str::to_string),
        name: some(access.name),
        ..ResourceAttributes::default()
    }
}

/// May the caller do this?
async fn self_review(client: &Client, access: &Access) -> Result<bool, kube::Error> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(attributes(access)),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// May this service account do this?
pub(crate) async fn review(
    client: &Client,
    namespace: &str,
    account: &str,
    access: &Access,
) -> Result<bool, kube::Error> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{namespace}:{account}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(attributes(access)),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}
