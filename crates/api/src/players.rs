//! Endpoints game clients call: AuthV1 logins (no auth), lobbies v3 and the legacy v1/v2 lobby
//! endpoints (player token to create, none to read; SetLobbyState with a developer token).

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lodge_control::NewLobby;
use lodge_model::wire::{
    CreateLobbyParams, CreateLobbyV3Params, GoogleIdTokenObject, LobbyLegacy, LobbyV3,
    NicknameObject, PlayerTokenObject, SetLobbyStateParams,
};
use lodge_model::{LobbyVisibility, Region};

use crate::{invalid, ApiResult, AppState, Body, Dev, Path, QueryPairs, Source};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/auth/v1/{app_id}/login/anonymous", post(login_anonymous))
        .route("/auth/v1/{app_id}/login/nickname", post(login_nickname))
        .route("/auth/v1/{app_id}/login/google", post(login_google))
        .route("/lobby/v3/{app_id}/create", post(create_lobby_v3))
        .route("/lobby/v3/{app_id}/list/public", get(list_public_v3))
        .route("/lobby/v3/{app_id}/info/roomid/{room_id}", get(info_v3))
        .route(
            "/lobby/v3/{app_id}/info/shortcode/{short_code}",
            get(info_short_code_v3),
        )
        .route("/lobby/v2/{app_id}/create", post(create_lobby_v2))
        .route(
            "/lobby/v2/{app_id}/create/{visibility}",
            post(create_lobby_v2_as),
        )
        .route("/lobby/v2/{app_id}/list/public", get(list_public_legacy))
        .route("/lobby/v2/{app_id}/info/{room_id}", get(info_v2))
        .route(
            "/lobby/v2/{app_id}/setState/{room_id}",
            post(set_lobby_state),
        )
        .route(
            "/lobby/v1/{app_id}/create/{visibility}",
            post(create_lobby_v1),
        )
        .route("/lobby/v1/{app_id}/list", get(list_public_legacy))
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

async fn login_anonymous(
    State(s): State<AppState>,
    Path(app): Path<String>,
) -> ApiResult<Json<PlayerTokenObject>> {
    Ok(Json(s.control.login_anonymous(&app).await?))
}

async fn login_nickname(
    State(s): State<AppState>,
    Path(app): Path<String>,
    Body(p): Body<NicknameObject>,
) -> ApiResult<Json<PlayerTokenObject>> {
    Ok(Json(s.control.login_nickname(&app, &p.nickname).await?))
}

async fn login_google(
    State(s): State<AppState>,
    Path(app): Path<String>,
    Body(p): Body<GoogleIdTokenObject>,
) -> ApiResult<Json<PlayerTokenObject>> {
    Ok(Json(s.control.login_google(&app, &p.id_token).await?))
}

fn opt(q: &QueryPairs, key: &str) -> Option<String> {
    q.get(key).filter(|v| !v.is_empty()).map(str::to_string)
}

fn region_filter(q: &QueryPairs) -> ApiResult<Option<Region>> {
    match q.get("region") {
        None | Some("") => Ok(None),
        Some(r) => r.parse().map(Some).map_err(invalid),
    }
}

async fn create_lobby_v3(
    State(s): State<AppState>,
    Source(src): Source,
    Path(app): Path<String>,
    headers: HeaderMap,
    q: QueryPairs,
    Body(p): Body<CreateLobbyV3Params>,
) -> ApiResult<Response> {
    let (app, player) = s.control.player(&app, authorization(&headers)).await?;
    let new = NewLobby {
        visibility: p.visibility,
        region: p.region,
        room_config: p.room_config,
        initial_config: None,
        room_id: opt(&q, "roomId").or(p.room_id.filter(|r| !r.is_empty())),
        short_code: opt(&q, "shortCode").or(p.short_code.filter(|c| !c.is_empty())),
        default_short_code: true,
        source: src,
    };
    let lobby = s.control.create_lobby(&app, &player, new).await?;
    Ok((StatusCode::CREATED, Json(LobbyV3::from(&lobby))).into_response())
}

