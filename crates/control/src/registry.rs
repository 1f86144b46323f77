//! A small Docker Registry HTTP API v2 client: enough to pull one image (manifest or index for
//! linux/amd64, config and layers, digests checked) into an OCI image layout on disk. Handles
//! anonymous access, Basic auth, and the Bearer token handshake Docker Hub and most registries
//! use.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::egress::EgressPolicy;

/// Largest manifest or index accepted, and largest token-service answer.
pub const MAX_MANIFEST: usize = 4 << 20;
const MAX_TOKEN_BODY: usize = 64 << 10;
/// A registry silent this long in the middle of an answer has failed the pull.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The most redirects one request follows (blob storage usually takes one).
const MAX_REDIRECTS: usize = 5;

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// `[registry/]name[:tag|@digest]` split against an optional explicit registry URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `http://host:port` or `https://host`.
    pub base: String,
    pub name: String,
    pub reference: String,
}

fn local(host: &str) -> bool {
    let h = host.split(':').next().unwrap_or(host);
    h == "localhost" || h == "127.0.0.1" || h == "[::1]" || h.starts_with("127.")
}

pub fn parse_reference(image: &str, registry_url: Option<&str>) -> Result<Reference, String> {
    let image = image.trim();
    if image.is_empty() {
        return Err("image must not be empty".into());
    }
    let (mut host, mut rest) = match image.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (Some(first.to_string()), rest.to_string())
        }
        _ => (None, image.to_string()),
    };
    let mut scheme = None;
    if let Some(url) = registry_url.map(str::trim).filter(|u| !u.is_empty()) {
        let (s, h) = match url.split_once("://") {
            Some((s @ ("http" | "https"), h)) => (Some(s.to_string()), h),
            Some((s, _)) => {
                return Err(format!("registryUrl: the scheme {s} is not http or https"))
            }
            None => (None, url),
        };
        let h = h.strip_suffix('/').unwrap_or(h);
        // An image that repeats the registry host is the same image.
        if let Some(stripped) = image.strip_prefix(&format!("{h}/")) {
            rest = stripped.to_string();
        }
        host = Some(h.to_string());
        scheme = s;
    }
    let host = host.unwrap_or_else(|| "registry-1.docker.io".to_string());
    let docker_hub =
        ["registry-1.docker.io", "docker.io", "index.docker.io"].contains(&host.as_str());
    if docker_hub && !rest.contains('/') {
        rest = format!("library/{rest}");
    }
    let host = if host == "docker.io" || host == "index.docker.io" {
        "registry-1.docker.io".to_string()
    } else {
        host
    };
    // A host and an optional port, nothing else: no path, query, fragment or credentials.
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    {
        return Err(format!(
            "the registry must be a host name with an optional port (such as registry.example.com:5000), not '{host}'"
        ));
    }
    let (name, reference) = if let Some((n, d)) = rest.split_once('@') {
        (n.to_string(), d.to_string())
    } else {
        match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n.to_string(), t.to_string()),
            _ => (rest.clone(), "latest".to_string()),
        }
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
    {
        return Err(format!("invalid image name '{name}'"));
    }
    let scheme = scheme.unwrap_or_else(|| if local(&host) { "http" } else { "https" }.into());
    Ok(Reference {
        base: format!("{scheme}://{host}"),
        name,
        reference,
    })
}

/// Credentials from RegistryConfig.auth: `user:password`, the same base64-encoded (as in a
/// Docker config), or otherwise a bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Creds {
    None,
    Basic(String, String),
    Token(String),
}

fn creds(auth: Option<&str>) -> Creds {
    let Some(a) = auth.map(str::trim).filter(|a| !a.is_empty()) else {
        return Creds::None;
    };
    if let Some((u, p)) = a.split_once(':') {
        return Creds::Basic(u.into(), p.into());
    }
    if let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(a) {
        if let Ok(text) = String::from_utf8(decoded) {
            if let Some((u, p)) = text.split_once(':') {
                return Creds::Basic(u.into(), p.into());
            }
        }
    }
    Creds::Token(a.into())
}

