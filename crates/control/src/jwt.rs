//! The two JSON Web Token shapes Lodge deals with: player tokens it signs itself (HS256 with the
//! app secret, as Hathora's server SDKs verify them) and Google ID tokens it verifies (RS256
//! against Google's published keys, or any JWKS the operator points it at).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::{hmac, signature};
use serde::Deserialize;
use serde_json::Value;

/// Claims of a player token. Game servers verify these with the app secret.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct PlayerClaims {
    /// `anonymous`, `nickname` or `google`.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub name: String,
    pub iat: i64,
}

fn split(token: &str) -> Result<(&str, &str, Vec<u8>), String> {
    let mut it = token.splitn(3, '.');
    let (Some(h), Some(p), Some(s)) = (it.next(), it.next(), it.next()) else {
        return Err("not a JSON Web Token".into());
    };
    let sig = B64
        .decode(s.trim_end_matches('='))
        .map_err(|_| "the token signature is not base64url")?;
    Ok((h, p, sig))
}

fn part(p: &str) -> Result<Value, String> {
    let bytes = B64
        .decode(p.trim_end_matches('='))
        .map_err(|_| "a token segment is not base64url")?;
    serde_json::from_slice(&bytes).map_err(|_| "a token segment is not JSON".into())
}

/// Sign `claims` as an HS256 JWT with `secret`.
pub fn sign_hs256(claims: &PlayerClaims, secret: &str) -> String {
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
    let input = format!("{header}.{payload}");
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let sig = hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

/// Verify an HS256 player token signed with `secret` and return its claims.
pub fn verify_hs256(token: &str, secret: &str) -> Result<PlayerClaims, String> {
    let (h, p, sig) = split(token)?;
    if part(h)?.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err("the player token is not signed with HS256".into());
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, format!("{h}.{p}").as_bytes(), &sig)
        .map_err(|_| "the player token signature does not match this app")?;
    serde_json::from_value(part(p)?)
        .map_err(|e| format!("the player token claims are invalid: {e}"))
}

/// One RSA key of a JWKS document.
#[derive(Debug, Clone, Deserialize)]
pub struct Jwk {
    #[serde(default)]
    pub kid: Option<String>,
    pub kty: String,
    #[serde(default)]
    pub n: Option<String>,
    #[serde(default)]
    pub e: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

/// Where Google's signing keys come from: an `https://` URL (Google's own by default), or a
/// file path (or `file://` URL) holding a JWKS document.
pub struct JwksSource {
    location: String,
    cache: Mutex<Option<(Instant, Vec<Jwk>)>>,
}

/// Keys are refetched after this long, or sooner when a token names an unknown key id.
const JWKS_TTL: Duration = Duration::from_secs(3600);
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(10);

pub const GOOGLE_JWKS: &str = "https://www.googleapis.com/oauth2/v3/certs";

impl JwksSource {
    pub fn new(location: impl Into<String>) -> Self {
        Self {
            location: location.into(),
            cache: Mutex::new(None),
        }
    }

