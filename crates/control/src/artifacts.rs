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
        self.pack_artifact(build_id).await
    }

    /// A build's artifact: packed here once, or (replicas sharing a store) copied once from
    /// where the replica that built it shared it.
    pub(crate) async fn pack_artifact(&self, build_id: &str) -> Result<Artifact> {
        let dir = self.cfg.data_dir.join("builds").join(build_id);
        let tar = dir.join("artifact.tar");
        let sum = dir.join("artifact.sha256");
        let held = self.artifact_lock(build_id).lock_owned().await;
        if let (Ok(meta), Ok(sha)) = (std::fs::metadata(&tar), std::fs::read_to_string(&sum)) {
            return Ok(Artifact {
                path: tar,
                size: meta.len(),
                sha256: sha.trim().to_string(),
            });
        }
        let image = dir
            .join(lodge_artifact::image::DIR)
            .join(lodge_artifact::image::CONFIG)
            .is_file();
        if !image && !dir.join("bundle").is_dir() {
            if self.shares_files() {
                let key = crate::shared::artifact_key(build_id);
                if let Some(shared) = self.fetch_shared(&key, &tar).await? {
                    std::fs::write(&sum, &shared.sha256)?;
                    return Ok(Artifact {
                        path: tar,
                        size: shared.size,
                        sha256: shared.sha256,
                    });
                }
            }
            return Err(Error::NotFound(format!(
                "build {build_id} has nothing to run on this control plane"
            )));
        }
        // Packing runs to its end even if the node that asked goes away (a large image can
        // take longer than a client waits), so its retry finds it done.
        let build = build_id.to_string();
        let packing = tokio::spawn(async move {
            let _held = held;
            let scratch = dir.join(format!("pack-{}", lodge_model::id::secret_hex()));
            std::fs::create_dir_all(&scratch)?;
            let (t, d, s) = (scratch.join("artifact.tar"), dir.clone(), scratch.clone());
            let packed = tokio::task::spawn_blocking(move || {
                if image {
                    lodge_artifact::pack::pack_image(&d.join(lodge_artifact::image::DIR), &s, &t)
                } else {
                    lodge_artifact::pack::pack_dir(&d.join("bundle"), "bundle", &t)
                }
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
            let done = packed.and_then(|(size, sha256)| {
                std::fs::write(&sum, &sha256)?;
                std::fs::rename(scratch.join("artifact.tar"), &tar)?;
                Ok((size, sha256))
            });
            let _ = std::fs::remove_dir_all(&scratch);
            let (size, sha256) = done?;
            tracing::info!(build_id = %build, size, %sha256, "build packed for nodes");
            Ok::<_, std::io::Error>(Artifact {
                path: tar,
                size,
                sha256,
            })
        });
        Ok(packing
            .await
            .map_err(|e| Error::Internal(e.to_string()))??)
    }

    /// Pack a build that just succeeded and share its artifact with every replica.
    pub(crate) async fn share_artifact(&self, build_id: &str) -> Result<()> {
        let a = self.pack_artifact(build_id).await?;
        let shared = self
            .share_file(&crate::shared::artifact_key(build_id), &a.path)
            .await?;
        if shared.sha256 != a.sha256 {
            return Err(Error::Internal(format!(
                "the artifact of build {build_id} changed while it was shared"
            )));
        }
        tracing::info!(%build_id, size = shared.size, parts = shared.parts, "build shared with every replica");
        Ok(())
    }

    /// Share every build that can run (`lodge migrate`: a one-box Lodge's builds, for replicas
    /// on the database it moved to). Returns how many.
    pub async fn share_all_builds(&self) -> Result<usize> {
        let mut n = 0;
        for org in self.store.orgs().await? {
            for b in self.store.builds(&org.org_id).await? {
                if b.status == BuildStatus::Succeeded && b.deleted_at.is_none() {
                    self.share_artifact(&b.build_id).await?;
                    n += 1;
                }
            }
        }
        Ok(n)
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
