//! `nodes`: a fleet's control plane, with `lodge serve --no-local-node`.
//!
//! - Simulated nodes (the real agent with its pretend driver, over the real node protocol on
//!   TCP) held by one control plane: its CPU and memory per node, against itself with none.
//! - The control plane killed with -9 and restarted under live rooms on three real `lodge
//!   agent`s: datagrams lost by players during the outage, and how long after it is back every
//!   node (real and simulated) is attached again.
//! - An agent killed with -9: how long until no new room lands on it.
//! - One build reaching ten nodes: each downloads it once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lodge_agent::client::NodeClient;
use lodge_agent::{Agent, AgentConfig, Isolation};
use lodge_link::dial;
use lodge_model::protocol::NodeInfo;
use serde_json::{json, Value};

use super::server::{free_port, Server, Setup};
use super::{BenchArgs, Result, Table};

/// One simulated node in this process.
struct SimNode {
    _agent: Arc<Agent>,
    _client: Arc<NodeClient>,
}

struct Http {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl Http {
    fn new(server: &Server) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            url: server.url().to_string(),
            token: server.token().to_string(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.map_err(|e| e.to_string())?;
        let status = res.status();
        let v: Value = res.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {}", v["message"]));
        }
        Ok(v)
    }

    async fn join_token(&self, region: &str) -> Result<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/lodge/v1/nodes/join-tokens",
                Some(json!({ "region": region, "ttlSeconds": 3600 })),
            )
            .await?;
        Ok(v["token"].as_str().unwrap_or_default().to_string())
    }

    async fn nodes(&self) -> Result<Vec<Value>> {
        let v = self
            .call(reqwest::Method::GET, "/lodge/v1/nodes", None)
            .await?;
        Ok(v["nodes"].as_array().cloned().unwrap_or_default())
    }

    /// Nodes connected and heard from lately.
    async fn attached(&self) -> usize {
        self.nodes().await.map_or(0, |n| {
            n.iter()
                .filter(|n| n["connected"] == true && n["reachable"] == true)
                .count()
        })
    }

    async fn metric(&self, name: &str) -> Result<f64> {
        let text = self
            .client
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0))
    }
}

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at the state.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// CPU (share of one core) and RSS (bytes) of a process over `secs`.
async fn sample(server: &Server, secs: f64) -> (f64, u64) {
    let c0 = cpu_seconds(server.pid());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let cpu = (cpu_seconds(server.pid()) - c0) / t0.elapsed().as_secs_f64();
    (cpu, server.rss_bytes())
}

