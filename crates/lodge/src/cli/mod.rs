//! The developer CLI. It talks only to the public API, so it works against any Lodge (or any
//! Hathora-compatible endpoint).

pub mod api;
pub mod deploy;
pub mod nodes;
pub mod pack;
pub mod replicas;
mod table;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{json, Value};

pub use api::CliError;
use api::{enc, err, Api, Result};
pub use deploy::DeployArgs;
use table::{print_json, s, Table};

/// Options shared by every API command.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// API base URL [env: LODGE_API_URL] [default: http://127.0.0.1:5634]
    #[arg(long, global = true)]
    pub api_url: Option<String>,
    /// Developer token [env: LODGE_TOKEN, HATHORA_TOKEN; a local server's ./lodge-data/admin-token]
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Application id [env: LODGE_APP_ID, HATHORA_APP_ID; the only app, if there is one]
    #[arg(long, global = true)]
    pub app_id: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

fn env_any(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

fn is_local(url: &str) -> bool {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let host = rest.split(['/', ':']).next().unwrap_or("");
    matches!(host, "127.0.0.1" | "localhost" | "[") || rest.starts_with("[::1]")
}

/// Everything an API command needs.
pub struct Ctx {
    pub api: Api,
    pub json: bool,
    app_id: Option<String>,
}

impl Ctx {
    pub fn new(g: &Global) -> Result<Self> {
        let url = g
            .api_url
            .clone()
            .or_else(|| env_any(&["LODGE_API_URL"]))
            .unwrap_or_else(|| "http://127.0.0.1:5634".into());
        let mut token = g
            .token
            .clone()
            .or_else(|| env_any(&["LODGE_TOKEN", "HATHORA_TOKEN"]));
        if token.is_none() && is_local(&url) {
            let dir = env_any(&["LODGE_DATA_DIR"]).unwrap_or_else(|| "./lodge-data".into());
            token = std::fs::read_to_string(PathBuf::from(dir).join("admin-token"))
                .ok()
                .map(|t| t.trim().to_string());
        }
        Ok(Self {
            api: Api::new(&url, token)?,
            json: g.json,
            app_id: g
                .app_id
                .clone()
                .or_else(|| env_any(&["LODGE_APP_ID", "HATHORA_APP_ID"])),
        })
    }

    /// The app to act on: the one given, else the only app of the org.
    pub async fn app(&self) -> Result<String> {
        if let Some(a) = &self.app_id {
            return Ok(a.clone());
        }
        let apps = self.api.get("/apps/v2/apps").await?;
        let list = apps["applications"].as_array().cloned().unwrap_or_default();
        match list.as_slice() {
            [one] => Ok(s(&one["appId"])),
            [] => err("no application yet: create one with `lodge apps create NAME` (or run `lodge deploy`)"),
            many => {
                let names: Vec<String> = many.iter().map(|a| format!("{} ({})", s(&a["appId"]), s(&a["appName"]))).collect();
                err(format!("several applications; choose one with --app-id or LODGE_APP_ID: {}", names.join(", ")))
            }
        }
    }

    pub fn has_app(&self) -> bool {
        self.app_id.is_some()
    }

    fn print(&self, v: &Value, table: impl FnOnce(&Value) -> Table) {
        if self.json {
            print_json(v);
        } else {
            table(v).print();
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AppsCmd {
    /// List applications.
    List,
    /// Create an application (appName: a-z, 0-9 and '-').
    Create { name: String },
    /// Show one application (default: the current one).
    Info { app_id: Option<String> },
    /// Delete an application.
    Delete { app_id: String },
    /// Keep warm processes of the current app's latest deployment in a region (its
    /// `serviceConfig.staticProcessAllocation`): `--target` processes, or with `--autoscale`
    /// as many as demand asks for, between `--min` and `--max`.
    Scale {
        region: String,
        #[arg(long, default_value_t = 0)]
        min: u32,
        /// Processes to keep (not with --autoscale).
        #[arg(long, conflicts_with = "autoscale")]
        target: Option<u32>,
        /// At most this many (default: the instance's maximum per app).
        #[arg(long)]
        max: Option<u32>,
        /// Follow demand instead of a fixed target.
        #[arg(long)]
        autoscale: bool,
        /// With --autoscale: rooms per process to aim at; the rest of each process's
        /// roomsPerProcess is headroom for bursts.
        #[arg(long, default_value_t = 1.0)]
        rooms_per_process: f64,
        /// Remove the region's allocation instead.
        #[arg(long, conflicts_with_all = ["target", "autoscale"])]
        off: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BuildsCmd {
    /// List builds.
    List,
    /// Show one build.
    Info { build_id: String },
    /// Delete a build.
    Delete { build_id: String },
}

#[derive(Debug, Subcommand)]
pub enum DeploymentsCmd {
    /// List deployments, newest first.
    List {
        #[arg(long)]
        deployment_tag: Option<String>,
        #[arg(long)]
        build_tag: Option<String>,
    },
    /// Show a deployment (an id, or `latest`).
    Info {
        #[arg(default_value = "latest")]
        deployment_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoomsCmd {
    /// Create a room; with --wait, print host:port once it is active.
    #[command(
        after_help = "Example:\n  ADDR=$(lodge rooms create --region London --wait)\n  echo hello | nc -u -w1 ${ADDR%:*} ${ADDR#*:}"
    )]
    Create {
        #[arg(long)]
        region: String,
        /// Room config handed to the game server (at most 10000 characters).
        #[arg(long)]
        config: Option<String>,
        /// Your own room id (letters, digits, '_' and '-').
        #[arg(long)]
        room_id: Option<String>,
        /// Pin a deployment instead of the latest.
        #[arg(long)]
        deployment_id: Option<String>,
        /// Wait until the room is active and print host:port.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Show a room with its allocation history.
    Info { room_id: String },
    /// List the rooms of a process (default: of every live process).
    List {
        #[arg(long)]
        process: Option<String>,
        /// Rooms that were on the process and no longer are.
        #[arg(long)]
        inactive: bool,
    },
    /// Destroy a room.
    Destroy { room_id: String },
    /// Wait until a room is active and print its connection info.
    Connect {
        room_id: String,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProcessesCmd {
    /// The 10 most recent processes.
    List {
        /// starting, running, draining, stopping, stopped, failed (repeatable)
        #[arg(long)]
        status: Vec<String>,
        /// Region filter (repeatable)
        #[arg(long)]
        region: Vec<String>,
    },
    /// Show one process.
    Info { process_id: String },
    /// Stop a process (SIGTERM, then SIGKILL); its rooms are destroyed.
    Stop { process_id: String },
    /// Start a process ahead of demand (pre-warm).
    Create {
        #[arg(long)]
        region: String,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub process_id: String,
    /// Keep streaming until the process ends.
    #[arg(short, long)]
    pub follow: bool,
    /// Lines from the end to start with (1-5000).
    #[arg(long, default_value_t = 100)]
    pub tail: u32,
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// List the org's tokens.
    List,
    /// Create a token; its secret is printed once.
    Create {
        name: String,
        /// Comma-separated scopes (for example `builds:read-write,deployments:read-write`);
        /// without it the token is an admin token, which only an admin token may create.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
    },
    /// Revoke a token.
    Revoke { token_id: String },
}

async fn org_id(ctx: &Ctx) -> Result<String> {
    let orgs = ctx.api.get("/orgs/v1").await?;
    match orgs["orgs"].as_array().and_then(|o| o.first()) {
        Some(o) => Ok(s(&o["orgId"])),
        None => err("the token belongs to no organization"),
    }
}

pub async fn apps(ctx: &Ctx, cmd: AppsCmd) -> Result<()> {
    let row = |a: &Value| {
        vec![
            s(&a["appId"]),
            s(&a["appName"]),
            s(&a["deployment"]["deploymentId"]),
            s(&a["createdAt"]),
        ]
    };
    match cmd {
        AppsCmd::List => {
            let v = ctx.api.get("/apps/v2/apps").await?;
            ctx.print(&v, |v| {
                Table::new(&["APP ID", "NAME", "LATEST DEPLOYMENT", "CREATED"])
                    .rows(v["applications"].as_array().into_iter().flatten().map(row))
            });
        }
        AppsCmd::Create { name } => {
            let v = ctx
                .api
                .post(
                    "/apps/v2/apps",
                    json!({"appName": name, "authConfiguration": {"anonymous": {}}}),
                )
                .await?;
            ctx.print(&v, |v| {
                Table::new(&["APP ID", "NAME", "LATEST DEPLOYMENT", "CREATED"]).rows([row(v)])
            });
        }
        AppsCmd::Info { app_id } => {
            let id = match app_id {
                Some(a) => a,
                None => ctx.app().await?,
            };
            let v = ctx.api.get(&format!("/apps/v2/apps/{}", enc(&id))).await?;
            ctx.print(&v, |v| {
                Table::kv(&[
                    ("app id", &v["appId"]),
                    ("name", &v["appName"]),
                    ("secret", &v["appSecret"]),
                    ("org", &v["orgId"]),
                    ("created", &v["createdAt"]),
                ])
            });
            let warm = v["serviceConfig"]["staticProcessAllocation"].as_array();
            if !ctx.json && warm.is_some_and(|w| !w.is_empty()) {
                println!();
                warm_table(&v).print();
            }
        }
        AppsCmd::Scale {
            region,
            min,
            target,
            max,
            autoscale,
            rooms_per_process,
            off,
        } => {
            let id = ctx.app().await?;
            let path = format!("/apps/v2/apps/{}", enc(&id));
            let app = ctx.api.get(&path).await?;
            let mut cfg = match &app["serviceConfig"] {
                Value::Object(o) => Value::Object(o.clone()),
                _ => json!({"staticProcessAllocation": []}),
            };
            let mut list: Vec<Value> = cfg["staticProcessAllocation"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e["region"].as_str() != Some(region.as_str()))
                .collect();
            if !off {
                let mut e = json!({"region": region, "minProcesses": min, "maxProcesses": max});
                if autoscale {
                    e["autoscalingEnabled"] = json!(true);
                    cfg["processAutoscalerConfig"] = json!({"targetMetric": {
                        "metricName": "concurrent-requests", "metricValue": rooms_per_process}});
                } else {
                    e["targetProcesses"] = json!(target.unwrap_or(min));
                }
                list.push(e);
            }
            cfg["staticProcessAllocation"] = Value::Array(list);
            let v = ctx
                .api
                .json(
                    reqwest::Method::PATCH,
                    &path,
                    Some(json!({"serviceConfig": cfg})),
                )
                .await?;
            ctx.print(&v, warm_table);
        }
        AppsCmd::Delete { app_id } => {
            ctx.api
                .json(
                    reqwest::Method::DELETE,
                    &format!("/apps/v2/apps/{}", enc(&app_id)),
                    None,
                )
                .await?;
            eprintln!("deleted {app_id}");
        }
    }
    Ok(())
}

/// An app's warm capacity per region, as GetApp shows it.
fn warm_table(v: &Value) -> Table {
    Table::new(&["REGION", "MIN", "TARGET", "MAX", "AUTOSCALE"]).rows(
        v["serviceConfig"]["staticProcessAllocation"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                vec![
                    s(&e["region"]),
                    s(&e["minProcesses"]),
                    s(&e["targetProcesses"]),
                    s(&e["maxProcesses"]),
                    s(&e["autoscalingEnabled"]),
                ]
            }),
    )
}

fn build_row(b: &Value) -> Vec<String> {
    vec![
        s(&b["buildId"]),
        s(&b["buildTag"]),
        s(&b["status"]),
        s(&b["imageSize"]),
        s(&b["createdAt"]),
    ]
}

pub async fn builds(ctx: &Ctx, cmd: BuildsCmd) -> Result<()> {
    const H: &[&str] = &["BUILD ID", "TAG", "STATUS", "SIZE", "CREATED"];
    match cmd {
        BuildsCmd::List => {
            let v = ctx.api.get("/builds/v3/builds").await?;
            ctx.print(&v, |v| {
                Table::new(H).rows(v["builds"].as_array().into_iter().flatten().map(build_row))
            });
        }
        BuildsCmd::Info { build_id } => {
            let v = ctx
                .api
                .get(&format!("/builds/v3/builds/{}", enc(&build_id)))
                .await?;
            ctx.print(&v, |v| Table::new(H).rows([build_row(v)]));
        }
        BuildsCmd::Delete { build_id } => {
            ctx.api
                .json(
                    reqwest::Method::DELETE,
                    &format!("/builds/v3/builds/{}", enc(&build_id)),
                    None,
                )
                .await?;
            eprintln!("deleted {build_id}");
        }
    }
    Ok(())
}

fn deployment_row(d: &Value) -> Vec<String> {
    let port = &d["defaultContainerPort"];
    vec![
        s(&d["deploymentId"]),
        s(&d["buildTag"]),
        s(&d["deploymentTag"]),
        format!("{}/{}", s(&port["port"]), s(&port["transportType"])),
        s(&d["roomsPerProcess"]),
        format!(
            "{} cpu {} MB",
            s(&d["requestedCPU"]),
            s(&d["requestedMemoryMB"])
        ),
        s(&d["createdAt"]),
    ]
}

const DEPLOYMENT_HEADERS: &[&str] = &[
    "DEPLOYMENT ID",
    "BUILD TAG",
    "TAG",
    "PORT",
    "ROOMS/PROC",
    "RESOURCES",
    "CREATED",
];

pub async fn deployments(ctx: &Ctx, cmd: DeploymentsCmd) -> Result<()> {
    let app = ctx.app().await?;
    match cmd {
        DeploymentsCmd::List {
            deployment_tag,
            build_tag,
        } => {
            let mut q = Vec::new();
            if let Some(t) = deployment_tag {
                q.push(format!("deploymentTag={}", enc(&t)));
            }
            if let Some(t) = build_tag {
                q.push(format!("buildTag={}", enc(&t)));
            }
            // Every page, following nextPageToken.
            let mut all = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut query = q.clone();
                if let Some(t) = &token {
                    query.push(format!("nextPageToken={}", enc(t)));
                }
                let page = ctx
                    .api
                    .get(&format!(
                        "/deployments/v3/apps/{}/deployments?{}",
                        enc(&app),
                        query.join("&")
                    ))
                    .await?;
                all.extend(page["deployments"].as_array().cloned().unwrap_or_default());
                match page["nextPageToken"].as_str().filter(|t| !t.is_empty()) {
                    Some(t) if token.as_deref() != Some(t) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            let v = json!({ "deployments": all });
            ctx.print(&v, |v| {
                Table::new(DEPLOYMENT_HEADERS).rows(
                    v["deployments"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(deployment_row),
                )
            });
        }
        DeploymentsCmd::Info { deployment_id } => {
            let v = ctx
                .api
                .get(&format!(
                    "/deployments/v3/apps/{}/deployments/{}",
                    enc(&app),
                    enc(&deployment_id)
                ))
                .await?;
            ctx.print(&v, |v| {
                Table::new(DEPLOYMENT_HEADERS).rows([deployment_row(v)])
            });
        }
    }
    Ok(())
}

fn addr(p: &Value) -> String {
    format!("{}:{}", s(&p["host"]), s(&p["port"]))
}

/// Poll connection info until the room is active.
async fn wait_active(ctx: &Ctx, app: &str, room: &str, timeout: u64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let path = format!("/rooms/v2/{}/connectioninfo/{}", enc(app), enc(room));
    let mut delay = Duration::from_millis(20);
    loop {
        let v = ctx.api.get(&path).await?;
        if v["status"] == "active" {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return err(format!(
                "room {room} is not active after {timeout} s (status {})",
                s(&v["status"])
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

fn print_connection(ctx: &Ctx, v: &Value) {
    if ctx.json {
        print_json(v);
        return;
    }
    let mut t = Table::new(&["PORT NAME", "TRANSPORT", "ADDRESS"]);
    for p in std::iter::once(&v["exposedPort"])
        .chain(v["additionalExposedPorts"].as_array().into_iter().flatten())
    {
        if p.is_object() {
            t = t.rows([vec![s(&p["name"]), s(&p["transportType"]), addr(p)]]);
        }
    }
    t.print();
}

fn room_row(r: &Value) -> Vec<String> {
    vec![
        s(&r["roomId"]),
        s(&r["status"]),
        s(&r["currentAllocation"]["processId"]),
        s(&r["roomConfig"]),
    ]
}

pub async fn rooms(ctx: &Ctx, cmd: RoomsCmd) -> Result<()> {
    let app = ctx.app().await?;
    let a = enc(&app);
    match cmd {
        RoomsCmd::Create {
            region,
            config,
            room_id,
            deployment_id,
            wait,
            timeout,
        } => {
            let mut body = json!({ "region": region });
            if let Some(c) = config {
                body["roomConfig"] = json!(c);
            }
            if let Some(d) = deployment_id {
                body["deploymentId"] = json!(d);
            }
            let q = room_id
                .map(|r| format!("?roomId={}", enc(&r)))
                .unwrap_or_default();
            let v = ctx
                .api
                .post(&format!("/rooms/v2/{a}/create{q}"), body)
                .await?;
            let room = s(&v["roomId"]);
            if !wait {
                ctx.print(&v, |v| {
                    Table::new(&["ROOM ID", "STATUS", "PROCESS"]).rows([vec![
                        room.clone(),
                        s(&v["status"]),
                        s(&v["processId"]),
                    ]])
                });
                return Ok(());
            }
            eprintln!(
                "room {room} on process {}; waiting for it to be active",
                s(&v["processId"])
            );
            let info = wait_active(ctx, &app, &room, timeout).await?;
            if ctx.json {
                print_json(&info);
            } else {
                println!("{}", addr(&info["exposedPort"]));
            }
        }
        RoomsCmd::Info { room_id } => {
            let v = ctx
                .api
                .get(&format!("/rooms/v2/{a}/info/{}", enc(&room_id)))
                .await?;
            ctx.print(&v, |v| {
                Table::new(&["ROOM ID", "STATUS", "PROCESS", "CONFIG"]).rows([room_row(v)])
            });
        }
        RoomsCmd::List { process, inactive } => {
            let which = if inactive { "inactive" } else { "active" };
            let processes: Vec<String> = match process {
                Some(p) => vec![p],
                None => live_processes(ctx, &a).await?,
            };
            let mut all = Vec::new();
            for p in processes {
                let v = ctx
                    .api
                    .get(&format!("/rooms/v2/{a}/list/{}/{which}", enc(&p)))
                    .await?;
                all.extend(v.as_array().cloned().unwrap_or_default());
            }
            let v = Value::Array(all);
            ctx.print(&v, |v| {
                Table::new(&["ROOM ID", "STATUS", "PROCESS", "CONFIG"])
                    .rows(v.as_array().into_iter().flatten().map(room_row))
            });
        }
        RoomsCmd::Destroy { room_id } => {
            ctx.api
                .post_empty(&format!("/rooms/v2/{a}/destroy/{}", enc(&room_id)))
                .await?;
            eprintln!("destroyed {room_id}");
        }
        RoomsCmd::Connect { room_id, timeout } => {
            let info = wait_active(ctx, &app, &room_id, timeout).await?;
            print_connection(ctx, &info);
        }
    }
    Ok(())
}

/// Epoch milliseconds of an RFC 3339 UTC time such as `2025-03-04T18:22:10.512Z`.
fn epoch_ms(t: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = t.get(19..).unwrap_or("");
    let ms = match frac.strip_prefix('.') {
        Some(f) => {
            let digits: String = f.chars().take_while(char::is_ascii_digit).collect();
            format!("{digits:0<3}").get(..3)?.parse::<i64>().ok()?
        }
        None => 0,
    };
    // Days from 1970-01-01 to y-mo-d in the proleptic Gregorian calendar.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms)
}

/// The ids of every live (starting, running or draining) process, newest first. The API
/// answers 10 at a time; `before` (a createdAt in epoch ms, exclusive) pages back.
async fn live_processes(ctx: &Ctx, app: &str) -> Result<Vec<String>> {
    let mut ids: Vec<String> = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut path = format!(
            "/processes/v3/apps/{app}/processes/latest?status=starting&status=running&status=draining"
        );
        if let Some(b) = before {
            path.push_str(&format!("&before={b}"));
        }
        let page = ctx.api.get(&path).await?;
        let page = page.as_array().cloned().unwrap_or_default();
        let mut oldest: Option<i64> = None;
        let mut new = 0;
        for p in &page {
            let id = s(&p["processId"]);
            if !ids.contains(&id) {
                ids.push(id);
                new += 1;
            }
            let t = epoch_ms(&s(&p["createdAt"])).ok_or_else(|| {
                CliError(format!(
                    "unexpected createdAt '{}' of process {}",
                    s(&p["createdAt"]),
                    s(&p["processId"])
                ))
            })?;
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
        let Some(oldest) = oldest else { break };
        // Go on from just after the oldest createdAt seen, so processes created in the same
        // millisecond but left off this page are not skipped; once that brings nothing new,
        // step past that millisecond.
        before = if new > 0 {
            Some(oldest + 1)
        } else if before == Some(oldest + 1) {
            Some(oldest)
        } else {
            break;
        };
    }
    Ok(ids)
}

fn process_row(p: &Value) -> Vec<String> {
    vec![
        s(&p["processId"]),
        s(&p["status"]),
        s(&p["region"]),
        format!("{}/{}", s(&p["roomsAllocated"]), s(&p["roomsPerProcess"])),
        if p["exposedPort"].is_object() {
            addr(&p["exposedPort"])
        } else {
            String::new()
        },
        s(&p["createdAt"]),
        s(&p["summaryExitReason"]),
    ]
}

const PROCESS_HEADERS: &[&str] = &[
    "PROCESS ID",
    "STATUS",
    "REGION",
    "ROOMS",
    "ADDRESS",
    "CREATED",
    "EXIT",
];

pub async fn processes(ctx: &Ctx, cmd: ProcessesCmd) -> Result<()> {
    let a = enc(&ctx.app().await?);
    match cmd {
        ProcessesCmd::List { status, region } => {
            let q: Vec<String> = status
                .iter()
                .map(|x| format!("status={}", enc(x)))
                .chain(region.iter().map(|x| format!("region={}", enc(x))))
                .collect();
            let v = ctx
                .api
                .get(&format!(
                    "/processes/v3/apps/{a}/processes/latest?{}",
                    q.join("&")
                ))
                .await?;
            ctx.print(&v, |v| {
                Table::new(PROCESS_HEADERS)
                    .rows(v.as_array().into_iter().flatten().map(process_row))
            });
        }
        ProcessesCmd::Info { process_id } => {
            let v = ctx
                .api
                .get(&format!(
                    "/processes/v3/apps/{a}/processes/{}",
                    enc(&process_id)
                ))
                .await?;
            ctx.print(&v, |v| Table::new(PROCESS_HEADERS).rows([process_row(v)]));
        }
        ProcessesCmd::Stop { process_id } => {
            ctx.api
                .post_empty(&format!(
                    "/processes/v3/apps/{a}/processes/{}/stop",
                    enc(&process_id)
                ))
                .await?;
            eprintln!("stopping {process_id}");
        }
        ProcessesCmd::Create { region } => {
            let v = ctx
                .api
                .post_empty(&format!(
                    "/processes/v3/apps/{a}/processes/regions/{}",
                    enc(&region)
                ))
                .await?;
            ctx.print(&v, |v| Table::new(PROCESS_HEADERS).rows([process_row(v)]));
        }
    }
    Ok(())
}

pub async fn logs(ctx: &Ctx, args: LogsArgs) -> Result<()> {
    let a = enc(&ctx.app().await?);
    let path = format!(
        "/logs/v1/{a}/process/{}?follow={}&tailLines={}",
        enc(&args.process_id),
        args.follow,
        args.tail
    );
    let res = ctx.api.stream(reqwest::Method::GET, &path).await?;
    api::pipe(res, &mut std::io::stdout()).await
}

pub async fn tokens(ctx: &Ctx, cmd: TokensCmd) -> Result<()> {
    let org = enc(&org_id(ctx).await?);
    let row = |t: &Value| {
        vec![
            s(&t["orgTokenId"]),
            s(&t["name"]),
            s(&t["status"]),
            format!("…{}", s(&t["lastFourCharsOfKey"])),
            s(&t["createdAt"]),
        ]
    };
    const H: &[&str] = &["TOKEN ID", "NAME", "STATUS", "KEY", "CREATED"];
    match cmd {
        TokensCmd::List => {
            let v = ctx.api.get(&format!("/tokens/v1/orgs/{org}")).await?;
            ctx.print(&v, |v| {
                Table::new(H).rows(v["tokens"].as_array().into_iter().flatten().map(row))
            });
        }
        TokensCmd::Create { name, scopes } => {
            let mut body = json!({ "name": name });
            if !scopes.is_empty() {
                body["scopes"] = json!(scopes);
            }
            let v = ctx
                .api
                .post(&format!("/tokens/v1/orgs/{org}/create"), body)
                .await?;
            if ctx.json {
                print_json(&v);
            } else {
                eprintln!(
                    "created {} ({}); the secret is shown only now:",
                    s(&v["orgToken"]["orgTokenId"]),
                    name
                );
                println!("{}", s(&v["plainTextToken"]));
            }
        }
        TokensCmd::Revoke { token_id } => {
            ctx.api
                .post_empty(&format!(
                    "/tokens/v1/orgs/{org}/tokens/{}/revoke",
                    enc(&token_id)
                ))
                .await?;
            eprintln!("revoked {token_id}");
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum OrgsCmd {
    /// Every org of this Lodge (an instance admin's token).
    List,
    /// Create an org and its first admin token, printed once.
    Create { name: String },
}

pub async fn orgs(ctx: &Ctx, cmd: OrgsCmd) -> Result<()> {
    match cmd {
        OrgsCmd::List => {
            let v = ctx.api.get("/lodge/v1/orgs").await?;
            ctx.print(&v, |v| {
                Table::new(&["ORG ID", "NAME", "CREATED"]).rows(
                    v["orgs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|o| vec![s(&o["orgId"]), s(&o["name"]), s(&o["createdAt"])]),
                )
            });
        }
        OrgsCmd::Create { name } => {
            let v = ctx
                .api
                .post("/lodge/v1/orgs", json!({ "name": name }))
                .await?;
            if ctx.json {
                print_json(&v);
            } else {
                eprintln!(
                    "created org {} ({name}); its admin token is shown only now:",
                    s(&v["orgId"])
                );
                println!("{}", s(&v["token"]["plainTextToken"]));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_created_at() {
        assert_eq!(epoch_ms("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            epoch_ms("2025-03-04T18:22:10.512Z"),
            Some(1_741_112_530_512)
        );
        assert_eq!(epoch_ms("2024-02-29T23:59:59Z"), Some(1_709_251_199_000));
        assert_eq!(epoch_ms("2000-01-01T00:00:00.5Z"), Some(946_684_800_500));
        assert_eq!(epoch_ms("not a time"), None);
    }
}
