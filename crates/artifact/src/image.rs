//! Container images: an OCI image layout or a `docker save` archive, unpacked into one root
//! file system per image that all of its processes share read-only, plus the parts of the image
//! config a runtime needs (entrypoint, command, environment, working directory, user).
//!
//! Layers are applied in order with OCI whiteouts. Layer entries are untrusted: paths are
//! normalised, every parent is resolved inside the root (symlinks are followed as the
//! container would see them, never out of the root), and devices and fifos are skipped (the
//! runtime provides `/dev`).

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, Read};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where an image lives under a build's directory.
pub const DIR: &str = "image";
pub const ROOTFS: &str = "rootfs";
pub const CONFIG: &str = "image.json";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Invalid(String),
    #[error("unsafe layer entry '{0}': {1}")]
    Unsafe(String, &'static str),
    #[error("the image exceeds {0}")]
    TooLarge(String),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl From<crate::tarsafe::TarError> for ImageError {
    fn from(e: crate::tarsafe::TarError) -> Self {
        use crate::tarsafe::TarError;
        match e {
            TarError::Format(m) => ImageError::Invalid(m),
            TarError::TooLarge(m) => ImageError::TooLarge(m),
            TarError::Io(e) => ImageError::Io(e),
        }
    }
}

fn invalid(m: impl Into<String>) -> ImageError {
    ImageError::Invalid(m.into())
}

/// What Lodge keeps of an image config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    /// `7777/udp` style keys of the image's EXPOSE.
    pub exposed_ports: Vec<String>,
    /// Bytes of the (compressed) layers, as a registry reports an image's size.
    pub size: u64,
    /// Digest of the image manifest (`sha256:...`), or of the config for docker archives.
    pub digest: String,
}

impl ImageConfig {
    /// The argv a container of this image runs.
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    pub fn load(image_dir: &Path) -> Result<Self, ImageError> {
        let text = read_small(&image_dir.join(CONFIG))?;
        serde_json::from_slice(&text).map_err(|e| invalid(format!("bad {CONFIG}: {e}")))
    }
}

/// Upper bounds on what an image may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Entries of every kind over all layers.
    pub max_files: usize,
    pub max_total_bytes: u64,
    /// Directory entries over all layers (each a mkdir now, an rmdir later).
    pub max_dirs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files: 500_000,
            max_total_bytes: 32 << 30,
            max_dirs: 100_000,
        }
    }
}

/// Whether an unpacked upload is an image: an OCI layout or a docker archive at its root.
pub fn is_image_layout(dir: &Path) -> bool {
    dir.join("index.json").is_file() || dir.join("manifest.json").is_file()
}

/// Digest strings are `algorithm:hex`; only sha256 blobs are read, by name inside `blobs/`.
fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| invalid(format!("unsupported digest '{digest}'")))?;
    Ok(layout.join("blobs").join("sha256").join(hex))
}

/// Largest JSON document (manifest, index, config) read from an image.
pub const MAX_JSON: u64 = 4 << 20;

/// A metadata file of an image, refused beyond [`MAX_JSON`] before it is read.
fn read_small(path: &Path) -> Result<Vec<u8>, ImageError> {
    let file = fs::File::open(path)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(ImageError::TooLarge(format!(
            "{MAX_JSON} bytes for {}",
            path.file_name().unwrap_or_default().to_string_lossy()
        )));
    }
    Ok(bytes)
}

fn read_json(path: &Path) -> Result<Value, ImageError> {
    let bytes = read_small(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("{} is not JSON: {e}", path.display())))
}

/// The layers (files inside `layout`) and config of the image in `layout`.
struct Resolved {
    layers: Vec<PathBuf>,
    config: Value,
    digest: String,
}

