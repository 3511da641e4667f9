//! Pod annotations in the `ferry.dev/` vocabulary, and the downward API file that
//! carries them into the sidecar.

use std::collections::BTreeMap;

use crate::error::{Errors, FieldError};
use crate::policy::Policy;
use crate::settings::{self, Overrides};

pub const PREFIX: &str = "ferry.dev/";

/// Annotation names besides the per-service settings in [`Overrides::KEYS`].
pub const POD_KEYS: [&str; 13] = [
    "inject",
    "injected",
    "sidecar-mode",
    "region",
    "zone",
    "skip-outbound-ports",
    "skip-inbound-ports",
    "skip-outbound-cidrs",
    "opaque-ports",
    "policy",
    "proxy-cpu",
    "proxy-memory",
    "admin-token",
];

/// What `ferry init` leaves alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redirect {
    pub skip_outbound_ports: Vec<u16>,
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_cidrs: Vec<String>,
    pub opaque_ports: Vec<u16>,
}

/// How the injector adds the proxy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+).
    #[default]
    Native,
    /// A regular container.
    Container,
}

/// A pod's `ferry.dev/` annotations, validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodAnnotations {
    /// `ferry.dev/inject`: `Some(true)` enabled, `Some(false)` disabled, `None` unset.
    pub inject: Option<bool>,
    /// `ferry.dev/injected`: the injector's record (its version), if present.
    pub injected: Option<String>,
    pub sidecar_mode: Option<SidecarMode>,
    pub overrides: Overrides,
    pub redirect: Redirect,
    pub proxy_cpu: Option<String>,
    pub proxy_memory: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    /// `ferry.dev/policy`: a whole policy document.
    pub policy: Option<Policy>,
}

