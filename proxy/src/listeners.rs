//! What every listener's connections share, and how listeners are made from it: an
//! inbound port with its policy applied, an outbound for a fixed upstream or for a
//! service port kept in step with discovery. The transparent listeners make theirs at
//! run time, for the ports and services they meet.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use tessera_mesh::discovery::ResourceName;
use tessera_mesh::policy::WorkloadRef;
use tessera_mesh::resources::Protocol;
use tessera_mesh::snapshot::ServiceEntry;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::warn;

use crate::config::{InboundPort, Limits};
use crate::discovery::{Discovery, MeshView, Subscription};
use crate::identity::IdentityManager;
use crate::inbound::app_client::AppClient;
use crate::inbound::authorize::InboundPolicy;
use crate::inbound::rate_limit::RateLimiters;
use crate::inbound::{Inbound, InboundSet};
use crate::lifecycle::Drain;
use crate::migration::SourceLog;
use crate::outbound::Outbound;
use crate::outbound::endpoint::ConnectorFactory;
use crate::outbound::forward::Upstream;
use crate::telemetry::{Direction, Metrics, Workload};
use crate::trace::Tracer;

/// What every listener's connections share; transparent listeners use it to create the
/// inbound ports and outbound services they meet at run time.
pub(crate) struct Listeners {
    pub acceptor: TlsAcceptor,
    pub connectors: Arc<ConnectorFactory>,
    pub identity: Arc<IdentityManager>,
    /// The workload's labels, which policies' `matchLabels` select by.
    pub labels: Arc<BTreeMap<String, String>>,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub tracer: Arc<Tracer>,
    pub access_log: bool,
    pub drain: Drain,
    pub inbounds: Arc<InboundSet>,
    /// The workload's rate limiters, kept across snapshots.
    pub rate_limiters: RateLimiters,
}

impl Listeners {
    /// An inbound port, registered so policy updates reach it, with the policy of the
    /// current view already applied (fail closed until there is one).
    pub(crate) fn inbound(&self, port: InboundPort) -> Arc<Inbound> {
        let inbound = Arc::new(Inbound {
            app: AppClient::new(port.forward_to, &self.limits),
            port,
            workload: Workload::of(self.identity.identity()),
            acceptor: self.acceptor.clone(),
            identity: self.identity.clone(),
            metrics: self.metrics.clone(),
            counters: self.metrics.direction(Direction::Inbound),
            limits: self.limits.clone(),
            policy: ArcSwapOption::empty(),
            sources: SourceLog::default(),
            tracer: self.tracer.clone(),
            access_log: self.access_log,
            drain: self.drain.clone(),
        });
        // Registered before reading the view: a view published in between is then
        // applied by `follow_inbound_policy`, one published before is read here.
        self.inbounds.add(inbound.clone());
        if let Some(view) = self.discovery.current().filter(|v| v.policies_known) {
            self.apply_policy(&inbound, &view);
        }
        inbound
    }

    fn apply_policy(&self, inbound: &Inbound, view: &MeshView) {
        let identity = self.identity.identity();
        let port = inbound.app_port();
        let workload = WorkloadRef {
            namespace: identity.namespace(),
            service_account: identity.service_account(),
            labels: &self.labels,
        };
        let rate_limits = self
            .rate_limiters
            .resolve(&view.rate_limit_policies, workload, port);
        let policy = InboundPolicy::resolve(view, identity, &self.labels, port)
            .with_rate_limits(rate_limits);
        inbound.policy.store(Some(Arc::new(policy)));
    }

    /// An outbound for a fixed upstream `name` (endpoints set by the caller).
    pub(crate) fn outbound(&self, name: String, protocol: Option<Protocol>) -> Arc<Outbound> {
        let upstream = Upstream::new(
            name,
            self.identity.identity().clone(),
            self.metrics.clone(),
            self.limits.clone(),
            self.tracer.clone(),
            self.access_log,
        );
        Arc::new(Outbound {
            upstream,
            protocol: Arc::new(ArcSwap::from_pointee(protocol.unwrap_or_default())),
            identity: self.identity.clone(),
            metrics: self.metrics.clone(),
            counters: self.metrics.direction(Direction::Outbound),
            limits: self.limits.clone(),
            drain: self.drain.clone(),
        })
    }

    /// An outbound for a service port, and the task keeping it in step with discovery.
    /// The task holds the service's subscription: aborting it releases the service.
    pub(crate) fn service_outbound(
        &self,
        key: String,
        port: Option<u16>,
        protocol_override: Option<Protocol>,
    ) -> (Arc<Outbound>, JoinHandle<()>) {
        let outbound = self.outbound(key.clone(), protocol_override);
        let binding = ServiceBinding {
            key,
            port,
            protocol_override,
            protocol: outbound.protocol.clone(),
        };
        // Applied now, not only in the task: a transparent connection creating this
        // outbound is served right after, and must not find it empty.
        let subscription = self
            .discovery
            .want(ResourceName::Service(binding.key.clone()));
        let mut views = self.discovery.subscribe();
        if let Some(view) = views.borrow_and_update().clone() {
            apply_service(&view, &outbound.upstream, &binding, &*self.connectors);
        }
        let follow = tokio::spawn(follow_service(
            views,
            outbound.upstream.clone(),
            binding,
            self.connectors.clone(),
            subscription,
        ));
        (outbound, follow)
    }
}

/// How an outbound listener follows its service in discovery.
struct ServiceBinding {
    key: String,
    port: Option<u16>,
    protocol_override: Option<Protocol>,
    protocol: Arc<ArcSwap<Protocol>>,
}

