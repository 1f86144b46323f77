//! `lodge migrate`: move a one-box Lodge's state from its embedded store into PostgreSQL, so a
//! game that started on a laptop continues on the replicated setup without losing anything.

use std::path::Path;

use crate::serve::DataDirLock;

pub async fn run(from: &Path, to: &str) -> Result<(), String> {
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        return Err(format!("--to {to}: expected a postgres:// URL"));
    }
    // A Lodge serving from the data dir would keep writing after the copy: refuse.
    let _lock = DataDirLock::acquire(from)?;
    let db = from.join("lodge.db");
    if !db.is_file() {
        return Err(format!(
            "{} has no embedded store (lodge.db); is it a Lodge data dir?",
            from.display()
        ));
    }
    let report = lodge_store::sqlite_into_postgres(&db, to)
        .await
        .map_err(|e| e.to_string())?;
    for (table, n) in &report {
        println!("{table:<12} {n}");
    }
    // Every replica on the database must be able to serve the builds to nodes: their
    // artifacts go into it too.
    let store = lodge_store::PostgresStore::connect(to)
        .await
        .map_err(|e| e.to_string())?;
    let control = lodge_control::Control::new(
        std::sync::Arc::new(store),
        std::sync::Arc::new(lodge_model::SystemClock),
        lodge_control::ControlConfig::new(from.to_path_buf()),
    );
    let shared = control
        .share_all_builds()
        .await
        .map_err(|e| format!("cannot copy the builds' artifacts into PostgreSQL: {e}"))?;
    println!("{:<12} {shared}", "artifacts");
    println!(
        "copied into PostgreSQL. Logs of ended processes stay in {}: start with\n  lodge serve --data-dir {} --store {}",
        from.display(),
        from.display(),
        to
    );
    Ok(())
}
