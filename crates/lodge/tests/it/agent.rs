//! The node agent driving real processes: bind probe and timeout, exits, stop, isolation, the
//! proxy in front of it, and re-adoption by a new agent.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lodge_agent::{Agent, AgentConfig, ControlLink, Isolation};
use lodge_model::spec::{AgentEvent, ProcessSpec};
use lodge_model::{ContainerPort, EnvVar, Region, TransportType};
use tokio::sync::mpsc;

use crate::TempDir;

/// A control plane in a box: the test sets what should run and reads what the agent reports.
struct FakeLink {
    desired: Mutex<HashMap<String, ProcessSpec>>,
    events: mpsc::UnboundedSender<AgentEvent>,
}

#[async_trait]
impl ControlLink for FakeLink {
    async fn desired(&self, _node: &str) -> lodge_agent::LinkResult<Vec<ProcessSpec>> {
        Ok(self.desired.lock().unwrap().values().cloned().collect())
    }
    async fn report(&self, event: AgentEvent) {
        if let AgentEvent::Exited { process_id, .. } = &event {
            self.desired.lock().unwrap().remove(process_id);
        }
        if let AgentEvent::Booted {
            process_id,
            exposed_ports,
            ..
        } = &event
        {
            if let Some(s) = self.desired.lock().unwrap().get_mut(process_id) {
                s.exposed_ports = exposed_ports.clone();
            }
        }
        let _ = self.events.send(event);
    }
}

struct Node {
    dir: TempDir,
    link: Arc<FakeLink>,
    events: mpsc::UnboundedReceiver<AgentEvent>,
    /// Events read while waiting for another one.
    stash: Vec<AgentEvent>,
    agent: Arc<Agent>,
    cfg: AgentConfig,
    /// The agent runs on a runtime of its own, so a test can "crash" it by dropping the runtime.
    rt: Option<tokio::runtime::Runtime>,
}

const UDP_ECHO: &str = r#"
import os, signal, socket, sys
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(os.environ["PORT"])))
print("listening", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    if data == b"exit":
        s.sendto(b"bye", peer)
        sys.exit(int(os.environ.get("EXIT_CODE", "0")))
    if data == b"who":
        data = (os.environ["HATHORA_PROCESS_ID"] + " " + os.environ["PORT"]).encode()
    if data == b"eat":
        hog = [bytearray(1 << 20) for _ in range(512)]
    print("got", data.decode(errors="replace"), flush=True)
    s.sendto(data, peer)
"#;

fn port_range() -> (u16, u16) {
    // A window per node, below the ephemeral range, so neither parallel tests in this binary nor
    // parallel test runs nor clients' ephemeral ports can take a port a test checks.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = 20000 + ((std::process::id() * 7 + n) % 300) as u16 * 40;
    (base, base + 39)
}

async fn node(tag: &str, isolation: Isolation, bind_timeout: Duration) -> Node {
    let dir = TempDir::new(tag);
    node_in(dir, isolation, bind_timeout, None).await
}

async fn node_in(
    dir: TempDir,
    isolation: Isolation,
    bind_timeout: Duration,
    link: Option<Arc<FakeLink>>,
) -> Node {
    let (tx, rx) = mpsc::unbounded_channel();
    let link = match link {
        Some(l) => {
            // Re-point the reports of an existing fake control plane at the new receiver.
            let desired = std::mem::take(&mut *l.desired.lock().unwrap());
            Arc::new(FakeLink {
                desired: Mutex::new(desired),
                events: tx,
            })
        }
        None => Arc::new(FakeLink {
            desired: Mutex::default(),
            events: tx,
        }),
    };
    let bundle = dir.0.join("builds/b1/bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("echo.py"), UDP_ECHO).unwrap();
    std::fs::write(
        bundle.join("lodge.toml"),
        "command = [\"python3\", \"echo.py\"]\n",
    )
    .unwrap();
    let sleeper = dir.0.join("builds/sleep/bundle");
    std::fs::create_dir_all(&sleeper).unwrap();
    std::fs::write(
        sleeper.join("lodge.toml"),
        "command = [\"sleep\", \"30\"]\n",
    )
    .unwrap();
    let key = format!(
        "{:06x}",
        dir.0
            .to_string_lossy()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b))
                .wrapping_mul(0x100_0000_01b3))
            & 0xff_ffff
    );
    let cfg = AgentConfig {
        node_id: "n1".into(),
        data_dir: dir.0.clone(),
        public_host: "127.0.0.1".into(),
        proxy_ip: "127.0.0.1".parse().unwrap(),
        port_range: port_range(),
        isolation,
        forwarding: lodge_agent::Forwarding::Auto,
        source_packet_rate: 5000,
        bind_timeout,
        stop_grace: Duration::from_secs(2),
        api_addr: "127.0.0.1:5634".parse().unwrap(),
        exe: env!("CARGO_BIN_EXE_lodge").into(),
        instance: key,
        metrics_interval: Duration::from_millis(200),
        oci_runtime: None,
        fake_processes: false,
        game_users: lodge_agent::sys::is_root(),
        flows: Default::default(),
        tls: None,
        fetcher: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    let (c, l) = (cfg.clone(), link.clone() as Arc<dyn ControlLink>);
    let agent = std::thread::spawn(move || handle.block_on(Agent::start(c, l)))
        .join()
        .unwrap()
        .unwrap();
    Node {
        dir,
        link,
        events: rx,
        stash: Vec::new(),
        agent,
        cfg,
        rt: Some(rt),
    }
}

