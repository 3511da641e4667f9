//! Abuse through the real sidecar: HTTP/2 floods and resets crafted frame by frame, a
//! reader that never opens its window, oversized header lists, and HTTP/1 request
//! smuggling shapes. After every attack the proxy still answers a normal request on a
//! new connection, and its peak RSS over the attack stays within a budget.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_demo::HttpUpstream;
use http_body_util::{BodyExt, Full};
use support::{Conn, Ferry, proc_status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;

/// How much the proxy's peak RSS may grow over one attack.
const RSS_BUDGET_KIB: u64 = 64 * 1024;

/// A request hidden in a body by ambiguous framing: a 418 answer means it got through.
const SMUGGLED: &str = "GET /status/418 HTTP/1.1\r\nHost: web\r\n\r\n";

fn policy(up: SocketAddr) -> String {
    format!(
        "admin: 127.0.0.1:0\nheader-read-timeout: 500ms\nlisteners: [{{name: web, bind: \"127.0.0.1:0\", service: web}}]\n\
         services:\n  web:\n    endpoints: [\"{up}\"]\n"
    )
}

/// An upstream, the proxy in front of it, and one request through it, so the baseline
/// RSS includes a warm runtime and a pooled upstream connection.
async fn start() -> (HttpUpstream, Ferry) {
    let up = HttpUpstream::start("a").await.unwrap();
    let f = Ferry::start(&policy(up.addr), &[], &[]);
    serves(&f).await;
    (up, f)
}

/// A normal HTTP/1.1 and a normal h2c request, each on a new connection, are answered
/// by the upstream.
async fn serves(f: &Ferry) {
    let web = f.addr("web");
    let h1 = timeout(Duration::from_secs(5), async {
        Conn::open(web).await.unwrap().get("/").await
    })
    .await
    .expect("an HTTP/1.1 request in time");
    assert_eq!(h1.unwrap(), (200, "hello from a\n".to_string()));
    let h2 = timeout(Duration::from_secs(5), async {
        let mut tx = support::h2c(web).await;
        let req = hyper::Request::get("http://web/")
            .body(Full::<Bytes>::default())
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    })
    .await
    .expect("an h2c request in time");
    assert_eq!(h2, (200, Bytes::from("hello from a\n")));
}

/// The proxy's memory over one attack: RSS before, and the peak (VmHWM) after.
struct Mem {
    pid: u32,
    base: u64,
}

impl Mem {
    fn start(f: &Ferry) -> Mem {
        let pid = f.child.id();
        // Resets the peak to the current RSS, so VmHWM later is this attack's peak.
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        Mem {
            pid,
            base: proc_status(pid, "VmRSS"),
        }
    }

    /// Asserts the peak grew less than `budget` KiB.
    fn check(&self, case: &str, budget: u64) {
        let peak = proc_status(self.pid, "VmHWM");
        let now = proc_status(self.pid, "VmRSS");
        let growth = peak.saturating_sub(self.base);
        eprintln!(
            "{case}: RSS {} KiB before, peak {peak} KiB, {now} KiB after: peak growth {growth} KiB",
            self.base
        );
        assert!(
            growth < budget,
            "{case}: RSS grew {growth} KiB, over the {budget} KiB budget"
        );
    }
}

// ---- HTTP/2 by hand (RFC 9113) ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const INITIAL_WINDOW_SIZE: u16 = 0x4;
const MAX_FRAME: usize = 16 * 1024;

fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    put_frame(&mut out, kind, flags, stream, payload);
    out
}

fn settings(values: &[(u16, u32)]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
        .collect()
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1).
fn hpack_int(out: &mut Vec<u8>, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(v as u8);
        return;
    }
    out.push(max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// One field as a literal without indexing with a new name, no Huffman (RFC 7541
/// section 6.2.2): the simplest encoding, and it leaves the decoder's table alone.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_int(out, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn request_block(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in [
        (":method", method),
        (":scheme", "http"),
        (":path", path),
        (":authority", "web"),
    ]
    .iter()
    .chain(extra)
    {
        literal(&mut out, k, v);
    }
    out
}

/// The `:status` of a response block, which h2 encodes first: a static-table index, or
/// a literal with name index 8 whose digits are Huffman-coded.
fn status_of(block: &[u8]) -> Option<u16> {
    let b = *block.first()?;
    match b {
        0x88..=0x8e => Some([200, 204, 206, 304, 400, 404, 500][usize::from(b - 0x88)]),
        0x08 | 0x18 | 0x48 => {
            let len = usize::from(*block.get(1)? & 0x7f);
            let s = block.get(2..2 + len)?;
            let digits = if block[1] & 0x80 != 0 {
                huffman_digits(s)?
            } else {
                String::from_utf8(s.to_vec()).ok()?
            };
            digits.parse().ok()
        }
        _ => None,
    }
}

