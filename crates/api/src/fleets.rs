//! Hathora's FleetsV2 and NodesV1 over Lodge's nodes (see `lodge_control::fleets`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use lodge_model::{Fleet, Node, Region};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{invalid, ApiResult, AppState, Body, Dev, Path, QueryPairs};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fleets/v2/nodeShapes", get(node_shapes))
        .route("/fleets/v2/fleets", get(get_fleets).post(create_fleet))
        .route(
            "/fleets/v2/fleets/{fleetId}",
            get(get_fleet).post(update_fleet),
        )
        .route(
            "/fleets/v2/fleets/{fleetId}/regions/{region}",
            get(get_fleet_region),
        )
        .route(
            "/fleets/v2/fleets/{fleetId}/regions/{region}/v2",
            put(update_fleet_region),
        )
        .route("/fleets/v2/fleets/{fleetId}/metrics", get(fleet_metrics))
        .route(
            "/fleets/v2/fleets/{fleetId}/regions/{region}/metrics",
            get(fleet_region_metrics),
        )
        .route("/nodes/v1/{nodeId}", get(get_node))
        .route(
            "/nodes/v1/fleet/{fleetId}/listProvisioned",
            get(list_provisioned),
        )
}

fn fleet_json(f: &Fleet) -> Value {
    json!({
        "fleetId": f.fleet_id,
        "orgId": f.org_id,
        "name": f.name,
        "nodeShapeId": f.node_shape_id,
        "autoscalerConfig": { "scaleUpThreshold": f.scale_up_threshold },
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

fn region_of(s: &str) -> ApiResult<Region> {
    s.parse().map_err(invalid)
}

async fn node_shapes(Dev(c): Dev) -> ApiResult<Json<Value>> {
    c.require("fleets:read")?;
    let shapes: Vec<Value> = lodge_control::fleets::NODE_SHAPES
        .iter()
        .map(|(id, cpu, gb)| {
            let family = if gb / cpu >= 4 { "family-amd64-1-4" } else { "family-amd64-1-2" };
            json!({
                "nodeShapeId": id,
                "name": format!("{cpu} vCPU, {gb} GB"),
                "familyId": family,
                "familyName": if gb / cpu >= 4 { "amd64, 4 GB per vCPU" } else { "amd64, 2 GB per vCPU" },
                "minCPU": cpu,
                "minMemoryMB": gb * 1024,
                "minGPU": 0,
            })
        })
        .collect();
    Ok(Json(Value::Array(shapes)))
}

async fn get_fleets(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
) -> ApiResult<Json<Value>> {
    let fleets = s.control.fleets(&c, q.get("orgId")).await?;
    Ok(Json(
        json!({ "fleets": fleets.iter().map(fleet_json).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Autoscaler {
    scale_up_threshold: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateFleet {
    name: String,
    node_shape_id: String,
    autoscaler_config: Autoscaler,
}

async fn create_fleet(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
    Body(p): Body<CreateFleet>,
) -> ApiResult<Json<Value>> {
    let f = s
        .control
        .create_fleet(
            &c,
            q.get("orgId"),
            &p.name,
            &p.node_shape_id,
            p.autoscaler_config.scale_up_threshold,
        )
        .await?;
    // 200, as Hathora answers.
    Ok(Json(fleet_json(&f)))
}

async fn get_fleet(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(fleet_id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Value>> {
    Ok(Json(fleet_json(
        &s.control.fleet(&c, q.get("orgId"), &fleet_id).await?,
    )))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateFleet {
    autoscaler_config: Autoscaler,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    node_shape_id: Option<String>,
}

async fn update_fleet(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(fleet_id): Path<String>,
    q: QueryPairs,
    Body(p): Body<UpdateFleet>,
) -> ApiResult<Response> {
    s.control
        .update_fleet(
            &c,
            q.get("orgId"),
            &fleet_id,
            p.name.as_deref(),
            p.node_shape_id.as_deref(),
            p.autoscaler_config.scale_up_threshold,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_fleet_region(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((fleet_id, region)): Path<(String, String)>,
    q: QueryPairs,
) -> ApiResult<Json<Value>> {
    let region = region_of(&region)?;
    let fleet = s.control.fleet(&c, q.get("orgId"), &fleet_id).await?;
    Ok(Json(json!({
        "nodeBaseline": fleet.baselines.get(&region).copied().unwrap_or(0),
        "cloudMinVcpus": 0,
        "scaleIncrementVcpus": -1,
        "cloudMinVcpusUpdatedAt": lodge_model::clock::rfc3339(fleet.created_at),
    })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegionConfig {
    node_baseline: i64,
}

async fn update_fleet_region(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((fleet_id, region)): Path<(String, String)>,
    q: QueryPairs,
    Body(p): Body<RegionConfig>,
) -> ApiResult<Response> {
    let region = region_of(&region)?;
    s.control
        .update_fleet_region(&c, q.get("orgId"), &fleet_id, region, p.node_baseline)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

const METRICS: [&str; 5] = [
    "provisionedTotal",
    "provisionedBareMetal",
    "provisionedCloud",
    "utilized",
    "systemOverhead",
];

/// The asked-for metrics (all when none is named), each as one point now: Lodge keeps no
/// history of its fleets.
async fn metrics_of(
    s: &AppState,
    c: &lodge_control::Caller,
    fleet_id: &str,
    region: Option<Region>,
    q: &QueryPairs,
) -> ApiResult<Json<Value>> {
    let wanted: Vec<&str> = q
        .all("metrics")
        .flat_map(|m| m.split(','))
        .filter(|m| !m.is_empty())
        .collect();
    if let Some(bad) = wanted.iter().find(|m| !METRICS.contains(m)) {
        return Err(invalid(format!(
            "unknown metric '{bad}'; one of {}",
            METRICS.join(", ")
        )));
    }
    let f = s
        .control
        .fleet_figures(c, q.get("orgId"), fleet_id, region)
        .await?;
    let now = s.control.now() / 1000;
    let mut out = serde_json::Map::new();
    for m in METRICS {
        if !wanted.is_empty() && !wanted.contains(&m) {
            continue;
        }
        let v = match m {
            "provisionedTotal" | "provisionedBareMetal" => f.provisioned_cpu,
            "utilized" => f.utilized_cpu,
            _ => 0.0,
        };
        out.insert(m.into(), json!([{ "timestamp": now, "value": v }]));
    }
    Ok(Json(Value::Object(out)))
}

async fn fleet_metrics(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(fleet_id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Value>> {
    metrics_of(&s, &c, &fleet_id, None, &q).await
}

async fn fleet_region_metrics(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((fleet_id, region)): Path<(String, String)>,
    q: QueryPairs,
) -> ApiResult<Json<Value>> {
    let region = region_of(&region)?;
    metrics_of(&s, &c, &fleet_id, Some(region), &q).await
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
