//! Recording a request in its metric series allocates nothing once the series has seen
//! the outcome: the one allocation of a metered request is its answer's body, boxed once.
//! An integration test of its own because it needs a counting global allocator.

use std::sync::Arc;

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::Full;
use tessera_mesh::SpiffeId;
use tessera_proxy::telemetry::{EdgeLabels, Label, Metrics, RequestMeter, RequestSeries, Workload};

mod common;

use common::allocations;

/// Meters one request answered `status` and reads the answer to its end.
fn exchange(series: &Arc<RequestSeries>, status: u16) {
    let mut response = http::Response::new(Full::new(Bytes::from_static(b"ok")));
    *response.status_mut() = http::StatusCode::from_u16(status).expect("a valid status");
    let answer = RequestMeter::start().finish(series.clone(), None, response);
    let mut body = answer.into_body();
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    // A `Full` body is ready at once: no runtime needed.
    while let std::task::Poll::Ready(Some(frame)) =
        std::pin::Pin::new(&mut body).poll_frame(&mut context)
    {
        frame.expect("a full body does not fail");
    }
    drop(body);
}

#[test]
fn recording_a_request_allocates_nothing_but_the_body_box() {
    let id = |workload: &str| -> SpiffeId {
        format!("spiffe://cluster.local/ns/shop/sa/{workload}")
            .parse()
            .expect("a valid SPIFFE ID")
    };
    let metrics = Arc::new(Metrics::new());
    let labels = EdgeLabels::outbound(
        &Workload::of(&id("web")),
        &Workload::of(&id("orders")),
        Label::new("orders.shop"),
    );
    let series = RequestSeries::new(metrics.clone(), labels);
    // The first request of an outcome resolves its series (hashing, allocating).
    exchange(&series, 200);
    exchange(&series, 503);
    let before = allocations();
    for _ in 0..100 {
        exchange(&series, 200);
        exchange(&series, 503);
    }
    assert_eq!(
        allocations() - before,
        200,
        "one boxed body per request, nothing else"
    );
    let text = metrics.encode();
    assert!(
        text.contains("code=\"200\",grpc_status=\"\"} 101"),
        "{text}"
    );
}
