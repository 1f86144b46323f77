//! A build as an artifact for joined nodes, named by its SHA-256. A native bundle is a tar of
//! its tree that is the same bytes every time it is made from the same tree (sorted entries,
//! fixed times and owners). A container image travels as an OCI image layout (`image/`: one
//! uncompressed layer holding the imported root file system with its owners and modes, and a
//! config with its entrypoint, command, environment, working directory and user), so that the
//! node imports it with the same hardened code as the control plane did.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Writes through to `inner` and hashes what passes.
struct Hashing<W> {
    inner: W,
    ctx: ring::digest::Context,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Pack the tree at `root` under `prefix/` into `out`; returns its size and SHA-256 (hex).
pub fn pack_dir(root: &Path, prefix: &str, out: &Path) -> io::Result<(u64, String)> {
    let file = io::BufWriter::new(fs::File::create(out)?);
    let mut b = tar::Builder::new(Hashing {
        inner: file,
        ctx: ring::digest::Context::new(&ring::digest::SHA256),
        len: 0,
    });
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    b.append_dir(prefix, root)?;
    walk(&mut b, root, Path::new(prefix))?;
    let mut w = b.into_inner()?;
    w.flush()?;
    let digest = hex(w.ctx.finish().as_ref());
    Ok((w.len, digest))
}

/// Pack the imported image at `image_dir` (`rootfs/`, `image.json`) into `out` as an OCI
/// layout under `image/`; `scratch` holds the layer while it is hashed. Returns the artifact's
/// size and SHA-256 (hex).
pub fn pack_image(image_dir: &Path, scratch: &Path, out: &Path) -> io::Result<(u64, String)> {
    let config = crate::image::ImageConfig::load(image_dir).map_err(io::Error::other)?;
    // The layer: the root file system as it is, owners and modes included.
    let layer_path = scratch.join("layer.tar");
    let layer_file = io::BufWriter::new(fs::File::create(&layer_path)?);
    let mut b = tar::Builder::new(Hashing {
        inner: layer_file,
        ctx: ring::digest::Context::new(&ring::digest::SHA256),
        len: 0,
    });
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    walk(&mut b, &image_dir.join(crate::image::ROOTFS), Path::new(""))?;
    let mut w = b.into_inner()?;
    w.flush()?;
    let (layer_len, layer_digest) = (w.len, hex(w.ctx.finish().as_ref()));
    let exposed: serde_json::Map<String, serde_json::Value> = config
        .exposed_ports
        .iter()
        .map(|p| (p.clone(), serde_json::json!({})))
        .collect();
    let config_blob = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd,
            "Env": config.env,
            "WorkingDir": config.working_dir,
            "User": config.user,
            "ExposedPorts": exposed,
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
    }))?;
    let config_digest = sha256_hex(&config_blob);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config_blob.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_len,
        }],
    }))?;
    let manifest_digest = sha256_hex(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": { "os": "linux", "architecture": "amd64" },
        }],
    }))?;

    let file = io::BufWriter::new(fs::File::create(out)?);
    let mut a = tar::Builder::new(Hashing {
        inner: file,
        ctx: ring::digest::Context::new(&ring::digest::SHA256),
        len: 0,
    });
    a.mode(tar::HeaderMode::Deterministic);
    let add = |a: &mut tar::Builder<_>, name: &str, data: &[u8]| -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        a.append_data(&mut h, name, data)
    };
    add(
        &mut a,
        "image/oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    add(&mut a, "image/index.json", &index)?;
    add(
        &mut a,
        &format!("image/blobs/sha256/{manifest_digest}"),
        &manifest,
    )?;
    add(
        &mut a,
        &format!("image/blobs/sha256/{config_digest}"),
        &config_blob,
    )?;
    let mut h = tar::Header::new_gnu();
    h.set_size(layer_len);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    a.append_data(
        &mut h,
        format!("image/blobs/sha256/{layer_digest}"),
        fs::File::open(&layer_path)?,
    )?;
    let mut w = a.into_inner()?;
    w.flush()?;
    let _ = fs::remove_file(&layer_path);
    let digest = hex(w.ctx.finish().as_ref());
    Ok((w.len, digest))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn walk<W: Write>(b: &mut tar::Builder<W>, dir: &Path, name: &Path) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = name.join(e.file_name());
        let kind = e.file_type()?;
        if kind.is_dir() {
            b.append_dir(&rel, &path)?;
            walk(b, &path, &rel)?;
        } else if kind.is_file() || kind.is_symlink() {
            b.append_path_with_name(&path, &rel)?;
        }
        // Sockets, fifos and devices are not part of a bundle.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_tree_packs_to_the_same_digest() {
        let base = std::env::temp_dir().join(format!("lodge-pack-{}", std::process::id()));
        let tree = base.join("tree");
        fs::create_dir_all(tree.join("sub")).unwrap();
        fs::write(tree.join("lodge.toml"), "command = [\"./run\"]\n").unwrap();
        fs::write(tree.join("sub/b"), "b").unwrap();
        fs::write(tree.join("a"), "a").unwrap();
        let (n1, d1) = pack_dir(&tree, "bundle", &base.join("1.tar")).unwrap();
        // Touch every file: times are not part of the artifact.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(tree.join("a"), "a").unwrap();
        let (n2, d2) = pack_dir(&tree, "bundle", &base.join("2.tar")).unwrap();
        assert_eq!((n1, &d1), (n2, &d2));
        fs::write(tree.join("a"), "changed").unwrap();
        let (_, d3) = pack_dir(&tree, "bundle", &base.join("3.tar")).unwrap();
        assert_ne!(d1, d3);
        // And it unpacks under the bundle rules.
        let out = base.join("out");
        crate::bundle::unpack_archive(&base.join("1.tar"), &out, crate::bundle::Limits::default())
            .unwrap();
        assert_eq!(fs::read_to_string(out.join("bundle/sub/b")).unwrap(), "b");
        fs::remove_dir_all(&base).unwrap();
    }
}
