//! `lodge replicas`: the control-plane replicas sharing one store, and which of them runs the
//! singletons (an admin token of the instance's first org).

use serde_json::Value;

use super::api::Result;
use super::table::{s, Table};
use super::Ctx;

const HEAD: [&str; 5] = [
    "REPLICA ID",
    "ADDRESS",
    "STARTED",
    "LAST SEEN",
    "SINGLETONS",
];

fn row(r: &Value) -> Vec<String> {
    vec![
        s(&r["replicaId"]),
        s(&r["address"]),
        s(&r["startedAt"]),
        s(&r["seenAt"]),
        if r["runsSingletons"].as_bool() == Some(true) {
            "runs them".into()
        } else {
            String::new()
        },
    ]
}

pub async fn list(ctx: &Ctx) -> Result<()> {
    let v = ctx.api.get("/lodge/v1/replicas").await?;
    ctx.print(&v, |v| {
        Table::new(&HEAD).rows(v["replicas"].as_array().into_iter().flatten().map(row))
    });
    Ok(())
}
