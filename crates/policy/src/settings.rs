//! The per-service settings, their string forms, and their parsers.
//!
//! Every setting is parsed from a string, whether it comes from an annotation or a
//! policy file, so both are judged by the same words.

use std::fmt;
use std::time::Duration;

/// Load-balancing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Lb {
    /// Power of two choices over peak-EWMA latency, weighted by in-flight requests.
    #[default]
    P2cEwma,
    RoundRobin,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

impl Lb {
    pub const ALL: [Lb; 6] = [
        Lb::P2cEwma,
        Lb::RoundRobin,
        Lb::LeastRequest,
        Lb::Random,
        Lb::RingHash,
        Lb::Maglev,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Lb::P2cEwma => "p2c-ewma",
            Lb::RoundRobin => "round-robin",
            Lb::LeastRequest => "least-request",
            Lb::Random => "random",
            Lb::RingHash => "ring-hash",
            Lb::Maglev => "maglev",
        }
    }

    pub fn is_hash(self) -> bool {
        matches!(self, Lb::RingHash | Lb::Maglev)
    }

    pub fn parse(s: &str) -> Result<Lb, String> {
        Lb::ALL
            .into_iter()
            .find(|lb| lb.as_str() == s.trim())
            .ok_or_else(|| {
                let names: Vec<_> = Lb::ALL.iter().map(|l| l.as_str()).collect();
                format!("is not a balancer (allowed: {})", names.join(", "))
            })
    }
}

impl fmt::Display for Lb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key hash balancers pick an endpoint by.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum HashOn {
    #[default]
    SourceIp,
    /// A request header, lower-cased. Requests without it fall back to the source IP.
    Header(String),
}

impl HashOn {
    pub fn parse(s: &str) -> Result<HashOn, String> {
        let s = s.trim();
        const ALLOWED: &str = "(allowed: source-ip, header:<name>)";
        if s == "source-ip" {
            return Ok(HashOn::SourceIp);
        }
        match s.strip_prefix("header:") {
            Some(name) if is_header_name(name) => Ok(HashOn::Header(name.to_ascii_lowercase())),
            Some(_) => Err(format!("does not name a valid header {ALLOWED}")),
            None => Err(format!("is not a hash key {ALLOWED}")),
        }
    }
}

impl fmt::Display for HashOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashOn::SourceIp => f.write_str("source-ip"),
            HashOn::Header(h) => write!(f, "header:{h}"),
        }
    }
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Trace-context header formats, as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Formats(u8);

