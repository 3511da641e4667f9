//! `ferry init`: programs the pod's network namespace so that the app's TCP traffic
//! goes through the sidecar: outbound to the outbound listener, inbound to the inbound
//! listener, the sidecar's own traffic untouched.
//!
//! The rules live in ferry's own nat chains and are applied atomically with
//! `iptables-restore --noflush`. Declaring a chain in the restore input empties it, so a
//! second run (an init container restarted) refills the same chains, and the jumps into
//! them are only added when absent: one set of rules, however often it runs.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use ferry_policy::contract;
use ferry_policy::settings::{parse_cidrs, parse_ports};

/// Chains ferry owns in the nat table.
const INBOUND: &str = "FERRY_INBOUND";
const IN_REDIRECT: &str = "FERRY_IN_REDIRECT";
const OUTPUT: &str = "FERRY_OUTPUT";
const REDIRECT: &str = "FERRY_REDIRECT";
/// The jumps from the built-in chains into ferry's.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND), ("OUTPUT", OUTPUT)];

/// A comma-separated port list, as one flag value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ports(pub Vec<u16>);

/// A comma-separated CIDR list, as one flag value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cidrs(pub Vec<String>);

fn ports(s: &str) -> Result<Ports, String> {
    parse_ports(s).map(Ports).map_err(|m| format!("{s:?} {m}"))
}

fn cidrs(s: &str) -> Result<Cidrs, String> {
    parse_cidrs(s).map(Cidrs).map_err(|m| format!("{s:?} {m}"))
}

#[derive(clap::Args, Clone, Debug)]
pub struct InitArgs {
    /// Where outbound connections are redirected (the sidecar's outbound listener).
    #[arg(long, default_value_t = contract::OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Where inbound connections are redirected (the sidecar's inbound listener).
    #[arg(long, default_value_t = contract::INBOUND_PORT)]
    pub inbound_port: u16,
    /// The sidecar's user id: its own connections are never redirected.
    #[arg(long, default_value_t = contract::PROXY_UID)]
    pub proxy_uid: u32,
    /// The admin port: inbound connections to it reach the sidecar directly.
    #[arg(long, default_value_t = contract::ADMIN_PORT)]
    pub admin_port: u16,
    /// Outbound destination ports left alone (comma separated).
    #[arg(long, value_parser = ports, default_value = "")]
    pub skip_outbound_ports: Ports,
    /// Inbound ports left alone (comma separated).
    #[arg(long, value_parser = ports, default_value = "")]
    pub skip_inbound_ports: Ports,
    /// Outbound destinations left alone (comma-separated CIDRs, IPv4 and IPv6).
    #[arg(long, value_parser = cidrs, default_value = "")]
    pub skip_outbound_cidrs: Cidrs,
    /// Print the rules and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove every rule and chain ferry added.
    #[arg(long, conflicts_with = "dry_run")]
    pub cleanup: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn tables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn owns(self, cidr: &str) -> bool {
        cidr.contains(':') == (self == Family::V6)
    }
}

fn jump_rule(from: &str, to: &str) -> String {
    format!("-A {from} -p tcp -j {to}")
}

/// The `iptables-restore` input for one family. `existing` is the current `-save` output
/// of the nat table, so jumps already in place are not added twice.
pub fn rules(args: &InitArgs, family: Family, existing: &str) -> String {
    let mut r = vec!["*nat".to_string()];
    for chain in [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT] {
        r.push(format!(":{chain} - [0:0]"));
    }

    // Inbound: everything to the app's ports, but the sidecar's own ports and skips.
    r.push(format!(
        "-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        args.inbound_port
    ));
    let mut inbound_skips = vec![args.admin_port, args.outbound_port, args.inbound_port];
    inbound_skips.extend(&args.skip_inbound_ports.0);
    for p in inbound_skips {
        r.push(format!("-A {INBOUND} -p tcp --dport {p} -j RETURN"));
    }
    r.push(format!("-A {INBOUND} -p tcp -j {IN_REDIRECT}"));

    // Outbound: the sidecar's own connections and loopback go straight out; that is
    // also what keeps the proxy from looping back into itself.
    r.push(format!(
        "-A {REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        args.outbound_port
    ));
    r.push(format!(
        "-A {OUTPUT} -m owner --uid-owner {} -j RETURN",
        args.proxy_uid
    ));
    // App to app inside the pod (including to its own pod IP, which the kernel routes
    // over lo) is left alone, as linkerd does: both ends are the same workload.
    r.push(format!("-A {OUTPUT} -o lo -j RETURN"));
    r.push(format!("-A {OUTPUT} -d {} -j RETURN", family.loopback()));
    for p in &args.skip_outbound_ports.0 {
        r.push(format!("-A {OUTPUT} -p tcp --dport {p} -j RETURN"));
    }
    for c in args.skip_outbound_cidrs.0.iter().filter(|c| family.owns(c)) {
        r.push(format!("-A {OUTPUT} -d {c} -j RETURN"));
    }
    r.push(format!("-A {OUTPUT} -p tcp -j {REDIRECT}"));

    for (from, to) in JUMPS {
        let jump = jump_rule(from, to);
        if !existing.lines().any(|l| l.trim() == jump) {
            r.push(jump);
        }
    }
    r.push("COMMIT".into());
    r.join("\n") + "\n"
}

