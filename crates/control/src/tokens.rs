//! Developer authentication and org tokens.

use std::path::Path;

use lodge_model::wire::{
    self, CreateOrgTokenParams, CreatedOrgToken, ListOrgTokens, Organization, OrgsPage,
};
use lodge_model::{id, validate, OrgToken, OrgTokenStatus};
use sha2::{Digest, Sha256};

use crate::{Control, Error, Result};

/// Who is calling: an org token (or the configured admin token) of one org.
#[derive(Debug, Clone)]
pub struct Caller {
    pub org_id: String,
    /// `None` for the admin token from the environment.
    pub token_id: Option<String>,
    pub name: String,
    /// The token's scopes; `None` is an admin token (every scope of its org).
    pub scopes: Option<Vec<String>>,
    /// An admin token of the instance's first org (or `LODGE_ADMIN_TOKEN`): may create orgs.
    pub instance_admin: bool,
}

impl Caller {
    /// Whether the token carries `scope`; `X:read-write` includes `X:read`.
    pub fn has_scope(&self, scope: &str) -> bool {
        let Some(scopes) = &self.scopes else {
            return true;
        };
        scopes.iter().any(|s| {
            s == scope
                || scope
                    .strip_suffix(":read")
                    .is_some_and(|family| s.strip_suffix(":read-write") == Some(family))
        })
    }

    /// `Unauthorized` (401, as Hathora's SDKs expect) unless the token carries `scope`.
    pub fn require(&self, scope: &str) -> Result<()> {
        if self.has_scope(scope) {
            Ok(())
        } else {
            Err(Error::Unauthorized(format!(
                "This developer token lacks the scope {scope}"
            )))
        }
    }
}

