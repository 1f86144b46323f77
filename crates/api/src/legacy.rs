//! The deprecated v1/v2 endpoints (Hathora API reference §4): apps v1, builds v1/v2 (with the
//! multipart `file` upload on run), deployments v1/v2, processes v1/v2, rooms v1. Integer
//! build and deployment ids map onto the same objects as v3.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use lodge_control::{CreatedLegacyBuild, LegacyUpload, ProcessFilter, UploadTarget};
use lodge_model::legacy::{
    connection_info_v1, CreateBuildParams, DeploymentConfigV1, DeploymentConfigV2, ProcessV2,
};
use lodge_model::wire::{self, CreateAppConfig, CreateMultipartBuildParams, PatchAppConfig};
use lodge_model::Region;
use serde_json::json;

use crate::{
    base_url, invalid, multipart, ApiFailure, ApiResult, AppState, Body, Dev, OptBody, Path,
    QueryPairs,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        // apps v1
        .route("/apps/v1/list", get(apps_list))
        .route("/apps/v1/create", post(apps_create))
        .route("/apps/v1/update/{app_id}", post(apps_update))
        .route("/apps/v1/info/{app_id}", get(apps_info))
        .route("/apps/v1/delete/{app_id}", delete(apps_delete))
        // builds v1 and v2
        .route("/builds/{v}/{app_id}/create", post(builds_create))
        .route(
            "/builds/v2/{app_id}/createWithUploadUrl",
            post(builds_create_form),
        )
        .route(
            "/builds/v2/{app_id}/createWithMultipartUploads",
            post(builds_create_multipart),
        )
        .route(
            "/builds/{v}/{app_id}/run/{build}",
            post(builds_run).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/builds/{v}/{app_id}/list", get(builds_list))
        .route("/builds/{v}/{app_id}/info/{build}", get(builds_info))
        .route("/builds/{v}/{app_id}/delete/{build}", delete(builds_delete))
        .route(
            "/uploads/{build_id}/form",
            post(upload_form).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        // deployments v1 and v2
        .route(
            "/deployments/{v}/{app_id}/create/{build}",
            post(deployments_create),
        )
        .route("/deployments/{v}/{app_id}/list", get(deployments_list))
        .route("/deployments/{v}/{app_id}/latest", get(deployments_latest))
        .route(
            "/deployments/{v}/{app_id}/info/{deployment}",
            get(deployments_info),
        )
        // processes v1 and v2
        .route(
            "/processes/v1/{app_id}/info/{process_id}",
            get(process_v1_info),
        )
        .route(
            "/processes/v1/{app_id}/list/running",
            get(processes_v1_running),
        )
        .route(
            "/processes/v1/{app_id}/list/stopped",
            get(processes_v1_stopped),
        )
        .route(
            "/processes/v2/{app_id}/info/{process_id}",
            get(process_v2_info),
        )
        .route(
            "/processes/v2/{app_id}/list/latest",
            get(processes_v2_latest),
        )
        .route("/processes/v2/{app_id}/count", get(processes_v2_count))
        .route(
            "/processes/v2/{app_id}/create/{region}",
            post(process_v2_create),
        )
        .route(
            "/processes/v2/{app_id}/stop/{process_id}",
            post(process_v2_stop),
        )
        // rooms v1
        .route("/rooms/v1/{app_id}/create", post(rooms_v1_create))
        .route("/rooms/v1/{app_id}/info/{room_id}", get(rooms_v1_info))
        .route(
            "/rooms/v1/{app_id}/list/{process_id}/active",
            get(rooms_v1_active),
        )
        .route(
            "/rooms/v1/{app_id}/list/{process_id}/inactive",
            get(rooms_v1_inactive),
        )
        .route(
            "/rooms/v1/{app_id}/destroy/{room_id}",
            post(rooms_v1_destroy),
        )
        .route(
            "/rooms/v1/{app_id}/suspend/{room_id}",
            post(rooms_v1_suspend),
        )
        .route(
            "/rooms/v1/{app_id}/connectioninfo/{room_id}",
            get(rooms_v1_connection_info),
        )
}

fn created<T: serde::Serialize>(v: T) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

/// `v1` or `v2` in the path; anything else is not an endpoint.
fn version(v: &str) -> ApiResult<u8> {
    match v {
        "v1" => Ok(1),
        "v2" => Ok(2),
        other => Err(ApiFailure(
            StatusCode::NOT_FOUND,
            format!("No such API version: {other}"),
            None,
        )),
    }
}

// --- apps v1 ---------------------------------------------------------------------------------

async fn apps_list(
    State(s): State<AppState>,
    Dev(c): Dev,
) -> ApiResult<Json<Vec<lodge_control::ApplicationV1>>> {
    Ok(Json(s.control.apps_v1(&c).await?))
}

async fn apps_create(
    State(s): State<AppState>,
    Dev(c): Dev,
    Body(p): Body<CreateAppConfig>,
) -> ApiResult<Response> {
    Ok(created(s.control.create_app(&c, None, p).await?))
}

async fn apps_update(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    Body(p): Body<PatchAppConfig>,
) -> ApiResult<Json<wire::ApplicationOut>> {
    Ok(Json(s.control.update_app(&c, &app, p, true).await?))
}

async fn apps_info(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
) -> ApiResult<Json<wire::ApplicationOut>> {
    Ok(Json(s.control.get_app(&c, &app).await?))
}

async fn apps_delete(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
) -> ApiResult<StatusCode> {
    s.control.delete_app(&c, &app).await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- builds v1/v2 ----------------------------------------------------------------------------

fn created_build(b: CreatedLegacyBuild) -> Response {
    match b {
        CreatedLegacyBuild::Plain(b) => created(b),
        CreatedLegacyBuild::Form(b) => created(b),
        CreatedLegacyBuild::Multipart(b) => created(b),
    }
}

/// CreateBuild v1/v2 in its three shapes: upload links point back at the host the client used.
async fn create_build(
    s: &AppState,
    c: &lodge_control::Caller,
    app: &str,
    headers: &HeaderMap,
    tag: Option<String>,
    upload: LegacyUpload,
) -> ApiResult<Response> {
    let base = base_url(headers);
    let b = s
        .control
        .create_build_legacy(c, app, tag, upload, UploadTarget { base_url: &base })
        .await?;
    Ok(created_build(b))
}

async fn builds_create(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((v, app)): Path<(String, String)>,
    headers: HeaderMap,
    OptBody(p): OptBody<CreateBuildParams>,
) -> ApiResult<Response> {
    version(&v)?;
    let tag = p.and_then(|p| p.build_tag);
    create_build(&s, &c, &app, &headers, tag, LegacyUpload::None).await
}

async fn builds_create_form(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    headers: HeaderMap,
    OptBody(p): OptBody<CreateBuildParams>,
) -> ApiResult<Response> {
    let tag = p.and_then(|p| p.build_tag);
    create_build(&s, &c, &app, &headers, tag, LegacyUpload::Form).await
}

async fn builds_create_multipart(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    headers: HeaderMap,
    Body(p): Body<CreateMultipartBuildParams>,
) -> ApiResult<Response> {
    let upload = LegacyUpload::Multipart(p.build_size_in_bytes);
    create_build(&s, &c, &app, &headers, p.build_tag, upload).await
}

/// Write the form's `file` part (if any) to `dest`; a missing part is an error when `required`.
async fn receive_file(
    s: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
    dest: &std::path::Path,
    required: bool,
) -> ApiResult<multipart::Form> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(boundary) = multipart::boundary(content_type) else {
        if required {
            return Err(invalid(
                "expected a multipart/form-data body with a part named 'file'",
            ));
        }
        return Ok(multipart::Form::default());
    };
    let limit = s.control.config().max_build_bytes;
    let tmp = dest.with_extension("upload");
    let form = multipart::read(body, &boundary, "file", &tmp, limit)
        .await
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            ApiFailure(StatusCode::BAD_REQUEST, e, None)
        })?;
    match form.file_bytes {
        Some(_) => tokio::fs::rename(&tmp, dest)
            .await
            .map_err(lodge_control::Error::from)?,
        None if required => {
            return Err(invalid("the multipart body has no part named 'file'"));
        }
        None => {}
    }
    Ok(form)
}

