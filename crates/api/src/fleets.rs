//! Hathora's FleetsV2 (read) and NodesV1 over Lodge's nodes. Nodes are the operator's and
//! serve every org, so each org sees the same fleets: the default one (`defaultFleetId` of
//! GetOrgs) and any fleet a node joined (`lodge nodes join-token --fleet`).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use lodge_model::{Node, Region};
use serde_json::{json, Value};

use crate::{ApiResult, AppState, Dev, Path, QueryPairs};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fleets/v2/fleets", get(get_fleets))
        .route("/fleets/v2/fleets/{fleetId}", get(get_fleet))
        .route(
            "/fleets/v2/fleets/{fleetId}/regions/{region}",
            get(get_fleet_region),
        )
        .route("/nodes/v1/{nodeId}", get(get_node))
        .route(
            "/nodes/v1/fleet/{fleetId}/listProvisioned",
            get(list_provisioned),
        )
}

fn fleet_json(org_id: &str, fleet_id: &str) -> Value {
    json!({
        "fleetId": fleet_id,
        "orgId": org_id,
        "name": fleet_id,
        // Self-hosted machines have no shape; the smallest is named.
        "nodeShapeId": "shape-amd64-4-8",
        "autoscalerConfig": { "scaleUpThreshold": 100 },
    })
}

/// NodeV1. A node that serves every region (the embedded one of `lodge serve` by default)
/// reports the first region of Hathora's list.
fn node_v1(n: &Node) -> Value {
    let rfc = lodge_model::clock::rfc3339;
    let region = n
        .regions
        .as_ref()
        .and_then(|r| r.first().copied())
        .unwrap_or(Region::ALL[0]);
    json!({
        "nodeId": n.node_id,
        "host": n.public_host,
        "hosting": "metal",
        "status": n.status.as_str(),
        "region": region,
        "cpu": n.cpu,
        "memoryMb": n.memory_mb,
        "gpu": null,
        "startedAt": rfc(n.started_at),
        "stoppedAt": n.stopped_at.map(rfc),
    })
}

async fn get_fleets(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
) -> ApiResult<Json<Value>> {
    let ids = s.control.fleet_ids(&c, q.get("orgId")).await?;
    Ok(Json(json!({
        "fleets": ids.iter().map(|f| fleet_json(&c.org_id, f)).collect::<Vec<_>>()
    })))
}

async fn get_fleet(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(fleet_id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Value>> {
    let ids = s.control.fleet_ids(&c, q.get("orgId")).await?;
    if !ids.contains(&fleet_id) {
        return Err(lodge_control::Error::NotFound(format!("Fleet not found: {fleet_id}")).into());
    }
    Ok(Json(fleet_json(&c.org_id, &fleet_id)))
}

async fn get_fleet_region(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((fleet_id, region)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let region: Region = region.parse().map_err(crate::invalid)?;
    let nodes = s.control.fleet_nodes(&c, &fleet_id, Some(region)).await?;
    // Nodes are machines an operator runs: the baseline is what runs now.
    Ok(Json(json!({
        "nodeBaseline": nodes.len(),
        "cloudMinVcpus": 0,
        "scaleIncrementVcpus": -1,
        "cloudMinVcpusUpdatedAt": lodge_model::clock::rfc3339(0),
    })))
}

async fn get_node(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(node_id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(node_v1(&s.control.fleet_node(&c, &node_id).await?)))
}

async fn list_provisioned(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(fleet_id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Value>> {
    let region: Option<Region> = q.parse_opt("region")?;
    let nodes = s.control.fleet_nodes(&c, &fleet_id, region).await?;
    Ok(Json(Value::Array(nodes.iter().map(node_v1).collect())))
}
