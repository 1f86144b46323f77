//! Ending what a stopped Lodge left on this machine (`lodge cleanup`), one process directory
//! at a time.

#[allow(unused_imports)]
use super::*;

/// Kill what a process directory's state names (its game, shim, container) and remove its
/// cgroups and namespace; its log stays. Returns whether its shim was still alive.
pub(crate) async fn end_process_dir(dir: &Path, cfg_group: &str) -> bool {
    let Ok(bytes) = std::fs::read(dir.join("state.json")) else {
        return false;
    };
    let Ok(mut state) = serde_json::from_slice::<LocalState>(&bytes) else {
        return false;
    };
    recover_pids(dir, &mut state);
    let mut was_alive = false;
    if let Some(oci) = &state.oci {
        oci::runtime(&oci.runtime, &oci.root, &["kill", &oci.id, "KILL"]).await;
        oci::runtime(&oci.runtime, &oci.root, &["delete", "--force", &oci.id]).await;
    }
    if sys::alive(state.shim_pid, state.shim_start) {
        was_alive = true;
    }
    if state.game_pid > 1 {
        sys::signal_group(state.game_pid, libc::SIGKILL);
        sys::signal(state.game_pid, libc::SIGKILL);
    }
    if state.shim_pid > 1 && sys::alive(state.shim_pid, state.shim_start) {
        sys::signal(state.shim_pid, libc::SIGKILL);
    }
    let cgroups = sys::Cgroups {
        dirs: state.cgroups.clone(),
    };
    tokio::task::spawn_blocking(move || cgroups.destroy())
        .await
        .ok();
    if let Some(ns) = &state.netns {
        let _ = tokio::process::Command::new("ip")
            .args(["link", "del", &ns.veth])
            .stderr(Stdio::null())
            .status()
            .await;
        let _ = tokio::process::Command::new("ip")
            .args(["netns", "del", &ns.name])
            .stderr(Stdio::null())
            .status()
            .await;
    }
    if let Some(id) = dir.file_name() {
        sys::Cgroups::remove_everywhere(cfg_group, &id.to_string_lossy());
    }
    was_alive
}

/// End everything a Lodge left on this machine for `data_dir` (its node state there): its
/// nftables table, every game server still running (containers through their runtime), their
/// network namespaces and cgroups, the bridge and the cgroup parents. For a stopped Lodge only: an operator's
/// uninstall, and test teardown. Returns how many processes it ended.
pub async fn cleanup(data_dir: &Path, instance: &str) -> usize {
    let cfg_group = format!("lodge-{instance}");
    let bridge = format!("lodge{}", &instance[..instance.len().min(8)]);
    let mut ended = 0;
    // Players are cut off first: nothing forwards to what is about to end.
    crate::forwarding::remove(instance).await;
    let Ok(entries) = std::fs::read_dir(data_dir.join("processes")) else {
        return 0;
    };
    for e in entries.flatten() {
        if end_process_dir(&e.path(), &cfg_group).await {
            ended += 1;
        }
    }
    // Shims that no state file names (a crash before it was written): end them and their games.
    for (shim_pid, _, games) in sys::shims_under(&data_dir.join("processes")) {
        for game in games {
            sys::signal_group(game, libc::SIGKILL);
            sys::signal(game, libc::SIGKILL);
        }
        sys::signal(shim_pid, libc::SIGKILL);
        ended += 1;
    }
    // Namespaces made ahead for processes that never came.
    let _ = crate::nspool::remove_unclaimed(&data_dir.join("processes"), instance).await;
    let _ = std::fs::remove_dir_all(users::scratch_root(instance));
    let _ = tokio::process::Command::new("ip")
        .args(["link", "del", &bridge])
        .stderr(Stdio::null())
        .status()
        .await;
    sys::Cgroups::remove_group(&cfg_group);
    ended
}
