//! The agent's side of reaching a control plane: exchanging a join token for a node credential,
//! and opening a node connection (HTTP/1.1 upgraded to the node protocol).

use std::time::Duration;

use lodge_model::protocol::NodeInfo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::{CONNECT_PATH, JOIN_PATH, UPGRADE};

/// How long connecting, the handshake and a join may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The control plane refused the token or credential: retrying will not help.
    #[error("the control plane refused this node: {0}")]
    Refused(String),
    #[error("bad control-plane URL {0}: expected http://HOST:PORT")]
    BadUrl(String),
    #[error("cannot reach the control plane: {0}")]
    Unreachable(String),
}

/// `http://host:port[/]` as `host:port`.
pub fn authority(url: &str) -> Result<String, DialError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| DialError::BadUrl(url.to_string()))?;
    let auth = rest.trim_end_matches('/');
    if auth.is_empty() || auth.contains('/') {
        return Err(DialError::BadUrl(url.to_string()));
    }
    Ok(if auth.contains(':') {
        auth.to_string()
    } else {
        format!("{auth}:80")
    })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct JoinRequest<'a> {
    join_token: &'a str,
    info: &'a NodeInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_id: Option<&'a str>,
}

/// What a join answers: the node's id and the credential it connects with from now on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Joined {
    pub node_id: String,
    pub credential: String,
}

/// Exchange a join token for a node credential.
pub async fn join(
    control_url: &str,
    join_token: &str,
    info: &NodeInfo,
    fleet_id: Option<&str>,
) -> Result<Joined, DialError> {
    authority(control_url)?;
    let client = reqwest::Client::builder()
        .timeout(DIAL_TIMEOUT)
        .build()
        .map_err(|e| DialError::Unreachable(e.to_string()))?;
    let url = format!("{}{JOIN_PATH}", control_url.trim_end_matches('/'));
    let resp = client
        .post(&url)
        .json(&JoinRequest {
            join_token,
            info,
            fleet_id,
        })
        .send()
        .await
        .map_err(|e| DialError::Unreachable(e.to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let msg = body["message"]
            .as_str()
            .map_or_else(|| status.to_string(), str::to_string);
        return Err(if status.is_client_error() {
            DialError::Refused(msg)
        } else {
            DialError::Unreachable(msg)
        });
    }
    resp.json()
        .await
        .map_err(|e| DialError::Unreachable(format!("unexpected answer to a join: {e}")))
}

/// Open a node connection: the stream is the node protocol's from the first byte returned.
pub async fn connect(
    control_url: &str,
    credential: &str,
) -> Result<BufReader<TcpStream>, DialError> {
    let auth = authority(control_url)?;
    tokio::time::timeout(DIAL_TIMEOUT, handshake(&auth, credential))
        .await
        .map_err(|_| DialError::Unreachable(format!("{auth}: no answer within {DIAL_TIMEOUT:?}")))?
}

async fn handshake(auth: &str, credential: &str) -> Result<BufReader<TcpStream>, DialError> {
    let unreachable = |e: std::io::Error| DialError::Unreachable(format!("{auth}: {e}"));
    let stream = TcpStream::connect(auth).await.map_err(unreachable)?;
    let _ = stream.set_nodelay(true);
    let mut stream = BufReader::new(stream);
    let request = format!(
        "GET {CONNECT_PATH} HTTP/1.1\r\nHost: {auth}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE}\r\nAuthorization: Bearer {credential}\r\n\r\n"
    );
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(unreachable)?;
    // The status line and headers, bounded; a refusal's JSON body follows them.
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = (&mut stream)
            .take(16 << 10)
            .read_until(b'\n', &mut head)
            .await
            .map_err(unreachable)?;
        if n == 0 || head.len() > 16 << 10 {
            return Err(DialError::Unreachable(format!("{auth}: malformed answer")));
        }
        if &head[before..] == b"\r\n" {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status == 101 {
        return Ok(stream);
    }
    let mut body = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut body))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    let body: serde_json::Value = serde_json::from_slice(&body[..n]).unwrap_or_default();
    let msg = body["message"]
        .as_str()
        .map_or_else(|| format!("HTTP {status}"), str::to_string);
    Err(match status {
        401 | 403 | 404 => DialError::Refused(msg),
        _ => DialError::Unreachable(msg),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_urls() {
        assert_eq!(authority("http://10.0.0.1:5634").unwrap(), "10.0.0.1:5634");
        assert_eq!(authority("http://cp.example/").unwrap(), "cp.example:80");
        assert!(authority("https://cp.example").is_err());
        assert!(authority("http://cp.example/x").is_err());
    }
}
