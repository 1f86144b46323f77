//! The node side of [`NodeLink`]: logs, metrics and what the node keeps, read from its own
//! files.

#[allow(unused_imports)]
use super::*;

#[async_trait]
impl lodge_model::node::NodeLink for Agent {
    fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    fn wake(&self, process_id: &str) {
        self.wake_for(process_id);
    }

    fn stats(&self, process_id: &str) -> Option<ProcessStats> {
        Agent::stats(self, process_id)
    }

    fn flows(&self) -> lodge_model::node::FlowTotals {
        let f = &self.cfg.flows;
        // Kernel-forwarded flows are connection-tracking entries, read into each process's
        // counters; the userspace proxy's are its own.
        let kernel: u64 = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|r| !r.kernel_ports.is_empty())
            .map(|r| r.counters.kernel.active.load(Ordering::Relaxed))
            .sum();
        lodge_model::node::FlowTotals {
            active: u64::try_from(f.active()).unwrap_or(u64::MAX) + kernel,
            max: u64::try_from(f.max_flows()).unwrap_or(u64::MAX),
            refused: f.refused.load(Ordering::Relaxed),
            kernel_forwarding: self.forwarder.is_some(),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
        }
    }

    async fn log_tail(&self, process_id: &str, lines: usize) -> LinkResult<(Vec<u8>, u64)> {
        let dir = logs::process_dir(&self.processes_dir(), process_id)?;
        logs::tail_lines(&dir.join(shim::LOG), lines)
            .await
            .map_err(|e| LinkError::io(format_args!("reading the log of {process_id}"), e))
    }

    async fn log_read(&self, process_id: &str, offset: u64, max: usize) -> LinkResult<Vec<u8>> {
        let dir = logs::process_dir(&self.processes_dir(), process_id)?;
        logs::read_at(&dir.join(shim::LOG), offset, max)
            .await
            .map_err(|e| LinkError::io(format_args!("reading the log of {process_id}"), e))
    }

    async fn kept_processes(&self) -> LinkResult<Vec<String>> {
        let io = |e| LinkError::io("listing the node's processes", e);
        let mut out = Vec::new();
        let mut entries = tokio::fs::read_dir(self.processes_dir())
            .await
            .map_err(io)?;
        while let Some(e) = entries.next_entry().await.map_err(io)? {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
        Ok(out)
    }

    async fn forget_process(&self, process_id: &str) -> LinkResult<()> {
        if self.stats(process_id).is_some() {
            return Err(LinkError::Refused(format!(
                "process {process_id} still runs here"
            )));
        }
        let dir = logs::process_dir(&self.processes_dir(), process_id)?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LinkError::io(dir.display(), e)),
        }
    }

    async fn metrics(
        &self,
        process_id: &str,
        start_s: i64,
        end_s: i64,
        step_s: i64,
    ) -> LinkResult<lodge_model::node::MetricSeries> {
        let dir = logs::process_dir(&self.processes_dir(), process_id)?;
        let samples = tokio::task::spawn_blocking(move || metrics::read(&dir))
            .await
            .map_err(|e| LinkError::Io(format!("reading metrics: {e}")))?;
        Ok(metrics::series(&samples, start_s, end_s, step_s))
    }
}
