//! The embedded store: one SQLite file in WAL mode. Writes go to one writer thread that commits
//! every pending write in one transaction (group commit, `writer.rs`); WAL checkpoints run on
//! a thread of their own (`checkpoint.rs`); reads run on their own read-only connections
//! beside them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use lodge_model::*;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde::de::DeserializeOwned;

use crate::codec::{from_json, to_json, RoomDoc};
use crate::{EndedProcess, NodeUsage, PlaceTarget, ProcessQuery, Result, Store, StoreError};

mod checkpoint;
mod coord;
mod schema;
mod writer;

use schema::MIGRATIONS;
use writer::Writer;

/// Statements run through SQLite's statement cache: parsed once, not on every call.
trait Run {
    fn run<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn one<T, P: rusqlite::Params, F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T>;
}

impl Run for Connection {
    fn run<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }
    fn one<T, P: rusqlite::Params, F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// How often `update_process` reads again when the row moved under it.
const UPDATE_ATTEMPTS: usize = 64;

/// Read-only connections beside the writer.
const READERS: usize = 4;

pub struct SqliteStore {
    /// The one connection that writes, owned by the writer thread.
    writer: Writer,
    /// Read-only connections, so reads run beside writes and each other (WAL).
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
    /// A scratch database file removed on drop (`in_memory`).
    scratch: Option<PathBuf>,
}

pub(crate) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// Map a uniqueness violation to `Duplicate(msg)`.
fn unique(e: rusqlite::Error, msg: impl FnOnce() -> String) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Duplicate(msg())
    } else {
        backend(e)
    }
}

impl SqliteStore {
    /// Open (creating if needed) the database file and apply pending migrations.
    pub fn open(path: &Path) -> Result<Self> {
        without_memory_statistics();
        let conn = Connection::open(path).map_err(backend)?;
        init(&conn)?;
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let r = Connection::open(path).map_err(backend)?;
            r.pragma_update(None, "query_only", "ON").map_err(backend)?;
            r.busy_timeout(std::time::Duration::from_secs(5))
                .map_err(backend)?;
            readers.push(Mutex::new(r));
        }
        Ok(Self {
            writer: Writer::start(conn, path)?,
            readers,
            next_reader: std::sync::atomic::AtomicUsize::new(0),
            scratch: None,
        })
    }

    /// A store of its own in a scratch file, removed when the store is dropped (tests).
    pub fn in_memory() -> Result<Self> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "lodge-scratch-{}-{}.db",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        remove_db(&path);
        let mut store = Self::open(&path)?;
        store.scratch = Some(path);
        Ok(store)
    }

    /// Run a write in the writer's next transaction.
    async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.writer.write(op).await
    }

    /// Run a read on a reader connection (a free one if any).
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let n = self.readers.len();
        let start = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..n {
            if let Ok(c) = self.readers[(start + i) % n].try_lock() {
                return f(&c);
            }
        }
        let c = self.readers[start % n]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(&c)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Some(path) = &self.scratch {
            self.readers.clear();
            self.writer.stop();
            remove_db(path);
        }
    }
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// SQLite counts every allocation under one global mutex unless told not to, which readers on
/// several threads then queue on. Only possible before SQLite initialises; later calls are
/// refused by SQLite and change nothing.
fn without_memory_statistics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a plain configuration call with an int argument, as SQLITE_CONFIG_MEMSTATUS
        // takes; SQLite refuses it (SQLITE_MISUSE) rather than misbehave once initialised.
        unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::os::raw::c_int,
            );
        }
    });
}

/// Pragmas and pending migrations, on the write connection before the writer takes it.
fn init(conn: &Connection) -> Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(backend)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(backend)?;
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        conn.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))
        .map_err(backend)?;
    }
    Ok(())
}

fn docs<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let rows = stmt
        .query_map(params, |r| r.get::<_, String>(0))
        .map_err(backend)?;
    rows.map(|r| from_json(&r.map_err(backend)?)).collect()
}

fn doc<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Option<T>> {
    let s: Option<String> = conn
        .one(sql, params, |r| r.get(0))
        .optional()
        .map_err(backend)?;
    s.map(|s| from_json(&s)).transpose()
}

const PROCESS_COLS: &str = "doc, status, rooms_allocated, last_busy_at";

/// A process row: its document, and the columns that override what the document says.
type ProcessRow = (String, String, u32, Millis);

