//! A fast upstream: `hello world` over HTTP/1.1 or h2c, and a fixed gRPC reply (with
//! `grpc-status: 0` trailers) for `application/grpc` requests.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A length-prefixed protobuf message: field 1 = "pong".
const GRPC_REPLY: &[u8] = &[0, 0, 0, 0, 6, 0x0a, 4, b'p', b'o', b'n', b'g'];

type GrpcBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

async fn handle(
    req: Request<Incoming>,
) -> Result<Response<Either<Full<Bytes>, GrpcBody>>, hyper::Error> {
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Read the request fully, as a real server would.
    let _ = req.into_body().collect().await?;
    if !grpc {
        return Ok(Response::new(Either::Left(Full::new(Bytes::from_static(
            b"hello world\n",
        )))));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(GRPC_REPLY))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut resp = Response::new(Either::Right(StreamBody::new(futures::stream::iter(
        frames,
    ))));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    Ok(resp)
}

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: bench-upstream PORT");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), hyper::service::service_fn(handle))
                    .await;
            });
        }
    });
}
