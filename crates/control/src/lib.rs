//! The control plane: every use-case the API exposes, the allocator that places rooms, the
//! handling of node reports, and the reconcile loop (idle reaper). It holds no state of its own
//! beyond configuration and handles to nodes: the store is the truth, so several replicas can
//! share one database.

mod apps;
mod artifacts;
mod builds;
mod deployments;
pub mod egress;
pub mod fleet;
pub mod fleets;
mod images;
pub mod jwt;
mod legacy;
mod nodes;
pub mod peer;
mod players;
mod ratelimit;
pub mod registry;
pub mod remote;
pub mod replica;
mod rooms;
mod session;
mod shared;
mod tokens;
mod warm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lodge_model::node::NodeLink;
use lodge_model::{App, Clock, Org};
use lodge_store::{Store, StoreError};

pub use artifacts::Artifact;
pub use builds::{BuildLog, UploadTarget};
pub use deployments::DeploymentFilter;
pub use fleet::NodeView;
pub use legacy::{ApplicationV1, CreatedLegacyBuild, LegacyUpload};
pub use lodge_model::node::MetricSeries;
pub use players::NewLobby;
pub use rooms::{MetricsQuery, ProcessFilter};
pub use tokens::Caller;

/// A use-case failure, mapped by the API to a status and `{"message"}`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    /// Bad state or a request that cannot be honoured as asked (400).
    #[error("{0}")]
    BadRequest(String),
    /// Invalid input (422).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Gone(String),
    /// Out of capacity (402, Hathora's status for quota on room and process creation).
    #[error("{0}")]
    NoCapacity(String),
    /// Too many requests; retry after this many seconds (429 with `Retry-After`).
    #[error("{0}")]
    RateLimited(String, u64),
    /// What is needed cannot be reached now, such as the node that keeps a log (503).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<lodge_model::node::LinkError> for Error {
    fn from(e: lodge_model::node::LinkError) -> Self {
        use lodge_model::node::LinkError;
        match e {
            LinkError::Unreachable(m) => Error::Unavailable(m),
            LinkError::NotFound(m) => Error::NotFound(m),
            LinkError::Refused(m) => Error::BadRequest(m),
            LinkError::Io(m) => Error::Internal(m),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Duplicate(m) => Error::Invalid(m),
            StoreError::Conflict(m) => Error::BadRequest(m),
            StoreError::Limit(m) => Error::NoCapacity(m),
            StoreError::Backend(m) => Error::Internal(m),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub data_dir: PathBuf,
    /// Accepted as an admin token of the default org, if set.
    pub admin_token: Option<String>,
    pub idle_timeout: Duration,
    pub reap_interval: Duration,
    pub max_chunk_size: u64,
    pub max_build_bytes: u64,
    /// Lobbies one player may create per app within `lobby_rate_window`.
    pub lobby_rate_limit: u32,
    pub lobby_rate_window: Duration,
    /// Google's signing keys for LoginGoogle: a URL or a JWKS file.
    pub google_jwks: String,
    /// The daemonless image builder run for Dockerfile builds (buildah's command line).
    pub image_builder: String,
    /// How long the logs and metrics of ended processes are kept.
    pub retention: Duration,
    /// Private destinations registry pulls may reach (`--registry-allow`).
    pub egress: egress::EgressPolicy,
    /// The longest one registry pull may take, however the registry behaves.
    pub pull_deadline: Duration,
    /// Lobbies one source address may create per app within `lobby_rate_window`.
    pub lobby_rate_limit_source: u32,
    /// Lobbies all players together may create per app within `lobby_rate_window`.
    pub lobby_rate_limit_app: u32,
    /// Live processes one app may have (402 beyond), so that no app, and no player of one,
    /// can take every public port of the fleet.
    pub max_processes_per_app: u64,
    /// Builds (not deleted) one org may have.
    pub max_builds_per_org: u64,
    /// Bytes all builds of one org may take.
    pub max_org_build_bytes: u64,
    /// A joined node silent this long is lost: its processes end (`--node-lost-after`).
    pub node_lost_after: Duration,
    /// How long warm capacity beyond the target stays (`--scale-down-delay`).
    pub scale_down_delay: Duration,
}

impl ControlConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            admin_token: None,
            idle_timeout: Duration::from_secs(300),
            reap_interval: Duration::from_secs(5),
            max_chunk_size: 32 << 20,
            max_build_bytes: 4 << 30,
            lobby_rate_limit: 10,
            lobby_rate_window: Duration::from_secs(3600),
            google_jwks: jwt::GOOGLE_JWKS.into(),
            image_builder: "buildah".into(),
            retention: Duration::from_secs(72 * 3600),
            egress: egress::EgressPolicy::default(),
            pull_deadline: Duration::from_secs(30 * 60),
            lobby_rate_limit_source: 30,
            lobby_rate_limit_app: 1000,
            max_processes_per_app: 500,
            max_builds_per_org: 1000,
            max_org_build_bytes: 50 << 30,
            node_lost_after: Duration::from_secs(300),
            scale_down_delay: Duration::from_secs(120),
        }
    }
}

