//! Starting a process: public ports, its network namespace or the host network, cgroups, its
//! user, its environment, the shim (native bundles) or the OCI runtime (container images).

#[allow(unused_imports)]
use super::*;

impl Agent {
    /// Reserve a user index of its own for a new process of `build_id`.
    pub(crate) fn reserve_user(&self, build_id: &str) -> std::io::Result<users::GameUser> {
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        // Round-robin, so a user id just freed is the last to be given out again.
        let start = r.user_cursor;
        let index = (0..users::MAX_USERS)
            .map(|k| (start + k) % users::MAX_USERS)
            .find(|i| !r.user_indexes.contains(i))
            .ok_or_else(|| std::io::Error::other("no free game-server user id on this node"))?;
        r.user_cursor = (index + 1) % users::MAX_USERS;
        r.user_indexes.insert(index);
        Ok(users::GameUser::new(index, build_id))
    }

    /// Reserve a free public port and open its route.
    pub(crate) async fn public_port(
        &self,
        target: SocketAddr,
        transport: TransportType,
        counters: &Arc<Counters>,
    ) -> std::io::Result<(u16, PublicPort)> {
        let (lo, hi) = self.cfg.port_range;
        let span = u32::from(hi - lo) + 1;
        for _ in 0..span {
            let candidate = {
                let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
                let c = lo + (r.cursor % span as u16);
                r.cursor = r.cursor.wrapping_add(1) % span as u16;
                if !r.ports.insert(c) {
                    continue;
                }
                c
            };
            let t = Target {
                public_port: candidate,
                target,
                udp: transport == TransportType::Udp,
                tls: transport == TransportType::Tls,
            };
            match self.open_route(&t, counters).await {
                Ok(route) => return Ok((candidate, route)),
                Err(_) => {
                    self.reserved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .ports
                        .remove(&candidate);
                }
            }
        }
        Err(std::io::Error::other(format!(
            "no free public port in {lo}-{hi}"
        )))
    }

