//! Persistence behind one trait. Every state change that matters to correctness (placing a room,
//! ending a process) is a single atomic method here, written as a conditional update so that
//! several control-plane replicas sharing one database (PostgreSQL) stay correct without any
//! state held in memory.

use async_trait::async_trait;
use lodge_model::*;

mod codec;
mod coord;
mod copy;
mod postgres;
mod sqlite;
pub use coord::{Coordination, MAX_HINT};
pub use copy::{sqlite_into_postgres, CopyReport};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Why a live process ended, as `summaryExitReason` shows it: a stop Lodge asked for
/// (StopProcess, the idle reaper) names why, then how it went.
pub(crate) fn exit_summary(before: &Process, reason: &str) -> String {
    match (&before.status, &before.summary_exit_reason) {
        (ProcessStatus::Stopping, Some(why)) if !reason.starts_with(why.as_str()) => {
            format!("{why} ({reason})")
        }
        _ => reason.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional update lost a race (for example the process filled up); retry.
    #[error("{0}")]
    Conflict(String),
    /// A uniqueness rule (id or name already taken); the message says which.
    #[error("{0}")]
    Duplicate(String),
    /// A limit the caller asked the store to hold would be passed; the message says which.
    #[error("{0}")]
    Limit(String),
    #[error("storage error: {0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Filter for process listings. Empty vectors mean "any".
#[derive(Debug, Clone, Default)]
pub struct ProcessQuery {
    pub app_id: Option<String>,
    pub node_id: Option<String>,
    pub deployment_id: Option<String>,
    pub statuses: Vec<ProcessStatus>,
    pub regions: Vec<Region>,
    /// Only processes created strictly before this time.
    pub created_before: Option<Millis>,
    /// Only processes with a free room slot, best placement first (running before starting,
    /// fullest first, then oldest) instead of newest first.
    pub with_free_slot: bool,
    pub limit: Option<u32>,
}

/// Where a room goes.
#[derive(Debug, Clone)]
pub enum PlaceTarget {
    /// An existing process; fails with `Conflict` if it is full or no longer placeable.
    Existing(String),
    /// A new process, inserted with this room as its first, unless its app already has the
    /// given number of live processes (`Limit`; checked in the same transaction, so racing
    /// placements cannot pass it).
    New(Box<Process>, Option<u64>),
}

/// A process that ended, and the rooms that ended with it.
#[derive(Debug, Clone)]
pub struct EndedProcess {
    pub process: Process,
    pub destroyed_rooms: Vec<String>,
}

/// What the live processes of one node hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeUsage {
    pub node_id: String,
    pub live_processes: u32,
    pub ports: u32,
    pub cpu: f64,
    pub memory_mb: f64,
}

#[async_trait]
pub trait Store: Coordination + Send + Sync + 'static {
    async fn put_org(&self, org: &Org) -> Result<()>;
    async fn orgs(&self) -> Result<Vec<Org>>;

    /// Fails with `Conflict` when an active token of the org has the same name.
    async fn insert_token(&self, token: &OrgToken, secret_hash: &str) -> Result<()>;
    async fn token_by_hash(&self, secret_hash: &str) -> Result<Option<OrgToken>>;
    async fn tokens(&self, org_id: &str) -> Result<Vec<OrgToken>>;
    async fn revoke_token(&self, org_id: &str, token_id: &str) -> Result<Option<OrgToken>>;

    /// Fails with `Conflict` when a live app of the org has the same name.
    async fn insert_app(&self, app: &App) -> Result<()>;
    async fn update_app(&self, app: &App) -> Result<()>;
    async fn app(&self, app_id: &str) -> Result<Option<App>>;
    async fn apps(&self, org_id: &str) -> Result<Vec<App>>;

    /// Fails with `Conflict` when the id is taken.
    async fn insert_build(&self, build: &Build) -> Result<()>;
    async fn update_build(&self, build: &Build) -> Result<()>;
    /// Write `build` only if the stored one still has status `expected`; false if not.
    async fn update_build_if(&self, build: &Build, expected: BuildStatus) -> Result<bool>;
    async fn build(&self, build_id: &str) -> Result<Option<Build>>;
    async fn builds(&self, org_id: &str) -> Result<Vec<Build>>;

    async fn insert_deployment(&self, deployment: &Deployment) -> Result<()>;
    /// The app's newest deployment.
    async fn latest_deployment(&self, app_id: &str) -> Result<Option<Deployment>>;
    async fn deployment(&self, deployment_id: &str) -> Result<Option<Deployment>>;
    /// Newest first.
    async fn deployments(&self, app_id: &str) -> Result<Vec<Deployment>>;

    async fn put_node(&self, node: &Node) -> Result<()>;
    async fn node(&self, node_id: &str) -> Result<Option<Node>>;
    /// Read-modify-write of one node, atomically (`change` returns false to leave it be).
    /// Returns the node as stored afterwards; `None` if unknown.
    async fn update_node(
        &self,
        node_id: &str,
        change: &(dyn for<'n> Fn(&'n mut Node) -> bool + Send + Sync),
    ) -> Result<Option<Node>>;
    /// Insert or replace a fleet; `Duplicate` if another fleet of its org has its name.
    async fn put_fleet(&self, fleet: &Fleet) -> Result<()>;
    async fn fleets(&self, org_id: &str) -> Result<Vec<Fleet>>;
    /// Store a join token under the hash of its secret.
    async fn insert_join_token(&self, token: &JoinToken, secret_hash: &str) -> Result<()>;
    async fn join_token_by_hash(&self, secret_hash: &str) -> Result<Option<JoinToken>>;
    async fn nodes(&self) -> Result<Vec<Node>>;
    /// Per node: live processes, the public ports they hold, and the CPU and memory their
    /// deployments requested.
    async fn node_usage(&self) -> Result<Vec<NodeUsage>>;

    async fn process(&self, process_id: &str) -> Result<Option<Process>>;
    /// Newest first.
    async fn processes(&self, query: &ProcessQuery) -> Result<Vec<Process>>;
    async fn count_processes(&self, query: &ProcessQuery) -> Result<u64>;
    /// Insert a process, unless its app already has `max_live_for_app` live processes
    /// (`Limit`), atomically.
    async fn insert_process(&self, process: &Process, max_live_for_app: Option<u64>) -> Result<()>;
    /// Read-modify-write of one live (non-terminal) process in one transaction. `change`
    /// returns false to leave it untouched. Terminal processes are never modified here; use
    /// [`Store::end_process`]. Returns the process as stored afterwards.
    async fn update_process(
        &self,
        process_id: &str,
        change: &(dyn for<'p> Fn(&'p mut Process) -> bool + Send + Sync),
    ) -> Result<Option<Process>>;
    /// Mark a live process stopped or failed and destroy its rooms, atomically. `None` if it
    /// was unknown or already ended.
    async fn end_process(
        &self,
        process_id: &str,
        status: ProcessStatus,
        at: Millis,
        reason: &str,
    ) -> Result<Option<EndedProcess>>;

    async fn room(&self, room_id: &str) -> Result<Option<Room>>;
    /// Rooms currently on the process (`active`) or formerly on it.
    async fn rooms_of_process(&self, process_id: &str, active: bool) -> Result<Vec<Room>>;
    /// Allocate `room` (whose last allocation names the target process) atomically: take a
    /// slot on an existing process or insert the new one. A room that already exists is
    /// re-allocated only if it has no current allocation (resume); otherwise `Conflict`.
    async fn place_room(&self, room: &Room, target: PlaceTarget) -> Result<()>;
    /// End the room's current allocation, freeing the slot, and set its status (`destroyed` or
    /// `suspended`). `None` if the room is unknown or already in that state.
    async fn unallocate_room(
        &self,
        room_id: &str,
        status: RoomStatus,
        at: Millis,
    ) -> Result<Option<Room>>;
    async fn update_room_config(&self, room_id: &str, config: &str) -> Result<bool>;

    /// Insert a lobby unless its creator already made `max` lobbies of the app after `since`;
    /// then returns the time of the oldest of those (when the next one is allowed, one window
    /// later). Atomic, so racing creations cannot exceed the limit. `Duplicate` if the room id
    /// is taken by a room or another lobby.
    async fn reserve_lobby(&self, lobby: &Lobby, since: Millis, max: u32)
        -> Result<Option<Millis>>;
    /// Undo a reservation whose room could not be created.
    async fn delete_lobby(&self, room_id: &str) -> Result<()>;
    /// A lobby (with its room's config filled in) and its room's status; lobbies whose room
    /// was never created are absent.
    async fn lobby(&self, room_id: &str) -> Result<Option<(Lobby, RoomStatus)>>;
    /// The newest lobby of the app with this short code whose room is not destroyed.
    async fn lobby_by_short_code(
        &self,
        app_id: &str,
        code: &str,
    ) -> Result<Option<(Lobby, RoomStatus)>>;
    /// Lobbies of the app with this visibility whose room is not destroyed, newest first.
    async fn lobbies(
        &self,
        app_id: &str,
        visibility: LobbyVisibility,
        region: Option<Region>,
    ) -> Result<Vec<Lobby>>;
    /// Replace a lobby's (legacy v2) state.
    async fn set_lobby_state(
        &self,
        room_id: &str,
        state: &serde_json::Value,
    ) -> Result<Option<Lobby>>;

    /// The integer a legacy (v1/v2) API shows for `id` of `kind` within `scope` (an app),
    /// assigned on first use: 1, 2, 3, ... per scope and kind.
    async fn legacy_number(&self, scope: &str, kind: &str, id: &str) -> Result<i64>;
    /// The id behind a legacy integer, if one was assigned.
    async fn legacy_id(&self, scope: &str, kind: &str, num: i64) -> Result<Option<String>>;
    /// Every (number, id) of `kind` in `scope`, highest number first.
    async fn legacy_entries(&self, scope: &str, kind: &str) -> Result<Vec<(i64, String)>>;
}
