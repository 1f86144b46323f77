//! Lodge's node endpoints. For operators (an admin token): join tokens, the list of nodes,
//! drain. For agents (a join token or a node credential): joining, the node connection (an HTTP
//! upgrade to the node protocol) and build artifacts.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use lodge_control::NodeView;
use lodge_model::protocol::NodeInfo;
use lodge_model::Region;
use serde::Deserialize;
use serde_json::json;

use crate::{ApiFailure, ApiResult, AppState, Body, Dev, OptBody, Path};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/lodge/v1/nodes", get(list))
        .route("/lodge/v1/nodes/join-tokens", post(create_join_token))
        .route("/lodge/v1/nodes/{nodeId}", get(info))
        .route("/lodge/v1/nodes/{nodeId}/drain", post(drain))
        .route("/lodge/v1/nodes/{nodeId}/undrain", post(undrain))
        .route("/lodge/v1/node/join", post(join))
        .route("/lodge/v1/node/connect", get(connect))
        .route("/lodge/v1/node/builds/{buildId}/artifact", get(artifact))
}

pub(crate) fn node_json(v: &NodeView) -> serde_json::Value {
    let n = &v.node;
    let rfc = lodge_model::clock::rfc3339;
    json!({
        "nodeId": n.node_id,
        "host": n.public_host,
        "regions": n.regions.as_ref().map(|r| r.iter().map(|r| r.as_str()).collect::<Vec<_>>()),
        "fleetId": n.fleet_id,
        "status": n.status.as_str(),
        "embedded": !n.remote,
        "reachable": v.reachable,
        "connected": v.connected,
        "replicaId": n.replica,
        "cpu": n.cpu,
        "memoryMB": n.memory_mb,
        "portCapacity": n.port_capacity,
        "liveProcesses": v.live_processes,
        "portsInUse": v.ports_in_use,
        "cpuInUse": v.cpu_in_use,
        "memoryMBInUse": v.memory_mb_in_use,
        "startedAt": rfc(n.started_at),
        "stoppedAt": n.stopped_at.map(rfc),
        "lastHeardAt": v.last_heard.map(rfc),
    })
}

async fn list(State(s): State<AppState>, Dev(c): Dev) -> ApiResult<Json<serde_json::Value>> {
    let nodes = s.control.list_nodes(&c).await?;
    Ok(Json(
        json!({ "nodes": nodes.iter().map(node_json).collect::<Vec<_>>() }),
    ))
}

async fn info(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(node_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(node_json(&s.control.node_view(&c, &node_id).await?)))
}

async fn drain(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(node_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(node_json(
        &s.control.set_draining(&c, &node_id, true).await?,
    )))
}

async fn undrain(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(node_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(node_json(
        &s.control.set_draining(&c, &node_id, false).await?,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NewJoinToken {
    region: Region,
    #[serde(default)]
    fleet_id: Option<String>,
    /// Seconds; one hour when absent.
    #[serde(default)]
    ttl_seconds: Option<f64>,
}

async fn create_join_token(
    State(s): State<AppState>,
    Dev(c): Dev,
    Body(p): Body<NewJoinToken>,
) -> ApiResult<Response> {
    let ttl = match p.ttl_seconds {
        None => Duration::from_secs(3600),
        Some(t) => Duration::try_from_secs_f64(t)
            .map_err(|_| crate::invalid("ttlSeconds must be a positive number"))?,
    };
    if p.fleet_id
        .as_ref()
        .is_some_and(|f| f.is_empty() || f.len() > 100)
    {
        return Err(crate::invalid("fleetId must be 1 to 100 characters"));
    }
    let (secret, t) = s
        .control
        .create_join_token(&c, p.region, p.fleet_id, ttl)
        .await?;
    let body = json!({
        "tokenId": t.token_id,
        "token": secret,
        "region": t.region.as_str(),
        "fleetId": t.fleet_id,
        "expiresAt": lodge_model::clock::rfc3339(t.expires_at),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Join {
    join_token: String,
    info: NodeInfo,
    #[serde(default)]
    fleet_id: Option<String>,
}

async fn join(State(s): State<AppState>, OptBody(p): OptBody<Join>) -> ApiResult<Response> {
    let p = p.ok_or_else(|| crate::invalid("a JSON body with joinToken and info is required"))?;
    let (node_id, credential) = s
        .control
        .join_node(&p.join_token, &p.info, p.fleet_id.as_deref())
        .await?;
    let body = json!({ "nodeId": node_id, "credential": credential });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// A node connection: authenticate, answer 101, and hand the upgraded stream to the control
/// plane's session.
async fn connect(State(s): State<AppState>, mut req: Request) -> ApiResult<Response> {
    let node = s
        .control
        .authenticate_node(authorization(req.headers()))
        .await?;
    let wanted = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(lodge_link::UPGRADE));
    if !wanted {
        return Err(ApiFailure(
            StatusCode::UPGRADE_REQUIRED,
            format!("a node connection upgrades to {}", lodge_link::UPGRADE),
            None,
        ));
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let control = s.control.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(up) => {
                let io = hyper_util::rt::TokioIo::new(up);
                let _ = control.serve_node(&node.node_id, io).await;
            }
            Err(e) => {
                tracing::warn!(node_id = %node.node_id, error = %e, "node connection upgrade failed")
            }
        }
    });
    let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(
        header::UPGRADE,
        HeaderValue::from_static(lodge_link::UPGRADE),
    );
    Ok(res)
}

/// `bytes=N-`, the only range a resuming node asks for.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::RANGE)?.to_str().ok()?;
    v.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
}

async fn artifact(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(build_id): Path<String>,
) -> ApiResult<Response> {
    let node = s.control.authenticate_node(authorization(&headers)).await?;
    let a = s.control.build_artifact(&node, &build_id).await?;
    let start = range_start(&headers).filter(|&n| n > 0);
    if start.is_some_and(|n| n >= a.size) {
        let mut res = ApiFailure(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("the artifact has {} bytes", a.size),
            None,
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", a.size)) {
            res.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return Ok(res);
    }
    let from = start.unwrap_or(0);
    let mut file = tokio::fs::File::open(&a.path)
        .await
        .map_err(|e| lodge_control::Error::Internal(e.to_string()))?;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    file.seek(std::io::SeekFrom::Start(from))
        .await
        .map_err(|e| lodge_control::Error::Internal(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let control = s.control.clone();
    control
        .metrics()
        .artifact_downloads
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    if tx
                        .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    control
                        .metrics()
                        .artifact_bytes
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    if let Ok(v) = HeaderValue::from_str(&a.sha256) {
        h.insert(lodge_link::DIGEST_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&(a.size - from).to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if from > 0 {
        *res.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {from}-{}/{}", a.size - 1, a.size)) {
            res.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(res)
}
