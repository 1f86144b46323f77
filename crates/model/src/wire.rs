//! Hathora's JSON shapes, exact: camelCase, required-nullable fields always present, optional
//! fields omitted (never `null`), integers as integers, times as RFC 3339 with `Z`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::rfc3339;
use crate::entity::*;
use crate::enums::*;

fn ts(ms: Option<i64>) -> Option<String> {
    ms.map(rfc3339)
}

// ---------------------------------------------------------------------------------------------
// Requests

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateAppConfig {
    pub app_name: String,
    pub auth_configuration: Value,
    #[serde(default)]
    pub service_config: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatchAppConfig {
    #[serde(default)]
    pub app_name: Option<String>,
    #[serde(default)]
    pub auth_configuration: Option<Value>,
    #[serde(default)]
    pub service_config: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMultipartBuildParams {
    pub build_size_in_bytes: f64,
    #[serde(default)]
    pub build_id: Option<String>,
    #[serde(default)]
    pub build_tag: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateBuildV3Params {
    #[serde(default)]
    pub build_id: Option<String>,
    #[serde(default)]
    pub build_tag: Option<String>,
}

/// RunBuildRegistry: the image to pull, where from, and the credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryConfig {
    pub image: String,
    #[serde(default)]
    pub registry_url: Option<String>,
    #[serde(default)]
    pub auth: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentConfigV3 {
    pub build_id: String,
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
    #[serde(default, rename = "requestedGPU")]
    pub requested_gpu: Option<f64>,
    #[serde(default)]
    pub deployment_tag: Option<String>,
    #[serde(default)]
    pub fleet_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPortIn {
    pub name: String,
    pub port: u32,
    pub transport_type: TransportType,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateRoomParams {
    pub region: Region,
    #[serde(default)]
    pub room_config: Option<String>,
    #[serde(default, rename = "clientIPs")]
    pub client_ips: Option<Vec<String>>,
    #[serde(default)]
    pub deployment_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateRoomConfigParams {
    pub room_config: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateOrgTokenParams {
    pub name: String,
    #[serde(default)]
    pub scopes: Option<Value>,
}

// ---------------------------------------------------------------------------------------------
// Responses

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Organization {
    pub org_id: String,
    pub name: String,
    pub stripe_customer_id: String,
    pub is_single_tenant: bool,
    pub scopes: Vec<String>,
    #[serde(rename = "maxRequestedMemoryMB")]
    pub max_requested_memory_mb: f64,
    pub log_retention_period_hours: u32,
    pub max_process_connections: u32,
    /// The fleet nodes join unless their join token names another.
    pub default_fleet_id: String,
}

pub const ALL_SCOPES: &[&str] = &[
    "billing:read-write",
    "builds:read",
    "builds:read-write",
    "deployments:read",
    "deployments:read-write",
    "applications:read",
    "applications:read-write",
    "processes:read",
    "processes:read-write",
    "fleets:read",
    "fleets:read-write",
    "orgs:read",
    "orgs:read-write",
    "tokens:read",
    "tokens:read-write",
    "tickets:read",
    "tickets:read-write",
    "load-balancer:access",
];

#[derive(Debug, Clone, Serialize)]
pub struct OrgsPage {
    pub orgs: Vec<Organization>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrgTokenOut {
    pub org_token_id: String,
    pub org_id: String,
    pub name: String,
    pub status: OrgTokenStatus,
    pub last_four_chars_of_key: String,
    pub created_at: String,
    pub created_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Value>,
}

impl From<&OrgToken> for OrgTokenOut {
    fn from(t: &OrgToken) -> Self {
        Self {
            org_token_id: t.org_token_id.clone(),
            org_id: t.org_id.clone(),
            name: t.name.clone(),
            status: t.status,
            last_four_chars_of_key: t.last_four_chars_of_key.clone(),
            created_at: rfc3339(t.created_at),
            created_by: t.created_by.clone(),
            scopes: t.scopes.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationOut {
    pub app_id: String,
    pub app_name: String,
    pub app_secret: String,
    pub org_id: String,
    pub created_by: String,
    pub created_at: String,
    pub deleted_at: Option<String>,
    pub deleted_by: Option<String>,
    pub auth_configuration: Value,
    pub service_config: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentWithBuild>,
}

impl From<&App> for ApplicationOut {
    fn from(a: &App) -> Self {
        Self {
            app_id: a.app_id.clone(),
            app_name: a.app_name.clone(),
            app_secret: a.app_secret.clone(),
            org_id: a.org_id.clone(),
            created_by: a.created_by.clone(),
            created_at: rfc3339(a.created_at),
            deleted_at: ts(a.deleted_at),
            deleted_by: a.deleted_by.clone(),
            auth_configuration: a.auth_configuration.clone(),
            service_config: a.service_config.clone(),
            deployment: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeploymentWithBuild {
    #[serde(flatten)]
    pub deployment: DeploymentV3,
    pub build: BuildV3,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApplicationsPage {
    pub applications: Vec<ApplicationOut>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildV3 {
    pub build_id: String,
    pub org_id: String,
    pub created_by: String,
    pub created_at: String,
    pub status: BuildStatus,
    pub image_size: u64,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub deleted_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
}

impl From<&Build> for BuildV3 {
    fn from(b: &Build) -> Self {
        Self {
            build_id: b.build_id.clone(),
            org_id: b.org_id.clone(),
            created_by: b.created_by.clone(),
            created_at: rfc3339(b.created_at),
            status: b.status,
            image_size: b.image_size,
            started_at: ts(b.started_at),
            finished_at: ts(b.finished_at),
            deleted_at: ts(b.deleted_at),
            build_tag: b.build_tag.clone(),
            content_hash: b.content_hash.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadPart {
    pub part_number: u32,
    pub put_request_url: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedBuildV3WithMultipartUrls {
    #[serde(flatten)]
    pub build: BuildV3,
    pub upload_parts: Vec<UploadPart>,
    pub max_chunk_size: u64,
    pub complete_upload_post_request_url: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BuildsV3Page {
    pub builds: Vec<BuildV3>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentV3 {
    pub deployment_id: String,
    pub app_id: String,
    pub build_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_tag: Option<String>,
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
    #[serde(rename = "requestedGPU", skip_serializing_if = "Option::is_none")]
    pub requested_gpu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment_tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_id: Option<String>,
}

impl From<&Deployment> for DeploymentV3 {
    fn from(d: &Deployment) -> Self {
        Self {
            deployment_id: d.deployment_id.clone(),
            app_id: d.app_id.clone(),
            build_id: d.build_id.clone(),
            build_tag: d.build_tag.clone(),
            created_by: d.created_by.clone(),
            created_at: rfc3339(d.created_at),
            idle_timeout_enabled: d.idle_timeout_enabled,
            env: d.env.clone(),
            rooms_per_process: d.rooms_per_process,
            default_container_port: d.default_container_port.clone(),
            additional_container_ports: d.additional_container_ports.clone(),
            requested_cpu: d.requested_cpu,
            requested_memory_mb: d.requested_memory_mb,
            requested_gpu: d.requested_gpu,
            deployment_tag: d.deployment_tag.clone(),
            fleet_id: d.fleet_id.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentsV3Page {
    pub deployments: Vec<DeploymentV3>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessV3 {
    pub process_id: String,
    pub app_id: String,
    pub deployment_id: String,
    pub region: Region,
    pub status: ProcessStatus,
    pub hosting: &'static str,
    pub rooms_per_process: u32,
    pub rooms_allocated: u32,
    pub exposed_port: Option<ExposedPort>,
    pub additional_exposed_ports: Vec<ExposedPort>,
    pub created_at: String,
    pub scheduled_at: Option<String>,
    pub booted_at: Option<String>,
    pub started_at: Option<String>,
    pub stopping_at: Option<String>,
    pub terminated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary_exit_reason: Option<String>,
}

impl From<&Process> for ProcessV3 {
    fn from(p: &Process) -> Self {
        let (exposed_port, additional) = split_ports(p);
        Self {
            process_id: p.process_id.clone(),
            app_id: p.app_id.clone(),
            deployment_id: p.deployment_id.clone(),
            region: p.region,
            status: p.status,
            hosting: "metal",
            rooms_per_process: p.rooms_per_process,
            rooms_allocated: p.rooms_allocated,
            exposed_port,
            additional_exposed_ports: additional,
            created_at: rfc3339(p.created_at),
            scheduled_at: ts(p.scheduled_at),
            booted_at: ts(p.booted_at),
            started_at: ts(p.started_at),
            stopping_at: ts(p.stopping_at),
            terminated_at: ts(p.terminated_at),
            summary_exit_reason: p.summary_exit_reason.clone(),
        }
    }
}

/// Exposed ports are shown only while the process is running (reachable).
fn split_ports(p: &Process) -> (Option<ExposedPort>, Vec<ExposedPort>) {
    if !matches!(p.status, ProcessStatus::Running | ProcessStatus::Draining)
        || p.exposed_ports.is_empty()
    {
        return (None, Vec::new());
    }
    (
        Some(p.exposed_ports[0].clone()),
        p.exposed_ports[1..].to_vec(),
    )
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomAllocationOut {
    pub room_allocation_id: String,
    pub process_id: String,
    pub scheduled_at: String,
    pub unscheduled_at: Option<String>,
}

impl From<&RoomAllocation> for RoomAllocationOut {
    fn from(a: &RoomAllocation) -> Self {
        Self {
            room_allocation_id: a.room_allocation_id.clone(),
            process_id: a.process_id.clone(),
            scheduled_at: rfc3339(a.scheduled_at),
            unscheduled_at: ts(a.unscheduled_at),
        }
    }
}

/// Suspended rooms are reported as `scheduling` with no current allocation: current SDKs
/// (C#/Unity) do not know `suspended`.
fn wire_room_status(s: RoomStatus) -> RoomStatus {
    match s {
        RoomStatus::Suspended => RoomStatus::Scheduling,
        other => other,
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomOut {
    pub room_id: String,
    pub app_id: String,
    pub status: RoomStatus,
    pub room_config: Option<String>,
    pub current_allocation: Option<RoomAllocationOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocations: Option<Vec<RoomAllocationOut>>,
}

impl RoomOut {
    pub fn with_allocations(r: &Room) -> Self {
        let mut out = Self::without_allocations(r);
        out.allocations = Some(r.allocations.iter().map(Into::into).collect());
        out
    }
    pub fn without_allocations(r: &Room) -> Self {
        Self {
            room_id: r.room_id.clone(),
            app_id: r.app_id.clone(),
            status: wire_room_status(r.status),
            room_config: r.room_config.clone(),
            current_allocation: r.current_allocation().map(Into::into),
            allocations: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfoV2 {
    pub room_id: String,
    pub status: RoomReadyStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposed_port: Option<ExposedPort>,
    pub additional_exposed_ports: Vec<ExposedPort>,
    /// Present in RoomConnectionData (required there) and RoomAllocationData.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_id: Option<String>,
}

impl ConnectionInfoV2 {
    /// Connection info of a room placed on `process` (if any).
    pub fn of(room_id: &str, process: Option<&Process>) -> Self {
        let (exposed_port, additional) = process.map(split_ports).unwrap_or_default();
        let status = if exposed_port.is_some() {
            RoomReadyStatus::Active
        } else {
            RoomReadyStatus::Starting
        };
        Self {
            room_id: room_id.to_string(),
            status,
            exposed_port,
            additional_exposed_ports: additional,
            process_id: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedOrgToken {
    pub plain_text_token: String,
    pub org_token: OrgTokenOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListOrgTokens {
    pub tokens: Vec<OrgTokenOut>,
}

// ---------------------------------------------------------------------------------------------
// Players: auth and lobbies

#[derive(Debug, Clone, Deserialize)]
pub struct NicknameObject {
    pub nickname: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GoogleIdTokenObject {
    pub id_token: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlayerTokenObject {
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateLobbyV3Params {
    pub visibility: LobbyVisibility,
    pub region: Region,
    #[serde(default)]
    pub room_config: Option<String>,
    /// Godot's plugin sends these in the body rather than the query.
    #[serde(default)]
    pub short_code: Option<String>,
    #[serde(default)]
    pub room_id: Option<String>,
}

/// Body of the legacy v2 lobby creations; `visibility` only on the generic one.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateLobbyParams {
    #[serde(default)]
    pub visibility: Option<LobbyVisibility>,
    pub region: Region,
    #[serde(default)]
    pub initial_config: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SetLobbyStateParams {
    #[serde(default)]
    pub state: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LobbyV3 {
    pub room_id: String,
    pub app_id: String,
    pub region: Region,
    pub visibility: LobbyVisibility,
    pub short_code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_config: Option<String>,
    pub created_at: String,
    pub created_by: String,
}

impl From<&Lobby> for LobbyV3 {
    fn from(l: &Lobby) -> Self {
        Self {
            room_id: l.room_id.clone(),
            app_id: l.app_id.clone(),
            region: l.region,
            visibility: l.visibility,
            short_code: l.short_code.clone().unwrap_or_else(|| l.room_id.clone()),
            room_config: l.room_config.clone(),
            created_at: rfc3339(l.created_at),
            created_by: l.created_by.clone(),
        }
    }
}

/// The v1/v2 `Lobby`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LobbyLegacy {
    pub room_id: String,
    pub app_id: String,
    pub region: Region,
    pub visibility: LobbyVisibility,
    pub local: bool,
    pub created_at: String,
    pub created_by: String,
    pub short_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_config: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<Value>,
}

impl From<&Lobby> for LobbyLegacy {
    fn from(l: &Lobby) -> Self {
        Self {
            room_id: l.room_id.clone(),
            app_id: l.app_id.clone(),
            region: l.region,
            visibility: l.visibility,
            local: l.visibility == LobbyVisibility::Local,
            created_at: rfc3339(l.created_at),
            created_by: l.created_by.clone(),
            short_code: l.short_code.clone(),
            initial_config: l.initial_config.clone(),
            state: l.state.clone(),
        }
    }
}
