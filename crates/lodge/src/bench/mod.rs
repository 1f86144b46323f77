//! `lodge bench`: measures a live Lodge over its public API and real sockets, every figure next
//! to a baseline taken in the same run, and prints the tables of BENCHMARKS.md.
//!
//! Scenarios: `warm` (CreateRoom → active into free slots, by concurrency, and the sustained
//! rate), `cold` (CreateRoom → active on a new process, minus the server's own exec-to-bind, per
//! driver and isolation), `proxy` (UDP latency and packet rate, TCP throughput and connection
//! rate: direct, through Lodge, through nginx), `scale` (latency and memory per room with many
//! rooms and processes, with pretend processes), `abuse` (what hostile traffic costs: /livez
//! under floods and slow clients, memory under an archive bomb), `nodes` (a fleet: nodes held
//! per control plane, the control plane killed under live rooms, a killed agent, one build
//! reaching many nodes).

mod abuse;
mod echo;
mod net;
mod nodes;
mod pg;
mod placement;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

pub use echo::run as echo_server;
use server::{Server, Setup};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Short mode: every scenario, small sample sizes, done in about a minute (what CI runs).
    #[arg(long)]
    pub quick: bool,
    /// Scenarios to run, comma-separated: warm, cold, proxy, scale, abuse, nodes (default: all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The largest room count of the scale scenario (default 100000; 2000 with --quick).
    #[arg(long)]
    pub scale_rooms: Option<usize>,
    /// Also run the warm scenario on PostgreSQL at this URL (in a schema of its own, dropped
    /// after), with pgbench's single-row INSERT rate on the same database as its baseline.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Also write every table as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<std::path::PathBuf>,
}

pub type Result<T> = std::result::Result<T, String>;

fn pct(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn median(xs: &[f64]) -> f64 {
    pct(xs, 0.5)
}

/// A table printed as it fills, and kept for the JSON report.
struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(title: &str, header: &[&str]) -> Self {
        Self {
            title: title.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }
    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    /// Print it as a Markdown table.
    fn print(&self) {
        println!("\n## {}\n", self.title);
        println!("| {} |", self.header.join(" | "));
        println!("|{}", "---|".repeat(self.header.len()));
        for r in &self.rows {
            println!("| {} |", r.join(" | "));
        }
    }
    fn json(&self) -> Value {
        json!({"title": self.title, "header": self.header, "rows": self.rows})
    }
}

fn ms(x: f64) -> String {
    if x.is_nan() {
        "n/a".into()
    } else {
        format!("{x:.2} ms")
    }
}

fn us(x: f64) -> String {
    if x.is_nan() {
        "n/a".into()
    } else {
        format!("{x:.0} µs")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "n/a".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    // Many sockets (1,000 UDP clients): raise the soft descriptor limit to the hard one.
    crate::node::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
        println!(
            "# Lodge benchmarks ({} mode)\n\nmachine: {}",
            if args.quick { "quick" } else { "full" },
            server::machine()
        );
        let mut tables = Vec::new();
        let mut add = |t: Vec<Table>| {
            for x in &t {
                x.print();
            }
            tables.extend(t);
        };
        if wanted("warm") {
            add(warm(&args).await?);
        }
        if wanted("cold") {
            add(cold(&args).await?);
        }
        if wanted("proxy") {
            add(proxy(&args).await?);
        }
        if wanted("scale") {
            add(scale(&args).await?);
        }
        if wanted("abuse") {
            add(abuse::run(&args).await?);
        }
        if wanted("nodes") {
            add(nodes::run(&args).await?);
        }
        if let Some(path) = &args.report {
            let doc = json!({"machine": server::machine(), "quick": args.quick, "tables": tables.iter().map(Table::json).collect::<Vec<_>>()});
            std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap_or_default())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    })
}

// --- warm ------------------------------------------------------------------------------------

