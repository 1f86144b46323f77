//! Build files every replica must be able to read when replicas share a store: uploaded parts,
//! an assembled upload, and the packed artifact nodes download. They live in the store as
//! blobs of [`PART_BYTES`] parts, with a small record written last (size, SHA-256), so a reader
//! never takes a half-written file for a whole one. A replica that needs one copies it into its
//! own data dir once, checking size and digest, and serves it from there. On the embedded store
//! none of this runs: the data dir is the only copy.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Control, Error, Result};

/// Parts of a shared file (at most this many bytes each).
const PART_BYTES: usize = 8 << 20;

/// What is written after every part, so that readers know the file is whole.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SharedFile {
    pub parts: u32,
    pub size: u64,
    pub sha256: String,
}

/// Blob keys of one build's files.
pub(crate) fn build_key(build_id: &str) -> String {
    format!("build/{build_id}")
}
pub(crate) fn upload_parts_key(build_id: &str) -> String {
    format!("build/{build_id}/upload-parts")
}
pub(crate) fn archive_key(build_id: &str) -> String {
    format!("build/{build_id}/archive")
}
pub(crate) fn artifact_key(build_id: &str) -> String {
    format!("build/{build_id}/artifact")
}

fn record_key(key: &str) -> String {
    format!("{key}/record")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Control {
    /// Whether build files must go where every replica reads them.
    pub(crate) fn shares_files(&self) -> bool {
        self.store.shared()
    }

    /// Copy a local file into the store under `key`; returns its record.
    pub(crate) async fn share_file(&self, key: &str, path: &Path) -> Result<SharedFile> {
        // Whatever an earlier attempt left is replaced whole.
        self.store.delete_blobs(key).await?;
        let mut f = tokio::fs::File::open(path).await?;
        let mut h = Sha256::new();
        let (mut parts, mut size) = (0u32, 0u64);
        let mut buf = vec![0u8; PART_BYTES];
        loop {
            let mut filled = 0;
            while filled < PART_BYTES {
                let n = f.read(&mut buf[filled..]).await?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            parts += 1;
            h.update(&buf[..filled]);
            size += filled as u64;
            self.store.put_blob_part(key, parts, &buf[..filled]).await?;
            if filled < PART_BYTES {
                break;
            }
        }
        let record = SharedFile {
            parts,
            size,
            sha256: hex(&h.finalize()),
        };
        let json = serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))?;
        self.store.put_blob_part(&record_key(key), 1, &json).await?;
        Ok(record)
    }

    /// The record of a shared file, if it was shared whole.
    pub(crate) async fn shared_record(&self, key: &str) -> Result<Option<SharedFile>> {
        let Some(json) = self.store.blob_part(&record_key(key), 1).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&json).ok())
    }

    /// Copy the shared file `key` to `dest` (atomically, checked against its record); `None`
    /// if no whole file is shared under `key`.
    pub(crate) async fn fetch_shared(&self, key: &str, dest: &Path) -> Result<Option<SharedFile>> {
        let Some(record) = self.shared_record(key).await? else {
            return Ok(None);
        };
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = dest.with_extension(format!("{}.tmp", lodge_model::id::secret_hex()));
        let copied = async {
            let mut out = tokio::fs::File::create(&tmp).await?;
            let mut h = Sha256::new();
            let mut size = 0u64;
            for part in 1..=record.parts {
                let bytes = self.store.blob_part(key, part).await?.ok_or_else(|| {
                    Error::Internal(format!("shared file {key} lost part {part}"))
                })?;
                h.update(&bytes);
                size += bytes.len() as u64;
                out.write_all(&bytes).await?;
            }
            out.sync_all().await?;
            if size != record.size || hex(&h.finalize()) != record.sha256 {
                return Err(Error::Internal(format!(
                    "shared file {key} does not match its record"
                )));
            }
            tokio::fs::rename(&tmp, dest).await?;
            Ok(())
        }
        .await;
        if copied.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        copied.map(|()| Some(record))
    }
}
