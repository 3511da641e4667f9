//! Trace-context headers, one `name: value` a line: never a panic; and whatever a
//! request's headers yield, written in any set of formats over those same headers
//! and read again, is the same trace id, span id and sampling decision.
#![no_main]

use ferry_policy::Formats;
use ferry_telemetry::propagation::{extract, inject};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const EACH: [Formats; 4] = [
    Formats::W3C,
    Formats::B3,
    Formats::B3_MULTI,
    Formats::JAEGER,
];

/// The headers each format reads, to reach every format's parser: `extract` stops at
/// the first format that parses.
const GROUPS: [&[&str]; 4] = [
    &["traceparent", "tracestate"],
    &["b3"],
    &[
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
    ],
    &["uber-trace-id"],
];

fuzz_target!(|data: &[u8]| {
    let mut all = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            all.append(n, v);
        }
    }
    let alone = GROUPS.map(|names| {
        let mut h = HeaderMap::new();
        for (n, v) in &all {
            if names.contains(&n.as_str()) {
                h.append(n, v.clone());
            }
        }
        h
    });

    // The outgoing span's parent, as the proxy passes it, or none.
    let with_parent = data.len().is_multiple_of(2);
    for h in std::iter::once(&all).chain(&alone) {
        let Some(p) = extract(h) else {
            continue;
        };
        let sampled = p.sampled.unwrap_or(false);
        let parent = with_parent.then_some(p.span_id);
        for bits in 1..16u8 {
            let formats = (0..4)
                .filter(|i| bits & (1 << i) != 0)
                .fold(Formats::NONE, |f, i| f | EACH[i]);
            let mut out = h.clone();
            inject(&mut out, formats, p.trace_id, p.span_id, parent, sampled);
            let q = extract(&out)
                .unwrap_or_else(|| panic!("{formats} written from {p:?} does not read back"));
            assert_eq!(
                (q.trace_id, q.span_id, q.sampled),
                (p.trace_id, p.span_id, Some(sampled)),
                "{formats} written from {p:?} over {h:?} reads back different: {out:?}"
            );
        }
    }
});