/// Keeps an upstream's endpoints, route policy and protocol in step with discovery,
/// for as long as it holds `_subscription`. The receiver starts from the current view,
/// so no update is missed; a view in which this service did not change (another name
/// was answered) is skipped.
async fn follow_service(
    mut views: tokio::sync::watch::Receiver<Option<Arc<MeshView>>>,
    upstream: Arc<Upstream>,
    binding: ServiceBinding,
    connectors: Arc<ConnectorFactory>,
    _subscription: Subscription,
) {
    let mut applied = None;
    loop {
        let view = views.borrow_and_update().clone();
        if let Some(view) = view {
            let now = Answer::of(&view, &binding.key);
            if applied.as_ref() != Some(&now) {
                apply_service(&view, &upstream, &binding, &*connectors);
                applied = Some(now);
            }
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

/// What a view says of one service, compared by identity: an update to another name
/// keeps the same `Arc`.
#[derive(Debug)]
enum Answer {
    Unanswered,
    Absent,
    Present(Arc<ServiceEntry>),
}

impl Answer {
    fn of(view: &MeshView, key: &str) -> Self {
        match view.services.get(key) {
            Some(service) => Self::Present(service.clone()),
            None if view.absent_services.contains(key) => Self::Absent,
            None => Self::Unanswered,
        }
    }
}

impl PartialEq for Answer {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Present(a), Self::Present(b)) => Arc::ptr_eq(a, b),
            (Self::Absent, Self::Absent) | (Self::Unanswered, Self::Unanswered) => true,
            _ => false,
        }
    }
}

/// Applies one view to an upstream; a service the control plane has not answered for
/// yet leaves it as it is.
fn apply_service(
    view: &MeshView,
    upstream: &Upstream,
    binding: &ServiceBinding,
    connectors: &ConnectorFactory,
) {
    match view.services.get(&binding.key) {
        Some(service) => {
            let endpoints: Vec<_> = service
                .endpoints
                .iter()
                .map(|e| (e.address_for(binding.port), e.identity.clone()))
                .collect();
            let route = service.route.as_ref();
            let outlier = route.and_then(|r| r.outlier_detection.clone());
            upstream.balancer.update(&endpoints, outlier, connectors);
            upstream.set_policy(route);
            let protocol = binding
                .protocol_override
                .unwrap_or_else(|| service.protocol(binding.port));
            binding.protocol.store(Arc::new(protocol));
        }
        None if view.absent_services.contains(&binding.key) => {
            warn!(event = "unknown upstream service", service = %binding.key);
            upstream.balancer.update(&[], None, connectors);
            upstream.set_policy(None);
        }
        None => {}
    }
}

/// Keeps each inbound port's policy in step with discovery; a view in which the
/// policies did not change (a service was answered) is skipped.
pub(crate) async fn follow_inbound_policy(shared: Arc<Listeners>) {
    let mut views = shared.discovery.subscribe();
    let mut applied = None;
    loop {
        let view = views.borrow_and_update().clone();
        if let Some(view) = view.filter(|v| v.policies_known)
            && applied.as_ref() != Some(&view.policies_version)
        {
            for inbound in shared.inbounds.all().iter() {
                shared.apply_policy(inbound, &view);
            }
            applied = Some(view.policies_version.clone());
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use tessera_proto::api::discovery::Resource;

    use super::*;
    use crate::outbound::balance::tests::connectors;

    /// An explicit outbound's service: nothing until the control plane answers, then its
    /// endpoints, emptied when it is gone; followed while the task holds it.
    #[tokio::test]
    async fn a_followed_service_takes_its_answers_and_holds_its_subscription() {
        let discovery = Discovery::new(Gauge::default());
        let stream = discovery.open_stream_by_hand();
        let upstream = Upstream::new(
            "web.shop".into(),
            "spiffe://td/ns/shop/sa/client".parse().unwrap(),
            Arc::new(Metrics::new()),
            Limits::default(),
            Arc::new(Tracer::disabled(Counter::default())),
            false,
        );
        let binding = ServiceBinding {
            key: "web.shop".into(),
            port: Some(80),
            protocol_override: None,
            protocol: Arc::default(),
        };
        let subscription = discovery.want(ResourceName::Service("web.shop".into()));
        let follow = tokio::spawn(follow_service(
            discovery.subscribe(),
            upstream.clone(),
            binding,
            Arc::new(connectors()),
            subscription,
        ));
        let settle = || async {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        };
        let has_endpoints = || {
            upstream
                .balancer
                .pick(tokio::time::Instant::now())
                .is_some()
        };
        let request = discovery.changes_by_hand(stream).unwrap();
        assert_eq!(request.subscribe, ["service/web.shop"]);

        let body = br#"{"name": "web", "namespace": "shop", "ports": [{"port": 80}],
            "endpoints": [{"workload": "web-1", "address": "10.0.0.1:15006",
                           "identity": "spiffe://td/ns/shop/sa/web"}]}"#;
        let web = Resource {
            name: "service/web.shop".into(),
            version: "w1".into(),
            body: body.to_vec().into(),
        };
        discovery.respond_by_hand(vec![web], &[]);
        settle().await;
        assert!(has_endpoints());
        // Answers for other names leave it as it is.
        discovery.respond_by_hand(vec![], &["policies"]);
        settle().await;
        assert!(has_endpoints());
        discovery.respond_by_hand(vec![], &["service/web.shop"]);
        settle().await;
        assert!(!has_endpoints());

        follow.abort();
        settle().await;
        assert_eq!(discovery.wanted(), [ResourceName::Policies]);
    }
}
