//! Lodge's own endpoints under `/lodge/v1/`: instance administration that Hathora has no
//! operation for. Hathora's paths are never changed to suit these.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::{ApiResult, AppState, Body, Dev};

pub fn routes() -> Router<AppState> {
    Router::new().route("/lodge/v1/orgs", get(list_orgs).post(create_org))
}

fn org_json(o: &lodge_model::Org) -> serde_json::Value {
    json!({
        "orgId": o.org_id,
        "name": o.name,
        "createdAt": lodge_model::clock::rfc3339(o.created_at),
    })
}

async fn list_orgs(State(s): State<AppState>, Dev(c): Dev) -> ApiResult<Json<serde_json::Value>> {
    let orgs = s.control.list_all_orgs(&c).await?;
    Ok(Json(
        json!({ "orgs": orgs.iter().map(org_json).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateOrg {
    name: String,
}

async fn create_org(
    State(s): State<AppState>,
    Dev(c): Dev,
    Body(p): Body<CreateOrg>,
) -> ApiResult<Response> {
    let (org, token) = s.control.create_org(&c, &p.name).await?;
    let mut body = org_json(&org);
    body["token"] = serde_json::to_value(token).unwrap_or_default();
    Ok((StatusCode::CREATED, Json(body)).into_response())
}