fn run_cmd(cmd: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd} (is iptables installed?)"))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this namespace has IPv6 and the tools for it.
fn has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty())
        && Command::new(Family::V6.save())
            .arg("-t")
            .arg("nat")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn families() -> Vec<Family> {
    let mut f = vec![Family::V4];
    if has_ipv6() {
        f.push(Family::V6);
    }
    f
}

fn cleanup(family: Family) -> anyhow::Result<()> {
    let existing = run_cmd(family.save(), &["-t", "nat"], None)?;
    for (from, to) in JUMPS {
        let jump = jump_rule(from, to);
        for _ in existing.lines().filter(|l| l.trim() == jump) {
            run_cmd(
                family.tables(),
                &["-t", "nat", "-D", from, "-p", "tcp", "-j", to],
                None,
            )?;
        }
    }
    for chain in [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT] {
        if existing
            .lines()
            .any(|l| l.starts_with(&format!(":{chain} ")))
        {
            run_cmd(family.tables(), &["-t", "nat", "-F", chain], None)?;
        }
    }
    for chain in [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT] {
        if existing
            .lines()
            .any(|l| l.starts_with(&format!(":{chain} ")))
        {
            run_cmd(family.tables(), &["-t", "nat", "-X", chain], None)?;
        }
    }
    Ok(())
}

pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    if args.dry_run {
        for family in [Family::V4, Family::V6] {
            println!("# {}", family.restore());
            print!("{}", rules(args, family, ""));
        }
        return Ok(());
    }
    for family in families() {
        if args.cleanup {
            cleanup(family)?;
            eprintln!("ferry init: removed {} rules", family.tables());
            continue;
        }
        let existing = run_cmd(family.save(), &["-t", "nat"], None)?;
        let input = rules(args, family, &existing);
        run_cmd(family.restore(), &["--noflush"], Some(&input))?;
        eprintln!("ferry init: {} rules applied", family.tables());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(extra: &[&str]) -> InitArgs {
        let mut argv = vec!["ferry-init"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).init
    }

    #[test]
    fn default_rules_redirect_both_ways_and_spare_the_proxy() {
        let r = rules(&args(&[]), Family::V4, "");
        assert!(r.contains("-A FERRY_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(r.contains("-A FERRY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(r.contains("-A FERRY_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        assert!(r.contains("-A FERRY_INBOUND -p tcp --dport 15000 -j RETURN"));
        assert!(r.contains("-A PREROUTING -p tcp -j FERRY_INBOUND"));
        assert!(r.contains("-A OUTPUT -p tcp -j FERRY_OUTPUT"));
        assert!(r.starts_with("*nat\n") && r.ends_with("COMMIT\n"));
        // The owner rule comes before the redirect, or the proxy would loop.
        assert!(r.find("--uid-owner").unwrap() < r.find("-j FERRY_REDIRECT").unwrap());
    }

    #[test]
    fn skips_land_in_the_right_family() {
        let a = args(&[
            "--skip-outbound-ports",
            "5432,6379",
            "--skip-inbound-ports",
            "22",
            "--skip-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
        ]);
        let v4 = rules(&a, Family::V4, "");
        let v6 = rules(&a, Family::V6, "");
        assert!(v4.contains("-A FERRY_OUTPUT -p tcp --dport 6379 -j RETURN"));
        assert!(v4.contains("-A FERRY_INBOUND -p tcp --dport 22 -j RETURN"));
        assert!(v4.contains("-d 10.0.0.0/8 -j RETURN") && !v4.contains("fd00::/8"));
        assert!(v6.contains("-d fd00::/8 -j RETURN") && !v6.contains("10.0.0.0/8"));
        assert!(v6.contains("-d ::1/128 -j RETURN"));
    }

    #[test]
    fn jumps_already_present_are_not_added_again() {
        let existing = "*nat\n:OUTPUT ACCEPT [0:0]\n-A PREROUTING -p tcp -j FERRY_INBOUND\n-A OUTPUT -p tcp -j FERRY_OUTPUT\nCOMMIT\n";
        let r = rules(&args(&[]), Family::V4, existing);
        assert!(!r.contains("-A OUTPUT -p tcp -j FERRY_OUTPUT"));
        assert!(!r.contains("-A PREROUTING"));
        assert!(
            r.contains(":FERRY_OUTPUT - [0:0]"),
            "chains are still declared, so refilled"
        );
    }

    #[test]
    fn bad_flags_name_the_value() {
        let err = Cli::try_parse_from(["x", "--skip-outbound-ports", "80,http"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("\"http\""), "{err}");
        let err = Cli::try_parse_from(["x", "--skip-outbound-cidrs", "10.0.0.0/33"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("10.0.0.0/33"), "{err}");
    }
}