pub struct Control {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    cfg: ControlConfig,
    /// Nodes reached through a direct handle (tests' in-process nodes).
    local_agents: RwLock<Vec<Arc<dyn NodeLink>>>,
    /// Nodes that speak the node protocol (joined agents, and the embedded node), by id.
    remotes: RwLock<HashMap<String, Arc<remote::RemoteNode>>>,
    /// The nodes, as last read for placement.
    nodes_cache: std::sync::Mutex<Option<(lodge_model::Millis, Arc<Vec<lodge_model::Node>>)>>,
    /// One packing at a time per build.
    artifact_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When this control plane started (node-loss judgement counts from no earlier).
    started_at: i64,
    metrics: Metrics,
    jwks: jwt::JwksSource,
    /// The default org, once known (it never changes).
    default_org: std::sync::OnceLock<Org>,
    /// Lobby creations per (app, source address) and per app.
    lobby_windows: ratelimit::Windows,
    /// This control plane as one replica of several on a shared store.
    replica: replica::ReplicaState,
    /// The warm controller's autoscaled targets, and its wake-up.
    warm: warm::WarmState,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub rooms_created: std::sync::atomic::AtomicU64,
    pub rooms_destroyed: std::sync::atomic::AtomicU64,
    pub processes_started: std::sync::atomic::AtomicU64,
    pub processes_ended: std::sync::atomic::AtomicU64,
    pub placement_retries: std::sync::atomic::AtomicU64,
    /// Build artifacts served to nodes, and their bytes.
    pub artifact_downloads: std::sync::atomic::AtomicU64,
    pub artifact_bytes: std::sync::atomic::AtomicU64,
}

impl Control {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, cfg: ControlConfig) -> Arc<Self> {
        Arc::new(Self {
            started_at: clock.now_ms(),
            store,
            clock,
            jwks: jwt::JwksSource::new(cfg.google_jwks.clone()),
            default_org: std::sync::OnceLock::new(),
            cfg,
            local_agents: RwLock::default(),
            remotes: RwLock::default(),
            artifact_locks: Default::default(),
            nodes_cache: Default::default(),
            metrics: Metrics::default(),
            lobby_windows: ratelimit::Windows::default(),
            replica: replica::ReplicaState::new(),
            warm: warm::WarmState::default(),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn config(&self) -> &ControlConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Create the default org on first start and return it.
    pub async fn bootstrap(&self) -> Result<Org> {
        if let Some(org) = self.default_org.get() {
            return Ok(org.clone());
        }
        if let Some(org) = self.store.orgs().await?.into_iter().next() {
            return Ok(self.default_org.get_or_init(|| org).clone());
        }
        // Replicas starting together on an empty database agree on one default org: the first
        // to record its id wins, and every one of them inserts that org (once).
        let candidate = lodge_model::id::org_id();
        let org_id = self
            .store
            .setting_or_insert("default-org", &candidate)
            .await?;
        let org = Org {
            org_id,
            name: "default".into(),
            created_at: self.now(),
        };
        self.store.put_org(&org).await?;
        Ok(self.store.orgs().await?.into_iter().next().unwrap_or(org))
    }

    /// The app, if it exists, is not deleted and belongs to the caller's org.
    async fn app_of(&self, caller: &Caller, app_id: &str) -> Result<App> {
        match self.store.app(app_id).await? {
            Some(app) if app.org_id == caller.org_id && app.deleted_at.is_none() => Ok(app),
            _ => Err(Error::NotFound(format!("App not found: {app_id}"))),
        }
    }

    /// The org a request is about: `orgId` if given (must be the caller's), else the caller's.
    fn org_of(&self, caller: &Caller, org_id: Option<&str>) -> Result<String> {
        match org_id {
            Some(o) if o != caller.org_id => {
                Err(Error::NotFound(format!("Organization not found: {o}")))
            }
            _ => Ok(caller.org_id.clone()),
        }
    }

    /// The nodes this control plane reaches.
    pub fn agents(&self) -> Vec<Arc<dyn NodeLink>> {
        let mut all = self
            .local_agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        all.extend(
            self.remotes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|r| r.clone() as Arc<dyn NodeLink>),
        );
        all
    }
}
