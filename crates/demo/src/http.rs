//! The HTTP upstream: HTTP/1.1 keep-alive and h2c, a handful of routes for tests.
//!
//! `GET /` says hello with the upstream's name; `/delay[/...]?ms=N` answers after N ms;
//! `/status/<code>` answers that status; `POST /echo` returns the body; `/headers` returns
//! the request headers as a JSON object. Every answer carries `x-upstream: <name>`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A running HTTP upstream: its address and how many requests it has answered.
#[derive(Clone)]
pub struct HttpUpstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
}

impl HttpUpstream {
    /// Serves on 127.0.0.1 with a fresh port, in the background.
    pub async fn start(name: &str) -> std::io::Result<HttpUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(Arc::from(name), listener, hits.clone()));
        Ok(HttpUpstream { addr, hits })
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// Serves HTTP on `listener` until the process ends.
pub async fn serve_http(name: String, listener: TcpListener) -> std::io::Result<()> {
    run(Arc::from(name), listener, Arc::default()).await
}

async fn run(name: Arc<str>, listener: TcpListener, hits: Arc<AtomicU64>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (name, hits) = (name.clone(), hits.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                hits.fetch_add(1, Ordering::Relaxed);
                handle(name.clone(), req)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    name: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let (status, body) = match path.as_str() {
        "/" => (StatusCode::OK, Bytes::from(format!("hello from {name}\n"))),
        // Any path under /delay, so route-level policy can be tested on slow paths.
        p if p == "/delay" || p.starts_with("/delay/") => {
            let ms = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (
                StatusCode::OK,
                Bytes::from(format!("hello from {name} after {ms}ms\n")),
            )
        }
        "/echo" => (StatusCode::OK, req.into_body().collect().await?.to_bytes()),
        "/headers" => {
            let map: BTreeMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            (
                StatusCode::OK,
                Bytes::from(serde_json::to_vec(&map).expect("a map serialises")),
            )
        }
        p => match p
            .strip_prefix("/status/")
            .and_then(|c| c.parse::<u16>().ok())
        {
            Some(code) => (
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
                Bytes::from(format!("status {code} from {name}\n")),
            ),
            None => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
        },
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("x-upstream", name.parse().expect("names are header-safe"));
    Ok(resp)
}

/// One GET over HTTP/1.1 on a fresh connection; the body, or an error naming the status.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Full::<Bytes>::default())?;
    let resp = tx.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    anyhow::ensure!(status.is_success(), "{status}: {}", text.trim());
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_with_its_name_and_counts() {
        let up = HttpUpstream::start("a").await.unwrap();
        assert_eq!(http_get(up.addr, "/").await.unwrap(), "hello from a\n");
        let err = http_get(up.addr, "/status/503").await.unwrap_err();
        assert!(err.to_string().starts_with("503"), "{err}");
        assert_eq!(up.hits(), 2);
        let headers: BTreeMap<String, String> =
            serde_json::from_str(&http_get(up.addr, "/headers").await.unwrap()).unwrap();
        assert_eq!(headers["host"], up.addr.to_string());
        assert_eq!(
            http_get(up.addr, "/delay/x?ms=10").await.unwrap(),
            "hello from a after 10ms\n"
        );
        assert!(http_get(up.addr, "/nowhere").await.is_err());
    }

    /// Keep-alive HTTP/1.1: POST bodies come back intact, every answer is labelled.
    #[tokio::test]
    async fn echoes_bodies_on_one_connection() {
        let up = HttpUpstream::start("b").await.unwrap();
        let stream = tokio::net::TcpStream::connect(up.addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        for n in [0usize, 1, 100_000] {
            let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            tx.ready().await.unwrap();
            let req = Request::post("/echo")
                .header(http::header::HOST, "b")
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.headers()["x-upstream"], "b");
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), body);
        }
        assert_eq!(up.hits(), 3);
    }

    #[tokio::test]
    async fn speaks_h2c_with_prior_knowledge() {
        let up = HttpUpstream::start("c").await.unwrap();
        let stream = tokio::net::TcpStream::connect(up.addr).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://c/")
            .body(Full::<Bytes>::default())
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "hello from c\n"
        );
    }
}
