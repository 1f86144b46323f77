//! PostgreSQL for the benchmarks: a schema of the run's own on the operator's database, and
//! the database's own single-row INSERT rate (pgbench) as the baseline a store on it is held to.

use std::time::Duration;

use super::{Result, Table};

/// A schema created for one benchmark run.
pub struct Schema {
    admin_url: String,
    pub name: String,
}

async fn admin(url: &str, sql: &str) -> Result<()> {
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, conn) = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| format!("PostgreSQL at {url} did not answer in 10 s"))?
        .map_err(|e| format!("PostgreSQL at {url}: {e}"))?;
    let task = tokio::spawn(conn);
    let out = client
        .batch_execute(sql)
        .await
        .map_err(|e| format!("PostgreSQL at {url}: {e}"));
    drop(client);
    let _ = task.await;
    out
}

impl Schema {
    /// A new schema, `tag` telling apart the schemas of one run.
    pub async fn create(url: &str, tag: &str) -> Result<Schema> {
        let name = format!("lodge_bench_{}_{tag}", std::process::id());
        admin(
            url,
            &format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name};
                 CREATE TABLE {name}.pgbench_insert (id BIGSERIAL PRIMARY KEY, at TIMESTAMPTZ NOT NULL DEFAULT now(), payload TEXT NOT NULL);"
            ),
        )
        .await?;
        Ok(Schema {
            admin_url: url.to_string(),
            name,
        })
    }

    /// The `--store` URL whose connections work in this schema.
    pub fn url(&self) -> String {
        let sep = if self.admin_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}options=-csearch_path%3D{}",
            self.admin_url, self.name
        )
    }

    pub async fn drop(self) {
        if let Err(e) = admin(
            &self.admin_url,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        )
        .await
        {
            eprintln!("warning: could not drop schema {}: {e}", self.name);
        }
    }
}

fn pgbench() -> Option<std::path::PathBuf> {
    if let Ok(p) = which("pgbench") {
        return Some(p);
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|d| d.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

fn which(cmd: &str) -> std::result::Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .ok_or(())
}

/// pgbench with 1 and 8 clients, each transaction one durable single-row INSERT (what one
/// CreateRoom costs at least), for `secs` seconds.
pub async fn pgbench_insert_tps(url: &str, schema: &str, secs: u32) -> Result<Table> {
    let bin = pgbench()
        .ok_or("pgbench not found (Debian: postgresql-15's /usr/lib/postgresql/15/bin/pgbench)")?;
    let script =
        std::env::temp_dir().join(format!("lodge-bench-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        format!("INSERT INTO {schema}.pgbench_insert (payload) VALUES ('room');\n"),
    )
    .map_err(|e| e.to_string())?;
    let mut t = Table::new(
        "Baseline: PostgreSQL single-row INSERT, durable commit (pgbench, same database, same run)",
        &["clients", "transactions/s"],
    );
    for clients in [1u32, 8] {
        let out = tokio::process::Command::new(&bin)
            .args(["-n", "-f"])
            .arg(&script)
            .args([
                "-c",
                &clients.to_string(),
                "-j",
                "2",
                "-T",
                &secs.to_string(),
            ])
            .arg(url)
            .output()
            .await
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let tps = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("tps = "))
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or_else(|| {
                format!(
                    "pgbench gave no rate: {}{}",
                    text,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        t.row(vec![
            clients.to_string(),
            tps.split('.').next().unwrap_or(tps).to_string(),
        ]);
    }
    let _ = std::fs::remove_file(&script);
    Ok(t)
}
