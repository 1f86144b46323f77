//! Game servers never run as Lodge's own user. When Lodge runs as root, every native process
//! gets a user id of its own (so no game server can signal, trace or read another's `/proc`, nor
//! Lodge's), the group of its build (so it can read its bundle and nothing of another build),
//! and a private scratch directory for `HOME` and `TMPDIR`. The data dir, the database, the
//! admin token and every process's launch file stay readable by root only.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Game-server user ids are `UID_BASE + index`, one index per live process on the node.
pub const UID_BASE: u32 = 1_600_000_000;
/// Build groups are `GID_BASE + a hash of the build id` (16 million of them).
pub const GID_BASE: u32 = 1_600_000_000;
pub const MAX_USERS: u32 = 65_536;

/// The identity a process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GameUser {
    pub index: u32,
    pub uid: u32,
    pub gid: u32,
}

impl GameUser {
    pub fn new(index: u32, build_id: &str) -> Self {
        GameUser {
            index,
            uid: UID_BASE + index,
            gid: build_gid(build_id),
        }
    }
}

pub fn build_gid(build_id: &str) -> u32 {
    let h = build_id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    GID_BASE + (h % 16_777_216)
}

/// Where the scratch directories of an installation live: outside the data dir, whose
/// ancestors (a home directory, a private temp dir) a game user may not be able to traverse.
pub fn scratch_root(instance: &str) -> PathBuf {
    let base = if Path::new("/run").is_dir() {
        PathBuf::from("/run")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("lodge-{instance}"))
}

/// Create (or re-create) the process's own directory outside the data dir: `home/` (its
/// `HOME` and `TMPDIR`, owned by its user, mode 0700) and `bundle/`, where the shim mounts the
/// bundle read-only in the game's own mount namespace, so the game reaches its files through
/// directories it may traverse, wherever the data dir is.
pub fn make_scratch(root: &Path, process_id: &str, user: GameUser) -> std::io::Result<PathBuf> {
    ensure_root_dir(root, 0o711)?;
    let dir = root.join(process_id);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    let home = dir.join("home");
    std::fs::create_dir(&home)?;
    std::os::unix::fs::chown(&home, Some(user.uid), Some(user.gid))?;
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))?;
    std::fs::create_dir(dir.join("bundle"))?;
    Ok(dir)
}

/// A directory that must be root's own: created if missing; one that another user made (a
/// squatter in a shared temp dir) is refused.
fn ensure_root_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(std::io::Error::other(format!(
            "{} is not a directory owned by root",
            dir.display()
        )));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Give a bundle to its build's group: every entry `root:gid`, readable by the group (and
/// searchable where it is a directory or executable), nothing for others. Done once per build
/// and node; a bundle whose top already has the group is left as it is.
pub fn share_bundle(bundle: &Path, gid: u32) -> std::io::Result<()> {
    let top = std::fs::symlink_metadata(bundle)?;
    if top.gid() == gid && top.mode() & 0o007 == 0 {
        return Ok(());
    }
    let mut stack = vec![bundle.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        std::os::unix::fs::lchown(&path, Some(0), Some(gid))?;
        let mode = meta.mode() & 0o7777;
        let user = mode & 0o700;
        // The group gets what the owner has, less write: the bundle is shared read-only.
        let group = (user >> 3) & 0o050 | if meta.is_dir() { 0o050 } else { 0o040 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(user | group))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    // The directories above the bundle: traversable by anyone, listable by nobody.
    if let Some(build_dir) = bundle.parent() {
        std::fs::set_permissions(build_dir, std::fs::Permissions::from_mode(0o711))?;
    }
    Ok(())
}

/// Lock the data dir down: only root lists or reads it; game users may only traverse it to
/// their build's bundle.
pub fn protect_data_dir(data_dir: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o711))?;
    let builds = data_dir.join("builds");
    std::fs::create_dir_all(&builds)?;
    std::fs::set_permissions(&builds, std::fs::Permissions::from_mode(0o711))?;
    // Made later by the OCI runtime and buildah: made now, so they are root's from the start.
    for sub in ["oci", "buildah"] {
        std::fs::create_dir_all(data_dir.join(sub))?;
    }
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "builds" {
            continue;
        }
        let meta = entry.metadata()?;
        let mode = if meta.is_dir() { 0o700 } else { 0o600 };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_groups_are_stable_and_in_range() {
        let g = build_gid("build-1");
        assert_eq!(g, build_gid("build-1"));
        assert_ne!(g, build_gid("build-2"));
        assert!((GID_BASE..GID_BASE + 16_777_216).contains(&g));
        let u = GameUser::new(7, "build-1");
        assert_eq!(u.uid, UID_BASE + 7);
    }
}
