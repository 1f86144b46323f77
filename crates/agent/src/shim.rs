//! The per-process supervisor, run as `lodge shim DIR`.
//!
//! The agent never parents game servers directly: it starts a shim in its own session, and the
//! shim starts the game server with its output appended to `DIR/log`, waits for it, and writes
//! the exit status to `DIR/exit.json`. So a game server outlives a crash or restart of Lodge,
//! its logs keep flowing, and its exit code is still known when a new Lodge adopts it.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// What the shim launches; written by the agent to `DIR/launch.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Launch {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// Network namespace to join (`/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// User and group to run as (Lodge as root); the game then has no other group and cannot
    /// gain privileges through set-user-id programs.
    #[serde(default)]
    pub user: Option<(u32, u32)>,
    /// Where `cwd` (the bundle) is mounted read-only in the game's own mount namespace, and
    /// where it runs; a path whose directories the game's user may traverse.
    #[serde(default)]
    pub bundle_mount: Option<PathBuf>,
}

/// Written by the shim when the game server ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitFile {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitFile {
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(9)) => "killed by signal 9 (SIGKILL; out of memory or stopped)".into(),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "ended".into(),
        }
    }
}

pub const LAUNCH: &str = "launch.json";
pub const EXIT: &str = "exit.json";
pub const LOG: &str = "log";
/// The game server's pid, written by the shim as soon as it started it.
pub const PID: &str = "pid";
/// The shim's own pid and start time, written before it starts anything: a Lodge that died
/// between spawning the shim and recording it still finds it.
pub const SHIM_PID: &str = "shim.pid";

/// Entry point of `lodge shim DIR`. Prints the game server's pid on stdout, then closes stdout.
pub fn main(dir: &Path) -> io::Result<i32> {
    let me = std::process::id();
    let start = crate::sys::start_time(me).unwrap_or(0);
    fs::write(dir.join(SHIM_PID), format!("{me} {start}"))?;
    let launch: Launch =
        serde_json::from_slice(&fs::read(dir.join(LAUNCH))?).map_err(io::Error::other)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG))?;
    let netns = launch.netns.as_ref().map(fs::File::open).transpose()?;
    let cgroups = launch
        .cgroup_procs
        .iter()
        .map(|p| OpenOptions::new().write(true).open(p))
        .collect::<io::Result<Vec<_>>>()?;
    let mut program = PathBuf::from(&launch.argv[0]);
    if program.components().count() > 1 && program.is_relative() {
        // As another user the bundle is reached only through the working directory (entered
        // before the switch): the directories above it may be closed to that user.
        program = launch
            .bundle_mount
            .as_ref()
            .unwrap_or(&launch.cwd)
            .join(program);
    }
    let mut cmd = Command::new(&program);
    cmd.arg0(&launch.argv[0]).args(&launch.argv[1..]);
    // With a mount, the working directory is entered after the mount, in the hook below.
    if launch.bundle_mount.is_none() {
        cmd.current_dir(&launch.cwd);
    }
    cmd.env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?);
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let cgroup_fds: Vec<i32> = cgroups.iter().map(|f| f.as_raw_fd()).collect();
    let user = launch.user;
    let mount = match &launch.bundle_mount {
        Some(target) => Some((cstring(&launch.cwd)?, cstring(target)?)),
        None => None,
    };
    // SAFETY: the hook runs between fork and exec and only makes async-signal-safe system
    // calls (setsid, write, setns, unshare, mount, chdir, setgroups, setgid, setuid, prctl)
    // on file descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            for fd in &cgroup_fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((source, target)) = &mount {
                // A mount namespace of the game's own: the bind mount is invisible to the host
                // and goes away with the game.
                let flags = libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV;
                if libc::unshare(libc::CLONE_NEWNS) < 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) < 0
                    || libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) < 0
                    || libc::mount(
                        std::ptr::null(),
                        target.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ) < 0
                    || libc::chdir(target.as_ptr()) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let mut log = log;
            let _ = writeln!(log, "[lodge] cannot start {}: {e}", launch.argv[0]);
            write_exit(
                dir,
                &ExitFile {
                    code: Some(127),
                    signal: None,
                },
            )?;
            let _ = writeln!(io::stdout(), "0");
            return Ok(127);
        }
    };
    drop(netns);
    drop(cgroups);
    // The pid goes to a file first: if Lodge dies before reading our stdout, it finds the game
    // there when it re-adopts us. Writing to a closed pipe must not end the shim either.
    let _ = fs::write(dir.join(PID), child.id().to_string());
    let _ = writeln!(io::stdout(), "{}", child.id());
    let _ = io::stdout().flush();
    // Nobody reads our stdout any more; never die of SIGPIPE for it.
    if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1 with a valid fd.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
    let status = child.wait()?;
    let exit = ExitFile {
        code: status.code(),
        signal: status.signal(),
    };
    write_exit(dir, &exit)?;
    Ok(exit.code.unwrap_or(128 + exit.signal.unwrap_or(0)))
}

fn cstring(p: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn write_exit(dir: &Path, exit: &ExitFile) -> io::Result<()> {
    let tmp = dir.join("exit.json.tmp");
    fs::write(&tmp, serde_json::to_vec(exit).map_err(io::Error::other)?)?;
    fs::rename(tmp, dir.join(EXIT))
}

/// The shim's pid and start time from its own record.
pub fn read_shim_pid(dir: &Path) -> Option<(u32, u64)> {
    let text = fs::read_to_string(dir.join(SHIM_PID)).ok()?;
    let (pid, start) = text.trim().split_once(' ')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// The game server's pid from the shim's record.
pub fn read_game_pid(dir: &Path) -> Option<u32> {
    fs::read_to_string(dir.join(PID)).ok()?.trim().parse().ok()
}

pub fn read_exit(dir: &Path) -> Option<ExitFile> {
    serde_json::from_slice(&fs::read(dir.join(EXIT)).ok()?).ok()
}
