//! Route table and handlers, grouped by Hathora API family.

use std::sync::atomic::Ordering;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use lodge_control::{DeploymentFilter, UploadTarget};
use lodge_model::wire::{self, DeploymentV3, PatchAppConfig};
use lodge_model::{ProcessStatus, Region};
use serde_json::json;

use crate::{base_url, invalid, is_ready, logs, ApiResult, AppState, Body, Dev, Path, QueryPairs};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/orgs/v1", get(get_orgs))
        .route("/tokens/v1/orgs/{org_id}", get(list_tokens))
        .route("/tokens/v1/orgs/{org_id}/create", post(create_token))
        .route(
            "/tokens/v1/orgs/{org_id}/tokens/{token_id}/revoke",
            post(revoke_token),
        )
        .route("/apps/v2/apps", get(get_apps).post(create_app))
        .route(
            "/apps/v2/apps/{app_id}",
            get(get_app)
                .post(update_app)
                .patch(patch_app)
                .delete(delete_app),
        )
        .route("/builds/v3/builds", get(get_builds).post(create_build))
        .route(
            "/builds/v3/builds/{build_id}",
            get(get_build).delete(delete_build),
        )
        .route("/builds/v3/builds/registry", post(create_build_registry))
        .route("/builds/v3/builds/{build_id}/run", post(run_build))
        .route(
            "/builds/v3/builds/{build_id}/runRegistry",
            post(run_build_registry),
        )
        .route(
            "/uploads/{build_id}/parts/{part}",
            put(put_part).layer(DefaultBodyLimit::disable()),
        )
        .route("/uploads/{build_id}/complete", post(complete_upload))
        .route(
            "/deployments/v3/apps/{app_id}/deployments",
            get(get_deployments).post(create_deployment),
        )
        .route(
            "/deployments/v3/apps/{app_id}/deployments/latest",
            get(latest_deployment),
        )
        .route(
            "/deployments/v3/apps/{app_id}/deployments/{deployment_id}",
            get(get_deployment),
        )
        .route(
            "/processes/v3/apps/{app_id}/processes/latest",
            get(latest_processes),
        )
        .route(
            "/processes/v3/apps/{app_id}/processes/count",
            get(count_processes),
        )
        .route(
            "/processes/v3/apps/{app_id}/processes/regions/{region}",
            post(create_process),
        )
        .route(
            "/processes/v3/apps/{app_id}/processes/{process_id}",
            get(get_process),
        )
        .route(
            "/processes/v3/apps/{app_id}/processes/{process_id}/stop",
            post(stop_process),
        )
        .route(
            "/processes/v3/apps/{app_id}/processes/process/{process_id}/metrics",
            get(process_metrics),
        )
        .route(
            "/metrics/v1/{app_id}/process/{process_id}",
            get(process_metrics_v1),
        )
        .route("/rooms/v2/{app_id}/create", post(create_room))
        .route("/rooms/v2/{app_id}/info/{room_id}", get(get_room))
        .route(
            "/rooms/v2/{app_id}/list/{process_id}/active",
            get(active_rooms),
        )
        .route(
            "/rooms/v2/{app_id}/list/{process_id}/inactive",
            get(inactive_rooms),
        )
        .route("/rooms/v2/{app_id}/destroy/{room_id}", post(destroy_room))
        .route("/rooms/v2/{app_id}/suspend/{room_id}", post(suspend_room))
        .route("/rooms/v2/{app_id}/resume/{room_id}", post(resume_room))
        .route(
            "/rooms/v2/{app_id}/connectioninfo/{room_id}",
            get(connection_info),
        )
        .route(
            "/rooms/v2/{app_id}/update/{room_id}",
            post(update_room_config),
        )
        .route("/logs/v1/{app_id}/process/{process_id}", get(logs::tail))
        .route(
            "/logs/v1/{app_id}/process/{process_id}/download",
            get(logs::download),
        )
        .route("/discovery/v2/ping", get(ping_endpoints))
        .route("/discovery/v1/ping", get(ping_endpoints))
        .route("/discovery/v1/ping/", get(ping_endpoints))
        .route("/discovery/v2/ping/", get(ping_endpoints))
}

