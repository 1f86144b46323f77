//! Builds as artifacts for joined nodes: the build's bundle packed once into a tar named by
//! its SHA-256, kept beside the build and served to nodes (resumably) by the API.

use std::path::PathBuf;

use lodge_model::{BuildStatus, Node};

use crate::{Control, Error, Result};

/// A packed build, ready to serve.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

impl Control {
    /// The artifact of `build_id` for `node`, packed on first request. Nodes are the
    /// operator's and run every org's processes, so a node credential reaches every build that
    /// can run (succeeded, not deleted).
    pub async fn build_artifact(&self, node: &Node, build_id: &str) -> Result<Artifact> {
        tracing::debug!(node_id = %node.node_id, %build_id, "artifact requested");
        match self.store.build(build_id).await? {
            Some(b) if b.status == BuildStatus::Succeeded && b.deleted_at.is_none() => {}
            _ => return Err(Error::NotFound(format!("Build not found: {build_id}"))),
        }
        let dir = self.cfg.data_dir.join("builds").join(build_id);
        let image = dir
            .join(lodge_artifact::image::DIR)
            .join(lodge_artifact::image::CONFIG)
            .is_file();
        if !image && !dir.join("bundle").is_dir() {
            return Err(Error::NotFound(format!(
                "build {build_id} has nothing to run on this control plane"
            )));
        }
        let tar = dir.join("artifact.tar");
        let sum = dir.join("artifact.sha256");
        let lock = self.artifact_lock(build_id);
        let _held = lock.lock().await;
        if let (Ok(meta), Ok(sha)) = (std::fs::metadata(&tar), std::fs::read_to_string(&sum)) {
            return Ok(Artifact {
                path: tar,
                size: meta.len(),
                sha256: sha.trim().to_string(),
            });
        }
        let tmp = dir.join("artifact.tar.tmp");
        let (t, d) = (tmp.clone(), dir.clone());
        let (size, sha256) = tokio::task::spawn_blocking(move || {
            if image {
                lodge_artifact::pack::pack_image(&d.join(lodge_artifact::image::DIR), &d, &t)
            } else {
                lodge_artifact::pack::pack_dir(&d.join("bundle"), "bundle", &t)
            }
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        std::fs::rename(&tmp, &tar)?;
        std::fs::write(&sum, &sha256)?;
        tracing::info!(%build_id, size, %sha256, "build packed for nodes");
        Ok(Artifact {
            path: tar,
            size,
            sha256,
        })
    }

    fn artifact_lock(&self, build_id: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.artifact_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(build_id.to_string())
            .or_default()
            .clone()
    }
}
