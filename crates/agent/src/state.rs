//! What the agent keeps on disk about each process it started (`DIR/state.json`), and the
//! small file helpers around it.

#[allow(unused_imports)]
use super::*;

/// What the agent keeps on disk about a process it started (`DIR/state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LocalState {
    pub(crate) shim_pid: u32,
    pub(crate) shim_start: Option<u64>,
    pub(crate) game_pid: u32,
    pub(crate) exposed: Vec<ExposedPort>,
    pub(crate) targets: Vec<Target>,
    pub(crate) netns: Option<NsState>,
    pub(crate) cgroups: Vec<PathBuf>,
    /// Set for container processes: how to reach their runtime.
    #[serde(default)]
    pub(crate) oci: Option<OciState>,
    /// The user a native game server runs as, when Lodge runs as root.
    #[serde(default)]
    pub(crate) user: Option<users::GameUser>,
    /// Its `HOME` and `TMPDIR`, owned by that user; removed with the process.
    #[serde(default)]
    pub(crate) scratch: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OciState {
    pub(crate) runtime: PathBuf,
    pub(crate) root: PathBuf,
    pub(crate) id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Target {
    pub(crate) public_port: u16,
    pub(crate) target: SocketAddr,
    pub(crate) udp: bool,
    /// A `tls` port: the node terminates TLS and forwards plain TCP.
    #[serde(default)]
    pub(crate) tls: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NsState {
    pub(crate) name: String,
    pub(crate) veth: String,
    pub(crate) index: u32,
}

pub(crate) fn exit_info(dir: &Path) -> ExitInfo {
    match shim::read_exit(dir) {
        Some(e) => ExitInfo {
            code: e.code,
            reason: e.describe(),
        },
        None => ExitInfo {
            code: None,
            reason: "its supervisor ended without an exit status".into(),
        },
    }
}

/// Fill in what a Lodge that died during a start did not record: the shim's pid (from the
/// shim's own file; state.json is written before the shim is spawned) and the game's.
pub(crate) fn recover_pids(dir: &Path, state: &mut LocalState) {
    if state.shim_pid == 0 {
        if let Some((pid, start)) = shim::read_shim_pid(dir) {
            state.shim_pid = pid;
            state.shim_start = Some(start);
        } else if let Some((pid, _, _)) = sys::shims_under(dir).into_iter().next() {
            // Spawned, but not yet far enough to write its own record.
            state.shim_pid = pid;
            state.shim_start = sys::start_time(pid);
        }
    }
    if state.game_pid == 0 {
        state.game_pid = shim::read_game_pid(dir).unwrap_or(0);
    }
}

/// The record of the process in `dir`, if it has a readable one.
pub(crate) fn read_state(dir: &Path) -> Option<LocalState> {
    std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The records of the processes under `processes` whose shim is alive (supervised or not).
pub(crate) fn live_records(processes: &Path) -> Vec<LocalState> {
    let Ok(entries) = std::fs::read_dir(processes) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let mut state = read_state(&dir)?;
            recover_pids(&dir, &mut state);
            sys::alive(state.shim_pid, state.shim_start).then_some(state)
        })
        .collect()
}

pub(crate) fn write_state(dir: &Path, state: &LocalState) -> std::io::Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, dir.join("state.json"))
}

pub(crate) fn append_log(dir: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(shim::LOG))
    {
        let _ = writeln!(f, "{line}");
    }
}
