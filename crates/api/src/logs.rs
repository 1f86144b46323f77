//! LogsV1: tail, follow and download a process's log.

use std::io::SeekFrom;
use std::path::Path as FsPath;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::{invalid, ApiFailure, ApiResult, AppState, Dev, Path, QueryPairs};

/// Never read more than this from the end of a log to find the last lines.
const TAIL_WINDOW: u64 = 8 << 20;

fn octet_stream(body: axum::body::Body) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

/// The last `n` lines of the file, and the file length they end at.
async fn tail_lines(path: &FsPath, n: usize) -> std::io::Result<(Vec<u8>, u64)> {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    let start = len.saturating_sub(TAIL_WINDOW);
    f.seek(SeekFrom::Start(start)).await?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut buf).await?;
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

pub async fn tail(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, pid)): Path<(String, String)>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let follow = match q.get("follow") {
        None | Some("false") | Some("") => false,
        Some("true") => true,
        Some(v) => return Err(invalid(format!("follow must be true or false, got '{v}'"))),
    };
    let lines: u32 = q.parse_opt("tailLines")?.unwrap_or(100);
    if !(1..=5000).contains(&lines) {
        return Err(invalid(format!("tailLines must be 1 to 5000, got {lines}")));
    }
    let (process, path) = s.control.process_log(&c, &app, &pid).await?;
    let (initial, mut offset) = tail_lines(&path, lines as usize)
        .await
        .map_err(lodge_control::Error::from)?;
    if !follow || process.status.is_terminal() {
        return Ok(octet_stream(axum::body::Body::from(initial)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
    let control = s.control.clone();
    tokio::spawn(async move {
        if !initial.is_empty() && tx.send(Ok(Bytes::from(initial))).await.is_err() {
            return;
        }
        loop {
            let ended =
                !matches!(control.process_status(&pid).await, Ok(Some(st)) if !st.is_terminal());
            // Read whatever was appended since the last look.
            if let Ok(mut f) = tokio::fs::File::open(&path).await {
                let len = f.metadata().await.map(|m| m.len()).unwrap_or(offset);
                if len > offset && f.seek(SeekFrom::Start(offset)).await.is_ok() {
                    let mut chunk = Vec::with_capacity((len - offset) as usize);
                    if (&mut f)
                        .take(len - offset)
                        .read_to_end(&mut chunk)
                        .await
                        .is_ok()
                    {
                        offset += chunk.len() as u64;
                        if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if ended {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    Ok(octet_stream(axum::body::Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

pub async fn download(
    State(s): State<AppState>,
    Dev(c): Dev,
    Path((app, pid)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (_, path) = s.control.process_log(&c, &app, &pid).await?;
    match tokio::fs::File::open(&path).await {
        Ok(f) => Ok(octet_stream(axum::body::Body::from_stream(
            tokio_util_stream(f),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(octet_stream(axum::body::Body::empty()))
        }
        Err(e) => Err(ApiFailure(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            None,
        )),
    }
}

/// A file as a stream of chunks.
fn tokio_util_stream(
    f: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold(f, |mut f| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tails_the_last_lines() {
        let p = std::env::temp_dir().join(format!("lodge-tail-{}", std::process::id()));
        tokio::fs::write(&p, "a\nb\nc\nd\n").await.unwrap();
        assert_eq!(tail_lines(&p, 2).await.unwrap().0, b"c\nd\n");
        assert_eq!(tail_lines(&p, 10).await.unwrap().0, b"a\nb\nc\nd\n");
        tokio::fs::write(&p, "x\ny").await.unwrap();
        assert_eq!(tail_lines(&p, 1).await.unwrap().0, b"y");
        let _ = tokio::fs::remove_file(&p).await;
        assert!(tail_lines(&p, 1).await.unwrap().0.is_empty());
    }
}