impl Formats {
    pub const NONE: Formats = Formats(0);
    pub const W3C: Formats = Formats(1);
    /// Single `b3` header.
    pub const B3: Formats = Formats(2);
    /// `x-b3-traceid`, `x-b3-spanid`, ... headers.
    pub const B3_MULTI: Formats = Formats(4);
    pub const JAEGER: Formats = Formats(8);
    const NAMES: [(&'static str, Formats); 4] = [
        ("w3c", Formats::W3C),
        ("b3", Formats::B3),
        ("b3multi", Formats::B3_MULTI),
        ("jaeger", Formats::JAEGER),
    ];

    pub fn contains(self, other: Formats) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn parse(s: &str) -> Result<Formats, String> {
        let s = s.trim();
        if s == "none" {
            return Ok(Formats::NONE);
        }
        let mut out = 0;
        for part in s.split(',').map(str::trim) {
            match Formats::NAMES.iter().find(|(n, _)| *n == part) {
                Some((_, f)) => out |= f.0,
                None => {
                    return Err(format!(
                        "is not a list of trace formats (allowed: w3c, b3, b3multi, jaeger, comma separated, or none; {part:?} is unknown)"
                    ));
                }
            }
        }
        Ok(Formats(out))
    }
}

impl Default for Formats {
    fn default() -> Self {
        Formats::W3C
    }
}

impl std::ops::BitOr for Formats {
    type Output = Formats;
    fn bitor(self, rhs: Formats) -> Formats {
        Formats(self.0 | rhs.0)
    }
}

impl fmt::Display for Formats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        let names: Vec<_> = Formats::NAMES
            .iter()
            .filter(|(_, v)| self.contains(*v))
            .map(|(n, _)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

/// Declares every per-service setting once: its field, type, key (the annotation
/// `ferry.dev/<key>` and the policy file's word), default, parser and printer. From it
/// come [`Settings`] (resolved), [`Overrides`] (one layer's), and their plumbing.
macro_rules! settings {
    ($(
        $(#[$doc:meta])*
        $field:ident: $ty:ty = $key:literal,
            default $default:expr,
            parse $parse:expr,
            print $print:expr;
    )*) => {
        /// Fully resolved settings for one service or route: what a request runs under.
        #[derive(Clone, Debug, PartialEq)]
        pub struct Settings {
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl Default for Settings {
            fn default() -> Self {
                Settings { $( $field: $default, )* }
            }
        }

        /// Settings one layer sets; `None` leaves the value of the layer below.
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct Overrides {
            $( $(#[$doc])* pub $field: Option<$ty>, )*
        }

        impl Overrides {
            /// The setting names, shared by annotations (`ferry.dev/<name>`) and policy files.
            pub const KEYS: &'static [&'static str] = &[$( $key ),*];

            /// Sets `key` from its string form. `Ok(false)` when `key` is not a setting.
            pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
                match key {
                    $( $key => self.$field = Some(($parse)(value)?), )*
                    _ => return Ok(false),
                }
                Ok(true)
            }

            /// The set values as `(key, string form)`, in `KEYS` order.
            pub fn entries(&self) -> Vec<(&'static str, String)> {
                let mut out = Vec::new();
                $( if let Some(v) = &self.$field { out.push(($key, ($print)(v))); } )*
                out
            }

            /// `top` layered over `self`: each value `top` sets wins.
            pub fn overlay(&self, top: &Overrides) -> Overrides {
                Overrides { $( $field: top.$field.clone().or_else(|| self.$field.clone()), )* }
            }

            /// These overrides applied to `base`.
            pub fn apply(&self, base: &Settings) -> Settings {
                Settings {
                    $( $field: self.$field.clone().unwrap_or_else(|| base.$field.clone()), )*
                }
            }
        }
    };
}

settings! {
    lb: Lb = "lb",
        default Lb::P2cEwma,
        parse Lb::parse,
        print |v: &Lb| v.to_string();
    hash_on: HashOn = "hash-on",
        default HashOn::SourceIp,
        parse HashOn::parse,
        print |v: &HashOn| v.to_string();
    /// Whole-request deadline; `None` means no deadline but the client's own (an
    /// override of `Some(None)` switches an inherited deadline off).
    timeout: Option<Duration> = "timeout",
        default None,
        parse parse_timeout,
        print |v: &Option<Duration>| format_timeout(*v);
    connect_timeout: Duration = "connect-timeout",
        default Duration::from_secs(1),
        parse parse_connect_timeout,
        print |v: &Duration| format_duration(*v);
    retries: u32 = "retries",
        default 0,
        parse parse_retries,
        print |v: &u32| v.to_string();
    trace_propagation: Formats = "trace-propagation",
        default Formats::W3C,
        parse Formats::parse,
        print |v: &Formats| v.to_string();
    /// Prefer endpoints near this sidecar (same zone, then region), spilling over when
    /// they fail or are overloaded.
    locality: bool = "locality",
        default true,
        parse parse_on_off,
        print |v: &bool| if *v { "on".to_string() } else { "off".to_string() };
    trace_sampling: f64 = "trace-sampling",
        default 1.0,
        parse parse_ratio,
        print |v: &f64| v.to_string();
    /// Failures after the request was written that are retried (with `retries` > 0).
    retry_on: RetryOn = "retry-on",
        default RetryOn::NONE,
        parse RetryOn::parse,
        print |v: &RetryOn| v.to_string();
    /// Each attempt's time to response headers.
    per_try_timeout: Option<Duration> = "per-try-timeout",
        default None,
        parse parse_timeout,
        print |v: &Option<Duration>| format_timeout(*v);
    /// Time from the request to the response headers (time to first byte).
    response_timeout: Option<Duration> = "response-timeout",
        default None,
        parse parse_timeout,
        print |v: &Option<Duration>| format_timeout(*v);
    /// A call with no frame either way for this long is ended (streams).
    stream_idle_timeout: Option<Duration> = "stream-idle-timeout",
        default None,
        parse parse_timeout,
        print |v: &Option<Duration>| format_timeout(*v);
    /// Consecutive failures (5xx, gRPC UNAVAILABLE, connect failures, resets) that
    /// eject an endpoint; 0 turns outlier ejection off.
    outlier_failures: u32 = "outlier-failures",
        default 5,
        parse parse_outlier_failures,
        print |v: &u32| v.to_string();
    /// The first ejection's length; each further one is longer by as much (up to 5 min).
    outlier_ejection: Duration = "outlier-ejection",
        default Duration::from_secs(10),
        parse parse_connect_timeout,
        print |v: &Duration| format_duration(*v);
    /// At most this share of a service's endpoints is ejected (one always stays).
    max_ejection_percent: u8 = "max-ejection-percent",
        default 50,
        parse parse_percent,
        print |v: &u8| v.to_string();
    /// Requests in flight to the service above which new ones are refused at once.
    max_in_flight: Option<u32> = "max-in-flight",
        default None,
        parse parse_max_in_flight,
        print |v: &Option<u32>| v.map_or_else(|| "off".to_string(), |n| n.to_string());
    /// A concurrency limit learned from latency (AIMD), under `max-in-flight` if set.
    adaptive_concurrency: bool = "adaptive-concurrency",
        default false,
        parse parse_on_off,
        print |v: &bool| if *v { "on".to_string() } else { "off".to_string() };
}

/// What makes a written request worth sending again, as a bit set plus status codes.
/// Whatever it says, idempotent methods are retried on 503 / gRPC `UNAVAILABLE`, and
/// a failed connect (nothing sent) always is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RetryOn {
    bits: u8,
    codes: Vec<u16>,
}

impl RetryOn {
    pub const NONE: RetryOn = RetryOn {
        bits: 0,
        codes: Vec::new(),
    };
    /// Any 5xx response.
    pub const SERVER_ERROR: u8 = 1;
    /// 502, 503, 504.
    pub const GATEWAY_ERROR: u8 = 2;
    /// 503 and gRPC `UNAVAILABLE` (14).
    pub const UNAVAILABLE: u8 = 4;
    /// The upstream reset or closed the connection after the request was written.
    pub const RESET: u8 = 8;
    pub const PER_TRY_TIMEOUT: u8 = 16;
    const NAMES: [(&'static str, u8); 5] = [
        ("5xx", Self::SERVER_ERROR),
        ("gateway-error", Self::GATEWAY_ERROR),
        ("unavailable", Self::UNAVAILABLE),
        ("reset", Self::RESET),
        ("per-try-timeout", Self::PER_TRY_TIMEOUT),
    ];

    pub fn has(&self, bit: u8) -> bool {
        self.bits & bit != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0 && self.codes.is_empty()
    }

    /// Whether a response with this HTTP status (and gRPC status, if any) is retried.
    pub fn status(&self, status: u16, grpc: Option<u8>) -> bool {
        (self.has(Self::SERVER_ERROR) && (500..600).contains(&status))
            || (self.has(Self::GATEWAY_ERROR) && matches!(status, 502..=504))
            || (self.has(Self::UNAVAILABLE) && (status == 503 || grpc == Some(14)))
            || self.codes.contains(&status)
    }

    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let s = s.trim();
        let mut out = RetryOn::NONE;
        if s == "none" || s.is_empty() {
            return Ok(out);
        }
        for part in s.split(',').map(str::trim) {
            if let Some((_, b)) = Self::NAMES.iter().find(|(n, _)| *n == part) {
                out.bits |= b;
                continue;
            }
            match part.parse::<u16>() {
                Ok(c) if (500..600).contains(&c) => {
                    if !out.codes.contains(&c) {
                        out.codes.push(c);
                    }
                }
                _ => {
                    return Err(format!(
                        "is not a list of retry conditions (allowed: 5xx, gateway-error, unavailable, reset, per-try-timeout, a status from 500 to 599, comma separated, or none; {part:?} is not one)"
                    ));
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut parts: Vec<String> = Self::NAMES
            .iter()
            .filter(|(_, b)| self.has(*b))
            .map(|(n, _)| n.to_string())
            .collect();
        parts.extend(self.codes.iter().map(u16::to_string));
        f.write_str(&parts.join(","))
    }
}

fn parse_outlier_failures(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n <= 1000 => Ok(n),
        _ => Err(
            "is not a failure count (a whole number from 0 to 1000; 0 turns ejection off)".into(),
        ),
    }
}

fn parse_percent(s: &str) -> Result<u8, String> {
    match s.trim().trim_end_matches('%').parse::<u8>() {
        Ok(n) if n <= 100 => Ok(n),
        _ => Err("is not a percentage (a whole number from 0 to 100)".into()),
    }
}

fn parse_max_in_flight(s: &str) -> Result<Option<u32>, String> {
    let s = s.trim();
    if s == "off" || s == "none" {
        return Ok(None);
    }
    match s.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err("is not a request count (a whole number from 1, or off)".into()),
    }
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }
}

fn parse_connect_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be greater than zero (examples: 250ms, 2s)".into());
    }
    Ok(d)
}

const DURATION_HINT: &str = "is not a duration (examples: 250ms, 2s)";

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|_| DURATION_HINT.to_string())
}

pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A deadline, where `off` (or zero) means none.
pub fn parse_timeout(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim();
    if s == "off" || s == "none" || s == "0" {
        return Ok(None);
    }
    let d = humantime::parse_duration(s)
        .map_err(|_| "is not a duration (examples: 250ms, 2s, or off)".to_string())?;
    Ok(if d.is_zero() { None } else { Some(d) })
}

pub fn format_timeout(t: Option<Duration>) -> String {
    t.map(format_duration).unwrap_or_else(|| "off".into())
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim() {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err("is not on or off".into()),
    }
}

/// A zone or region name: a Kubernetes label value.
pub fn parse_locality_name(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(v.to_string())
    } else {
        Err("is not a locality name (letters, digits, - _ ., at most 63, such as eu-west-1)".into())
    }
}

fn parse_retries(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n <= 10 => Ok(n),
        _ => Err("is not a retry count (a whole number from 0 to 10)".into()),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("is not a sampling ratio (a number from 0 to 1, such as 0.1)".into()),
    }
}

/// A comma-separated list of TCP ports.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|p| match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "is not a list of ports (comma-separated numbers from 1 to 65535, such as 5432,6379; {:?} is not one)",
                p.trim()
            )),
        })
        .collect()
}

/// A comma-separated list of CIDRs (`10.0.0.0/8`, `fd00::/8`), returned normalised.
pub fn parse_cidrs(s: &str) -> Result<Vec<String>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|c| {
            let c = c.trim();
            let bad = || {
                format!("is not a list of CIDRs (such as 10.0.0.0/8,fd00::/8; {c:?} is not one)")
            };
            let (ip, len) = c.split_once('/').ok_or_else(bad)?;
            let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
            let len: u8 = len.parse().map_err(|_| bad())?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if len > max {
                return Err(bad());
            }
            Ok(format!("{ip}/{len}"))
        })
        .collect()
}

