//! `ferry proxy`: the sidecar. Reads the file layer (policy file and/or pod
//! annotations), binds listeners and the admin API, reloads on change and on SIGHUP,
//! and drains on SIGTERM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_admin::{AdminState, Control};
use ferry_policy::annotations::{PodAnnotations, parse_downward_api};
use ferry_policy::{Errors, FieldError, Policy, contract};
use ferry_proxy::{ControllerDiscover, DefaultDiscover, Discover, Metrics, Proxy, Shared};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(clap::Args, Clone)]
pub struct ProxyArgs {
    /// Policy file (explicit mode). Without it, ferry runs as a pod sidecar with
    /// transparent listeners on 15001 (outbound) and 15006 (inbound).
    #[arg(long, short, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The pod's annotations as the downward API writes them.
    #[arg(long, env = "FERRY_ANNOTATIONS")]
    pub annotations: Option<PathBuf>,
    /// Worker threads; 1 runs everything on one thread, the cheapest for a sidecar.
    #[arg(long, env = "FERRY_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Log filter, as RUST_LOG (`info`, `ferry=debug`).
    #[arg(long, env = "FERRY_LOG", default_value = "info")]
    pub log_level: String,
    /// Log as JSON lines.
    #[arg(long, env = "FERRY_LOG_JSON")]
    pub log_json: bool,
    /// File holding the bearer token that lets non-loopback callers change things.
    #[arg(long, env = "FERRY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// How often services named by `dns:` are resolved again.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub dns_refresh: Duration,
    /// The discovery controller (`http://ferry-controller.ferry-system:8086`): transparent
    /// destinations that are Kubernetes Services are balanced over their endpoints.
    #[arg(long, env = "FERRY_CONTROLLER")]
    pub controller: Option<String>,
    /// This pod's node, sent to the controller for locality (downward API spec.nodeName).
    #[arg(long, env = "FERRY_NODE_NAME", default_value = "")]
    pub node_name: String,
    /// A destination no new connection asked for in this long is unsubscribed.
    #[arg(long, env = "FERRY_DISCOVERY_IDLE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub discovery_idle: Duration,
    /// How the policy and annotations files are watched: `inotify`, re-read when their
    /// directory changes (the kubelet's symlink swap included), or `poll`, re-read every
    /// `--watch-interval`. Without inotify (or its watches), ferry polls.
    #[arg(long, value_enum, default_value = "inotify")]
    pub watch_files: WatchFiles,
    /// How often the files are re-read when polled.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub watch_interval: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WatchFiles {
    Inotify,
    Poll,
}

const POD_ANNOTATIONS: &str = contract::ANNOTATIONS_FILE;

pub fn main(args: ProxyArgs) -> anyhow::Result<()> {
    let set_level = init_logging(&args)?;
    let rt = if args.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()?
    };
    rt.block_on(run(args, Some(set_level), None))
}

type LevelSetter = ferry_admin::SetLogLevel;

