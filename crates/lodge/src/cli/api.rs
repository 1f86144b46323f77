//! A small client for the Hathora-compatible API, with errors shown as the server wrote them.

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// A failure to show the user; the process exits non-zero.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<reqwest::Error> for CliError {
    fn from(e: reqwest::Error) -> Self {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        CliError(msg)
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, CliError>;

pub fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(CliError(msg.into()))
}

#[derive(Clone)]
pub struct Api {
    pub base: String,
    token: Option<String>,
    pub http: reqwest::Client,
}

/// Percent-encode one path segment or query value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Api {
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("lodge-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn request(&self, method: Method, path: &str) -> Result<reqwest::RequestBuilder> {
        let token = self.token.as_ref().ok_or_else(|| {
            CliError(
                "no developer token: pass --token, or set LODGE_TOKEN or HATHORA_TOKEN \
                 (a local `lodge serve` writes one to ./lodge-data/admin-token)"
                    .into(),
            )
        })?;
        Ok(self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token))
    }

    /// Send and fail on a non-success status with the server's `message`.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let res = req.send().await.map_err(|e| {
            // A connection failure reads best as its root cause ("Connection refused").
            let why = if e.is_connect() || e.is_timeout() {
                let mut cause: &dyn std::error::Error = &e;
                while let Some(next) = cause.source() {
                    cause = next;
                }
                cause.to_string()
            } else {
                CliError::from(e).0
            };
            CliError(format!("cannot reach {}: {why}", self.base))
        })?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or(body);
        Err(CliError(format!("{message} (HTTP {})", status.as_u16())))
    }

    pub async fn json(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self.request(method, path)?;
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = self.send(req).await?;
        if res.status() == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let text = res.text().await?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|e| CliError(format!("unexpected response: {e}: {text}")))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.json(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.json(Method::POST, path, Some(body)).await
    }

    /// POST without a body.
    pub async fn post_empty(&self, path: &str) -> Result<Value> {
        self.json(Method::POST, path, None).await
    }

    /// A streaming response (build and process logs).
    pub async fn stream(&self, method: Method, path: &str) -> Result<reqwest::Response> {
        self.send(self.request(method, path)?).await
    }

    /// A streaming response to a POST with a JSON body (RunBuildRegistry's log).
    pub async fn stream_json(&self, path: &str, body: Value) -> Result<reqwest::Response> {
        self.send(self.request(Method::POST, path)?.json(&body))
            .await
    }
}

/// Copy a streaming body to a writer as it arrives.
pub async fn pipe(mut res: reqwest::Response, out: &mut impl std::io::Write) -> Result<()> {
    while let Some(chunk) = res.chunk().await? {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}