fn created<T: serde::Serialize>(v: T) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

/// The OpenAPI document of every route served here (kept in step by a test).
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    if is_ready(&s) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

/// `/metrics` on the API address: instance-wide, so only for an instance admin's token
/// (Prometheus sends it with `authorization: {credentials: ...}`). `--metrics-addr` serves the
/// same without a token on an address of the operator's choosing.
async fn metrics(State(s): State<AppState>, Dev(c): Dev) -> ApiResult<Response> {
    if !c.instance_admin {
        return Err(crate::ApiFailure(
            StatusCode::UNAUTHORIZED,
            "/metrics needs an admin token of the instance's first org".into(),
            None,
        ));
    }
    metrics_text(State(s)).await
}

pub(crate) async fn metrics_text(State(s): State<AppState>) -> ApiResult<Response> {
    use std::fmt::Write;
    let m = s.control.metrics();
    let mut out = String::new();
    let counters = [
        (
            "lodge_rooms_created_total",
            "Rooms created.",
            &m.rooms_created,
        ),
        (
            "lodge_rooms_destroyed_total",
            "Rooms destroyed (by request or with their process).",
            &m.rooms_destroyed,
        ),
        (
            "lodge_processes_started_total",
            "Processes requested.",
            &m.processes_started,
        ),
        (
            "lodge_processes_ended_total",
            "Processes that stopped or failed.",
            &m.processes_ended,
        ),
        (
            "lodge_placement_retries_total",
            "Room placements retried after losing a race for a slot.",
            &m.placement_retries,
        ),
        (
            "lodge_artifact_downloads_total",
            "Build artifacts served to joined nodes (whole or resumed).",
            &m.artifact_downloads,
        ),
        (
            "lodge_artifact_bytes_total",
            "Bytes of build artifacts served to joined nodes.",
            &m.artifact_bytes,
        ),
    ];
    for (name, help, c) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP lodge_processes Processes by status.\n# TYPE lodge_processes gauge"
    );
    for status in ProcessStatus::ALL {
        let q = lodge_store::ProcessQuery {
            statuses: vec![*status],
            ..Default::default()
        };
        let n = s
            .control
            .store()
            .count_processes(&q)
            .await
            .map_err(lodge_control::Error::from)?;
        let _ = writeln!(out, "lodge_processes{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP lodge_process_active_connections Open TCP connections and live UDP sessions per process.\n# TYPE lodge_process_active_connections gauge"
    );
    let q = lodge_store::ProcessQuery {
        statuses: vec![ProcessStatus::Running],
        ..Default::default()
    };
    let running = s
        .control
        .store()
        .processes(&q)
        .await
        .map_err(lodge_control::Error::from)?;
    let mut bytes = String::new();
    for p in &running {
        if let Some(st) = s
            .control
            .agents()
            .iter()
            .find_map(|a| a.stats(&p.process_id))
        {
            let _ = writeln!(
                out,
                "lodge_process_active_connections{{process_id=\"{}\"}} {}",
                p.process_id, st.active_connections
            );
            let _ = writeln!(
                bytes,
                "lodge_process_bytes_total{{process_id=\"{}\",direction=\"in\"}} {}",
                p.process_id, st.bytes_in
            );
            let _ = writeln!(
                bytes,
                "lodge_process_bytes_total{{process_id=\"{}\",direction=\"out\"}} {}",
                p.process_id, st.bytes_out
            );
        }
    }
    let _ = writeln!(out, "# HELP lodge_process_bytes_total Bytes between players and each process (kernel-forwarded or proxied).\n# TYPE lodge_process_bytes_total counter\n{bytes}");
    let _ = writeln!(
        out,
        "# HELP lodge_player_flows Players' UDP sessions and TCP connections on the node's public ports.\n# TYPE lodge_player_flows gauge\n\
         # HELP lodge_player_flows_max The node's cap on them (descriptor limit less the API's reserve).\n# TYPE lodge_player_flows_max gauge\n\
         # HELP lodge_player_flows_refused_total Flows refused at the node's or a source's cap.\n# TYPE lodge_player_flows_refused_total counter\n\
         # HELP lodge_node_kernel_forwarding 1 when the kernel (nftables) forwards the node's public ports, 0 when Lodge's userspace proxy does.\n# TYPE lodge_node_kernel_forwarding gauge\n\
         # HELP lodge_player_packets_rate_limited_total Packets the kernel dropped at the per-source packet-rate limit.\n# TYPE lodge_player_packets_rate_limited_total counter"
    );
    for agent in s.control.agents() {
        let flows = agent.flows();
        let node = agent.node_id();
        let _ = writeln!(
            out,
            "lodge_player_flows{{node=\"{node}\"}} {}\nlodge_player_flows_max{{node=\"{node}\"}} {}\nlodge_player_flows_refused_total{{node=\"{node}\"}} {}\n\
             lodge_node_kernel_forwarding{{node=\"{node}\"}} {}\nlodge_player_packets_rate_limited_total{{node=\"{node}\"}} {}",
            flows.active,
            flows.max,
            flows.refused,
            u8::from(flows.kernel_forwarding),
            flows.rate_limited
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// One entry per region that has a live node, on one of its nodes.
async fn ping_endpoints(State(s): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let list: Vec<_> = s
        .control
        .ping_endpoints()
        .await?
        .into_iter()
        .map(|(r, host, port)| json!({"region": r, "host": host, "port": port.unwrap_or(s.ping_port)}))
        .collect();
    Ok(Json(json!(list)))
}

// --- orgs and tokens -------------------------------------------------------------------------

async fn get_orgs(State(s): State<AppState>, Dev(c): Dev) -> ApiResult<Json<wire::OrgsPage>> {
    Ok(Json(s.control.get_orgs(&c).await?))
}

async fn list_tokens(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(org): Path<String>,
) -> ApiResult<Json<wire::ListOrgTokens>> {
    Ok(Json(s.control.list_tokens(&c, &org).await?))
}

async fn create_token(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(org): Path<String>,
    Body(p): Body<wire::CreateOrgTokenParams>,
) -> ApiResult<Response> {
    Ok(created(s.control.create_token(&c, &org, p).await?))
}

async fn revoke_token(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((org, id)): Path<(String, String)>,
) -> ApiResult<Json<bool>> {
    Ok(Json(s.control.revoke_token(&c, &org, &id).await?))
}

// --- apps ------------------------------------------------------------------------------------

async fn get_apps(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
) -> ApiResult<Json<wire::ApplicationsPage>> {
    Ok(Json(s.control.get_apps(&c, q.get("orgId")).await?))
}

async fn create_app(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
    Body(p): Body<wire::CreateAppConfig>,
) -> ApiResult<Response> {
    Ok(created(s.control.create_app(&c, q.get("orgId"), p).await?))
}

async fn get_app(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
) -> ApiResult<Json<wire::ApplicationOut>> {
    Ok(Json(s.control.get_app(&c, &app).await?))
}

async fn update_app(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    Body(p): Body<PatchAppConfig>,
) -> ApiResult<Json<wire::ApplicationOut>> {
    Ok(Json(s.control.update_app(&c, &app, p, true).await?))
}

async fn patch_app(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    Body(p): Body<PatchAppConfig>,
) -> ApiResult<Json<wire::ApplicationOut>> {
    Ok(Json(s.control.update_app(&c, &app, p, false).await?))
}

async fn delete_app(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
) -> ApiResult<StatusCode> {
    s.control.delete_app(&c, &app).await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- builds ----------------------------------------------------------------------------------

async fn get_builds(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
) -> ApiResult<Json<wire::BuildsV3Page>> {
    Ok(Json(s.control.get_builds(&c, q.get("orgId")).await?))
}

async fn create_build(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
    headers: HeaderMap,
    Body(p): Body<wire::CreateMultipartBuildParams>,
) -> ApiResult<Response> {
    let base = base_url(&headers);
    Ok(created(
        s.control
            .create_build(&c, q.get("orgId"), p, UploadTarget { base_url: &base })
            .await?,
    ))
}

async fn get_build(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
    Path(b): Path<String>,
) -> ApiResult<Json<wire::BuildV3>> {
    Ok(Json(s.control.get_build(&c, q.get("orgId"), &b).await?))
}

async fn delete_build(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
    Path(b): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    s.control.delete_build(&c, q.get("orgId"), &b).await?;
    Ok(Json(json!({})))
}

async fn run_build(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
    Path(b): Path<String>,
) -> ApiResult<Response> {
    let rx = s.control.run_build(&c, q.get("orgId"), &b).await?;
    Ok(log_stream(rx))
}

async fn create_build_registry(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
    crate::OptBody(p): crate::OptBody<wire::CreateBuildV3Params>,
) -> ApiResult<Response> {
    let p = p.unwrap_or(wire::CreateBuildV3Params {
        build_id: None,
        build_tag: None,
    });
    Ok(created(
        s.control
            .create_build_registry(&c, q.get("orgId"), p)
            .await?,
    ))
}

async fn run_build_registry(
    State(s): State<AppState>,
    Dev(c): Dev,
    q: QueryPairs,
    Path(b): Path<String>,
    Body(cfg): Body<wire::RegistryConfig>,
) -> ApiResult<Response> {
    let rx = s
        .control
        .run_build_registry(&c, q.get("orgId"), &b, cfg)
        .await?;
    Ok(log_stream(rx))
}

/// A build log as the streamed `application/octet-stream` body RunBuild answers with.
fn log_stream(rx: lodge_control::BuildLog) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let stream = futures_util::StreamExt::map(stream, |line| {
        Ok::<_, std::io::Error>(bytes::Bytes::from(line))
    });
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

async fn put_part(
    State(s): State<AppState>,
    Path((b, part)): Path<(String, String)>,
    q: QueryPairs,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let part: u32 = part
        .parse()
        .map_err(|_| invalid(format!("invalid part number '{part}'")))?;
    let signature = q.get("signature").unwrap_or("");
    // Authenticate before reading, and never read more than a part may hold.
    let limit = s.control.part_limit(&b, part, signature).await?;
    let body = axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .await
        .map_err(|_| {
            crate::ApiFailure(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a part may hold at most {limit} bytes"),
                None,
            )
        })?;
    let etag = s
        .control
        .put_part(&b, part, q.get("signature").unwrap_or(""), &body)
        .await?;
    Ok((StatusCode::OK, [(header::ETAG, etag)]).into_response())
}

async fn complete_upload(
    State(s): State<AppState>,
    Path(b): Path<String>,
    q: QueryPairs,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let body = String::from_utf8_lossy(&body);
    let xml = s
        .control
        .complete_upload(&b, q.get("signature").unwrap_or(""), &body)
        .await?;
    Ok(([(header::CONTENT_TYPE, "application/xml")], xml).into_response())
}

// --- deployments -----------------------------------------------------------------------------

async fn get_deployments(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<wire::DeploymentsV3Page>> {
    let f = DeploymentFilter {
        deployment_tag: q.get("deploymentTag").map(str::to_string),
        build_tag: q.get("buildTag").map(str::to_string),
        next_page_token: q
            .get("nextPageToken")
            .filter(|t| !t.is_empty())
            .map(str::to_string),
        page_size: q.parse_opt("pageSize")?,
    };
    Ok(Json(s.control.get_deployments(&c, &app, f).await?))
}

async fn create_deployment(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    Body(p): Body<wire::DeploymentConfigV3>,
) -> ApiResult<Response> {
    Ok(created(s.control.create_deployment(&c, &app, p).await?))
}

async fn latest_deployment(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
) -> ApiResult<Json<DeploymentV3>> {
    Ok(Json((&s.control.latest_deployment(&c, &app).await?).into()))
}

async fn get_deployment(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, d)): Path<(String, String)>,
) -> ApiResult<Json<DeploymentV3>> {
    Ok(Json(
        (&s.control.get_deployment(&c, &app, &d).await?).into(),
    ))
}

// --- processes -------------------------------------------------------------------------------

fn process_filter(q: &QueryPairs) -> ApiResult<lodge_control::ProcessFilter> {
    let before: Option<f64> = q.parse_opt("before")?;
    if before.is_some_and(|b| !b.is_finite()) {
        return Err(invalid(
            "before must be a finite number (epoch milliseconds)",
        ));
    }
    Ok(lodge_control::ProcessFilter {
        statuses: q.parse_all("status")?,
        regions: q.parse_all("region")?,
        before: before.map(|b| b as i64),
    })
}

async fn latest_processes(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Vec<wire::ProcessV3>>> {
    Ok(Json(
        s.control
            .latest_processes(&c, &app, process_filter(&q)?)
            .await?,
    ))
}

async fn count_processes(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<serde_json::Value>> {
    let n = s
        .control
        .count_processes(&c, &app, process_filter(&q)?)
        .await?;
    Ok(Json(json!({ "count": n })))
}

fn region(r: &str) -> ApiResult<Region> {
    r.parse().map_err(invalid)
}

async fn create_process(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, r)): Path<(String, String)>,
) -> ApiResult<Response> {
    Ok(created(
        s.control.create_process(&c, &app, region(&r)?).await?,
    ))
}

async fn get_process(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, p)): Path<(String, String)>,
) -> ApiResult<Json<wire::ProcessV3>> {
    Ok(Json(s.control.get_process(&c, &app, &p).await?))
}

async fn stop_process(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, p)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.control.stop_process(&c, &app, &p).await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- rooms -----------------------------------------------------------------------------------

async fn create_room(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    q: QueryPairs,
    Body(p): Body<wire::CreateRoomParams>,
) -> ApiResult<Response> {
    let room_id = q
        .get("roomId")
        .filter(|r| !r.is_empty())
        .map(str::to_string);
    Ok(created(s.control.create_room(&c, &app, p, room_id).await?))
}

async fn get_room(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, r)): Path<(String, String)>,
) -> ApiResult<Json<wire::RoomOut>> {
    Ok(Json(s.control.get_room(&c, &app, &r).await?))
}

