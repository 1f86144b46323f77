//! What a node keeps of its processes' output: each process's log (`DIR/log`, written by its
//! shim), read here for the control plane by tail, by offset (to follow or download it), and
//! deleted once the control plane says it is past retention.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Never read more than this from the end of a log to find the last lines.
const TAIL_WINDOW: u64 = 8 << 20;
/// The most one read returns, whatever was asked.
pub const MAX_READ: usize = 1 << 20;

/// A process id is one path component of the node's `processes` dir; anything else names no
/// process (and no file outside it).
pub fn process_dir(
    processes: &Path,
    process_id: &str,
) -> Result<PathBuf, lodge_model::node::LinkError> {
    let plain = !process_id.is_empty()
        && process_id.len() <= 128
        && process_id != "."
        && process_id != ".."
        && process_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !plain {
        return Err(lodge_model::node::LinkError::NotFound(format!(
            "'{process_id}' is not a process id"
        )));
    }
    Ok(processes.join(process_id))
}

/// The last `n` lines of the file, and the file length they end at.
pub async fn tail_lines(path: &Path, n: usize) -> std::io::Result<(Vec<u8>, u64)> {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    let start = len.saturating_sub(TAIL_WINDOW);
    f.seek(SeekFrom::Start(start)).await?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    (&mut f).take(len - start).read_to_end(&mut buf).await?;
    let end = buf.len() as u64 + start;
    // Count back n newlines (ignoring a final one).
    let mut seen = 0;
    let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
    let mut cut = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                cut = i + 1;
                break;
            }
        }
    }
    Ok((buf[cut..].to_vec(), end))
}

/// Up to `max` bytes from `offset` (at most [`MAX_READ`]); empty at the end or for no file.
pub async fn read_at(path: &Path, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    if offset >= len {
        return Ok(Vec::new());
    }
    f.seek(SeekFrom::Start(offset)).await?;
    let want = (len - offset).min(max.min(MAX_READ) as u64);
    let mut buf = Vec::with_capacity(want as usize);
    (&mut f).take(want).read_to_end(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tails_and_reads_from_an_offset() {
        let p = std::env::temp_dir().join(format!("lodge-tail-{}", std::process::id()));
        tokio::fs::write(&p, "a\nb\nc\nd\n").await.unwrap();
        assert_eq!(tail_lines(&p, 2).await.unwrap(), (b"c\nd\n".to_vec(), 8));
        assert_eq!(tail_lines(&p, 10).await.unwrap().0, b"a\nb\nc\nd\n");
        assert_eq!(read_at(&p, 2, 3).await.unwrap(), b"b\nc");
        assert!(read_at(&p, 8, 10).await.unwrap().is_empty());
        tokio::fs::write(&p, "x\ny").await.unwrap();
        assert_eq!(tail_lines(&p, 1).await.unwrap().0, b"y");
        let _ = tokio::fs::remove_file(&p).await;
        assert!(tail_lines(&p, 1).await.unwrap().0.is_empty());
        assert!(read_at(&p, 0, 10).await.unwrap().is_empty());
    }

    #[test]
    fn process_ids_stay_inside_the_processes_dir() {
        let root = Path::new("/data/processes");
        assert_eq!(process_dir(root, "a1-b_2").unwrap(), root.join("a1-b_2"));
        for bad in ["", ".", "..", "../x", "a/b", "a\0b"] {
            assert!(process_dir(root, bad).is_err(), "{bad:?}");
        }
    }
}