async fn builds_run(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((v, app, num)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let v = version(&v)?;
    let b = s.control.legacy_build(&c, &app, &num).await?;
    if b.status != lodge_model::BuildStatus::Created {
        return Err(ApiFailure(
            StatusCode::BAD_REQUEST,
            format!("build {num} has already been run (status {})", b.status),
            None,
        ));
    }
    let dest = s.control.archive_path(&b.build_id);
    receive_file(&s, &headers, body, &dest, v == 1).await?;
    let rx = s
        .control
        .run_build(&c, Some(&b.org_id), &b.build_id)
        .await?;
    let stream =
        futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |line| {
            Ok::<_, std::io::Error>(bytes::Bytes::from(line))
        });
    // v1 answers the log as text, v2 as a byte stream.
    let content_type = if v == 1 {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// The target of v2's presigned POST form (`uploadUrl` + `uploadBodyParams` + `file`).
async fn upload_form(
    State(s): State<AppState>,
    Path(build_id): Path<String>,
    q: QueryPairs,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    let dest = s
        .control
        .form_upload_target(&build_id, q.get("signature").unwrap_or(""))
        .await?;
    receive_file(&s, &headers, body, &dest, true).await?;
    s.control.upload_received(&build_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn builds_list(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((v, app)): Path<(String, String)>,
) -> ApiResult<Json<Vec<lodge_model::legacy::BuildLegacy>>> {
    version(&v)?;
    Ok(Json(s.control.builds_legacy(&c, &app).await?))
}

async fn builds_info(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((v, app, num)): Path<(String, String, String)>,
) -> ApiResult<Json<lodge_model::legacy::BuildLegacy>> {
    version(&v)?;
    Ok(Json(s.control.build_info_legacy(&c, &app, &num).await?))
}

async fn builds_delete(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((v, app, num)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    version(&v)?;
    s.control.delete_build_legacy(&c, &app, &num).await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- deployments v1/v2 -----------------------------------------------------------------------

async fn deployments_create(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((v, app, build)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let parse_err = |e: serde_json::Error| invalid(format!("invalid request body: {e}"));
    if version(&v)? == 1 {
        let cfg: DeploymentConfigV1 = serde_json::from_slice(&body).map_err(parse_err)?;
        Ok(created(
            s.control
                .create_deployment_v1(&c, &app, &build, cfg)
                .await?,
        ))
    } else {
        let cfg: DeploymentConfigV2 = serde_json::from_slice(&body).map_err(parse_err)?;
        Ok(created(
            s.control
                .create_deployment_v2(&c, &app, &build, cfg)
                .await?,
        ))
    }
}

async fn deployments_answer(
    s: &AppState,
    v: u8,
    list: Vec<lodge_model::Deployment>,
    one: bool,
) -> ApiResult<Response> {
    Ok(match (v, one) {
        (1, false) => Json(s.control.deployments_v1(&list).await?).into_response(),
        (1, true) => Json(s.control.deployments_v1(&list).await?.remove(0)).into_response(),
        (_, false) => Json(s.control.deployments_v2(&list).await?).into_response(),
        (_, true) => Json(s.control.deployments_v2(&list).await?.remove(0)).into_response(),
    })
}

async fn deployments_list(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((v, app)): Path<(String, String)>,
) -> ApiResult<Response> {
    let v = version(&v)?;
    let list = s.control.deployments_legacy(&c, &app).await?;
    deployments_answer(&s, v, list, false).await
}

async fn deployments_latest(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((v, app)): Path<(String, String)>,
) -> ApiResult<Response> {
    let v = version(&v)?;
    let d = s.control.deployment_legacy(&c, &app, None).await?;
    deployments_answer(&s, v, vec![d], true).await
}

async fn deployments_info(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((v, app, num)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let v = version(&v)?;
    let d = s.control.deployment_legacy(&c, &app, Some(&num)).await?;
    deployments_answer(&s, v, vec![d], true).await
}

// --- processes v1/v2 -------------------------------------------------------------------------

fn region_opt(q: &QueryPairs) -> ApiResult<Option<Region>> {
    match q.get("region") {
        None | Some("") => Ok(None),
        Some(r) => r.parse().map(Some).map_err(invalid),
    }
}

async fn process_v1_info(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, pid)): Path<(String, String)>,
) -> ApiResult<Json<lodge_model::legacy::ProcessV1>> {
    let p = s.control.process_info_legacy(&c, &app, &pid).await?;
    Ok(Json(s.control.process_v1(&p).await?))
}

async fn processes_v1_running(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Vec<lodge_model::legacy::ProcessWithRooms>>> {
    Ok(Json(
        s.control
            .running_processes_v1(&c, &app, region_opt(&q)?)
            .await?,
    ))
}

async fn processes_v1_stopped(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Vec<lodge_model::legacy::ProcessV1>>> {
    Ok(Json(
        s.control
            .stopped_processes_v1(&c, &app, region_opt(&q)?)
            .await?,
    ))
}

async fn process_v2_info(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, pid)): Path<(String, String)>,
) -> ApiResult<Json<ProcessV2>> {
    let p = s.control.process_info_legacy(&c, &app, &pid).await?;
    Ok(Json(s.control.process_v2(&p).await?))
}

fn filter(q: &QueryPairs) -> ApiResult<ProcessFilter> {
    Ok(ProcessFilter {
        statuses: q.parse_all("status")?,
        regions: q.parse_all("region")?,
        before: None,
    })
}

async fn processes_v2_latest(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Vec<ProcessV2>>> {
    let list = s
        .control
        .processes_legacy(&c, &app, filter(&q)?, Some(10))
        .await?;
    let mut out = Vec::with_capacity(list.len());
    for p in &list {
        out.push(s.control.process_v2(p).await?);
    }
    Ok(Json(out))
}

async fn processes_v2_count(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path(app): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<serde_json::Value>> {
    let n = s.control.count_processes(&c, &app, filter(&q)?).await?;
    Ok(Json(json!({ "count": n })))
}

async fn process_v2_create(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, region)): Path<(String, String)>,
) -> ApiResult<Response> {
    let region: Region = region.parse().map_err(invalid)?;
    let p = s.control.create_process(&c, &app, region).await?;
    let p = s
        .control
        .process_info_legacy(&c, &app, &p.process_id)
        .await?;
    Ok(created(s.control.process_v2(&p).await?))
}

async fn process_v2_stop(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, pid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.control.stop_process(&c, &app, &pid).await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- rooms v1 --------------------------------------------------------------------------------

async fn rooms_v1_create(
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
    let info = s.control.create_room(&c, &app, p, room_id).await?;
    Ok(created(info.room_id))
}

async fn rooms_v1_info(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, room)): Path<(String, String)>,
) -> ApiResult<Json<wire::RoomOut>> {
    Ok(Json(s.control.get_room(&c, &app, &room).await?))
}

async fn rooms_v1_active(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, pid)): Path<(String, String)>,
) -> ApiResult<Json<Vec<wire::RoomOut>>> {
    Ok(Json(
        s.control.rooms_for_process(&c, &app, &pid, true).await?,
    ))
}

async fn rooms_v1_inactive(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, pid)): Path<(String, String)>,
) -> ApiResult<Json<Vec<wire::RoomOut>>> {
    Ok(Json(
        s.control.rooms_for_process(&c, &app, &pid, false).await?,
    ))
}

async fn rooms_v1_destroy(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, room)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.control.destroy_room(&c, &app, &room).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rooms_v1_suspend(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, room)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.control.suspend_room(&c, &app, &room).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rooms_v1_connection_info(
    State(s): State<AppState>,
    Path((app, room)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let info = s.control.connection_info(&app, &room).await?;
    Ok(Json(connection_info_v1(
        &info.room_id,
        info.exposed_port.as_ref(),
    )))
}
