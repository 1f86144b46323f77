//! Native bundles: a `.tar.gz`, `.tgz` or `.tar` whose root holds `lodge.toml`.
//!
//! Uploaded archives are hostile until proven otherwise: only regular files and directories
//! are unpacked (no symlinks, hard links, devices or fifos), every path must stay inside the
//! destination (no `..`, no absolute paths), and file count and total size are bounded.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

pub const MANIFEST: &str = "lodge.toml";

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Archive entries of every kind.
    pub max_files: usize,
    pub max_total_bytes: u64,
    /// Directory entries: each costs a mkdir now and an rmdir later, so this bound keeps a
    /// hostile archive's time to fail (and its inodes) small.
    pub max_dirs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files: 100_000,
            max_total_bytes: 8 << 30,
            max_dirs: 20_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the archive is neither gzip-compressed tar nor plain tar: {0}")]
    Format(String),
    #[error("unsafe entry '{0}': {1}")]
    Unsafe(String, &'static str),
    #[error("the bundle exceeds {0}")]
    TooLarge(String),
    #[error("the bundle has no lodge.toml at its root{hint}")]
    NoManifest { hint: &'static str },
    #[error("lodge.toml is invalid: {0}")]
    BadManifest(String),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl From<crate::tarsafe::TarError> for BundleError {
    fn from(e: crate::tarsafe::TarError) -> Self {
        use crate::tarsafe::TarError;
        match e {
            TarError::Format(m) => BundleError::Format(m),
            TarError::TooLarge(m) => BundleError::TooLarge(m),
            TarError::Io(e) => BundleError::Io(e),
        }
    }
}

/// `lodge.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// argv, run from the bundle root; `{port}` and `{port:NAME}` expand to the ports to bind.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Bounds of `lodge.toml`: its size, the entries of `command` and `[env]`, and each string.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
pub const MAX_ARGS: usize = 256;
pub const MAX_ENV: usize = 256;
pub const MAX_STRING: usize = 8 * 1024;

impl Manifest {
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(BundleError::BadManifest(format!(
                "it is {} bytes; at most {MAX_MANIFEST_BYTES}",
                text.len()
            )));
        }
        let m: Manifest =
            toml::from_str(text).map_err(|e| BundleError::BadManifest(e.to_string()))?;
        if m.command.is_empty() || m.command[0].is_empty() {
            return Err(BundleError::BadManifest(
                "`command` must be a non-empty list of strings".into(),
            ));
        }
        if m.command.len() > MAX_ARGS || m.env.len() > MAX_ENV {
            return Err(BundleError::BadManifest(format!(
                "at most {MAX_ARGS} `command` arguments and {MAX_ENV} `[env]` entries"
            )));
        }
        if m.command
            .iter()
            .chain(m.env.keys())
            .chain(m.env.values())
            .any(|v| v.len() > MAX_STRING)
        {
            return Err(BundleError::BadManifest(format!(
                "a string longer than {MAX_STRING} bytes"
            )));
        }
        for name in m.env.keys() {
            lodge_model::validate::env_name(name).map_err(BundleError::BadManifest)?;
        }
        Ok(m)
    }

    pub fn load(bundle_root: &Path) -> Result<Self, BundleError> {
        let path = bundle_root.join(MANIFEST);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(no_manifest(bundle_root)),
            Err(e) => return Err(e.into()),
        };
        // Never more than one byte past the limit is read, however large the file.
        let mut text = String::new();
        file.take(MAX_MANIFEST_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| BundleError::BadManifest(e.to_string()))?;
        Self::parse(&text)
    }
}

fn no_manifest(_root: &Path) -> BundleError {
    BundleError::NoManifest {
        hint: " (nor a Dockerfile, nor an OCI image layout or docker archive)",
    }
}

/// What unpacking produced.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub files: usize,
    pub bytes: u64,
    pub manifest: Manifest,
}

/// Unpack `archive` into `dest` (which must not exist yet) and read its manifest.
pub fn unpack(archive: &Path, dest: &Path, limits: Limits) -> Result<Unpacked, BundleError> {
    let (files, bytes) = unpack_archive(archive, dest, limits)?;
    let manifest = Manifest::load(dest)?;
    Ok(Unpacked {
        files,
        bytes,
        manifest,
    })
}