    pub(crate) async fn launch(
        &self,
        spec: &ProcessSpec,
        dir: &Path,
        counters: &Arc<Counters>,
    ) -> std::io::Result<(LocalState, Waiter, Vec<PublicPort>)> {
        let t0 = Instant::now();
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::remove_file(dir.join(shim::EXIT));
        if let Some(fetcher) = &self.cfg.fetcher {
            fetcher
                .ensure(&spec.build_id)
                .await
                .map_err(std::io::Error::other)?;
            let mut keep = self.builds_in_use();
            keep.insert(spec.build_id.clone());
            fetcher.evict(&keep);
        }
        let bundle = self.cfg.bundle_dir(&spec.build_id);
        let image_dir = self.cfg.image_dir(&spec.build_id);
        let image = if image_dir.join(image::CONFIG).is_file() {
            if self.cfg.oci_runtime.is_none() || self.network.is_none() {
                return Err(std::io::Error::other(
                    "this build is a container image: running it needs Lodge as root with netns \
                     isolation and an OCI runtime (apt-get install crun runc)",
                ));
            }
            Some(image::ImageConfig::load(&image_dir).map_err(std::io::Error::other)?)
        } else {
            None
        };
        let manifest = match &image {
            Some(_) => None,
            None => Some(bundle::Manifest::load(&bundle).map_err(std::io::Error::other)?),
        };

        // Network: a namespace of its own (bind the container ports) or the host (bind $PORT).
        let mut netns = None;
        let mut inner_ports: Vec<u16> = Vec::new();
        let mut targets = Vec::new();
        if let Some(net) = &self.network {
            let ns = self.take_namespace(net).await?;
            let ip = net.address(ns.index);
            for p in spec.ports() {
                inner_ports.push(p.port);
                targets.push(SocketAddr::new(IpAddr::V4(ip), p.port));
            }
            netns = Some(ns);
        } else {
            for _ in spec.ports() {
                let port = free_local_port(&inner_ports)?;
                inner_ports.push(port);
                targets.push(SocketAddr::from(([127, 0, 0, 1], port)));
            }
        }
        let cgroups = if self.network.is_some() {
            sys::Cgroups::create(
                &self.cfg.cgroup_group(),
                &spec.process_id,
                spec.requested_cpu,
                spec.requested_memory_mb,
            )
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot create cgroups; running without limits");
                sys::Cgroups { dirs: Vec::new() }
            })
        } else {
            sys::Cgroups { dirs: Vec::new() }
        };

        let oci = image.as_ref().and_then(|_| {
            Some(OciState {
                runtime: self.cfg.oci_runtime.clone()?,
                root: self.cfg.data_dir.join("oci"),
                id: format!("lodge-{}", spec.process_id),
            })
        });
        let mut state = LocalState {
            shim_pid: 0,
            shim_start: None,
            game_pid: 0,
            exposed: Vec::new(),
            targets: Vec::new(),
            netns,
            cgroups: cgroups.dirs.clone(),
            oci,
            user: None,
            scratch: None,
        };
        let mut routes = Vec::new();
        let result = async {
            if self.cfg.game_users && manifest.is_some() {
                let user = self.reserve_user(&spec.build_id)?;
                state.user = Some(user);
                users::share_bundle(&bundle, user.gid)?;
                state.scratch = Some(users::make_scratch(
                    &users::scratch_root(&self.cfg.instance),
                    &spec.process_id,
                    user,
                )?);
            }
            for (p, target) in spec.ports().zip(&targets) {
                let transport = p.transport_type;
                let (public, route) = self.public_port(*target, transport, counters).await?;
                routes.push(route);
                state.targets.push(Target {
                    public_port: public,
                    target: *target,
                    udp: transport == TransportType::Udp,
                    tls: transport == TransportType::Tls,
                });
                state.exposed.push(ExposedPort {
                    name: p.name.clone(),
                    host: self.cfg.public_host.clone(),
                    port: public,
                    transport_type: p.transport_type,
                });
            }
            let netns_path = state
                .netns
                .as_ref()
                .map(|n| PathBuf::from(format!("/run/netns/{}", n.name)));
            let launch = match (&manifest, &image, &state.oci) {
                (Some(manifest), _, _) => {
                    let bundle_env: Vec<(String, String)> = manifest
                        .env
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let mut base = host_env();
                    if let Some(scratch) = &state.scratch {
                        let home = scratch.join("home").to_string_lossy().into_owned();
                        base.retain(|(k, _)| k != "HOME" && k != "USER");
                        base.push(("HOME".into(), home.clone()));
                        base.push(("TMPDIR".into(), home));
                    }
                    shim::Launch {
                        argv: expand_argv(&manifest.command, spec, &inner_ports),
                        cwd: bundle.clone(),
                        env: self.environment(
                            spec,
                            base,
                            &bundle_env,
                            &state.exposed,
                            &inner_ports,
                        ),
                        netns: netns_path,
                        cgroup_procs: cgroups.procs_files(),
                        user: state.user.map(|u| (u.uid, u.gid)),
                        bundle_mount: state.scratch.as_ref().map(|d| d.join("bundle")),
                    }
                }
                (None, Some(image), Some(oci)) => {
                    let base = image
                        .env
                        .iter()
                        .filter_map(|e| e.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    let env = self.environment(spec, base, &[], &state.exposed, &inner_ports);
                    let bundle_dir = dir.join("oci");
                    std::fs::create_dir_all(&bundle_dir)?;
                    let config = oci::config(&oci::Container {
                        rootfs: &image_dir.join(image::ROOTFS),
                        image,
                        env: &env,
                        hostname: format!(
                            "lodge-{}",
                            &spec.process_id[..spec.process_id.len().min(8)]
                        ),
                        netns: netns_path,
                        cgroups_path: format!(
                            "/{}/{}/ctr",
                            self.cfg.cgroup_group(),
                            spec.process_id
                        ),
                    });
                    std::fs::write(
                        bundle_dir.join("config.json"),
                        serde_json::to_vec_pretty(&config).map_err(std::io::Error::other)?,
                    )?;
                    std::fs::create_dir_all(&oci.root)?;
                    std::fs::set_permissions(
                        &oci.root,
                        std::os::unix::fs::PermissionsExt::from_mode(0o700),
                    )?;
                    // A container of this id left by a crash before its shim was recorded.
                    let root = oci.root.to_string_lossy().into_owned();
                    let _ = std::process::Command::new(&oci.runtime)
                        .args(["--root", &root, "delete", "--force", &oci.id])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                    shim::Launch {
                        argv: vec![
                            oci.runtime.to_string_lossy().into_owned(),
                            "--root".into(),
                            root,
                            "run".into(),
                            "--bundle".into(),
                            bundle_dir.to_string_lossy().into_owned(),
                            oci.id.clone(),
                        ],
                        cwd: dir.to_path_buf(),
                        env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
                        netns: None,
                        cgroup_procs: Vec::new(),
                        user: None,
                        bundle_mount: None,
                    }
                }
                _ => return Err(std::io::Error::other("nothing to run")),
            };
            std::fs::write(
                dir.join(shim::LAUNCH),
                serde_json::to_vec_pretty(&launch).map_err(std::io::Error::other)?,
            )?;
            // Recorded before the shim exists, so that no crash from here on can leave a shim
            // that a restart does not know of (and would start a second game server beside).
            let _ = std::fs::remove_file(dir.join(shim::SHIM_PID));
            let _ = std::fs::remove_file(dir.join(shim::PID));
            write_state(dir, &state)?;
            let mut cmd = tokio::process::Command::new(&self.cfg.exe);
            cmd.arg("shim")
                .arg(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            // SAFETY: setsid is async-signal-safe; it detaches the shim from Lodge's session so
            // that signals aimed at Lodge (Ctrl-C) do not reach game servers.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
            let mut child = cmd.spawn()?;
            let shim_pid = child.id().unwrap_or(0);
            // Recorded before anything else can fail or crash: a restart then re-adopts this
            // shim instead of launching a second copy of the game.
            state.shim_pid = shim_pid;
            state.shim_start = sys::start_time(shim_pid);
            write_state(dir, &state)?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| std::io::Error::other("shim has no stdout"))?;
            let mut line = String::new();
            let mut stdout = tokio::io::BufReader::new(stdout);
            // The kernel's forwarding is put in place while the game server starts (it is
            // there before the process is reported booted, and players hear of its ports).
            let (installed, read) = tokio::join!(
                self.install_ports(&spec.process_id, &routes),
                stdout.read_line(&mut line)
            );
            read?;
            let game_pid: u32 = line.trim().parse().unwrap_or(0);
            state.game_pid = game_pid;
            write_state(dir, &state)?;
            if let Err(e) = installed {
                terminate(&state, libc::SIGKILL).await;
                sys::signal(shim_pid, libc::SIGKILL);
                let _ = child.wait().await;
                return Err(e);
            }
            Ok::<_, std::io::Error>(Waiter::Child(child))
        }
        .await;
        let waiter = match result {
            Ok(w) => w,
            Err(e) => {
                lodge_proxy::close_all(routes).await;
                self.release(&state).await;
                return Err(e);
            }
        };
        tracing::info!(
            process_id = %spec.process_id,
            pid = state.game_pid,
            ports = ?state.exposed.iter().map(|p| p.port).collect::<Vec<_>>(),
            spawn_ms = t0.elapsed().as_secs_f64() * 1000.0,
            "process started"
        );
        self.link
            .report(AgentEvent::Booted {
                process_id: spec.process_id.clone(),
                at: self.now(),
                exposed_ports: state.exposed.clone(),
            })
            .await;
        Ok((state, waiter, routes))
    }

    /// The environment of a process: `base` (the host's basics, or an image's ENV), Hathora's
    /// and Lodge's variables, the bundle's `[env]`, then the deployment's env (last wins).
    pub(crate) fn environment(
        &self,
        spec: &ProcessSpec,
        base: Vec<(String, String)>,
        bundle_env: &[(String, String)],
        exposed: &[ExposedPort],
        inner: &[u16],
    ) -> Vec<(String, String)> {
        let mut env = base;
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
        }
        let mut set = |k: &str, v: String| env.push((k.to_string(), v));
        set("HATHORA_PROCESS_ID", spec.process_id.clone());
        set("HATHORA_APP_ID", spec.app_id.clone());
        set("HATHORA_APP_SECRET", spec.app_secret.clone());
        set("HATHORA_DEPLOYMENT_ID", spec.deployment_id.clone());
        set(
            "HATHORA_BUILD_TAG",
            spec.build_tag.clone().unwrap_or_default(),
        );
        set("HATHORA_REGION", spec.region.to_string());
        set(
            "HATHORA_ROOMS_PER_PROCESS",
            spec.rooms_per_process.to_string(),
        );
        if let Some(r) = &spec.initial_room_id {
            set("HATHORA_INITIAL_ROOM_ID", r.clone());
        }
        if let Some(c) = &spec.initial_room_config {
            set("HATHORA_INITIAL_ROOM_CONFIG", c.clone());
        }
        set("HATHORA_HOSTNAME", self.cfg.public_host.clone());
        set("HATHORA_ALLOCATED_CPU", spec.requested_cpu.to_string());
        set(
            "HATHORA_ALLOCATED_MEMORY_MB",
            spec.requested_memory_mb.to_string(),
        );
        for ((p, e), inner) in spec.ports().zip(exposed).zip(inner) {
            if p.name == "default" {
                set("HATHORA_DEFAULT_PORT", e.port.to_string());
                set("PORT", inner.to_string());
            } else {
                let upper = env_suffix(&p.name);
                set(&format!("HATHORA_{upper}_PORT"), e.port.to_string());
                set(&format!("PORT_{upper}"), inner.to_string());
            }
        }
        let api_url = match &self.network {
            Some(net) => format!("http://{}:{}", net.gateway, self.cfg.api_addr.port()),
            None => {
                let mut a = self.cfg.api_addr;
                if a.ip().is_unspecified() {
                    a.set_ip(IpAddr::from([127, 0, 0, 1]));
                }
                format!("http://{a}")
            }
        };
        set("LODGE_API_URL", api_url);
        for (k, v) in bundle_env {
            set(k, v.clone());
        }
        for e in &spec.env {
            set(&e.name, e.value.clone());
        }
        // Later entries win.
        let mut seen = BTreeSet::new();
        let mut out: Vec<(String, String)> = env
            .into_iter()
            .rev()
            .filter(|(k, _)| seen.insert(k.clone()))
            .collect();
        out.reverse();
        out
    }
}

