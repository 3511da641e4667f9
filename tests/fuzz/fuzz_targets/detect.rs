//! Protocol detection from a connection's first bytes: never a panic; a verdict, once
//! given, holds however many more bytes come (detection stops at the first one); a
//! possible HTTP/2 preface is never opaque; `GET ` is HTTP/1. Then the same bytes
//! through `detect()` over an in-memory stream, in small chunks, and replayed whole.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use ferry_proxy::detect::{Prefixed, Protocol, classify_prefix, detect};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// One runtime for all inputs: building one per input would dominate the run.
static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
});

fuzz_target!(|data: &[u8]| {
    let verdict = classify_prefix(data);
    // Every prefix, not only the whole: detection decides at whichever read boundary
    // first gives a verdict. Bounded, as no verdict waits past the preface's length.
    for n in 0..data.len().min(64) {
        if let Some(p) = classify_prefix(&data[..n]) {
            assert_eq!(verdict, Some(p), "{:?} then {:?}", &data[..n], data);
        }
    }
    if H2_PREFACE.starts_with(data) && data.len() < H2_PREFACE.len() {
        assert_eq!(
            verdict, None,
            "a strict prefix of the preface waits for more"
        );
    }
    if data.starts_with(H2_PREFACE) {
        assert_eq!(verdict, Some(Protocol::Http2));
    }
    if data.starts_with(b"GET ") {
        assert_eq!(verdict, Some(Protocol::Http1));
    }

    RUNTIME.block_on(async {
        // The first byte picks the pipe's size, so reads split the input differently.
        let chunk = 1 + usize::from(data.first().copied().unwrap_or(0) % 32);
        let (mut client, mut server) = tokio::io::duplex(chunk);
        let write = async move {
            client.write_all(data).await.expect("the pipe is open");
            // Dropping the client ends the stream.
        };
        let read = async {
            // Long timeouts: the writer never stalls, so none may fire.
            let long = Duration::from_secs(3600);
            let (p, buf) = detect(&mut server, long, long)
                .await
                .expect("an in-memory stream does not fail");
            let first = buf.to_vec();
            let mut replayed = Vec::new();
            Prefixed::new(buf, &mut server)
                .read_to_end(&mut replayed)
                .await
                .expect("replay");
            (p, first, replayed)
        };
        let (_, (p, first, replayed)) = tokio::join!(write, read);
        // Undecided at the end of the stream is opaque.
        assert_eq!(p, verdict.unwrap_or(Protocol::Opaque));
        assert!(data.starts_with(&first), "detection read what was sent");
        assert_eq!(replayed, data, "the proxied stream is what the client sent");
    });
});
