//! LogsV1: tail, follow and download a process's log, read through the node that keeps it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use lodge_model::node::NodeLink;

use crate::{invalid, ApiResult, AppState, Dev, Path, QueryPairs};

/// How much of a log one read from the node asks for.
const CHUNK: usize = 64 * 1024;

fn octet_stream(body: axum::body::Body) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

/// A node that cannot be reached is a 503, a log it does not have a 404.
fn node_error(e: lodge_model::node::LinkError) -> lodge_control::Error {
    e.into()
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
    let (process, node) = s.control.process_log(&c, &app, &pid).await?;
    let (initial, mut offset) = node
        .log_tail(&pid, lines as usize)
        .await
        .map_err(node_error)?;
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
            loop {
                match node.log_read(&pid, offset, CHUNK).await {
                    Ok(chunk) if !chunk.is_empty() => {
                        offset += chunk.len() as u64;
                        if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                            return;
                        }
                    }
                    _ => break,
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
    let (_, node) = s.control.process_log(&c, &app, &pid).await?;
    // The first chunk is read before answering, so a node that cannot read the log is an error
    // status, not a cut-off body.
    let first = node.log_read(&pid, 0, CHUNK).await.map_err(node_error)?;
    let offset = first.len() as u64;
    Ok(octet_stream(axum::body::Body::from_stream(log_stream(
        node, pid, first, offset,
    ))))
}

/// Where a download stands: the chunk read before answering, then reads from an offset.
enum Download {
    First(Vec<u8>, u64),
    At(u64),
    Done,
}

/// `first`, then the rest of the log from `offset`, chunk by chunk.
fn log_stream(
    node: Arc<dyn NodeLink>,
    pid: String,
    first: Vec<u8>,
    offset: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold(Download::First(first, offset), move |state| {
        let (node, pid) = (node.clone(), pid.clone());
        async move {
            match state {
                Download::Done => None,
                Download::First(chunk, _) if chunk.is_empty() => None,
                Download::First(chunk, at) => Some((Ok(Bytes::from(chunk)), Download::At(at))),
                Download::At(at) => match node.log_read(&pid, at, CHUNK).await {
                    Ok(chunk) if chunk.is_empty() => None,
                    Ok(chunk) => {
                        let next = at + chunk.len() as u64;
                        Some((Ok(Bytes::from(chunk)), Download::At(next)))
                    }
                    Err(e) => Some((Err(std::io::Error::other(e)), Download::Done)),
                },
            }
        }
    })
}