/// Pick the manifest of an OCI index for linux/amd64 (or the only one).
fn pick_manifest(layout: &Path, index: &Value, depth: u32) -> Result<(Value, String), ImageError> {
    if depth > 4 {
        return Err(invalid("image indexes nest too deeply"));
    }
    let manifests = index["manifests"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("the image index lists no manifests"))?;
    let chosen = manifests
        .iter()
        .find(|m| {
            m["platform"]["os"].as_str() == Some("linux")
                && m["platform"]["architecture"].as_str() == Some("amd64")
        })
        .or_else(|| manifests.iter().find(|m| m.get("platform").is_none()))
        .unwrap_or(&manifests[0]);
    let digest = chosen["digest"]
        .as_str()
        .ok_or_else(|| invalid("a manifest entry has no digest"))?
        .to_string();
    let doc = read_json(&blob_path(layout, &digest)?)?;
    if doc.get("manifests").is_some() {
        return pick_manifest(layout, &doc, depth + 1);
    }
    Ok((doc, digest))
}

fn resolve(layout: &Path) -> Result<Resolved, ImageError> {
    if layout.join("index.json").is_file() {
        let index = read_json(&layout.join("index.json"))?;
        let (manifest, digest) = pick_manifest(layout, &index, 0)?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| invalid("the image manifest has no config"))?;
        let config = read_json(&blob_path(layout, config_digest)?)?;
        let layers = manifest["layers"]
            .as_array()
            .ok_or_else(|| invalid("the image manifest has no layers list"))?
            .iter()
            .map(|l| {
                let media = l["mediaType"].as_str().unwrap_or("");
                if media.contains("zstd") {
                    return Err(invalid(format!("zstd layers are not supported ({media})")));
                }
                blob_path(layout, l["digest"].as_str().unwrap_or(""))
            })
            .collect::<Result<_, _>>()?;
        return Ok(Resolved {
            layers,
            config,
            digest,
        });
    }
    // docker save: manifest.json lists the config file and layer files.
    let manifest = read_json(&layout.join("manifest.json"))?;
    let entry = manifest
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| invalid("manifest.json lists no image"))?;
    let inside = |name: &str| -> Result<PathBuf, ImageError> {
        let rel =
            normalise(Path::new(name)).map_err(|why| ImageError::Unsafe(name.to_string(), why))?;
        Ok(layout.join(rel))
    };
    let config_name = entry["Config"]
        .as_str()
        .ok_or_else(|| invalid("manifest.json has no Config"))?;
    let config_bytes = read_small(&inside(config_name)?)?;
    let digest = format!(
        "sha256:{}",
        hex(ring::digest::digest(&ring::digest::SHA256, &config_bytes).as_ref())
    );
    let config = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid(format!("the image config is not JSON: {e}")))?;
    let layers = entry["Layers"]
        .as_array()
        .ok_or_else(|| invalid("manifest.json has no Layers"))?
        .iter()
        .map(|l| inside(l.as_str().unwrap_or("")))
        .collect::<Result<_, _>>()?;
    Ok(Resolved {
        layers,
        config,
        digest,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Import the image in `layout` (an unpacked OCI layout or docker archive) into `dest`
/// (`rootfs/` and `image.json`), which must not exist yet.
pub fn import(layout: &Path, dest: &Path, limits: Limits) -> Result<ImageConfig, ImageError> {
    let r = resolve(layout)?;
    let c = &r.config["config"];
    let mut config = ImageConfig {
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
        env: strings(&c["Env"]),
        working_dir: c["WorkingDir"].as_str().unwrap_or("").to_string(),
        user: c["User"].as_str().unwrap_or("").to_string(),
        exposed_ports: c["ExposedPorts"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
        size: 0,
        digest: r.digest,
    };
    if config.argv().is_empty() {
        return Err(invalid(
            "the image has neither ENTRYPOINT nor CMD: nothing to run",
        ));
    }
    let rootfs = dest.join(ROOTFS);
    fs::create_dir_all(&rootfs)?;
    let mut budget = Budget {
        limits,
        entries: 0,
        dirs: 0,
        files: 0,
        bytes: 0,
    };
    for layer in &r.layers {
        config.size += fs::metadata(layer)
            .map_err(|e| invalid(format!("layer {} is missing: {e}", layer.display())))?
            .len();
        apply_layer(layer, &rootfs, &mut budget)?;
    }
    // Mount points the runtime needs, made now so the shared root is never written later.
    for d in ["proc", "sys", "dev", "tmp", "etc", "run"] {
        let p = rootfs.join(d);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir(&p)?;
        }
    }
    fs::write(
        dest.join(CONFIG),
        serde_json::to_vec_pretty(&config).map_err(|e| invalid(e.to_string()))?,
    )?;
    Ok(config)
}

struct Budget {
    limits: Limits,
    /// Archive entries of every kind seen so far, over all layers.
    entries: usize,
    dirs: usize,
    files: usize,
    bytes: u64,
}

/// A relative path of normal components (`.` dropped), or why not.
fn normalise(raw: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err("path contains '..'"),
            Component::Prefix(_) => return Err("path has a prefix"),
        }
    }
    Ok(out)
}

