//! Moving up: copy an embedded store's database into an empty PostgreSQL one, table by table,
//! in one transaction (all of it lands, or none). Rows keep their order, so everything listed
//! "in creation order" or "newest first" lists the same afterwards.

use std::path::Path;

use rusqlite::types::Value as SqlValue;
use tokio_postgres::types::ToSql;

use crate::postgres::{pg, PostgresStore};
use crate::{Result, StoreError};

/// How one column moves: SQLite keeps booleans as integers.
#[derive(Clone, Copy)]
enum Col {
    Text,
    OptText,
    Int,
    OptInt,
    Int32,
    Bool,
}

struct Table {
    name: &'static str,
    order: &'static str,
    /// PostgreSQL column, the SQLite expression it is read from, and how it converts.
    cols: &'static [(&'static str, &'static str, Col)],
}

use Col::*;

const TABLES: &[Table] = &[
    Table {
        name: "orgs",
        order: "rowid",
        cols: &[("org_id", "org_id", Text), ("doc", "doc", Text)],
    },
    Table {
        name: "tokens",
        order: "rowid",
        cols: &[
            ("org_token_id", "org_token_id", Text),
            ("org_id", "org_id", Text),
            ("name", "name", Text),
            ("active", "active", Bool),
            ("secret_hash", "secret_hash", Text),
            ("doc", "doc", Text),
        ],
    },
    Table {
        name: "apps",
        order: "rowid",
        cols: &[
            ("app_id", "app_id", Text),
            ("org_id", "org_id", Text),
            ("app_name", "app_name", Text),
            ("deleted", "deleted", Bool),
            ("doc", "doc", Text),
        ],
    },
    Table {
        name: "builds",
        order: "rowid",
        cols: &[
            ("build_id", "build_id", Text),
            ("org_id", "org_id", Text),
            ("created_at", "created_at", Int),
            ("status", "json_extract(doc, '$.status')", Text),
            ("doc", "doc", Text),
        ],
    },
    Table {
        name: "deployments",
        order: "seq",
        cols: &[
            ("deployment_id", "deployment_id", Text),
            ("app_id", "app_id", Text),
            ("doc", "doc", Text),
        ],
    },
    Table {
        name: "nodes",
        order: "rowid",
        cols: &[("node_id", "node_id", Text), ("doc", "doc", Text)],
    },
    Table {
        name: "fleets",
        order: "rowid",
        cols: &[
            ("org_id", "org_id", Text),
            ("fleet_id", "fleet_id", Text),
            ("name", "name", Text),
            ("doc", "doc", Text),
        ],
    },
    Table {
        name: "join_tokens",
        order: "rowid",
        cols: &[
            ("token_id", "token_id", Text),
            ("secret_hash", "secret_hash", Text),
            ("doc", "doc", Text),
        ],
    },
    Table {
        name: "processes",
        order: "seq",
        cols: &[
            ("process_id", "process_id", Text),
            ("app_id", "app_id", Text),
            ("deployment_id", "deployment_id", Text),
            ("node_id", "node_id", Text),
            ("region", "region", Text),
            ("status", "status", Text),
            ("rooms_per_process", "rooms_per_process", Int32),
            ("rooms_allocated", "rooms_allocated", Int32),
            ("created_at", "created_at", Int),
            ("port_count", "port_count", Int32),
            ("doc", "doc", Text),
            ("last_busy_at", "last_busy_at", Int),
        ],
    },
    Table {
        name: "rooms",
        order: "rowid",
        cols: &[
            ("room_id", "room_id", Text),
            ("app_id", "app_id", Text),
            ("status", "status", Text),
            ("process_id", "process_id", OptText),
            ("doc", "doc", Text),
        ],
    },
    Table {
        name: "allocations",
        order: "rowid",
        cols: &[
            ("room_allocation_id", "room_allocation_id", Text),
            ("room_id", "room_id", Text),
            ("process_id", "process_id", Text),
            ("scheduled_at", "scheduled_at", Int),
            ("unscheduled_at", "unscheduled_at", OptInt),
            ("seq", "seq", Int32),
        ],
    },
    Table {
        name: "lobbies",
        order: "rowid",
        cols: &[
            ("room_id", "room_id", Text),
            ("app_id", "app_id", Text),
            ("short_code", "short_code", OptText),
            ("visibility", "visibility", Text),
            ("region", "region", Text),
            ("created_by", "created_by", Text),
            ("created_at", "created_at", Int),
            ("doc", "doc", Text),
        ],
    },
    Table {
        name: "legacy_ids",
        order: "rowid",
        cols: &[
            ("scope", "scope", Text),
            ("kind", "kind", Text),
            ("num", "num", Int),
            ("id", "id", Text),
        ],
    },
];

