//! Trace-context header codecs: W3C `traceparent`, B3 (single and multi) and Jaeger
//! `uber-trace-id`. Small and allocation-light, since they run on every request.

use std::ops::Range;

use bytes::Bytes;
use ferry_policy::Formats;
use http::{HeaderMap, HeaderName, HeaderValue};

/// A trace context read from a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    /// `None` when the caller left the decision to us.
    pub sampled: Option<bool>,
}

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
const JAEGER: HeaderName = HeaderName::from_static("uber-trace-id");

fn hex_u128(s: &str) -> Option<u128> {
    (!s.is_empty() && s.len() <= 32)
        .then(|| u128::from_str_radix(s, 16).ok())
        .flatten()
        .filter(|v| *v != 0)
}

fn hex_u64(s: &str) -> Option<u64> {
    (!s.is_empty() && s.len() <= 16)
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
        .filter(|v| *v != 0)
}

fn w3c(v: &str) -> Option<Parent> {
    let mut p = v.trim().split('-');
    let (version, trace, span, flags) = (p.next()?, p.next()?, p.next()?, p.next()?);
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    if version == "00" && p.next().is_some() {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Parent {
        trace_id: hex_u128(trace)?,
        span_id: hex_u64(span)?,
        sampled: Some(flags & 1 == 1),
    })
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn b3_single(v: &str) -> Option<Parent> {
    let mut p = v.trim().split('-');
    let trace = hex_u128(p.next()?)?;
    let span = hex_u64(p.next()?)?;
    Some(Parent {
        trace_id: trace,
        span_id: span,
        sampled: p.next().and_then(b3_sampled),
    })
}

fn jaeger(v: &str) -> Option<Parent> {
    let v = v.trim().replace("%3A", ":").replace("%3a", ":");
    let mut p = v.split(':');
    let (trace, span, _parent, flags) = (p.next()?, p.next()?, p.next()?, p.next()?);
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Parent {
        trace_id: hex_u128(trace)?,
        span_id: hex_u64(span)?,
        sampled: Some(flags & 1 == 1),
    })
}

fn get<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The trace headers a request carries, found in one pass over its header names: on the
/// usual request, which has few of them, that is cheaper than a hashed lookup per name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Present(u16);

impl Present {
    const TRACEPARENT: u16 = 1;
    const TRACESTATE: u16 = 1 << 1;
    const B3: u16 = 1 << 2;
    const B3_MULTI: u16 = 1 << 3;
    const JAEGER: u16 = 1 << 4;
    const REQUEST_ID: u16 = 1 << 5;
    /// Every header [`inject`] rewrites or removes.
    const FOREIGN: u16 = Self::B3 | Self::B3_MULTI | Self::JAEGER;

    pub fn scan(h: &HeaderMap) -> Present {
        let mut p = 0;
        for k in h.keys() {
            p |= match k.as_str() {
                "traceparent" => Self::TRACEPARENT,
                "tracestate" => Self::TRACESTATE,
                "b3" => Self::B3,
                "x-b3-traceid" | "x-b3-spanid" | "x-b3-parentspanid" | "x-b3-sampled"
                | "x-b3-flags" => Self::B3_MULTI,
                "uber-trace-id" => Self::JAEGER,
                "x-request-id" => Self::REQUEST_ID,
                _ => 0,
            };
        }
        Present(p)
    }

    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }

    pub fn request_id(self) -> bool {
        self.has(Self::REQUEST_ID)
    }
}

/// The parent a request carries, in whichever format it uses (W3C first). Malformed
/// headers are ignored: the request starts a new trace.
pub fn extract(h: &HeaderMap) -> Option<Parent> {
    extract_present(h, Present::scan(h))
}

/// [`extract`], reading only the headers `present` says are there.
pub fn extract_present(h: &HeaderMap, present: Present) -> Option<Parent> {
    if present.has(Present::TRACEPARENT)
        && let Some(p) = get(h, &TRACEPARENT).and_then(w3c)
    {
        return Some(p);
    }
    if present.has(Present::B3)
        && let Some(p) = get(h, &B3).and_then(b3_single)
    {
        return Some(p);
    }
    if present.has(Present::B3_MULTI)
        && let (Some(t), Some(s)) = (get(h, &B3_TRACE), get(h, &B3_SPAN))
        && let (Some(trace_id), Some(span_id)) = (hex_u128(t), hex_u64(s))
    {
        let sampled = match get(h, &B3_FLAGS) {
            Some("1") => Some(true),
            _ => get(h, &B3_SAMPLED).and_then(b3_sampled),
        };
        return Some(Parent {
            trace_id,
            span_id,
            sampled,
        });
    }
    if present.has(Present::JAEGER) {
        return get(h, &JAEGER).and_then(jaeger);
    }
    None
}

