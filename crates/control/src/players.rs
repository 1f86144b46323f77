//! What game clients do without a developer token: log in (AuthV1) and create or find lobbies.

use lodge_model::wire::{CreateRoomParams, PlayerTokenObject};
use lodge_model::{id, validate, App, Lobby, LobbyVisibility, Region, RoomStatus};
use serde_json::Value;

use crate::jwt::{self, PlayerClaims};
use crate::{Control, Error, Result};

const ADJECTIVES: &[&str] = &[
    "agile", "bold", "brave", "bright", "calm", "clever", "cosmic", "daring", "eager", "fancy",
    "fierce", "gentle", "happy", "jolly", "keen", "lively", "lucky", "mellow", "nimble", "proud",
    "quick", "quiet", "rapid", "shiny", "sly", "swift", "tiny", "witty", "zany", "zesty",
];
const COLOURS: &[&str] = &[
    "amber", "azure", "black", "blue", "bronze", "coral", "crimson", "cyan", "golden", "green",
    "indigo", "ivory", "jade", "lilac", "olive", "orange", "pink", "plum", "red", "ruby", "rust",
    "salmon", "silver", "teal", "violet", "white",
];
const ANIMALS: &[&str] = &[
    "badger", "bat", "bear", "beaver", "bison", "cat", "crane", "crow", "deer", "dolphin", "eagle",
    "falcon", "fox", "frog", "gecko", "goose", "gull", "hare", "hawk", "heron", "ibex", "koala",
    "lemur", "lion", "lynx", "mole", "moose", "otter", "owl", "panda", "puffin", "raven", "seal",
    "shark", "sloth", "swan", "tiger", "toad", "wolf", "yak", "zebra",
];

fn pick<'a>(words: &[&'a str], n: u128) -> &'a str {
    words[(n % words.len() as u128) as usize]
}

/// A friendly random name such as `jolly-amber-otter`.
fn anonymous_name() -> String {
    let n = uuid_bits();
    format!(
        "{}-{}-{}",
        pick(ADJECTIVES, n),
        pick(COLOURS, n >> 16),
        pick(ANIMALS, n >> 32)
    )
}

fn uuid_bits() -> u128 {
    u128::from_str_radix(&id::secret_hex(), 16).unwrap_or_default()
}

/// Player ids for anonymous logins: 11 base-36 characters.
fn player_id() -> String {
    id::room_id()[..11].to_string()
}

/// Where a lobby creation comes from: which API version, which affects defaults.
#[derive(Debug, Clone)]
pub struct NewLobby {
    pub visibility: LobbyVisibility,
    pub region: Region,
    pub room_config: Option<String>,
    pub initial_config: Option<Value>,
    pub room_id: Option<String>,
    pub short_code: Option<String>,
    /// v3 lobbies always have a short code (their room id unless one is given).
    pub default_short_code: bool,
    /// The address the request came from, for the per-source limit.
    pub source: Option<std::net::IpAddr>,
}

impl Control {
    /// The app for a public or player endpoint: it must exist and not be deleted.
    pub(crate) async fn live_app(&self, app_id: &str) -> Result<App> {
        match self.store.app(app_id).await? {
            Some(app) if app.deleted_at.is_none() => Ok(app),
            _ => Err(Error::NotFound(format!("App not found: {app_id}"))),
        }
    }