fn read_process(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProcessRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn process_from((doc, status, allocated, busy): ProcessRow) -> Result<Process> {
    let mut p: Process = from_json(&doc)?;
    p.status = status.parse().map_err(backend)?;
    p.rooms_allocated = allocated;
    p.last_busy_at = busy;
    Ok(p)
}

fn load_process(conn: &Connection, id: &str) -> Result<Option<Process>> {
    conn.one(
        &format!("SELECT {PROCESS_COLS} FROM processes WHERE process_id = ?1"),
        params![id],
        read_process,
    )
    .optional()
    .map_err(backend)?
    .map(process_from)
    .transpose()
}

fn write_process(conn: &Connection, p: &Process) -> Result<()> {
    conn.run(
        "UPDATE processes SET status = ?2, rooms_allocated = ?3, doc = ?4, last_busy_at = ?5 WHERE process_id = ?1",
        params![
            p.process_id,
            p.status.as_str(),
            p.rooms_allocated,
            to_json(p)?,
            p.last_busy_at
        ],
    )
    .map_err(backend)?;
    Ok(())
}

fn insert_process_row(conn: &Connection, p: &Process, max_live_for_app: Option<u64>) -> Result<()> {
    if let Some(max) = max_live_for_app {
        let live: u64 = conn
            .query_row(
                "SELECT COUNT(*) FROM processes WHERE app_id = ?1
                   AND status IN ('starting', 'running', 'draining', 'stopping')",
                params![p.app_id],
                |r| r.get(0),
            )
            .map_err(backend)?;
        if live >= max {
            return Err(StoreError::Limit(format!(
                "app {} has {live} live processes",
                p.app_id
            )));
        }
    }
    conn.run(
        "INSERT INTO processes (process_id, app_id, deployment_id, node_id, region, status, rooms_per_process, rooms_allocated, created_at, doc, port_count, last_busy_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            p.process_id,
            p.app_id,
            p.deployment_id,
            p.node_id,
            p.region.as_str(),
            p.status.as_str(),
            p.rooms_per_process,
            p.rooms_allocated,
            p.created_at,
            to_json(p)?,
            p.port_count,
            p.last_busy_at
        ],
    )
    .map_err(|e| unique(e, || format!("process {} already exists", p.process_id)))?;
    Ok(())
}

fn load_room(conn: &Connection, id: &str) -> Result<Option<Room>> {
    let row: Option<(String, String, String)> = conn
        .one(
            "SELECT app_id, status, doc FROM rooms WHERE room_id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(backend)?;
    let Some((app_id, status, doc)) = row else {
        return Ok(None);
    };
    let d: RoomDoc = from_json(&doc)?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT room_allocation_id, process_id, scheduled_at, unscheduled_at FROM allocations WHERE room_id = ?1 ORDER BY seq",
        )
        .map_err(backend)?;
    let allocations = stmt
        .query_map(params![id], |r| {
            Ok(RoomAllocation {
                room_allocation_id: r.get(0)?,
                process_id: r.get(1)?,
                scheduled_at: r.get(2)?,
                unscheduled_at: r.get(3)?,
            })
        })
        .map_err(backend)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(backend)?;
    Ok(Some(Room {
        room_id: id.to_string(),
        app_id,
        status: status.parse().map_err(backend)?,
        room_config: d.room_config,
        created_at: d.created_at,
        allocations,
    }))
}

/// Free one slot and close the room's current allocation.
fn close_allocation(conn: &Connection, room_id: &str, process_id: &str, at: Millis) -> Result<()> {
    conn.run(
        "UPDATE allocations SET unscheduled_at = ?3 WHERE room_id = ?1 AND process_id = ?2 AND unscheduled_at IS NULL",
        params![room_id, process_id, at],
    )
    .map_err(backend)?;
    conn.run(
        "UPDATE processes SET rooms_allocated = rooms_allocated - 1 WHERE process_id = ?1 AND rooms_allocated > 0",
        params![process_id],
    )
    .map_err(backend)?;
    Ok(())
}

fn process_where(q: &ProcessQuery) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut sql = String::from(" WHERE 1=1");
    let mut args: Vec<Value> = Vec::new();
    let eq = |col: &str, v: &Option<String>, sql: &mut String, args: &mut Vec<Value>| {
        if let Some(v) = v {
            args.push(Value::Text(v.clone()));
            sql.push_str(&format!(" AND {col} = ?{}", args.len()));
        }
    };
    eq("app_id", &q.app_id, &mut sql, &mut args);
    eq("node_id", &q.node_id, &mut sql, &mut args);
    eq("deployment_id", &q.deployment_id, &mut sql, &mut args);
    let any = |col: &str, vals: Vec<&str>, sql: &mut String, args: &mut Vec<Value>| {
        if vals.is_empty() {
            return;
        }
        let mut marks = Vec::new();
        for v in vals {
            args.push(Value::Text(v.to_string()));
            marks.push(format!("?{}", args.len()));
        }
        sql.push_str(&format!(" AND {col} IN ({})", marks.join(",")));
    };
    any(
        "status",
        q.statuses.iter().map(|s| s.as_str()).collect(),
        &mut sql,
        &mut args,
    );
    any(
        "region",
        q.regions.iter().map(|s| s.as_str()).collect(),
        &mut sql,
        &mut args,
    );
    if let Some(before) = q.created_before {
        args.push(Value::Integer(before));
        sql.push_str(&format!(" AND created_at < ?{}", args.len()));
    }
    if q.with_free_slot {
        sql.push_str(" AND rooms_allocated < rooms_per_process");
    }
    (sql, args)
}

