//! `ferry check`: validate a policy file or an annotations file, as the sidecar would.

use std::path::PathBuf;
use std::process::ExitCode;

use ferry_policy::annotations::{PodAnnotations, parse_downward_api};
use ferry_policy::{Errors, Policy};

#[derive(clap::Args)]
pub struct CheckArgs {
    /// A policy file (YAML) or a downward-API annotations file (`key="value"` lines).
    file: PathBuf,
    /// Read FILE as an annotations file even if it looks like YAML.
    #[arg(long)]
    annotations: bool,
}

/// Every non-empty line is `key="..."`: the kubelet's rendering of annotations.
fn looks_like_annotations(text: &str) -> bool {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty()).peekable();
    lines.peek().is_some()
        && lines.all(|l| {
            l.split_once('=')
                .is_some_and(|(k, v)| !k.contains(' ') && v.starts_with('"'))
        })
}

pub fn check_text(text: &str, force_annotations: bool) -> Result<Policy, Errors> {
    if force_annotations || looks_like_annotations(text) {
        let map = parse_downward_api(text)?;
        Ok(PodAnnotations::from_map(&map)?.policy_layer())
    } else {
        let p = Policy::from_yaml(text)?;
        p.validate_complete()?;
        Ok(p)
    }
}

pub fn main(args: CheckArgs) -> ExitCode {
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ferry check: cannot read {}: {e}", args.file.display());
            return ExitCode::from(2);
        }
    };
    match check_text(&text, args.annotations) {
        Ok(p) => {
            println!(
                "{}: valid ({} listeners, {} services)",
                args.file.display(),
                p.listeners.len(),
                p.services.len()
            );
            ExitCode::SUCCESS
        }
        Err(errs) => {
            eprintln!("{}: {} problem(s)", args.file.display(), errs.len());
            for e in &errs {
                eprintln!("  {e}");
            }
            ExitCode::FAILURE
        }
    }
}
