//! How a node runs the processes it is given. The reconcile loop decides what should run; a
//! [`Driver`] runs one process for its whole life: start it (or adopt it after a restart),
//! report it booted and running, stop it when asked, report how it ended. The real driver runs
//! native bundles under the shim and container images under the OCI runtime; the pretend driver
//! runs nothing and reports at once, so a control plane can be measured and tested with tens of
//! thousands of processes or a thousand nodes on one machine.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use async_trait::async_trait;
use lodge_model::spec::ProcessSpec;
use lodge_proxy::Counters;
use tokio::sync::Notify;

use crate::Agent;

/// What the reconcile loop hands a driver with each process: its live counters, the signal to
/// stop, and whether a stop was asked for.
pub struct Run {
    pub counters: Arc<Counters>,
    pub stop: Arc<Notify>,
    pub stop_requested: Arc<AtomicBool>,
}

#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Run `spec` until it ends; returns once its exit is reported.
    async fn run(&self, agent: &Arc<Agent>, spec: ProcessSpec, run: Run);
}

/// Native bundles and container images, for real.
pub struct Processes;

#[async_trait]
impl Driver for Processes {
    async fn run(&self, agent: &Arc<Agent>, spec: ProcessSpec, run: Run) {
        agent
            .supervise(spec, run.counters, run.stop, run.stop_requested)
            .await
    }
}

/// Nothing runs: a process boots and runs at once, and exits when asked to stop. Builds are
/// still fetched, so artifact transport stays real.
pub struct Pretend;

#[async_trait]
impl Driver for Pretend {
    async fn run(&self, agent: &Arc<Agent>, spec: ProcessSpec, run: Run) {
        agent.supervise_fake(spec, run.stop).await
    }
}