/// A token's stored scopes as a list; `None` for admin (`"admin"` or absent).
fn scope_list(scopes: Option<&serde_json::Value>) -> Option<Vec<String>> {
    match scopes? {
        serde_json::Value::Array(items) => Some(
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => None,
    }
}

pub fn hash_secret(secret: &str) -> String {
    let d = Sha256::digest(secret.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The credential of an `Authorization` value: the scheme `Bearer` (any case) is optional.
pub(crate) fn strip_bearer(value: &str) -> &str {
    let v = value.trim();
    match v.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => v[7..].trim(),
        _ => v,
    }
}

/// Constant-time comparison for secrets.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Control {
    /// Authenticate an `Authorization` header value.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Caller> {
        let Some(value) = header else {
            return Err(Error::Unauthorized(
                "Missing Authorization header with a Bearer developer token".into(),
            ));
        };
        let token = strip_bearer(value);
        if token.is_empty() {
            return Err(Error::Unauthorized("Empty developer token".into()));
        }
        if let Some(admin) = &self.cfg.admin_token {
            if same(admin, token) {
                let org = self.bootstrap().await?;
                return Ok(Caller {
                    org_id: org.org_id,
                    token_id: None,
                    name: "admin".into(),
                    scopes: None,
                    instance_admin: true,
                });
            }
        }
        match self.store.token_by_hash(&hash_secret(token)).await? {
            Some(t) if t.status == OrgTokenStatus::Active => {
                let scopes = scope_list(t.scopes.as_ref());
                let instance_admin = scopes.is_none() && t.org_id == self.bootstrap().await?.org_id;
                Ok(Caller {
                    org_id: t.org_id,
                    token_id: Some(t.org_token_id),
                    name: t.name,
                    scopes,
                    instance_admin,
                })
            }
            Some(_) => Err(Error::Unauthorized(
                "This developer token has been revoked".into(),
            )),
            None => Err(Error::Unauthorized("Invalid developer token".into())),
        }
    }

    /// Make sure an admin credential exists. Without `LODGE_ADMIN_TOKEN`, the first start mints
    /// an org token, writes it to `path` (mode 0600) and returns it so it can be printed once.
    pub async fn ensure_admin_token(&self, path: &Path) -> Result<Option<String>> {
        if self.cfg.admin_token.is_some() {
            return Ok(None);
        }
        if let Ok(saved) = std::fs::read_to_string(path) {
            let saved = saved.trim();
            if !saved.is_empty() && self.authenticate(Some(saved)).await.is_ok() {
                return Ok(None);
            }
            tracing::warn!(path = %path.display(), "the saved admin token no longer authenticates; minting a new one");
        }
        let org = self.bootstrap().await?;
        // A previous admin token whose file was lost (deleted, or a crash before it was
        // written) is revoked, so that its name is free and it cannot be used any more. Not on
        // a shared store: there another replica's data dir holds it, and revoking it would
        // lock that replica's operator out; this replica's token is one more, named after the
        // replica (listed, and revocable, like any other).
        let minted_before: Vec<OrgToken> = self
            .store
            .tokens(&org.org_id)
            .await?
            .into_iter()
            .filter(|t| {
                t.name == "admin" && t.created_by == "lodge" && t.status == OrgTokenStatus::Active
            })
            .collect();
        let shared = self.store.shared();
        let own_name = || {
            let id = self.replica_id();
            format!("admin-{}", &id[id.len().saturating_sub(8)..])
        };
        let mut name = "admin".to_string();
        if !shared {
            for old in &minted_before {
                self.store
                    .revoke_token(&org.org_id, &old.org_token_id)
                    .await?;
            }
        } else if !minted_before.is_empty() {
            name = own_name();
            tracing::info!(%name, "another replica minted the admin token; this one mints its own (copy a replica's admin-token file, or set LODGE_ADMIN_TOKEN, to share one)");
        }
        let secret = id::org_token_secret();
        let mut token = OrgToken {
            org_token_id: id::org_token_id(),
            org_id: org.org_id,
            name,
            status: OrgTokenStatus::Active,
            last_four_chars_of_key: last_four(&secret),
            created_at: self.now(),
            created_by: "lodge".into(),
            scopes: Some(serde_json::json!("admin")),
        };
        let hash = hash_secret(&secret);
        if let Err(e) = self.store.insert_token(&token, &hash).await {
            // Replicas starting together on an empty database: another took "admin" first.
            if !shared || token.name != "admin" {
                return Err(e.into());
            }
            token.name = own_name();
            self.store.insert_token(&token, &hash).await?;
        }
        write_private(path, &secret)?;
        Ok(Some(secret))
    }

    pub async fn get_orgs(&self, caller: &Caller) -> Result<OrgsPage> {
        let orgs = self.store.orgs().await?;
        Ok(OrgsPage {
            orgs: orgs
                .into_iter()
                .filter(|o| o.org_id == caller.org_id)
                .map(|o| Organization {
                    org_id: o.org_id,
                    name: o.name,
                    stripe_customer_id: String::new(),
                    is_single_tenant: true,
                    scopes: caller.scopes.clone().unwrap_or_else(|| {
                        wire::ALL_SCOPES.iter().map(|s| s.to_string()).collect()
                    }),
                    max_requested_memory_mb: 65_536.0,
                    log_retention_period_hours: (self.cfg.retention.as_secs() / 3600) as u32,
                    max_process_connections: 1024,
                    default_fleet_id: crate::fleet::DEFAULT_FLEET.into(),
                })
                .collect(),
        })
    }

    pub async fn list_tokens(&self, caller: &Caller, org_id: &str) -> Result<ListOrgTokens> {
        let org = self.org_of(caller, Some(org_id))?;
        let tokens = self.store.tokens(&org).await?;
        Ok(ListOrgTokens {
            tokens: tokens.iter().map(Into::into).collect(),
        })
    }

    pub async fn create_token(
        &self,
        caller: &Caller,
        org_id: &str,
        p: CreateOrgTokenParams,
    ) -> Result<CreatedOrgToken> {
        let org = self.org_of(caller, Some(org_id))?;
        if p.name.trim().is_empty() {
            return Err(Error::Invalid("token name must not be empty".into()));
        }
        validate::max_len("name", &p.name, 64).map_err(Error::Invalid)?;
        if let Some(scopes) = &p.scopes {
            validate_scopes(scopes)?;
        }
        // A token never mints more than it has: an admin token needs an admin caller, and
        // every listed scope must be one the caller holds.
        match scope_list(p.scopes.as_ref()) {
            None if caller.scopes.is_some() => {
                return Err(Error::Unauthorized(
                    "Only an admin token can create an admin token; list the scopes the new token needs".into(),
                ))
            }
            None => {}
            Some(wanted) => {
                for scope in &wanted {
                    caller.require(scope)?;
                }
            }
        }
        let secret = id::org_token_secret();
        let token = OrgToken {
            org_token_id: id::org_token_id(),
            org_id: org,
            name: p.name,
            status: OrgTokenStatus::Active,
            last_four_chars_of_key: last_four(&secret),
            created_at: self.now(),
            created_by: caller.name.clone(),
            scopes: p.scopes,
        };
        self.store
            .insert_token(&token, &hash_secret(&secret))
            .await?;
        Ok(CreatedOrgToken {
            plain_text_token: secret,
            org_token: (&token).into(),
        })
    }

    pub async fn revoke_token(
        &self,
        caller: &Caller,
        org_id: &str,
        token_id: &str,
    ) -> Result<bool> {
        let org = self.org_of(caller, Some(org_id))?;
        match self.store.revoke_token(&org, token_id).await? {
            Some(_) => Ok(true),
            None => Err(Error::NotFound(format!("Token not found: {token_id}"))),
        }
    }
}

