//! gRPC through a proxy pair answers exactly as the service does directly: all four call
//! kinds, metadata, and error statuses.

use std::net::SocketAddr;

use tessera_tests::backend::echo_proto::Message;
use tessera_tests::backend::echo_proto::echo_client::EchoClient;
use tessera_tests::backend::start_grpc;
use tessera_tests::l7::L7Mesh;
use tonic::transport::Channel;

async fn client(address: SocketAddr) -> EchoClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .expect("connect gRPC");
    EchoClient::new(channel)
}

fn message(text: &str, count: u32) -> Message {
    Message {
        text: text.into(),
        count,
    }
}

/// Runs every call kind and returns what came back, in comparable form.
async fn exercise(mut client: EchoClient<Channel>) -> Vec<String> {
    let mut seen = Vec::new();
    let unary = client.unary(message("hi", 41)).await.unwrap();
    seen.push(format!(
        "unary {:?} served-by={:?}",
        unary.get_ref(),
        unary.metadata().get("x-served-by")
    ));

    let failed = client.unary(message("fail", 0)).await.unwrap_err();
    seen.push(format!("error {:?} {}", failed.code(), failed.message()));

    let mut stream = client
        .server_stream(message("item", 5))
        .await
        .unwrap()
        .into_inner();
    while let Some(item) = stream.message().await.unwrap() {
        seen.push(format!("server-stream {item:?}"));
    }

    let outgoing = tokio_stream::iter((0..4).map(|i| message(&format!("part{i}"), i)));
    let joined = client.client_stream(outgoing).await.unwrap();
    seen.push(format!("client-stream {:?}", joined.get_ref()));

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        tx.send(message(&format!("ping{i}"), i)).await.unwrap();
        let reply = replies.message().await.unwrap().expect("bidi reply");
        seen.push(format!("bidi {reply:?}"));
    }
    drop(tx);
    assert!(
        replies.message().await.unwrap().is_none(),
        "bidi stream ends with OK status"
    );
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn every_grpc_call_kind_matches_a_direct_call() {
    let (service, _task) = start_grpc().await;
    let mesh = L7Mesh::start(&[service], "detect", None).await;
    let direct = exercise(client(service).await).await;
    let proxied = exercise(client(mesh.entry()).await).await;
    assert_eq!(direct.len(), 1 + 1 + 5 + 1 + 3);
    assert_eq!(proxied, direct);
    assert!(direct[1].contains("FailedPrecondition"), "{direct:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_callers_get_grpc_statuses_from_the_proxy() {
    // An application port where nothing listens.
    let nobody = tessera_tests::local(tessera_tests::free_port());
    let mesh = L7Mesh::start(&[nobody], "grpc", None).await;
    let mut client = client(mesh.entry()).await;
    let status = client.unary(message("x", 0)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "application-unavailable");
}
