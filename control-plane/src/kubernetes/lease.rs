//! Which replica writes: a `coordination.k8s.io` Lease.
//!
//! Every replica serves certificates and discovery; only the holder of the Lease
//! [`LEASE`] writes to the API (the root's ConfigMaps, the webhook's caBundle), so two
//! replicas never fight over an object. The holder renews it every third of its
//! duration; another replica takes it over once the record has not changed for a whole
//! duration by its own clock (never by comparing timestamps across machines), and every
//! write of the record is conditional on the version read, so two replicas cannot both
//! win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// The Lease, in the control plane's namespace.
pub const LEASE: &str = "tessera-control-plane";

/// How long a holder that stops renewing keeps the Lease.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(15);

/// The record as last seen, and when this replica saw it change.
struct Observed {
    version: Option<String>,
    since: Instant,
}

/// Competes for the Lease until the process ends; the receiver says whether this
/// replica holds it.
pub fn elect(
    client: Client,
    namespace: &str,
    identity: String,
    duration: Duration,
) -> watch::Receiver<bool> {
    let (leading, receiver) = watch::channel(false);
    let leases = Api::<Lease>::namespaced(client, namespace);
    tokio::spawn(async move {
        let mut observed = Observed {
            version: None,
            since: Instant::now(),
        };
        loop {
            let holds = match attempt(&leases, &identity, duration, &mut observed).await {
                Ok(holds) => holds,
                Err(error) => {
                    warn!(event = "lease not renewed", error = %error);
                    // Unrenewed past its duration, the Lease may be another's by now.
                    *leading.borrow() && observed.since.elapsed() < duration
                }
            };
            if holds != *leading.borrow() {
                info!(event = if holds { "leading" } else { "no longer leading" }, lease = LEASE, identity = %identity);
            }
            leading.send_replace(holds);
            tokio::time::sleep(duration / 3).await;
        }
    });
    receiver
}

/// One round: take, renew or observe the Lease. Whether this replica holds it after.
async fn attempt(
    leases: &Api<Lease>,
    identity: &str,
    duration: Duration,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let Some(lease) = leases.get_opt(LEASE).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(spec(identity, duration, now.clone(), now, 0)),
        };
        return conditional(leases.create(&PostParams::default(), &lease).await);
    };
    let version = lease.metadata.resource_version.clone();
    if version != observed.version {
        *observed = Observed {
            version: version.clone(),
            since: Instant::now(),
        };
    }
    let current = lease.spec.clone().unwrap_or_default();
    let holder = current.holder_identity.as_deref();
    let expired = observed.since.elapsed() >= duration;
    if holder != Some(identity) && !expired && holder.is_some() {
        return Ok(false);
    }
    let transitions = current.lease_transitions.unwrap_or(0);
    let renewed = if holder == Some(identity) {
        let acquired = current.acquire_time.unwrap_or_else(|| now.clone());
        spec(identity, duration, acquired, now, transitions)
    } else {
        spec(identity, duration, now.clone(), now, transitions + 1)
    };
    let lease = Lease {
        metadata: ObjectMeta {
            resource_version: version,
            ..lease.metadata
        },
        spec: Some(renewed),
    };
    conditional(leases.replace(LEASE, &PostParams::default(), &lease).await)
}

fn spec(
    identity: &str,
    duration: Duration,
    acquired: MicroTime,
    renewed: MicroTime,
    transitions: i32,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: Some(acquired),
        renew_time: Some(renewed),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// A write that lost the race (409: the record changed since it was read, or another
/// created it) is a plain "not holding", not an error.
fn conditional(written: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match written {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(refusal)) if refusal.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

/// Runs `work` whenever this replica leads, and stops it as soon as it does not.
pub async fn while_leading<F, W>(mut leading: watch::Receiver<bool>, work: W)
where
    W: Fn() -> F,
    F: std::future::Future<Output = ()>,
{
    loop {
        if leading.wait_for(|leads| *leads).await.is_err() {
            return;
        }
        tokio::select! {
            () = work() => {}
            _ = leading.wait_for(|leads| !*leads) => {}
        }
    }
}