struct Client {
    http: reqwest::Client,
    policy: EgressPolicy,
    /// The registry's host, to which plain-http token services are allowed.
    host: String,
    creds: Creds,
    /// The Authorization value that worked.
    auth: Option<String>,
}

fn challenge_param(header: &str, key: &str) -> Option<String> {
    let i = header.find(&format!("{key}=\""))? + key.len() + 2;
    let end = header[i..].find('"')? + i;
    Some(header[i..end].to_string())
}

impl Client {
    fn basic(&self) -> Option<String> {
        match &self.creds {
            Creds::Basic(u, p) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )),
            _ => None,
        }
    }

    /// Answer a 401 challenge: Basic, or fetch a Bearer token from the realm.
    async fn authenticate(&mut self, challenge: &str, scope: &str) -> Result<(), String> {
        if challenge.to_ascii_lowercase().starts_with("basic") {
            self.auth = Some(
                self.basic()
                    .ok_or("the registry needs credentials: set auth to \"user:password\"")?,
            );
            return Ok(());
        }
        if let Creds::Token(t) = &self.creds {
            if self.auth.is_none() {
                self.auth = Some(format!("Bearer {t}"));
                return Ok(());
            }
        }
        let realm = challenge_param(challenge, "realm")
            .ok_or("the registry answered 401 with an unsupported challenge")?;
        let realm_url = reqwest::Url::parse(&realm)
            .map_err(|_| "the registry named a bad token service URL")?;
        self.policy.check_url(&realm_url)?;
        // Credentials go to a token service of another host only over TLS.
        if realm_url.scheme() != "https" && realm_url.host_str() != Some(self.host.as_str()) {
            return Err(format!(
                "the registry sends credentials to {realm} over plain http; refused"
            ));
        }
        let mut req = self.http.get(realm_url).query(&[("scope", scope)]);
        if let Some(service) = challenge_param(challenge, "service") {
            req = req.query(&[("service", service)]);
        }
        if let Some(b) = self.basic() {
            req = req.header(AUTHORIZATION, b);
        }
        let res = req
            .send()
            .await
            .map_err(|e| format!("cannot reach the token service {realm}: {}", causes(&e)))?;
        if !res.status().is_success() {
            return Err(format!(
                "the registry refused the credentials ({} from {realm})",
                res.status()
            ));
        }
        let body = read_capped(res, MAX_TOKEN_BODY, "the token service's answer").await?;
        let body: Value = serde_json::from_slice(&body)
            .map_err(|_| "the token service answered something other than JSON")?;
        let token = body["token"]
            .as_str()
            .or_else(|| body["access_token"].as_str())
            .ok_or("the token service answered without a token")?;
        self.auth = Some(format!("Bearer {token}"));
        Ok(())
    }

    async fn get(
        &mut self,
        url: &str,
        accept: &str,
        scope: &str,
    ) -> Result<reqwest::Response, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
        self.policy.check_url(&parsed)?;
        for attempt in 0..2 {
            let mut req = self.http.get(parsed.clone()).header(ACCEPT, accept);
            if let Some(a) = &self.auth {
                req = req.header(AUTHORIZATION, a);
            }
            let res = req
                .send()
                .await
                .map_err(|e| format!("cannot reach {url}: {}", causes(&e)))?;
            if res.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = res
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                self.authenticate(&challenge, scope).await?;
                continue;
            }
            if res.status() == StatusCode::UNAUTHORIZED {
                return Err("the registry refused the credentials (401)".into());
            }
            if !res.status().is_success() {
                // The body of a foreign host's error never goes into a build log.
                return Err(format!("{url}: {}", res.status()));
            }
            return Ok(res);
        }
        Err("unreachable".into())
    }
}

/// An error with its causes (reqwest's own message hides why a request failed).
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

