//! `ferry`: the sidecar binary.

mod check;
mod demo;
mod proxy;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "A service-mesh sidecar for Kubernetes RPC traffic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy.
    Proxy(proxy::ProxyArgs),
    /// Redirect this network namespace's TCP traffic to the sidecar (iptables).
    Init(ferry_init::InitArgs),
    /// Validate a policy file or a downward-API annotations file.
    Check(check::CheckArgs),
    /// Run the proxy in front of bundled demo upstreams (HTTP and gRPC).
    Demo(demo::DemoArgs),
}

/// jemalloc keeps blocks of one size together, so memory given back by idle
/// connections leaves whole pages free (glibc's heap kept ~8 KiB of each connection's
/// 16 in pages pinned by its live neighbours), and it spends fewer instructions per
/// request than glibc here (`bench/README.md`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Proxy(args) => proxy::main(args),
        Command::Init(args) => ferry_init::run(&args),
        Command::Check(args) => return check::main(args),
        Command::Demo(args) => demo::main(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
