//! Builds: records, self-served multipart upload (S3 semantics), and RunBuild, which assembles
//! the upload, unpacks it as a hostile archive and checks its `lodge.toml`.

use std::path::PathBuf;

use lodge_artifact::bundle;
use lodge_model::wire::{
    BuildV3, BuildsV3Page, CreateMultipartBuildParams, CreatedBuildV3WithMultipartUrls, UploadPart,
};
use lodge_model::{id, validate, Build, BuildStatus, UploadSession};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::{Caller, Control, Error, Result};

/// On a shared store, a build whose runner's record is older than this is failed (the runner
/// is gone and can never finish it).
pub const BUILD_RUNNER_GONE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Lines of a running build's log.
pub type BuildLog = mpsc::Receiver<String>;

/// Where presigned upload URLs point: the base URL the client used to reach this API.
pub struct UploadTarget<'a> {
    pub base_url: &'a str,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Control {
    fn build_dir(&self, build_id: &str) -> PathBuf {
        self.cfg.data_dir.join("builds").join(build_id)
    }

    async fn build_of(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        build_id: &str,
    ) -> Result<Build> {
        let org = self.org_of(caller, org_id)?;
        match self.store.build(build_id).await? {
            Some(b) if b.org_id == org && b.deleted_at.is_none() => Ok(b),
            _ => Err(Error::NotFound(format!("Build not found: {build_id}"))),
        }
    }

    pub async fn create_build(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        p: CreateMultipartBuildParams,
        target: UploadTarget<'_>,
    ) -> Result<CreatedBuildV3WithMultipartUrls> {
        let org = self.org_of(caller, org_id)?;
        let size = p.build_size_in_bytes;
        if !(size.is_finite() && size >= 1.0 && size.fract() == 0.0) {
            return Err(Error::Invalid(
                "buildSizeInBytes must be a positive integer".into(),
            ));
        }
        let size = size as u64;
        if size > self.cfg.max_build_bytes {
            return Err(Error::Invalid(format!(
                "buildSizeInBytes exceeds the limit of {} bytes",
                self.cfg.max_build_bytes
            )));
        }
        let chunk = self.cfg.max_chunk_size;
        let upload = UploadSession {
            size,
            max_chunk_size: chunk,
            parts: size.div_ceil(chunk) as u32,
            secret: id::secret_hex(),
            completed: false,
        };
        let build = self
            .new_build(caller, org, p.build_id, p.build_tag, Some(upload))
            .await?;
        let (upload_parts, complete_upload_post_request_url) = Self::upload_urls(&build, &target);
        Ok(CreatedBuildV3WithMultipartUrls {
            build: (&build).into(),
            upload_parts,
            max_chunk_size: chunk,
            complete_upload_post_request_url,
        })
    }

    /// Validate and store a new build record (status `created`).
    pub(crate) async fn new_build(
        &self,
        caller: &Caller,
        org: String,
        build_id: Option<String>,
        build_tag: Option<String>,
        upload: Option<UploadSession>,
    ) -> Result<Build> {
        if let Some(tag) = &build_tag {
            validate::max_len("buildTag", tag, 1000).map_err(Error::Invalid)?;
        }
        let build_id = match build_id {
            Some(b) => {
                validate::room_id(&b)
                    .map_err(|m| Error::Invalid(m.replace("roomId", "buildId")))?;
                b
            }
            None => id::build_id(),
        };
        self.check_build_quota(&org, upload.as_ref().map_or(0, |u| u.size))
            .await?;
        let build = Build {
            build_id,
            org_id: org,
            created_by: caller.name.clone(),
            created_at: self.now(),
            status: BuildStatus::Created,
            image_size: 0,
            started_at: None,
            finished_at: None,
            deleted_at: None,
            build_tag,
            content_hash: None,
            upload,
            runner: None,
        };
        self.store.insert_build(&build).await?;
        Ok(build)
    }

    /// 402 when the org has `max_builds_per_org` builds, or this one would take its builds
    /// past `max_org_build_bytes` (declared upload sizes, image sizes once built).
    async fn check_build_quota(&self, org: &str, adding: u64) -> Result<()> {
        let live: Vec<Build> = self
            .store
            .builds(org)
            .await?
            .into_iter()
            .filter(|b| b.deleted_at.is_none())
            .collect();
        let max = self.cfg.max_builds_per_org;
        if live.len() as u64 >= max {
            return Err(Error::NoCapacity(format!(
                "the org has {} builds, the most it may have (--max-builds-per-org {max}); delete old builds",
                live.len()
            )));
        }
        let used: u64 = live
            .iter()
            .map(|b| b.image_size.max(b.upload.as_ref().map_or(0, |u| u.size)))
            .sum();
        let quota = self.cfg.max_org_build_bytes;
        if used.saturating_add(adding) > quota {
            return Err(Error::NoCapacity(format!(
                "the org's builds take {used} bytes; {adding} more would pass its storage quota of \
                 {quota} bytes (--max-org-build-gb); delete old builds"
            )));
        }
        Ok(())
    }

    /// The presigned part URLs and completion URL of a build's multipart upload.
    pub(crate) fn upload_urls(
        build: &Build,
        target: &UploadTarget<'_>,
    ) -> (Vec<UploadPart>, String) {
        let (parts, secret) = build
            .upload
            .as_ref()
            .map(|u| (u.parts, u.secret.clone()))
            .unwrap_or_default();
        let base = target.base_url.trim_end_matches('/');
        let build_id = &build.build_id;
        (
            (1..=parts)
                .map(|n| UploadPart {
                    part_number: n,
                    put_request_url: format!(
                        "{base}/uploads/{build_id}/parts/{n}?signature={secret}"
                    ),
                })
                .collect(),
            format!("{base}/uploads/{build_id}/complete?signature={secret}"),
        )
    }

    /// The build an upload URL refers to, if the signature matches and it still takes uploads.
    async fn upload_session(
        &self,
        build_id: &str,
        signature: &str,
    ) -> Result<(Build, UploadSession)> {
        let build = self.store.build(build_id).await?;
        match build {
            Some(b) if b.deleted_at.is_none() => match b.upload.clone() {
                Some(u) if crate::tokens::same(&u.secret, signature) => {
                    if b.status != BuildStatus::Created || u.completed {
                        return Err(Error::BadRequest(format!(
                            "build {build_id} no longer accepts uploads"
                        )));
                    }
                    Ok((b, u))
                }
                _ => Err(Error::Unauthorized("invalid upload signature".into())),
            },
            _ => Err(Error::NotFound(format!("Build not found: {build_id}"))),
        }
    }

    /// Check an upload URL before its body is read: the signature, the part number. Returns
    /// the most bytes the part may hold.
    pub async fn part_limit(&self, build_id: &str, part: u32, signature: &str) -> Result<u64> {
        let (_, u) = self.upload_session(build_id, signature).await?;
        if part == 0 || part > u.parts {
            return Err(Error::BadRequest(format!(
                "part number must be 1 to {}",
                u.parts
            )));
        }
        Ok(u.max_chunk_size)
    }

    /// Store one part; returns its ETag (quoted, as S3 does).
    pub async fn put_part(
        &self,
        build_id: &str,
        part: u32,
        signature: &str,
        data: &[u8],
    ) -> Result<String> {
        let (_, u) = self.upload_session(build_id, signature).await?;
        if part == 0 || part > u.parts {
            return Err(Error::BadRequest(format!(
                "part number must be 1 to {}",
                u.parts
            )));
        }
        if data.len() as u64 > u.max_chunk_size {
            return Err(Error::BadRequest(format!(
                "a part may hold at most {} bytes",
                u.max_chunk_size
            )));
        }
        if self.shares_files() {
            // Any replica may take the next part, or assemble them.
            let key = crate::shared::upload_parts_key(build_id);
            self.store.put_blob_part(&key, part, data).await?;
            let digest = Sha256::digest(data);
            return Ok(format!("\"{}\"", hex(&digest[..16])));
        }
        let dir = self.build_dir(build_id).join("parts");
        tokio::fs::create_dir_all(&dir).await?;
        // A temporary name of its own: concurrent PUTs of one part each write whole, and the
        // last rename wins.
        let tmp = dir.join(format!("{part}.{}.tmp", id::secret_hex()));
        tokio::fs::write(&tmp, data).await?;
        tokio::fs::rename(&tmp, dir.join(part.to_string())).await?;
        let digest = Sha256::digest(data);
        Ok(format!("\"{}\"", hex(&digest[..16])))
    }

    /// CompleteMultipartUpload: assemble the parts named in the XML, in order.
    pub async fn complete_upload(
        &self,
        build_id: &str,
        signature: &str,
        xml: &str,
    ) -> Result<String> {
        let (mut build, mut u) = self.upload_session(build_id, signature).await?;
        let mut numbers: Vec<u32> = xml
            .split("<PartNumber>")
            .skip(1)
            .filter_map(|s| s.split("</PartNumber>").next()?.trim().parse().ok())
            .collect();
        if numbers.is_empty() {
            numbers = (1..=u.parts).collect();
        }
        numbers.sort_unstable();
        numbers.dedup();
        self.assemble(build_id, &numbers).await?;
        if self.shares_files() {
            // RunBuild may come to another replica.
            let archive = self.build_dir(build_id).join("archive");
            self.share_file(&crate::shared::archive_key(build_id), &archive)
                .await?;
            self.store
                .delete_blobs(&crate::shared::upload_parts_key(build_id))
                .await?;
        }
        u.completed = true;
        build.upload = Some(u);
        self.store.update_build(&build).await?;
        Ok(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CompleteMultipartUploadResult><Bucket>lodge</Bucket><Key>{build_id}</Key></CompleteMultipartUploadResult>\n"
        ))
    }

    async fn assemble(&self, build_id: &str, numbers: &[u32]) -> Result<()> {
        if self.shares_files() {
            return self.assemble_shared(build_id, numbers).await;
        }
        let dir = self.build_dir(build_id);
        let parts = dir.join("parts");
        let archive = dir.join("archive");
        for n in numbers {
            if !tokio::fs::try_exists(parts.join(n.to_string()))
                .await
                .unwrap_or(false)
            {
                return Err(Error::BadRequest(format!("part {n} was not uploaded")));
            }
        }
        let tmp = dir.join(format!("archive.{}.tmp", id::secret_hex()));
        let mut out = tokio::fs::File::create(&tmp).await?;
        for n in numbers {
            let mut f = tokio::fs::File::open(parts.join(n.to_string()))
                .await
                .map_err(|_| Error::BadRequest(format!("part {n} was not uploaded")))?;
            tokio::io::copy(&mut f, &mut out).await?;
        }
        out.sync_all().await?;
        tokio::fs::rename(&tmp, &archive).await?;
        let _ = tokio::fs::remove_dir_all(&parts).await;
        Ok(())
    }

    /// [`Self::assemble`] from parts any replica received.
    async fn assemble_shared(&self, build_id: &str, numbers: &[u32]) -> Result<()> {
        let key = crate::shared::upload_parts_key(build_id);
        let have: Vec<u32> = self
            .store
            .blob_parts(&key)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        if let Some(n) = numbers.iter().find(|n| !have.contains(n)) {
            return Err(Error::BadRequest(format!("part {n} was not uploaded")));
        }
        let dir = self.build_dir(build_id);
        tokio::fs::create_dir_all(&dir).await?;
        let tmp = dir.join(format!("archive.{}.tmp", id::secret_hex()));
        let written = async {
            let mut out = tokio::fs::File::create(&tmp).await?;
            for n in numbers {
                let bytes = self
                    .store
                    .blob_part(&key, *n)
                    .await?
                    .ok_or_else(|| Error::BadRequest(format!("part {n} was not uploaded")))?;
                tokio::io::AsyncWriteExt::write_all(&mut out, &bytes).await?;
            }
            out.sync_all().await?;
            tokio::fs::rename(&tmp, dir.join("archive")).await?;
            Ok::<_, Error>(())
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        written
    }

    /// The upload parts received so far (numbers), wherever they are kept.
    async fn parts_received(&self, build_id: &str, parts: u32) -> Result<Vec<u32>> {
        if self.shares_files() {
            let key = crate::shared::upload_parts_key(build_id);
            return Ok(self
                .store
                .blob_parts(&key)
                .await?
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| (1..=parts).contains(n))
                .collect());
        }
        let dir = self.build_dir(build_id).join("parts");
        Ok((1..=parts)
            .filter(|n| dir.join(n.to_string()).exists())
            .collect())
    }

    /// A whole upload arrived through a form (legacy v2): where every replica can read it.
    pub async fn upload_received(&self, build_id: &str) -> Result<()> {
        if self.shares_files() {
            let archive = self.build_dir(build_id).join("archive");
            self.share_file(&crate::shared::archive_key(build_id), &archive)
                .await?;
        }
        Ok(())
    }

    /// RunBuild: returns the log as it is produced; the build's final status is in the store
    /// once the log ends.
    pub async fn run_build(
        self: &std::sync::Arc<Self>,
        caller: &Caller,
        org_id: Option<&str>,
        build_id: &str,
    ) -> Result<BuildLog> {
        self.run_build_from(caller, org_id, build_id, None).await
    }

    /// CreateBuildRegistry: a build record with no upload; RunBuildRegistry fills it.
    pub async fn create_build_registry(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        p: lodge_model::wire::CreateBuildV3Params,
    ) -> Result<BuildV3> {
        let org = self.org_of(caller, org_id)?;
        let b = self
            .new_build(caller, org, p.build_id, p.build_tag, None)
            .await?;
        Ok((&b).into())
    }

    /// RunBuildRegistry: pull the image, streaming progress; the result is in GetBuild.
    pub async fn run_build_registry(
        self: &std::sync::Arc<Self>,
        caller: &Caller,
        org_id: Option<&str>,
        build_id: &str,
        cfg: lodge_model::wire::RegistryConfig,
    ) -> Result<BuildLog> {
        crate::registry::parse_reference(&cfg.image, cfg.registry_url.as_deref())
            .map_err(Error::Invalid)?;
        self.run_build_from(caller, org_id, build_id, Some(cfg))
            .await
    }

    async fn run_build_from(
        self: &std::sync::Arc<Self>,
        caller: &Caller,
        org_id: Option<&str>,
        build_id: &str,
        registry: Option<lodge_model::wire::RegistryConfig>,
    ) -> Result<BuildLog> {
        let mut build = self.build_of(caller, org_id, build_id).await?;
        if build.status != BuildStatus::Created {
            return Err(Error::BadRequest(format!(
                "build {build_id} has already been run (status {})",
                build.status
            )));
        }
        build.status = BuildStatus::Running;
        build.started_at = Some(self.now());
        build.runner = Some(self.replica_id().to_string());
        if !self
            .store
            .update_build_if(&build, BuildStatus::Created)
            .await?
        {
            return Err(Error::BadRequest(format!(
                "build {build_id} is already being run"
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let control = self.clone();
        tokio::spawn(async move {
            let say = |line: String| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(line + "\n").await;
                }
            };
            let result = match &registry {
                Some(cfg) => control
                    .pull_image(&build.build_id, cfg, &say)
                    .await
                    .map(|(size, digest)| (size, digest.unwrap_or_default())),
                None => control.do_build(&build, &say).await,
            };
            // Other replicas serve this build to nodes: it succeeds once they can read it.
            let result = match result {
                Ok(done) if control.shares_files() => control
                    .share_artifact(&build.build_id)
                    .await
                    .map(|()| done)
                    .map_err(|e| {
                        format!("cannot store the build where every replica reads it: {e}")
                    }),
                other => other,
            };
            let (status, size, hash) = match result {
                Ok((size, hash)) => {
                    say(format!("build {} succeeded", build.build_id)).await;
                    (BuildStatus::Succeeded, size, Some(hash))
                }
                Err(e) => {
                    say(format!("error: {e}")).await;
                    say(format!("build {} failed", build.build_id)).await;
                    (BuildStatus::Failed, 0, None)
                }
            };
            if status == BuildStatus::Failed {
                control.reclaim_failed(&build.build_id).await;
            } else if control.shares_files() {
                // The uploaded archive served only this run; the artifact is what nodes get.
                let key = crate::shared::archive_key(&build.build_id);
                if let Err(e) = control.store.delete_blobs(&key).await {
                    tracing::warn!(build_id = %build.build_id, error = %e, "cannot delete the build's shared archive");
                }
            }
            build.status = status;
            build.runner = None;
            build.image_size = size;
            build.content_hash = hash;
            build.finished_at = Some(control.now());
            // Only over `running`: a build another replica judged orphaned (this one looked
            // gone for a while) stays failed rather than flipping back.
            match control
                .store
                .update_build_if(&build, BuildStatus::Running)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(build_id = %build.build_id, "build was judged failed while it ran; its result is dropped");
                    return;
                }
                Err(e) => {
                    tracing::error!(build_id = %build.build_id, error = %e, "cannot record build result");
                }
            }
            tracing::info!(build_id = %build.build_id, status = %status, "build finished");
        });
        Ok(rx)
    }

    async fn do_build<F, Fut>(
        &self,
        build: &Build,
        say: &F,
    ) -> std::result::Result<(u64, String), String>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let dir = self.build_dir(&build.build_id);
        let archive = dir.join("archive");
        let upload = build.upload.clone().unwrap_or(UploadSession {
            size: 0,
            max_chunk_size: 0,
            parts: 0,
            secret: String::new(),
            completed: false,
        });
        if !archive.exists() && self.shares_files() {
            // Assembled, or uploaded through a form, on another replica.
            self.fetch_shared(&crate::shared::archive_key(&build.build_id), &archive)
                .await
                .map_err(|e| e.to_string())?;
        }
        if !archive.exists() && upload.parts == 0 {
            return Err("no build archive was uploaded for this build".into());
        }
        if !archive.exists() {
            // Clients that skipped the completion call: assemble whatever parts arrived.
            let have = self
                .parts_received(&build.build_id, upload.parts)
                .await
                .map_err(|e| e.to_string())?;
            if have.len() as u32 != upload.parts {
                return Err(format!(
                    "the upload is incomplete: {} of {} parts were received; upload every part before RunBuild",
                    have.len(),
                    upload.parts
                ));
            }
            self.assemble(&build.build_id, &have)
                .await
                .map_err(|e| e.to_string())?;
        }
        let a = archive.clone();
        let (len, hash) = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, String)> {
            use std::io::Read;
            let mut f = std::fs::File::open(&a)?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut len = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                len += n as u64;
            }
            Ok((len, hex(&h.finalize())))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        say(format!("received {len} bytes")).await;
        if upload.size > 0 && len != upload.size {
            say(format!(
                "warning: buildSizeInBytes was {} but {len} bytes were uploaded",
                upload.size
            ))
            .await;
        }
        say(format!("sha256 {hash}")).await;
        say("unpacking the upload".into()).await;
        let staging = dir.join("upload.tmp");
        let _ = tokio::fs::remove_dir_all(&staging).await;
        let (a, s) = (archive.clone(), staging.clone());
        let unpacked = tokio::task::spawn_blocking(move || {
            bundle::unpack_archive(&a, &s, bundle::Limits::default())
        })
        .await
        .map_err(|e| e.to_string())?;
        let (files, bytes) = match unpacked {
            Ok(u) => u,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&staging).await;
                return Err(e.to_string());
            }
        };
        say(format!("unpacked {files} files, {bytes} bytes")).await;
        let result = if staging.join(bundle::MANIFEST).is_file() {
            self.finish_native(&dir, &staging, bytes, say).await
        } else if staging.join("Dockerfile").is_file() {
            self.build_dockerfile(&build.build_id, &staging, say).await
        } else if lodge_artifact::image::is_image_layout(&staging) {
            say("the upload is an image archive; importing it".into()).await;
            self.import_image(&build.build_id, &staging, say).await
        } else {
            Err(bundle::BundleError::NoManifest {
                hint: " (nor a Dockerfile, nor an OCI image layout or docker archive)",
            }
            .to_string())
        };
        let _ = tokio::fs::remove_dir_all(&staging).await;
        let _ = tokio::fs::remove_file(&archive).await;
        let (size, digest) = result?;
        Ok((size, digest.unwrap_or(hash)))
    }

    /// A native bundle: check `lodge.toml` and keep the unpacked tree as the build's bundle.
    async fn finish_native<F, Fut>(
        &self,
        dir: &std::path::Path,
        staging: &std::path::Path,
        bytes: u64,
        say: &F,
    ) -> std::result::Result<(u64, Option<String>), String>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let manifest = bundle::Manifest::load(staging).map_err(|e| e.to_string())?;
        let dest = dir.join("bundle");
        let _ = tokio::fs::remove_dir_all(&dest).await;
        tokio::fs::rename(staging, &dest)
            .await
            .map_err(|e| e.to_string())?;
        say(format!(
            "native bundle; command: {}",
            manifest.command.join(" ")
        ))
        .await;
        if !manifest.env.is_empty() {
            let names: Vec<&str> = manifest.env.keys().map(String::as_str).collect();
            say(format!("env: {}", names.join(", "))).await;
        }
        Ok((bytes, None))
    }

    /// Builds left `running` by a replica that is gone (killed mid-build; on the embedded
    /// store, any earlier run of this server) can never finish: mark them failed.
    pub async fn fail_orphaned_builds(&self) -> Result<usize> {
        // A runner is given longer than a replica's ordinary judgement: failing a build that
        // still runs (its replica slow to write its record) costs the developer a rebuild.
        let alive: Vec<String> = if self.shares_files() {
            self.replicas_seen_within(BUILD_RUNNER_GONE_AFTER)
                .await?
                .into_iter()
                .map(|r| r.replica_id)
                .collect()
        } else {
            Vec::new()
        };
        let orphaned = |b: &Build| {
            b.runner.as_deref() != Some(self.replica_id())
                && !b.runner.as_ref().is_some_and(|r| alive.contains(r))
        };
        let mut n = 0;
        for org in self.store.orgs().await? {
            for mut b in self.store.builds(&org.org_id).await? {
                if b.status == BuildStatus::Running && orphaned(&b) {
                    b.runner = None;
                    b.status = BuildStatus::Failed;
                    b.finished_at = Some(self.now());
                    if self.store.update_build_if(&b, BuildStatus::Running).await? {
                        tracing::warn!(build_id = %b.build_id, "build was interrupted by a restart; marked failed");
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    pub async fn get_build(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        build_id: &str,
    ) -> Result<BuildV3> {
        Ok((&self.build_of(caller, org_id, build_id).await?).into())
    }

    pub async fn get_builds(&self, caller: &Caller, org_id: Option<&str>) -> Result<BuildsV3Page> {
        let org = self.org_of(caller, org_id)?;
        let builds = self.store.builds(&org).await?;
        Ok(BuildsV3Page {
            builds: builds
                .iter()
                .filter(|b| b.deleted_at.is_none())
                .map(Into::into)
                .collect(),
        })
    }

    /// Delete a build's record and upload. Its unpacked bundle stays while processes may run
    /// from it; new deployments cannot use it.
    pub async fn delete_build(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        build_id: &str,
    ) -> Result<()> {
        let mut build = self.build_of(caller, org_id, build_id).await?;
        build.deleted_at = Some(self.now());
        self.store.update_build(&build).await?;
        self.reclaim_deleted(&build).await?;
        Ok(())
    }

    /// Give back the disk of a deleted build: all of it once no live process runs from it,
    /// else everything but what those processes run (then again on the next start).
    async fn reclaim_deleted(&self, build: &Build) -> Result<()> {
        let dir = self.build_dir(&build.build_id);
        if self.build_in_use(build).await? {
            for part in ["parts", "archive", "pull.tmp", "upload.tmp"] {
                remove_any(&dir.join(part)).await;
            }
        } else {
            remove_any(&dir).await;
            self.forget_shared(&build.build_id).await;
        }
        Ok(())
    }

    /// Whether a live process runs a deployment of `build`.
    async fn build_in_use(&self, build: &Build) -> Result<bool> {
        for app in self.store.apps(&build.org_id).await? {
            for d in self.store.deployments(&app.app_id).await? {
                if d.build_id != build.build_id {
                    continue;
                }
                let q = lodge_store::ProcessQuery {
                    deployment_id: Some(d.deployment_id.clone()),
                    statuses: lodge_model::ProcessStatus::LIVE.to_vec(),
                    ..Default::default()
                };
                if self.store.count_processes(&q).await? > 0 {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// At start: the disk of builds deleted while their processes ran, and of failed builds.
    pub async fn reclaim_build_disk(&self) -> Result<usize> {
        let mut n = 0;
        for org in self.store.orgs().await? {
            for b in self.store.builds(&org.org_id).await? {
                let dir = self.build_dir(&b.build_id);
                if b.deleted_at.is_some() && tokio::fs::try_exists(&dir).await.unwrap_or(false) {
                    self.reclaim_deleted(&b).await?;
                    n += 1;
                } else if b.status == BuildStatus::Failed {
                    self.reclaim_failed(&b.build_id).await;
                }
            }
        }
        Ok(n)
    }

    /// A failed build keeps nothing on disk: no process can ever run it.
    async fn reclaim_failed(&self, build_id: &str) {
        remove_any(&self.build_dir(build_id)).await;
        self.forget_shared(build_id).await;
    }

    /// Drop a build's shared files (none on the embedded store).
    async fn forget_shared(&self, build_id: &str) {
        if self.shares_files() {
            if let Err(e) = self
                .store
                .delete_blobs(&crate::shared::build_key(build_id))
                .await
            {
                tracing::warn!(%build_id, error = %e, "cannot delete the build's shared files");
            }
        }
    }

    pub fn bundle_path(&self, build_id: &str) -> PathBuf {
        self.build_dir(build_id).join("bundle")
    }
}

async fn remove_any(path: &std::path::Path) {
    match tokio::fs::symlink_metadata(path).await {
        Ok(m) if m.is_dir() => {
            let _ = tokio::fs::remove_dir_all(path).await;
        }
        Ok(_) => {
            let _ = tokio::fs::remove_file(path).await;
        }
        Err(_) => {}
    }
}
