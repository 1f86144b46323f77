//! Reconciling: what runs here against what the control plane wants, started, stopped or
//! adopted; and, once after a start, the processes it no longer wants.

#[allow(unused_imports)]
use super::*;

impl Agent {
    /// Start or stop just these processes, as the control plane now wants them.
    pub(crate) async fn reconcile_some(self: &Arc<Self>, ids: &[String]) {
        let specs = match self.link.specs(&self.cfg.node_id, ids).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read changed processes");
                return;
            }
        };
        self.apply(&specs, false);
    }

    /// A full pass; false if the desired processes could not be read (nothing is stopped).
    pub(crate) async fn reconcile(self: &Arc<Self>) -> bool {
        let desired = match self.link.desired(&self.cfg.node_id).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read desired processes");
                return false;
            }
        };
        self.apply(&desired, true);
        if !self.orphans_checked.swap(true, Ordering::AcqRel) {
            let wanted: BTreeSet<String> = desired.iter().map(|s| s.process_id.clone()).collect();
            let agent = self.clone();
            tokio::spawn(async move { agent.end_orphans(&wanted).await });
        }
        true
    }

    /// Game servers still running from before this start that the control plane no longer
    /// wants (it ended them while the node was away): its word wins, they stop, gracefully.
    /// Only after a restart can a process run here without being supervised, so one look at
    /// the first whole desired set is enough.
    pub(crate) async fn end_orphans(self: &Arc<Self>, wanted: &BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.processes_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let supervised = self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&id);
            if wanted.contains(&id) || supervised {
                continue;
            }
            let dir = e.path();
            let Ok(bytes) = std::fs::read(dir.join("state.json")) else {
                continue;
            };
            let Ok(mut state) = serde_json::from_slice::<LocalState>(&bytes) else {
                continue;
            };
            recover_pids(&dir, &mut state);
            if !sys::alive(state.shim_pid, state.shim_start) {
                continue;
            }
            tracing::info!(process_id = %id, "the control plane ended this process while the node was away; stopping it");
            append_log(
                &dir,
                "lodge: the control plane ended this process while its node was away; stopping it",
            );
            terminate(&state, libc::SIGTERM).await;
            let deadline = Instant::now() + self.cfg.stop_grace;
            while Instant::now() < deadline && sys::alive(state.shim_pid, state.shim_start) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            end_process_dir(&dir, &self.cfg.cgroup_group()).await;
            self.forget_forwarding(&state).await;
        }
    }

    /// Start what should run and is not running, stop what should stop; with `complete`,
    /// `desired` is everything, and whatever runs outside it is stopped too.
    pub(crate) fn apply(self: &Arc<Self>, desired: &[ProcessSpec], complete: bool) {
        let mut to_start = Vec::new();
        {
            let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
            if complete {
                // What the control plane no longer lists needs no remembering.
                ended.retain(|id| desired.iter().any(|s| &s.process_id == id));
            }
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            for spec in desired.iter().filter(|s| !ended.contains(&s.process_id)) {
                match running.get(&spec.process_id) {
                    Some(r) if spec.stop && !r.stop_requested.swap(true, Ordering::SeqCst) => {
                        r.stop.notify_one()
                    }
                    Some(_) => {}
                    None => to_start.push(spec.clone()),
                }
            }
            let wanted: BTreeSet<&str> = desired.iter().map(|s| s.process_id.as_str()).collect();
            for (id, r) in running.iter().filter(|_| complete) {
                if !wanted.contains(id.as_str()) && !r.stop_requested.swap(true, Ordering::SeqCst) {
                    tracing::info!(process_id = %id, "process no longer wanted here; stopping it");
                    r.stop.notify_one();
                }
            }
        }
        for spec in to_start {
            let handle = Running {
                build_id: spec.build_id.clone(),
                counters: Arc::default(),
                stop: Arc::new(Notify::new()),
                stop_requested: Arc::new(AtomicBool::new(spec.stop)),
                kernel_ports: Vec::new(),
            };
            if spec.stop {
                handle.stop.notify_one();
            }
            let (counters, stop, stop_requested) = (
                handle.counters.clone(),
                handle.stop.clone(),
                handle.stop_requested.clone(),
            );
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(spec.process_id.clone(), handle);
            let agent = self.clone();
            tokio::spawn(async move {
                let id = spec.process_id.clone();
                let run = crate::driver::Run {
                    counters,
                    stop,
                    stop_requested,
                };
                agent.driver.run(&agent, spec, run).await;
                agent
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        }
    }
}