fn spec(id: &str, build: &str, env: &[(&str, &str)]) -> ProcessSpec {
    ProcessSpec {
        process_id: id.into(),
        app_id: "app".into(),
        app_secret: "secret".into(),
        deployment_id: "dep".into(),
        build_id: build.into(),
        build_tag: None,
        region: Region::London,
        rooms_per_process: 1,
        default_port: ContainerPort {
            name: "default".into(),
            port: 7777,
            transport_type: TransportType::Udp,
        },
        additional_ports: vec![],
        env: env
            .iter()
            .map(|(k, v)| EnvVar {
                name: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        requested_cpu: 0.5,
        requested_memory_mb: 256.0,
        initial_room_id: None,
        initial_room_config: None,
        stop: false,
        exposed_ports: vec![],
    }
}

impl Node {
    fn run(&self, s: ProcessSpec) {
        self.link
            .desired
            .lock()
            .unwrap()
            .insert(s.process_id.clone(), s);
        self.agent.wake();
    }

    fn stop(&self, id: &str) {
        if let Some(s) = self.link.desired.lock().unwrap().get_mut(id) {
            s.stop = true;
        }
        self.agent.wake();
    }

    async fn next(&mut self, what: &str) -> AgentEvent {
        if !self.stash.is_empty() {
            return self.stash.remove(0);
        }
        tokio::time::timeout(Duration::from_secs(30), self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("event channel open")
    }

    /// The first event matching `pick`; others are kept for later waits.
    async fn wait_for<T>(&mut self, what: &str, pick: impl Fn(&AgentEvent) -> Option<T>) -> T {
        if let Some(i) = self.stash.iter().position(|e| pick(e).is_some()) {
            return pick(&self.stash.remove(i)).unwrap();
        }
        loop {
            let e = tokio::time::timeout(Duration::from_secs(30), self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("event channel open");
            match pick(&e) {
                Some(t) => return t,
                None => self.stash.push(e),
            }
        }
    }

    /// Drop the agent's runtime: every task ends, nothing is stopped (like kill -9).
    fn crash(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// Wait for `Booted` then `Running`; returns the public default port.
    async fn running(&mut self, id: &str) -> u16 {
        let port = self
            .wait_for(&format!("boot of {id}"), |e| match e {
                AgentEvent::Booted {
                    process_id,
                    exposed_ports,
                    ..
                } if process_id == id => Some(exposed_ports[0].port),
                AgentEvent::Exited {
                    process_id, exit, ..
                } if process_id == id => panic!("{id} exited: {exit:?}"),
                _ => None,
            })
            .await;
        self.wait_for(&format!("{id} running"), |e| match e {
            AgentEvent::Running { process_id, .. } if process_id == id => Some(()),
            AgentEvent::Exited {
                process_id, exit, ..
            } if process_id == id => panic!("{id} exited: {exit:?}"),
            _ => None,
        })
        .await;
        port
    }

    async fn exited(&mut self, id: &str) -> (lodge_model::spec::ExitInfo, bool) {
        self.wait_for(&format!("exit of {id}"), |e| match e {
            AgentEvent::Exited {
                process_id,
                exit,
                failed,
                ..
            } if process_id == id => Some((exit.clone(), *failed)),
            _ => None,
        })
        .await
    }

    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.0.join("processes").join(id).join("log"))
            .unwrap_or_default()
    }
}

async fn udp(port: u16, msg: &[u8]) -> Option<Vec<u8>> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..20 {
        s.send_to(msg, ("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 512];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(250), s.recv_from(&mut buf)).await
        {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

fn kill_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join("processes")) else {
        return;
    };
    for e in entries.flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("state.json")) {
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
            for key in ["gamePid", "shimPid"] {
                if let Some(pid) = v[key].as_i64().filter(|p| *p > 1) {
                    // SAFETY: signalling a pid this test started.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill_leftovers(&self.dir.0);
        self.crash();
        if self.cfg.isolation == Isolation::Netns {
            // Also after a failure: the namespaces (made ahead too), the nftables table, the bridge.
            let _ = std::process::Command::new(env!("CARGO_BIN_EXE_lodge"))
                .arg("cleanup")
                .arg("--data-dir")
                .arg(&self.dir.0)
                .stdout(std::process::Stdio::null())
                .status();
        }
        // The game users' scratch dirs live outside the data dir.
        let _ = std::fs::remove_dir_all(lodge_agent::users::scratch_root(&self.cfg.instance));
    }
}

#[tokio::test]
async fn process_lifecycle_on_the_host_network() {
    let mut n = node("life", Isolation::None, Duration::from_secs(20)).await;
    n.run(spec("p-exit0", "b1", &[]));
    let port = n.running("p-exit0").await;
    assert_eq!(udp(port, b"ping").await.as_deref(), Some(&b"ping"[..]));
    let who = String::from_utf8(udp(port, b"who").await.unwrap()).unwrap();
    assert!(who.starts_with("p-exit0 "), "{who}");
    let stats = n.agent.stats("p-exit0").unwrap();
    assert!(stats.active_connections >= 1 && stats.bytes_in >= 4);
    // A clean exit is not a failure, and the public port is released.
    assert_eq!(udp(port, b"exit").await.as_deref(), Some(&b"bye"[..]));
    let (exit, failed) = n.exited("p-exit0").await;
    assert_eq!(exit.code, Some(0));
    assert!(!failed);
    assert!(n.log("p-exit0").contains("listening"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::net::UdpSocket::bind(("127.0.0.1", port)).expect("public port released");

    // A non-zero exit is a failure.
    n.run(spec("p-exit3", "b1", &[("EXIT_CODE", "3")]));
    let port = n.running("p-exit3").await;
    udp(port, b"exit").await;
    let (exit, failed) = n.exited("p-exit3").await;
    assert_eq!(exit.code, Some(3));
    assert!(failed);

    // Stop: SIGTERM ends it, and that is a stop, not a failure.
    n.run(spec("p-stop", "b1", &[]));
    n.running("p-stop").await;
    n.stop("p-stop");
    let (exit, failed) = n.exited("p-stop").await;
    assert!(!failed, "{exit:?}");
    assert!(exit.reason.contains("signal 15"), "{exit:?}");

    // A server that ignores SIGTERM is killed once the grace period (2 s here) is over.
    n.run(spec("p-stubborn", "b1", &[("IGNORE_TERM", "1")]));
    n.running("p-stubborn").await;
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(n.dir.0.join("processes/p-stubborn/state.json")).unwrap(),
    )
    .unwrap();
    let pid = state["gamePid"].as_u64().unwrap() as u32;
    let asked = std::time::Instant::now();
    n.stop("p-stubborn");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        lodge_agent::sys::alive(pid, None),
        "still running during the grace period"
    );
    let (exit, failed) = n.exited("p-stubborn").await;
    assert!(!failed, "{exit:?}");
    assert!(exit.reason.contains("signal 9"), "{exit:?}");
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "SIGKILL only after the grace period"
    );
}

#[tokio::test]
async fn bind_timeout_fails_the_process() {
    let mut n = node("bind", Isolation::None, Duration::from_millis(700)).await;
    n.run(spec("p-sleep", "sleep", &[]));
    let (exit, failed) = n.exited("p-sleep").await;
    assert!(failed);
    assert!(exit.reason.contains("did not bind"), "{exit:?}");
    assert!(
        n.log("p-sleep").contains("did not bind 7777/udp")
            || n.log("p-sleep").contains("did not bind")
    );
    // A missing executable fails with a clear log line.
    let bundle = n.dir.0.join("builds/missing/bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(
        bundle.join("lodge.toml"),
        "command = [\"./no-such-server\"]\n",
    )
    .unwrap();
    n.run(spec("p-missing", "missing", &[]));
    let (_, failed) = n.exited("p-missing").await;
    assert!(failed);
    assert!(
        n.log("p-missing").contains("cannot start"),
        "{}",
        n.log("p-missing")
    );
}

/// A new agent on the same data dir re-adopts a live process (same public port, still
/// answering) and reports one that died while no agent was watching.
#[tokio::test]
async fn a_new_agent_readopts_live_processes() {
    let mut n = node("adopt", Isolation::None, Duration::from_secs(20)).await;
    n.run(spec("p-live", "b1", &[]));
    n.run(spec("p-dies", "b1", &[]));
    let live_port = n.running("p-live").await;
    let dies_port = n.running("p-dies").await;
    let _ = dies_port;
    let (dir, link, cfg) = (TempDir(n.dir.0.clone()), n.link.clone(), n.cfg.clone());
    // "Crash" the agent: end its runtime without stopping anything, keep the directory.
    n.crash();
    // The directory lives on in `dir`; the node forgets it (a TempDir of no directory).
    std::mem::forget(std::mem::replace(
        &mut n.dir,
        TempDir(std::path::PathBuf::new()),
    ));
    std::mem::forget(n);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.0.join("processes/p-dies/state.json")).unwrap(),
    )
    .unwrap();
    let pids = ["shimPid", "gamePid"].map(|k| state[k].as_i64().unwrap() as i32);
    for pid in pids {
        // SAFETY: killing the game server this test started (and its shim).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // SIGKILL is not instant: the new agent must find them dead, not dying (a dying shim is
    // rightly re-adopted, then reported ended).
    for _ in 0..500 {
        if pids
            .iter()
            .all(|p| !lodge_agent::sys::alive(*p as u32, None))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut n = node_in(dir, cfg.isolation, cfg.bind_timeout, Some(link)).await;
    let mut saw_running = false;
    let mut saw_dead = false;
    while !(saw_running && saw_dead) {
        match n.next("adoption").await {
            AgentEvent::Running { process_id, .. } if process_id == "p-live" => saw_running = true,
            AgentEvent::Exited {
                process_id, failed, ..
            } if process_id == "p-dies" => {
                assert!(failed);
                saw_dead = true;
            }
            // Re-adoption announces the ports again; they must be the same ones.
            AgentEvent::Booted {
                process_id,
                exposed_ports,
                ..
            } if process_id == "p-live" => assert_eq!(exposed_ports[0].port, live_port),
            AgentEvent::Booted { process_id, .. } => panic!("{process_id} was started again"),
            _ => {}
        }
    }
    assert_eq!(
        udp(live_port, b"still here").await.as_deref(),
        Some(&b"still here"[..])
    );
    // Its log goes on in the same file, and its traffic is counted again.
    assert!(
        n.log("p-live").contains("got still here"),
        "{}",
        n.log("p-live")
    );
    let stats = n.agent.stats("p-live").expect("adopted process has stats");
    assert!(stats.bytes_in >= 10 && stats.bytes_out >= 10, "{stats:?}");
    assert!(stats.active_connections >= 1);
    n.stop("p-live");
    n.exited("p-live").await;
}

/// As root: every process gets its own network namespace, binds the same container port, and
/// is reachable through its own public port; namespaces are removed when processes end.
#[tokio::test]
async fn isolated_processes_bind_the_same_port() {
    if !lodge_agent::sys::is_root() {
        eprintln!("skipping: needs root for network namespaces");
        return;
    }
    let mut n = node("netns", Isolation::Netns, Duration::from_secs(20)).await;
    let bridge = n.cfg.bridge_name();
    let bridge_mac =
        || std::fs::read_to_string(format!("/sys/class/net/{bridge}/address")).unwrap();
    // The gateway's MAC never changes under the processes, whatever joins or leaves.
    let mac = bridge_mac();
    n.run(spec("iso-a", "b1", &[]));
    n.run(spec("iso-b", "b1", &[]));
    let mut ports = HashMap::new();
    while ports.len() < 2 {
        match n.next("isolated start").await {
            AgentEvent::Booted {
                process_id,
                exposed_ports,
                ..
            } => {
                ports.insert(process_id, exposed_ports[0].port);
            }
            AgentEvent::Exited {
                process_id, exit, ..
            } => panic!("{process_id}: {exit:?}"),
            _ => {}
        }
    }
    for (id, port) in &ports {
        let mut answer = None;
        for _ in 0..50 {
            answer = udp(*port, b"who").await;
            if answer.is_some() {
                break;
            }
        }
        let who = String::from_utf8(answer.expect("isolated process answers")).unwrap();
        assert_eq!(
            who,
            format!("{id} 7777"),
            "each process binds the container port itself"
        );
    }
    // The deployment's limits (0.5 CPU, 256 MB) are on the process's cgroups (v1 here).
    if std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        let read = |c: &str, f: &str| {
            std::fs::read_to_string(format!(
                "/sys/fs/cgroup/{c}/{}/iso-a/{f}",
                n.cfg.cgroup_group()
            ))
            .unwrap_or_else(|e| panic!("{c}/{f}: {e}"))
        };
        assert_eq!(
            read("memory", "memory.limit_in_bytes").trim(),
            (256u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us").trim(), "50000");
        assert_eq!(read("cpu", "cpu.cfs_period_us").trim(), "100000");
        let pid = |id: &str| -> String {
            let state: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(n.dir.0.join(format!("processes/{id}/state.json")))
                    .unwrap(),
            )
            .unwrap();
            state["gamePid"].to_string()
        };
        assert!(
            read("memory", "cgroup.procs")
                .lines()
                .any(|l| l == pid("iso-a")),
            "the game server is in its memory cgroup"
        );
    }
    // Each has a namespace of its own (one made ahead, or made for it), never the same one.
    let netns_of = |id: &str| -> String {
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(n.dir.0.join(format!("processes/{id}/state.json"))).unwrap(),
        )
        .unwrap();
        state["netns"]["name"].as_str().unwrap().to_string()
    };
    let (ns_a, ns_b) = (netns_of("iso-a"), netns_of("iso-b"));
    assert_ne!(ns_a, ns_b);
    let prefix = format!("lodge-{}-", &n.cfg.instance[..6]);
    assert!(
        ns_a.starts_with(&prefix) && ns_b.starts_with(&prefix),
        "{ns_a} {ns_b}"
    );
    n.stop("iso-a");
    n.stop("iso-b");
    n.exited("iso-a").await;
    n.exited("iso-b").await;
    let netns_list = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        bridge_mac(),
        mac,
        "the bridge keeps its MAC as namespaces come and go"
    );
    let list = netns_list();
    assert!(
        !list.contains(&ns_a) && !list.contains(&ns_b),
        "a process's namespace goes with it: {list:?}"
    );
    // Two starts within the rate window: namespaces wait ready for the next ones.
    let mut ready = Vec::new();
    for _ in 0..200 {
        ready = netns_list()
            .into_iter()
            .filter(|ns| ns.starts_with(&prefix))
            .collect();
        if ready.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready.len() >= 2, "namespaces made ahead: {ready:?}");

    // Past its memory limit (64 MB here) the process is killed, and the reason says so.
    let mut hungry = spec("iso-oom", "b1", &[]);
    hungry.requested_memory_mb = 64.0;
    n.run(hungry);
    let port = n.running("iso-oom").await;
    let _ = udp(port, b"eat").await;
    let (exit, failed) = n.exited("iso-oom").await;
    assert!(failed, "{exit:?}");
    assert!(exit.reason.contains("out of memory"), "{exit:?}");
    n.agent.teardown_node().await;
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|ns| ns.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "no namespace outlives the node: {left:?}");
}