/// Ask a process to end: through its runtime for containers, by signal to its process group
/// otherwise.
pub(crate) async fn terminate(state: &LocalState, sig: i32) {
    if let Some(oci) = &state.oci {
        let name = if sig == libc::SIGKILL { "KILL" } else { "TERM" };
        oci::runtime(&oci.runtime, &oci.root, &["kill", &oci.id, name]).await;
        if sig == libc::SIGKILL {
            sys::signal(state.game_pid, libc::SIGKILL);
        }
        return;
    }
    sys::signal_group(state.game_pid, sig);
    if sig == libc::SIGKILL {
        sys::signal(state.game_pid, libc::SIGKILL);
    }
}

/// What a native process inherits from Lodge's own environment.
pub(crate) fn host_env() -> Vec<(String, String)> {
    ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

pub(crate) trait PortInside {
    fn port_inside(&self, state: &LocalState) -> u16;
}

impl PortInside for ContainerPort {
    /// The port the process binds: the container port when isolated, else its `$PORT`.
    fn port_inside(&self, state: &LocalState) -> u16 {
        state
            .targets
            .first()
            .map(|t| t.target.port())
            .unwrap_or(self.port)
    }
}

/// `HATHORA_<NAME>_PORT` naming: upper case, `-` becomes `_`.
pub fn env_suffix(port_name: &str) -> String {
    port_name.to_ascii_uppercase().replace('-', "_")
}

/// Expand `{port}` and `{port:NAME}` in the command.
pub(crate) fn expand_argv(argv: &[String], spec: &ProcessSpec, inner: &[u16]) -> Vec<String> {
    argv.iter()
        .map(|arg| {
            let mut a = arg.replace("{port}", &inner.first().copied().unwrap_or(0).to_string());
            for (p, port) in spec.ports().zip(inner) {
                a = a.replace(&format!("{{port:{}}}", p.name), &port.to_string());
            }
            a
        })
        .collect()
}

/// A loopback port free for both TCP and UDP, not in `taken`.
pub(crate) fn free_local_port(taken: &[u16]) -> std::io::Result<u16> {
    for _ in 0..64 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if taken.contains(&port) {
            continue;
        }
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free local port"))
}
