use std::net::{Ipv4Addr, SocketAddr};

use prometheus_client::metrics::gauge::Gauge;
use tessera_proto::api::discovery::Resource;

use super::*;

const RELEASE_AFTER: Duration = Duration::from_secs(60);

/// Destinations over a discovery whose control plane the test plays by hand.
fn destinations() -> (Arc<Discovery>, Destinations<()>, u64) {
    let discovery = Discovery::new(Gauge::default());
    let stream = discovery.open_stream_by_hand();
    let destinations = Destinations::new(discovery.clone(), RELEASE_AFTER);
    (discovery, destinations, stream)
}

fn vip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))
}

fn web_at_vip() -> Resource {
    let body = br#"{"name": "web", "namespace": "shop", "addresses": ["10.96.0.10"],
        "ports": [{"port": 80}], "endpoints": []}"#;
    Resource {
        name: "address/10.96.0.10".into(),
        version: "w1".into(),
        body: body.to_vec().into(),
    }
}

/// As `Listeners::service_outbound` does: what serves the service, and a task that
/// holds its subscription.
fn followed(discovery: &Arc<Discovery>, key: &str) -> impl FnOnce() -> (Arc<()>, JoinHandle<()>) {
    let discovery = discovery.clone();
    let name = ResourceName::Service(key.into());
    move || {
        let subscription = discovery.want(name);
        let follow = tokio::spawn(async move {
            let _subscription = subscription;
            std::future::pending::<()>().await
        });
        (Arc::new(()), follow)
    }
}

fn wanted(discovery: &Discovery) -> Vec<String> {
    discovery.wanted().iter().map(ToString::to_string).collect()
}

/// Lets aborted follow tasks be dropped.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_first_use_waits_for_one_answer_then_routes() {
    let (discovery, destinations, stream) = destinations();
    let started = Instant::now();
    let control_plane = async {
        tokio::task::yield_now().await;
        let request = discovery.changes_by_hand(stream).unwrap();
        assert_eq!(request.subscribe, ["address/10.96.0.10"]);
        discovery.respond_by_hand(vec![web_at_vip()], &[]);
    };
    let (view, ()) = tokio::join!(destinations.view_for(vip()), control_plane);
    let service = view
        .unwrap()
        .service_at(SocketAddr::new(vip(), 80))
        .map(String::from);
    assert_eq!(service.as_deref(), Some("web.shop"));
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn an_absent_address_passes_through_and_is_remembered() {
    let (discovery, destinations, stream) = destinations();
    let outside = IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34));
    let control_plane = async {
        tokio::task::yield_now().await;
        discovery.changes_by_hand(stream).unwrap();
        discovery.respond_by_hand(vec![], &["address/93.184.216.34"]);
    };
    let (view, ()) = tokio::join!(destinations.view_for(outside), control_plane);
    assert_eq!(
        view.unwrap().service_at(SocketAddr::new(outside, 443)),
        None
    );
    // Known now: answered at once, without asking again.
    let started = Instant::now();
    let view = destinations.view_for(outside).await.unwrap();
    assert_eq!(view.service_at(SocketAddr::new(outside, 443)), None);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(discovery.changes_by_hand(stream).is_none());
}

#[tokio::test(start_paused = true)]
async fn no_answer_within_the_bound_fails_closed() {
    let (_discovery, destinations, _stream) = destinations();
    let started = Instant::now();
    assert!(destinations.view_for(vip()).await.is_none());
    assert_eq!(started.elapsed(), RESOLVE_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn an_unused_destination_is_released_but_not_one_a_connection_holds() {
    let (discovery, destinations, _stream) = destinations();
    let idle = destinations.service("web.shop", 80, followed(&discovery, "web.shop"));
    let again = destinations.service("web.shop", 80, || unreachable!("made once"));
    assert!(Arc::ptr_eq(&idle, &again));
    drop((idle, again));
    let connection = destinations.service("api.shop", 80, followed(&discovery, "api.shop"));
    destinations.touch_address(vip(), &ResourceName::Address(vip()));
    assert_eq!(
        wanted(&discovery),
        [
            "policies",
            "service/api.shop",
            "service/web.shop",
            "address/10.96.0.10"
        ]
    );

    tokio::time::advance(RELEASE_AFTER - Duration::from_secs(1)).await;
    destinations.sweep();
    assert_eq!(destinations.held(), (1, 2));
    tokio::time::advance(Duration::from_secs(1)).await;
    destinations.sweep();
    settle().await;
    assert_eq!(destinations.held(), (0, 1));
    assert_eq!(wanted(&discovery), ["policies", "service/api.shop"]);

    // Its idle time starts when its last connection ends, found by the periodic sweep.
    drop(connection);
    let sweeping = tokio::time::timeout(
        RELEASE_AFTER + RELEASE_AFTER / 2,
        destinations.sweep_periodically(),
    );
    sweeping.await.unwrap_err();
    settle().await;
    assert_eq!(destinations.held(), (0, 0));
    assert_eq!(wanted(&discovery), ["policies"]);
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_addresses_holds_at_most_the_limit() {
    let (discovery, destinations, stream) = destinations();
    let flood = MAX_ADDRESSES + 100;
    let address = |i: usize| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
    for i in 0..flood {
        let ip = address(i);
        destinations.touch_address(ip, &ResourceName::Address(ip));
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    assert_eq!(destinations.held(), (MAX_ADDRESSES, 0));
    assert_eq!(discovery.wanted().len(), MAX_ADDRESSES + 1);
    // The least recently used went first, and the control plane hears only of those
    // still held.
    let wanted = wanted(&discovery);
    assert!(!wanted.contains(&format!("address/{}", address(99))));
    assert!(wanted.contains(&format!("address/{}", address(100))));
    let request = discovery.changes_by_hand(stream).unwrap();
    assert_eq!(request.subscribe.len(), MAX_ADDRESSES);
    assert!(request.unsubscribe.is_empty());
}

#[tokio::test(start_paused = true)]
async fn beyond_the_idle_limit_the_least_recently_used_idle_service_goes() {
    let (discovery, destinations, _stream) = destinations();
    let key = |i: usize| format!("s{i}.shop");
    let busy = destinations.service(&key(0), 80, followed(&discovery, &key(0)));
    for i in 1..=MAX_IDLE_SERVICES {
        tokio::time::advance(Duration::from_millis(1)).await;
        drop(destinations.service(&key(i), 80, followed(&discovery, &key(i))));
    }
    settle().await;
    assert_eq!(destinations.held().1, MAX_IDLE_SERVICES);
    let wanted = wanted(&discovery);
    assert!(wanted.contains(&"service/s0.shop".to_string()), "in use");
    assert!(
        !wanted.contains(&"service/s1.shop".to_string()),
        "oldest idle"
    );
    assert!(wanted.contains(&"service/s2.shop".to_string()));
    drop(busy);
}