fn init_logging(args: &ProxyArgs) -> anyhow::Result<LevelSetter> {
    let filter = EnvFilter::try_new(&args.log_level).context("--log-level")?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    if args.log_json {
        registry.with(fmt.json()).try_init()?;
    } else {
        registry.with(fmt).try_init()?;
    }
    Ok(Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| format!("is not a log filter ({e})"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

/// Where the file layer comes from.
#[derive(Clone)]
struct Sources {
    config: Option<PathBuf>,
    annotations: Option<PathBuf>,
}

impl Sources {
    fn from_args(args: &ProxyArgs) -> Sources {
        let annotations = args.annotations.clone().or_else(|| {
            let p = PathBuf::from(POD_ANNOTATIONS);
            (args.config.is_none() && p.exists()).then_some(p)
        });
        Sources {
            config: args.config.clone(),
            annotations,
        }
    }

    fn origin(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.config {
            parts.push(format!("policy file {}", c.display()));
        } else {
            parts.push("pod defaults".to_string());
        }
        if let Some(a) = &self.annotations {
            parts.push(format!("annotations {}", a.display()));
        }
        parts.join(" + ")
    }

    /// Events in the directories of the files: written and closed, created, moved in
    /// or out (an atomic replace, the kubelet's `..data` swap), deleted.
    fn inotify(&self) -> std::io::Result<inotify::EventStream<[u8; 1024]>> {
        use inotify::{Inotify, WatchMask};
        let inotify = Inotify::init()?;
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE;
        for path in [&self.config, &self.annotations].into_iter().flatten() {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            inotify.watches().add(dir, mask).map_err(|e| {
                std::io::Error::new(e.kind(), format!("watching {}: {e}", dir.display()))
            })?;
        }
        inotify.into_event_stream([0u8; 1024])
    }

    /// The raw bytes of every source, to tell whether anything changed.
    fn snapshot(&self) -> Vec<Option<Vec<u8>>> {
        [&self.config, &self.annotations]
            .into_iter()
            .map(|p| p.as_ref().and_then(|p| std::fs::read(p).ok()))
            .collect()
    }

    /// Reads and validates the file layer: policy file (or pod defaults), then the
    /// annotations over it.
    fn load(&self) -> Result<Policy, Errors> {
        let base = match &self.config {
            Some(path) => Policy::from_yaml(&read(path)?)?,
            None => pod_defaults(),
        };
        let Some(path) = &self.annotations else {
            return Ok(base);
        };
        let map = parse_downward_api(&read(path)?)?;
        let layer = PodAnnotations::from_map(&map)?.policy_layer();
        Ok(base.overlay(&layer))
    }
}

fn read(path: &Path) -> Result<String, Errors> {
    std::fs::read_to_string(path).map_err(|e| {
        FieldError::new(
            path.display().to_string(),
            "",
            format!("cannot be read: {e}"),
        )
        .into()
    })
}

/// A pod sidecar's listeners: everything iptables redirects.
fn pod_defaults() -> Policy {
    use contract::{ADMIN_PORT as A, INBOUND_PORT as I, OUTBOUND_PORT as O};
    let mut doc = format!(
        "admin: 0.0.0.0:{A}\nlisteners:\n  - {{name: outbound, bind: \"0.0.0.0:{O}\", transparent: outbound}}\n  - {{name: inbound, bind: \"0.0.0.0:{I}\", transparent: inbound}}\n",
    );
    if has_ipv6() {
        doc.push_str(&format!("  - {{name: outbound-v6, bind: \"[::]:{O}\", transparent: outbound}}\n  - {{name: inbound-v6, bind: \"[::]:{I}\", transparent: inbound}}\n"));
    }
    Policy::from_yaml(&doc).expect("built-in pod policy is valid")
}

fn has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty())
}

/// Returns freed pages to the system once the sidecar has been quiet for a second after
/// connections ended, went idle or were closed by the pool: jemalloc would otherwise
/// purge them only as later allocations tick its decay clock, which an idle sidecar
/// never does.
async fn give_back_memory() {
    loop {
        ferry_proxy::memory::quiet_after_freeing(Duration::from_secs(1)).await;
        let _ = tokio::task::spawn_blocking(purge_unused_pages).await;
    }
}

fn purge_unused_pages() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena's unused dirty pages.
    let name = c"arena.4096.purge";
    let (none, no_len) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: a NUL-terminated name of a control that reads and writes no value.
    let _ = unsafe { tikv_jemalloc_sys::mallctl(name.as_ptr(), none, no_len, none, 0) };
}

