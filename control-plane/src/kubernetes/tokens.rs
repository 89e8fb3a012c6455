//! Identity from Kubernetes service-account tokens.
//!
//! An injected sidecar's first `Certify` carries the pod's projected token (audience
//! [`AUDIENCE`]). The API server judges it (TokenReview: signature, expiry, audience,
//! and that the object it is bound to still exists); the control plane then requires it
//! to be bound to a pod that exists, is the same pod (UID) and is not being deleted,
//! and runs as the token's service account. The identity is that pod's namespace and
//! service account — nothing the caller wrote. The token itself is never logged.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use tessera_mesh::SpiffeId;

/// The audience a sidecar's projected token must be issued for.
pub const AUDIENCE: &str = "tessera";

/// What a bound service-account token carries about its pod (`user.extra`).
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Why a token does not earn a certificate. Says nothing of the token's content.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenRefusal {
    #[error("the Kubernetes API server did not authenticate the token: {0}")]
    NotAuthenticated(String),
    #[error("the token is not issued for audience {AUDIENCE:?}")]
    WrongAudience,
    #[error("the token is not a service account's (user {0:?})")]
    NotServiceAccount(String),
    #[error("the token is not bound to a pod (a projected token from the pod's volume is)")]
    NotBoundToPod,
    #[error("pod {0} does not exist")]
    PodGone(String),
    #[error("pod {0} is another pod than the one the token was issued to")]
    PodReplaced(String),
    #[error("pod {0} is being deleted")]
    PodDeleting(String),
    #[error("pod {pod} runs as service account {pod_account:?}, the token is {token_account:?}'s")]
    ServiceAccountMismatch {
        pod: String,
        pod_account: String,
        token_account: String,
    },
    #[error("the identity is not a valid SPIFFE ID: {0}")]
    Identity(String),
    /// The API could not be asked: the caller may retry.
    #[error("the Kubernetes API is unavailable: {0}")]
    Unavailable(String),
}

/// Verifies service-account tokens with the Kubernetes API.
pub struct ServiceAccountTokens {
    client: kube::Client,
    trust_domain: String,
}

/// Who the API server says a token belongs to.
#[derive(Debug, PartialEq)]
struct BoundToken {
    namespace: String,
    service_account: String,
    pod: String,
    pod_uid: String,
}

impl ServiceAccountTokens {
    pub fn new(client: kube::Client, trust_domain: String) -> Self {
        Self {
            client,
            trust_domain,
        }
    }

    /// The identity `token` proves, or why it proves none.
    pub async fn verify(&self, token: &str) -> Result<SpiffeId, TokenRefusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| TokenRefusal::Unavailable(error.to_string()))?;
        let bound = bound_token(reviewed)?;
        let pod = Api::<Pod>::namespaced(self.client.clone(), &bound.namespace)
            .get_opt(&bound.pod)
            .await
            .map_err(|error| TokenRefusal::Unavailable(error.to_string()))?;
        check_pod(&bound, pod.as_ref())?;
        SpiffeId::new(&self.trust_domain, &bound.namespace, &bound.service_account)
            .map_err(|error| TokenRefusal::Identity(error.to_string()))
    }
}

/// The pod and service account a reviewed token is bound to.
fn bound_token(reviewed: TokenReview) -> Result<BoundToken, TokenRefusal> {
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let reason = status.error.unwrap_or_else(|| "not authenticated".into());
        return Err(TokenRefusal::NotAuthenticated(reason));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == AUDIENCE)
    {
        return Err(TokenRefusal::WrongAudience);
    }
    let user = status.user.unwrap_or_default();
    let (namespace, service_account) = service_account_of(&user)?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|extra| extra.get(key))
            .and_then(|values| match values.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            })
    };
    let (Some(pod), Some(pod_uid)) = (extra(POD_NAME), extra(POD_UID)) else {
        return Err(TokenRefusal::NotBoundToPod);
    };
    Ok(BoundToken {
        namespace,
        service_account,
        pod,
        pod_uid,
    })
}

/// `system:serviceaccount:NAMESPACE:NAME` → (namespace, name).
fn service_account_of(user: &UserInfo) -> Result<(String, String), TokenRefusal> {
    let username = user.username.clone().unwrap_or_default();
    let parsed = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(namespace, name)| {
            !namespace.is_empty() && !name.is_empty() && !name.contains(':')
        })
        .map(|(namespace, name)| (namespace.to_string(), name.to_string()));
    parsed.ok_or(TokenRefusal::NotServiceAccount(username))
}