/// A whole response body, refused as soon as it passes `max` bytes.
async fn read_capped(
    mut res: reqwest::Response,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, String> {
    if res.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("{what} is larger than {max} bytes"));
    }
    let mut out = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| format!("{what}: {e}"))? {
        if out.len() + chunk.len() > max {
            return Err(format!("{what} is larger than {max} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn hex_of(digest: &str) -> Result<&str, String> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("unsupported digest '{digest}'"))
}

/// Download a blob into the layout, checking its digest.
async fn fetch_blob<F, Fut>(
    client: &mut Client,
    r: &Reference,
    layout: &Path,
    digest: &str,
    size: u64,
    scope: &str,
    say: &F,
) -> Result<u64, String>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let hex = hex_of(digest)?;
    let url = format!("{}/v2/{}/blobs/{digest}", r.base, r.name);
    let mut res = client.get(&url, "*/*", scope).await?;
    let path = layout.join("blobs/sha256").join(hex);
    let tmp = path.with_extension("part");
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let (mut n, mut reported) = (0u64, 0u64);
    if res.content_length().is_some_and(|n| n > size) {
        return Err(format!(
            "blob {digest} is larger than the {size} bytes its manifest says"
        ));
    }
    while let Some(chunk) = res.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        // Checked while streaming: a bogus blob is never written beyond its declared size.
        if n + chunk.len() as u64 > size {
            drop(file);
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(format!(
                "blob {digest} is larger than the {size} bytes its manifest says"
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| e.to_string())?;
        n += chunk.len() as u64;
        if n - reported >= 8 << 20 {
            say(format!("  {} … {:.1} MB", &hex[..12], n as f64 / 1e6)).await;
            reported = n;
        }
    }
    file.flush().await.map_err(|e| e.to_string())?;
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != hex {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(format!(
            "blob {digest} does not match its digest (got sha256:{got})"
        ));
    }
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(|e| e.to_string())?;
    Ok(n)
}

/// Bounds of one pull.
#[derive(Debug, Clone)]
pub struct PullLimits {
    pub egress: EgressPolicy,
    /// Most bytes of layers an image may have.
    pub max_bytes: u64,
}

/// Pull `image` into an OCI image layout at `layout` (created).
pub async fn pull<F, Fut>(
    image: &str,
    registry_url: Option<&str>,
    auth: Option<&str>,
    layout: &Path,
    limits: PullLimits,
    say: &F,
) -> Result<(), String>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let r = parse_reference(image, registry_url)?;
    say(format!("pulling {}/{}:{}", r.base, r.name, r.reference)).await;
    tokio::fs::create_dir_all(layout.join("blobs/sha256"))
        .await
        .map_err(|e| e.to_string())?;
    let policy = limits.egress.clone();
    let redirects = policy.clone();
    let host = reqwest::Url::parse(&r.base)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    let mut client = Client {
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(READ_TIMEOUT)
            .dns_resolver(policy.resolver())
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if let Err(e) = redirects.check_url(attempt.url()) {
                    attempt.error(e)
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(|e| e.to_string())?,
        policy,
        host,
        creds: creds(auth),
        auth: None,
    };
    let scope = format!("repository:{}:pull", r.name);
    let mut reference = r.reference.clone();
    let mut manifest_digest;
    let mut manifest: Value;
    let mut depth = 0;
    loop {
        let url = format!("{}/v2/{}/manifests/{reference}", r.base, r.name);
        let res = client.get(&url, MANIFEST_TYPES, &scope).await?;
        let bytes = read_capped(res, MAX_MANIFEST, "the manifest").await?;
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        manifest_digest = format!("sha256:{hex}");
        if reference.starts_with("sha256:") && reference != manifest_digest {
            return Err(format!("manifest {reference} does not match its digest"));
        }
        manifest = serde_json::from_slice(&bytes).map_err(|e| format!("bad manifest: {e}"))?;
        tokio::fs::write(layout.join("blobs/sha256").join(&hex), &bytes)
            .await
            .map_err(|e| e.to_string())?;
        let Some(list) = manifest["manifests"].as_array() else {
            break;
        };
        depth += 1;
        if depth > 3 {
            return Err("image indexes nest too deeply".into());
        }
        let chosen = list
            .iter()
            .find(|m| {
                m["platform"]["os"].as_str() == Some("linux")
                    && m["platform"]["architecture"].as_str() == Some("amd64")
            })
            .ok_or("the image has no linux/amd64 variant")?;
        reference = chosen["digest"]
            .as_str()
            .ok_or("an index entry has no digest")?
            .to_string();
    }
    if manifest["schemaVersion"].as_i64() != Some(2) {
        return Err("only schema 2 image manifests are supported".into());
    }
    let descriptor = |d: &Value| -> Result<(String, u64), String> {
        let digest = d["digest"].as_str().ok_or("a descriptor has no digest")?;
        let size = d["size"].as_u64().ok_or("a descriptor has no size")?;
        Ok((digest.to_string(), size))
    };
    let (config, config_size) = descriptor(&manifest["config"])?;
    if config_size > MAX_MANIFEST as u64 {
        return Err(format!(
            "the image config is larger than {MAX_MANIFEST} bytes"
        ));
    }
    fetch_blob(&mut client, &r, layout, &config, config_size, &scope, say).await?;
    let layers = manifest["layers"]
        .as_array()
        .ok_or("the manifest has no layers")?
        .iter()
        .map(descriptor)
        .collect::<Result<Vec<_>, _>>()?;
    let declared: u64 = layers.iter().map(|(_, s)| *s).sum();
    if declared > limits.max_bytes {
        return Err(format!(
            "the image's layers are {declared} bytes; at most {} are allowed",
            limits.max_bytes
        ));
    }
    let mut total = 0;
    for (i, (digest, size)) in layers.iter().enumerate() {
        let n = fetch_blob(&mut client, &r, layout, digest, *size, &scope, say).await?;
        total += n;
        say(format!(
            "layer {}/{} {} ({n} bytes)",
            i + 1,
            layers.len(),
            &digest[..19.min(digest.len())]
        ))
        .await;
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest}],
    });
    tokio::fs::write(layout.join("index.json"), index.to_string())
        .await
        .map_err(|e| e.to_string())?;
    tokio::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .await
    .map_err(|e| e.to_string())?;
    say(format!("pulled {manifest_digest}, {total} bytes of layers")).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = parse_reference("nginx", None).unwrap();
        assert_eq!(
            (r.base.as_str(), r.name.as_str(), r.reference.as_str()),
            ("https://registry-1.docker.io", "library/nginx", "latest")
        );
        let r = parse_reference("localhost:5000/games/gs:1.2", None).unwrap();
        assert_eq!(
            (r.base.as_str(), r.name.as_str(), r.reference.as_str()),
            ("http://localhost:5000", "games/gs", "1.2")
        );
        let r = parse_reference("gs@sha256:abc", Some("https://reg.example.com/")).unwrap();
        assert_eq!(
            (r.base.as_str(), r.name.as_str(), r.reference.as_str()),
            ("https://reg.example.com", "gs", "sha256:abc")
        );
        let r = parse_reference("127.0.0.1:5001/gs", Some("127.0.0.1:5001")).unwrap();
        assert_eq!(
            (r.base.as_str(), r.name.as_str()),
            ("http://127.0.0.1:5001", "gs")
        );
        assert!(parse_reference("", None).is_err());
        for url in [
            "http://example.com/v2/x?u=1",
            "https://user:pw@example.com",
            "example.com/path",
            "example.com?x",
            "ftp://example.com",
        ] {
            assert!(parse_reference("gs", Some(url)).is_err(), "{url}");
        }
        assert!(parse_reference("evil.com?x=1/gs", None).is_err());
        assert!(parse_reference("Bad/Name", Some("r.io")).is_err());
    }

    #[test]
    fn credentials() {
        assert_eq!(creds(None), Creds::None);
        assert_eq!(
            creds(Some("ada:pw")),
            Creds::Basic("ada".into(), "pw".into())
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode("ada:pw");
        assert_eq!(creds(Some(&b64)), Creds::Basic("ada".into(), "pw".into()));
        assert_eq!(creds(Some("tok")), Creds::Token("tok".into()));
        assert_eq!(
            challenge_param(
                r#"Bearer realm="https://auth.io/token",service="reg""#,
                "service"
            )
            .as_deref(),
            Some("reg")
        );
    }
}