async fn list_public_v3(
    State(s): State<AppState>,
    Path(app): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Vec<LobbyV3>>> {
    let lobbies = s
        .control
        .public_lobbies(&app, LobbyVisibility::Public, region_filter(&q)?)
        .await?;
    Ok(Json(lobbies.iter().map(Into::into).collect()))
}

async fn info_v3(
    State(s): State<AppState>,
    Path((app, room)): Path<(String, String)>,
) -> ApiResult<Json<LobbyV3>> {
    Ok(Json((&s.control.lobby_info(&app, &room).await?).into()))
}

async fn info_short_code_v3(
    State(s): State<AppState>,
    Path((app, code)): Path<(String, String)>,
) -> ApiResult<Json<LobbyV3>> {
    Ok(Json(
        (&s.control.lobby_by_short_code(&app, &code).await?).into(),
    ))
}

async fn create_legacy(
    s: &AppState,
    app: &str,
    headers: &HeaderMap,
    new: NewLobby,
) -> ApiResult<lodge_model::Lobby> {
    let (app, player) = s.control.player(app, authorization(headers)).await?;
    Ok(s.control.create_lobby(&app, &player, new).await?)
}

async fn create_lobby_v2(
    State(s): State<AppState>,
    Source(src): Source,
    Path(app): Path<String>,
    headers: HeaderMap,
    q: QueryPairs,
    Body(p): Body<CreateLobbyParams>,
) -> ApiResult<Response> {
    let visibility = p
        .visibility
        .ok_or_else(|| invalid("visibility is required"))?;
    new_lobby_v2(&s, &app, &headers, &q, visibility, p, src).await
}

async fn create_lobby_v2_as(
    State(s): State<AppState>,
    Source(src): Source,
    Path((app, visibility)): Path<(String, String)>,
    headers: HeaderMap,
    q: QueryPairs,
    Body(p): Body<CreateLobbyParams>,
) -> ApiResult<Response> {
    let visibility: LobbyVisibility = visibility.parse().map_err(invalid)?;
    new_lobby_v2(&s, &app, &headers, &q, visibility, p, src).await
}

/// Lobby v2 creation, whether the visibility came in the body or the path.
async fn new_lobby_v2(
    s: &AppState,
    app: &str,
    headers: &HeaderMap,
    q: &QueryPairs,
    visibility: LobbyVisibility,
    p: CreateLobbyParams,
    src: Option<std::net::IpAddr>,
) -> ApiResult<Response> {
    let new = NewLobby {
        visibility,
        region: p.region,
        room_config: None,
        initial_config: p.initial_config,
        room_id: opt(q, "roomId"),
        short_code: None,
        default_short_code: false,
        source: src,
    };
    let lobby = create_legacy(s, app, headers, new).await?;
    Ok((StatusCode::CREATED, Json(LobbyLegacy::from(&lobby))).into_response())
}

/// v1: `create/public` or `create/private`, region and `local` in the query, no body; answers
/// 200 with the room id as a JSON string.
async fn create_lobby_v1(
    State(s): State<AppState>,
    Source(src): Source,
    Path((app, visibility)): Path<(String, String)>,
    headers: HeaderMap,
    q: QueryPairs,
) -> ApiResult<Json<String>> {
    let local = q.get("local") == Some("true");
    let visibility = match (visibility.as_str(), local) {
        (_, true) => LobbyVisibility::Local,
        ("public", false) => LobbyVisibility::Public,
        ("private", false) => LobbyVisibility::Private,
        (other, _) => return Err(invalid(format!("unknown lobby kind '{other}'"))),
    };
    let region: Region = q
        .get("region")
        .ok_or_else(|| invalid("query parameter region is required"))?
        .parse()
        .map_err(invalid)?;
    let new = NewLobby {
        visibility,
        region,
        room_config: None,
        initial_config: None,
        room_id: None,
        short_code: None,
        default_short_code: false,
        source: src,
    };
    let lobby = create_legacy(&s, &app, &headers, new).await?;
    Ok(Json(lobby.room_id))
}

/// v1 and v2 public listings (v1 with `local=true` lists local lobbies).
async fn list_public_legacy(
    State(s): State<AppState>,
    Path(app): Path<String>,
    q: QueryPairs,
) -> ApiResult<Json<Vec<LobbyLegacy>>> {
    let visibility = if q.get("local") == Some("true") {
        LobbyVisibility::Local
    } else {
        LobbyVisibility::Public
    };
    let lobbies = s
        .control
        .public_lobbies(&app, visibility, region_filter(&q)?)
        .await?;
    Ok(Json(lobbies.iter().map(Into::into).collect()))
}

async fn info_v2(
    State(s): State<AppState>,
    Path((app, room)): Path<(String, String)>,
) -> ApiResult<Json<LobbyLegacy>> {
    Ok(Json((&s.control.lobby_info(&app, &room).await?).into()))
}

async fn set_lobby_state(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, room)): Path<(String, String)>,
    Body(p): Body<SetLobbyStateParams>,
) -> ApiResult<Json<LobbyLegacy>> {
    let state = p.state.unwrap_or(serde_json::Value::Null);
    Ok(Json(
        (&s.control.set_lobby_state(&c, &app, &room, state).await?).into(),
    ))
}