/// The pod the token names must be the same, live pod, running as the token's account.
fn check_pod(bound: &BoundToken, pod: Option<&Pod>) -> Result<(), TokenRefusal> {
    let name = format!("{}/{}", bound.namespace, bound.pod);
    let Some(pod) = pod else {
        return Err(TokenRefusal::PodGone(name));
    };
    if pod.metadata.uid.as_deref() != Some(bound.pod_uid.as_str()) {
        return Err(TokenRefusal::PodReplaced(name));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(TokenRefusal::PodDeleting(name));
    }
    let pod_account = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.clone())
        .unwrap_or_else(|| "default".to_string());
    if pod_account != bound.service_account {
        return Err(TokenRefusal::ServiceAccountMismatch {
            pod: name,
            pod_account,
            token_account: bound.service_account.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::TokenReviewStatus;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use std::collections::BTreeMap;

    fn reviewed(
        authenticated: bool,
        audiences: &[&str],
        username: &str,
        extra: &[(&str, &[&str])],
    ) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
                error: (!authenticated).then(|| "token has expired".to_string()),
                user: Some(UserInfo {
                    username: Some(username.to_string()),
                    extra: Some(
                        extra
                            .iter()
                            .map(|(k, v)| {
                                (k.to_string(), v.iter().map(|s| s.to_string()).collect())
                            })
                            .collect::<BTreeMap<_, _>>(),
                    ),
                    ..UserInfo::default()
                }),
            }),
            ..TokenReview::default()
        }
    }

    const ORDERS: &str = "system:serviceaccount:shop:orders";

    fn bound_to_pod() -> [(&'static str, &'static [&'static str]); 2] {
        [(POD_NAME, &["orders-1"]), (POD_UID, &["uid-1"])]
    }

    #[test]
    fn a_bound_token_names_its_namespace_account_and_pod() {
        let bound = bound_token(reviewed(true, &[AUDIENCE], ORDERS, &bound_to_pod())).unwrap();
        assert_eq!(
            bound,
            BoundToken {
                namespace: "shop".into(),
                service_account: "orders".into(),
                pod: "orders-1".into(),
                pod_uid: "uid-1".into(),
            }
        );
    }

    #[test]
    fn tokens_that_prove_no_pod_identity_are_refused() {
        let refused = |review| bound_token(review).unwrap_err();
        assert_eq!(
            refused(reviewed(false, &[], ORDERS, &bound_to_pod())),
            TokenRefusal::NotAuthenticated("token has expired".into())
        );
        assert_eq!(
            refused(reviewed(
                true,
                &["https://kubernetes.default.svc"],
                ORDERS,
                &bound_to_pod()
            )),
            TokenRefusal::WrongAudience
        );
        for user in [
            "admin",
            "system:serviceaccount:shop",
            "system:serviceaccount::orders",
            "system:serviceaccount:shop:a:b",
        ] {
            assert_eq!(
                refused(reviewed(true, &[AUDIENCE], user, &bound_to_pod())),
                TokenRefusal::NotServiceAccount(user.into()),
            );
        }
        // A legacy Secret token, or a TokenRequest not bound to a pod.
        assert_eq!(
            refused(reviewed(true, &[AUDIENCE], ORDERS, &[])),
            TokenRefusal::NotBoundToPod
        );
        // Two pod names cannot both be the caller.
        assert_eq!(
            refused(reviewed(
                true,
                &[AUDIENCE],
                ORDERS,
                &[(POD_NAME, &["a", "b"]), (POD_UID, &["uid-1"])]
            )),
            TokenRefusal::NotBoundToPod
        );
    }

    fn pod(uid: &str, account: Option<&str>, deleting: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("orders-1".into()),
                namespace: Some("shop".into()),
                uid: Some(uid.into()),
                deletion_timestamp: deleting
                    .then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: account.map(str::to_string),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn the_pod_must_be_the_same_live_pod_running_as_the_tokens_account() {
        let bound = bound_token(reviewed(true, &[AUDIENCE], ORDERS, &bound_to_pod())).unwrap();
        assert_eq!(
            check_pod(&bound, Some(&pod("uid-1", Some("orders"), false))),
            Ok(())
        );
        assert_eq!(
            check_pod(&bound, None),
            Err(TokenRefusal::PodGone("shop/orders-1".into()))
        );
        assert_eq!(
            check_pod(&bound, Some(&pod("uid-2", Some("orders"), false))),
            Err(TokenRefusal::PodReplaced("shop/orders-1".into()))
        );
        assert_eq!(
            check_pod(&bound, Some(&pod("uid-1", Some("orders"), true))),
            Err(TokenRefusal::PodDeleting("shop/orders-1".into()))
        );
        assert_eq!(
            check_pod(&bound, Some(&pod("uid-1", None, false))),
            Err(TokenRefusal::ServiceAccountMismatch {
                pod: "shop/orders-1".into(),
                pod_account: "default".into(),
                token_account: "orders".into(),
            })
        );
    }
}
