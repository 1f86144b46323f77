//! Lodge's replica endpoints: the replicas sharing this one's store, for operators (an admin
//! token), and the call another replica forwards to a node whose session is held here (the
//! replicas' shared secret).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use lodge_control::peer::{PeerCall, PEER_SECRET_HEADER};
use lodge_model::node::LinkResult;
use lodge_model::protocol::NodeReply;
use serde_json::json;

use crate::{ApiResult, AppState, Body, Dev};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/lodge/v1/replicas", get(list))
        // PEER_CALL_PATH, written out for the route table's checks.
        .route("/lodge/v1/replica/node-call", post(node_call))
}

#[test]
fn the_peer_call_route_is_where_replicas_post() {
    use lodge_control::peer::PEER_CALL_PATH;
    let served = include_str!("replicas.rs");
    assert!(served.contains(&format!("(\"{PEER_CALL_PATH}\", post(node_call))")));
}

async fn list(State(s): State<AppState>, Dev(c): Dev) -> ApiResult<Json<serde_json::Value>> {
    let replicas = s.control.list_replicas(&c).await?;
    Ok(Json(json!({
        "replicaId": s.control.replica_id(),
        "replicas": replicas.iter().map(|(r, leads)| json!({
            "replicaId": r.replica_id,
            "address": r.address,
            "startedAt": lodge_model::clock::rfc3339(r.started_at),
            "seenAt": lodge_model::clock::rfc3339(r.seen_at),
            "runsSingletons": leads,
        })).collect::<Vec<_>>(),
    })))
}

async fn node_call(
    State(s): State<AppState>,
    headers: HeaderMap,
    Body(call): Body<PeerCall>,
) -> ApiResult<Json<LinkResult<NodeReply>>> {
    let secret = headers
        .get(PEER_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(Json(s.control.answer_peer_call(secret, call).await?))
}