    fn provider<'a>(app: &'a App, name: &str) -> Result<&'a Value> {
        app.auth_configuration.get(name).ok_or_else(|| {
            Error::NotFound(format!(
                "{name} login is not enabled for app {} (see its authConfiguration)",
                app.app_id
            ))
        })
    }

    fn player_token(&self, app: &App, kind: &str, id: String, name: String) -> PlayerTokenObject {
        let claims = PlayerClaims {
            kind: kind.into(),
            id,
            name,
            iat: self.now() / 1000,
        };
        PlayerTokenObject {
            token: jwt::sign_hs256(&claims, &app.app_secret),
        }
    }

    pub async fn login_anonymous(&self, app_id: &str) -> Result<PlayerTokenObject> {
        let app = self.live_app(app_id).await?;
        Self::provider(&app, "anonymous")?;
        Ok(self.player_token(&app, "anonymous", player_id(), anonymous_name()))
    }

    pub async fn login_nickname(&self, app_id: &str, nickname: &str) -> Result<PlayerTokenObject> {
        let app = self.live_app(app_id).await?;
        Self::provider(&app, "nickname")?;
        let nickname = nickname.trim();
        if nickname.is_empty() {
            return Err(Error::Invalid("nickname must not be empty".into()));
        }
        validate::max_len("nickname", nickname, 100).map_err(Error::Invalid)?;
        Ok(self.player_token(&app, "nickname", nickname.into(), nickname.into()))
    }

    pub async fn login_google(&self, app_id: &str, id_token: &str) -> Result<PlayerTokenObject> {
        let app = self.live_app(app_id).await?;
        let client_id = Self::provider(&app, "google")?
            .get("clientId")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let claims = self
            .jwks
            .verify_google(id_token, &client_id, self.now() / 1000)
            .await
            .map_err(Error::Unauthorized)?;
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let name = ["email", "name"]
            .iter()
            .find_map(|k| claims.get(*k).and_then(Value::as_str))
            .unwrap_or(&sub)
            .to_string();
        Ok(self.player_token(&app, "google", sub, name))
    }

    /// The player behind a `playerAuth` bearer token for this app.
    pub async fn player(&self, app_id: &str, header: Option<&str>) -> Result<(App, PlayerClaims)> {
        let app = self.live_app(app_id).await?;
        let Some(value) = header else {
            return Err(Error::Unauthorized(
                "Missing Authorization header with a Bearer player token".into(),
            ));
        };
        let token = crate::tokens::strip_bearer(value);
        let claims = jwt::verify_hs256(token, &app.app_secret).map_err(Error::Unauthorized)?;
        Ok((app, claims))
    }

    /// Create a lobby and its room for a player, within the per-player rate limit.
    pub async fn create_lobby(
        &self,
        app: &App,
        player: &PlayerClaims,
        new: NewLobby,
    ) -> Result<Lobby> {
        if let Some(id) = &new.room_id {
            validate::room_id(id).map_err(Error::Invalid)?;
        }
        if let Some(code) = &new.short_code {
            if code.is_empty() {
                return Err(Error::Invalid("shortCode must not be empty".into()));
            }
            validate::max_len("shortCode", code, 100).map_err(Error::Invalid)?;
        }
        if let Some(c) = &new.room_config {
            validate::max_len("roomConfig", c, 10_000).map_err(Error::Invalid)?;
        }
        if let Some(c) = &new.initial_config {
            if c.to_string().len() >= 64 * 1024 {
                return Err(Error::Invalid("initialConfig must be under 64 KB".into()));
            }
        }
        let room_id = new.room_id.unwrap_or_else(id::room_id);
        let room_config = new
            .room_config
            .or_else(|| new.initial_config.as_ref().map(Value::to_string));
        let now = self.now();
        let lobby = Lobby {
            room_id: room_id.clone(),
            app_id: app.app_id.clone(),
            region: new.region,
            visibility: new.visibility,
            short_code: new
                .short_code
                .or_else(|| new.default_short_code.then(|| room_id.clone())),
            created_by: player.id.clone(),
            created_at: now,
            initial_config: new.initial_config,
            state: None,
            room_config: room_config.clone(),
        };
        let window = self.cfg.lobby_rate_window.as_millis() as i64;
        // Player ids cost nothing (anonymous login mints one per call): the source address and
        // the app bound lobby creation too, before the per-player count in the store. Every
        // attempt counts, refused or not, so hammering gains nothing.
        self.count_lobby_attempt(&app.app_id, new.source).await?;
        let limit = self.cfg.lobby_rate_limit;
        if let Some(oldest) = self
            .store
            .reserve_lobby(&lobby, now - window, limit)
            .await?
        {
            let retry_after = ((oldest + window - now).max(1000) + 999) / 1000;
            return Err(Error::RateLimited(
                format!(
                    "player {} created {limit} lobbies in the last {} s; try again in {retry_after} s",
                    player.id,
                    window / 1000
                ),
                retry_after as u64,
            ));
        }
        let params = CreateRoomParams {
            region: new.region,
            room_config,
            client_ips: None,
            deployment_id: None,
        };
        if let Err(e) = self
            .create_room_in(app, params, Some(room_id.clone()), true)
            .await
        {
            self.store.delete_lobby(&room_id).await?;
            return Err(e);
        }
        tracing::info!(room_id, app_id = %app.app_id, player = %player.id, visibility = %lobby.visibility, "lobby created");
        Ok(lobby)
    }

    /// Count a lobby creation against the per-source and per-app windows; 429 naming the
    /// limit when either is full.
    async fn count_lobby_attempt(
        &self,
        app_id: &str,
        source: Option<std::net::IpAddr>,
    ) -> Result<()> {
        let now = self.now();
        let window = self.cfg.lobby_rate_window.as_millis() as i64;
        let mut checks = vec![(
            format!("app {app_id}"),
            self.cfg.lobby_rate_limit_app,
            format!("app {app_id}"),
        )];
        if let Some(ip) = source.map(lodge_model::source_key) {
            checks.insert(
                0,
                (
                    format!("source {app_id} {ip}"),
                    self.cfg.lobby_rate_limit_source,
                    format!("address {ip}"),
                ),
            );
        }
        for (key, max, who) in checks {
            if let Err(retry) = self.hit_window(&key, now, window, max).await? {
                return Err(Error::RateLimited(
                    format!(
                        "{who} created {max} lobbies of this app in the last {} s (the lobby limit per {}); try again in {retry} s",
                        window / 1000,
                        if key.starts_with("source") { "source address" } else { "app" },
                    ),
                    retry,
                ));
            }
        }
        Ok(())
    }

    /// Count one event against a window: in memory on the embedded store (one replica), in
    /// the store when replicas share it, so that they count together. `Err(retry after s)`
    /// when the window is full.
    async fn hit_window(
        &self,
        key: &str,
        now: lodge_model::Millis,
        window: i64,
        max: u32,
    ) -> Result<std::result::Result<(), u64>> {
        if !self.store.shared() {
            return Ok(self.lobby_windows.hit(key, now, window, max));
        }
        Ok(match self.store.hit_window(key, now, window, max).await? {
            None => Ok(()),
            Some(start) => Err(((start + window - now + 999) / 1000).max(1) as u64),
        })
    }

    /// Forget rate-limit windows that ended (the singletons' work on a shared store).
    pub(crate) async fn prune_rate_windows(&self) -> Result<()> {
        if self.store.shared() {
            let window = self.cfg.lobby_rate_window.as_millis() as i64;
            self.store
                .prune_windows(self.now().saturating_sub(window))
                .await?;
        }
        Ok(())
    }

    /// A lobby by room id (any visibility); 404 once its room is destroyed.
    pub async fn lobby_info(&self, app_id: &str, room_id: &str) -> Result<Lobby> {
        let app = self.live_app(app_id).await?;
        match self.store.lobby(room_id).await? {
            Some((l, status)) if l.app_id == app.app_id && status != RoomStatus::Destroyed => Ok(l),
            _ => Err(Error::NotFound(format!("Lobby not found: {room_id}"))),
        }
    }

    pub async fn lobby_by_short_code(&self, app_id: &str, code: &str) -> Result<Lobby> {
        let app = self.live_app(app_id).await?;
        match self.store.lobby_by_short_code(&app.app_id, code).await? {
            Some((l, _)) => Ok(l),
            None => Err(Error::NotFound(format!("No lobby with short code {code}"))),
        }
    }

    pub async fn public_lobbies(
        &self,
        app_id: &str,
        visibility: LobbyVisibility,
        region: Option<Region>,
    ) -> Result<Vec<Lobby>> {
        let app = self.live_app(app_id).await?;
        Ok(self.store.lobbies(&app.app_id, visibility, region).await?)
    }

    /// SetLobbyState (legacy v2, developer token).
    pub async fn set_lobby_state(
        &self,
        caller: &crate::Caller,
        app_id: &str,
        room_id: &str,
        state: Value,
    ) -> Result<Lobby> {
        let app = self.app_of(caller, app_id).await?;
        if state.to_string().len() >= 1 << 20 {
            return Err(Error::Invalid("state must be under 1 MB".into()));
        }
        self.lobby_info(&app.app_id, room_id).await?;
        self.store
            .set_lobby_state(room_id, &state)
            .await?
            .ok_or_else(|| Error::NotFound(format!("Lobby not found: {room_id}")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn anonymous_names_and_ids_look_right() {
        let name = super::anonymous_name();
        assert_eq!(name.split('-').count(), 3);
        let id = super::player_id();
        assert_eq!(id.len(), 11);
    }
}