/// Unpack `archive` (tar, gzipped or not) into `dest` under the bundle rules; returns the
/// number of files and bytes.
pub fn unpack_archive(
    archive: &Path,
    dest: &Path,
    limits: Limits,
) -> Result<(usize, u64), BundleError> {
    let mut head = [0u8; 2];
    let mut f = fs::File::open(archive)?;
    let n = f.read(&mut head)?;
    drop(f);
    let file = fs::File::open(archive)?;
    let reader: Box<dyn Read> = if n == 2 && head == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(io::BufReader::new(file)))
    } else {
        Box::new(io::BufReader::new(file))
    };
    fs::create_dir_all(dest)?;
    // Root's alone until a process of the build is given it (see `users::share_bundle`).
    set_mode(dest, 0o700)?;
    unpack_tar(reader, dest, limits)
}

/// A relative path with only normal components, or an error naming what is wrong.
fn safe_relative(raw: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

/// `link` (relative to `base`, both inside the upload) as a normalised path inside the upload,
/// or `None` if it is absolute or climbs out.
fn inside(base: &Path, link: &Path) -> Option<PathBuf> {
    if link.is_absolute() {
        return None;
    }
    let mut out: Vec<&std::ffi::OsStr> = base
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    for c in link.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            _ => return None,
        }
    }
    Some(out.iter().collect())
}

/// Unpack a tar stream (not compressed) into `dest` under the bundle rules.
pub fn unpack_tar(
    reader: impl Read,
    dest: &Path,
    limits: Limits,
) -> Result<(usize, u64), BundleError> {
    let mut archive = tar::Archive::new(reader);
    let mut files = 0usize;
    let mut dirs = 0usize;
    let mut total = 0u64;
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    crate::tarsafe::for_each(&mut archive, limits.max_files, |m| {
        let crate::tarsafe::Member {
            mut entry,
            kind,
            path: raw,
            link,
            size,
        } = m;
        let name = raw.display().to_string();
        let rel = safe_relative(&raw).map_err(|why| BundleError::Unsafe(name.clone(), why))?;
        if rel.as_os_str().is_empty() {
            return Ok(()); // "./" itself
        }
        let target = dest.join(&rel);
        // A parent that is not a real directory (never true for what we create) would let a
        // later entry escape; refuse anything but plain directories on the way.
        if let Some(parent) = target.parent() {
            ensure_plain_dirs(dest, parent)?;
        }
        match kind {
            tar::EntryType::Directory => {
                dirs += 1;
                if dirs > limits.max_dirs {
                    return Err(BundleError::TooLarge(format!(
                        "{} directories",
                        limits.max_dirs
                    )));
                }
                fs::create_dir_all(&target)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                files += 1;
                total = total.saturating_add(size);
                if total > limits.max_total_bytes {
                    return Err(BundleError::TooLarge(format!(
                        "{} bytes unpacked",
                        limits.max_total_bytes
                    )));
                }
                if fs::symlink_metadata(&target).is_ok() {
                    fs::remove_file(&target)?;
                }
                let mut out = fs::File::create(&target)?;
                let copied = io::copy(&mut (&mut entry).take(size), &mut out)?;
                if copied != size {
                    return Err(BundleError::Format(format!("'{name}' is truncated")));
                }
                let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                set_mode(&target, mode)?;
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                // Links stay inside the upload or are refused; they become copies of their
                // target once everything is unpacked (image archives link layers this way).
                let link =
                    link.ok_or_else(|| BundleError::Unsafe(name.clone(), "link without a target"))?;
                let base = if kind == tar::EntryType::Symlink {
                    rel.parent().unwrap_or(Path::new("")).to_path_buf()
                } else {
                    PathBuf::new()
                };
                let target = inside(&base, &link).ok_or_else(|| {
                    BundleError::Unsafe(name.clone(), "link points outside the upload")
                })?;
                links.push((rel, target));
            }
            _ => {
                return Err(BundleError::Unsafe(
                    name,
                    "only regular files and directories are allowed",
                ))
            }
        }
        Ok(())
    })?;
    // Links become copies of the regular file they name (following link chains).
    for (from, mut to) in links.clone() {
        for _ in 0..16 {
            match links.iter().find(|(l, _)| *l == to) {
                Some((_, next)) => to = next.clone(),
                None => break,
            }
        }
        let source = dest.join(&to);
        let meta = fs::symlink_metadata(&source).map_err(|_| {
            BundleError::Unsafe(from.display().to_string(), "link to a missing file")
        })?;
        if !meta.is_file() {
            return Err(BundleError::Unsafe(
                from.display().to_string(),
                "links may only name regular files",
            ));
        }
        files += 1;
        total = total.saturating_add(meta.len());
        if files > limits.max_files || total > limits.max_total_bytes {
            return Err(BundleError::TooLarge(format!(
                "{} files or {} bytes",
                limits.max_files, limits.max_total_bytes
            )));
        }
        let target = dest.join(&from);
        if let Some(parent) = target.parent() {
            ensure_plain_dirs(dest, parent)?;
        }
        fs::copy(&source, &target)?;
    }
    Ok((files, total))
}

