//! HTTP/1.1 upgrades (WebSocket and the like), on either side: forwarded over a
//! connection of their own, then the two upgraded connections spliced.

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;

use crate::http::{Body, BoxError, ProxyError, boxed, strip_hop_by_hop};

/// Sends an upgrade request over a fresh HTTP/1.1 connection `io` and, when the other
/// side switches protocols, splices the two upgraded connections together.
pub(crate) async fn forward_upgrade<B, I>(
    mut request: Request<B>,
    io: I,
) -> Result<Response<Body>, ProxyError>
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let client_side = hyper::upgrade::on(&mut request);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|_| ProxyError::Unreachable)?;
    tokio::spawn(connection.with_upgrades());
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    parts.version = Version::HTTP_11;
    let mut response = sender
        .send_request(Request::from_parts(parts, boxed(body)))
        .await
        .map_err(|_| ProxyError::Reset)?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_side = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (Ok(client), Ok(server)) = tokio::join!(client_side, server_side) else {
                return;
            };
            let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
            let _ = crate::tcp::relay(&mut client, &mut server).await;
        });
    } else {
        strip_hop_by_hop(response.headers_mut(), false);
    }
    Ok(response.map(boxed))
}
