//! Frames: one JSON document per line, at most [`MAX_FRAME`] bytes.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

pub use lodge_model::protocol::MAX_FRAME;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("a frame exceeds {MAX_FRAME} bytes")]
    TooLarge,
    #[error("malformed frame: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads frames from a buffered stream, never holding more than one frame's bytes.
pub struct FrameReader<R> {
    inner: R,
    line: Vec<u8>,
}

impl<R: AsyncBufRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            line: Vec::new(),
        }
    }

    /// The next frame; cancel-safe (a partial line stays buffered for the next call).
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        loop {
            let buf = self.inner.fill_buf().await?;
            if buf.is_empty() {
                return Err(FrameError::Closed);
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if self.line.len() + take > MAX_FRAME + 1 {
                return Err(FrameError::TooLarge);
            }
            self.line.extend_from_slice(&buf[..take]);
            self.inner.consume(take);
            if done {
                let parsed = serde_json::from_slice(&self.line).map_err(FrameError::Malformed);
                self.line.clear();
                return parsed;
            }
        }
    }
}

/// Write one frame and flush it.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let mut bytes = serde_json::to_vec(msg).map_err(FrameError::Malformed)?;
    if bytes.len() > MAX_FRAME {
        return Err(FrameError::TooLarge);
    }
    bytes.push(b'\n');
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_survive_any_split_and_oversize_is_refused() {
        let (mut a, b) = tokio::io::duplex(7);
        let mut r = FrameReader::new(tokio::io::BufReader::new(b));
        let writer = tokio::spawn(async move {
            for i in 0..50u32 {
                write_frame(
                    &mut a,
                    &serde_json::json!({ "n": i, "pad": "x".repeat(i as usize) }),
                )
                .await
                .unwrap();
            }
            a.write_all(&vec![b'x'; MAX_FRAME + 10]).await.ok();
        });
        for i in 0..50u64 {
            let v: serde_json::Value = r.next().await.unwrap();
            assert_eq!(v["n"], i);
        }
        assert!(matches!(
            r.next::<serde_json::Value>().await,
            Err(FrameError::TooLarge)
        ));
        writer.abort();
    }
}