fn ensure_plain_dirs(root: &Path, dir: &Path) -> Result<(), BundleError> {
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(BundleError::Unsafe(
                    rel.display().to_string(),
                    "a parent is not a directory",
                ))
            }
            Err(_) => fs::create_dir(&cur)?,
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("lodge-bundle-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Raw tar bytes with entries written header by header, so hostile names get through.
    fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            // Write the name bytes directly: set_path refuses '..', a real attacker would not.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn run(tag: &str, archive: Vec<u8>, limits: Limits) -> (Tmp, Result<Unpacked, BundleError>) {
        let t = Tmp::new(tag);
        let a = t.0.join("a.tgz");
        fs::write(&a, archive).unwrap();
        let r = unpack(&a, &t.0.join("out"), limits);
        (t, r)
    }

    const TOML: &[u8] = b"command = [\"./server\", \"--port\", \"{port}\"]\n[env]\nTICK = \"60\"\n";

    #[test]
    fn unpacks_a_good_bundle() {
        let tar = tar_with(&[
            ("./lodge.toml", tar::EntryType::Regular, TOML, None),
            ("bin/", tar::EntryType::Directory, b"", None),
            ("bin/server", tar::EntryType::Regular, b"#!/bin/sh\n", None),
        ]);
        let (t, r) = run("good", gz(&tar), Limits::default());
        let u = r.unwrap();
        assert_eq!(u.files, 2);
        assert_eq!(u.manifest.command[0], "./server");
        assert_eq!(u.manifest.env["TICK"], "60");
        assert!(t.0.join("out/bin/server").is_file());
        // Plain (uncompressed) tar works too.
        let (_t, r) = run("plain", tar, Limits::default());
        r.unwrap();
    }

    #[test]
    fn refuses_path_traversal() {
        let tar = tar_with(&[("../evil", tar::EntryType::Regular, b"x", None)]);
        let (t, r) = run("dotdot", gz(&tar), Limits::default());
        assert!(matches!(r, Err(BundleError::Unsafe(..))), "{r:?}");
        assert!(!t.0.join("evil").exists());
        let tar = tar_with(&[("a/../../evil2", tar::EntryType::Regular, b"x", None)]);
        let (_t, r) = run("dotdot2", gz(&tar), Limits::default());
        assert!(matches!(r, Err(BundleError::Unsafe(..))));
        let tar = tar_with(&[("/etc/evil", tar::EntryType::Regular, b"x", None)]);
        let (_t, r) = run("abs", gz(&tar), Limits::default());
        assert!(matches!(r, Err(BundleError::Unsafe(..))));
    }

    #[test]
    fn refuses_links_and_devices() {
        for (tag, kind) in [
            ("sym", tar::EntryType::Symlink),
            ("hard", tar::EntryType::Link),
        ] {
            let tar = tar_with(&[
                ("lodge.toml", tar::EntryType::Regular, TOML, None),
                ("out", kind, b"", Some("/etc")),
                ("out/passwd", tar::EntryType::Regular, b"x", None),
            ]);
            let (_t, r) = run(tag, gz(&tar), Limits::default());
            assert!(matches!(r, Err(BundleError::Unsafe(..))), "{tag}: {r:?}");
            let tar = tar_with(&[
                ("lodge.toml", tar::EntryType::Regular, TOML, None),
                ("up", kind, b"", Some("../../x")),
            ]);
            let (_t, r) = run(tag, gz(&tar), Limits::default());
            assert!(
                matches!(r, Err(BundleError::Unsafe(..))),
                "{tag} climbing out: {r:?}"
            );
            // A link to a file inside the upload becomes a copy of it.
            let target = if kind == tar::EntryType::Symlink {
                "../data/a"
            } else {
                "data/a"
            };
            let tar = tar_with(&[
                ("lodge.toml", tar::EntryType::Regular, TOML, None),
                ("data/a", tar::EntryType::Regular, b"payload", None),
                ("lib/b", kind, b"", Some(target)),
            ]);
            let (t, r) = run(tag, gz(&tar), Limits::default());
            r.unwrap_or_else(|e| panic!("{tag} inside: {e}"));
            let copy = t.0.join("out/lib/b");
            assert_eq!(fs::read(&copy).unwrap(), b"payload");
            assert!(!fs::symlink_metadata(&copy)
                .unwrap()
                .file_type()
                .is_symlink());
        }
        let tar = tar_with(&[("dev", tar::EntryType::Char, b"", None)]);
        let (_t, r) = run("char", gz(&tar), Limits::default());
        assert!(matches!(r, Err(BundleError::Unsafe(..))));
    }

    #[test]
    fn enforces_limits() {
        let tar = tar_with(&[
            ("lodge.toml", tar::EntryType::Regular, TOML, None),
            ("big", tar::EntryType::Regular, &[0u8; 4096], None),
        ]);
        let (_t, r) = run(
            "size",
            gz(&tar),
            Limits {
                max_files: 10,
                max_total_bytes: 1000,
                ..Limits::default()
            },
        );
        assert!(matches!(r, Err(BundleError::TooLarge(_))));
        let (_t, r) = run(
            "count",
            gz(&tar),
            Limits {
                max_files: 1,
                max_total_bytes: 1 << 20,
                ..Limits::default()
            },
        );
        assert!(matches!(r, Err(BundleError::TooLarge(_))));
        // Directories have a bound of their own.
        let names: Vec<String> = (0..5).map(|i| format!("d{i}/")).collect();
        let mut entries: Vec<(&str, tar::EntryType, &[u8], Option<&str>)> =
            vec![("lodge.toml", tar::EntryType::Regular, TOML, None)];
        entries.extend(
            names
                .iter()
                .map(|n| (n.as_str(), tar::EntryType::Directory, &b""[..], None)),
        );
        let (_t, r) = run(
            "dirs",
            gz(&tar_with(&entries)),
            Limits {
                max_dirs: 4,
                ..Limits::default()
            },
        );
        assert!(
            matches!(&r, Err(BundleError::TooLarge(m)) if m.contains("directories")),
            "{r:?}"
        );
    }

    #[test]
    fn missing_or_bad_manifest() {
        let tar = tar_with(&[("Dockerfile", tar::EntryType::Regular, b"FROM scratch", None)]);
        let (_t, r) = run("nomanifest", gz(&tar), Limits::default());
        let e = r.unwrap_err();
        assert!(matches!(e, BundleError::NoManifest { .. }));
        assert!(e.to_string().contains("lodge.toml") && e.to_string().contains("Dockerfile"));
        let tar = tar_with(&[("lodge.toml", tar::EntryType::Regular, b"command = []", None)]);
        let (_t, r) = run("empty", gz(&tar), Limits::default());
        assert!(matches!(r, Err(BundleError::BadManifest(_))));
        let (_t, r) = run(
            "garbage",
            b"\x1f\x8bnot really gzip".to_vec(),
            Limits::default(),
        );
        assert!(r.is_err());
    }
}