/// Each byte as two lowercase hex digits: a table lookup a byte rather than a digit.
const PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    t
};

/// Header values of hex fields, written one after another into a fixed buffer (no
/// formatting machinery: this runs on every request) that the values' [`Bytes`] then
/// share: one allocation for a request's `x-request-id` and `traceparent`, and a clone
/// of either (the retry layer keeps a copy of the request's headers) is a reference
/// count.
struct Hex {
    buf: [u8; 128],
    len: usize,
    /// Where the value being written starts.
    start: usize,
}

impl Hex {
    fn new() -> Hex {
        Hex {
            buf: [0; 128],
            len: 0,
            start: 0,
        }
    }

    fn text(&mut self, t: &[u8]) -> &mut Hex {
        self.buf[self.len..self.len + t.len()].copy_from_slice(t);
        self.len += t.len();
        self
    }

    /// `v` as lowercase hex, zero-padded to `digits` (even).
    fn hex(&mut self, mut v: u128, digits: usize) -> &mut Hex {
        for pair in self.buf[self.len..self.len + digits].rchunks_exact_mut(2) {
            pair.copy_from_slice(&PAIRS[(v & 0xff) as usize]);
            v >>= 8;
        }
        self.len += digits;
        self
    }

    /// Ends the value being written: where it lies in the buffer.
    fn cut(&mut self) -> Range<usize> {
        let r = self.start..self.len;
        self.start = self.len;
        r
    }

    /// The buffer, for the values cut from it.
    fn share(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// The one value written.
    fn value(&mut self) -> HeaderValue {
        let owned = std::mem::replace(self, Hex::new());
        unique(owned.share())
    }
}

/// Marked sensitive: no other request carries this value, so HTTP/2 sends it as a
/// literal never indexed; in the HPACK tables of both ends it would only evict entries
/// that do repeat (`:path`, `content-type`).
fn unique(b: Bytes) -> HeaderValue {
    let mut v = HeaderValue::from_maybe_shared(b).expect("hex digits and separators");
    v.set_sensitive(true);
    v
}

impl AsRef<[u8]> for Hex {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A new random 128-bit request id, as 32 hex digits.
pub fn request_id() -> HeaderValue {
    Hex::new().hex(fastrand::u128(..), 32).value()
}

/// Rewrites `h` for the next hop: every known trace header removed, then each format of
/// `formats` written with `span_id` as the parent the next hop will see.
pub fn inject(
    h: &mut HeaderMap,
    formats: Formats,
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
    sampled: bool,
) {
    inject_present(
        h,
        Present::scan(h),
        formats,
        trace_id,
        span_id,
        parent,
        sampled,
        false,
    )
}

/// [`inject`], removing only the headers `present` says are there; with `request_id`,
/// also a new `x-request-id` (sharing `traceparent`'s allocation).
#[allow(clippy::too_many_arguments)]
pub fn inject_present(
    h: &mut HeaderMap,
    present: Present,
    formats: Formats,
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
    sampled: bool,
    request_id: bool,
) {
    if present.has(Present::FOREIGN) {
        for name in [
            &B3,
            &B3_TRACE,
            &B3_SPAN,
            &B3_PARENT,
            &B3_SAMPLED,
            &B3_FLAGS,
            &JAEGER,
        ] {
            h.remove(name);
        }
    }
    let (span, sampled_flag) = (span_id as u128, if sampled { b"1" } else { b"0" });
    if formats.contains(Formats::W3C) {
        let mut ids = Hex::new();
        let id = request_id.then(|| ids.hex(fastrand::u128(..), 32).cut());
        let tp = ids
            .text(b"00-")
            .hex(trace_id, 32)
            .text(b"-")
            .hex(span, 16)
            .text(if sampled { b"-01" } else { b"-00" })
            .cut();
        let ids = ids.share();
        if let Some(id) = id {
            h.insert(X_REQUEST_ID, unique(ids.slice(id)));
        }
        h.insert(TRACEPARENT, unique(ids.slice(tp)));
    } else {
        if request_id {
            h.insert(X_REQUEST_ID, self::request_id());
        }
        if present.has(Present::TRACEPARENT | Present::TRACESTATE) {
            h.remove(&TRACEPARENT);
            h.remove(&TRACESTATE);
        }
    }
    if formats.contains(Formats::B3) {
        let mut v = Hex::new();
        v.hex(trace_id, 32)
            .text(b"-")
            .hex(span, 16)
            .text(b"-")
            .text(sampled_flag);
        if let Some(p) = parent {
            v.text(b"-").hex(p as u128, 16);
        }
        h.insert(B3, v.value());
    }
    if formats.contains(Formats::B3_MULTI) {
        h.insert(B3_TRACE, Hex::new().hex(trace_id, 32).value());
        h.insert(B3_SPAN, Hex::new().hex(span, 16).value());
        h.insert(
            B3_SAMPLED,
            HeaderValue::from_static(if sampled { "1" } else { "0" }),
        );
        if let Some(p) = parent {
            h.insert(B3_PARENT, Hex::new().hex(p as u128, 16).value());
        }
    }
    if formats.contains(Formats::JAEGER) {
        let v = Hex::new()
            .hex(trace_id, 32)
            .text(b":")
            .hex(span, 16)
            .text(b":")
            .hex(parent.unwrap_or(0) as u128, 16)
            .text(b":")
            .text(sampled_flag)
            .value();
        h.insert(JAEGER, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;
    const S: u64 = 0x00f067aa0ba902b7;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn reads_every_format() {
        let want = |sampled| {
            Some(Parent {
                trace_id: T,
                span_id: S,
                sampled,
            })
        };
        assert_eq!(
            extract(&headers(&[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            )])),
            want(Some(true))
        );
        assert_eq!(
            extract(&headers(&[(
                "b3",
                "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0"
            )])),
            want(Some(false))
        );
        assert_eq!(
            extract(&headers(&[(
                "b3",
                "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
            )])),
            want(None)
        );
        assert_eq!(
            extract(&headers(&[
                ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
                ("x-b3-sampled", "1")
            ])),
            want(Some(true))
        );
        assert_eq!(
            extract(&headers(&[(
                "uber-trace-id",
                "4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:0:1"
            )])),
            want(Some(true))
        );
        assert_eq!(
            extract(&headers(&[(
                "uber-trace-id",
                "4bf92f3577b34da6a3ce929d0e0e4736%3A00f067aa0ba902b7%3A0%3A0"
            )])),
            want(Some(false))
        );
        // 64-bit B3 trace ids are accepted.
        assert_eq!(
            extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-1")]))
                .unwrap()
                .trace_id,
            0xa3ce929d0e0e4736
        );
    }

    #[test]
    fn hex_fields_match_the_formatter() {
        for _ in 0..1000 {
            let (t, s) = (fastrand::u128(..), fastrand::u64(..));
            let v = Hex::new()
                .hex(t, 32)
                .text(b":")
                .hex(s as u128, 16)
                .text(b":1")
                .value();
            assert_eq!(v, format!("{t:032x}:{s:016x}:1").as_str());
        }
        assert_eq!(request_id().len(), 32);
    }

    #[test]
    fn malformed_headers_are_ignored() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(extract(&headers(&[("traceparent", bad)])), None, "{bad}");
        }
        assert_eq!(extract(&headers(&[("uber-trace-id", "nope")])), None);
    }