/// A Kubernetes resource quantity such as `100m`, `0.5`, `64Mi`, `1G`.
pub fn parse_quantity(s: &str) -> Result<String, String> {
    let s = s.trim();
    const SUFFIXES: [&str; 15] = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n",
    ];
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let num_ok = !num.is_empty()
        && num.parse::<f64>().is_ok_and(|n| n > 0.0)
        && !num.starts_with('.')
        && !num.ends_with('.');
    if num_ok && SUFFIXES.contains(&suffix) {
        Ok(s.to_string())
    } else {
        Err("is not a Kubernetes quantity (examples: 100m, 0.5, 64Mi, 1Gi)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_balancer_name_round_trips() {
        for lb in Lb::ALL {
            assert_eq!(Lb::parse(lb.as_str()), Ok(lb));
        }
        let err = Lb::parse("fastest").unwrap_err();
        assert!(
            err.contains("round-robin") && err.contains("maglev"),
            "{err}"
        );
    }

    #[test]
    fn hash_keys() {
        assert_eq!(HashOn::parse("source-ip"), Ok(HashOn::SourceIp));
        assert_eq!(
            HashOn::parse("header:X-User-Id"),
            Ok(HashOn::Header("x-user-id".into()))
        );
        assert!(HashOn::parse("header:").is_err());
        assert!(HashOn::parse("header:a b").is_err());
        assert!(HashOn::parse("cookie:a").is_err());
    }

    #[test]
    fn formats_parse_and_print() {
        let f = Formats::parse("w3c, b3,jaeger").unwrap();
        assert!(f.contains(Formats::W3C) && f.contains(Formats::B3) && f.contains(Formats::JAEGER));
        assert!(!f.contains(Formats::B3_MULTI));
        assert_eq!(f.to_string(), "w3c,b3,jaeger");
        assert_eq!(Formats::parse("none"), Ok(Formats::NONE));
        assert!(
            Formats::parse("w3c,zipkin")
                .unwrap_err()
                .contains("\"zipkin\"")
        );
    }

    #[test]
    fn durations_and_timeouts() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout("off"), Ok(None));
        assert_eq!(parse_timeout("0s"), Ok(None));
        assert_eq!(parse_timeout("2s"), Ok(Some(Duration::from_secs(2))));
        assert_eq!(parse_duration("banana").unwrap_err(), DURATION_HINT);
        assert_eq!(
            format_timeout(Some(Duration::from_millis(1500))),
            "1s 500ms"
        );
    }

    #[test]
    fn ports_cidrs_quantities() {
        assert_eq!(parse_ports("5432, 6379"), Ok(vec![5432, 6379]));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("80,http").unwrap_err().contains("\"http\""));
        assert_eq!(
            parse_cidrs("10.0.0.0/8,fd00::/8"),
            Ok(vec!["10.0.0.0/8".to_string(), "fd00::/8".to_string()])
        );
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("10.0.0.0").is_err());
        for ok in ["100m", "0.5", "64Mi", "1Gi", "2"] {
            assert!(parse_quantity(ok).is_ok(), "{ok}");
        }
        for bad in ["lots", "64MB", "-1", ".5", "m"] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overrides_layer_and_apply() {
        let mut low = Overrides::default();
        low.set("lb", "random").unwrap();
        low.set("timeout", "2s").unwrap();
        let mut high = Overrides::default();
        high.set("timeout", "off").unwrap();
        let merged = low.overlay(&high);
        let s = merged.apply(&Settings::default());
        assert_eq!(s.lb, Lb::Random);
        assert_eq!(s.timeout, None);
        assert_eq!(s.connect_timeout, Duration::from_secs(1));
        assert_eq!(Overrides::default().set("nope", "x"), Ok(false));
    }

    /// Every setting is in the README's annotation table and in the policy file guide.
    #[test]
    fn every_setting_is_documented() {
        let readme = include_str!("../../../README.md");
        let guide = include_str!("../../../docs/policy-file.md");
        let openapi = include_str!("../../admin/openapi.yaml");
        for key in Overrides::KEYS {
            assert!(
                readme.contains(&format!("`ferry.dev/{key}`")),
                "README.md's annotation table lacks ferry.dev/{key}"
            );
            assert!(
                guide.contains(&format!("  {key}:")),
                "docs/policy-file.md lacks {key}"
            );
            assert!(
                openapi.contains(&format!("        {key}: {{description:")),
                "crates/admin/openapi.yaml's Settings lacks {key}"
            );
        }
    }

    #[test]
    fn retry_conditions_parse_and_print_back() {
        let r = RetryOn::parse("reset, 503,unavailable").unwrap();
        assert_eq!(r.to_string(), "unavailable,reset,503");
        assert!(r.status(503, None) && r.status(200, Some(14)) && !r.status(500, None));
        assert_eq!(RetryOn::parse("none").unwrap(), RetryOn::NONE);
        let e = RetryOn::parse("5xx,404").unwrap_err();
        assert!(e.contains("\"404\" is not one"), "{e}");
    }
}