fn validate_scopes(scopes: &serde_json::Value) -> Result<()> {
    match scopes {
        serde_json::Value::String(s) if s == "admin" => Ok(()),
        serde_json::Value::Array(items) => {
            for item in items {
                match item.as_str() {
                    Some(s) if wire::ALL_SCOPES.contains(&s) => {}
                    _ => return Err(Error::Invalid(format!("unknown scope {item}"))),
                }
            }
            Ok(())
        }
        other => Err(Error::Invalid(format!(
            "scopes must be \"admin\" or a list of scopes, got {other}"
        ))),
    }
}

fn last_four(secret: &str) -> String {
    secret
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// Write a secret to `path` (mode 0600) atomically: a crash leaves the old file or the new.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{contents}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Control {
    /// Every org of the instance; only an instance admin may list them.
    pub async fn list_all_orgs(&self, caller: &Caller) -> Result<Vec<lodge_model::Org>> {
        require_instance_admin(caller, "manage orgs")?;
        Ok(self.store.orgs().await?)
    }

    /// A new org and its first (admin) token, whose secret is returned once.
    pub async fn create_org(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<(lodge_model::Org, CreatedOrgToken)> {
        require_instance_admin(caller, "manage orgs")?;
        let name = name.trim();
        if name.is_empty() {
            return Err(Error::Invalid("org name must not be empty".into()));
        }
        validate::max_len("name", name, 64).map_err(Error::Invalid)?;
        if self.store.orgs().await?.iter().any(|o| o.name == name) {
            return Err(Error::Invalid(format!(
                "an org named {name} already exists"
            )));
        }
        let org = lodge_model::Org {
            org_id: id::org_id(),
            name: name.to_string(),
            created_at: self.now(),
        };
        self.store.put_org(&org).await?;
        let secret = id::org_token_secret();
        let token = OrgToken {
            org_token_id: id::org_token_id(),
            org_id: org.org_id.clone(),
            name: "admin".into(),
            status: OrgTokenStatus::Active,
            last_four_chars_of_key: last_four(&secret),
            created_at: self.now(),
            created_by: caller.name.clone(),
            scopes: Some(serde_json::json!("admin")),
        };
        self.store
            .insert_token(&token, &hash_secret(&secret))
            .await?;
        Ok((
            org,
            CreatedOrgToken {
                plain_text_token: secret,
                org_token: (&token).into(),
            },
        ))
    }
}

/// Instance administration (orgs, nodes): an admin token of the instance's first org only.
pub(crate) fn require_instance_admin(caller: &Caller, what: &str) -> Result<()> {
    if caller.instance_admin {
        Ok(())
    } else {
        Err(Error::Unauthorized(format!(
            "Only an admin token of the instance's first org can {what}"
        )))
    }
}
