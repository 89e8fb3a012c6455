//! What the control plane found in each `tessera.dev` object, written back to it: an
//! `Accepted` condition in `status.conditions` (what `kubectl get` shows in its
//! ACCEPTED column), and a Warning Event for each refusal (`kubectl describe`, `kubectl
//! events`). Only the replica holding the Lease writes; it compares with what the object
//! carries, so a new holder writes only what differs.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use super::crds::Condition;

/// The condition this module owns.
pub const ACCEPTED: &str = "Accepted";
/// Kubernetes caps an Event's note at 1 KiB; a condition's message is kept as short.
const MAX_MESSAGE_BYTES: usize = 1024;
/// How long a write the API server refused waits before it is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// A `tessera.dev` object, as its status needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Subject {
    pub resource: ApiResource,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    /// The `Accepted` condition the object carries now.
    pub condition: Option<Condition>,
}

impl Subject {
    /// The `Accepted` condition of `object`, if it has one.
    pub fn condition_of(object: &DynamicObject) -> Option<Condition> {
        let conditions = object.data.get("status")?.get("conditions")?.as_array()?;
        conditions
            .iter()
            .filter_map(|c| serde_json::from_value::<Condition>(c.clone()).ok())
            .find(|c| c.type_ == ACCEPTED)
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.resource.api_version.clone()),
            kind: Some(self.resource.kind.clone()),
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            uid: Some(self.uid.clone()),
            ..ObjectReference::default()
        }
    }
}

/// What the last snapshot made of one object: `refusal` is why its current version is
/// not in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub subject: Subject,
    pub refusal: Option<String>,
}

impl Verdict {
    /// The condition the object should carry, when it differs from the one it does.
    /// The transition time moves only when the status does.
    fn condition(&self, now: &str) -> Option<Condition> {
        let (status, reason, message) = match &self.refusal {
            None => ("True", "Accepted", "in force".to_string()),
            Some(refusal) => ("False", "Refused", bounded(refusal)),
        };
        let written = self.subject.condition.as_ref();
        let unchanged = written.is_some_and(|c| {
            c.status == status
                && c.reason == reason
                && c.message == message
                && c.observed_generation == self.subject.generation
        });
        if unchanged {
            return None;
        }
        let last_transition_time = written
            .filter(|c| c.status == status)
            .map_or_else(|| now.to_string(), |c| c.last_transition_time.clone());
        Some(Condition {
            type_: ACCEPTED.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: self.subject.generation,
            last_transition_time,
        })
    }
}

/// `text` cut to [`MAX_MESSAGE_BYTES`] at a character boundary.
fn bounded(text: &str) -> String {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text.to_string();
    }
    let mut end = MAX_MESSAGE_BYTES - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Writes each verdict of `verdicts` that the object does not show yet, and an Event per
/// refusal written. Runs until `verdicts` closes; run it while holding the Lease.
pub async fn report(
    client: kube::Client,
    replica: String,
    mut verdicts: watch::Receiver<Vec<Verdict>>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tessera-control-plane".into(),
            instance: Some(replica),
        },
    );
    loop {
        let current = verdicts.borrow_and_update().clone();
        let now = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let mut failed = false;
        for verdict in &current {
            let Some(condition) = verdict.condition(&now) else {
                continue;
            };
            if let Err(error) = write(&client, &recorder, verdict, condition).await {
                warn!(event = "object status not written", object = %format!("{}/{}", verdict.subject.namespace, verdict.subject.name), error = %error, "retrying");
                failed = true;
            }
        }
        if failed {
            tokio::time::sleep(RETRY).await;
            continue;
        }
        if verdicts.changed().await.is_err() {
            return;
        }
    }
}

async fn write(
    client: &kube::Client,
    recorder: &Recorder,
    verdict: &Verdict,
    condition: Condition,
) -> Result<(), kube::Error> {
    let subject = &verdict.subject;
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &subject.namespace, &subject.resource);
    let patch = json!({ "status": { "conditions": [condition] } });
    match api
        .patch_status(
            &subject.name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {}
        // Deleted meanwhile: nothing left to report on.
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
        Err(error) => return Err(error),
    }
    let Some(refusal) = &verdict.refusal else {
        info!(event = "object accepted", kind = %subject.resource.kind, object = %format!("{}/{}", subject.namespace, subject.name));
        return Ok(());
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "Refused".into(),
        note: Some(bounded(refusal)),
        action: "Accept".into(),
        secondary: None,
    };
    recorder.publish(&event, &subject.reference()).await
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;
    use crate::kubernetes::crds;

    fn verdict(condition: Option<Condition>, refusal: Option<&str>) -> Verdict {
        Verdict {
            subject: Subject {
                resource: crds::AuthorizationPolicy::api_resource(),
                namespace: "shop".into(),
                name: "deny".into(),
                uid: "u1".into(),
                generation: Some(2),
                condition,
            },
            refusal: refusal.map(Into::into),
        }
    }

    #[test]
    fn an_object_without_status_gets_its_condition() {
        let condition = verdict(None, None).condition("T1").unwrap();
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("True", "Accepted")
        );
        assert_eq!(condition.observed_generation, Some(2));
        assert_eq!(condition.last_transition_time, "T1");
    }

    #[test]
    fn a_condition_already_written_is_not_written_again() {
        let written = verdict(None, Some("address taken")).condition("T1");
        let again = verdict(written, Some("address taken")).condition("T2");
        assert_eq!(again, None);
    }

    /// A new generation is acknowledged; the transition time stays while the status does.
    #[test]
    fn a_new_generation_or_reason_is_written_keeping_the_transition_time() {
        let mut written = verdict(None, Some("address taken")).condition("T1");
        written.as_mut().unwrap().observed_generation = Some(1);
        let next = verdict(written.clone(), Some("address taken"))
            .condition("T2")
            .unwrap();
        assert_eq!(
            (next.observed_generation, next.last_transition_time.as_str()),
            (Some(2), "T1")
        );
        let accepted = verdict(written, None).condition("T3").unwrap();
        assert_eq!(
            (
                accepted.status.as_str(),
                accepted.last_transition_time.as_str()
            ),
            ("True", "T3")
        );
    }

    #[test]
    fn a_long_refusal_is_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let condition = verdict(None, Some(&long)).condition("T1").unwrap();
        assert!(condition.message.len() <= MAX_MESSAGE_BYTES);
        assert!(condition.message.ends_with('…'));
    }

    #[test]
    fn the_condition_is_read_back_from_the_object() {
        let condition = verdict(None, None).condition("T1").unwrap();
        let object = DynamicObject::new("deny", &crds::AuthorizationPolicy::api_resource())
            .data(json!({ "status": { "conditions": [
                { "type": "Other", "status": "True", "reason": "x", "message": "", "lastTransitionTime": "T0" },
                condition,
            ] } }));
        assert_eq!(Subject::condition_of(&object), Some(condition));
    }
}
