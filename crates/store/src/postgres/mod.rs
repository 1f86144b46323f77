//! The PostgreSQL store, for several control-plane replicas on one database. Every invariant
//! sits on one row and is enforced by that row's lock under PostgreSQL's default isolation
//! (READ COMMITTED): a slot is taken by `UPDATE … WHERE rooms_allocated < rooms_per_process`,
//! which PostgreSQL re-checks after waiting for a concurrent writer. Checks over many rows (an
//! app's live processes, a player's lobbies in a window, the next legacy number) take a
//! transaction-level advisory lock on what they count first. Constraints (`CHECK`, unique
//! indexes) are the last line of defence.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use lodge_model::*;
use tokio_postgres::types::ToSql;
use tokio_postgres::{error::SqlState, NoTls, Row};

use crate::codec::{from_json, to_json, RoomDoc};
use crate::{EndedProcess, NodeUsage, PlaceTarget, ProcessQuery, Result, Store, StoreError};

mod batch;
mod coord;
mod schema;

/// Connections per replica.
const POOL_SIZE: usize = 16;
/// Connecting, waiting for a pooled connection, and any one statement are bounded.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const STATEMENT_TIMEOUT_MS: u32 = 10_000;

pub struct PostgresStore {
    pool: Pool,
    /// For connections of their own (the hints' listener).
    cfg: tokio_postgres::Config,
    /// Placements into existing processes and freed rooms, committed in batches.
    batch: batch::Batcher,
    /// The NOTIFY channel of this store's schema (channels are per database, and several
    /// Lodges may share one database, a schema each).
    channel: String,
}

pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        // Lost a race PostgreSQL detected (a deadlock, a serialization failure): retry.
        Some(c)
            if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            StoreError::Conflict(format!("the database asks to retry: {}", pg_message(&e)))
        }
        _ => StoreError::Backend(format!("postgres: {}", pg_message(&e))),
    }
}

/// The server's own message, or the client's with its cause (a refused connection, a timeout).
fn pg_message(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match (e.as_db_error(), e.source()) {
        (Some(db), _) => db.message().to_string(),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn unique(e: tokio_postgres::Error, msg: impl FnOnce() -> String) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Duplicate(msg())
    } else {
        pg(e)
    }
}

pub(crate) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => StoreError::Backend(format!("postgres pool: {other}")),
    }
}

