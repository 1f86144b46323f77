//! `lodge deploy`: pack, upload in parallel parts, build, and create a deployment.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clap::Args;
use serde_json::{json, Value};

use super::api::{enc, err, pipe, CliError, Result};
use super::pack;
use super::table::{print_json, s};
use super::Ctx;

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  lodge deploy examples/echo --transport udp --container-port 7777\n  \
lodge deploy server.tgz --rooms-per-process 4 --env TICK_RATE=60 --additional-port debug:7778/tcp\n  \
lodge deploy . --from-latest --build-tag v1.2.3"
)]
pub struct DeployArgs {
    /// A directory (tarred honouring .dockerignore and .gitignore) or a .tgz/.tar.gz/.tar archive.
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// Copy the latest deployment's settings; flags given here override them.
    #[arg(long)]
    pub from_latest: bool,
    /// Rooms one process holds [default: 1]
    #[arg(long)]
    pub rooms_per_process: Option<u32>,
    /// udp, tcp or tls [default: udp]
    #[arg(long)]
    pub transport: Option<String>,
    /// The port the game server binds [default: 7777]
    #[arg(long)]
    pub container_port: Option<u16>,
    /// Extra port NAME:PORT/PROTO, e.g. debug:7778/tcp (repeatable)
    #[arg(long = "additional-port", value_name = "NAME:PORT/PROTO")]
    pub additional_ports: Vec<String>,
    /// Environment variable K=V for every process (repeatable)
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// vCPUs per process [default: 0.5]
    #[arg(long)]
    pub cpu: Option<f64>,
    /// Memory per process in MB [default: 1024]
    #[arg(long)]
    pub memory_mb: Option<f64>,
    /// Stop processes idle for 5 minutes (no rooms, no connections) [default]
    #[arg(long, overrides_with = "no_idle_timeout")]
    pub idle_timeout: bool,
    /// Keep idle processes running.
    #[arg(long, overrides_with = "idle_timeout")]
    pub no_idle_timeout: bool,
    /// Your version label for the build.
    #[arg(long)]
    pub build_tag: Option<String>,
    /// A label for the deployment.
    #[arg(long)]
    pub deployment_tag: Option<String>,
    /// Parts uploaded at once.
    #[arg(long, default_value_t = 4, hide = true)]
    pub parallel: usize,
}

fn parse_port(spec: &str) -> Result<Value> {
    let bad = || {
        CliError(format!(
            "--additional-port '{spec}': expected NAME:PORT/PROTO, e.g. debug:7778/tcp"
        ))
    };
    let (name, rest) = spec.split_once(':').ok_or_else(bad)?;
    let (port, proto) = rest.split_once('/').unwrap_or((rest, "tcp"));
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(json!({ "name": name, "port": port, "transportType": proto }))
}

fn parse_env(spec: &str) -> Result<Value> {
    let (k, v) = spec
        .split_once('=')
        .ok_or_else(|| CliError(format!("--env '{spec}': expected K=V")))?;
    Ok(json!({ "name": k, "value": v }))
}

