//! The life of one process on this node: adoption after a restart, its routes and metrics,
//! its exit and what it leaves behind; the pretend life of the pretend driver.

#[allow(unused_imports)]
use super::*;

impl Agent {
    /// The whole life of one process on this node.
    pub(crate) async fn supervise(
        self: &Arc<Self>,
        spec: ProcessSpec,
        counters: Arc<Counters>,
        stop: Arc<Notify>,
        stop_requested: Arc<AtomicBool>,
    ) {
        let id = spec.process_id.clone();
        let dir = self.cfg.process_dir(&id);
        let adopted = self.try_adopt(&spec, &dir, &counters).await;
        let (state, mut waiter, routes) = match adopted {
            Adopt::Live(state, routes) => {
                tracing::info!(process_id = %id, pid = state.game_pid, "re-adopted live process");
                // The control plane may not have heard of its ports (a crash right after the
                // start); saying it again is harmless.
                self.link
                    .report(AgentEvent::Booted {
                        process_id: id.clone(),
                        at: self.now(),
                        exposed_ports: state.exposed.clone(),
                    })
                    .await;
                let w = Waiter::Pid(state.shim_pid);
                (*state, w, routes)
            }
            Adopt::Ended(exit) => {
                let failed = !exit.clean() && !spec.stop;
                self.finish(&spec, &dir, None, Vec::new(), exit, failed)
                    .await;
                return;
            }
            Adopt::Fresh if spec.stop || !spec.exposed_ports.is_empty() => {
                let reason = if spec.stop {
                    "stopped before it started"
                } else {
                    "process was lost: no local state on its node"
                };
                let exit = ExitInfo {
                    code: None,
                    reason: reason.into(),
                };
                self.report_exit(&id, exit, !spec.stop).await;
                return;
            }
            Adopt::Fresh => match self.launch(&spec, &dir, &counters).await {
                Ok(x) => x,
                Err(e) => {
                    append_log(&dir, &format!("[lodge] failed to start: {e}"));
                    tracing::warn!(process_id = %id, error = %e, "failed to start process");
                    self.report_exit(
                        &id,
                        ExitInfo {
                            code: None,
                            reason: format!("failed to start: {e}"),
                        },
                        true,
                    )
                    .await;
                    return;
                }
            },
        };

        // Wait for the default port to be bound, unless the process ends or is stopped first.
        let default = &spec.default_port;
        let proto = if default.transport_type == TransportType::Udp {
            sys::Proto::Udp
        } else {
            sys::Proto::Tcp
        };
        let started = Instant::now();
        let mut bound = false;
        let mut exited_early = false;
        while !stop_requested.load(Ordering::SeqCst) {
            if sys::port_bound(state.game_pid, default.port_inside(&state), proto) {
                bound = true;
                break;
            }
            let elapsed = started.elapsed();
            if elapsed >= self.cfg.bind_timeout {
                break;
            }
            let step = if elapsed < Duration::from_millis(300) {
                2
            } else {
                25
            };
            tokio::select! {
                _ = waiter.wait() => { exited_early = true; break; }
                _ = tokio::time::sleep(Duration::from_millis(step)) => {}
                _ = stop.notified() => { stop.notify_one(); }
            }
        }
        let mut timed_out = false;
        if bound {
            tracing::info!(process_id = %id, after_ms = started.elapsed().as_millis() as u64, "process bound its port");
            self.link
                .report(AgentEvent::Running {
                    process_id: id.clone(),
                    at: self.now(),
                })
                .await;
        } else if !exited_early && !stop_requested.load(Ordering::SeqCst) {
            timed_out = true;
            let msg = format!(
                "[lodge] the process did not bind {}/{} within {} s; stopping it",
                default.port_inside(&state),
                default.transport_type,
                self.cfg.bind_timeout.as_secs_f64()
            );
            append_log(&dir, &msg);
            tracing::warn!(process_id = %id, "bind timeout");
            stop_requested.store(true, Ordering::SeqCst);
            stop.notify_one();
        }

        // Run until it exits; a stop request sends SIGTERM, then SIGKILL after the grace period.
        if !exited_early {
            let activity = self.activity_reporter(id.clone(), counters.clone());
            let sampler = self.metrics_sampler(dir.clone(), state.game_pid, counters.clone());
            tokio::select! {
                _ = waiter.wait() => {}
                _ = stop.notified() => {
                    stop_requested.store(true, Ordering::SeqCst);
                    terminate(&state, libc::SIGTERM).await;
                    if tokio::time::timeout(self.cfg.stop_grace, waiter.wait()).await.is_err() {
                        terminate(&state, libc::SIGKILL).await;
                        waiter.wait().await;
                    }
                }
            }
            activity.abort();
            sampler.abort();
        }
        let mut exit = exit_info(&dir);
        if timed_out {
            exit.reason = format!(
                "did not bind its port within {} s",
                self.cfg.bind_timeout.as_secs_f64()
            );
        }
        // A stop that was asked for is a stop whatever the exit code; a bind timeout is a failure.
        let failed = timed_out || (!exit.clean() && !stop_requested.load(Ordering::SeqCst));
        self.finish(&spec, &dir, Some(state), routes, exit, failed)
            .await;
    }

