//! Starts the real `ferry` binary and small upstreams on loopback for the tests of this
//! crate.

#![allow(dead_code)]

pub mod controller;
pub mod kube;
pub mod netns;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value as Json;

/// Polls `cond` until it holds or `within` passes.
pub async fn eventually<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(
    within: Duration,
    mut cond: F,
) -> bool {
    let end = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

thread_local! {
    static CHILD_ENV: std::cell::RefCell<Vec<(String, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Adds a variable to the environment of the next `Ferry` started on this thread.
pub fn set_child_env(k: &str, v: &str) {
    CHILD_ENV.with(|e| e.borrow_mut().push((k.to_string(), v.to_string())));
}

pub fn clear_child_env() {
    CHILD_ENV.with(|e| e.borrow_mut().clear());
}

pub struct Ferry {
    pub child: Child,
    pub addrs: HashMap<String, SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl Ferry {
    /// Writes `policy` to `policy.yaml` in a fresh directory and runs
    /// `ferry proxy --config policy.yaml <extra>`, with `prefix` (e.g. `ip netns exec X`)
    /// in front when given.
    pub fn start(policy: &str, extra: &[&str], prefix: &[&str]) -> Ferry {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
        Self::start_in(dir, extra, prefix)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[&str], prefix: &[&str]) -> Ferry {
        Self::start_bin(dir, env!("CARGO_BIN_EXE_ferry"), extra, prefix)
    }

    pub fn start_bin(dir: tempfile::TempDir, bin: &str, extra: &[&str], prefix: &[&str]) -> Ferry {
        let config = dir.path().join("policy.yaml").display().to_string();
        let mut args = vec!["proxy", "--config", &config];
        args.extend_from_slice(extra);
        Self::run(dir, bin, &args, prefix)
    }

    /// Like [`Ferry::start`], with ferry's INFO log in `ferry.log` of its directory
    /// (read it with [`Ferry::log`]) rather than on the test's stderr.
    pub fn start_logged(policy: &str) -> Ferry {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
        let config = dir.path().join("policy.yaml").display().to_string();
        let log = std::fs::File::create(dir.path().join("ferry.log")).unwrap();
        let bin = env!("CARGO_BIN_EXE_ferry");
        Self::spawn(dir, bin, &["proxy", "--config", &config], &[], Some(log))
    }

    /// What ferry logged, when started with [`Ferry::start_logged`].
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("ferry.log")).unwrap_or_default()
    }

    /// Runs `prefix.. bin args..` and waits for `ferry: ready`.
    pub fn run(dir: tempfile::TempDir, bin: &str, args: &[&str], prefix: &[&str]) -> Ferry {
        Self::spawn(dir, bin, args, prefix, None)
    }

    fn spawn(
        dir: tempfile::TempDir,
        bin: &str,
        args: &[&str],
        prefix: &[&str],
        log: Option<std::fs::File>,
    ) -> Ferry {
        let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        argv.push(bin.to_string());
        argv.extend(args.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(&argv[0]);
        CHILD_ENV.with(|e| {
            for (k, v) in e.borrow().iter() {
                cmd.env(k, v);
            }
        });
        let level = match &log {
            Some(_) => "info".to_string(),
            None => std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        };
        let logged = log.is_some();
        let mut child = cmd
            .args(&argv[1..])
            .stdout(Stdio::piped())
            .stderr(log.map_or_else(Stdio::inherit, Stdio::from))
            .env("FERRY_LOG", level)
            .spawn()
            .expect("ferry starts");
        let mut addrs = HashMap::new();
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let mut ready = false;
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ferry: listening ") {
                let (name, addr) = rest.split_once(' ').unwrap();
                addrs.insert(name.to_string(), addr.parse().unwrap());
            }
            if line == "ferry: ready" {
                ready = true;
                break;
            }
        }
        assert!(
            ready,
            "ferry exited before it was ready{}",
            if logged {
                let log = std::fs::read_to_string(dir.path().join("ferry.log"));
                format!(":\n{}", log.unwrap_or_default())
            } else {
                String::new()
            }
        );
        // Keep draining stdout so ferry never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Ferry { child, addrs, dir }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs[name]
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub async fn admin(&self, method: &str, path: &str, body: &str) -> (u16, Json) {
        call(self.addr("admin"), method, path, body).await
    }

    pub async fn policy_version(&self) -> u64 {
        self.admin("GET", "/policy", "").await.1["version"]
            .as_u64()
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        let (_, body) = raw(self.addr("admin"), "GET", "/metrics", "").await;
        body
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`).
pub fn proc_status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// An address nothing answers on that nothing else can take while the test runs: a
/// socket bound to it but not listening (connects are refused). A port that was bound and
/// released can be handed to the next `bind(":0")`, such as one of ferry's own listeners,
/// and a service pointed at its own listener loops until it runs out of descriptors.
pub fn dead_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

/// A new HTTP/2 (h2c, prior knowledge) connection to `addr`, driven in the background.
pub async fn h2c<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// One HTTP/1.1 request on a new connection.
pub async fn raw(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

pub async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Json) {
    let (status, text) = raw(addr, method, path, body).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Json::String(text)),
    )
}

/// A keep-alive HTTP/1.1 connection for load.
pub struct Conn(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Conn {
    pub async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Conn(tx))
    }

    /// GET `path`: the status and the body, or an error for a broken connection.
    pub async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        self.get_with(path, &[]).await.map(|(s, _, b)| (s, b))
    }

    /// GET with extra headers: status, response headers and body.
    pub async fn get_with(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, hyper::HeaderMap, String), String> {
        self.request("GET", path, headers, Bytes::new()).await
    }

    /// POST `body` to `path`: the status and the body.
    pub async fn post(&mut self, path: &str, body: &str) -> Result<(u16, String), String> {
        let body = Bytes::copy_from_slice(body.as_bytes());
        self.request("POST", path, &[], body)
            .await
            .map(|(s, _, b)| (s, b))
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(u16, hyper::HeaderMap, String), String> {
        self.0.ready().await.map_err(|e| e.to_string())?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).unwrap();
        let resp = self.0.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// An upstream answering every request with its name; `/slow` waits 300 ms first.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
}

pub async fn upstream(name: &'static str) -> Upstream {
    upstream_on("127.0.0.1:0".parse().unwrap(), name).await
}

pub async fn upstream_on(bind: SocketAddr, name: &'static str) -> Upstream {
    upstream_delayed(bind, name, Duration::ZERO).await
}

/// Like [`upstream`], but every answer takes at least `delay`.
pub async fn slow_upstream(name: &'static str, delay: Duration) -> Upstream {
    upstream_delayed("127.0.0.1:0".parse().unwrap(), name, delay).await
}

async fn upstream_delayed(bind: SocketAddr, name: &'static str, delay: Duration) -> Upstream {
    let l = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Ordering::Relaxed);
                    async move {
                        tokio::time::sleep(delay).await;
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(name))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Upstream { addr, hits }
}

pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}