/// The archive bytes, and the messages about it, printed once the app is known (so a failure
/// before that prints only its error).
fn archive(path: &Path) -> Result<(Vec<u8>, Vec<String>)> {
    let mut notes = Vec::new();
    let meta = std::fs::metadata(path).map_err(|e| CliError(format!("{}: {e}", path.display())))?;
    if meta.is_dir() {
        let files = pack::collect(path)?;
        if files.is_empty() {
            return err(format!("{} has no files to deploy", path.display()));
        }
        if !files.iter().any(|f| f == "lodge.toml" || f == "Dockerfile") {
            notes.push(format!(
                "warning: {} has neither lodge.toml nor a Dockerfile at its root; Lodge will fail this build",
                path.display()
            ));
        }
        let data = pack::tar_gz(path, &files)?;
        notes.push(format!(
            "packed {} files from {} ({})",
            files.len(),
            path.display(),
            human(data.len() as u64)
        ));
        Ok((data, notes))
    } else {
        let data = std::fs::read(path).map_err(|e| CliError(format!("{}: {e}", path.display())))?;
        let gzip = data.starts_with(&[0x1f, 0x8b]);
        let tar = data.get(257..262) == Some(b"ustar".as_slice());
        if !gzip && !tar {
            return err(format!(
                "{} is neither a directory nor a .tgz/.tar.gz/.tar archive",
                path.display()
            ));
        }
        notes.push(format!(
            "uploading {} ({})",
            path.display(),
            human(data.len() as u64)
        ));
        Ok((data, notes))
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn progress(done: u64, total: u64) {
    let width = 30;
    let filled = (done * width / total.max(1)) as usize;
    eprint!(
        "\r  [{}{}] {:>3}% {} / {}",
        "#".repeat(filled),
        " ".repeat(width as usize - filled),
        done * 100 / total.max(1),
        human(done),
        human(total)
    );
    let _ = std::io::stderr().flush();
}

/// The multipart upload of a created build: parts in parallel, each answered with an ETag.
pub(crate) async fn upload(
    ctx: &Ctx,
    created: &Value,
    data: Arc<Vec<u8>>,
    parallel: usize,
) -> Result<()> {
    let chunk = created["maxChunkSize"]
        .as_u64()
        .filter(|c| *c > 0)
        .ok_or_else(|| CliError("no maxChunkSize".into()))?;
    let parts: Vec<(u64, String)> = created["uploadParts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["partNumber"].as_u64().unwrap_or(0),
                s(&p["putRequestUrl"]),
            )
        })
        .collect();
    let total = data.len() as u64;
    let done = Arc::new(AtomicU64::new(0));
    let tty = std::io::stderr().is_terminal();
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (n, url) in parts {
        let (http, data, done, sem) = (
            ctx.api.http.clone(),
            data.clone(),
            done.clone(),
            sem.clone(),
        );
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let start = ((n.saturating_sub(1)) * chunk).min(total) as usize;
            let end = (n * chunk).min(total) as usize;
            let body = data[start..end].to_vec();
            let res = http
                .put(&url)
                .header("content-type", "application/octet-stream")
                .body(body)
                .send()
                .await
                .map_err(CliError::from)?;
            if !res.status().is_success() {
                let status = res.status();
                return Err(CliError(format!(
                    "part {n}: HTTP {status}: {}",
                    res.text().await.unwrap_or_default()
                )));
            }
            let etag = res
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| {
                    CliError(format!("part {n}: the upload answered without an ETag"))
                })?;
            let sent =
                done.fetch_add((end - start) as u64, Ordering::Relaxed) + (end - start) as u64;
            if tty {
                progress(sent, total);
            } else {
                eprintln!("  uploaded part {n} ({})", human((end - start) as u64));
            }
            Ok::<_, CliError>((n, etag))
        });
    }
    let mut etags = Vec::new();
    while let Some(r) = tasks.join_next().await {
        etags.push(r.map_err(|e| CliError(e.to_string()))??);
    }
    if tty {
        eprintln!();
    }
    etags.sort();
    let xml: String = etags
        .iter()
        .map(|(n, e)| format!("<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>"))
        .collect();
    let res = ctx
        .api
        .http
        .post(s(&created["completeUploadPostRequestUrl"]))
        .header("content-type", "application/xml")
        .body(format!(
            "<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>"
        ))
        .send()
        .await?;
    if !res.status().is_success() {
        return err(format!(
            "completing the upload failed: HTTP {}",
            res.status()
        ));
    }
    Ok(())
}

/// The app to deploy to: the given one (which must exist), the only one, or a new one named
/// after the directory or archive.
async fn app_for(ctx: &Ctx, path: &Path) -> Result<String> {
    if ctx.has_app() {
        let app = ctx.app().await?;
        ctx.api.get(&format!("/apps/v2/apps/{}", enc(&app))).await?;
        return Ok(app);
    }
    let apps = ctx.api.get("/apps/v2/apps").await?;
    if apps["applications"]
        .as_array()
        .is_some_and(|a| a.is_empty())
    {
        let base = std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
            .map(|n| {
                [".tar.gz", ".tgz", ".tar"]
                    .iter()
                    .find_map(|ext| n.strip_suffix(ext).map(str::to_string))
                    .unwrap_or(n)
            })
            .unwrap_or_else(|| "game".into());
        let name: String = base
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>()
            .trim_matches('-')
            .chars()
            .take(64)
            .collect();
        let name = if name.is_empty() {
            "game".to_string()
        } else {
            name
        };
        let app = ctx
            .api
            .post(
                "/apps/v2/apps",
                json!({"appName": name, "authConfiguration": {"anonymous": {}}}),
            )
            .await?;
        eprintln!("created application {} ({})", s(&app["appId"]), name);
        return Ok(s(&app["appId"]));
    }
    ctx.app().await
}

