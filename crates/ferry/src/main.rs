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