async fn wait_until(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    while !f().await {
        if t0.elapsed() > limit {
            return Err(format!("{what}: not within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(t0.elapsed())
}

async fn sim_nodes(http: &Http, n: usize, region: &str, dir: &Path) -> Result<Vec<SimNode>> {
    let token = http.join_token(region).await?;
    let api: SocketAddr = http
        .url
        .trim_start_matches("http://")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let info = NodeInfo {
            public_host: "127.0.0.1".into(),
            region: region.parse().map_err(|e: String| e)?,
            cpu: 1.0,
            memory_mb: 1024.0,
            // One process each: ten processes go to ten nodes.
            port_capacity: Some(1),
            ping_port: None,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        let joined = dial::join(&http.url, &token, &info, None)
            .await
            .map_err(|e| e.to_string())?;
        let data_dir = dir.join(format!("sim{i}"));
        let cfg = AgentConfig {
            node_id: joined.node_id.clone(),
            data_dir: data_dir.clone(),
            public_host: "127.0.0.1".into(),
            proxy_ip: [127, 0, 0, 1].into(),
            port_range: (40000, 40000),
            isolation: Isolation::None,
            forwarding: lodge_agent::Forwarding::Userspace,
            source_packet_rate: 0,
            bind_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(1),
            api_addr: api,
            exe: exe.clone(),
            instance: format!("sim{i:05}"),
            metrics_interval: Duration::from_secs(10),
            oci_runtime: None,
            fake_processes: true,
            game_users: false,
            flows: Default::default(),
            tls: None,
            fetcher: Some(Arc::new(lodge_link::artifacts::Fetcher::new(
                &http.url,
                &joined.credential,
                &data_dir,
            ))),
        };
        let (url, cred) = (http.url.clone(), joined.credential.clone());
        let dial = move || {
            let (url, cred) = (url.clone(), cred.clone());
            async move { dial::connect(&url, &cred).await }
        };
        let (agent, client) = crate::node::start_agent(cfg, Some(info), dial).await?;
        out.push(SimNode {
            _agent: agent,
            _client: client,
        });
    }
    Ok(out)
}

/// A real `lodge agent` as a child process.
struct RealAgent {
    child: std::process::Child,
    dir: PathBuf,
    host: String,
    killed: bool,
}

impl RealAgent {
    fn start(url: &str, token: &str, k: usize, dir: &Path) -> Result<Self> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = dir.join(format!("agent{k}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let host = format!("127.0.0.{}", k + 1);
        let lo = 34_000 + 100 * k as u16;
        let log = std::fs::File::create(dir.with_extension("log")).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(exe)
            .args(["agent", "--control-plane", url, "--join-token", token])
            .args(["--region", "Chicago", "--public-host", &host])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--port-range", &format!("{lo}-{}", lo + 99)])
            .args(["--ping-port", &free_port()?.to_string()])
            .args(["--isolation", "none", "--stop-grace", "1"])
            // Its own address, so its replies come from the address players sent to.
            .args(["--proxy-bind", &host])
            .args(["--flows-per-source", "100000"])
            // Pretend to be a big machine: rooms, not CPU reservations, are what is measured.
            .args(["--cpu", "256"])
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start lodge agent: {e}"))?;
        Ok(Self {
            child,
            dir,
            host,
            killed: false,
        })
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.killed = true;
    }

    /// Stop it and end what it ran.
    fn end(mut self) {
        if !self.killed {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let _ = self.child.wait();
        }
        if let Ok(exe) = std::env::current_exe() {
            let _ = std::process::Command::new(exe)
                .arg("cleanup")
                .arg("--data-dir")
                .arg(&self.dir)
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}

/// Datagrams to every room, every 100 ms, counting echoes.
struct Players {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    tasks: tokio::task::JoinSet<()>,
}

impl Players {
    async fn start(rooms: &[SocketAddr]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, echoed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = tokio::task::JoinSet::new();
        for &addr in rooms {
            let sock = Arc::new(
                tokio::net::UdpSocket::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?,
            );
            sock.connect(addr).await.map_err(|e| e.to_string())?;
            let (s, st, se) = (sock.clone(), stop.clone(), sent.clone());
            tasks.spawn(async move {
                let mut seq = 0u64;
                while !st.load(Ordering::Relaxed) {
                    seq += 1;
                    if s.send(format!("p{seq}").as_bytes()).await.is_ok() {
                        se.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            let (st, ec) = (stop.clone(), echoed.clone());
            tasks.spawn(async move {
                let mut buf = [0u8; 256];
                loop {
                    let got =
                        tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await;
                    match got {
                        Ok(Ok(_)) => {
                            ec.fetch_add(1, Ordering::Relaxed);
                        }
                        _ if st.load(Ordering::Relaxed) => return,
                        _ => {}
                    }
                }
            });
        }
        Ok(Self {
            stop,
            sent,
            echoed,
            tasks,
        })
    }

    async fn finish(mut self) -> (u64, u64) {
        // Let the last echoes arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        (
            self.sent.load(Ordering::Relaxed),
            self.echoed.load(Ordering::Relaxed),
        )
    }
}

fn big_bundle(bytes: usize) -> Result<Vec<u8>> {
    let mut blob = vec![0u8; bytes];
    // xorshift: incompressible, like a game's assets.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    super::server::tar_gz(&[
        ("lodge.toml", b"command = [\"sleep\", \"3600\"]\n", 0o644),
        ("assets.bin", &blob, 0o644),
    ])
}

pub async fn run(args: &BenchArgs) -> Result<Vec<Table>> {
    let sims = if args.quick { 50 } else { 1000 };
    let rooms = if args.quick { 12 } else { 100 };
    let outage = Duration::from_secs(if args.quick { 3 } else { 60 });
    let artifact_mb = if args.quick { 8 } else { 256 };
    let dir = std::env::temp_dir().join(format!(
        "lodge-bench-nodes-{}-{}",
        std::process::id(),
        &lodge_model::id::secret_hex()[..8]
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = scenario(sims, rooms, outage, artifact_mb, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn scenario(
    sims: usize,
    rooms: usize,
    outage: Duration,
    artifact_mb: usize,
    dir: &Path,
) -> Result<Vec<Table>> {
    let mut server = Server::start(&["--no-local-node", "--isolation", "none"]).await?;
    let http = Http::new(&server);

    // Held nodes: the control plane alone, then with `sims` simulated nodes.
    let (cpu0, rss0) = sample(&server, 3.0).await;
    let t0 = Instant::now();
    let nodes = sim_nodes(&http, sims, "Sydney", dir).await?;
    wait_until(
        "simulated nodes attached",
        Duration::from_secs(60),
        async || http.attached().await >= sims,
    )
    .await?;
    let join_s = t0.elapsed().as_secs_f64();
    let (cpu1, rss1) = sample(&server, 5.0).await;
    let mut held = Table::new(
        "Nodes held by one control plane (simulated nodes: the real agent and node protocol over TCP, pretend processes)",
        &["nodes", "control-plane CPU", "RSS", "per node: CPU", "per node: RSS", "joined and attached in"],
    );
    held.row(vec![
        "0 (baseline)".into(),
        format!("{:.1}% of a core", cpu0 * 100.0),
        format!("{:.1} MB", rss0 as f64 / 1e6),
        String::new(),
        String::new(),
        String::new(),
    ]);
    held.row(vec![
        sims.to_string(),
        format!("{:.1}% of a core", cpu1 * 100.0),
        format!("{:.1} MB", rss1 as f64 / 1e6),
        format!("{:.3}% of a core", (cpu1 - cpu0) * 100.0 / sims as f64),
        format!(
            "{:.1} KB",
            (rss1.saturating_sub(rss0)) as f64 / 1e3 / sims as f64
        ),
        format!("{join_s:.1} s"),
    ]);

    // One build, ten nodes: each downloads it once.
    let bundle = big_bundle(artifact_mb << 20)?;
    let big: Setup = server.setup_image(&bundle, 1).await?;
    let t0 = Instant::now();
    let mut procs = Vec::new();
    for _ in 0..10 {
        procs.push(big.create_process("Sydney").await?);
    }
    for p in &procs {
        big.wait_process_running(p).await?;
    }
    let spread_s = t0.elapsed().as_secs_f64();
    let downloads = http.metric("lodge_artifact_downloads_total").await?;
    let served = http.metric("lodge_artifact_bytes_total").await?;
    // The nodes its next processes go to fetched it ahead; the others when one landed there.
    let holders = (0..sims)
        .filter(|i| {
            std::fs::read_dir(dir.join(format!("sim{i}")).join("builds"))
                .map(|d| d.flatten().any(|e| e.path().join("bundle").is_dir()))
                .unwrap_or(false)
        })
        .count();
    let mut art = Table::new(
        "One build reaching ten nodes (fetched ahead by the first nodes in placement order, by the others when a process lands there; digest-verified)",
        &[
            "build",
            "nodes holding it",
            "downloads",
            "bytes served / (holders × artifact)",
            "10 processes running after",
            "served",
        ],
    );
    let artifact = (artifact_mb << 20) as f64;
    art.row(vec![
        format!("{artifact_mb} MiB (incompressible)"),
        holders.to_string(),
        format!("{downloads:.0}"),
        format!("{:.3}", served / (holders.max(1) as f64 * artifact)),
        format!("{spread_s:.2} s"),
        format!("{:.0} MB/s", served / 1e6 / spread_s),
    ]);
    for p in &procs {
        big.stop_process(p).await?;
    }

    // Real agents and live rooms; the control plane killed and restarted.
    let token = http.join_token("Chicago").await?;
    let mut agents = Vec::new();
    for k in 0..3 {
        agents.push(RealAgent::start(server.url(), &token, k, dir)?);
    }
    let all = sims + 3;
    wait_until(
        "real agents attached",
        Duration::from_secs(30),
        async || http.attached().await >= all,
    )
    .await?;
    let setup = server.setup(10).await?;
    let mut addrs = Vec::new();
    for _ in 0..rooms {
        let (_, room, _) = super::room_to_active(&setup, "Chicago").await?;
        let info = setup.connection_info(&room).await?;
        let host = info["exposedPort"]["host"].as_str().unwrap_or_default();
        let port = info["exposedPort"]["port"].as_u64().unwrap_or(0);
        addrs.push(
            format!("{host}:{port}")
                .parse::<SocketAddr>()
                .map_err(|e| e.to_string())?,
        );
    }
    let players = Players::start(&addrs).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill9();
    tokio::time::sleep(outage).await;
    server.respawn().await?;
    let reattach = wait_until(
        "every node re-attached",
        Duration::from_secs(60),
        async || http.attached().await >= all,
    )
    .await?;
    let (sent, echoed) = players.finish().await;
    let mut down = Table::new(
        "Control plane killed with -9 and restarted under live rooms (3 real agents) and simulated nodes",
        &["outage", "rooms", "datagrams sent", "lost", "nodes", "all re-attached after it was ready"],
    );
    down.row(vec![
        format!("{} s", outage.as_secs()),
        rooms.to_string(),
        sent.to_string(),
        sent.saturating_sub(echoed).to_string(),
        all.to_string(),
        format!("{:.2} s", reattach.as_secs_f64()),
    ]);

    // An agent killed: how long until no new room lands on it.
    let victim = agents.remove(0);
    let victim_host = victim.host.clone();
    let mut victim = victim;
    victim.kill9();
    let gone = wait_until(
        "the killed node unschedulable",
        Duration::from_secs(30),
        async || {
            http.nodes().await.is_ok_and(|n| {
                n.iter()
                    .any(|n| n["host"] == victim_host.as_str() && n["reachable"] == false)
            })
        },
    )
    .await?;
    let mut landed_on_victim = 0;
    for _ in 0..10 {
        let p = setup.create_process("Chicago").await?;
        let info = http
            .call(
                reqwest::Method::GET,
                &format!("/processes/v3/apps/{}/processes/{p}", setup.app_id),
                None,
            )
            .await?;
        if info["exposedPort"]["host"] == victim_host.as_str() {
            landed_on_victim += 1;
        }
        setup.stop_process(&p).await?;
    }
    let mut lost = Table::new(
        "An agent killed with -9 (goal: no new room on it after 10 s; Kubernetes marks a node NotReady after 50 s)",
        &["until unschedulable", "new processes after", "placed on the killed node"],
    );
    lost.row(vec![
        format!("{:.2} s", gone.as_secs_f64()),
        "10".into(),
        landed_on_victim.to_string(),
    ]);

    server.shutdown(&setup).await;
    drop(nodes);
    victim.end();
    for a in agents {
        a.end();
    }
    Ok(vec![held, art, down, lost])
}
