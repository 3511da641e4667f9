//! `ferry-injector`: the mutating admission webhook, and offline injection.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferry_injector::inject::Config;
use ferry_policy::annotations::SidecarMode;

#[derive(Parser)]
#[command(
    name = "ferry-injector",
    version,
    about = "Adds the ferry sidecar to pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Settings {
    /// The ferry image for the sidecar and its init container.
    #[arg(long, env = "FERRY_IMAGE")]
    image: Option<String>,
    #[arg(long, env = "FERRY_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    image_pull_policy: String,
    /// Namespaces never injected (comma separated).
    #[arg(
        long,
        env = "FERRY_EXCLUDED_NAMESPACES",
        default_value = "kube-system,kube-public,kube-node-lease",
        value_delimiter = ','
    )]
    excluded_namespaces: Vec<String>,
    /// `native` (init container with restartPolicy Always) or `container`.
    #[arg(long, env = "FERRY_SIDECAR_MODE", default_value = "native")]
    sidecar_mode: String,
    #[arg(long, env = "FERRY_PROXY_CPU", default_value = "100m")]
    proxy_cpu: String,
    #[arg(long, env = "FERRY_PROXY_MEMORY", default_value = "64Mi")]
    proxy_memory: String,
    /// Where injected sidecars export spans.
    #[arg(long, env = "FERRY_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The discovery controller's gRPC URL, given to injected sidecars.
    #[arg(long, env = "FERRY_CONTROLLER")]
    controller: Option<String>,
    #[arg(long, env = "FERRY_PROXY_LOG", default_value = "info")]
    proxy_log_level: String,
}

impl Settings {
    fn config(self) -> anyhow::Result<Config> {
        let d = Config::default();
        let sidecar_mode = match self.sidecar_mode.as_str() {
            "native" => SidecarMode::Native,
            "container" => SidecarMode::Container,
            other => anyhow::bail!(
                "--sidecar-mode: {other:?} is not a sidecar mode (allowed: native, container)"
            ),
        };
        for (flag, q) in [
            ("--proxy-cpu", &self.proxy_cpu),
            ("--proxy-memory", &self.proxy_memory),
        ] {
            ferry_policy::settings::parse_quantity(q)
                .map_err(|m| anyhow::anyhow!("{flag}: {q:?} {m}"))?;
        }
        Ok(Config {
            image: self.image.unwrap_or(d.image),
            image_pull_policy: self.image_pull_policy,
            excluded_namespaces: self
                .excluded_namespaces
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect(),
            sidecar_mode,
            proxy_uid: d.proxy_uid,
            proxy_cpu: self.proxy_cpu,
            proxy_memory: self.proxy_memory,
            otlp_endpoint: self.otlp_endpoint,
            controller: self.controller.filter(|c| !c.is_empty()),
            log_level: self.proxy_log_level,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the admission webhook over HTTPS.
    Serve {
        #[arg(long, env = "FERRY_INJECTOR_ADDR", default_value = "0.0.0.0:8443")]
        addr: SocketAddr,
        #[arg(
            long,
            env = "FERRY_INJECTOR_CERT",
            default_value = "/etc/ferry-injector/tls.crt"
        )]
        cert: PathBuf,
        #[arg(
            long,
            env = "FERRY_INJECTOR_KEY",
            default_value = "/etc/ferry-injector/tls.key"
        )]
        key: PathBuf,
        /// How often the certificate files are checked for rotation.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        cert_reload: Duration,
        #[command(flatten)]
        settings: Settings,
    },
    /// Inject manifests from a file (or - for stdin) and print them.
    Inject {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        settings: Settings,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_INJECTOR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let r = match Cli::parse().command {
        Command::Serve {
            addr,
            cert,
            key,
            cert_reload,
            settings,
        } => settings.config().and_then(|cfg| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(ferry_injector::server::serve(
                    addr,
                    cert,
                    key,
                    cfg,
                    cert_reload,
                ))
        }),
        Command::Inject { file, settings } => settings.config().and_then(|cfg| {
            let mut text = String::new();
            if file.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text)?;
            } else {
                text = std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            }
            let (out, notes) = ferry_injector::workloads::inject_yaml(&text, &cfg)?;
            for n in notes {
                eprintln!("ferry-injector: {n}");
            }
            print!("{out}");
            Ok(())
        }),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-injector: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
