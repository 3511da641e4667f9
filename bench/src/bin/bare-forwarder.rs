//! The floor: hyper-util server, pooled hyper-util client, round robin, nothing else.
//! Usage: bare-forwarder LISTEN_PORT UPSTREAM...

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::uri::{Authority, Scheme, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .and_then(|p| p.parse().ok())
        .expect("usage: bare-forwarder PORT UPSTREAM...");
    let upstreams: Arc<Vec<Authority>> =
        Arc::new(args.map(|a| a.parse().expect("host:port")).collect());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let h1: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build(conn.clone());
        let h2: Client<_, Incoming> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(conn);
        let next = Arc::new(AtomicUsize::new(0));
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            let (h1, h2, next, ups) = (h1.clone(), h2.clone(), next.clone(), upstreams.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                    let ep = ups[next.fetch_add(1, Ordering::Relaxed) % ups.len()].clone();
                    let pq = req
                        .uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| "/".parse().unwrap());
                    *req.uri_mut() = Uri::builder()
                        .scheme(Scheme::HTTP)
                        .authority(ep)
                        .path_and_query(pq)
                        .build()
                        .unwrap();
                    if req.version() == http::Version::HTTP_2 {
                        h2.request(req)
                    } else {
                        h1.request(req)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}