/// CreateRoom until active; returns the latency in ms and the room id.
async fn room_to_active(s: &Setup, region: &str) -> Result<(f64, String, String)> {
    let t0 = Instant::now();
    let created = s.create_room(region).await?;
    let room = created["roomId"].as_str().unwrap_or_default().to_string();
    let process = created["processId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if created["status"] != "active" {
        loop {
            let info = s.connection_info(&room).await?;
            if info["status"] == "active" {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!("room {room} not active after 60 s"));
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    Ok((t0.elapsed().as_secs_f64() * 1000.0, room, process))
}

async fn warm(args: &BenchArgs) -> Result<Vec<Table>> {
    let mut tables = warm_on(args, "embedded SQLite", &[], 1).await?;
    if let Some(url) = &args.postgres {
        let schema = pg::Schema::create(url, "one").await?;
        let on_pg = warm_on(args, "PostgreSQL", &["--store", &schema.url()], 1).await;
        let baseline =
            pg::pgbench_insert_tps(url, &schema.name, if args.quick { 2 } else { 5 }).await;
        schema.drop().await;
        // Two replicas on a database of their own (the first run's node is gone, but its
        // record would stay schedulable for a few seconds), requests alternating between them.
        let schema = pg::Schema::create(url, "two").await?;
        let on_two = warm_on(
            args,
            "PostgreSQL, 2 replicas",
            &["--store", &schema.url()],
            2,
        )
        .await;
        schema.drop().await;
        tables.append(&mut on_pg?);
        tables.append(&mut on_two?);
        tables.push(baseline?);
    }
    Ok(tables)
}

/// The warm scenario on one store; with `replicas` > 1, further replicas on the same store
/// (no node of their own) take every other client's requests.
async fn warm_on(
    args: &BenchArgs,
    store: &str,
    extra: &[&str],
    replicas: usize,
) -> Result<Vec<Table>> {
    let mut serve_args = vec!["--isolation", "none"];
    serve_args.extend_from_slice(extra);
    let server = Server::start(&serve_args).await?;
    let first = server.setup(10_000).await?;
    let mut others = Vec::new();
    let mut via = vec![first.clone()];
    for _ in 1..replicas {
        let r = server.start_replica(extra).await?;
        via.push(first.via(&r)?);
        others.push(r);
    }
    let pick = |i: usize| via[i % via.len()].clone();
    let s = first.clone();
    let region = "Chicago";
    let p = s.create_process(region).await?;
    s.wait_process_running(&p).await?;

    let mut t = Table::new(
        &format!(
            "Warm room allocation ({store}): CreateRoom → active into a process with free slots"
        ),
        &[
            "concurrent clients",
            "rooms",
            "p50",
            "p99",
            "baseline GET /livez p50",
            "p50 ratio",
        ],
    );
    let per_level = if args.quick { 200 } else { 2000 };
    for clients in [1usize, 8, 64] {
        let livez = s.livez_p50(if args.quick { 100 } else { 500 }).await?;
        let lat = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..clients {
            let (s, lat) = (pick(c), lat.clone());
            let n = per_level / clients;
            tasks.spawn(async move {
                for _ in 0..n.max(1) {
                    let (ms, room, _) = room_to_active(&s, region).await?;
                    lat.lock().await.push(ms);
                    s.destroy_room(&room).await?;
                }
                Ok::<_, String>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        let l = lat.lock().await;
        t.row(vec![
            clients.to_string(),
            l.len().to_string(),
            ms(median(&l)),
            ms(pct(&l, 0.99)),
            ms(livez),
            ratio(median(&l), livez),
        ]);
    }

    let mut r = Table::new(
        &format!("Sustained CreateRoom rate ({store}; each client: create, then destroy to recycle the slot)"),
        &["concurrent clients", "CreateRoom/s", "p50", "p99"],
    );
    let secs = if args.quick { 1.0 } else { 5.0 };
    let mut best = 0.0f64;
    for clients in [8usize, 16, 32, 64, 128] {
        let lat = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..clients {
            let (s, lat) = (pick(c), lat.clone());
            tasks.spawn(async move {
                while start.elapsed().as_secs_f64() < secs {
                    let t0 = Instant::now();
                    let created = s.create_room(region).await?;
                    lat.lock().await.push(t0.elapsed().as_secs_f64() * 1000.0);
                    s.destroy_room(created["roomId"].as_str().unwrap_or_default())
                        .await?;
                }
                Ok::<_, String>(())
            });
        }
        while let Some(res) = tasks.join_next().await {
            res.map_err(|e| e.to_string())??;
        }
        let l = lat.lock().await;
        let rate = l.len() as f64 / start.elapsed().as_secs_f64();
        r.row(vec![
            clients.to_string(),
            format!("{rate:.0}"),
            ms(median(&l)),
            ms(pct(&l, 0.99)),
        ]);
        if pct(&l, 0.99) <= 10.0 {
            best = best.max(rate);
        }
    }
    r.row(vec![
        "best with p99 ≤ 10 ms".into(),
        format!("{best:.0}"),
        String::new(),
        String::new(),
    ]);
    for r in others {
        r.stop_replica();
    }
    server.shutdown(&s).await;
    Ok(vec![t, r])
}

// --- cold ------------------------------------------------------------------------------------

async fn cold(args: &BenchArgs) -> Result<Vec<Table>> {
    let n = if args.quick { 5 } else { 20 };
    let mut t = Table::new(
        &format!("Cold start: CreateRoom → active on a new process (median of {n})"),
        &[
            "driver / isolation",
            "CreateRoom → active",
            "server's own exec → bind (direct)",
            "overhead",
        ],
    );
    let root = lodge_agent::sys::is_root();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut modes: Vec<(&str, &str)> = vec![("process / none", "none")];
    if root {
        modes.push(("process / netns", "netns"));
    }
    for (label, isolation) in modes {
        let baseline = server::direct_start_median(&exe, &["echo-server", "--port"], n).await?;
        let server = Server::start(&["--isolation", isolation]).await?;
        let s = server.setup(1).await?;
        let lat = cold_rooms(&s, n).await?;
        t.row(vec![
            label.into(),
            ms(median(&lat)),
            ms(baseline),
            ms(median(&lat) - baseline),
        ]);
        server.shutdown(&s).await;
    }
    match server::oci_fixture().await {
        Ok(Some(fixture)) if root => {
            let baseline = server::direct_start_median(&fixture.binary, &[], n).await?;
            let server = Server::start(&["--isolation", "netns"]).await?;
            match server.setup_image(&fixture.archive, 1).await {
                Ok(s) => {
                    let lat = cold_rooms(&s, n).await?;
                    t.row(vec![
                        format!("oci ({}) / netns", server.runtime_name()),
                        ms(median(&lat)),
                        ms(baseline),
                        ms(median(&lat) - baseline),
                    ]);
                    server.shutdown(&s).await;
                }
                Err(e) => t.row(vec![
                    "oci / netns".into(),
                    format!("skipped: {e}"),
                    "".into(),
                    "".into(),
                ]),
            }
        }
        Ok(_) => t.row(vec![
            "oci / netns".into(),
            "skipped: needs root, gcc (static libc) and crun or runc".into(),
            "".into(),
            "".into(),
        ]),
        Err(e) => t.row(vec![
            "oci / netns".into(),
            format!("skipped: {e}"),
            "".into(),
            "".into(),
        ]),
    }
    Ok(vec![t])
}

async fn cold_rooms(s: &Setup, n: usize) -> Result<Vec<f64>> {
    let mut lat = Vec::new();
    for _ in 0..n {
        let (ms, _, process) = room_to_active(s, "Tokyo").await?;
        lat.push(ms);
        s.stop_process(&process).await?;
        s.wait_process_ended(&process).await?;
    }
    Ok(lat)
}

// --- proxy -----------------------------------------------------------------------------------

/// One way to reach an echo server, and what runs on the server side of it (to pin).
struct Path {
    name: String,
    udp: SocketAddr,
    tcp: SocketAddr,
    servers: Vec<u32>,
    /// The path its "added" round trip is measured against (its own index for the baselines).
    baseline: usize,
}

/// The kernel-forwarded room of a `lodge serve` with netns isolation: its public ports on
/// loopback, and the same ports inside the process's namespace (routed, without NAT).
async fn kernel_paths(
    server: &Server,
    s: &Setup,
) -> Result<(SocketAddr, SocketAddr, SocketAddr, SocketAddr, u32)> {
    let (_, room, _) = room_to_active(s, "London").await?;
    let info = s.connection_info(&room).await?;
    let port = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as u16;
    let udp: SocketAddr = ([127, 0, 0, 1], port(&info["exposedPort"]["port"])).into();
    let tcp: SocketAddr = (
        [127, 0, 0, 1],
        port(&info["additionalExposedPorts"][0]["port"]),
    )
        .into();
    let state = server
        .process_states()
        .into_iter()
        .next()
        .ok_or("the kernel-forwarded process has no state")?;
    let inner = |i: usize| -> Result<SocketAddr> {
        state["targets"][i]["target"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| "the process state names no target".to_string())
    };
    let game = state["gamePid"].as_u64().unwrap_or(0) as u32;
    Ok((udp, tcp, inner(0)?, inner(1)?, game))
}

async fn proxy(args: &BenchArgs) -> Result<Vec<Table>> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let direct_port = server::free_port()?;
    let mut direct = tokio::process::Command::new(&exe)
        .args(["echo-server", "--port", &direct_port.to_string()])
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let direct_pid = direct.id().unwrap_or(0);
    let direct_addr: SocketAddr = ([127, 0, 0, 1], direct_port).into();
    if !net::wait_udp(direct_addr, Duration::from_secs(10)) {
        return Err("the direct echo server did not start".into());
    }
    let server = Server::start(&["--isolation", "none"]).await?;
    let s = server.setup_with_tcp(10).await?;
    let (_, room, _) = room_to_active(&s, "London").await?;
    let info = s.connection_info(&room).await?;
    let lodge_port = info["exposedPort"]["port"].as_u64().unwrap_or(0) as u16;
    let lodge_addr: SocketAddr = ([127, 0, 0, 1], lodge_port).into();
    let lodge_tcp_port = info["additionalExposedPorts"][0]["port"]
        .as_u64()
        .unwrap_or(0) as u16;
    let lodge_tcp: SocketAddr = ([127, 0, 0, 1], lodge_tcp_port).into();
    let proxied_games: Vec<u32> = server
        .process_states()
        .iter()
        .filter_map(|st| st["gamePid"].as_u64().map(|p| p as u32))
        .collect();
    let nginx = server::Nginx::start(direct_port).await;
    let mut paths = vec![
        Path {
            name: "direct to the game server".into(),
            udp: direct_addr,
            tcp: direct_addr,
            servers: vec![direct_pid],
            baseline: 0,
        },
        Path {
            name: "through Lodge's proxy".into(),
            udp: lodge_addr,
            tcp: lodge_tcp,
            servers: [vec![server.pid()], proxied_games].concat(),
            baseline: 0,
        },
    ];
    match &nginx {
        Ok(n) => paths.push(Path {
            name: "through nginx stream proxy".into(),
            udp: n.addr,
            tcp: n.addr,
            servers: vec![n.pid(), direct_pid],
            baseline: 0,
        }),
        Err(e) => println!("\n(nginx comparison skipped: {e})"),
    }
    // Kernel forwarding: a second Lodge with netns isolation (root only).
    let kernel = if lodge_agent::sys::is_root() {
        match Server::start(&["--isolation", "netns", "--forwarding", "kernel"]).await {
            Ok(k) => match k.setup_with_tcp(10).await {
                Ok(ks) => Some((k, ks)),
                Err(e) => {
                    println!("\n(kernel forwarding skipped: {e})");
                    None
                }
            },
            Err(e) => {
                println!("\n(kernel forwarding skipped: {e})");
                None
            }
        }
    } else {
        println!("\n(kernel forwarding skipped: needs root)");
        None
    };
    if let Some((k, ks)) = &kernel {
        let (udp, tcp, inner_udp, inner_tcp, game) = kernel_paths(k, ks).await?;
        let base = paths.len();
        paths.push(Path {
            name: "direct into a process's namespace (routed, no NAT)".into(),
            udp: inner_udp,
            tcp: inner_tcp,
            servers: vec![game],
            baseline: base,
        });
        paths.push(Path {
            name: "through the kernel (nftables DNAT)".into(),
            udp,
            tcp,
            servers: vec![game],
            baseline: base,
        });
    }

    let (n_rtt, secs, many) = if args.quick {
        (2000, 0.5, 200)
    } else {
        (20_000, 2.0, 1000)
    };
    let mut t1 = Table::new(
        "Proxy: UDP round trip, 100-byte datagrams, one client, by CPU placement (same CPU: client and server side on CPU 0; split: client on 0, server side on 1)",
        &["path", "placement", "p50", "p99", "p99.9", "p50 vs its direct path", "added p50"],
    );
    let mut t2 = Table::new(
        "Proxy: throughput (unpinned)",
        &[
            "path",
            "UDP datagrams/s (≤0.1% loss)",
            "TCP echo MB/s",
            "TCP connections/s",
        ],
    );
    let mut t3 = Table::new(
        &format!("Proxy: {many} concurrent UDP clients, one datagram each every 50 ms (unpinned)"),
        &[
            "path",
            "p50",
            "p99",
            "first datagram p50",
            "first datagram p99",
            "loss",
        ],
    );
    for placement in placement::Placement::all() {
        let mut p50s: Vec<f64> = Vec::new();
        for path in &paths {
            let addr = path.udp;
            placement.place_servers(&path.servers);
            let rtts = tokio::task::spawn_blocking(move || {
                placement.place_client();
                let r = net::udp_rtts(addr, n_rtt, 100);
                placement::Placement::Unpinned.place_client();
                r
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            placement::Placement::release(&path.servers);
            let p50 = median(&rtts);
            p50s.push(p50);
            let base = p50s.get(path.baseline).copied().unwrap_or(p50);
            t1.row(vec![
                path.name.clone(),
                placement.label().into(),
                us(p50),
                us(pct(&rtts, 0.99)),
                us(pct(&rtts, 0.999)),
                ratio(p50, base),
                format!("{:+.1} µs", p50 - base),
            ]);
        }
    }
    for path in &paths {
        let (addr, tcp) = (path.udp, path.tcp);
        let (cap, trial) = if args.quick {
            (40_000, 0.3)
        } else {
            (640_000, 1.0)
        };
        let rate = tokio::task::spawn_blocking(move || net::max_udp_rate(addr, 5000, cap, trial))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let tput = tokio::task::spawn_blocking(move || net::tcp_throughput(tcp, secs))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let conns = tokio::task::spawn_blocking(move || net::tcp_connection_rate(tcp, secs, 4))
            .await
            .map_err(|e| e.to_string())?;
        t2.row(vec![
            path.name.clone(),
            format!("{rate}"),
            format!("{:.0}", tput / 1e6),
            format!("{conns:.0}"),
        ]);
        let m = net::udp_many(addr, many, Duration::from_millis(50), secs.max(1.0))
            .await
            .map_err(|e| e.to_string())?;
        t3.row(vec![
            path.name.clone(),
            us(median(&m.rtts)),
            us(pct(&m.rtts, 0.99)),
            us(median(&m.firsts)),
            us(pct(&m.firsts, 0.99)),
            format!("{:.2}%", m.lost * 100.0),
        ]);
    }
    drop(nginx);
    let _ = direct.kill().await;
    server.shutdown(&s).await;
    if let Some((k, ks)) = kernel {
        k.shutdown(&ks).await;
    }
    Ok(vec![t1, t2, t3])
}

// --- scale -----------------------------------------------------------------------------------

async fn scale(args: &BenchArgs) -> Result<Vec<Table>> {
    let max = args
        .scale_rooms
        .unwrap_or(if args.quick { 2000 } else { 100_000 });
    let mut levels: Vec<usize> = [1000usize, 10_000, 100_000]
        .into_iter()
        .filter(|l| *l <= max)
        .collect();
    if levels.last() != Some(&max) {
        levels.push(max);
    }
    if args.quick {
        levels = vec![max / 4, max];
    }
    let server = Server::start(&["--isolation", "none", "--fake-processes"]).await?;
    let s = server.setup(10).await?;
    let base_rss = server.rss_bytes();
    let mut t = Table::new(
        "Scale: CreateRoom latency and control-plane memory with many active rooms (pretend processes, 10 rooms each)",
        &["active rooms", "processes", "CreateRoom p50", "CreateRoom p99", "RSS", "memory per room"],
    );
    let mut rooms = 0usize;
    let regions = ["Seattle", "London", "Tokyo", "Frankfurt"];
    for level in levels {
        // Fill up to the level (not timed), 32 at a time.
        let todo = level.saturating_sub(rooms);
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..32 {
            let (s, counter) = (s.clone(), counter.clone());
            tasks.spawn(async move {
                while counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < todo {
                    s.create_room(regions[w % regions.len()]).await?;
                }
                Ok::<_, String>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        rooms += todo;
        // Measure: 200 more creates, one at a time.
        let mut lat = Vec::new();
        for i in 0..200 {
            let t0 = Instant::now();
            s.create_room(regions[i % regions.len()]).await?;
            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        rooms += 200;
        let rss = server.rss_bytes();
        t.row(vec![
            rooms.to_string(),
            rooms.div_ceil(10).to_string(),
            ms(median(&lat)),
            ms(pct(&lat, 0.99)),
            format!("{:.0} MiB", rss as f64 / (1 << 20) as f64),
            format!(
                "{:.2} KiB",
                rss.saturating_sub(base_rss) as f64 / rooms as f64 / 1024.0
            ),
        ]);
    }
    server.kill();
    Ok(vec![t])
}
