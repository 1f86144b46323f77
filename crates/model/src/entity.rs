//! Entities as Lodge stores them. They serialize to JSON documents in the store; the exact
//! Hathora wire shapes live in [`crate::wire`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Millis;
use crate::enums::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Org {
    pub org_id: String,
    pub name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrgToken {
    pub org_token_id: String,
    pub org_id: String,
    pub name: String,
    pub status: OrgTokenStatus,
    pub last_four_chars_of_key: String,
    pub created_at: Millis,
    pub created_by: String,
    /// `"admin"` or a list of scopes, exactly as given; `None` means admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct App {
    pub app_id: String,
    pub app_name: String,
    pub app_secret: String,
    pub org_id: String,
    pub created_by: String,
    pub created_at: Millis,
    pub deleted_at: Option<Millis>,
    pub deleted_by: Option<String>,
    pub auth_configuration: Value,
    pub service_config: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadSession {
    pub size: u64,
    pub max_chunk_size: u64,
    pub parts: u32,
    /// Unguessable token embedded in the presigned part and completion URLs.
    pub secret: String,
    pub completed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    pub build_id: String,
    pub org_id: String,
    pub created_by: String,
    pub created_at: Millis,
    pub status: BuildStatus,
    pub image_size: u64,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub deleted_at: Option<Millis>,
    pub build_tag: Option<String>,
    pub content_hash: Option<String>,
    pub upload: Option<UploadSession>,
    /// The replica running the build while it is `running` (a build whose replica is gone can
    /// never finish).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub transport_type: TransportType,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub deployment_id: String,
    pub app_id: String,
    pub build_id: String,
    pub build_tag: Option<String>,
    pub created_by: String,
    pub created_at: Millis,
    pub idle_timeout_enabled: bool,
    pub env: Vec<EnvVar>,
    pub rooms_per_process: u32,
    pub default_container_port: ContainerPort,
    pub additional_container_ports: Vec<ContainerPort>,
    #[serde(rename = "requestedCPU")]
    pub requested_cpu: f64,
    #[serde(rename = "requestedMemoryMB")]
    pub requested_memory_mb: f64,
    #[serde(rename = "requestedGPU")]
    pub requested_gpu: Option<f64>,
    pub deployment_tag: Option<String>,
    pub fleet_id: Option<String>,
}

impl Deployment {
    /// Default port first, then the additional ones.
    pub fn ports(&self) -> impl Iterator<Item = &ContainerPort> {
        std::iter::once(&self.default_container_port).chain(self.additional_container_ports.iter())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExposedPort {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub transport_type: TransportType,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    pub process_id: String,
    pub app_id: String,
    pub deployment_id: String,
    pub node_id: String,
    pub region: Region,
    pub status: ProcessStatus,
    pub rooms_per_process: u32,
    pub rooms_allocated: u32,
    /// Public ports, default first; known once the node has started the process.
    pub exposed_ports: Vec<ExposedPort>,
    pub created_at: Millis,
    pub scheduled_at: Option<Millis>,
    pub booted_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub stopping_at: Option<Millis>,
    pub terminated_at: Option<Millis>,
    pub summary_exit_reason: Option<String>,
    /// Last time the process had a room or a connection (idle reaper).
    pub last_busy_at: Millis,
    pub initial_room_id: Option<String>,
    pub initial_room_config: Option<String>,
    /// Public ports it needs: its default port and the additional ones.
    #[serde(default = "one")]
    pub port_count: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomAllocation {
    pub room_allocation_id: String,
    pub process_id: String,
    pub scheduled_at: Millis,
    pub unscheduled_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Room {
    pub room_id: String,
    pub app_id: String,
    pub status: RoomStatus,
    pub room_config: Option<String>,
    pub created_at: Millis,
    /// Oldest first.
    pub allocations: Vec<RoomAllocation>,
}

impl Room {
    pub fn current_allocation(&self) -> Option<&RoomAllocation> {
        self.allocations
            .last()
            .filter(|a| a.unscheduled_at.is_none())
    }
}

/// A machine that runs processes: the embedded one in `lodge serve`, or a joined agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub node_id: String,
    pub public_host: String,
    /// `None` serves every region.
    pub regions: Option<Vec<Region>>,
    pub started_at: Millis,
    /// Public proxy ports it has; `None` is unlimited.
    #[serde(default)]
    pub port_capacity: Option<u32>,
    /// The fleet it belongs to; `None` is its org's default fleet.
    #[serde(default)]
    pub fleet_id: Option<String>,
    #[serde(default)]
    pub status: NodeStatus,
    /// Cores and memory it offers to processes (0: not reported).
    #[serde(default)]
    pub cpu: f64,
    #[serde(default)]
    pub memory_mb: f64,
    #[serde(default)]
    pub stopped_at: Option<Millis>,
    /// A joined agent (not the node embedded in `lodge serve`).
    #[serde(default)]
    pub remote: bool,
    /// SHA-256 of the node's credential (joined agents only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_hash: Option<String>,
    /// When the control plane last heard from it (written on connect and disconnect).
    #[serde(default)]
    pub last_seen_at: Option<Millis>,
    /// The node protocol's session state: the newest epoch and the last applied event, per
    /// incarnation of the agent.
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub last_event_seq: u64,
    #[serde(default)]
    pub incarnation: u64,
    /// UDP port of its ping (latency) echo service, for DiscoveryV2.
    #[serde(default)]
    pub ping_port: Option<u16>,
    /// The replica that holds the node's current session, which answers calls to the node for
    /// the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

impl Node {
    pub fn serves(&self, region: Region) -> bool {
        self.regions.as_ref().is_none_or(|r| r.contains(&region))
    }

    /// The node embedded in `lodge serve`.
    pub fn local(
        node_id: String,
        public_host: String,
        regions: Option<Vec<Region>>,
        at: Millis,
    ) -> Self {
        Self {
            node_id,
            public_host,
            regions,
            started_at: at,
            port_capacity: None,
            fleet_id: None,
            status: NodeStatus::Running,
            cpu: 0.0,
            memory_mb: 0.0,
            stopped_at: None,
            remote: false,
            credential_hash: None,
            last_seen_at: None,
            epoch: 0,
            last_event_seq: 0,
            incarnation: 0,
            ping_port: None,
            replica: None,
        }
    }
}

/// What Hathora's NodesV1 calls a node's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    #[default]
    Running,
    /// Takes no new processes; becomes `stopped` when its last process ends.
    Draining,
    Stopped,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Running => "running",
            NodeStatus::Draining => "draining",
            NodeStatus::Stopped => "stopped",
        }
    }
}

/// A fleet of an org, as Hathora's FleetsV2 shows it. Lodge does not provision machines:
/// nodes join a fleet with `lodge agent --fleet`, and the shape, autoscaler threshold and
/// per-region baselines are kept and shown as set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fleet {
    pub fleet_id: String,
    pub org_id: String,
    pub name: String,
    pub node_shape_id: String,
    pub scale_up_threshold: i64,
    /// `nodeBaseline` per region, as set with UpdateFleetRegion.
    #[serde(default)]
    pub baselines: std::collections::BTreeMap<Region, u32>,
    pub created_at: Millis,
}

/// A join token, as stored (its secret only hashed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinToken {
    pub token_id: String,
    pub region: Region,
    pub fleet_id: Option<String>,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// A lobby: the player-facing wrapper of exactly one room (same id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lobby {
    pub room_id: String,
    pub app_id: String,
    pub region: Region,
    pub visibility: LobbyVisibility,
    /// Lookup code; not unique (the newest lobby with a code wins). Lobbies made through the v3
    /// API always have one (their room id unless the player chose one).
    pub short_code: Option<String>,
    /// The player id from the creating player's token.
    pub created_by: String,
    pub created_at: Millis,
    /// Legacy (v1/v2) lobbies: the creator's `initialConfig`, any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_config: Option<Value>,
    /// Legacy (v2) lobbies: the state a game server set with SetLobbyState.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Value>,
    /// The room's current config; read from the room, not stored with the lobby.
    #[serde(skip)]
    pub room_config: Option<String>,
}

/// A control-plane replica as the others see it through the store: where it answers, and
/// when it last said it was alive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    /// New at every start of `lodge serve`.
    pub replica_id: String,
    /// The base URL the other replicas reach this one at (`--advertise-url`).
    pub address: String,
    pub started_at: Millis,
    pub seen_at: Millis,
}
