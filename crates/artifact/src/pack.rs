//! A build as an artifact for joined nodes: a tar of its bundle that is the same bytes every
//! time it is made from the same tree (sorted entries, fixed times and owners), so its SHA-256
//! names its content.

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
    let digest = w.ctx.finish();
    let hex = digest.as_ref().iter().map(|x| format!("{x:02x}")).collect();
    Ok((w.len, hex))
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
