//! Builds reach a joined node as artifacts it fetches from the control plane: a tar of the
//! build's bundle, or of its container image as an OCI layout, named by its SHA-256. A download resumes where it stopped, is verified
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
    #[error("build {build}'s image is refused: {source}")]
    Image {
        build: String,
        #[source]
        source: lodge_artifact::image::ImageError,
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
    /// The control plane's replicas (one URL, or several); a download that cannot reach one
    /// tries the next.
    control_urls: Vec<String>,
    next_url: std::sync::atomic::AtomicUsize,
    credential: String,
    builds_dir: PathBuf,
    client: reqwest::Client,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bytes of unpacked builds kept; the least recently used beyond it are removed.
    cache_limit: u64,
}

/// Marks in a fetched build's directory: when a process last needed it, and its size.
const LAST_USED: &str = ".last-used";
const SIZE: &str = ".size";
/// Where an imported image's config is, under a build's directory.
const IMAGE_CONFIG: &str = "image/image.json";

/// Attempts after the first for a download that was cut or refused.
const FETCH_ATTEMPTS: u32 = 5;
/// The longest a fetch may go without a byte arriving.
const STALL: Duration = Duration::from_secs(30);

impl Fetcher {
    /// `control_url`: the control plane's URL, or several replicas' separated by commas.
    pub fn new(control_url: &str, credential: &str, data_dir: &Path) -> Self {
        Self {
            control_urls: control_url
                .split(',')
                .map(|u| u.trim().trim_end_matches('/').to_string())
                .filter(|u| !u.is_empty())
                .collect(),
            next_url: std::sync::atomic::AtomicUsize::new(0),
            credential: credential.to_string(),
            builds_dir: data_dir.join("builds"),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(STALL)
                .build()
                .unwrap_or_default(),
            inflight: Mutex::default(),
            cache_limit: 20 << 30,
        }
    }

    /// Keep at most this many bytes of unpacked builds.
    pub fn with_cache_limit(mut self, bytes: u64) -> Self {
        self.cache_limit = bytes;
        self
    }

