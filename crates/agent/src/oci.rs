//! The `oci` driver's runtime side: choosing crun or runc, writing an OCI runtime config for
//! one process, and the runtime's `kill` and `delete`. Supervision is the shim's, as for native
//! processes: the shim runs `<runtime> run` in the foreground and records its exit status, which
//! is the container's (137 after a SIGKILL, an out-of-memory kill included).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{json, Value};

use lodge_artifact::image::ImageConfig;

/// The capabilities a container keeps: the usual runtime defaults, nothing extra.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// crun refuses cgroup v1 hosts whose cgroup2 mount still holds controllers ("hybrid mode"),
/// as on hosts where hugetlb was never mounted on v1. runc has no such limit.
pub fn crun_blocked_by_hybrid_cgroups() -> bool {
    Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        && std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
            .is_ok_and(|c| !c.trim().is_empty())
}

/// Resolve `--oci-runtime`: `auto` (crun if usable, else runc, else none), `crun`, `runc`, or
/// a path. `Ok(None)` means containers cannot run here; the reason is for the log.
pub fn detect(choice: &str) -> Result<Option<PathBuf>, String> {
    match choice {
        "auto" => {
            if let Some(crun) = in_path("crun") {
                if !crun_blocked_by_hybrid_cgroups() {
                    return Ok(Some(crun));
                }
                tracing::info!(
                    "crun cannot run on this hybrid cgroup host (mount hugetlb on cgroup v1 to use it); trying runc"
                );
            }
            Ok(in_path("runc"))
        }
        "crun" if crun_blocked_by_hybrid_cgroups() => Err(
            "--oci-runtime crun: crun cannot run on this hybrid cgroup host; mount hugetlb on \
             cgroup v1 (mkdir /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup \
             /sys/fs/cgroup/hugetlb) or use --oci-runtime runc"
                .into(),
        ),
        "crun" | "runc" => in_path(choice).map(Some).ok_or_else(|| {
            format!("--oci-runtime {choice}: not installed (apt-get install {choice})")
        }),
        path => {
            let p = PathBuf::from(path);
            if p.is_file() {
                Ok(Some(p))
            } else {
                Err(format!("--oci-runtime {path}: no such file"))
            }
        }
    }
}

/// Everything the config of one container needs.
pub struct Container<'a> {
    pub rootfs: &'a Path,
    pub image: &'a ImageConfig,
    pub env: &'a [(String, String)],
    pub hostname: String,
    /// `/run/netns/NAME` of the process's namespace; `None` shares the host network.
    pub netns: Option<PathBuf>,
    /// Path under each cgroup hierarchy; the agent made its parent with the limits.
    pub cgroups_path: String,
}

fn user(spec: &str) -> (u32, u32) {
    let mut it = spec.split(':');
    let uid = it.next().and_then(|u| u.parse().ok()).unwrap_or(0);
    let gid = it.next().and_then(|g| g.parse().ok()).unwrap_or(uid);
    (uid, gid)
}

fn nofile_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0;
    if ok {
        l.rlim_max.min(65_536)
    } else {
        4096
    }
}

/// The OCI runtime config (`config.json`) of one container.
pub fn config(c: &Container<'_>) -> Value {
    let (uid, gid) = user(&c.image.user);
    let env: Vec<String> = c.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let cwd = if c.image.working_dir.starts_with('/') {
        c.image.working_dir.clone()
    } else {
        "/".into()
    };
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if let Some(ns) = &c.netns {
        namespaces.push(json!({"type": "network", "path": ns}));
    }
    let nofile = nofile_limit();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": c.image.argv(),
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": true,
        },
        "root": {"path": c.rootfs, "readonly": true},
        "hostname": c.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=262144k"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=755", "size=65536k"]},
        ],
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": c.cgroups_path,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "pids": {"limit": 4096},
            },
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

/// Run `<runtime> --root ROOT ARGS...` to completion, quietly; true on success.
pub async fn runtime(bin: &Path, root: &Path, args: &[&str]) -> bool {
    tokio::process::Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_isolation_asked_for() {
        let image = ImageConfig {
            entrypoint: vec!["/gs".into()],
            cmd: vec!["--x".into()],
            user: "1000:1001".into(),
            working_dir: "/srv".into(),
            ..Default::default()
        };
        let env = [("PORT".to_string(), "7777".to_string())];
        let c = Container {
            rootfs: Path::new("/data/builds/b/image/rootfs"),
            image: &image,
            env: &env,
            hostname: "lodge-abc".into(),
            netns: Some("/run/netns/lodge-p".into()),
            cgroups_path: "/lodge-x/p/ctr".into(),
        };
        let v = config(&c);
        assert_eq!(v["process"]["args"], json!(["/gs", "--x"]));
        assert_eq!(v["process"]["env"], json!(["PORT=7777"]));
        assert_eq!(v["process"]["user"], json!({"uid": 1000, "gid": 1001}));
        assert_eq!(v["process"]["cwd"], "/srv");
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["hostname"], "lodge-abc");
        assert_eq!(
            v["process"]["capabilities"]["effective"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
        assert!(v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["destination"] == "/tmp" && m["type"] == "tmpfs"));
        assert!(v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&json!({"type": "network", "path": "/run/netns/lodge-p"})));
        assert_eq!(v["linux"]["cgroupsPath"], "/lodge-x/p/ctr");
    }
}