/// Lobby columns, joined with the room's status and config.
const LOBBY_SELECT: &str = "SELECT l.doc, json_extract(r.doc, '$.roomConfig'), r.status FROM lobbies l JOIN rooms r ON r.room_id = l.room_id";

fn lobbies_where(
    conn: &Connection,
    filter: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<(Lobby, RoomStatus)>> {
    let mut stmt = conn
        .prepare_cached(&format!("{LOBBY_SELECT} {filter}"))
        .map_err(backend)?;
    let rows = stmt
        .query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(backend)?;
    rows.map(|row| {
        let (doc, config, status) = row.map_err(backend)?;
        let mut lobby: Lobby = from_json(&doc)?;
        lobby.room_config = config;
        Ok((lobby, status.parse().map_err(backend)?))
    })
    .collect()
}

fn write_lobby(conn: &Connection, l: &Lobby) -> Result<()> {
    conn.run(
        "INSERT INTO lobbies (room_id, app_id, short_code, visibility, region, created_by, created_at, doc)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (room_id) DO UPDATE SET doc = excluded.doc",
        params![
            l.room_id,
            l.app_id,
            l.short_code,
            l.visibility.as_str(),
            l.region.as_str(),
            l.created_by,
            l.created_at,
            to_json(l)?
        ],
    )
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_org(&self, org: &Org) -> Result<()> {
        let org = org.to_owned();
        self.write(move |c| {
            let org = &org;
            c.run(
                "INSERT INTO orgs (org_id, doc) VALUES (?1, ?2) ON CONFLICT (org_id) DO NOTHING",
                params![org.org_id, to_json(org)?],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn orgs(&self) -> Result<Vec<Org>> {
        self.read(|c| docs(c, "SELECT doc FROM orgs ORDER BY rowid", []))
    }

    async fn insert_token(&self, t: &OrgToken, secret_hash: &str) -> Result<()> {
        let (t, secret_hash) = (t.to_owned(), secret_hash.to_owned());
        self.write(move |c| {
            let (t, secret_hash) = (&t, &secret_hash);
            c.run(
                "INSERT INTO tokens (org_token_id, org_id, name, active, secret_hash, doc) VALUES (?1, ?2, ?3, 1, ?4, ?5)",
                params![t.org_token_id, t.org_id, t.name, secret_hash, to_json(t)?],
            )
            .map_err(|e| unique(e, || format!("a token named '{}' already exists", t.name)))?;
            Ok(())
        }).await
    }

    async fn token_by_hash(&self, secret_hash: &str) -> Result<Option<OrgToken>> {
        self.read(|c| {
            doc(
                c,
                "SELECT doc FROM tokens WHERE secret_hash = ?1",
                params![secret_hash],
            )
        })
    }

    async fn tokens(&self, org_id: &str) -> Result<Vec<OrgToken>> {
        self.read(|c| {
            docs(
                c,
                "SELECT doc FROM tokens WHERE org_id = ?1 ORDER BY rowid",
                params![org_id],
            )
        })
    }

    async fn revoke_token(&self, org_id: &str, token_id: &str) -> Result<Option<OrgToken>> {
        let (org_id, token_id) = (org_id.to_owned(), token_id.to_owned());
        self.write(move |c| {
            let (org_id, token_id) = (&org_id, &token_id);
            let t: Option<OrgToken> = doc(
                c,
                "SELECT doc FROM tokens WHERE org_id = ?1 AND org_token_id = ?2",
                params![org_id, token_id],
            )?;
            let Some(mut t) = t else { return Ok(None) };
            t.status = OrgTokenStatus::Revoked;
            c.run(
                "UPDATE tokens SET active = 0, doc = ?2 WHERE org_token_id = ?1",
                params![token_id, to_json(&t)?],
            )
            .map_err(backend)?;
            Ok(Some(t))
        })
        .await
    }

    async fn insert_app(&self, app: &App) -> Result<()> {
        let app = app.to_owned();
        self.write(move |c| {
            let app = &app;
            c.run(
                "INSERT INTO apps (app_id, org_id, app_name, deleted, doc) VALUES (?1, ?2, ?3, 0, ?4)",
                params![app.app_id, app.org_id, app.app_name, to_json(app)?],
            )
            .map_err(|e| unique(e, || format!("an application named '{}' already exists", app.app_name)))?;
            Ok(())
        }).await
    }

    async fn update_app(&self, app: &App) -> Result<()> {
        let app = app.to_owned();
        self.write(move |c| {
            let app = &app;
            c.run(
                "UPDATE apps SET app_name = ?2, deleted = ?3, doc = ?4 WHERE app_id = ?1",
                params![
                    app.app_id,
                    app.app_name,
                    app.deleted_at.is_some(),
                    to_json(app)?
                ],
            )
            .map_err(|e| {
                unique(e, || {
                    format!("an application named '{}' already exists", app.app_name)
                })
            })?;
            Ok(())
        })
        .await
    }

    async fn app(&self, app_id: &str) -> Result<Option<App>> {
        self.read(|c| doc(c, "SELECT doc FROM apps WHERE app_id = ?1", params![app_id]))
    }

    async fn apps(&self, org_id: &str) -> Result<Vec<App>> {
        self.read(|c| {
            docs(
                c,
                "SELECT doc FROM apps WHERE org_id = ?1 AND deleted = 0 ORDER BY rowid",
                params![org_id],
            )
        })
    }

    async fn insert_build(&self, b: &Build) -> Result<()> {
        let b = b.to_owned();
        self.write(move |c| {
            let b = &b;
            c.run(
                "INSERT INTO builds (build_id, org_id, created_at, doc) VALUES (?1, ?2, ?3, ?4)",
                params![b.build_id, b.org_id, b.created_at, to_json(b)?],
            )
            .map_err(|e| unique(e, || format!("build id '{}' is already taken", b.build_id)))?;
            Ok(())
        })
        .await
    }

    async fn update_build(&self, b: &Build) -> Result<()> {
        let b = b.to_owned();
        self.write(move |c| {
            let b = &b;
            c.run(
                "UPDATE builds SET doc = ?2 WHERE build_id = ?1",
                params![b.build_id, to_json(b)?],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn update_build_if(&self, b: &Build, expected: BuildStatus) -> Result<bool> {
        let b = b.to_owned();
        self.write(move |c| {
            let b = &b;
            let n = c
                .run(
                    "UPDATE builds SET doc = ?2 WHERE build_id = ?1 AND json_extract(doc, '$.status') = ?3",
                    params![b.build_id, to_json(b)?, expected.as_str()],
                )
                .map_err(backend)?;
            Ok(n == 1)
        }).await
    }

    async fn build(&self, build_id: &str) -> Result<Option<Build>> {
        self.read(|c| {
            doc(
                c,
                "SELECT doc FROM builds WHERE build_id = ?1",
                params![build_id],
            )
        })
    }

    async fn builds(&self, org_id: &str) -> Result<Vec<Build>> {
        self.read(|c| {
            docs(
                c,
                "SELECT doc FROM builds WHERE org_id = ?1 ORDER BY created_at DESC, rowid DESC",
                params![org_id],
            )
        })
    }

    async fn insert_deployment(&self, d: &Deployment) -> Result<()> {
        let d = d.to_owned();
        self.write(move |c| {
            let d = &d;
            c.run(
                "INSERT INTO deployments (deployment_id, app_id, doc) VALUES (?1, ?2, ?3)",
                params![d.deployment_id, d.app_id, to_json(d)?],
            )
            .map_err(|e| {
                unique(e, || {
                    format!("deployment {} already exists", d.deployment_id)
                })
            })?;
            Ok(())
        })
        .await
    }

    async fn latest_deployment(&self, app_id: &str) -> Result<Option<Deployment>> {
        self.read(|c| {
            doc(
                c,
                "SELECT doc FROM deployments WHERE app_id = ?1 ORDER BY seq DESC LIMIT 1",
                params![app_id],
            )
        })
    }

    async fn deployment(&self, id: &str) -> Result<Option<Deployment>> {
        self.read(|c| {
            doc(
                c,
                "SELECT doc FROM deployments WHERE deployment_id = ?1",
                params![id],
            )
        })
    }

    async fn deployments(&self, app_id: &str) -> Result<Vec<Deployment>> {
        self.read(|c| {
            docs(
                c,
                "SELECT doc FROM deployments WHERE app_id = ?1 ORDER BY seq DESC",
                params![app_id],
            )
        })
    }

    async fn put_node(&self, n: &Node) -> Result<()> {
        let n = n.to_owned();
        self.write(move |c| {
            let n = &n;
            c.run(
                "INSERT INTO nodes (node_id, doc) VALUES (?1, ?2) ON CONFLICT (node_id) DO UPDATE SET doc = excluded.doc",
                params![n.node_id, to_json(n)?],
            )
            .map_err(backend)?;
            Ok(())
        }).await
    }

    async fn nodes(&self) -> Result<Vec<Node>> {
        self.read(|c| docs(c, "SELECT doc FROM nodes ORDER BY node_id", []))
    }

    async fn node(&self, node_id: &str) -> Result<Option<Node>> {
        self.read(|c| {
            doc(
                c,
                "SELECT doc FROM nodes WHERE node_id = ?1",
                params![node_id],
            )
        })
    }

    async fn update_node(
        &self,
        node_id: &str,
        change: &(dyn for<'n> Fn(&'n mut Node) -> bool + Send + Sync),
    ) -> Result<Option<Node>> {
        // Compare and swap on the stored document, as update_process does.
        for _ in 0..UPDATE_ATTEMPTS {
            let old: Option<String> = self.read(|c| {
                c.one(
                    "SELECT doc FROM nodes WHERE node_id = ?1",
                    params![node_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)
            })?;
            let Some(old) = old else { return Ok(None) };
            let mut n: Node = crate::codec::from_json(&old)?;
            if !change(&mut n) {
                return Ok(Some(n));
            }
            let (id, new) = (node_id.to_owned(), to_json(&n)?);
            let swapped = self
                .write(move |c| {
                    c.run(
                        "UPDATE nodes SET doc = ?2 WHERE node_id = ?1 AND doc = ?3",
                        params![id, new, old],
                    )
                    .map_err(backend)
                })
                .await?;
            if swapped == 1 {
                return Ok(Some(n));
            }
        }
        Err(StoreError::Conflict(format!(
            "node {node_id} kept changing; try again"
        )))
    }

    async fn put_fleet(&self, f: &Fleet) -> Result<()> {
        let f = f.to_owned();
        self.write(move |c| {
            c.run(
                "INSERT INTO fleets (org_id, fleet_id, name, doc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (org_id, fleet_id) DO UPDATE SET name = excluded.name, doc = excluded.doc",
                params![f.org_id, f.fleet_id, f.name, to_json(&f)?],
            )
            .map_err(|e| unique(e, || format!("a fleet named '{}' already exists", f.name)))?;
            Ok(())
        })
        .await
    }

    async fn fleets(&self, org_id: &str) -> Result<Vec<Fleet>> {
        self.read(|c| {
            docs(
                c,
                "SELECT doc FROM fleets WHERE org_id = ?1 ORDER BY name",
                params![org_id],
            )
        })
    }

    async fn insert_join_token(&self, t: &JoinToken, secret_hash: &str) -> Result<()> {
        let (t, secret_hash) = (t.to_owned(), secret_hash.to_owned());
        self.write(move |c| {
            c.run(
                "INSERT INTO join_tokens (token_id, secret_hash, doc) VALUES (?1, ?2, ?3)",
                params![t.token_id, secret_hash, to_json(&t)?],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn join_token_by_hash(&self, secret_hash: &str) -> Result<Option<JoinToken>> {
        self.read(|c| {
            doc(
                c,
                "SELECT doc FROM join_tokens WHERE secret_hash = ?1",
                params![secret_hash],
            )
        })
    }

    async fn node_usage(&self) -> Result<Vec<NodeUsage>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT p.node_id, COUNT(*), SUM(p.port_count),
                            COALESCE(SUM(json_extract(d.doc, '$.requestedCPU')), 0.0),
                            COALESCE(SUM(json_extract(d.doc, '$.requestedMemoryMB')), 0.0)
                     FROM processes p LEFT JOIN deployments d ON d.deployment_id = p.deployment_id
                     WHERE p.status IN ('starting', 'running', 'draining', 'stopping') GROUP BY p.node_id",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(NodeUsage {
                        node_id: r.get(0)?,
                        live_processes: r.get(1)?,
                        ports: r.get(2)?,
                        cpu: r.get(3)?,
                        memory_mb: r.get(4)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<_>>().map_err(backend)
        })
    }

    async fn process(&self, id: &str) -> Result<Option<Process>> {
        self.read(|c| load_process(c, id))
    }

    async fn processes(&self, q: &ProcessQuery) -> Result<Vec<Process>> {
        let (w, args) = process_where(q);
        let limit = q.limit.map(|l| format!(" LIMIT {l}")).unwrap_or_default();
        let order = if q.with_free_slot {
            "status != 'running', rooms_allocated DESC, created_at, seq"
        } else {
            "created_at DESC, seq DESC"
        };
        let sql = format!("SELECT {PROCESS_COLS} FROM processes{w} ORDER BY {order}{limit}");
        self.read(|c| {
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(params_from_iter(args), read_process)
                .map_err(backend)?;
            rows.map(|r| process_from(r.map_err(backend)?)).collect()
        })
    }

    async fn count_processes(&self, q: &ProcessQuery) -> Result<u64> {
        let (w, args) = process_where(q);
        self.read(|c| {
            c.one(
                &format!("SELECT COUNT(*) FROM processes{w}"),
                params_from_iter(args),
                |r| r.get(0),
            )
            .map_err(backend)
        })
    }

    async fn insert_process(&self, p: &Process, max_live_for_app: Option<u64>) -> Result<()> {
        let p = p.to_owned();
        self.write(move |c| {
            let p = &p;
            insert_process_row(c, p, max_live_for_app)?;
            Ok(())
        })
        .await
    }

    async fn update_process(
        &self,
        id: &str,
        change: &(dyn for<'p> Fn(&'p mut Process) -> bool + Send + Sync),
    ) -> Result<Option<Process>> {
        // The change is the caller's borrowed closure, so it runs here, not on the writer:
        // read, change, then write only if the row is still as read (compare and swap on the
        // stored document), again from the top if it moved in between.
        for _ in 0..UPDATE_ATTEMPTS {
            let Some((old_doc, old_status, allocated, busy)) = self.read(|c| {
                c.one(
                    &format!("SELECT {PROCESS_COLS} FROM processes WHERE process_id = ?1"),
                    params![id],
                    read_process,
                )
                .optional()
                .map_err(backend)
            })?
            else {
                return Ok(None);
            };
            let mut p = process_from((old_doc.clone(), old_status.clone(), allocated, busy))?;
            if p.status.is_terminal() || !change(&mut p) {
                return Ok(Some(p));
            }
            p.rooms_allocated = allocated;
            let (id, new_doc, new_status) = (id.to_owned(), to_json(&p)?, p.status.as_str());
            let busy = p.last_busy_at;
            let swapped = self
                .write(move |c| {
                    // Busy time only moves forward, whoever moved it since the read.
                    c.run(
                        "UPDATE processes SET status = ?2, doc = ?3, last_busy_at = MAX(last_busy_at, ?6)
                         WHERE process_id = ?1 AND doc = ?4 AND status = ?5",
                        params![id, new_status, new_doc, old_doc, old_status, busy],
                    )
                    .map_err(backend)
                })
                .await?;
            if swapped == 1 {
                return Ok(Some(p));
            }
        }
        Err(StoreError::Conflict(format!(
            "process {id} kept changing; try again"
        )))
    }

    async fn end_process(
        &self,
        id: &str,
        status: ProcessStatus,
        at: Millis,
        reason: &str,
    ) -> Result<Option<EndedProcess>> {
        let (id, reason) = (id.to_owned(), reason.to_owned());
        self.write(move |c| {
            let (id, reason) = (&id, &reason);
            let Some(mut p) = load_process(c, id)? else { return Ok(None) };
            if p.status.is_terminal() {
                return Ok(None);
            }
            let room_ids: Vec<String> = {
                let mut stmt = c
                    .prepare_cached("SELECT room_id FROM rooms WHERE process_id = ?1")
                    .map_err(backend)?;
                let rows = stmt.query_map(params![id], |r| r.get(0)).map_err(backend)?;
                rows.collect::<rusqlite::Result<_>>().map_err(backend)?
            };
            c.run(
                "UPDATE allocations SET unscheduled_at = ?2 WHERE process_id = ?1 AND unscheduled_at IS NULL",
                params![id, at],
            )
            .map_err(backend)?;
            c.run(
                "UPDATE rooms SET status = 'destroyed', process_id = NULL WHERE process_id = ?1",
                params![id],
            )
            .map_err(backend)?;
            p.summary_exit_reason = Some(crate::exit_summary(&p, reason));
            p.status = status;
            p.rooms_allocated = 0;
            p.terminated_at = Some(at);
            p.stopping_at.get_or_insert(at);
            write_process(c, &p)?;
                        Ok(Some(EndedProcess { process: p, destroyed_rooms: room_ids }))
        }).await
    }

    async fn room(&self, room_id: &str) -> Result<Option<Room>> {
        self.read(|c| load_room(c, room_id))
    }

    async fn rooms_of_process(&self, process_id: &str, active: bool) -> Result<Vec<Room>> {
        self.read(|c| {
            let sql = if active {
                "SELECT room_id FROM rooms WHERE process_id = ?1 ORDER BY rowid"
            } else {
                "SELECT DISTINCT a.room_id FROM allocations a
                 WHERE a.process_id = ?1 AND a.unscheduled_at IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM rooms r WHERE r.room_id = a.room_id AND r.process_id = ?1)
                 ORDER BY a.scheduled_at"
            };
            let ids: Vec<String> = {
                let mut stmt = c.prepare_cached(sql).map_err(backend)?;
                let rows = stmt.query_map(params![process_id], |r| r.get(0)).map_err(backend)?;
                rows.collect::<rusqlite::Result<_>>().map_err(backend)?
            };
            ids.iter().filter_map(|id| load_room(c, id).transpose()).collect()
        })
    }

    async fn place_room(&self, room: &Room, target: PlaceTarget) -> Result<()> {
        let room = room.clone();
        let alloc = room
            .allocations
            .last()
            .cloned()
            .ok_or_else(|| StoreError::Backend("room to place has no allocation".into()))?;
        self.write(move |c| {
            match &target {
                PlaceTarget::Existing(pid) => {
                    let n = c
                        .run(
                            "UPDATE processes SET rooms_allocated = rooms_allocated + 1,
                                    last_busy_at = ?2
                             WHERE process_id = ?1 AND rooms_allocated < rooms_per_process
                               AND status IN ('starting', 'running')",
                            params![pid, alloc.scheduled_at],
                        )
                        .map_err(backend)?;
                    if n == 0 {
                        return Err(StoreError::Conflict(format!("process {pid} has no free slot")));
                    }
                }
                PlaceTarget::New(p, max) => insert_process_row(c, p, *max)?,
            }
            let doc = to_json(&RoomDoc { room_config: room.room_config.clone(), created_at: room.created_at })?;
            let inserted = c.run(
                "INSERT INTO rooms (room_id, app_id, status, process_id, doc) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![room.room_id, room.app_id, room.status.as_str(), alloc.process_id, doc],
            );
            let mut fresh = true;
            match inserted {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    fresh = false;
                    // Resume: allowed only for a room of the same app with no current slot.
                    let n = c
                        .run(
                            "UPDATE rooms SET status = ?3, process_id = ?4 WHERE room_id = ?1 AND app_id = ?2
                             AND process_id IS NULL AND status = 'suspended'",
                            params![room.room_id, room.app_id, room.status.as_str(), alloc.process_id],
                        )
                        .map_err(backend)?;
                    if n == 0 {
                        return Err(StoreError::Duplicate(format!("room id '{}' is already taken", room.room_id)));
                    }
                }
                Err(e) => return Err(backend(e)),
            }
            let seq: i64 = if fresh {
                0
            } else {
                c.one("SELECT COUNT(*) FROM allocations WHERE room_id = ?1", params![room.room_id], |r| r.get(0))
                    .map_err(backend)?
            };
            c.run(
                "INSERT INTO allocations (room_allocation_id, room_id, process_id, scheduled_at, unscheduled_at, seq)
                 VALUES (?1, ?2, ?3, ?4, NULL, ?5)",
                params![alloc.room_allocation_id, room.room_id, alloc.process_id, alloc.scheduled_at, seq],
            )
            .map_err(backend)?;
            Ok(())
        }).await
    }

    async fn unallocate_room(
        &self,
        room_id: &str,
        status: RoomStatus,
        at: Millis,
    ) -> Result<Option<Room>> {
        let room_id = room_id.to_owned();
        self.write(move |c| {
            let room_id = &room_id;
            let row: Option<(String, Option<String>)> = c
                .one(
                    "SELECT status, process_id FROM rooms WHERE room_id = ?1",
                    params![room_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            let Some((current, pid)) = row else {
                return Ok(None);
            };
            if current == status.as_str() || current == RoomStatus::Destroyed.as_str() {
                return Ok(None);
            }
            if let Some(pid) = &pid {
                close_allocation(c, room_id, pid, at)?;
                c.run(
                    "UPDATE processes SET last_busy_at = ?2 WHERE process_id = ?1",
                    params![pid, at],
                )
                .map_err(backend)?;
            }
            c.run(
                "UPDATE rooms SET status = ?2, process_id = NULL WHERE room_id = ?1",
                params![room_id, status.as_str()],
            )
            .map_err(backend)?;
            let room = load_room(c, room_id)?;
            Ok(room)
        })
        .await
    }

    async fn update_room_config(&self, room_id: &str, config: &str) -> Result<bool> {
        let (room_id, config) = (room_id.to_owned(), config.to_owned());
        self.write(move |c| {
            let (room_id, config) = (&room_id, &config);
            let n = c
                .run(
                    "UPDATE rooms SET doc = json_set(doc, '$.roomConfig', ?2) WHERE room_id = ?1 AND status != 'destroyed'",
                    params![room_id, config],
                )
                .map_err(backend)?;
            Ok(n > 0)
        }).await
    }

    async fn reserve_lobby(
        &self,
        lobby: &Lobby,
        since: Millis,
        max: u32,
    ) -> Result<Option<Millis>> {
        let lobby = lobby.to_owned();
        self.write(move |c| {
            let lobby = &lobby;
            let (n, oldest): (u32, Option<Millis>) = c
                .one(
                    "SELECT COUNT(*), MIN(created_at) FROM lobbies WHERE app_id = ?1 AND created_by = ?2 AND created_at > ?3",
                    params![lobby.app_id, lobby.created_by, since],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(backend)?;
            if n >= max {
                return Ok(Some(oldest.unwrap_or(since)));
            }
            let taken: bool = c
                .one("SELECT EXISTS (SELECT 1 FROM rooms WHERE room_id = ?1 UNION SELECT 1 FROM lobbies WHERE room_id = ?1)", params![lobby.room_id], |r| r.get(0))
                .map_err(backend)?;
            if taken {
                return Err(StoreError::Duplicate(format!("room id '{}' is already taken", lobby.room_id)));
            }
            write_lobby(c, lobby)?;
                        Ok(None)
        }).await
    }

    async fn delete_lobby(&self, room_id: &str) -> Result<()> {
        let room_id = room_id.to_owned();
        self.write(move |c| {
            let room_id = &room_id;
            c.run("DELETE FROM lobbies WHERE room_id = ?1", params![room_id])
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn lobby(&self, room_id: &str) -> Result<Option<(Lobby, RoomStatus)>> {
        self.read(|c| Ok(lobbies_where(c, "WHERE l.room_id = ?1", params![room_id])?.pop()))
    }

    async fn lobby_by_short_code(
        &self,
        app_id: &str,
        code: &str,
    ) -> Result<Option<(Lobby, RoomStatus)>> {
        self.read(|c| {
            Ok(lobbies_where(
                c,
                "WHERE l.app_id = ?1 AND l.short_code = ?2 AND r.status != 'destroyed' ORDER BY l.created_at DESC, l.rowid DESC LIMIT 1",
                params![app_id, code],
            )?
            .pop())
        })
    }

    async fn lobbies(
        &self,
        app_id: &str,
        visibility: LobbyVisibility,
        region: Option<Region>,
    ) -> Result<Vec<Lobby>> {
        self.read(|c| {
            let rows = match region {
                Some(r) => lobbies_where(
                    c,
                    "WHERE l.app_id = ?1 AND l.visibility = ?2 AND l.region = ?3 AND r.status != 'destroyed' ORDER BY l.created_at DESC, l.rowid DESC",
                    params![app_id, visibility.as_str(), r.as_str()],
                )?,
                None => lobbies_where(
                    c,
                    "WHERE l.app_id = ?1 AND l.visibility = ?2 AND r.status != 'destroyed' ORDER BY l.created_at DESC, l.rowid DESC",
                    params![app_id, visibility.as_str()],
                )?,
            };
            Ok(rows.into_iter().map(|(l, _)| l).collect())
        })
    }

    async fn set_lobby_state(
        &self,
        room_id: &str,
        state: &serde_json::Value,
    ) -> Result<Option<Lobby>> {
        let (room_id, state) = (room_id.to_owned(), state.to_owned());
        self.write(move |c| {
            let (room_id, state) = (&room_id, &state);
            let Some((mut lobby, _)) =
                lobbies_where(c, "WHERE l.room_id = ?1", params![room_id])?.pop()
            else {
                return Ok(None);
            };
            lobby.state = Some(state.clone());
            write_lobby(c, &lobby)?;
            Ok(Some(lobby))
        })
        .await
    }

    async fn legacy_number(&self, scope: &str, kind: &str, id: &str) -> Result<i64> {
        let (scope, kind, id) = (scope.to_owned(), kind.to_owned(), id.to_owned());
        self.write(move |c| {
            let (scope, kind, id) = (&scope, &kind, &id);
            let found: Option<i64> = c
                .one(
                    "SELECT num FROM legacy_ids WHERE scope = ?1 AND kind = ?2 AND id = ?3",
                    params![scope, kind, id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            if let Some(n) = found {
                return Ok(n);
            }
            let n: i64 = c
                .one(
                    "SELECT COALESCE(MAX(num), 0) + 1 FROM legacy_ids WHERE scope = ?1 AND kind = ?2",
                    params![scope, kind],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            c.run(
                "INSERT INTO legacy_ids (scope, kind, num, id) VALUES (?1, ?2, ?3, ?4)",
                params![scope, kind, n, id],
            )
            .map_err(backend)?;
                        Ok(n)
        }).await
    }

    async fn legacy_id(&self, scope: &str, kind: &str, num: i64) -> Result<Option<String>> {
        self.read(|c| {
            c.one(
                "SELECT id FROM legacy_ids WHERE scope = ?1 AND kind = ?2 AND num = ?3",
                params![scope, kind, num],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
    }

    async fn legacy_entries(&self, scope: &str, kind: &str) -> Result<Vec<(i64, String)>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached("SELECT num, id FROM legacy_ids WHERE scope = ?1 AND kind = ?2 ORDER BY num DESC")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![scope, kind], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<_>>().map_err(backend)
        })
    }
}