    /// Remove the least recently used builds until the cache fits its limit, never one in
    /// `keep` (builds of processes that run here).
    pub fn evict(&self, keep: &std::collections::BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.builds_dir) else {
            return;
        };
        let mut builds: Vec<(std::time::SystemTime, u64, PathBuf, String)> = entries
            .flatten()
            // Builds only: not a download, a staging dir or an import in progress.
            .filter(|e| !e.file_name().to_string_lossy().contains('.'))
            .filter_map(|e| {
                let dir = e.path();
                let size: u64 = std::fs::read_to_string(dir.join(SIZE))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                let used = std::fs::metadata(dir.join(LAST_USED))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                Some((
                    used,
                    size,
                    dir,
                    e.file_name().to_string_lossy().into_owned(),
                ))
            })
            .collect();
        let mut total: u64 = builds.iter().map(|b| b.1).sum();
        builds.sort();
        for (_, size, dir, id) in builds {
            if total <= self.cache_limit {
                break;
            }
            if keep.contains(&id) {
                continue;
            }
            if std::fs::remove_dir_all(&dir).is_ok() {
                tracing::info!(build_id = %id, size, "build evicted from the node's cache");
                total -= size;
            }
        }
    }

    /// The build's directory (its `bundle/`, or its `image/` for a container image), fetched
    /// first if this node does not have it.
    pub async fn ensure(&self, build_id: &str) -> Result<PathBuf, FetchError> {
        let dir = self.builds_dir.join(build_id);
        let touch = || {
            let _ = std::fs::write(dir.join(LAST_USED), b"");
        };
        let have = || dir.join("bundle").is_dir() || dir.join(IMAGE_CONFIG).is_file();
        if have() {
            touch();
            return Ok(dir);
        }
        let lock = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(build_id.to_string())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        if !have() {
            // A cut or refused download (the control plane still packing a large build, a
            // part that no longer fits) or a corrupted one is fetched again, a few times with
            // backoff; one that does not unpack under the rules (hostile) is not.
            let mut attempt = 0u32;
            loop {
                match self.fetch(build_id).await {
                    Ok(()) => break,
                    Err(e @ (FetchError::Http { .. } | FetchError::Digest { .. }))
                        if attempt < FETCH_ATTEMPTS =>
                    {
                        attempt += 1;
                        tracing::warn!(%build_id, error = %e, attempt, "fetching the build again");
                        tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
                    }
                    Err(e) => {
                        self.inflight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(build_id);
                        return Err(e);
                    }
                }
            }
        }
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(build_id);
        touch();
        Ok(dir)
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
        let turn = self.next_url.load(std::sync::atomic::Ordering::Relaxed);
        let base = self
            .control_urls
            .get(turn % self.control_urls.len().max(1))
            .map_or("", String::as_str);
        let url = format!("{base}{}", artifact_path(build_id));
        let mut req = self.client.get(&url).bearer_auth(&self.credential);
        if have > 0 {
            req = req.header("range", format!("bytes={have}-"));
        }
        let mut resp = req.send().await.map_err(|e| {
            // The next attempt asks another replica (every replica serves every artifact,
            // byte for byte the same, so a part fetched from one resumes from another).
            self.next_url
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            http(e.to_string())
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            // The part already holds it all (a fetch cut before it was verified), or the
            // artifact changed: start again from nothing.
            let _ = tokio::fs::remove_file(&part).await;
            return Err(http(
                "the saved part does not fit the artifact; it is fetched again".into(),
            ));
        }
        if !status.is_success() {
            // A replica that cannot serve it now (overloaded, its database unreachable, a
            // proxy in front of it failing): the next attempt asks another.
            if status.is_server_error() {
                self.next_url
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
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
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            // Cut mid-body (the replica died): resume from another.
            self.next_url
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            http(e.to_string())
        })? {
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
    let bytes = match unpacked {
        Ok((_, bytes)) => bytes,
        Err(source) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(FetchError::Unpack {
                build: build.to_string(),
                source,
            });
        }
    };
    std::fs::write(staging.join(SIZE), bytes.to_string()).map_err(io)?;
    let layout = staging.join(lodge_artifact::image::DIR);
    if layout.join("index.json").is_file() {
        // A container image: import its layout as the control plane did, then drop it.
        let imported = staging.with_extension("image");
        let _ = std::fs::remove_dir_all(&imported);
        let result = lodge_artifact::image::import(
            &layout,
            &imported,
            lodge_artifact::image::Limits::default(),
        );
        let _ = std::fs::remove_dir_all(&layout);
        if let Err(source) = result {
            let _ = std::fs::remove_dir_all(&staging);
            let _ = std::fs::remove_dir_all(&imported);
            return Err(FetchError::Image {
                build: build.to_string(),
                source,
            });
        }
        std::fs::rename(&imported, &layout).map_err(io)?;
    } else if let Err(source) = lodge_artifact::bundle::Manifest::load(&staging.join("bundle")) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lodge-fetch-{tag}-{}-{}",
            std::process::id(),
            lodge_model::id::secret_hex()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Written raw, so hostile names survive.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn sha(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn a_good_artifact_is_unpacked_and_a_bad_one_refused() {
        let dir = scratch("verify");
        let good = tar_of(&[
            ("bundle/lodge.toml", b"command = [\"./x\"]\n"),
            ("bundle/x", b"hi"),
        ]);
        let part = dir.join("b1.part");
        std::fs::write(&part, &good).unwrap();
        verify_and_unpack(&part, "b1", &sha(&good), &dir).unwrap();
        assert_eq!(std::fs::read(dir.join("b1/bundle/x")).unwrap(), b"hi");
        assert!(dir.join("b1").join(SIZE).is_file());

        // Corrupted in transit: the digest does not match; nothing is unpacked, the part goes.
        std::fs::write(&part, &good[..good.len() - 512]).unwrap();
        let e = verify_and_unpack(&part, "b2", &sha(&good), &dir).unwrap_err();
        assert!(matches!(e, FetchError::Digest { .. }), "{e}");
        assert!(!dir.join("b2").exists() && !part.exists());

        // Hostile (a path climbing out), with the right digest: refused by the bundle rules.
        let evil = tar_of(&[
            ("bundle/lodge.toml", b"command = [\"./x\"]\n"),
            ("../escaped", b"x"),
        ]);
        std::fs::write(&part, &evil).unwrap();
        let e = verify_and_unpack(&part, "b3", &sha(&evil), &dir).unwrap_err();
        assert!(matches!(e, FetchError::Unpack { .. }), "{e}");
        assert!(!dir.join("b3").exists() && !dir.parent().unwrap().join("escaped").exists());

        // No manifest: refused too.
        let bare = tar_of(&[("bundle/x", b"x")]);
        std::fs::write(&part, &bare).unwrap();
        assert!(verify_and_unpack(&part, "b4", &sha(&bare), &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_container_image_travels_as_a_layout_and_is_imported_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("image");
        let image = dir.join("built").join(lodge_artifact::image::DIR);
        let rootfs = image.join(lodge_artifact::image::ROOTFS);
        std::fs::create_dir_all(rootfs.join("usr/bin")).unwrap();
        std::fs::create_dir_all(rootfs.join("secret")).unwrap();
        std::fs::write(rootfs.join("usr/bin/game"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(
            rootfs.join("usr/bin/game"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(
            rootfs.join("secret"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        std::os::unix::fs::symlink("/usr/bin", rootfs.join("bin")).unwrap();
        let config = lodge_artifact::image::ImageConfig {
            entrypoint: vec!["/bin/game".into()],
            cmd: vec!["--port".into(), "7777".into()],
            env: vec!["MODE=ranked".into()],
            working_dir: "/srv".into(),
            user: "1000".into(),
            exposed_ports: vec!["7777/udp".into()],
            size: 1,
            digest: "sha256:x".into(),
        };
        std::fs::write(
            image.join(lodge_artifact::image::CONFIG),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        let part = dir.join("img.part");
        let (_, digest) =
            lodge_artifact::pack::pack_image(&image, &dir.join("built"), &part).unwrap();
        let builds = dir.join("builds");
        std::fs::create_dir_all(&builds).unwrap();
        verify_and_unpack(&part, "img", &digest, &builds).unwrap();
        let got = builds.join("img").join(lodge_artifact::image::DIR);
        let loaded = lodge_artifact::image::ImageConfig::load(&got).unwrap();
        assert_eq!(
            (
                loaded.argv(),
                &loaded.env,
                &loaded.working_dir,
                &loaded.user,
                &loaded.exposed_ports
            ),
            (
                config.argv(),
                &config.env,
                &config.working_dir,
                &config.user,
                &config.exposed_ports
            )
        );
        let root = got.join(lodge_artifact::image::ROOTFS);
        assert_eq!(
            std::fs::read(root.join("usr/bin/game")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        let mode = |p: &str| {
            std::fs::metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!((mode("usr/bin/game"), mode("secret")), (0o755, 0o700));
        assert_eq!(
            std::fs::read_link(root.join("bin")).unwrap(),
            Path::new("/usr/bin")
        );
        assert!(!got.join("index.json").exists(), "the layout is not kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn eviction_keeps_what_runs_and_the_newest() {
        let dir = scratch("evict");
        let f = Fetcher::new("http://127.0.0.1:1", "c", &dir).with_cache_limit(250);
        let builds = dir.join("builds");
        for (i, id) in ["old", "mid", "new"].iter().enumerate() {
            let d = builds.join(id);
            std::fs::create_dir_all(d.join("bundle")).unwrap();
            std::fs::write(d.join(SIZE), "100").unwrap();
            std::fs::write(d.join(LAST_USED), "").unwrap();
            let t = std::time::SystemTime::now() - Duration::from_secs(100 - i as u64 * 10);
            std::fs::File::options()
                .write(true)
                .open(d.join(LAST_USED))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        // 300 bytes over a 250 limit: the oldest goes, unless it runs; then the next.
        let keep: std::collections::BTreeSet<String> = ["old".to_string()].into();
        f.evict(&keep);
        assert!(
            builds.join("old").exists()
                && !builds.join("mid").exists()
                && builds.join("new").exists()
        );
        f.evict(&Default::default());
        assert!(
            builds.join("old").exists(),
            "200 bytes fit: nothing more goes"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