    async fn fetch(&self) -> Result<Vec<Jwk>, String> {
        let loc = &self.location;
        let body = if loc.starts_with("http://") || loc.starts_with("https://") {
            let res = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| e.to_string())?
                .get(loc)
                .send()
                .await
                .map_err(|e| format!("cannot fetch Google's keys from {loc}: {e}"))?;
            res.bytes()
                .await
                .map_err(|e| format!("cannot read Google's keys from {loc}: {e}"))?
                .to_vec()
        } else {
            let path = loc.strip_prefix("file://").unwrap_or(loc);
            tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read the JWKS file {path}: {e}"))?
        };
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("invalid JWKS from {loc}: {e}"))?;
        Ok(set.keys)
    }

    /// The keys, from cache unless stale (or `refresh` and the cache is not brand new).
    async fn keys(&self, refresh: bool) -> Result<Vec<Jwk>, String> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, keys)) = cache.as_ref() {
                let age = at.elapsed();
                if age < JWKS_TTL && (!refresh || age < JWKS_MIN_REFRESH) {
                    return Ok(keys.clone());
                }
            }
        }
        let keys = self.fetch().await?;
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), keys.clone()));
        Ok(keys)
    }

    /// Verify a Google ID token: RS256 signature by a key of the set, issuer Google, audience
    /// `client_id`, not expired at `now_s`. Returns the claims.
    pub async fn verify_google(
        &self,
        token: &str,
        client_id: &str,
        now_s: i64,
    ) -> Result<Value, String> {
        let (h, p, sig) = split(token)?;
        let header = part(h)?;
        if header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err("the Google ID token is not signed with RS256".into());
        }
        let kid = header.get("kid").and_then(Value::as_str);
        let input = format!("{h}.{p}");
        let mut verified = false;
        for refresh in [false, true] {
            let keys = self.keys(refresh).await?;
            let candidates: Vec<&Jwk> = keys
                .iter()
                .filter(|k| k.kty == "RSA" && (kid.is_none() || k.kid.as_deref() == kid))
                .collect();
            verified = candidates.iter().any(|k| rsa_verify(k, &input, &sig));
            if verified || !candidates.is_empty() {
                break;
            }
        }
        if !verified {
            return Err("the Google ID token signature is not valid".into());
        }
        let claims = part(p)?;
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        if iss != "accounts.google.com" && iss != "https://accounts.google.com" {
            return Err(format!(
                "the ID token was not issued by Google (iss '{iss}')"
            ));
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => a == client_id,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(client_id)),
            _ => false,
        };
        if !aud_ok {
            return Err("the ID token's audience is not this app's Google client id".into());
        }
        match claims.get("exp").and_then(Value::as_i64) {
            Some(exp) if exp + 60 >= now_s => {}
            Some(_) => return Err("the Google ID token has expired".into()),
            None => return Err("the Google ID token has no expiry".into()),
        }
        if claims.get("sub").and_then(Value::as_str).is_none() {
            return Err("the Google ID token has no subject".into());
        }
        Ok(claims)
    }
}

fn rsa_verify(k: &Jwk, input: &str, sig: &[u8]) -> bool {
    let (Some(n), Some(e)) = (k.n.as_deref(), k.e.as_deref()) else {
        return false;
    };
    let (Ok(n), Ok(e)) = (
        B64.decode(n.trim_end_matches('=')),
        B64.decode(e.trim_end_matches('=')),
    ) else {
        return false;
    };
    signature::RsaPublicKeyComponents { n, e }
        .verify(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            input.as_bytes(),
            sig,
        )
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn player_tokens_round_trip_and_reject_tampering() {
        let claims = PlayerClaims {
            kind: "nickname".into(),
            id: "ada".into(),
            name: "ada".into(),
            iat: 1_700_000_000,
        };
        let token = sign_hs256(&claims, "secret-1");
        assert_eq!(verify_hs256(&token, "secret-1").unwrap(), claims);
        assert!(verify_hs256(&token, "secret-2").is_err());
        let (head, rest) = token.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let forged = B64.encode(br#"{"type":"nickname","id":"eve","name":"eve","iat":1}"#);
        assert!(verify_hs256(&format!("{head}.{forged}.{sig}"), "secret-1").is_err());
        assert!(verify_hs256("garbage", "secret-1").is_err());
        assert!(verify_hs256("a.b.c", "secret-1").is_err());
    }

    #[test]
    fn the_signature_matches_a_known_hs256_vector() {
        // RFC 7515 style check: HMAC-SHA256 over "header.payload" with the secret as key.
        let token = sign_hs256(
            &PlayerClaims {
                kind: "anonymous".into(),
                id: "x".into(),
                name: "y".into(),
                iat: 0,
            },
            "k",
        );
        let (input, sig) = token.rsplit_once('.').unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"k");
        assert_eq!(B64.encode(hmac::sign(&key, input.as_bytes()).as_ref()), sig);
        assert!(input.starts_with("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."));
    }
}