    pub(crate) fn activity_reporter(
        self: &Arc<Self>,
        id: String,
        counters: Arc<Counters>,
    ) -> tokio::task::JoinHandle<()> {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last = u64::MAX;
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(agent) = agent.upgrade() else { return };
                let active = counters.active();
                if active > 0 || active != last {
                    agent
                        .link
                        .report(AgentEvent::Activity {
                            process_id: id.clone(),
                            at: agent.now(),
                            active_connections: active,
                        })
                        .await;
                }
                last = active;
            }
        })
    }

    /// A pretend process: booted and running at once on made-up ports, ends when stopped.
    pub(crate) async fn supervise_fake(self: &Arc<Self>, spec: ProcessSpec, stop: Arc<Notify>) {
        let id = spec.process_id.clone();
        // Pretend processes still fetch their build: artifact transport is real.
        if let (Some(fetcher), false) = (&self.cfg.fetcher, spec.stop) {
            if let Err(e) = fetcher.ensure(&spec.build_id).await {
                let exit = ExitInfo {
                    code: None,
                    reason: format!("could not start: {e}"),
                };
                return self.report_exit(&id, exit, true).await;
            }
        }
        let (lo, hi) = self.cfg.port_range;
        let span = u32::from(hi - lo) + 1;
        let seed = id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let exposed = spec
            .ports()
            .enumerate()
            .map(|(i, p)| ExposedPort {
                name: p.name.clone(),
                host: self.cfg.public_host.clone(),
                port: lo + ((seed.wrapping_add(i as u32)) % span) as u16,
                transport_type: p.transport_type,
            })
            .collect();
        if !spec.stop {
            self.link
                .report(AgentEvent::Booted {
                    process_id: id.clone(),
                    at: self.now(),
                    exposed_ports: exposed,
                })
                .await;
            self.link
                .report(AgentEvent::Running {
                    process_id: id.clone(),
                    at: self.now(),
                })
                .await;
            stop.notified().await;
        }
        let exit = ExitInfo {
            code: Some(0),
            reason: "exited with code 0".into(),
        };
        self.report_exit(&id, exit, false).await;
    }

    /// Append a metrics sample for the process every `metrics_interval` while it runs.
    pub(crate) fn metrics_sampler(
        &self,
        dir: PathBuf,
        pid: u32,
        counters: Arc<Counters>,
    ) -> tokio::task::JoinHandle<()> {
        let interval = self.cfg.metrics_interval.max(Duration::from_millis(100));
        let clock = self.clock.clone();
        tokio::spawn(async move {
            let mut last_cpu = tokio::task::spawn_blocking(move || sys::tree_usage(pid).cpu_ns)
                .await
                .unwrap_or(0);
            let mut last_egress = counters.bytes_out();
            let mut last_at = Instant::now();
            loop {
                tokio::time::sleep(interval).await;
                let usage = tokio::task::spawn_blocking(move || sys::tree_usage(pid))
                    .await
                    .unwrap_or_default();
                let egress = counters.bytes_out();
                let sample = metrics::Sample {
                    at_ms: clock.now_ms(),
                    interval_ms: last_at.elapsed().as_millis() as u64,
                    cpu_ns: usage.cpu_ns.saturating_sub(last_cpu),
                    rss_bytes: usage.rss_bytes,
                    egress_bytes: egress.saturating_sub(last_egress),
                    active_connections: counters.active(),
                };
                (last_cpu, last_egress, last_at) = (usage.cpu_ns, egress, Instant::now());
                let dir = dir.clone();
                let _ = tokio::task::spawn_blocking(move || metrics::append(&dir, &sample)).await;
            }
        })
    }

    pub(crate) async fn finish(
        &self,
        spec: &ProcessSpec,
        dir: &Path,
        state: Option<LocalState>,
        routes: Vec<PublicPort>,
        exit: ExitInfo,
        failed: bool,
    ) {
        // The ports are free before they are released for another process.
        lodge_proxy::close_all(routes).await;
        let (mut exit, mut failed) = (exit, failed);
        if let Some(state) = &state {
            // A container runtime reports a signal death as 128 + the signal.
            if let (Some(_), Some(code)) = (&state.oci, exit.code) {
                if code > 128 && code < 160 && exit.reason.starts_with("exited with code") {
                    exit.reason = format!("killed by signal {}", code - 128);
                }
            }
            // The kernel counts out-of-memory kills in the process's memory cgroup: read it
            // before the cgroup goes.
            let cgroups = sys::Cgroups {
                dirs: state.cgroups.clone(),
            };
            let killed = exit.code == Some(137) || exit.reason.contains("signal 9");
            if cgroups.oom_kills() > 0 || (failed && killed && cgroups.memory_limit_hit()) {
                exit.reason = format!(
                    "out of memory: it used its whole {} MB memory limit and was killed",
                    spec.requested_memory_mb
                );
                failed = true;
            }
            self.release(state).await;
        }
        append_log(dir, &format!("[lodge] process {}", exit.reason));
        self.report_exit(&spec.process_id, exit, failed).await;
    }

    pub(crate) async fn report_exit(&self, id: &str, exit: ExitInfo, failed: bool) {
        tracing::info!(process_id = %id, reason = %exit.reason, failed, "process ended");
        // Never started again, even while the desired set still lists it (until the control
        // plane has applied the exit, or while it is out of reach).
        self.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
        // Gone from this node before anyone hears it ended.
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.link
            .report(AgentEvent::Exited {
                process_id: id.to_string(),
                at: self.now(),
                exit,
                failed,
            })
            .await;
    }

    pub(crate) async fn release(&self, state: &LocalState) {
        if let Some(dir) = &state.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some(oci) = &state.oci {
            oci::runtime(&oci.runtime, &oci.root, &["delete", "--force", &oci.id]).await;
        }
        // Only a namespace that still exists is this process's to delete, and its slot to free.
        let netns = state
            .netns
            .as_ref()
            .filter(|ns| sys::netns_exists(&ns.name));
        if let (Some(ns), Some(net)) = (netns, &self.network) {
            if let Err(e) = net.delete_namespace(&ns.name, &ns.veth).await {
                tracing::warn!(error = %e, ns = %ns.name, "cannot delete network namespace");
            }
        }
        sys::Cgroups {
            dirs: state.cgroups.clone(),
        }
        .destroy();
        if let Some(oci) = &state.oci {
            // The runtime made the container's cgroup under ours in every hierarchy.
            let id = oci.id.trim_start_matches("lodge-");
            sys::Cgroups::remove_everywhere(&self.cfg.cgroup_group(), id);
        }
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        for t in &state.targets {
            r.ports.remove(&t.public_port);
        }
        if let Some(ns) = netns {
            r.ip_indexes.remove(&ns.index);
        }
        if let Some(u) = &state.user {
            r.user_indexes.remove(&u.index);
        }
    }

    pub(crate) async fn try_adopt(
        &self,
        spec: &ProcessSpec,
        dir: &Path,
        counters: &Arc<Counters>,
    ) -> Adopt {
        let Ok(bytes) = std::fs::read(dir.join("state.json")) else {
            return Adopt::Fresh;
        };
        let Ok(state) = serde_json::from_slice::<LocalState>(&bytes) else {
            return Adopt::Fresh;
        };
        {
            let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
            r.ports.extend(state.targets.iter().map(|t| t.public_port));
            // A namespace that is gone holds no slot (a later process may have it now).
            if let Some(ns) = state
                .netns
                .as_ref()
                .filter(|ns| sys::netns_exists(&ns.name))
            {
                r.ip_indexes.insert(ns.index);
            }
            if let Some(u) = &state.user {
                r.user_indexes.insert(u.index);
            }
        }
        let mut state = state;
        recover_pids(dir, &mut state);
        if state.shim_pid == 0 {
            // Lodge died after recording the start but before any shim existed: nothing ran,
            // so start it now instead of failing it.
            self.forget_forwarding(&state).await;
            self.release(&state).await;
            let _ = std::fs::remove_file(dir.join("state.json"));
            return Adopt::Fresh;
        }
        if sys::alive(state.shim_pid, state.shim_start) {
            let mut routes = Vec::new();
            for t in &state.targets {
                match self.open_route(t, counters).await {
                    Ok(r) => routes.push(r),
                    Err(e) => {
                        tracing::warn!(process_id = %spec.process_id, port = t.public_port, error = %e, "cannot reopen public port");
                        // The kernel still forwards it: keep it, to be removed with the process.
                        if let Some(port) = self.kernel_port(t, None) {
                            routes.push(port);
                        }
                    }
                }
            }
            // Kernel forwarding outlived the restart; installing again is a no-op that keeps
            // the counters, and puts back whatever a crash left half done.
            if let Err(e) = self.install_ports(&spec.process_id, &routes).await {
                tracing::warn!(process_id = %spec.process_id, error = %e, "cannot forward the public ports again");
            }
            self.refresh_kernel_counts().await;
            return Adopt::Live(Box::new(state), routes);
        }
        // The shim is gone. If its game server somehow lives on, it is unsupervised: end it.
        if shim::read_exit(dir).is_none() && sys::alive(state.game_pid, None) {
            sys::signal_group(state.game_pid, libc::SIGKILL);
        }
        self.forget_forwarding(&state).await;
        self.release(&state).await;
        let exit = match shim::read_exit(dir) {
            Some(e) => ExitInfo {
                code: e.code,
                reason: format!("{} while Lodge was down", e.describe()),
            },
            None => ExitInfo {
                code: None,
                reason: "its supervisor was lost while Lodge was down".into(),
            },
        };
        Adopt::Ended(exit)
    }

    pub(crate) async fn open_route(
        &self,
        t: &Target,
        counters: &Arc<Counters>,
    ) -> std::io::Result<PublicPort> {
        let proto = if t.udp { Protocol::Udp } else { Protocol::Tcp };
        let public = SocketAddr::new(self.cfg.proxy_ip, t.public_port);
        if t.tls {
            // TLS is terminated here whoever forwards the other ports.
            let identity = self.cfg.tls.as_ref().ok_or_else(|| {
                std::io::Error::other("this node has no TLS certificate for tls ports")
            })?;
            return lodge_proxy::open_tls(
                public,
                t.target,
                identity,
                counters.clone(),
                self.cfg.flows.clone(),
            )
            .await
            .map(PublicPort::Userspace);
        }
        if self.kernel_entry(t).is_some() {
            // Held, not forwarded yet: `install_ports` adds the whole process's ports at once.
            let hold = kernel::Placeholder::bind(public)?;
            if let Some(port) = self.kernel_port(t, Some(hold)) {
                return Ok(port);
            }
        }
        lodge_proxy::open(
            public,
            t.target,
            proto,
            counters.clone(),
            self.cfg.flows.clone(),
        )
        .await
        .map(PublicPort::Userspace)
    }
}

pub(crate) enum Adopt {
    Fresh,
    Live(Box<LocalState>, Vec<PublicPort>),
    Ended(ExitInfo),
}

pub(crate) enum Waiter {
    Child(tokio::process::Child),
    Pid(u32),
}

impl Waiter {
    /// Resolves when the shim has exited (repeatable).
    async fn wait(&mut self) {
        match self {
            Waiter::Child(c) => {
                let _ = c.wait().await;
            }
            Waiter::Pid(p) => sys::wait_exit(*p).await,
        }
    }
}
