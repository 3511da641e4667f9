//! The cost of one policy swap: validate, compile and publish a policy of 50 services
//! with 3 endpoints each, alternating two versions, as the admin API and file reloads do.
//! Maglev is measured apart: each swap to it builds a 65,537-slot table per service.

use std::sync::Arc;
use std::time::Instant;

use ferry_policy::Policy;
use ferry_proxy::{DefaultDiscover, Metrics, Shared};

fn policy(lb: &str) -> Policy {
    let mut doc =
        String::from("listeners: [{name: web, bind: \"127.0.0.1:0\", service: s0}]\nservices:\n");
    for i in 0..50 {
        doc.push_str(&format!(
            "  s{i}: {{lb: {lb}, timeout: 2s, endpoints: [\"10.0.{i}.1:80\", \"10.0.{i}.2:80\", \"10.0.{i}.3:80\"]}}\n"
        ));
    }
    Policy::from_yaml(&doc).expect("valid")
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let shared = Shared::new(
            policy("round-robin"),
            Arc::new(DefaultDiscover::default()),
            Metrics::default(),
        )
        .unwrap();
        for (x, y, n) in [
            ("p2c-ewma", "round-robin", 2000u32),
            ("p2c-ewma", "maglev", 100),
        ] {
            let (a, b) = (policy(x), policy(y));
            let start = Instant::now();
            for i in 0..n {
                shared
                    .apply(if i % 2 == 0 { a.clone() } else { b.clone() })
                    .unwrap();
            }
            println!(
                "policy swap, 50 services x 3 endpoints, {x} <-> {y}: {:?} each over {n} swaps",
                start.elapsed() / n
            );
        }
        let parse = Instant::now();
        for _ in 0..200 {
            policy("random");
        }
        println!(
            "parsing and validating that policy from YAML: {:?} each",
            parse.elapsed() / 200
        );
    });
}
