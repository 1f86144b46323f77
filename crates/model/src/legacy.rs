//! The JSON shapes of the deprecated v1/v2 API families that shipped games and editor plugins
//! still call. They differ from v3 mostly in using per-app integer ids for builds and
//! deployments, which the caller supplies (see `Store::legacy_number`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::{rfc3339, Millis};
use crate::entity::*;
use crate::enums::*;
use crate::wire::{ContainerPortIn, RoomOut};

fn ts(ms: Option<Millis>) -> Option<String> {
    ms.map(rfc3339)
}

/// v1/v2 `Build`: integer id within the app.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildLegacy {
    pub build_id: i64,
    pub app_id: String,
    pub created_by: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub deleted_at: Option<String>,
    pub status: BuildStatus,
    pub image_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_tag: Option<String>,
    pub regional_container_tags: Vec<Value>,
}

impl BuildLegacy {
    pub fn of(b: &Build, number: i64, app_id: &str) -> Self {
        Self {
            build_id: number,
            app_id: app_id.to_string(),
            created_by: b.created_by.clone(),
            created_at: rfc3339(b.created_at),
            started_at: ts(b.started_at),
            finished_at: ts(b.finished_at),
            deleted_at: ts(b.deleted_at),
            status: b.status,
            image_size: b.image_size,
            build_tag: b.build_tag.clone(),
            regional_container_tags: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildWithMultipartUrlsLegacy {
    #[serde(flatten)]
    pub build: BuildLegacy,
    pub upload_parts: Vec<crate::wire::UploadPart>,
    pub max_chunk_size: u64,
    pub complete_upload_post_request_url: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

/// v2 `BuildWithUploadUrl`: an S3-style presigned POST form.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildWithUploadUrl {
    #[serde(flatten)]
    pub build: BuildLegacy,
    pub upload_url: String,
    pub upload_body_params: Vec<KeyValue>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateBuildParams {
    #[serde(default)]
    pub build_tag: Option<String>,
}

/// v2 `DeploymentConfigV2`: v3 without build id, tags, fleet or GPU.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentConfigV2 {
    pub idle_timeout_enabled: bool,
    pub env: Vec<EnvVar>,
    pub rooms_per_process: u32,
    pub transport_type: TransportType,
    pub container_port: u32,
    #[serde(default)]
    pub additional_container_ports: Vec<ContainerPortIn>,
    #[serde(rename = "requestedCPU")]
    pub requested_cpu: f64,
    #[serde(rename = "requestedMemoryMB")]
    pub requested_memory_mb: f64,
}

/// v1 `DeploymentConfig`: a plan name instead of CPU and memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentConfigV1 {
    #[serde(default = "yes")]
    pub idle_timeout_enabled: bool,
    pub env: Vec<EnvVar>,
    pub rooms_per_process: u32,
    pub plan_name: PlanName,
    #[serde(default)]
    pub additional_container_ports: Vec<ContainerPortIn>,
    pub transport_type: TransportType,
    pub container_port: u32,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentV2 {
    pub deployment_id: i64,
    pub build_id: i64,
    pub app_id: String,
    pub created_by: String,
    pub created_at: String,
    pub idle_timeout_enabled: bool,
    pub env: Vec<EnvVar>,
    pub rooms_per_process: u32,
    pub default_container_port: ContainerPort,
    pub additional_container_ports: Vec<ContainerPort>,
    #[serde(rename = "requestedCPU")]
    pub requested_cpu: f64,
    #[serde(rename = "requestedMemoryMB")]
    pub requested_memory_mb: f64,
}

impl DeploymentV2 {
    pub fn of(d: &Deployment, number: i64, build_number: i64) -> Self {
        Self {
            deployment_id: number,
            build_id: build_number,
            app_id: d.app_id.clone(),
            created_by: d.created_by.clone(),
            created_at: rfc3339(d.created_at),
            idle_timeout_enabled: d.idle_timeout_enabled,
            env: d.env.clone(),
            rooms_per_process: d.rooms_per_process,
            default_container_port: d.default_container_port.clone(),
            additional_container_ports: d.additional_container_ports.clone(),
            requested_cpu: d.requested_cpu,
            requested_memory_mb: d.requested_memory_mb,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentV1 {
    pub deployment_id: i64,
    pub build_id: i64,
    pub app_id: String,
    pub created_by: String,
    pub created_at: String,
    pub idle_timeout_enabled: bool,
    pub env: Vec<EnvVar>,
    pub rooms_per_process: u32,
    pub plan_name: PlanName,
    pub transport_type: TransportType,
    pub container_port: u16,
    pub default_container_port: ContainerPort,
    pub additional_container_ports: Vec<ContainerPort>,
    #[serde(rename = "requestedCPU")]
    pub requested_cpu: f64,
    /// An integer in v1.
    #[serde(rename = "requestedMemoryMB")]
    pub requested_memory_mb: i64,
}

impl DeploymentV1 {
    pub fn of(d: &Deployment, number: i64, build_number: i64) -> Self {
        Self {
            deployment_id: number,
            build_id: build_number,
            app_id: d.app_id.clone(),
            created_by: d.created_by.clone(),
            created_at: rfc3339(d.created_at),
            idle_timeout_enabled: d.idle_timeout_enabled,
            env: d.env.clone(),
            rooms_per_process: d.rooms_per_process,
            plan_name: PlanName::closest(d.requested_cpu, d.requested_memory_mb),
            transport_type: d.default_container_port.transport_type,
            container_port: d.default_container_port.port,
            default_container_port: d.default_container_port.clone(),
            additional_container_ports: d.additional_container_ports.clone(),
            requested_cpu: d.requested_cpu,
            requested_memory_mb: d.requested_memory_mb.round() as i64,
        }
    }
}

/// A v1 app listing entry: the app and its latest deployment (v2 shape) with its build.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentWithBuildLegacy {
    #[serde(flatten)]
    pub deployment: DeploymentV2,
    pub build: BuildLegacy,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessV2 {
    pub process_id: String,
    pub app_id: String,
    pub deployment_id: i64,
    pub region: Region,
    pub status: ProcessStatus,
    pub rooms_allocated: u32,
    pub rooms_per_process: u32,
    pub exposed_port: Option<ExposedPort>,
    pub additional_exposed_ports: Vec<ExposedPort>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub stopping_at: Option<String>,
    pub terminated_at: Option<String>,
}

impl ProcessV2 {
    pub fn of(p: &Process, deployment_number: i64) -> Self {
        Self {
            process_id: p.process_id.clone(),
            app_id: p.app_id.clone(),
            deployment_id: deployment_number,
            region: p.region,
            status: p.status,
            rooms_allocated: p.rooms_allocated,
            rooms_per_process: p.rooms_per_process,
            exposed_port: p.exposed_ports.first().cloned(),
            additional_exposed_ports: p.exposed_ports.iter().skip(1).cloned().collect(),
            created_at: rfc3339(p.created_at),
            started_at: ts(p.started_at),
            stopping_at: ts(p.stopping_at),
            terminated_at: ts(p.terminated_at),
        }
    }
}

/// Live counters a v1 `Process` reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessCounters {
    pub active_connections: u64,
    pub egressed_bytes: u64,
}

/// v1 `Process`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessV1 {
    pub process_id: String,
    pub app_id: String,
    pub deployment_id: i64,
    pub region: Region,
    pub host: String,
    pub port: u16,
    pub exposed_port: Option<ExposedPort>,
    pub additional_exposed_ports: Vec<ExposedPort>,
    pub rooms_per_process: u32,
    pub rooms_allocated: u32,
    pub rooms_allocated_updated_at: String,
    pub room_slots_available: u32,
    pub room_slots_available_updated_at: String,
    pub active_connections: u64,
    pub active_connections_updated_at: String,
    pub draining: bool,
    pub idle_since: Option<String>,
    pub egressed_bytes: u64,
    pub starting_at: String,
    pub started_at: Option<String>,
    pub stopping_at: Option<String>,
    pub terminated_at: Option<String>,
}

impl ProcessV1 {
    pub fn of(p: &Process, deployment_number: i64, c: ProcessCounters, now: Millis) -> Self {
        let exposed = p.exposed_ports.first().cloned();
        let idle = p.rooms_allocated == 0 && c.active_connections == 0 && !p.status.is_terminal();
        Self {
            process_id: p.process_id.clone(),
            app_id: p.app_id.clone(),
            deployment_id: deployment_number,
            region: p.region,
            host: exposed.as_ref().map(|e| e.host.clone()).unwrap_or_default(),
            port: exposed.as_ref().map(|e| e.port).unwrap_or(0),
            exposed_port: exposed,
            additional_exposed_ports: p.exposed_ports.iter().skip(1).cloned().collect(),
            rooms_per_process: p.rooms_per_process,
            rooms_allocated: p.rooms_allocated,
            rooms_allocated_updated_at: rfc3339(now),
            room_slots_available: p.rooms_per_process.saturating_sub(p.rooms_allocated),
            room_slots_available_updated_at: rfc3339(now),
            active_connections: c.active_connections,
            active_connections_updated_at: rfc3339(now),
            draining: p.status == ProcessStatus::Draining,
            idle_since: idle.then(|| rfc3339(p.last_busy_at)),
            egressed_bytes: c.egressed_bytes,
            starting_at: rfc3339(p.created_at),
            started_at: ts(p.started_at),
            stopping_at: ts(p.stopping_at),
            terminated_at: ts(p.terminated_at),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessWithRooms {
    #[serde(flatten)]
    pub process: ProcessV1,
    pub rooms: Vec<RoomOut>,
    pub total_rooms: u32,
}

/// v1 `ConnectionInfo`: `{status: "starting", roomId}` or the default port inline.
pub fn connection_info_v1(room_id: &str, port: Option<&ExposedPort>) -> Value {
    match port {
        Some(p) => serde_json::json!({
            "status": "active",
            "roomId": room_id,
            "host": p.host,
            "port": p.port,
            "transportType": p.transport_type,
        }),
        None => serde_json::json!({"status": "starting", "roomId": room_id}),
    }
}
