//! `lodge nodes`: the fleet an operator runs (an admin token of the instance's first org).

use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};

use super::api::{enc, Result};
use super::table::{print_json, s, Table};
use super::Ctx;

#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// Every node: the embedded one and joined agents, with status and load.
    List,
    /// One node in full.
    Info { node_id: String },
    /// Take no new processes on a node; it becomes `stopped` when its last process ends.
    Drain { node_id: String },
    /// Let a drained node take processes again.
    Undrain { node_id: String },
    /// A token `lodge agent --join-token` joins a node with (printed once).
    JoinToken {
        /// Region of the nodes that join with it (Hathora's names: Frankfurt, Washington_DC, ...).
        #[arg(long)]
        region: String,
        /// Fleet the nodes join (the default fleet if absent).
        #[arg(long)]
        fleet: Option<String>,
        /// How long it may be used: `90s`, `30m`, `12h`, `7d`.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

/// `90`, `90s`, `30m`, `12h` or `7d`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration such as 90s, 30m, 12h or 7d"))?;
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("'{s}': the unit must be s, m, h or d")),
    };
    Duration::try_from_secs_f64(n * scale).map_err(|_| format!("'{s}' is out of range"))
}

fn row(n: &Value) -> Vec<String> {
    let regions = n["regions"].as_array().map_or_else(
        || "all".to_string(),
        |r| r.iter().map(s).collect::<Vec<_>>().join(","),
    );
    let state = if n["reachable"].as_bool() == Some(true) {
        s(&n["status"])
    } else {
        format!("{} (unreachable)", s(&n["status"]))
    };
    vec![
        s(&n["nodeId"]),
        s(&n["host"]),
        regions,
        state,
        s(&n["liveProcesses"]),
        format!("{}/{}", s(&n["portsInUse"]), s(&n["portCapacity"])),
        s(&n["lastHeardAt"]),
        s(&n["replicaId"]),
    ]
}

const HEAD: [&str; 8] = [
    "NODE ID",
    "HOST",
    "REGIONS",
    "STATUS",
    "PROCESSES",
    "PORTS",
    "LAST HEARD",
    "REPLICA",
];

pub async fn nodes(ctx: &Ctx, cmd: NodesCmd) -> Result<()> {
    let one = |v: Value| {
        ctx.print(&v, |v| Table::new(&HEAD).rows([row(v)]));
    };
    match cmd {
        NodesCmd::List => {
            let v = ctx.api.get("/lodge/v1/nodes").await?;
            ctx.print(&v, |v| {
                Table::new(&HEAD).rows(v["nodes"].as_array().into_iter().flatten().map(row))
            });
        }
        NodesCmd::Info { node_id } => {
            let v = ctx
                .api
                .get(&format!("/lodge/v1/nodes/{}", enc(&node_id)))
                .await?;
            if ctx.json {
                print_json(&v);
            } else {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
        }
        NodesCmd::Drain { node_id } => one(ctx
            .api
            .post_empty(&format!("/lodge/v1/nodes/{}/drain", enc(&node_id)))
            .await?),
        NodesCmd::Undrain { node_id } => one(ctx
            .api
            .post_empty(&format!("/lodge/v1/nodes/{}/undrain", enc(&node_id)))
            .await?),
        NodesCmd::JoinToken { region, fleet, ttl } => {
            let v = ctx
                .api
                .post(
                    "/lodge/v1/nodes/join-tokens",
                    json!({ "region": region, "fleetId": fleet, "ttlSeconds": ttl.as_secs_f64() }),
                )
                .await?;
            if ctx.json {
                print_json(&v);
            } else {
                eprintln!(
                    "join token for region {} (expires {}); shown only now:",
                    s(&v["region"]),
                    s(&v["expiresAt"])
                );
                println!("{}", s(&v["token"]));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        use super::parse_duration as p;
        assert_eq!(p("90").unwrap().as_secs(), 90);
        assert_eq!(p("30m").unwrap().as_secs(), 1800);
        assert_eq!(p("12h").unwrap().as_secs(), 43200);
        assert_eq!(p("7d").unwrap().as_secs(), 604800);
        assert!(p("5 weeks").is_err());
        assert!(p("h").is_err());
    }
}
