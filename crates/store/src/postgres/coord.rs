//! Coordination between replicas on PostgreSQL. Leases are one row each, taken or extended by
//! one conditional upsert (River's election, without a term: a holder id is new at every start
//! of a replica, so an old holder can never extend a lease taken since). Hints are NOTIFY
//! messages sent outside any transaction and heard on a connection of their own, which
//! reconnects by itself; anything sent while it was away is lost, so receivers also poll.

use std::time::Duration;

use async_trait::async_trait;
use lodge_model::{Millis, Replica};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use super::{pg, PostgresStore};
use crate::codec::to_json;
use crate::{Coordination, Result, MAX_HINT};

/// The NOTIFY channel of a schema's Lodge: `lodge_hints` on `public`, else with the schema's
/// name (a hash of it when the name would pass PostgreSQL's 63-byte identifier limit).
pub(crate) fn channel_of(schema: &str) -> String {
    if schema == "public" {
        return "lodge_hints".into();
    }
    let clean: String = schema
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("lodge_hints_{clean}");
    if name.len() <= 63 && clean == schema {
        return name;
    }
    // FNV-1a: the same on every replica whatever its build (std's hasher is not stable).
    let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("lodge_hints_{hash:016x}")
}
/// How often the listener checks that its connection still answers.
const LISTENER_CHECK: Duration = Duration::from_secs(5);

#[async_trait]
impl Coordination for PostgresStore {
    fn shared(&self) -> bool {
        true
    }

    async fn put_replica(&self, r: &Replica) -> Result<()> {
        self.exec(
            "INSERT INTO replicas (replica_id, doc) VALUES ($1, $2)
             ON CONFLICT (replica_id) DO UPDATE SET doc = excluded.doc",
            &[&r.replica_id, &to_json(r)?],
        )
        .await?;
        Ok(())
    }

    async fn replicas(&self) -> Result<Vec<Replica>> {
        self.docs("SELECT doc FROM replicas ORDER BY replica_id", &[])
            .await
    }

    async fn delete_replica(&self, replica_id: &str) -> Result<()> {
        self.exec("DELETE FROM replicas WHERE replica_id = $1", &[&replica_id])
            .await?;
        Ok(())
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Millis,
        ttl_ms: i64,
    ) -> Result<bool> {
        // ON CONFLICT DO UPDATE locks the existing row and evaluates WHERE on its newest
        // version, so of two replicas racing for an expired lease only one gets it.
        let n = self
            .exec(
                "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                 WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
                &[&name, &holder, &now.saturating_add(ttl_ms), &now],
            )
            .await?;
        Ok(n == 1)
    }

    async fn lease_holder(&self, name: &str, now: Millis) -> Result<Option<String>> {
        Ok(self
            .rows(
                "SELECT holder FROM leases WHERE name = $1 AND expires_at >= $2",
                &[&name, &now],
            )
            .await?
            .first()
            .map(|r| r.get::<_, String>(0)))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        self.exec(
            "DELETE FROM leases WHERE name = $1 AND holder = $2",
            &[&name, &holder],
        )
        .await?;
        Ok(())
    }

    async fn send_hint(&self, hint: &str) -> Result<()> {
        let mut end = hint.len().min(MAX_HINT);
        while !hint.is_char_boundary(end) {
            end -= 1;
        }
        self.exec(
            "SELECT pg_notify($1, $2)",
            &[&self.channel.as_str(), &&hint[..end]],
        )
        .await?;
        Ok(())
    }

