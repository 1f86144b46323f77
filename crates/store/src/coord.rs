//! What control-plane replicas sharing one store coordinate through it: who is alive and where
//! (replicas), who runs each singleton (leases), wake-up hints between replicas, a secret they
//! share, and files every replica must be able to read (blobs: build uploads and artifacts).
//! The embedded store has one replica by construction; it implements the same semantics so that
//! one contract suite covers both, and says so through [`Coordination::shared`].

use async_trait::async_trait;
use lodge_model::{Millis, Replica};

use crate::Result;

/// Hints are short (PostgreSQL's NOTIFY takes < 8000 bytes); longer ones are cut by the sender.
pub const MAX_HINT: usize = 7000;

#[async_trait]
pub trait Coordination: Send + Sync {
    /// Whether other replicas may share this store (and so the files and sessions of this one
    /// are not everything).
    fn shared(&self) -> bool;

    /// Insert or refresh a replica's record.
    async fn put_replica(&self, replica: &Replica) -> Result<()>;
    /// Every replica on record, alive or not (judge by `seen_at`).
    async fn replicas(&self) -> Result<Vec<Replica>>;
    async fn delete_replica(&self, replica_id: &str) -> Result<()>;

    /// Take the lease `name` for `holder` until `now + ttl_ms`, or extend it if `holder` holds
    /// it already. True if `holder` holds it afterwards; false while another holder's lease has
    /// not expired. Atomic: two replicas racing for a free lease never both get it.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Millis,
        ttl_ms: i64,
    ) -> Result<bool>;
    /// Who holds the lease `name` at `now`, if anyone.
    async fn lease_holder(&self, name: &str, now: Millis) -> Result<Option<String>>;
    /// Give the lease up, if `holder` holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;

    /// Send a hint to every replica listening (after this call returns; it may be lost, so
    /// receivers must also poll). The embedded store has no one to tell.
    async fn send_hint(&self, hint: &str) -> Result<()>;
    /// The hints other replicas send, from now on (`None` if this store has no others).
    fn hints(&self) -> Option<tokio::sync::mpsc::Receiver<String>>;

    /// The value stored under `key`, storing `value` first if there is none (the first of
    /// racing writers wins, and every caller gets the winner's value).
    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String>;

    /// Count one event for `key` in fixed windows of `window_ms` (a window starts with the
    /// first event after the previous one ended): `None` if it was counted, `Some(start of the
    /// current window)` if `max` were counted in it already. Atomic, so replicas counting
    /// together never let more than `max` through.
    async fn hit_window(
        &self,
        key: &str,
        now: Millis,
        window_ms: i64,
        max: u32,
    ) -> Result<Option<Millis>>;
    /// Forget the windows that started before `before`; returns how many.
    async fn prune_windows(&self, before: Millis) -> Result<u64>;

    /// Store part `part` of the blob `key` (replacing it if present).
    async fn put_blob_part(&self, key: &str, part: u32, data: &[u8]) -> Result<()>;
    async fn blob_part(&self, key: &str, part: u32) -> Result<Option<Vec<u8>>>;
    /// The parts of `key` and their sizes, in part order.
    async fn blob_parts(&self, key: &str) -> Result<Vec<(u32, u64)>>;
    /// Delete `key` and every blob under `key/`; returns how many parts went.
    async fn delete_blobs(&self, key: &str) -> Result<u64>;
}