/// Runs the sidecar until drained. `announce` is printed after the listening lines.
pub async fn run(
    args: ProxyArgs,
    set_level: Option<LevelSetter>,
    announce: Option<&str>,
) -> anyhow::Result<()> {
    let sources = Sources::from_args(&args);
    let file = sources
        .load()
        .map_err(|e| anyhow::anyhow!("the policy is not valid:\n{e}"))?;
    if file.listeners.is_empty() {
        anyhow::bail!("the policy has no listeners; add `listeners:` (see docs/policy-file.md)");
    }
    let metrics = Metrics::new(ferry_proxy::metrics::Workload::from_env());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let tracer =
        ferry_telemetry::Tracer::from_env("ferry").context("tracing setup (OTEL_* variables)")?;
    tracer.register_metrics(&mut registry);
    let base = DefaultDiscover::new(args.dns_refresh);
    let discover: Arc<dyn Discover> = match args.controller.as_deref().filter(|c| !c.is_empty()) {
        Some(url) => Arc::new(ControllerDiscover::new(base, url, &args.node_name)?),
        None => Arc::new(base),
    };
    let shared = Shared::with_tracer(file.clone(), discover, metrics, tracer)
        .map_err(|e| anyhow::anyhow!("the policy is not valid:\n{e}"))?;
    tokio::spawn(shared.clone().forget_idle(args.discovery_idle));
    tokio::spawn(give_back_memory());
    let control = Control::new(shared.clone(), file.clone(), sources.origin());

    let proxy = Proxy::bind(shared.clone()).await?;
    let signals = Signals::install()?;
    let (drain_tx, drain_rx) = watch::channel(false);
    let drain_tx = Arc::new(drain_tx);

    let admin = match file.admin_addr() {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin API cannot bind {addr}"))?,
        ),
        None => None,
    };
    // One write, so the lines a supervisor or test reads arrive together.
    let mut lines = String::new();
    if let Some(l) = &admin {
        lines.push_str(&format!("ferry: listening admin {}\n", l.local_addr()?));
    }
    for (name, addr) in proxy.local_addrs() {
        lines.push_str(&format!("ferry: listening {name} {addr}\n"));
    }
    lines.push_str("ferry: ready\n");
    if let Some(a) = announce {
        lines.push_str(a);
        lines.push('\n');
    }
    let mut out = std::io::stdout();
    out.write_all(lines.as_bytes())?;
    out.flush()?;

    let token = match &args.admin_token_file {
        Some(p) => Some(Arc::<str>::from(
            std::fs::read_to_string(p)
                .with_context(|| format!("admin token file {}", p.display()))?
                .trim(),
        )),
        None => std::env::var("FERRY_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(Arc::from),
    };
    let admin_task = admin.map(|listener| {
        let d = drain_tx.clone();
        let state = AdminState {
            control: control.clone(),
            registry: Arc::new(registry),
            token,
            set_log_level: set_level,
            shutdown: Arc::new(move || {
                d.send_replace(true);
            }),
        };
        // The admin API outlives the drain, so probes see it happen.
        tokio::spawn(ferry_admin::serve(listener, state, std::future::pending()))
    });

    tokio::spawn(watch_sources(
        sources,
        control.clone(),
        args.watch_files,
        args.watch_interval,
        signals.hup,
        drain_rx.clone(),
    ));
    tokio::spawn(wait_for_signals(
        signals.term,
        signals.int,
        drain_tx.clone(),
    ));

    let clean = proxy.serve(drain_rx).await;
    shared.tracer.flush(Duration::from_secs(3)).await;
    if clean {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("drain timeout passed with connections still open; exiting");
    }
    if let Some(t) = admin_task {
        t.abort();
    }
    Ok(())
}

/// The signals ferry handles, installed before it reports ready so none is missed.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

async fn wait_for_signals(mut term: Signal, mut int: Signal, drain: Arc<watch::Sender<bool>>) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    drain.send_replace(true);
}

/// Re-reads the sources when their directories change (or every `every`, when polled),
/// and at SIGHUP; reloads when their bytes changed.
async fn watch_sources(
    sources: Sources,
    control: Arc<Control>,
    mode: WatchFiles,
    every: Duration,
    mut hup: Signal,
    mut drain: watch::Receiver<bool>,
) {
    use futures::StreamExt;
    let mut events = match mode {
        WatchFiles::Poll => None,
        WatchFiles::Inotify => match sources.inotify() {
            Ok(events) => Some(events),
            Err(error) => {
                tracing::warn!(%error, ?every, "cannot watch the policy files; polling them");
                None
            }
        },
    };
    let mut last = sources.snapshot();
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(every), if events.is_none() => false,
            e = async { events.as_mut()?.next().await }, if events.is_some() => {
                match e {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::warn!(%error, ?every, "watching the policy files failed; polling them");
                        events = None;
                    }
                    None => events = None,
                }
                false
            }
            Some(_) = hup.recv() => true,
            _ = drain.wait_for(|v| *v) => return,
        };
        let now = sources.snapshot();
        if now == last && !forced {
            continue;
        }
        last = now;
        tracing::info!(forced, "policy sources changed; reloading");
        let _ = control.set_file(sources.load());
    }
}
