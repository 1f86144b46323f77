//! Coordination on the embedded store. Only one `lodge serve` can hold a data dir, so there is
//! one replica and nobody to send hints to; leases, settings and blobs keep the semantics of
//! the shared store so that one contract suite covers both.

use async_trait::async_trait;
use lodge_model::{Millis, Replica};
use rusqlite::{params, OptionalExtension};

use super::{backend, docs, Run, SqliteStore};
use crate::codec::to_json;
use crate::{Coordination, Result};

#[async_trait]
impl Coordination for SqliteStore {
    fn shared(&self) -> bool {
        false
    }

    async fn put_replica(&self, r: &Replica) -> Result<()> {
        let r = r.clone();
        self.write(move |c| {
            c.run(
                "INSERT INTO replicas (replica_id, doc) VALUES (?1, ?2)
                 ON CONFLICT (replica_id) DO UPDATE SET doc = excluded.doc",
                params![r.replica_id, to_json(&r)?],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn replicas(&self) -> Result<Vec<Replica>> {
        self.read(|c| docs(c, "SELECT doc FROM replicas ORDER BY replica_id", []))
    }

    async fn delete_replica(&self, replica_id: &str) -> Result<()> {
        let id = replica_id.to_string();
        self.write(move |c| {
            c.run("DELETE FROM replicas WHERE replica_id = ?1", params![id])
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Millis,
        ttl_ms: i64,
    ) -> Result<bool> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.write(move |c| {
            let n = c
                .run(
                    "INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                     WHERE leases.holder = excluded.holder OR leases.expires_at < ?4",
                    params![name, holder, now.saturating_add(ttl_ms), now],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn lease_holder(&self, name: &str, now: Millis) -> Result<Option<String>> {
        self.read(|c| {
            c.one(
                "SELECT holder FROM leases WHERE name = ?1 AND expires_at >= ?2",
                params![name, now],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.write(move |c| {
            c.run(
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                params![name, holder],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn send_hint(&self, _hint: &str) -> Result<()> {
        Ok(())
    }

    fn hints(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        None
    }

    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String> {
        let (key, value) = (key.to_string(), value.to_string());
        self.write(move |c| {
            c.run(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![key, value],
            )
            .map_err(backend)?;
            c.one(
                "SELECT value FROM settings WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .map_err(backend)
        })
        .await
    }

    async fn hit_window(
        &self,
        key: &str,
        now: Millis,
        window_ms: i64,
        max: u32,
    ) -> Result<Option<Millis>> {
        let key = key.to_string();
        self.write(move |c| {
            let counted = c
                .run(
                    "INSERT INTO rate_windows (key, window_start, count) VALUES (?1, ?2, 1)
                 ON CONFLICT (key) DO UPDATE SET
                   count = CASE WHEN rate_windows.window_start <= ?2 - ?3 THEN 1 ELSE rate_windows.count + 1 END,
                   window_start = CASE WHEN rate_windows.window_start <= ?2 - ?3 THEN ?2 ELSE rate_windows.window_start END
                 WHERE rate_windows.window_start <= ?2 - ?3 OR rate_windows.count < ?4",
                    params![key, now, window_ms, max],
                )
                .map_err(backend)?;
            if counted == 1 {
                return Ok(None);
            }
            let start: Option<Millis> = c
                .one(
                    "SELECT window_start FROM rate_windows WHERE key = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            Ok(start.or(Some(now)))
        })
        .await
    }

    async fn prune_windows(&self, before: Millis) -> Result<u64> {
        self.write(move |c| {
            let n = c
                .run(
                    "DELETE FROM rate_windows WHERE window_start < ?1",
                    params![before],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    async fn put_blob_part(&self, key: &str, part: u32, data: &[u8]) -> Result<()> {
        let (key, data) = (key.to_string(), data.to_vec());
        self.write(move |c| {
            c.run(
                "INSERT INTO blobs (key, part, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key, part) DO UPDATE SET data = excluded.data",
                params![key, part, data],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn blob_part(&self, key: &str, part: u32) -> Result<Option<Vec<u8>>> {
        self.read(|c| {
            c.one(
                "SELECT data FROM blobs WHERE key = ?1 AND part = ?2",
                params![key, part],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
    }

    async fn blob_parts(&self, key: &str) -> Result<Vec<(u32, u64)>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached("SELECT part, length(data) FROM blobs WHERE key = ?1 ORDER BY part")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![key], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
    }

    async fn delete_blobs(&self, key: &str) -> Result<u64> {
        let key = key.to_string();
        self.write(move |c| {
            let n = c
                .run(
                    "DELETE FROM blobs WHERE key = ?1 OR (key >= ?2 AND key < ?3)",
                    params![key, format!("{key}/"), format!("{key}0")],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }
}
