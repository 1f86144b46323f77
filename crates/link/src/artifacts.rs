//! Builds reach a joined node as artifacts it fetches from the control plane: a tar of the
//! build's bundle, named by its SHA-256. A download resumes where it stopped, is verified
//! against the digest before anything is unpacked, and is unpacked under the bundle rules (so a
//! hostile or corrupted artifact is refused); the node keeps what it fetched, and each build is
//! fetched once however many processes start at the same time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::{artifact_path, DIGEST_HEADER};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot fetch build {build}: {message}")]
    Http { build: String, message: String },
    #[error("build {build}'s artifact is corrupted: its SHA-256 is {got}, the control plane said {want}")]
    Digest {
        build: String,
        got: String,
        want: String,
    },
    #[error("build {build}'s artifact is refused: {source}")]
    Unpack {
        build: String,
        #[source]
        source: lodge_artifact::bundle::BundleError,
    },
    #[error("i/o error fetching build {build}: {source}")]
    Io {
        build: String,
        #[source]
        source: std::io::Error,
    },
}

/// Fetches builds into `<data_dir>/builds/<build_id>/bundle`.
#[derive(Debug)]
pub struct Fetcher {
    control_url: String,
    credential: String,
    builds_dir: PathBuf,
    client: reqwest::Client,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The longest a fetch may go without a byte arriving.
const STALL: Duration = Duration::from_secs(30);

impl Fetcher {
    pub fn new(control_url: &str, credential: &str, data_dir: &Path) -> Self {
        Self {
            control_url: control_url.trim_end_matches('/').to_string(),
            credential: credential.to_string(),
            builds_dir: data_dir.join("builds"),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(STALL)
                .build()
                .unwrap_or_default(),
            inflight: Mutex::default(),
        }
    }

    /// The build's bundle, fetched first if this node does not have it.
    pub async fn ensure(&self, build_id: &str) -> Result<PathBuf, FetchError> {
        let bundle = self.builds_dir.join(build_id).join("bundle");
        if bundle.is_dir() {
            return Ok(bundle);
        }
        let lock = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(build_id.to_string())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        if !bundle.is_dir() {
            self.fetch(build_id).await?;
        }
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(build_id);
        Ok(bundle)
    }

    async fn fetch(&self, build_id: &str) -> Result<(), FetchError> {
        let build = build_id.to_string();
        let io = |source| FetchError::Io {
            build: build.clone(),
            source,
        };
        let http = |message: String| FetchError::Http {
            build: build.clone(),
            message,
        };
        tokio::fs::create_dir_all(&self.builds_dir)
            .await
            .map_err(io)?;
        let part = self.builds_dir.join(format!("{build_id}.part"));
        let mut have = tokio::fs::metadata(&part).await.map_or(0, |m| m.len());
        let url = format!("{}{}", self.control_url, artifact_path(build_id));
        let mut req = self.client.get(&url).bearer_auth(&self.credential);
        if have > 0 {
            req = req.header("range", format!("bytes={have}-"));
        }
        let mut resp = req.send().await.map_err(|e| http(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            return Err(http(
                body["message"]
                    .as_str()
                    .map_or_else(|| status.to_string(), str::to_string),
            ));
        }
        let want = resp
            .headers()
            .get(DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| http(format!("the answer has no {DIGEST_HEADER}")))?;
        if status != reqwest::StatusCode::PARTIAL_CONTENT {
            have = 0; // the whole artifact again
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(have > 0)
            .write(true)
            .truncate(have == 0)
            .open(&part)
            .await
            .map_err(io)?;
        while let Some(chunk) = resp.chunk().await.map_err(|e| http(e.to_string()))? {
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        drop(file);
        let (p, b, dir) = (part.clone(), build.clone(), self.builds_dir.clone());
        tokio::task::spawn_blocking(move || verify_and_unpack(&p, &b, &want, &dir))
            .await
            .map_err(|e| io(std::io::Error::other(e.to_string())))?
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn verify_and_unpack(
    part: &Path,
    build: &str,
    want: &str,
    builds: &Path,
) -> Result<(), FetchError> {
    let io = |source| FetchError::Io {
        build: build.to_string(),
        source,
    };
    let got = sha256_file(part).map_err(io)?;
    if got != want {
        // Start again from nothing next time.
        let _ = std::fs::remove_file(part);
        return Err(FetchError::Digest {
            build: build.to_string(),
            got,
            want: want.to_string(),
        });
    }
    let staging = builds.join(format!("{build}.unpack"));
    let _ = std::fs::remove_dir_all(&staging);
    let unpacked = lodge_artifact::bundle::unpack_archive(
        part,
        &staging,
        lodge_artifact::bundle::Limits::default(),
    );
    let _ = std::fs::remove_file(part);
    if let Err(source) = unpacked {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(FetchError::Unpack {
            build: build.to_string(),
            source,
        });
    }
    let bundle = staging.join("bundle");
    if let Err(source) = lodge_artifact::bundle::Manifest::load(&bundle) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(FetchError::Unpack {
            build: build.to_string(),
            source,
        });
    }
    let dest = builds.join(build);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&staging, &dest).map_err(io)?;
    Ok(())
}