/// Decodes Huffman-coded digits: '0'-'2' are 5-bit codes 0-2, '3'-'9' 6-bit codes
/// 0x19-0x1f (RFC 7541 appendix B); padding is all ones.
fn huffman_digits(s: &[u8]) -> Option<String> {
    let bits: Vec<u8> = s
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let take = |i: usize, n: usize| bits[i..i + n].iter().fold(0u8, |a, b| (a << 1) | b);
    let (mut i, mut out) = (0, String::new());
    while bits.len() - i >= 5 && !bits[i..].iter().all(|&b| b == 1) {
        let v5 = take(i, 5);
        if v5 <= 2 {
            out.push(char::from(b'0' + v5));
            i += 5;
            continue;
        }
        if bits.len() - i < 6 || !(0x19..=0x1f).contains(&take(i, 6)) {
            return None;
        }
        out.push(char::from(b'3' + take(i, 6) - 0x19));
        i += 6;
    }
    Some(out)
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// What the proxy sent on one connection, as the reader task saw it.
#[derive(Default)]
struct Seen {
    closed: AtomicBool,
    /// GOAWAY: last stream id, error code, debug data.
    goaway: Mutex<Option<(u32, u32, String)>>,
    /// RST_STREAM error codes by stream.
    resets: Mutex<HashMap<u32, u32>>,
    /// The `:status` of the first HEADERS on each stream (None: not decoded).
    statuses: Mutex<HashMap<u32, Option<u16>>>,
    /// Streams the proxy ended (END_STREAM).
    ended: Mutex<Vec<u32>>,
    data_bytes: AtomicU64,
    settings_acks: AtomicU64,
    /// Our send windows: the connection's and stream 1's (the only upload stream).
    conn_window: AtomicI64,
    stream_window: AtomicI64,
}

impl Seen {
    fn over(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.goaway.lock().unwrap().is_some()
    }

    fn goaway(&self) -> Option<(u32, u32, String)> {
        self.goaway.lock().unwrap().clone()
    }

    fn reset(&self, stream: u32) -> Option<u32> {
        self.resets.lock().unwrap().get(&stream).copied()
    }

    fn status(&self, stream: u32) -> Option<Option<u16>> {
        self.statuses.lock().unwrap().get(&stream).copied()
    }

    fn ended(&self, stream: u32) -> bool {
        self.ended.lock().unwrap().contains(&stream)
    }

    /// Waits up to `within` for `cond`.
    async fn wait(&self, within: Duration, cond: impl Fn(&Seen) -> bool) -> bool {
        let end = Instant::now() + within;
        while !cond(self) {
            if Instant::now() > end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// An h2c connection after the preface and the SETTINGS exchange: the write half, and
/// what a background task reads. The task acknowledges nothing and opens no window, so
/// each test decides how polite its client is.
async fn h2_connect(addr: SocketAddr, ours: &[(u16, u32)]) -> (OwnedWriteHalf, Arc<Seen>) {
    let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
    let mut out = PREFACE.to_vec();
    put_frame(&mut out, SETTINGS, 0, 0, &settings(ours));
    w.write_all(&out).await.unwrap();
    // The proxy's SETTINGS come first; acknowledge them as any client would.
    let mut stream_window = 65_535;
    loop {
        let f = timeout(Duration::from_secs(5), read_frame(&mut r))
            .await
            .expect("the proxy's SETTINGS in time")
            .expect("the proxy's SETTINGS");
        if f.kind == SETTINGS && f.flags & ACK == 0 {
            for kv in f.payload.chunks_exact(6) {
                if u16::from_be_bytes([kv[0], kv[1]]) == INITIAL_WINDOW_SIZE {
                    stream_window = u32::from_be_bytes([kv[2], kv[3], kv[4], kv[5]]);
                }
            }
            break;
        }
    }
    w.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
    let seen = Arc::new(Seen {
        conn_window: AtomicI64::new(65_535),
        stream_window: AtomicI64::new(i64::from(stream_window)),
        ..Seen::default()
    });
    tokio::spawn(read_all(r, seen.clone(), stream_window));
    (w, seen)
}

async fn read_all(mut r: OwnedReadHalf, seen: Arc<Seen>, mut initial_window: u32) {
    while let Some(f) = read_frame(&mut r).await {
        let end = f.flags & END_STREAM != 0;
        match f.kind {
            DATA => {
                seen.data_bytes
                    .fetch_add(f.payload.len() as u64, Ordering::Relaxed);
            }
            HEADERS => {
                seen.statuses
                    .lock()
                    .unwrap()
                    .entry(f.stream)
                    .or_insert_with(|| status_of(&f.payload));
            }
            RST_STREAM if f.payload.len() == 4 => {
                let code = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
                seen.resets.lock().unwrap().insert(f.stream, code);
            }
            SETTINGS if f.flags & ACK != 0 => {
                seen.settings_acks.fetch_add(1, Ordering::Relaxed);
            }
            SETTINGS => {
                // A new initial window moves the window of every open stream.
                for kv in f.payload.chunks_exact(6) {
                    if u16::from_be_bytes([kv[0], kv[1]]) == INITIAL_WINDOW_SIZE {
                        let v = u32::from_be_bytes([kv[2], kv[3], kv[4], kv[5]]);
                        seen.stream_window
                            .fetch_add(i64::from(v) - i64::from(initial_window), Ordering::Relaxed);
                        initial_window = v;
                    }
                }
            }
            GOAWAY if f.payload.len() >= 8 => {
                let last = u32::from_be_bytes(f.payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                let code = u32::from_be_bytes(f.payload[4..8].try_into().unwrap());
                let debug = String::from_utf8_lossy(&f.payload[8..]).into_owned();
                *seen.goaway.lock().unwrap() = Some((last, code, debug));
            }
            WINDOW_UPDATE if f.payload.len() == 4 => {
                let inc = i64::from(u32::from_be_bytes(f.payload[..4].try_into().unwrap()));
                match f.stream {
                    0 => seen.conn_window.fetch_add(inc, Ordering::Relaxed),
                    1 => seen.stream_window.fetch_add(inc, Ordering::Relaxed),
                    _ => 0,
                };
            }
            _ => {}
        }
        if end && matches!(f.kind, DATA | HEADERS) {
            seen.ended.lock().unwrap().push(f.stream);
        }
    }
    seen.closed.store(true, Ordering::Relaxed);
}

/// Writes `bytes` unless the proxy stopped reading (2 s) or closed; false then.
async fn send(w: &mut OwnedWriteHalf, bytes: &[u8]) -> bool {
    matches!(
        timeout(Duration::from_secs(2), w.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Sends `total` bytes on stream 1 in DATA frames of at most `frame_len`, as flow control
/// allows, the last with END_STREAM. Returns how many bytes went out before the proxy
/// closed, stopped granting window or `within` passed.
async fn upload(
    w: &mut OwnedWriteHalf,
    seen: &Seen,
    total: usize,
    frame_len: usize,
    within: Duration,
) -> usize {
    let end = Instant::now() + within;
    let chunk = vec![b'x'; frame_len];
    let mut sent = 0;
    while sent < total && Instant::now() < end {
        // Many frames per write: the point is the proxy's work per frame, not ours.
        let mut buf = Vec::with_capacity(64 * 1024);
        while sent < total && buf.len() < 64 * 1024 {
            let window = seen
                .conn_window
                .load(Ordering::Relaxed)
                .min(seen.stream_window.load(Ordering::Relaxed));
            if window <= 0 {
                break;
            }
            let n = frame_len.min(window as usize).min(total - sent);
            seen.conn_window.fetch_sub(n as i64, Ordering::Relaxed);
            seen.stream_window.fetch_sub(n as i64, Ordering::Relaxed);
            sent += n;
            let flags = if sent == total { END_STREAM } else { 0 };
            put_frame(&mut buf, DATA, flags, 1, &chunk[..n]);
        }
        if buf.is_empty() {
            if seen.over() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else if !send(w, &buf).await {
            break;
        }
    }
    sent
}

// ---- HTTP/2 cases ----

/// CVE-2023-44487: streams opened and cancelled at once cost the server a request each
/// while costing the client nothing. The proxy must refuse to go on long before 20,000.
#[tokio::test]
async fn h2_rapid_reset_is_cut_off() {
    const STREAMS: u32 = 20_000;
    let (up, f) = start().await;
    let before = up.hits();
    let mem = Mem::start(&f);
    let (mut w, seen) = h2_connect(f.addr("web"), &[]).await;
    let block = request_block("GET", "/", &[]);
    let started = Instant::now();
    let mut sent = 0;
    while sent < STREAMS && !seen.over() && started.elapsed() < Duration::from_secs(8) {
        let mut buf = Vec::new();
        for id in (sent..sent + 100).map(|i| 2 * i + 1) {
            put_frame(&mut buf, HEADERS, END_STREAM | END_HEADERS, id, &block);
            put_frame(&mut buf, RST_STREAM, 0, id, &8u32.to_be_bytes()); // CANCEL
        }
        if !send(&mut w, &buf).await {
            break;
        }
        sent += 100;
        // Let the reader see a GOAWAY between batches.
        tokio::task::yield_now().await;
    }
    seen.wait(Duration::from_secs(3), Seen::over).await;
    let hits = up.hits() - before;
    eprintln!(
        "rapid reset: sent {sent} streams in {:?}; goaway {:?}, closed {}; the upstream saw {hits}",
        started.elapsed(),
        seen.goaway(),
        seen.closed.load(Ordering::Relaxed)
    );
    assert!(seen.over(), "the connection got neither GOAWAY nor closed");
    assert!(sent < STREAMS, "all {STREAMS} streams were accepted");
    assert!(hits < 1000, "the upstream saw {hits} requests");
    serves(&f).await;
    mem.check("rapid reset", RSS_BUDGET_KIB);
}

/// Rapid reset that waits until the proxy has dispatched each batch before resetting
/// it. h2 only counts resets of streams not yet accepted, so nothing stops this: every
/// stream costs an upstream request (and, cancelled mid-flight, its HTTP/1 connection).
#[tokio::test]
async fn h2_reset_after_accept_is_cut_off() {
    const STREAMS: u32 = 20_000;
    let (up, f) = start().await;
    let before = up.hits();
    let mem = Mem::start(&f);
    let (mut w, seen) = h2_connect(f.addr("web"), &[]).await;
    let block = request_block("GET", "/delay?ms=50", &[]);
    let started = Instant::now();
    let mut sent = 0;
    while sent < STREAMS && !seen.over() && started.elapsed() < Duration::from_secs(8) {
        let mut heads = Vec::new();
        let mut resets = Vec::new();
        for id in (sent..sent + 100).map(|i| 2 * i + 1) {
            put_frame(&mut heads, HEADERS, END_STREAM | END_HEADERS, id, &block);
            put_frame(&mut resets, RST_STREAM, 0, id, &8u32.to_be_bytes());
        }
        if !send(&mut w, &heads).await {
            break;
        }
        // Reset only once the upstream has the batch: accepted and in flight.
        let want = before + u64::from(sent) + 100;
        support::eventually(Duration::from_secs(1), || async { up.hits() >= want }).await;
        if !send(&mut w, &resets).await {
            break;
        }
        sent += 100;
    }
    seen.wait(Duration::from_secs(3), Seen::over).await;
    let hits = up.hits() - before;
    eprintln!(
        "reset after accept: sent {sent} streams in {:?}; goaway {:?}, closed {}; the upstream saw {hits}",
        started.elapsed(),
        seen.goaway(),
        seen.closed.load(Ordering::Relaxed)
    );
    assert!(seen.over(), "the connection got neither GOAWAY nor closed");
    assert!(hits < 1000, "the upstream saw {hits} requests");
    serves(&f).await;
    mem.check("reset after accept", RSS_BUDGET_KIB);
}

/// CVE-2024-27316 and kin: a header block that never ends must not be buffered forever.
#[tokio::test]
async fn h2_continuation_flood_is_cut_off_early() {
    const LIMIT: usize = 1024 * 1024;
    let (up, f) = start().await;
    let before = up.hits();
    let mem = Mem::start(&f);
    let (mut w, seen) = h2_connect(f.addr("web"), &[]).await;
    let head = request_block("GET", "/", &[]);
    assert!(send(&mut w, &frame(HEADERS, END_STREAM, 1, &head)).await);
    let mut pad = Vec::new();
    literal(&mut pad, "x-pad", &"a".repeat(1000));
    let mut sent = head.len();
    let mut frames = 0;
    while sent < LIMIT + 64 * 1024 && !seen.over() {
        if !send(&mut w, &frame(CONTINUATION, 0, 1, &pad)).await {
            break;
        }
        sent += pad.len();
        frames += 1;
        // Paced, so what we count is what the proxy accepted before it objected, not
        // what the kernel buffered.
        if frames % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    seen.wait(Duration::from_secs(3), Seen::over).await;
    eprintln!(
        "continuation flood: {frames} CONTINUATION frames, {sent} bytes of header block sent; goaway {:?}, closed {}",
        seen.goaway(),
        seen.closed.load(Ordering::Relaxed)
    );
    assert!(seen.over(), "the connection got neither GOAWAY nor closed");
    assert!(
        sent < LIMIT,
        "{sent} bytes of one header block went in unchallenged"
    );
    assert_eq!(
        up.hits(),
        before,
        "the endless request reached the upstream"
    );
    serves(&f).await;
    mem.check("continuation flood", RSS_BUDGET_KIB);
}

/// 100,000 one-byte DATA frames on a POST: each costs the server a frame's bookkeeping
/// for one byte of payload. Served in full or cut off, memory stays bounded.
#[tokio::test]
async fn h2_tiny_data_frames_are_bounded() {
    const FRAMES: usize = 100_000;
    let (_up, f) = start().await;
    let mem = Mem::start(&f);
    // Windows wide open for the echo back, so only the upload is under test.
    let (mut w, seen) = h2_connect(f.addr("web"), &[(INITIAL_WINDOW_SIZE, 1 << 24)]).await;
    let mut out = frame(WINDOW_UPDATE, 0, 0, &(1u32 << 24).to_be_bytes());
    put_frame(
        &mut out,
        HEADERS,
        END_HEADERS,
        1,
        &request_block("POST", "/echo", &[]),
    );
    assert!(send(&mut w, &out).await);
    let started = Instant::now();
    let sent = upload(&mut w, &seen, FRAMES, 1, Duration::from_secs(8)).await;
    let took = started.elapsed();
    let done = seen
        .wait(Duration::from_secs(5), |s| {
            s.ended(1) || s.reset(1).is_some() || s.over()
        })
        .await;
    let echoed = seen.data_bytes.load(Ordering::Relaxed);
    eprintln!(
        "tiny DATA frames: {sent} of {FRAMES} sent in {took:?}; status {:?}, {echoed} bytes echoed, ended {}, reset {:?}, goaway {:?}, closed {}",
        seen.status(1),
        seen.ended(1),
        seen.reset(1),
        seen.goaway(),
        seen.closed.load(Ordering::Relaxed)
    );
    assert!(done, "the POST neither finished nor was cut off");
    if seen.ended(1) {
        assert_eq!(
            (seen.status(1), echoed),
            (Some(Some(200)), FRAMES as u64),
            "served, so in full"
        );
    }
    serves(&f).await;
    mem.check("tiny DATA frames", RSS_BUDGET_KIB);
}

/// 10,000 SETTINGS frames without waiting for a single ACK.
#[tokio::test]
async fn h2_settings_flood_is_bounded() {
    const FLOOD: usize = 10_000;
    let (up, f) = start().await;
    let mem = Mem::start(&f);
    let (mut w, seen) = h2_connect(f.addr("web"), &[]).await;
    // Each carries a value, so each must be applied and acknowledged.
    let one = frame(SETTINGS, 0, 0, &settings(&[(INITIAL_WINDOW_SIZE, 65_535)]));
    let mut sent = 0;
    while sent < FLOOD && !seen.over() {
        if !send(&mut w, &one.repeat(500)).await {
            break;
        }
        sent += 500;
    }
    seen.wait(Duration::from_secs(5), |s| {
        s.over() || s.settings_acks.load(Ordering::Relaxed) >= sent as u64
    })
    .await;
    let acks = seen.settings_acks.load(Ordering::Relaxed);
    // Still open: the connection must still serve.
    let survived = !seen.over();
    if survived {
        let hits = up.hits();
        let mut out = frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1,
            &request_block("GET", "/", &[]),
        );
        put_frame(&mut out, WINDOW_UPDATE, 0, 0, &1000u32.to_be_bytes());
        assert!(send(&mut w, &out).await);
        assert!(
            seen.wait(Duration::from_secs(5), |s| s.ended(1)).await,
            "no answer after the flood"
        );
        assert_eq!(seen.status(1), Some(Some(200)));
        assert_eq!(up.hits(), hits + 1);
    }
    eprintln!(
        "settings flood: {sent} SETTINGS sent, {acks} ACKs; goaway {:?}, closed {}, survived {survived}",
        seen.goaway(),
        seen.closed.load(Ordering::Relaxed)
    );
    serves(&f).await;
    mem.check("settings flood", RSS_BUDGET_KIB);
}

/// A client that starts a download of `body` bytes (an echo of its upload) and never
/// opens its window: its stream is stuck once the first 64 KiB came down.
async fn stuck_download(web: SocketAddr, body: usize) -> (OwnedWriteHalf, Arc<Seen>) {
    // Default windows (64 KiB) and never a WINDOW_UPDATE from us.
    let (mut w, seen) = h2_connect(web, &[]).await;
    let len = body.to_string();
    let block = request_block("POST", "/echo", &[("content-length", &len)]);
    assert!(send(&mut w, &frame(HEADERS, END_HEADERS, 1, &block)).await);
    // The echo upstream answers once it has the whole body.
    let sent = upload(&mut w, &seen, body, MAX_FRAME, Duration::from_secs(20)).await;
    assert_eq!(sent, body, "the upload stalled");
    assert!(
        seen.wait(Duration::from_secs(10), |s| s
            .data_bytes
            .load(Ordering::Relaxed)
            >= 65_535)
            .await,
        "the response never filled our window"
    );
    assert_eq!(seen.status(1), Some(Some(200)));
    (w, seen)
}

/// A client downloads a large response and never opens its window: the proxy must hold
/// back, not read the whole body from the upstream into memory.
#[tokio::test]
async fn h2_slow_reader_does_not_make_the_proxy_buffer_the_body() {
    const BODY: usize = 64 * 1024 * 1024;
    let (_up, f) = start().await;
    let mem = Mem::start(&f);
    let started = Instant::now();
    let (w, seen) = stuck_download(f.addr("web"), BODY).await;
    // Time for the proxy to pull whatever it would from the upstream.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got = seen.data_bytes.load(Ordering::Relaxed);
    eprintln!(
        "slow reader: {BODY} bytes up, {got} bytes down in {:?}",
        started.elapsed()
    );
    assert_eq!(got, 65_535, "more than our window came down");
    // The whole body would be 64 MiB. A stuck stream may hold up to a flow-control
    // window in the proxy, and hyper's adaptive window grows to 16 MiB at most.
    mem.check("slow reader", 24 * 1024);
    // Gone, so its stuck upstream stream goes too (see the next test for why).
    drop(w);
    serves(&f).await;
}

/// While one client's download is stuck, another client's h2 request to the same
/// upstream must go through. The proxy multiplexes both on one pooled h2 connection
/// to the upstream; with adaptive windows the stuck stream's window is as large as the
/// connection's, so the upstream can send nothing more on any stream.
#[tokio::test]
async fn h2_slow_reader_does_not_stall_other_clients() {
    // Over hyper's 16 MiB window limit, so the download really is stuck in the proxy.
    const BODY: usize = 32 * 1024 * 1024;
    let (_up, f) = start().await;
    let web = f.addr("web");
    let (_w, seen) = stuck_download(web, BODY).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Larger than any slack the connection window might have.
    let body = Bytes::from(vec![b'y'; 256 * 1024]);
    let other = timeout(Duration::from_secs(5), async {
        let mut tx = support::h2c(web).await;
        let req = hyper::Request::post("http://web/echo")
            .body(Full::new(body.clone()))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    })
    .await;
    eprintln!(
        "slow reader beside another client: stuck at {} bytes; the other got {:?} bytes",
        seen.data_bytes.load(Ordering::Relaxed),
        other.as_ref().map(Bytes::len)
    );
    assert_eq!(
        other.expect("the other client's echo stalled behind the stuck download"),
        body
    );
}

/// A request whose header list is larger than the 64 KiB the proxy advertises.
#[tokio::test]
async fn h2_header_list_over_64k_is_refused() {
    let (up, f) = start().await;
    let before = up.hits();
    let mem = Mem::start(&f);
    let (mut w, seen) = h2_connect(f.addr("web"), &[]).await;
    let big = "a".repeat(4000);
    let names: Vec<String> = (0..20).map(|i| format!("x-big-{i}")).collect();
    let extra: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), big.as_str())).collect();
    // About 80 KiB as the header list counts it (name + value + 32 per field).
    let block = request_block("GET", "/headers", &extra);
    let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let last = if i + 1 == chunks.len() {
            END_HEADERS
        } else {
            0
        };
        if i == 0 {
            put_frame(&mut out, HEADERS, END_STREAM | last, 1, c);
        } else {
            put_frame(&mut out, CONTINUATION, last, 1, c);
        }
    }
    assert!(send(&mut w, &out).await);
    seen.wait(Duration::from_secs(5), |s| {
        s.ended(1) || s.reset(1).is_some() || s.over()
    })
    .await;
    let status = seen.status(1);
    eprintln!(
        "header list over 64 KiB ({} bytes of block in {} frames): status {status:?}, reset {:?}, goaway {:?}",
        block.len(),
        chunks.len(),
        seen.reset(1),
        seen.goaway()
    );
    assert!(
        status == Some(Some(431)) || (status.is_none() && (seen.reset(1).is_some() || seen.over())),
        "not refused: status {status:?}"
    );
    assert_eq!(up.hits(), before, "the request reached the upstream");
    serves(&f).await;
    mem.check("header list over 64 KiB", RSS_BUDGET_KIB);
}

/// Framing lies in h2, each hiding a request in the body: DATA longer than the
/// content-length, and a transfer-encoding field (forbidden in HTTP/2). Either would
/// smuggle the request past a proxy that re-framed the body for an HTTP/1 hop.
#[tokio::test]
async fn h2_framing_lies_are_refused_before_the_upstream() {
    let (up, f) = start().await;
    let mem = Mem::start(&f);
    for (case, extra, body) in [
        (
            "content-length shorter than DATA",
            ("content-length", "1"),
            format!("x{SMUGGLED}"),
        ),
        (
            "transfer-encoding: chunked",
            ("transfer-encoding", "chunked"),
            format!("0\r\n\r\n{SMUGGLED}"),
        ),
    ] {
        let before = up.hits();
        let (mut w, seen) = h2_connect(f.addr("web"), &[]).await;
        let mut out = frame(
            HEADERS,
            END_HEADERS,
            1,
            &request_block("POST", "/echo", &[extra]),
        );
        put_frame(&mut out, DATA, END_STREAM, 1, body.as_bytes());
        assert!(send(&mut w, &out).await);
        seen.wait(Duration::from_secs(5), |s| {
            s.ended(1) || s.reset(1).is_some() || s.over()
        })
        .await;
        let hits = up.hits() - before;
        eprintln!(
            "h2 {case}: status {:?}, reset {:?}, goaway {:?}, upstream saw {hits}",
            seen.status(1),
            seen.reset(1),
            seen.goaway()
        );
        assert!(hits <= 1, "{case}: the upstream saw {hits} requests");
        assert!(
            seen.reset(1).is_some() || seen.over(),
            "{case}: not refused"
        );
        assert_ne!(seen.status(1), Some(Some(200)), "{case}: accepted");
    }
    // The pooled upstream connections carry nothing left over.
    for _ in 0..3 {
        serves(&f).await;
    }
    mem.check("h2 framing lies", RSS_BUDGET_KIB);
}

// ---- HTTP/1 cases ----

struct H1Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// Writes `bytes` on a new connection and reads until the proxy closes it or is quiet
/// for a second: the responses, and whether it closed.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (Vec<H1Response>, bool) {
    exchange_parts(addr, &[bytes]).await
}

/// Like [`exchange`], with a pause between the parts, so the proxy acts on each alone.
async fn exchange_parts(addr: SocketAddr, parts: &[&[u8]]) -> (Vec<H1Response>, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The proxy may have answered and closed already.
        if s.write_all(part).await.is_err() {
            break;
        }
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let closed = loop {
        match timeout(Duration::from_secs(1), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    (parse_responses(&buf), closed)
}

/// Responses framed by Content-Length (what the proxy sends), else up to the end.
fn parse_responses(mut buf: &[u8]) -> Vec<H1Response> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a response: {head}"));
        let len = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(buf.len() - end - 4);
        let rest = &buf[end + 4..];
        let len = len.min(rest.len());
        out.push(H1Response {
            status,
            body: rest[..len].to_vec(),
            head,
        });
        buf = &rest[len..];
    }
    out
}

/// Ambiguous framing: refused with 400, or read one way and then the connection closed
/// (RFC 9112 section 6.1); never the hidden request answered, never a second request
/// at the upstream.
#[tokio::test]
async fn h1_smuggling_shapes_are_refused_or_unambiguous() {
    let (up, f) = start().await;
    let web = f.addr("web");
    let mem = Mem::start(&f);
    let n = SMUGGLED.len();
    let chunked_then_smuggled = format!("0\r\n\r\n{SMUGGLED}");
    let post = |headers: &str, body: &str| {
        vec![format!(
            "POST /echo HTTP/1.1\r\nHost: web\r\n{headers}\r\n{body}"
        )]
    };
    let te_body = format!("{n:x}\r\n{SMUGGLED}\r\n0\r\n\r\n");
    let cl_te = format!("Content-Length: {}\r\n", chunked_then_smuggled.len());
    // (case, request in parts sent 200 ms apart, must be refused with 400)
    let mut cases: Vec<(String, Vec<String>, bool)> = vec![
        (
            "conflicting Content-Length".into(),
            post(
                &format!("Content-Length: 0\r\nContent-Length: {n}\r\n"),
                SMUGGLED,
            ),
            true,
        ),
        (
            "Content-Length list with two values".into(),
            post(&format!("Content-Length: 0, {n}\r\n"), SMUGGLED),
            true,
        ),
        (
            "Content-Length then Transfer-Encoding".into(),
            post(
                &format!("{cl_te}Transfer-Encoding: chunked\r\n"),
                &chunked_then_smuggled,
            ),
            false,
        ),
        (
            "Transfer-Encoding then Content-Length".into(),
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
                &te_body,
            ),
            false,
        ),
        (
            "Transfer-Encoding not chunked last".into(),
            post(
                "Transfer-Encoding: chunked, identity\r\nContent-Length: 0\r\n",
                &chunked_then_smuggled,
            ),
            true,
        ),
        (
            "obs-fold".into(),
            vec![format!(
                "GET /headers HTTP/1.1\r\nHost: web\r\nX-A: a\r\n folded\r\n\r\n{SMUGGLED}"
            )],
            true,
        ),
        (
            "obs-folded Transfer-Encoding".into(),
            post(
                &format!("{cl_te}Transfer-Encoding:\r\n chunked\r\n"),
                &chunked_then_smuggled,
            ),
            true,
        ),
    ];
    for size in ["zz", "-1", "1ffffffffffffffff", "fffffffffffffffffff"] {
        cases.push((
            format!("chunk size {size}"),
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("{size}\r\n{SMUGGLED}\r\n0\r\n\r\n"),
            ),
            false,
        ));
    }
    // The head and a good chunk first, the bad size later: the request is already on
    // its way to the upstream when the framing breaks.
    let mut late = post("Transfer-Encoding: chunked\r\n", "1\r\nx\r\n");
    late.push(format!("zz\r\n{SMUGGLED}\r\n0\r\n\r\n"));
    cases.push(("chunk size zz after a good chunk".into(), late, false));
    for (case, parts, must_400) in cases {
        let before = up.hits();
        let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        let (resps, closed) = exchange_parts(web, &parts).await;
        let hits = up.hits() - before;
        let statuses: Vec<u16> = resps.iter().map(|r| r.status).collect();
        let bodies: Vec<String> = resps
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect();
        eprintln!(
            "{case}: statuses {statuses:?}, closed {closed}, upstream saw {hits}; bodies {bodies:?}"
        );
        assert!(
            !statuses.contains(&418),
            "{case}: the hidden request was answered"
        );
        assert!(hits <= 1, "{case}: the upstream saw {hits} requests");
        assert!(
            closed,
            "{case}: the connection stayed open after ambiguous framing"
        );
        if must_400 {
            assert_eq!(statuses, [400], "{case}");
            assert_eq!(hits, 0, "{case}: forwarded");
        } else {
            assert_eq!(statuses.len(), 1, "{case}: {statuses:?}");
        }
    }
    // No pooled upstream connection was left holding half a request: the next requests
    // get their own answers.
    for _ in 0..3 {
        serves(&f).await;
    }
    mem.check("HTTP/1 smuggling shapes", RSS_BUDGET_KIB);
}

/// hyper's limit is 100 header fields. The proxy refuses 101 itself; it adds its own
/// fields (request id, trace context) when forwarding, so an upstream with the same
/// limit may refuse a request the proxy accepted, with a 431 the client gets as is.
#[tokio::test]
async fn h1_more_than_100_header_fields_are_refused() {
    let up = HttpUpstream::start("a").await.unwrap();
    // `void` forwards to a closed port: its 503 shows a request got past the parser.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let doc = format!(
        "admin: 127.0.0.1:0\nlisteners:\n  - {{name: web, bind: \"127.0.0.1:0\", service: web}}\n  - {{name: void, bind: \"127.0.0.1:0\", service: void}}\n\
         services:\n  web:\n    endpoints: [\"{}\"]\n  void:\n    endpoints: [\"{closed}\"]\n",
        up.addr
    );
    let f = Ferry::start(&doc, &[], &[]);
    serves(&f).await;
    let mem = Mem::start(&f);
    // `fields` header fields in all, Host and Connection included.
    let request = |path: &str, fields: usize| {
        let mut r = format!("GET {path} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n");
        for i in 2..fields {
            r.push_str(&format!("X-H-{i}: v\r\n"));
        }
        r + "\r\n"
    };
    let status = |resps: &[H1Response]| -> Vec<(u16, Option<String>)> {
        resps
            .iter()
            .map(|r| (r.status, header(&r.head, "x-ferry-error")))
            .collect()
    };
    let before = up.hits();
    let (at_limit, _) = exchange(f.addr("void"), request("/", 100).as_bytes()).await;
    let (over, closed) = exchange(f.addr("void"), request("/", 101).as_bytes()).await;
    let (at_limit, over) = (status(&at_limit), status(&over));
    // How many fields the proxy adds on the way, net of the Connection it drops.
    let (seen, _) = exchange(f.addr("web"), request("/headers", 50).as_bytes()).await;
    let added = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&seen[0].body)
        .unwrap()
        .len()
        - 50;
    let (fit, _) = exchange(f.addr("web"), request("/", 100 - added).as_bytes()).await;
    let (full, _) = exchange(f.addr("web"), request("/", 100).as_bytes()).await;
    let (fit, full) = (status(&fit), status(&full));
    eprintln!(
        "header fields: 100 {at_limit:?}, 101 {over:?} (closed {closed}); the proxy adds {added}: \
         {} through to the upstream {fit:?}, 100 {full:?}",
        100 - added
    );
    assert_eq!(
        at_limit,
        [(503, Some("connect-failed".to_string()))],
        "100 fields pass"
    );
    assert_eq!(over, [(431, None)], "101 fields are refused by the proxy");
    assert_eq!(fit, [(200, None)]);
    assert_eq!(full, [(431, None)], "the upstream's own limit");
    // /headers and the request that fit; none of the refused ones.
    assert_eq!(up.hits(), before + 2);
    serves(&f).await;
    mem.check("101 header fields", RSS_BUDGET_KIB);
}
