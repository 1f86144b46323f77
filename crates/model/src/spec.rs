//! What the control plane tells a node to run, and what the node reports back.

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::entity::{ContainerPort, EnvVar, ExposedPort};
use crate::enums::Region;

/// Everything a node needs to start (or keep running, or stop) one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSpec {
    pub process_id: String,
    pub app_id: String,
    pub app_secret: String,
    pub deployment_id: String,
    pub build_id: String,
    pub build_tag: Option<String>,
    pub region: Region,
    pub rooms_per_process: u32,
    pub default_port: ContainerPort,
    pub additional_ports: Vec<ContainerPort>,
    pub env: Vec<EnvVar>,
    pub requested_cpu: f64,
    pub requested_memory_mb: f64,
    pub initial_room_id: Option<String>,
    pub initial_room_config: Option<String>,
    /// The control plane wants it stopped (StopProcess, idle reaper).
    pub stop: bool,
    /// Public ports already assigned (a process that was started before); empty for a new one.
    pub exposed_ports: Vec<ExposedPort>,
}

impl ProcessSpec {
    pub fn ports(&self) -> impl Iterator<Item = &ContainerPort> {
        std::iter::once(&self.default_port).chain(self.additional_ports.iter())
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitInfo {
    /// Exit code, or `None` when killed by a signal or lost.
    pub code: Option<i32>,
    pub reason: String,
}

impl ExitInfo {
    pub fn clean(&self) -> bool {
        self.code == Some(0)
    }
}

/// Reports from a node about its processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum AgentEvent {
    /// Spawned; public ports assigned.
    Booted {
        process_id: String,
        at: Millis,
        exposed_ports: Vec<ExposedPort>,
    },
    /// The default port is bound and the proxy forwards to it.
    Running { process_id: String, at: Millis },
    /// The process is gone.
    Exited {
        process_id: String,
        at: Millis,
        exit: ExitInfo,
        failed: bool,
    },
    /// Periodic activity sample.
    Activity {
        process_id: String,
        at: Millis,
        active_connections: u64,
    },
}
