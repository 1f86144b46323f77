//! Container images for builds: a `Dockerfile` upload built with a daemonless builder
//! (buildah by default), an uploaded image archive imported as is, or an image pulled from a
//! registry. Each ends as `builds/<id>/image/` (a shared read-only root file system and the
//! image config) for the `oci` driver.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use lodge_artifact::image::{self, ImageConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::Control;

type BuildResult = std::result::Result<(u64, Option<String>), String>;

impl Control {
    fn image_dir(&self, build_id: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join("builds")
            .join(build_id)
            .join(image::DIR)
    }

    /// Import an unpacked OCI layout or docker archive as the build's image.
    pub(crate) async fn import_image<F, Fut>(
        &self,
        build_id: &str,
        layout: &Path,
        say: &F,
    ) -> BuildResult
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let dest = self.image_dir(build_id);
        let staging = dest.with_extension("tmp");
        let _ = tokio::fs::remove_dir_all(&staging).await;
        let (l, s) = (layout.to_path_buf(), staging.clone());
        let imported =
            tokio::task::spawn_blocking(move || image::import(&l, &s, image::Limits::default()))
                .await
                .map_err(|e| e.to_string())?;
        let config = match imported {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&staging).await;
                return Err(format!("cannot import the image: {e}"));
            }
        };
        let _ = tokio::fs::remove_dir_all(&dest).await;
        tokio::fs::rename(&staging, &dest)
            .await
            .map_err(|e| e.to_string())?;
        describe(&config, say).await;
        Ok((config.size, Some(config.digest)))
    }

    /// `<builder> ... bud` the Dockerfile context, export it as an OCI layout, import that.
    pub(crate) async fn build_dockerfile<F, Fut>(
        &self,
        build_id: &str,
        context: &Path,
        say: &F,
    ) -> BuildResult
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let builder = self.cfg.image_builder.clone();
        let store = self.cfg.data_dir.join("buildah");
        let tag = format!("localhost/lodge-build-{}", build_id.to_ascii_lowercase());
        let base = |cmd: &mut tokio::process::Command| {
            cmd.arg("--root")
                .arg(store.join("storage"))
                .arg("--runroot")
                .arg(store.join("run"))
                .arg("--storage-driver")
                .arg("vfs");
        };
        say(format!("building the Dockerfile with {builder}")).await;
        let mut bud = tokio::process::Command::new(&builder);
        base(&mut bud);
        bud.args(["bud", "--isolation", "chroot", "--format", "oci", "-t"])
            .arg(&tag)
            .arg(context);
        match run_logged(bud, say).await {
            Ok(true) => {}
            Ok(false) => return Err(format!("{builder} could not build the Dockerfile")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "this build has a Dockerfile, but the image builder '{builder}' is not \
                     installed; install buildah (Debian/Ubuntu: apt-get install buildah) or point \
                     --image-builder at one"
                ));
            }
            Err(e) => return Err(format!("cannot run {builder}: {e}")),
        }
        let layout = context.with_extension("oci");
        let _ = tokio::fs::remove_dir_all(&layout).await;
        let mut push = tokio::process::Command::new(&builder);
        base(&mut push);
        push.arg("push")
            .arg(&tag)
            .arg(format!("oci:{}", layout.display()));
        let pushed = run_logged(push, say).await;
        let mut rmi = tokio::process::Command::new(&builder);
        base(&mut rmi);
        rmi.arg("rmi").arg(&tag);
        let _ = run_logged(rmi, &|_| async {}).await;
        if !matches!(pushed, Ok(true)) {
            let _ = tokio::fs::remove_dir_all(&layout).await;
            return Err(format!("{builder} could not export the image"));
        }
        let result = self.import_image(build_id, &layout, say).await;
        let _ = tokio::fs::remove_dir_all(&layout).await;
        result
    }

    /// Pull `image` from a registry into the build's image.
    pub(crate) async fn pull_image<F, Fut>(
        &self,
        build_id: &str,
        cfg: &lodge_model::wire::RegistryConfig,
        say: &F,
    ) -> BuildResult
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let layout = self
            .cfg
            .data_dir
            .join("builds")
            .join(build_id)
            .join("pull.tmp");
        let _ = tokio::fs::remove_dir_all(&layout).await;
        let limits = crate::registry::PullLimits {
            egress: self.cfg.egress.clone(),
            max_bytes: self.cfg.max_build_bytes,
        };
        let deadline = self.cfg.pull_deadline;
        let pulled = match tokio::time::timeout(
            deadline,
            crate::registry::pull(
                &cfg.image,
                cfg.registry_url.as_deref(),
                cfg.auth.as_deref(),
                &layout,
                limits,
                say,
            ),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the pull did not finish within {} s",
                deadline.as_secs()
            )),
        };
        let result = match pulled {
            Ok(()) => self.import_image(build_id, &layout, say).await,
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_dir_all(&layout).await;
        result
    }
}

async fn describe<F, Fut>(c: &ImageConfig, say: &F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    say(format!("image {} ({} bytes)", c.digest, c.size)).await;
    say(format!("runs: {}", c.argv().join(" "))).await;
    if !c.exposed_ports.is_empty() {
        say(format!("exposes: {}", c.exposed_ports.join(", "))).await;
    }
}

/// Run a command, passing every line it prints to `say`; true if it exited 0.
async fn run_logged<F, Fut>(mut cmd: tokio::process::Command, say: &F) -> std::io::Result<bool>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().map(|s| BufReader::new(s).lines());
    let mut err = child.stderr.take().map(|s| BufReader::new(s).lines());
    loop {
        let line = tokio::select! {
            l = async { out.as_mut().unwrap().next_line().await }, if out.is_some() => {
                match l { Ok(Some(l)) => Some(l), _ => { out = None; None } }
            }
            l = async { err.as_mut().unwrap().next_line().await }, if err.is_some() => {
                match l { Ok(Some(l)) => Some(l), _ => { err = None; None } }
            }
            else => break,
        };
        if let Some(l) = line {
            say(l).await;
        }
    }
    Ok(child.wait().await?.success())
}