impl PodAnnotations {
    /// Validates every `ferry.dev/` annotation of `annotations`; others are ignored.
    pub fn from_map(annotations: &BTreeMap<String, String>) -> Result<PodAnnotations, Errors> {
        let mut errs = Errors::default();
        let mut out = PodAnnotations::default();
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(PREFIX) else {
                continue;
            };
            let mut fail = |m: String| errs.push(FieldError::new(key.as_str(), value.as_str(), m));
            match name {
                "inject" => match value.trim() {
                    "enabled" => out.inject = Some(true),
                    "disabled" => out.inject = Some(false),
                    _ => fail("is not an injection choice (allowed: enabled, disabled)".into()),
                },
                "injected" => out.injected = Some(value.clone()),
                "sidecar-mode" => match value.trim() {
                    "native" => out.sidecar_mode = Some(SidecarMode::Native),
                    "container" => out.sidecar_mode = Some(SidecarMode::Container),
                    _ => fail("is not a sidecar mode (allowed: native, container)".into()),
                },
                "region" | "zone" => match settings::parse_locality_name(value) {
                    Ok(v) if name == "region" => out.region = Some(v),
                    Ok(v) => out.zone = Some(v),
                    Err(m) => fail(m),
                },
                "skip-outbound-ports" => match settings::parse_ports(value) {
                    Ok(p) => out.redirect.skip_outbound_ports = p,
                    Err(m) => fail(m),
                },
                "skip-inbound-ports" => match settings::parse_ports(value) {
                    Ok(p) => out.redirect.skip_inbound_ports = p,
                    Err(m) => fail(m),
                },
                "opaque-ports" => match settings::parse_ports(value) {
                    Ok(p) => out.redirect.opaque_ports = p,
                    Err(m) => fail(m),
                },
                "skip-outbound-cidrs" => match settings::parse_cidrs(value) {
                    Ok(c) => out.redirect.skip_outbound_cidrs = c,
                    Err(m) => fail(m),
                },
                "proxy-cpu" => match settings::parse_quantity(value) {
                    Ok(q) => out.proxy_cpu = Some(q),
                    Err(m) => fail(m),
                },
                "proxy-memory" => match settings::parse_quantity(value) {
                    Ok(q) => out.proxy_memory = Some(q),
                    Err(m) => fail(m),
                },
                "admin-token" => {
                    if value.trim().is_empty() {
                        fail("must not be empty".into())
                    }
                }
                "policy" => match Policy::from_yaml(value) {
                    Ok(p) => out.policy = Some(p),
                    Err(e) => {
                        for fe in e.0 {
                            errs.push(fe.within(&format!("{key} > ")));
                        }
                    }
                },
                setting => match out.overrides.set(setting, value) {
                    Ok(true) => {}
                    Ok(false) => {
                        let mut known: Vec<&str> = POD_KEYS.to_vec();
                        known.extend(Overrides::KEYS);
                        known.sort_unstable();
                        fail(format!(
                            "is not a ferry annotation (known: {})",
                            known
                                .iter()
                                .map(|k| format!("{PREFIX}{k}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    }
                    Err(m) => fail(m),
                },
            }
        }
        errs.into_result(out)
    }

    /// The policy layer these annotations stand for: the `ferry.dev/policy` document with
    /// the single-setting annotations over its defaults.
    pub fn policy_layer(&self) -> Policy {
        let mut p = self.policy.clone().unwrap_or_default();
        p.defaults = p.defaults.overlay(&self.overrides);
        if !self.redirect.opaque_ports.is_empty() {
            p.opaque_ports = Some(self.redirect.opaque_ports.clone());
        }
        if self.region.is_some() {
            p.locality.region = self.region.clone();
        }
        if self.zone.is_some() {
            p.locality.zone = self.zone.clone();
        }
        p
    }
}

/// Parses the kubelet's downward API rendering of `metadata.annotations`: one
/// `key="value"` a line, the value quoted as Go's `strconv.Quote` does.
pub fn parse_downward_api(text: &str) -> Result<BTreeMap<String, String>, Errors> {
    let mut errs = Errors::default();
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let field = format!("line {}", i + 1);
        let Some((key, quoted)) = line.split_once('=') else {
            errs.push(FieldError::new(field, line, "is not a key=\"value\" line"));
            continue;
        };
        match unquote(quoted) {
            Ok(v) => {
                out.insert(key.to_string(), v);
            }
            Err(m) => errs.push(FieldError::new(field, line, m)),
        }
    }
    errs.into_result(out)
}

fn unquote(q: &str) -> Result<String, String> {
    let inner = q
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or("has a value that is not in double quotes")?;
    let mut out = Vec::with_capacity(inner.len());
    let bytes = inner.as_bytes();
    let mut i = 0;
    let hex = |s: &[u8]| -> Result<u32, String> {
        std::str::from_utf8(s)
            .ok()
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| "has a bad escape".to_string())
    };
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let e = *bytes.get(i + 1).ok_or("ends in a lone backslash")?;
        i += 2;
        let simple = match e {
            b'a' => Some(7),
            b'b' => Some(8),
            b'f' => Some(12),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'v' => Some(11),
            b'\\' => Some(b'\\'),
            b'"' => Some(b'"'),
            b'\'' => Some(b'\''),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            continue;
        }
        let (len, radix_hex) = match e {
            b'x' => (2, true),
            b'u' => (4, true),
            b'U' => (8, true),
            b'0'..=b'7' => (2, false),
            _ => return Err(format!("has an unknown escape \\{}", e as char)),
        };
        let digits = bytes.get(i..i + len).ok_or("has a short escape")?;
        i += len;
        if !radix_hex {
            let s = [&[e][..], digits].concat();
            let v = std::str::from_utf8(&s)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
                .ok_or("has a bad octal escape")?;
            out.push(v);
        } else if e == b'x' {
            out.push(hex(digits)? as u8);
        } else {
            let c = char::from_u32(hex(digits)?).ok_or("has an escape that is not a character")?;
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    String::from_utf8(out).map_err(|_| "has a value that is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Lb;
    use std::time::Duration;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_bad_value_names_annotation_value_and_what_is_allowed() {
        let e = PodAnnotations::from_map(&map(&[("ferry.dev/timeout", "banana")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ferry.dev/timeout: \"banana\" is not a duration (examples: 250ms, 2s, or off)"
        );
    }

    #[test]
    fn every_bad_annotation_is_reported() {
        let e = PodAnnotations::from_map(&map(&[
            ("ferry.dev/lb", "fastest"),
            ("ferry.dev/skip-outbound-cidrs", "10.0.0.0/40"),
            ("ferry.dev/proxy-memory", "lots"),
            ("ferry.dev/inject", "yes"),
            ("ferry.dev/lbb", "random"),
            ("ferry.dev/policy", "services: {web: {timeout: soon}}"),
            ("other.io/anything", "is ignored"),
        ]))
        .unwrap_err();
        assert_eq!(e.len(), 6, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("ferry.dev/lbb: \"random\" is not a ferry annotation (known:"),
            "{text}"
        );
        assert!(
            text.contains("ferry.dev/policy > services.web.timeout: \"soon\" is not a duration"),
            "{text}"
        );
    }

    #[test]
    fn good_annotations_parse() {
        let a = PodAnnotations::from_map(&map(&[
            ("ferry.dev/inject", "enabled"),
            ("ferry.dev/lb", "round-robin"),
            ("ferry.dev/timeout", "2s"),
            ("ferry.dev/skip-outbound-ports", "5432,6379"),
            ("ferry.dev/opaque-ports", "3306"),
            ("ferry.dev/proxy-cpu", "100m"),
            ("ferry.dev/zone", "eu-west-1a"),
            ("ferry.dev/locality", "off"),
            ("ferry.dev/policy", "services:\n  web:\n    retries: 2\n"),
        ]))
        .unwrap();
        assert_eq!(a.inject, Some(true));
        assert_eq!(a.redirect.skip_outbound_ports, vec![5432, 6379]);
        assert_eq!(a.proxy_cpu.as_deref(), Some("100m"));
        let layer = a.policy_layer();
        assert_eq!(layer.opaque_ports, Some(vec![3306]));
        let web = layer.service_settings("web");
        assert_eq!(
            (web.lb, web.timeout, web.retries),
            (Lb::RoundRobin, Some(Duration::from_secs(2)), 2)
        );
        // The pod's zone overrides its node's; locality is a setting like the others.
        assert_eq!(layer.locality.zone.as_deref(), Some("eu-west-1a"));
        assert_eq!(layer.locality.region, None);
        assert!(!web.locality);
    }

    #[test]
    fn downward_api_file_with_escapes() {
        let text = "ferry.dev/lb=\"maglev\"\nferry.dev/policy=\"services:\\n  web:\\n    timeout: \\\"2s\\\"\\n\"\nnote=\"caf\\u00e9 \\x41\\101\\t\"\n";
        let m = parse_downward_api(text).unwrap();
        assert_eq!(m["ferry.dev/lb"], "maglev");
        assert_eq!(
            m["ferry.dev/policy"],
            "services:\n  web:\n    timeout: \"2s\"\n"
        );
        assert_eq!(m["note"], "café AA\t");
        let e = parse_downward_api("a=\"ok\"\nbroken\nb=\"\\q\"").unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