fn sqlite_err(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(format!("reading the embedded store: {e}"))
}

fn bad(table: &str, col: &str, v: &SqlValue) -> StoreError {
    StoreError::Backend(format!("{table}.{col}: unexpected value {v:?}"))
}

/// One SQLite value as the PostgreSQL parameter its column takes.
fn convert(table: &str, col: &str, kind: Col, v: SqlValue) -> Result<Box<dyn ToSql + Sync + Send>> {
    Ok(match (kind, v) {
        (Text, SqlValue::Text(s)) => Box::new(s),
        (OptText, SqlValue::Text(s)) => Box::new(Some(s)),
        (OptText, SqlValue::Null) => Box::new(None::<String>),
        (Int, SqlValue::Integer(i)) => Box::new(i),
        (OptInt, SqlValue::Integer(i)) => Box::new(Some(i)),
        (OptInt, SqlValue::Null) => Box::new(None::<i64>),
        (Int32, SqlValue::Integer(i)) => {
            Box::new(i32::try_from(i).map_err(|_| bad(table, col, &SqlValue::Integer(i)))?)
        }
        (Bool, SqlValue::Integer(i)) => Box::new(i != 0),
        (_, v) => return Err(bad(table, col, &v)),
    })
}

/// Rows copied per table.
pub type CopyReport = Vec<(&'static str, u64)>;

/// Copy the SQLite database at `sqlite` into the PostgreSQL database at `url` (migrated to the
/// current schema first). Refuses a database that already holds anything.
pub async fn sqlite_into_postgres(sqlite: &Path, url: &str) -> Result<CopyReport> {
    if !sqlite.is_file() {
        return Err(StoreError::Backend(format!(
            "{} does not exist",
            sqlite.display()
        )));
    }
    // Opening through the store brings an older file up to the current schema first.
    drop(crate::SqliteStore::open(sqlite)?);
    let src =
        rusqlite::Connection::open_with_flags(sqlite, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(sqlite_err)?;
    let target = PostgresStore::connect(url).await?;
    let mut client = target.pool_client().await?;
    let tx = client.transaction().await.map_err(pg)?;
    for t in TABLES {
        let n: i64 = tx
            .query_one(&format!("SELECT COUNT(*) FROM {}", t.name), &[])
            .await
            .map_err(pg)?
            .get(0);
        if n > 0 {
            return Err(StoreError::Conflict(format!(
                "the PostgreSQL database is not empty ({} has {n} rows); copy into a new database",
                t.name
            )));
        }
    }
    let mut report = Vec::new();
    for t in TABLES {
        let names: Vec<&str> = t.cols.iter().map(|(n, ..)| *n).collect();
        let sources: Vec<&str> = t.cols.iter().map(|(_, src, _)| *src).collect();
        let marks: Vec<String> = (1..=t.cols.len()).map(|i| format!("${i}")).collect();
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {} ({}) VALUES ({})",
                t.name,
                names.join(", "),
                marks.join(", ")
            ))
            .await
            .map_err(pg)?;
        let mut stmt = src
            .prepare(&format!(
                "SELECT {} FROM {} ORDER BY {}",
                sources.join(", "),
                t.name,
                t.order
            ))
            .map_err(sqlite_err)?;
        let mut rows = stmt.query([]).map_err(sqlite_err)?;
        let mut copied = 0u64;
        while let Some(row) = rows.next().map_err(sqlite_err)? {
            let mut args = Vec::with_capacity(t.cols.len());
            for (i, (col, _, kind)) in t.cols.iter().enumerate() {
                let v: SqlValue = row.get(i).map_err(sqlite_err)?;
                args.push(convert(t.name, col, *kind, v)?);
            }
            let refs: Vec<&(dyn ToSql + Sync)> = args
                .iter()
                .map(|a| a.as_ref() as &(dyn ToSql + Sync))
                .collect();
            tx.execute(&insert, &refs).await.map_err(pg)?;
            copied += 1;
        }
        report.push((t.name, copied));
    }
    tx.commit().await.map_err(pg)?;
    Ok(report)
}