    #[test]
    fn writes_every_configured_format_and_drops_the_rest() {
        let mut h = headers(&[
            ("b3", "1-2-1"),
            ("x-b3-traceid", "1"),
            ("tracestate", "k=v"),
            ("baggage", "user=42"),
        ]);
        let all = Formats::parse("w3c,b3,b3multi,jaeger").unwrap();
        inject(&mut h, all, T, 0xabc, Some(S), true);
        assert_eq!(
            h["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000abc-01"
        );
        assert_eq!(
            h["b3"],
            "4bf92f3577b34da6a3ce929d0e0e4736-0000000000000abc-1-00f067aa0ba902b7"
        );
        assert_eq!(h["x-b3-spanid"], "0000000000000abc");
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert_eq!(
            h["uber-trace-id"],
            "4bf92f3577b34da6a3ce929d0e0e4736:0000000000000abc:00f067aa0ba902b7:1"
        );
        assert_eq!(h["tracestate"], "k=v");
        assert_eq!(h["baggage"], "user=42");
        // Each written format reads back as the same context.
        for only in ["w3c", "b3", "b3multi", "jaeger"] {
            let mut h = HeaderMap::new();
            inject(&mut h, Formats::parse(only).unwrap(), T, 0xabc, None, false);
            assert_eq!(
                extract(&h),
                Some(Parent {
                    trace_id: T,
                    span_id: 0xabc,
                    sampled: Some(false)
                }),
                "{only}"
            );
        }
        let mut h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "k=v"),
        ]);
        inject(&mut h, Formats::B3, T, 1, None, true);
        assert!(!h.contains_key("traceparent") && !h.contains_key("tracestate"));
    }
}