/// A u32 in an INTEGER column.
fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn uint(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// Hash of the text `key` as an advisory lock id, held until the transaction ends.
const XACT_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

impl PostgresStore {
    /// Connect (bounded by a timeout; a bad URL or an unreachable database is an error here,
    /// not a hang later) and apply pending migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let mut cfg: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Backend(format!(
                "--store {}: not a PostgreSQL URL: {e}",
                redact(url)
            ))
        })?;
        cfg.connect_timeout(CONNECT_TIMEOUT);
        let options = format!(
            "{} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
            cfg.get_options().unwrap_or("")
        );
        cfg.options(options.trim());
        if cfg.get_application_name().is_none() {
            cfg.application_name("lodge");
        }
        let mgr = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(format!("postgres pool: {e}")))?;
        let store = Self {
            cfg,
            batch: batch::Batcher::start(pool.clone()),
            pool,
            channel: String::new(),
        };
        let mut client = store.pool.get().await.map_err(|e| {
            let why = match e {
                deadpool_postgres::PoolError::Backend(e) => pg_message(&e),
                deadpool_postgres::PoolError::Timeout(_) => {
                    format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())
                }
                other => other.to_string(),
            };
            StoreError::Backend(format!("cannot reach PostgreSQL at {}: {why}", redact(url)))
        })?;
        schema::migrate(&mut client).await?;
        let schema: String = client
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(pg)?
            .get(0);
        drop(client);
        Ok(Self {
            channel: coord::channel_of(&schema),
            ..store
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_error)
    }

    /// A pooled connection, for work beside the trait (copying a store in).
    pub(crate) async fn pool_client(&self) -> Result<deadpool_postgres::Object> {
        self.client().await
    }

    async fn exec(&self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(pg)?;
        c.execute(&stmt, args).await.map_err(pg)
    }

    /// Run a write whose unique-violation is the caller's to name (`Duplicate(msg)`).
    async fn exec_unique(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
        msg: impl FnOnce() -> String,
    ) -> Result<()> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(pg)?;
        c.execute(&stmt, args).await.map_err(|e| unique(e, msg))?;
        Ok(())
    }

    async fn rows(&self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(pg)?;
        c.query(&stmt, args).await.map_err(pg)
    }

    async fn docs<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>> {
        self.rows(sql, args)
            .await?
            .iter()
            .map(|r| from_json(r.get::<_, &str>(0)))
            .collect()
    }

    async fn doc<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>> {
        Ok(self.docs(sql, args).await?.pop())
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..s + 3], &creds[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn q<C: GenericClient>(c: &C, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
    let stmt = c.prepare_cached(sql).await.map_err(pg)?;
    c.query(&stmt, args).await.map_err(pg)
}

async fn x<C: GenericClient>(c: &C, sql: &str, args: &[&(dyn ToSql + Sync)]) -> Result<u64> {
    let stmt = c.prepare_cached(sql).await.map_err(pg)?;
    c.execute(&stmt, args).await.map_err(pg)
}

const PROCESS_COLS: &str = "doc, status, rooms_allocated, last_busy_at";

fn process_from(r: &Row) -> Result<Process> {
    let mut p: Process = from_json(r.get::<_, &str>(0))?;
    p.status = r.get::<_, &str>(1).parse().map_err(StoreError::Backend)?;
    p.rooms_allocated = uint(r.get(2));
    p.last_busy_at = r.get(3);
    Ok(p)
}

async fn load_process<C: GenericClient>(c: &C, id: &str, lock: bool) -> Result<Option<Process>> {
    let sql = if lock {
        "SELECT doc, status, rooms_allocated, last_busy_at FROM processes WHERE process_id = $1 FOR UPDATE"
    } else {
        "SELECT doc, status, rooms_allocated, last_busy_at FROM processes WHERE process_id = $1"
    };
    q(c, sql, &[&id])
        .await?
        .first()
        .map(process_from)
        .transpose()
}

async fn write_process<C: GenericClient>(c: &C, p: &Process) -> Result<()> {
    x(
        c,
        "UPDATE processes SET status = $2, rooms_allocated = $3, doc = $4, last_busy_at = $5 WHERE process_id = $1",
        &[&p.process_id, &p.status.as_str(), &int(p.rooms_allocated), &to_json(p)?, &p.last_busy_at],
    )
    .await?;
    Ok(())
}

async fn insert_process_row<C: GenericClient>(
    c: &C,
    p: &Process,
    max_live_for_app: Option<u64>,
) -> Result<()> {
    if let Some(max) = max_live_for_app {
        // Racing inserts for one app count one after the other.
        x(
            c,
            XACT_LOCK,
            &[&format!("lodge.app-processes:{}", p.app_id)],
        )
        .await?;
        let live: i64 = q(
            c,
            "SELECT COUNT(*) FROM processes WHERE app_id = $1
               AND status IN ('starting', 'running', 'draining', 'stopping')",
            &[&p.app_id],
        )
        .await?[0]
            .get(0);
        if u64::try_from(live).unwrap_or(0) >= max {
            return Err(StoreError::Limit(format!(
                "app {} has {live} live processes",
                p.app_id
            )));
        }
    }
    let stmt = c
        .prepare_cached(
            "INSERT INTO processes (process_id, app_id, deployment_id, node_id, region, status, rooms_per_process, rooms_allocated, created_at, port_count, doc, last_busy_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .await
        .map_err(pg)?;
    c.execute(
        &stmt,
        &[
            &p.process_id,
            &p.app_id,
            &p.deployment_id,
            &p.node_id,
            &p.region.as_str(),
            &p.status.as_str(),
            &int(p.rooms_per_process),
            &int(p.rooms_allocated),
            &p.created_at,
            &int(p.port_count),
            &to_json(p)?,
            &p.last_busy_at,
        ],
    )
    .await
    .map_err(|e| unique(e, || format!("process {} already exists", p.process_id)))?;
    Ok(())
}

async fn load_room<C: GenericClient>(c: &C, id: &str) -> Result<Option<Room>> {
    let rows = q(
        c,
        "SELECT app_id, status, doc FROM rooms WHERE room_id = $1",
        &[&id],
    )
    .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let d: RoomDoc = from_json(row.get::<_, &str>(2))?;
    let allocations = q(
        c,
        "SELECT room_allocation_id, process_id, scheduled_at, unscheduled_at FROM allocations WHERE room_id = $1 ORDER BY seq",
        &[&id],
    )
    .await?
    .iter()
    .map(|r| RoomAllocation {
        room_allocation_id: r.get(0),
        process_id: r.get(1),
        scheduled_at: r.get(2),
        unscheduled_at: r.get(3),
    })
    .collect();
    Ok(Some(Room {
        room_id: id.to_string(),
        app_id: row.get(0),
        status: row.get::<_, &str>(1).parse().map_err(StoreError::Backend)?,
        room_config: d.room_config,
        created_at: d.created_at,
        allocations,
    }))
}

fn process_where(query: &ProcessQuery) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut sql = String::from(" WHERE TRUE");
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    for (col, v) in [
        ("app_id", &query.app_id),
        ("node_id", &query.node_id),
        ("deployment_id", &query.deployment_id),
    ] {
        if let Some(v) = v {
            args.push(Box::new(v.clone()));
            sql.push_str(&format!(" AND {col} = ${}", args.len()));
        }
    }
    if !query.statuses.is_empty() {
        let v: Vec<String> = query
            .statuses
            .iter()
            .map(|s| s.as_str().to_string())
            .collect();
        args.push(Box::new(v));
        sql.push_str(&format!(" AND status = ANY(${})", args.len()));
    }
    if !query.regions.is_empty() {
        let v: Vec<String> = query
            .regions
            .iter()
            .map(|s| s.as_str().to_string())
            .collect();
        args.push(Box::new(v));
        sql.push_str(&format!(" AND region = ANY(${})", args.len()));
    }
    if let Some(before) = query.created_before {
        args.push(Box::new(before));
        sql.push_str(&format!(" AND created_at < ${}", args.len()));
    }
    if query.with_free_slot {
        sql.push_str(" AND rooms_allocated < rooms_per_process");
    }
    (sql, args)
}

fn arg_refs(args: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

const LOBBY_SELECT: &str =
    "SELECT l.doc, r.doc, r.status FROM lobbies l JOIN rooms r ON r.room_id = l.room_id";

async fn lobbies_where<C: GenericClient>(
    c: &C,
    filter: &str,
    args: &[&(dyn ToSql + Sync)],
) -> Result<Vec<(Lobby, RoomStatus)>> {
    q(c, &format!("{LOBBY_SELECT} {filter}"), args)
        .await?
        .iter()
        .map(|r| {
            let mut lobby: Lobby = from_json(r.get::<_, &str>(0))?;
            lobby.room_config = from_json::<RoomDoc>(r.get::<_, &str>(1))?.room_config;
            Ok((
                lobby,
                r.get::<_, &str>(2).parse().map_err(StoreError::Backend)?,
            ))
        })
        .collect()
}

#[async_trait]
impl Store for PostgresStore {
    async fn put_org(&self, org: &Org) -> Result<()> {
        self.exec(
            "INSERT INTO orgs (org_id, doc) VALUES ($1, $2) ON CONFLICT (org_id) DO NOTHING",
            &[&org.org_id, &to_json(org)?],
        )
        .await?;
        Ok(())
    }

    async fn orgs(&self) -> Result<Vec<Org>> {
        self.docs("SELECT doc FROM orgs ORDER BY seq", &[]).await
    }

    async fn insert_token(&self, t: &OrgToken, secret_hash: &str) -> Result<()> {
        self.exec_unique(
            "INSERT INTO tokens (org_token_id, org_id, name, active, secret_hash, doc) VALUES ($1, $2, $3, TRUE, $4, $5)",
            &[&t.org_token_id, &t.org_id, &t.name, &secret_hash, &to_json(t)?],
            || format!("a token named '{}' already exists", t.name),
        )
        .await
    }

    async fn token_by_hash(&self, secret_hash: &str) -> Result<Option<OrgToken>> {
        self.doc(
            "SELECT doc FROM tokens WHERE secret_hash = $1",
            &[&secret_hash],
        )
        .await
    }

    async fn tokens(&self, org_id: &str) -> Result<Vec<OrgToken>> {
        self.docs(
            "SELECT doc FROM tokens WHERE org_id = $1 ORDER BY seq",
            &[&org_id],
        )
        .await
    }

    async fn revoke_token(&self, org_id: &str, token_id: &str) -> Result<Option<OrgToken>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let rows = q(
            &tx,
            "SELECT doc FROM tokens WHERE org_id = $1 AND org_token_id = $2 FOR UPDATE",
            &[&org_id, &token_id],
        )
        .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let mut t: OrgToken = from_json(row.get::<_, &str>(0))?;
        t.status = OrgTokenStatus::Revoked;
        x(
            &tx,
            "UPDATE tokens SET active = FALSE, doc = $2 WHERE org_token_id = $1",
            &[&token_id, &to_json(&t)?],
        )
        .await?;
        tx.commit().await.map_err(pg)?;
        Ok(Some(t))
    }

    async fn insert_app(&self, app: &App) -> Result<()> {
        self.exec_unique(
            "INSERT INTO apps (app_id, org_id, app_name, deleted, doc) VALUES ($1, $2, $3, FALSE, $4)",
            &[&app.app_id, &app.org_id, &app.app_name, &to_json(app)?],
            || format!("an application named '{}' already exists", app.app_name),
        )
        .await
    }

    async fn update_app(&self, app: &App) -> Result<()> {
        self.exec_unique(
            "UPDATE apps SET app_name = $2, deleted = $3, doc = $4 WHERE app_id = $1",
            &[
                &app.app_id,
                &app.app_name,
                &app.deleted_at.is_some(),
                &to_json(app)?,
            ],
            || format!("an application named '{}' already exists", app.app_name),
        )
        .await
    }

    async fn app(&self, app_id: &str) -> Result<Option<App>> {
        self.doc("SELECT doc FROM apps WHERE app_id = $1", &[&app_id])
            .await
    }

    async fn apps(&self, org_id: &str) -> Result<Vec<App>> {
        self.docs(
            "SELECT doc FROM apps WHERE org_id = $1 AND NOT deleted ORDER BY seq",
            &[&org_id],
        )
        .await
    }

    async fn insert_build(&self, b: &Build) -> Result<()> {
        self.exec_unique(
            "INSERT INTO builds (build_id, org_id, created_at, doc, status) VALUES ($1, $2, $3, $4, $5)",
            &[&b.build_id, &b.org_id, &b.created_at, &to_json(b)?, &b.status.as_str()],
            || format!("build id '{}' is already taken", b.build_id),
        )
        .await
    }

    async fn update_build(&self, b: &Build) -> Result<()> {
        self.exec(
            "UPDATE builds SET doc = $2, status = $3 WHERE build_id = $1",
            &[&b.build_id, &to_json(b)?, &b.status.as_str()],
        )
        .await?;
        Ok(())
    }

    async fn update_build_if(&self, b: &Build, expected: BuildStatus) -> Result<bool> {
        let n = self
            .exec(
                "UPDATE builds SET doc = $2, status = $4 WHERE build_id = $1 AND status = $3",
                &[
                    &b.build_id,
                    &to_json(b)?,
                    &expected.as_str(),
                    &b.status.as_str(),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    async fn build(&self, build_id: &str) -> Result<Option<Build>> {
        self.doc("SELECT doc FROM builds WHERE build_id = $1", &[&build_id])
            .await
    }

    async fn builds(&self, org_id: &str) -> Result<Vec<Build>> {
        self.docs(
            "SELECT doc FROM builds WHERE org_id = $1 ORDER BY created_at DESC, seq DESC",
            &[&org_id],
        )
        .await
    }

    async fn insert_deployment(&self, d: &Deployment) -> Result<()> {
        self.exec_unique(
            "INSERT INTO deployments (deployment_id, app_id, doc) VALUES ($1, $2, $3)",
            &[&d.deployment_id, &d.app_id, &to_json(d)?],
            || format!("deployment {} already exists", d.deployment_id),
        )
        .await
    }

    async fn latest_deployment(&self, app_id: &str) -> Result<Option<Deployment>> {
        self.doc(
            "SELECT doc FROM deployments WHERE app_id = $1 ORDER BY seq DESC LIMIT 1",
            &[&app_id],
        )
        .await
    }

    async fn deployment(&self, id: &str) -> Result<Option<Deployment>> {
        self.doc(
            "SELECT doc FROM deployments WHERE deployment_id = $1",
            &[&id],
        )
        .await
    }

    async fn deployments(&self, app_id: &str) -> Result<Vec<Deployment>> {
        self.docs(
            "SELECT doc FROM deployments WHERE app_id = $1 ORDER BY seq DESC",
            &[&app_id],
        )
        .await
    }

    async fn put_node(&self, n: &Node) -> Result<()> {
        self.exec(
            "INSERT INTO nodes (node_id, doc) VALUES ($1, $2) ON CONFLICT (node_id) DO UPDATE SET doc = excluded.doc",
            &[&n.node_id, &to_json(n)?],
        )
        .await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<Node>> {
        self.docs("SELECT doc FROM nodes ORDER BY node_id", &[])
            .await
    }

    async fn node(&self, node_id: &str) -> Result<Option<Node>> {
        self.doc("SELECT doc FROM nodes WHERE node_id = $1", &[&node_id])
            .await
    }

    async fn update_node(
        &self,
        node_id: &str,
        change: &(dyn for<'n> Fn(&'n mut Node) -> bool + Send + Sync),
    ) -> Result<Option<Node>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(
                "SELECT doc FROM nodes WHERE node_id = $1 FOR UPDATE",
                &[&node_id],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else { return Ok(None) };
        let mut n: Node = crate::codec::from_json(&row.get::<_, String>(0))?;
        if change(&mut n) {
            tx.execute(
                "UPDATE nodes SET doc = $2 WHERE node_id = $1",
                &[&node_id, &to_json(&n)?],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
        }
        Ok(Some(n))
    }

    async fn put_fleet(&self, f: &Fleet) -> Result<()> {
        self.exec_unique(
            "INSERT INTO fleets (org_id, fleet_id, name, doc) VALUES ($1, $2, $3, $4)
             ON CONFLICT (org_id, fleet_id) DO UPDATE SET name = excluded.name, doc = excluded.doc",
            &[&f.org_id, &f.fleet_id, &f.name, &to_json(f)?],
            || format!("a fleet named '{}' already exists", f.name),
        )
        .await
    }

    async fn fleets(&self, org_id: &str) -> Result<Vec<Fleet>> {
        self.docs(
            "SELECT doc FROM fleets WHERE org_id = $1 ORDER BY name",
            &[&org_id],
        )
        .await
    }

    async fn insert_join_token(&self, t: &JoinToken, secret_hash: &str) -> Result<()> {
        self.exec(
            "INSERT INTO join_tokens (token_id, secret_hash, doc) VALUES ($1, $2, $3)",
            &[&t.token_id, &secret_hash, &to_json(t)?],
        )
        .await?;
        Ok(())
    }

    async fn join_token_by_hash(&self, secret_hash: &str) -> Result<Option<JoinToken>> {
        self.doc(
            "SELECT doc FROM join_tokens WHERE secret_hash = $1",
            &[&secret_hash],
        )
        .await
    }

    async fn node_usage(&self) -> Result<Vec<NodeUsage>> {
        Ok(self
            .rows(
                "SELECT p.node_id, COUNT(*), COALESCE(SUM(p.port_count), 0),
                        COALESCE(SUM((d.doc::json->>'requestedCPU')::float8), 0),
                        COALESCE(SUM((d.doc::json->>'requestedMemoryMB')::float8), 0)
                 FROM processes p LEFT JOIN deployments d ON d.deployment_id = p.deployment_id
                 WHERE p.status IN ('starting', 'running', 'draining', 'stopping') GROUP BY p.node_id",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                let n: i64 = r.get(1);
                let ports: i64 = r.get(2);
                NodeUsage {
                    node_id: r.get(0),
                    live_processes: u32::try_from(n).unwrap_or(u32::MAX),
                    ports: u32::try_from(ports).unwrap_or(u32::MAX),
                    cpu: r.get(3),
                    memory_mb: r.get(4),
                }
            })
            .collect())
    }

    async fn process(&self, id: &str) -> Result<Option<Process>> {
        let c = self.client().await?;
        load_process(&c, id, false).await
    }

    async fn processes(&self, query: &ProcessQuery) -> Result<Vec<Process>> {
        let (w, args) = process_where(query);
        let limit = query
            .limit
            .map(|l| format!(" LIMIT {l}"))
            .unwrap_or_default();
        let order = if query.with_free_slot {
            "status != 'running', rooms_allocated DESC, created_at, seq"
        } else {
            "created_at DESC, seq DESC"
        };
        let sql = format!("SELECT {PROCESS_COLS} FROM processes{w} ORDER BY {order}{limit}");
        self.rows(&sql, &arg_refs(&args))
            .await?
            .iter()
            .map(process_from)
            .collect()
    }

    async fn count_processes(&self, query: &ProcessQuery) -> Result<u64> {
        let (w, args) = process_where(query);
        let rows = self
            .rows(
                &format!("SELECT COUNT(*) FROM processes{w}"),
                &arg_refs(&args),
            )
            .await?;
        Ok(u64::try_from(rows[0].get::<_, i64>(0)).unwrap_or(0))
    }

    async fn insert_process(&self, p: &Process, max_live_for_app: Option<u64>) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        insert_process_row(&tx, p, max_live_for_app).await?;
        tx.commit().await.map_err(pg)
    }

    async fn update_process(
        &self,
        id: &str,
        change: &(dyn for<'p> Fn(&'p mut Process) -> bool + Send + Sync),
    ) -> Result<Option<Process>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let Some(mut p) = load_process(&tx, id, true).await? else {
            return Ok(None);
        };
        if p.status.is_terminal() {
            return Ok(Some(p));
        }
        let allocated = p.rooms_allocated;
        if change(&mut p) {
            p.rooms_allocated = allocated;
            write_process(&tx, &p).await?;
            tx.commit().await.map_err(pg)?;
        }
        Ok(Some(p))
    }

    async fn end_process(
        &self,
        id: &str,
        status: ProcessStatus,
        at: Millis,
        reason: &str,
    ) -> Result<Option<EndedProcess>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        // Rooms first, then the process: the order freeing a room takes them in.
        x(
            &tx,
            "SELECT 1 FROM rooms WHERE process_id = $1 ORDER BY room_id FOR UPDATE",
            &[&id],
        )
        .await?;
        let Some(mut p) = load_process(&tx, id, true).await? else {
            return Ok(None);
        };
        if p.status.is_terminal() {
            return Ok(None);
        }
        x(
            &tx,
            "UPDATE allocations SET unscheduled_at = $2 WHERE process_id = $1 AND unscheduled_at IS NULL",
            &[&id, &at],
        )
        .await?;
        // Every room on it now, including any placed while the rooms above were locked.
        let room_ids: Vec<String> = q(
            &tx,
            "WITH ended AS (
                UPDATE rooms SET status = 'destroyed', process_id = NULL WHERE process_id = $1
                RETURNING room_id, seq
             ) SELECT room_id FROM ended ORDER BY seq",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        p.summary_exit_reason = Some(crate::exit_summary(&p, reason));
        p.status = status;
        p.rooms_allocated = 0;
        p.terminated_at = Some(at);
        p.stopping_at.get_or_insert(at);
        write_process(&tx, &p).await?;
        tx.commit().await.map_err(pg)?;
        Ok(Some(EndedProcess {
            process: p,
            destroyed_rooms: room_ids,
        }))
    }

    async fn room(&self, room_id: &str) -> Result<Option<Room>> {
        let c = self.client().await?;
        load_room(&c, room_id).await
    }

    async fn rooms_of_process(&self, process_id: &str, active: bool) -> Result<Vec<Room>> {
        let c = self.client().await?;
        let sql = if active {
            "SELECT room_id FROM rooms WHERE process_id = $1 ORDER BY seq"
        } else {
            "SELECT a.room_id FROM allocations a
             WHERE a.process_id = $1 AND a.unscheduled_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM rooms r WHERE r.room_id = a.room_id AND r.process_id = $1)
             GROUP BY a.room_id ORDER BY MIN(a.scheduled_at)"
        };
        let ids: Vec<String> = q(&c, sql, &[&process_id])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut rooms = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = load_room(&c, &id).await? {
                rooms.push(r);
            }
        }
        Ok(rooms)
    }

    async fn place_room(&self, room: &Room, target: PlaceTarget) -> Result<()> {
        let alloc = room
            .allocations
            .last()
            .ok_or_else(|| StoreError::Backend("room to place has no allocation".into()))?;
        let doc = to_json(&RoomDoc {
            room_config: room.room_config.clone(),
            created_at: room.created_at,
        })?;
        match &target {
            // The hot path: with whatever else is waiting, one call and one commit.
            PlaceTarget::Existing(_) => {
                self.batch
                    .place(batch::Place {
                        room: room.room_id.clone(),
                        app: room.app_id.clone(),
                        status: room.status.as_str().to_string(),
                        process: alloc.process_id.clone(),
                        doc,
                        alloc: alloc.room_allocation_id.clone(),
                        at: alloc.scheduled_at,
                    })
                    .await
            }
            // A new process (and the app's limit) first, in the same transaction, which is
            // rolled back unless the room lands too.
            PlaceTarget::New(p, max) => {
                let mut c = self.client().await?;
                let tx = c.transaction().await.map_err(pg)?;
                insert_process_row(&tx, p, *max).await?;
                let outcome: String = q(
                    &tx,
                    "SELECT lodge_place_room($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &room.room_id,
                        &room.app_id,
                        &room.status.as_str(),
                        &alloc.process_id,
                        &doc,
                        &alloc.room_allocation_id,
                        &alloc.scheduled_at,
                    ],
                )
                .await?[0]
                    .get(0);
                if outcome != "ok" {
                    return Err(batch::taken(&room.room_id));
                }
                tx.commit().await.map_err(pg)
            }
        }
    }

    async fn unallocate_room(
        &self,
        room_id: &str,
        status: RoomStatus,
        at: Millis,
    ) -> Result<Option<Room>> {
        let freed = self
            .batch
            .free(batch::Free {
                room: room_id.to_string(),
                status: status.as_str().to_string(),
                at,
            })
            .await?;
        if !freed {
            return Ok(None);
        }
        let c = self.client().await?;
        load_room(&c, room_id).await
    }

    async fn update_room_config(&self, room_id: &str, config: &str) -> Result<bool> {
        // Documents are kept as JSON text, not jsonb (which refuses a NUL character, which a
        // config may hold), so the change is made here, under the row's lock.
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let rows = q(
            &tx,
            "SELECT doc FROM rooms WHERE room_id = $1 AND status != 'destroyed' FOR UPDATE",
            &[&room_id],
        )
        .await?;
        let Some(row) = rows.first() else {
            return Ok(false);
        };
        let mut d: RoomDoc = from_json(row.get::<_, &str>(0))?;
        d.room_config = Some(config.to_string());
        x(
            &tx,
            "UPDATE rooms SET doc = $2 WHERE room_id = $1",
            &[&room_id, &to_json(&d)?],
        )
        .await?;
        tx.commit().await.map_err(pg)?;
        Ok(true)
    }

    async fn reserve_lobby(
        &self,
        lobby: &Lobby,
        since: Millis,
        max: u32,
    ) -> Result<Option<Millis>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        x(
            &tx,
            XACT_LOCK,
            &[&format!(
                "lodge.lobbies:{}:{}",
                lobby.app_id, lobby.created_by
            )],
        )
        .await?;
        let rows = q(
            &tx,
            "SELECT COUNT(*), MIN(created_at) FROM lobbies WHERE app_id = $1 AND created_by = $2 AND created_at > $3",
            &[&lobby.app_id, &lobby.created_by, &since],
        )
        .await?;
        let n: i64 = rows[0].get(0);
        let oldest: Option<Millis> = rows[0].get(1);
        if n >= i64::from(max) {
            return Ok(Some(oldest.unwrap_or(since)));
        }
        let taken = !q(
            &tx,
            "SELECT 1 FROM rooms WHERE room_id = $1",
            &[&lobby.room_id],
        )
        .await?
        .is_empty();
        let inserted = if taken {
            0
        } else {
            x(
                &tx,
                "INSERT INTO lobbies (room_id, app_id, short_code, visibility, region, created_by, created_at, doc)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (room_id) DO NOTHING",
                &[
                    &lobby.room_id,
                    &lobby.app_id,
                    &lobby.short_code,
                    &lobby.visibility.as_str(),
                    &lobby.region.as_str(),
                    &lobby.created_by,
                    &lobby.created_at,
                    &to_json(lobby)?,
                ],
            )
            .await?
        };
        if inserted == 0 {
            return Err(StoreError::Duplicate(format!(
                "room id '{}' is already taken",
                lobby.room_id
            )));
        }
        tx.commit().await.map_err(pg)?;
        Ok(None)
    }

    async fn delete_lobby(&self, room_id: &str) -> Result<()> {
        self.exec("DELETE FROM lobbies WHERE room_id = $1", &[&room_id])
            .await?;
        Ok(())
    }

    async fn lobby(&self, room_id: &str) -> Result<Option<(Lobby, RoomStatus)>> {
        let c = self.client().await?;
        Ok(lobbies_where(&c, "WHERE l.room_id = $1", &[&room_id])
            .await?
            .pop())
    }

    async fn lobby_by_short_code(
        &self,
        app_id: &str,
        code: &str,
    ) -> Result<Option<(Lobby, RoomStatus)>> {
        let c = self.client().await?;
        Ok(lobbies_where(
            &c,
            "WHERE l.app_id = $1 AND l.short_code = $2 AND r.status != 'destroyed' ORDER BY l.created_at DESC, l.seq DESC LIMIT 1",
            &[&app_id, &code],
        )
        .await?
        .pop())
    }

    async fn lobbies(
        &self,
        app_id: &str,
        visibility: LobbyVisibility,
        region: Option<Region>,
    ) -> Result<Vec<Lobby>> {
        let c = self.client().await?;
        let region = region.map(|r| r.as_str());
        let rows = lobbies_where(
            &c,
            "WHERE l.app_id = $1 AND l.visibility = $2 AND ($3::text IS NULL OR l.region = $3) AND r.status != 'destroyed'
             ORDER BY l.created_at DESC, l.seq DESC",
            &[&app_id, &visibility.as_str(), &region],
        )
        .await?;
        Ok(rows.into_iter().map(|(l, _)| l).collect())
    }

    async fn set_lobby_state(
        &self,
        room_id: &str,
        state: &serde_json::Value,
    ) -> Result<Option<Lobby>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let Some((mut lobby, _)) =
            lobbies_where(&tx, "WHERE l.room_id = $1 FOR UPDATE OF l", &[&room_id])
                .await?
                .pop()
        else {
            return Ok(None);
        };
        lobby.state = Some(state.clone());
        x(
            &tx,
            "UPDATE lobbies SET doc = $2 WHERE room_id = $1",
            &[&room_id, &to_json(&lobby)?],
        )
        .await?;
        tx.commit().await.map_err(pg)?;
        Ok(Some(lobby))
    }

    async fn legacy_number(&self, scope: &str, kind: &str, id: &str) -> Result<i64> {
        let found = self
            .rows(
                "SELECT num FROM legacy_ids WHERE scope = $1 AND kind = $2 AND id = $3",
                &[&scope, &kind, &id],
            )
            .await?;
        if let Some(r) = found.first() {
            return Ok(r.get(0));
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        x(&tx, XACT_LOCK, &[&format!("lodge.legacy:{scope}:{kind}")]).await?;
        // Another replica may have numbered it while this one waited for the lock.
        let found = q(
            &tx,
            "SELECT num FROM legacy_ids WHERE scope = $1 AND kind = $2 AND id = $3",
            &[&scope, &kind, &id],
        )
        .await?;
        if let Some(r) = found.first() {
            return Ok(r.get(0));
        }
        let n: i64 = q(
            &tx,
            "SELECT COALESCE(MAX(num), 0) + 1 FROM legacy_ids WHERE scope = $1 AND kind = $2",
            &[&scope, &kind],
        )
        .await?[0]
            .get(0);
        x(
            &tx,
            "INSERT INTO legacy_ids (scope, kind, num, id) VALUES ($1, $2, $3, $4)",
            &[&scope, &kind, &n, &id],
        )
        .await?;
        tx.commit().await.map_err(pg)?;
        Ok(n)
    }

    async fn legacy_id(&self, scope: &str, kind: &str, num: i64) -> Result<Option<String>> {
        Ok(self
            .rows(
                "SELECT id FROM legacy_ids WHERE scope = $1 AND kind = $2 AND num = $3",
                &[&scope, &kind, &num],
            )
            .await?
            .first()
            .map(|r| r.get(0)))
    }

    async fn legacy_entries(&self, scope: &str, kind: &str) -> Result<Vec<(i64, String)>> {
        Ok(self
            .rows(
                "SELECT num, id FROM legacy_ids WHERE scope = $1 AND kind = $2 ORDER BY num DESC",
                &[&scope, &kind],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }
}