    fn hints(&self) -> Option<mpsc::Receiver<String>> {
        let (tx, rx) = mpsc::channel(4096);
        let cfg = self.cfg.clone();
        let channel = self.channel.clone();
        tokio::spawn(async move {
            while !tx.is_closed() {
                if let Err(e) = listen(&cfg, &channel, &tx).await {
                    tracing::warn!(error = %e, "the hints' listener lost PostgreSQL; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Some(rx)
    }

    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String> {
        self.exec(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&key, &value],
        )
        .await?;
        // A statement of its own: its snapshot sees a racing writer's committed row.
        let rows = self
            .rows("SELECT value FROM settings WHERE key = $1", &[&key])
            .await?;
        rows.first()
            .map(|r| r.get::<_, String>(0))
            .ok_or_else(|| crate::StoreError::Backend(format!("setting {key} vanished")))
    }

    async fn hit_window(
        &self,
        key: &str,
        now: Millis,
        window_ms: i64,
        max: u32,
    ) -> Result<Option<Millis>> {
        // One conditional upsert: the row lock orders racing replicas, and the WHERE sees the
        // count as the previous one left it.
        let counted = self
            .exec(
                "INSERT INTO rate_windows (key, window_start, count) VALUES ($1, $2, 1)
                 ON CONFLICT (key) DO UPDATE SET
                   count = CASE WHEN rate_windows.window_start <= $2 - $3 THEN 1 ELSE rate_windows.count + 1 END,
                   window_start = CASE WHEN rate_windows.window_start <= $2 - $3 THEN $2 ELSE rate_windows.window_start END
                 WHERE rate_windows.window_start <= $2 - $3 OR rate_windows.count < $4",
                &[&key, &now, &window_ms, &super::int(max)],
            )
            .await?;
        if counted == 1 {
            return Ok(None);
        }
        Ok(self
            .rows(
                "SELECT window_start FROM rate_windows WHERE key = $1",
                &[&key],
            )
            .await?
            .first()
            .map(|r| r.get::<_, i64>(0))
            .or(Some(now)))
    }

    async fn prune_windows(&self, before: Millis) -> Result<u64> {
        self.exec(
            "DELETE FROM rate_windows WHERE window_start < $1",
            &[&before],
        )
        .await
    }

    async fn put_blob_part(&self, key: &str, part: u32, data: &[u8]) -> Result<()> {
        self.exec(
            "INSERT INTO blobs (key, part, data) VALUES ($1, $2, $3)
             ON CONFLICT (key, part) DO UPDATE SET data = excluded.data",
            &[&key, &super::int(part), &data],
        )
        .await?;
        Ok(())
    }

    async fn blob_part(&self, key: &str, part: u32) -> Result<Option<Vec<u8>>> {
        Ok(self
            .rows(
                "SELECT data FROM blobs WHERE key = $1 AND part = $2",
                &[&key, &super::int(part)],
            )
            .await?
            .first()
            .map(|r| r.get::<_, Vec<u8>>(0)))
    }

    async fn blob_parts(&self, key: &str) -> Result<Vec<(u32, u64)>> {
        Ok(self
            .rows(
                "SELECT part, octet_length(data)::bigint FROM blobs WHERE key = $1 ORDER BY part",
                &[&key],
            )
            .await?
            .iter()
            .map(|r| {
                (
                    super::uint(r.get::<_, i32>(0)),
                    u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                )
            })
            .collect())
    }

    async fn delete_blobs(&self, key: &str) -> Result<u64> {
        self.exec(
            "DELETE FROM blobs WHERE key = $1 OR starts_with(key, $2)",
            &[&key, &format!("{key}/")],
        )
        .await
    }
}

/// Hear hints on a connection of our own until it fails or nobody listens.
async fn listen(
    cfg: &tokio_postgres::Config,
    channel: &str,
    tx: &mpsc::Sender<String>,
) -> Result<()> {
    let (client, mut conn) = cfg.connect(NoTls).await.map_err(pg)?;
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(msg) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    if heard_tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .map_err(pg)?;
        // Whatever was sent while this listener was away is lost: an empty hint tells the
        // receiver to look at everything.
        let _ = tx.send(String::new()).await;
        let mut check = tokio::time::interval(LISTENER_CHECK);
        loop {
            tokio::select! {
                // Nobody listens any more (the control plane is gone): close the connection.
                () = tx.closed() => return Ok(()),
                hint = heard.recv() => match hint {
                    Some(h) => {
                        if tx.send(h).await.is_err() {
                            return Ok(());
                        }
                    }
                    None => {
                        return Err(crate::StoreError::Backend("the listener's connection closed".into()))
                    }
                },
                _ = check.tick() => {
                    match tokio::time::timeout(LISTENER_CHECK, client.batch_execute("SELECT 1")).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(pg(e)),
                        Err(_) => {
                            return Err(crate::StoreError::Backend("the listener's connection stopped answering".into()))
                        }
                    }
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}