pub async fn run(ctx: &Ctx, a: DeployArgs) -> Result<()> {
    // Everything that can fail locally fails before anything is created on the server.
    let additional_ports = a
        .additional_ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>>>()?;
    let env = a
        .env
        .iter()
        .map(|e| parse_env(e))
        .collect::<Result<Vec<_>>>()?;
    let (data, notes) = archive(&a.path)?;
    let data = Arc::new(data);
    let app = app_for(ctx, &a.path).await?;
    // The settings to copy, before uploading a build that could not be deployed without them.
    let latest = if a.from_latest {
        Some(
            ctx.api
                .get(&format!(
                    "/deployments/v3/apps/{}/deployments/latest",
                    enc(&app)
                ))
                .await?,
        )
    } else {
        None
    };
    for n in notes {
        eprintln!("{n}");
    }
    let mut params = json!({ "buildSizeInBytes": data.len() });
    if let Some(t) = &a.build_tag {
        params["buildTag"] = json!(t);
    }
    let created = ctx.api.post("/builds/v3/builds", params).await?;
    let build_id = s(&created["buildId"]);
    eprintln!("build {build_id}: uploading");
    upload(ctx, &created, data, a.parallel).await?;
    eprintln!("build {build_id}: building");
    let log = ctx
        .api
        .stream(
            reqwest::Method::POST,
            &format!("/builds/v3/builds/{}/run", enc(&build_id)),
        )
        .await?;
    pipe(log, &mut std::io::stderr()).await?;
    let build = ctx
        .api
        .get(&format!("/builds/v3/builds/{}", enc(&build_id)))
        .await?;
    if build["status"] != "succeeded" {
        return err(format!("build {build_id} {}", s(&build["status"])));
    }

    let mut config = if let Some(latest) = latest {
        json!({
            "idleTimeoutEnabled": latest["idleTimeoutEnabled"],
            "env": latest["env"],
            "roomsPerProcess": latest["roomsPerProcess"],
            "transportType": latest["defaultContainerPort"]["transportType"],
            "containerPort": latest["defaultContainerPort"]["port"],
            "additionalContainerPorts": latest["additionalContainerPorts"],
            "requestedCPU": latest["requestedCPU"],
            "requestedMemoryMB": latest["requestedMemoryMB"],
        })
    } else {
        json!({
            "idleTimeoutEnabled": true, "env": [], "roomsPerProcess": 1, "transportType": "udp",
            "containerPort": 7777, "additionalContainerPorts": [], "requestedCPU": 0.5, "requestedMemoryMB": 1024,
        })
    };
    config["buildId"] = json!(build_id);
    if let Some(v) = a.rooms_per_process {
        config["roomsPerProcess"] = json!(v);
    }
    if let Some(v) = &a.transport {
        config["transportType"] = json!(v);
    }
    if let Some(v) = a.container_port {
        config["containerPort"] = json!(v);
    }
    if !additional_ports.is_empty() {
        config["additionalContainerPorts"] = additional_ports.into();
    }
    if !env.is_empty() {
        config["env"] = env.into();
    }
    if let Some(v) = a.cpu {
        config["requestedCPU"] = json!(v);
    }
    if let Some(v) = a.memory_mb {
        config["requestedMemoryMB"] = json!(v);
    }
    if a.no_idle_timeout {
        config["idleTimeoutEnabled"] = json!(false);
    } else if a.idle_timeout {
        config["idleTimeoutEnabled"] = json!(true);
    }
    if let Some(t) = &a.deployment_tag {
        config["deploymentTag"] = json!(t);
    }
    let d = ctx
        .api
        .post(
            &format!("/deployments/v3/apps/{}/deployments", enc(&app)),
            config,
        )
        .await?;
    if ctx.json {
        print_json(&d);
    } else {
        println!("{}", s(&d["deploymentId"]));
        let port = &d["defaultContainerPort"];
        eprintln!(
            "deployed {} to app {app}: {}/{}, {} room(s) per process\nnext:\n  lodge rooms create --region London --wait{}",
            s(&d["deploymentId"]),
            s(&port["port"]),
            s(&port["transportType"]),
            s(&d["roomsPerProcess"]),
            if ctx.has_app() { String::new() } else { format!("   (add --app-id {app} once you have several apps)") }
        );
    }
    Ok(())
}
