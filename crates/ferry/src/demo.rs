//! `ferry demo`: the proxy in front of two bundled HTTP and two bundled gRPC upstreams,
//! all on loopback, so a newcomer sees it work with nothing else installed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::proxy::{ProxyArgs, run};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Port of the HTTP listener; gRPC is the next one up.
    #[arg(long, default_value_t = 4140)]
    port: u16,
    /// Admin API port.
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    /// Exit after the sample calls instead of serving until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Run one demo upstream only (`http` or `grpc`), as the demo app in deploy/ does.
    #[arg(long, value_parser = ["http", "grpc"])]
    serve: Option<String>,
    /// The upstream's name in its answers.
    #[arg(long, default_value = "demo")]
    name: String,
    /// Where the upstream listens.
    #[arg(long, default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Call this Echo service (host:port) repeatedly and print who answered.
    #[arg(long)]
    call: Option<String>,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    every: Duration,
}

async fn upstream() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

pub fn main(args: DemoArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    if let Some(kind) = &args.serve {
        let l = TcpListener::bind(args.listen).await?;
        println!(
            "ferry demo: {kind} upstream {} on {}",
            args.name,
            l.local_addr()?
        );
        return match kind.as_str() {
            "http" => Ok(ferry_demo::serve_http(args.name.clone(), l).await?),
            _ => ferry_demo::serve_grpc(args.name.clone(), l).await,
        };
    }
    if let Some(target) = &args.call {
        return call_forever(target, args.every).await;
    }
    let mut http = Vec::new();
    let mut grpc = Vec::new();
    for name in ["http-a", "http-b"] {
        let (l, a) = upstream().await?;
        tokio::spawn(ferry_demo::serve_http(name.to_string(), l));
        http.push(a);
    }
    for name in ["grpc-a", "grpc-b"] {
        let (l, a) = upstream().await?;
        tokio::spawn(ferry_demo::serve_grpc(name.to_string(), l));
        grpc.push(a);
    }
    let (hp, gp) = (args.port, args.port + 1);
    let policy = format!(
        "# ferry demo policy: edit and save, ferry reloads it.\n\
         admin: 127.0.0.1:{admin}\n\
         listeners:\n  - {{name: demo-http, bind: \"127.0.0.1:{hp}\", service: demo-http}}\n  - {{name: demo-grpc, bind: \"127.0.0.1:{gp}\", service: demo-grpc}}\n\
         defaults:\n  timeout: 5s\n\
         services:\n  demo-http:\n    lb: round-robin\n    endpoints: [\"{h0}\", \"{h1}\"]\n  demo-grpc:\n    lb: round-robin\n    endpoints: [\"{g0}\", \"{g1}\"]\n",
        admin = args.admin_port,
        h0 = http[0],
        h1 = http[1],
        g0 = grpc[0],
        g1 = grpc[1],
    );
    let path = std::env::temp_dir().join(format!("ferry-demo-{}.yaml", std::process::id()));
    std::fs::write(&path, policy).with_context(|| format!("writing {}", path.display()))?;
    let announce = format!(
        "\nferry demo: the proxy runs in front of two HTTP and two gRPC upstreams.\n\
         \n  curl http://127.0.0.1:{hp}/                        # answers alternate: hello from http-a / http-b\n\
         \x20 curl http://127.0.0.1:{admin}/endpoints              # balancer state\n\
         \x20 curl http://127.0.0.1:{admin}/policy                 # the running policy, its version and history\n\
         \x20 curl -s http://127.0.0.1:{admin}/metrics | grep ferry_requests\n\
         \n  gRPC (ferry.demo.Echo) listens on 127.0.0.1:{gp}.\n\
         \x20 policy file: {path} (edit it: ferry reloads)\n\
         \x20 Ctrl-C drains and exits.\n",
        admin = args.admin_port,
        path = path.display(),
    );
    let proxy_args = ProxyArgs {
        config: Some(path.clone()),
        annotations: None,
        workers: 1,
        log_level: "warn".into(),
        log_json: false,
        admin_token_file: None,
        watch_files: crate::proxy::WatchFiles::Inotify,
        watch_interval: Duration::from_secs(1),
        dns_refresh: Duration::from_secs(5),
        controller: None,
        node_name: String::new(),
        discovery_idle: Duration::from_secs(300),
    };
    let proxy = tokio::spawn(async move { run(proxy_args, None, Some(&announce)).await });

    // Show the balancing right away: a few calls of each kind through the proxy.
    let http_target: SocketAddr = ([127, 0, 0, 1], hp).into();
    let grpc_target: SocketAddr = ([127, 0, 0, 1], gp).into();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..4 {
        match ferry_demo::http_get(http_target, "/").await {
            Ok(body) => println!("  HTTP call {i}: {}", body.trim()),
            Err(e) => println!("  HTTP call {i} failed: {e:#}"),
        }
    }
    for i in 0..4 {
        match ferry_demo::grpc_say(grpc_target, "hi").await {
            Ok(reply) => println!("  gRPC call {i}: {reply}"),
            Err(e) => println!("  gRPC call {i} failed: {e:#}"),
        }
    }
    if args.once {
        let _ = std::fs::remove_file(&path);
        return Ok(());
    }
    let r = proxy.await?;
    let _ = std::fs::remove_file(&path);
    r
}

/// The demo client: one Echo call per tick, through whatever ferry sidecar is in front.
async fn call_forever(target: &str, every: Duration) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        let addr = tokio::net::lookup_host(target)
            .await?
            .next()
            .context("no address")?;
        match ferry_demo::grpc_say(addr, &format!("call {n}")).await {
            Ok(reply) => println!("{reply}"),
            Err(e) => println!("call {n} failed: {e:#}"),
        }
    }
}