async fn active_rooms(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, p)): Path<(String, String)>,
) -> ApiResult<Json<Vec<wire::RoomOut>>> {
    Ok(Json(s.control.rooms_for_process(&c, &app, &p, true).await?))
}

async fn inactive_rooms(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, p)): Path<(String, String)>,
) -> ApiResult<Json<Vec<wire::RoomOut>>> {
    Ok(Json(
        s.control.rooms_for_process(&c, &app, &p, false).await?,
    ))
}

async fn destroy_room(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, r)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.control.destroy_room(&c, &app, &r).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn suspend_room(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, r)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.control.suspend_room(&c, &app, &r).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn resume_room(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, r)): Path<(String, String)>,
) -> ApiResult<Json<wire::ConnectionInfoV2>> {
    Ok(Json(s.control.resume_room(&c, &app, &r).await?))
}

async fn connection_info(
    State(s): State<AppState>,
    Path((app, r)): Path<(String, String)>,
) -> ApiResult<Json<wire::ConnectionInfoV2>> {
    Ok(Json(s.control.connection_info(&app, &r).await?))
}

async fn update_room_config(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, r)): Path<(String, String)>,
    Body(p): Body<wire::UpdateRoomConfigParams>,
) -> ApiResult<StatusCode> {
    s.control
        .update_room_config(&c, &app, &r, &p.room_config)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- metrics ---------------------------------------------------------------------------------

/// The `metrics`, `start`, `end`, `step` query of both metrics endpoints; the names are mapped
/// to v3's by `to_v3` (identity for v3, snake_case for v1).
fn metrics_query(
    q: &QueryPairs,
    now_s: i64,
    to_v3: fn(&str) -> Option<&'static str>,
) -> ApiResult<(Vec<&'static str>, lodge_control::MetricsQuery)> {
    let finite = |key: &str| -> ApiResult<Option<f64>> {
        match q.parse_opt::<f64>(key)? {
            Some(v) if !v.is_finite() => Err(invalid(format!("{key} must be a finite number"))),
            v => Ok(v),
        }
    };
    let end = finite("end")?.map_or(now_s, |v| v as i64);
    let start = finite("start")?.map_or(end.saturating_sub(3600), |v| v as i64);
    let step = finite("step")?.map_or(60, |v| v as i64);
    let mut names = Vec::new();
    for m in q
        .all("metrics")
        .flat_map(|v| v.split(','))
        .filter(|v| !v.is_empty())
    {
        names.push(to_v3(m).ok_or_else(|| invalid(format!("unknown metric '{m}'")))?);
    }
    if names.is_empty() {
        names = METRICS.iter().map(|(v3, _)| *v3).collect();
    }
    Ok((names, lodge_control::MetricsQuery { start, end, step }))
}

/// v3 names and their legacy (v1) spellings.
const METRICS: &[(&str, &str)] = &[
    ("cpu", "cpu"),
    ("memory", "memory"),
    ("rateEgress", "rate_egress"),
    ("totalEgress", "total_egress"),
    ("activeConnections", "active_connections"),
];

fn series_json(
    series: &lodge_control::MetricSeries,
    names: &[&'static str],
    v1: bool,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (v3, legacy) in METRICS {
        if !names.contains(v3) {
            continue;
        }
        let points = match *v3 {
            "cpu" => &series.cpu,
            "memory" => &series.memory,
            "rateEgress" => &series.rate_egress,
            "totalEgress" => &series.total_egress,
            _ => &series.active_connections,
        };
        let key = if v1 { *legacy } else { *v3 };
        let values: Vec<_> = points
            .iter()
            .map(|(t, v)| json!({"timestamp": t, "value": v}))
            .collect();
        out.insert(key.to_string(), json!(values));
    }
    serde_json::Value::Object(out)
}

fn metric_v3(name: &str) -> Option<&'static str> {
    // GPU metrics exist on the wire but Lodge has no GPUs: asked for, they are simply absent.
    METRICS
        .iter()
        .map(|(v3, _)| *v3)
        .chain(["gpuMemory", "gpuUtilization"])
        .find(|v3| *v3 == name)
}

fn metric_v1(name: &str) -> Option<&'static str> {
    METRICS.iter().find(|(_, l)| *l == name).map(|(v3, _)| *v3)
}

async fn process_metrics(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, pid)): Path<(String, String)>,
    q: QueryPairs,
) -> ApiResult<Json<serde_json::Value>> {
    let (names, query) = metrics_query(&q, s.control.now() / 1000, metric_v3)?;
    let series = s.control.process_metrics(&c, &app, &pid, query).await?;
    Ok(Json(series_json(&series, &names, false)))
}

async fn process_metrics_v1(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, pid)): Path<(String, String)>,
    q: QueryPairs,
) -> ApiResult<Json<serde_json::Value>> {
    let (names, query) = metrics_query(&q, s.control.now() / 1000, metric_v1)?;
    let series = s.control.process_metrics(&c, &app, &pid, query).await?;
    Ok(Json(series_json(&series, &names, true)))
}
