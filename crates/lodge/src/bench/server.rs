//! What the benchmarks run against: a `lodge serve` child on a scratch data dir, an app with a
//! deployment of the benchmark game server, nginx as the comparison proxy, and the static test
//! server as a container image.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{median, net, Result};
use crate::cli::{self, api::Api};

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} × {cpu}, {:.0} GiB, Linux {}, {} build",
        mem as f64 / 1024.0 / 1024.0,
        kernel.trim(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    )
}

/// A port free for both TCP and UDP on every address.
/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...).
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let t = std::net::TcpListener::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        let p = t.local_addr().map_err(|e| e.to_string())?.port();
        if std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok() {
            return Ok(p);
        }
    }
    Err("no free port".into())
}

/// A window of 400 public ports below the kernel's ephemeral range.
fn port_window() -> (u16, u16) {
    let seed = std::process::id() as u16 ^ (Instant::now().elapsed().subsec_nanos() as u16);
    let lo = 20_000 + (seed % 30) * 400;
    (lo, lo + 399)
}

pub struct Server {
    child: std::process::Child,
    dir: PathBuf,
    url: String,
    token: String,
    /// `lodge serve`'s arguments, to start it again on the same data dir and ports.
    args: Vec<String>,
    /// Cleared by an orderly shutdown; otherwise dropping kills everything it started.
    armed: bool,
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // A scenario failed: kill the server, then end whatever it left running.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(exe) = std::env::current_exe() {
            let _ = std::process::Command::new(exe)
                .arg("cleanup")
                .arg("--data-dir")
                .arg(self.dir.join("data"))
                .stdout(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An app with one deployment of the benchmark server, and API helpers.
#[derive(Clone)]
pub struct Setup {
    api: Arc<Api>,
    pub app_id: String,
    url: String,
}

impl Server {
    pub async fn start(extra: &[&str]) -> Result<Server> {
        // Every bench client comes from 127.0.0.1: one source, thousands of flows and
        // processes, which the default per-source and per-app limits would refuse.
        let mut args = vec![
            "--flows-per-source",
            "1000000",
            "--max-processes-per-app",
            "1000000",
        ];
        args.extend_from_slice(extra);
        Self::start_with_defaults(&args).await
    }

    /// A server with Lodge's default limits, plus `extra`.
    pub async fn start_with_defaults(extra: &[&str]) -> Result<Server> {
        let token = format!("bench-{}", lodge_model::id::secret_hex());
        Self::start_with_token(extra, token).await
    }

    /// Another replica of this server on the same store (`store_args`), with no node of its
    /// own, that takes the same admin token.
    pub async fn start_replica(&self, store_args: &[&str]) -> Result<Server> {
        let mut args = vec![
            "--flows-per-source",
            "1000000",
            "--max-processes-per-app",
            "1000000",
            "--no-local-node",
        ];
        args.extend_from_slice(store_args);
        Self::start_with_token(&args, self.token.clone()).await
    }

    async fn start_with_token(extra: &[&str], token: String) -> Result<Server> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!(
            "lodge-bench-{}-{}",
            std::process::id(),
            lodge_model::id::secret_hex()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let api_port = free_port()?;
        let ping_port = free_port()?;
        let (lo, hi) = port_window();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            dir.join("data").to_string_lossy().into_owned(),
            "--api-addr".into(),
            format!("127.0.0.1:{api_port}"),
            "--port-range".into(),
            format!("{lo}-{hi}"),
            "--ping-port".into(),
            ping_port.to_string(),
            "--stop-grace".into(),
            "1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = spawn_serve(&exe, &args, &token, &dir)?;
        let url = format!("http://127.0.0.1:{api_port}");
        let server = Server {
            child,
            dir,
            url,
            token,
            args,
            armed: true,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// Kill the server with SIGKILL (what it started keeps running).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same data dir and ports; returns once it is ready.
    pub async fn respawn(&mut self) -> Result<()> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        self.child = spawn_serve(&exe, &self.args, &self.token, &self.dir)?;
        self.wait_ready().await
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    async fn wait_ready(&self) -> Result<()> {
        let server = self;
        let http = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", server.url)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "lodge serve was not ready in 30 s; see {}",
                    server.dir.join("serve.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The node's record of each process it started (`processes/*/state.json`).
    pub fn process_states(&self) -> Vec<serde_json::Value> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("data").join("processes")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("state.json")).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }
}

fn spawn_serve(
    exe: &Path,
    args: &[String],
    token: &str,
    dir: &Path,
) -> Result<std::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .map_err(|e| e.to_string())?;
    std::process::Command::new(exe)
        .args(args)
        .env("LODGE_ADMIN_TOKEN", token)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start lodge serve: {e}"))
}

impl Server {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Upload `archive` as a build and run it; whether it failed.
    pub async fn build_fails(&self, archive: Vec<u8>) -> Result<bool> {
        let ctx = self.ctx()?;
        let (_, status, _) = self.run_build(&ctx, archive).await?;
        Ok(status == "failed")
    }

    /// Pull `image` in a registry build; whether it failed.
    pub async fn registry_build_fails(&self, image: &str) -> Result<bool> {
        let ctx = self.ctx()?;
        let created = ctx
            .api
            .post("/builds/v3/builds/registry", json!({}))
            .await
            .map_err(|e| e.0)?;
        let id = created["buildId"].as_str().unwrap_or_default().to_string();
        let res = ctx
            .api
            .stream_json(
                &format!("/builds/v3/builds/{id}/runRegistry"),
                json!({ "image": image }),
            )
            .await
            .map_err(|e| e.0)?;
        res.text().await.map_err(|e| e.to_string())?;
        let build = ctx
            .api
            .get(&format!("/builds/v3/builds/{id}"))
            .await
            .map_err(|e| e.0)?;
        Ok(build["status"] == "failed")
    }

    pub fn rss_bytes(&self) -> u64 {
        proc_status_kb(self.child.id(), "VmRSS").unwrap_or(0) * 1024
    }

    pub fn runtime_name(&self) -> String {
        lodge_agent::oci::detect("auto")
            .ok()
            .flatten()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "?".into())
    }

    fn ctx(&self) -> Result<cli::Ctx> {
        cli::Ctx::new(&cli::Global {
            api_url: Some(self.url.clone()),
            token: Some(self.token.clone()),
            app_id: None,
            json: true,
        })
        .map_err(|e| e.0)
    }

    async fn app(&self, ctx: &cli::Ctx) -> Result<String> {
        let app = ctx
            .api
            .post(
                "/apps/v2/apps",
                json!({"appName": format!("bench-{}", &lodge_model::id::secret_hex()[..8]), "authConfiguration": {}}),
            )
            .await
            .map_err(|e| e.0)?;
        Ok(app["appId"].as_str().unwrap_or_default().to_string())
    }

    async fn build(&self, ctx: &cli::Ctx, archive: Vec<u8>) -> Result<String> {
        let (id, status, log) = self.run_build(ctx, archive).await?;
        if status != "succeeded" {
            return Err(format!("the benchmark build failed:\n{log}"));
        }
        Ok(id)
    }

    /// Upload and run a build: its id, final status and log.
    async fn run_build(
        &self,
        ctx: &cli::Ctx,
        archive: Vec<u8>,
    ) -> Result<(String, String, String)> {
        let created = ctx
            .api
            .post(
                "/builds/v3/builds",
                json!({"buildSizeInBytes": archive.len()}),
            )
            .await
            .map_err(|e| e.0)?;
        cli::deploy::upload(ctx, &created, Arc::new(archive), 4)
            .await
            .map_err(|e| e.0)?;
        let id = created["buildId"].as_str().unwrap_or_default().to_string();
        let res = ctx
            .api
            .stream(
                reqwest::Method::POST,
                &format!("/builds/v3/builds/{id}/run"),
            )
            .await
            .map_err(|e| e.0)?;
        let log = res.text().await.map_err(|e| e.to_string())?;
        let build = ctx
            .api
            .get(&format!("/builds/v3/builds/{id}"))
            .await
            .map_err(|e| e.0)?;
        let status = build["status"].as_str().unwrap_or_default().to_string();
        Ok((id, status, log))
    }

    async fn deploy(
        &self,
        ctx: &cli::Ctx,
        app: &str,
        build: &str,
        rooms: u32,
        tcp: bool,
    ) -> Result<()> {
        let mut cfg = json!({"buildId": build, "idleTimeoutEnabled": false, "env": [], "roomsPerProcess": rooms,
                       "transportType": "udp", "containerPort": 7777, "requestedCPU": 1, "requestedMemoryMB": 512});
        if tcp {
            cfg["additionalContainerPorts"] =
                json!([{"name": "tcp", "port": 7778, "transportType": "tcp"}]);
        }
        ctx.api
            .post(&format!("/deployments/v3/apps/{app}/deployments"), cfg)
            .await
            .map_err(|e| e.0)?;
        Ok(())
    }

    fn setup_of(&self, ctx: cli::Ctx, app: String) -> Setup {
        Setup {
            api: Arc::new(ctx.api),
            app_id: app,
            url: self.url.clone(),
        }
    }

    /// An app deployed with the benchmark echo server (this binary's `echo-server`).
    pub async fn setup(&self, rooms_per_process: u32) -> Result<Setup> {
        let ctx = self.ctx()?;
        let app = self.app(&ctx).await?;
        let build = self.build(&ctx, echo_bundle()?).await?;
        self.deploy(&ctx, &app, &build, rooms_per_process, false)
            .await?;
        Ok(self.setup_of(ctx, app))
    }

    /// As `setup`, with a second container port for TCP (the echo server serves both).
    pub async fn setup_with_tcp(&self, rooms_per_process: u32) -> Result<Setup> {
        let ctx = self.ctx()?;
        let app = self.app(&ctx).await?;
        let build = self.build(&ctx, echo_bundle()?).await?;
        self.deploy(&ctx, &app, &build, rooms_per_process, true)
            .await?;
        Ok(self.setup_of(ctx, app))
    }

    /// An app deployed with a container image (a docker archive).
    pub async fn setup_image(&self, archive: &[u8], rooms_per_process: u32) -> Result<Setup> {
        let ctx = self.ctx()?;
        let app = self.app(&ctx).await?;
        let build = self.build(&ctx, archive.to_vec()).await?;
        self.deploy(&ctx, &app, &build, rooms_per_process, false)
            .await?;
        Ok(self.setup_of(ctx, app))
    }

    /// Stop every process through the API (so game servers, namespaces and cgroups go), then
    /// stop the server and remove its data.
    pub async fn shutdown(mut self, s: &Setup) {
        for _ in 0..200 {
            let live = s
                .api
                .get(&format!(
                    "/processes/v3/apps/{}/processes/latest?status=starting&status=running&status=stopping",
                    s.app_id
                ))
                .await
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default();
            if live.is_empty() {
                break;
            }
            for p in &live {
                if p["status"] != "stopping" {
                    let _ = s
                        .stop_process(p["processId"].as_str().unwrap_or_default())
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        self.armed = false;
        if let Ok(exe) = std::env::current_exe() {
            let _ = std::process::Command::new(exe)
                .arg("cleanup")
                .arg("--data-dir")
                .arg(self.dir.join("data"))
                .stdout(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Stop a replica (it has no processes of its own) and remove its data.
    pub fn stop_replica(mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        self.armed = false;
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Kill the server (pretend processes leave nothing behind) and remove its data.
    pub fn kill(self) {
        // Dropping an armed server kills it and removes its data.
        drop(self);
    }
}

impl Setup {
    /// The same app, through another replica.
    pub fn via(&self, replica: &Server) -> Result<Setup> {
        let ctx = replica.ctx()?;
        Ok(Setup {
            api: Arc::new(ctx.api),
            app_id: self.app_id.clone(),
            url: replica.url.clone(),
        })
    }

    pub async fn create_room(&self, region: &str) -> Result<Value> {
        self.api
            .post(
                &format!("/rooms/v2/{}/create", self.app_id),
                json!({"region": region}),
            )
            .await
            .map_err(|e| e.0)
    }

    pub async fn connection_info(&self, room: &str) -> Result<Value> {
        self.api
            .get(&format!("/rooms/v2/{}/connectioninfo/{room}", self.app_id))
            .await
            .map_err(|e| e.0)
    }

    pub async fn destroy_room(&self, room: &str) -> Result<()> {
        self.api
            .post_empty(&format!("/rooms/v2/{}/destroy/{room}", self.app_id))
            .await
            .map(|_| ())
            .map_err(|e| e.0)
    }

    pub async fn create_process(&self, region: &str) -> Result<String> {
        let p = self
            .api
            .post_empty(&format!(
                "/processes/v3/apps/{}/processes/regions/{region}",
                self.app_id
            ))
            .await
            .map_err(|e| e.0)?;
        Ok(p["processId"].as_str().unwrap_or_default().to_string())
    }

    async fn process_status(&self, id: &str) -> Result<String> {
        let p = self
            .api
            .get(&format!(
                "/processes/v3/apps/{}/processes/{id}",
                self.app_id
            ))
            .await
            .map_err(|e| e.0)?;
        Ok(p["status"].as_str().unwrap_or_default().to_string())
    }

    pub async fn wait_process_running(&self, id: &str) -> Result<()> {
        for _ in 0..3000 {
            match self.process_status(id).await?.as_str() {
                "running" => return Ok(()),
                "failed" | "stopped" => return Err(format!("process {id} ended")),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        Err(format!("process {id} did not start"))
    }

    pub async fn wait_process_ended(&self, id: &str) -> Result<()> {
        for _ in 0..3000 {
            if matches!(
                self.process_status(id).await?.as_str(),
                "stopped" | "failed"
            ) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("process {id} did not end"))
    }

    pub async fn stop_process(&self, id: &str) -> Result<()> {
        self.api
            .post_empty(&format!(
                "/processes/v3/apps/{}/processes/{id}/stop",
                self.app_id
            ))
            .await
            .map(|_| ())
            .map_err(|e| e.0)
    }

    /// The median round trip of `GET /livez` over the same connection pool (ms).
    pub async fn livez_p50(&self, n: usize) -> Result<f64> {
        let http = reqwest::Client::new();
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            http.get(format!("{}/livez", self.url))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .bytes()
                .await
                .map_err(|e| e.to_string())?;
            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(median(&lat))
    }
}

pub(crate) fn tar_gz(files: &[(&str, &[u8], u32)]) -> Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_cksum();
        b.append_data(&mut h, name, *data)
            .map_err(|e| e.to_string())?;
    }
    b.into_inner()
        .and_then(|gz| gz.finish())
        .map_err(|e| e.to_string())
}

/// A native bundle whose command is this binary's `echo-server`.
fn echo_bundle() -> Result<Vec<u8>> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let toml = format!(
        "command = [{:?}, \"echo-server\", \"--port\", \"{{port}}\"]\n",
        exe.display().to_string()
    );
    tar_gz(&[("lodge.toml", toml.as_bytes(), 0o644)])
}

/// Time from exec to a UDP echo answering, for `bin ARGS PORT` (or `bin` with `$PORT` when
/// `args` is empty), started directly; the median of `n` (ms).
pub async fn direct_start_median(bin: &Path, args: &[&str], n: usize) -> Result<f64> {
    let mut lat = Vec::new();
    for _ in 0..n {
        let port = free_port()?;
        let mut cmd = std::process::Command::new(bin);
        if args.is_empty() {
            cmd.env("PORT", port.to_string());
        } else {
            cmd.args(args).arg(port.to_string());
        }
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let t0 = Instant::now();
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let ok = tokio::task::spawn_blocking(move || net::wait_udp(addr, Duration::from_secs(10)))
            .await
            .unwrap_or(false);
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let _ = child.kill();
        let _ = child.wait();
        if !ok {
            return Err(format!("{} did not answer UDP", bin.display()));
        }
        lat.push(ms);
    }
    Ok(median(&lat))
}

pub struct OciFixture {
    pub binary: PathBuf,
    pub archive: Vec<u8>,
}

impl Drop for OciFixture {
    /// The compiled server and its source live in a scratch dir of their own.
    fn drop(&mut self) {
        if let Some(dir) = self.binary.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The static test server compiled with gcc, and a docker archive with it as `/gs`. `None`
/// when gcc or a static libc is missing.
pub async fn oci_fixture() -> Result<Option<OciFixture>> {
    let dir = std::env::temp_dir().join(format!("lodge-bench-gs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("gs.c");
    std::fs::write(&src, include_str!("../../../../conformance/fixtures/gs.c"))
        .map_err(|e| e.to_string())?;
    let bin = dir.join("gs");
    let ok = tokio::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(None);
    }
    let gs = std::fs::read(&bin).map_err(|e| e.to_string())?;
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(gs.len() as u64);
    h.set_mode(0o755);
    h.set_cksum();
    layer
        .append_data(&mut h, "gs", &gs[..])
        .map_err(|e| e.to_string())?;
    let layer = layer.into_inner().map_err(|e| e.to_string())?;
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/gs"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let manifest =
        br#"[{"Config":"config.json","RepoTags":["bench/gs:1"],"Layers":["layer.tar"]}]"#;
    let mut outer = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest[..]),
        ("config.json", &config[..]),
        ("layer.tar", &layer[..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        outer
            .append_data(&mut h, name, data)
            .map_err(|e| e.to_string())?;
    }
    let archive = outer.into_inner().map_err(|e| e.to_string())?;
    Ok(Some(OciFixture {
        binary: bin,
        archive,
    }))
}

/// nginx's stream proxy in front of `target_port`, TCP and UDP, set up like Lodge's proxy.
pub struct Nginx {
    child: std::process::Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Nginx {
    /// The master process (its workers are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn start(target_port: u16) -> Result<Nginx> {
        let module = [
            "/usr/lib/nginx/modules/ngx_stream_module.so",
            "/usr/lib64/nginx/modules/ngx_stream_module.so",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists());
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let (Some(module), Some(nginx)) = (module, nginx) else {
            return Err("nginx with the stream module is not installed (apt-get install nginx-light libnginx-mod-stream)".into());
        };
        let dir = std::env::temp_dir().join(format!("lodge-bench-nginx-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
        let port = free_port()?;
        let conf = format!(
            "load_module {module};\nworker_processes auto;\ndaemon off;\nerror_log {d}/logs/error.log warn;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             stream {{\n  server {{ listen 127.0.0.1:{port} udp reuseport; proxy_pass 127.0.0.1:{target_port}; }}\n  \
             server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{target_port}; }}\n}}\n",
            d = dir.display()
        );
        let mut f = std::fs::File::create(dir.join("nginx.conf")).map_err(|e| e.to_string())?;
        f.write_all(conf.as_bytes()).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let n = Nginx { child, dir, addr };
        let ok = tokio::task::spawn_blocking(move || net::wait_udp(addr, Duration::from_secs(5)))
            .await
            .unwrap_or(false);
        if !ok {
            return Err("nginx did not come up".into());
        }
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM makes the master stop its workers too (SIGKILL would orphan them).
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