/// Resolve `rel` (a directory path relative to `root`) as the container would, following
/// symlinks but never leaving `root`; missing directories are created. Returns a real path.
fn resolve_dir(root: &Path, rel: &Path) -> Result<PathBuf, ImageError> {
    let mut todo: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            _ => None,
        })
        .collect();
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            parts.pop();
            continue;
        }
        if name == "." {
            continue;
        }
        let mut cur = root.to_path_buf();
        cur.extend(&parts);
        cur.push(&name);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(invalid(format!(
                        "too many symlinks under {}",
                        rel.display()
                    )));
                }
                let target = fs::read_link(&cur)?;
                if target.is_absolute() {
                    parts.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(p) => todo.push(p.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(m) if m.is_dir() => parts.push(name),
            Ok(_) => {
                return Err(ImageError::Unsafe(
                    rel.display().to_string(),
                    "a parent is not a directory",
                ))
            }
            Err(_) => {
                fs::create_dir(&cur)?;
                parts.push(name);
            }
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&parts);
    Ok(out)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn apply_layer(layer: &Path, root: &Path, budget: &mut Budget) -> Result<(), ImageError> {
    let mut reader = io::BufReader::new(fs::File::open(layer)?);
    let gz = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(reader);
    // Directories this layer made opaque: their lower contents are gone.
    let mut opaque_done: HashSet<PathBuf> = HashSet::new();
    // Every entry of every layer counts toward the image's limit.
    let room = budget.limits.max_files.saturating_sub(budget.entries);
    crate::tarsafe::for_each(&mut archive, room, |m| {
        budget.entries += 1;
        let crate::tarsafe::Member {
            mut entry,
            path: raw,
            link,
            size,
            ..
        } = m;
        let name = raw.display().to_string();
        let rel = normalise(&raw).map_err(|why| ImageError::Unsafe(name.clone(), why))?;
        let Some(file_name) = rel.file_name().map(|f| f.to_string_lossy().into_owned()) else {
            return Ok(()); // the root itself
        };
        let parent = resolve_dir(root, rel.parent().unwrap_or(Path::new("")))?;
        if file_name == ".wh..wh..opq" {
            if opaque_done.insert(parent.clone()) {
                for child in fs::read_dir(&parent)? {
                    remove_any(&child?.path())?;
                }
            }
            return Ok(());
        }
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            remove_any(&parent.join(hidden))?;
            return Ok(());
        }
        let target = parent.join(&file_name);
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let kind = header.entry_type();
        budget.files += 1;
        if budget.files > budget.limits.max_files {
            return Err(ImageError::TooLarge(format!(
                "{} files",
                budget.limits.max_files
            )));
        }
        match kind {
            tar::EntryType::Directory => {
                budget.dirs += 1;
                if budget.dirs > budget.limits.max_dirs {
                    return Err(ImageError::TooLarge(format!(
                        "{} directories",
                        budget.limits.max_dirs
                    )));
                }
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        fs::remove_file(&target)?;
                        fs::create_dir(&target)?;
                    }
                    Err(_) => fs::create_dir(&target)?,
                }
                set_mode(&target, mode)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                budget.bytes = budget.bytes.saturating_add(size);
                if budget.bytes > budget.limits.max_total_bytes {
                    return Err(ImageError::TooLarge(format!(
                        "{} bytes",
                        budget.limits.max_total_bytes
                    )));
                }
                remove_any(&target)?;
                let mut out = fs::File::create(&target)?;
                let copied = io::copy(&mut (&mut entry).take(size), &mut out)?;
                if copied != size {
                    return Err(invalid(format!("'{name}' is truncated")));
                }
                drop(out);
                set_mode(&target, mode)?;
            }
            tar::EntryType::Symlink => {
                let link =
                    link.ok_or_else(|| invalid(format!("symlink '{name}' has no target")))?;
                remove_any(&target)?;
                // The target is interpreted inside the container; it is never followed here
                // except through `resolve_dir`, which stays inside the root.
                std::os::unix::fs::symlink(&link, &target)?;
            }
            tar::EntryType::Link => {
                let link =
                    link.ok_or_else(|| invalid(format!("hard link '{name}' has no target")))?;
                let link_rel = normalise(&link)
                    .map_err(|why| ImageError::Unsafe(link.display().to_string(), why))?;
                let link_parent = resolve_dir(root, link_rel.parent().unwrap_or(Path::new("")))?;
                let source = link_parent.join(link_rel.file_name().unwrap_or_default());
                let meta = fs::symlink_metadata(&source)
                    .map_err(|_| invalid(format!("hard link '{name}' points to a missing file")))?;
                if !meta.is_file() {
                    return Err(ImageError::Unsafe(name, "hard link to a non-file"));
                }
                remove_any(&target)?;
                fs::hard_link(&source, &target)?;
            }
            // The runtime provides /dev; fifos and sockets are made by programs at run time.
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => return Ok(()),
            _ => return Ok(()),
        }
        if let (Ok(uid), Ok(gid)) = (header.uid(), header.gid()) {
            let _ = std::os::unix::fs::lchown(&target, Some(uid as u32), Some(gid as u32));
            if kind != tar::EntryType::Symlink {
                // chown clears setuid bits; put the mode back.
                let _ = set_mode(&target, mode);
            }
        }
        Ok(())
    })
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "lodge-image-{tag}-{}-{}",
                std::process::id(),
                lodge_model::id::secret_hex()
            ));
            fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    fn layer(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::File(p, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    // Written raw: the tar crate refuses to build `..` paths itself.
                    let name = &mut h.as_old_mut().name;
                    name.fill(0);
                    name[..p.len()].copy_from_slice(p.as_bytes());
                    h.set_cksum();
                    b.append(&h, *data).unwrap();
                }
                E::Sym(p, to) | E::Hard(p, to) => {
                    h.set_entry_type(if matches!(e, E::Sym(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    h.set_size(0);
                    b.append_link(&mut h, p, to).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    /// An OCI layout with these layers (uncompressed) and an entrypoint.
    fn layout(dir: &Path, layers: &[Vec<u8>]) {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let d = hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
            fs::write(blobs.join(&d), data).unwrap();
            format!("sha256:{d}")
        };
        let config = put(br#"{"config":{"Entrypoint":["/bin/gs"],"Cmd":["--fast"],"Env":["A=1"],"WorkingDir":"/srv","ExposedPorts":{"7777/udp":{}}}}"#);
        let layers: Vec<Value> = layers
            .iter()
            .map(|l| serde_json::json!({"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":put(l),"size":l.len()}))
            .collect();
        let manifest = put(
            serde_json::json!({"schemaVersion":2,"config":{"digest":config},"layers":layers})
                .to_string()
                .as_bytes(),
        );
        fs::write(
            dir.join("index.json"),
            serde_json::json!({"schemaVersion":2,"manifests":[{"digest":manifest}]}).to_string(),
        )
        .unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_links() {
        let t = Tmp::new("apply");
        let (lay, dest) = (t.0.join("layout"), t.0.join("img"));
        let l1 = layer(&[
            E::Dir("usr/"),
            E::Dir("usr/lib/"),
            E::File("usr/lib/a.so", b"a"),
            E::Sym("lib", "usr/lib"),
            E::Dir("etc/"),
            E::File("etc/old.conf", b"old"),
            E::Dir("cache/"),
            E::File("cache/x", b"x"),
            E::File("bin/gs", b"#!gs"),
        ]);
        let l2 = layer(&[
            E::File("lib/b.so", b"b"), // through the symlink, lands in usr/lib
            E::File("etc/.wh.old.conf", b""),
            E::File("cache/.wh..wh..opq", b""),
            E::File("cache/y", b"y"),
            E::Hard("bin/gs2", "bin/gs"),
            E::Sym("escape", "/../../../etc/passwd"),
        ]);
        layout(&lay, &[l1, l2]);
        assert!(is_image_layout(&lay));
        let cfg = import(&lay, &dest, Limits::default()).unwrap();
        assert_eq!(cfg.argv(), vec!["/bin/gs", "--fast"]);
        assert_eq!(cfg.env, vec!["A=1"]);
        assert_eq!(cfg.working_dir, "/srv");
        assert_eq!(cfg.exposed_ports, vec!["7777/udp"]);
        assert!(cfg.digest.starts_with("sha256:"));
        let root = dest.join(ROOTFS);
        assert_eq!(fs::read(root.join("usr/lib/b.so")).unwrap(), b"b");
        assert!(
            !root.join("etc/old.conf").exists(),
            "whiteout removed the file"
        );
        assert!(
            !root.join("cache/x").exists(),
            "opaque directory hid lower files"
        );
        assert_eq!(fs::read(root.join("cache/y")).unwrap(), b"y");
        assert_eq!(fs::read(root.join("bin/gs2")).unwrap(), b"#!gs");
        assert!(fs::symlink_metadata(root.join("escape"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(root.join("proc").is_dir() && root.join("tmp").is_dir());
        assert_eq!(ImageConfig::load(&dest).unwrap(), cfg);
    }

    #[test]
    fn entries_cannot_leave_the_root() {
        let t = Tmp::new("escape");
        let outside = t.0.join("outside");
        fs::create_dir_all(&outside).unwrap();
        for (i, entries) in [
            vec![E::File("../evil", b"x")],
            vec![E::Sym("up", "../../outside"), E::File("up/evil", b"x")],
            vec![
                E::Sym(
                    "abs",
                    &*Box::leak(outside.display().to_string().into_boxed_str()),
                ),
                E::File("abs/evil", b"x"),
            ],
        ]
        .into_iter()
        .enumerate()
        {
            let (lay, dest) = (t.0.join(format!("l{i}")), t.0.join(format!("d{i}")));
            layout(&lay, &[layer(&entries)]);
            let _ = import(&lay, &dest, Limits::default());
            assert!(
                !outside.join("evil").exists(),
                "case {i} wrote outside the root"
            );
            assert!(
                !t.0.join("evil").exists(),
                "case {i} wrote outside the root"
            );
        }
    }

    #[test]
    fn limits_and_bad_images() {
        let t = Tmp::new("limits");
        let lay = t.0.join("layout");
        layout(
            &lay,
            &[layer(&[E::File("a", b"12345"), E::File("b", b"12345")])],
        );
        let small = Limits {
            max_files: 10,
            max_total_bytes: 8,
            ..Limits::default()
        };
        assert!(matches!(
            import(&lay, &t.0.join("d1"), small),
            Err(ImageError::TooLarge(_))
        ));
        fs::write(lay.join("index.json"), "{}").unwrap();
        assert!(import(&lay, &t.0.join("d2"), Limits::default()).is_err());
    }
}
