//! A streaming `multipart/form-data` reader for the legacy build uploads: the part named `file`
//! is written straight to disk, other parts are kept as (small) text fields. Tolerates the
//! preamble CRLF some engine plugins put before the first boundary.

use std::path::Path;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

/// Text fields larger than this are rejected (they are form values, not files).
const MAX_FIELD: usize = 64 * 1024;
const MAX_HEADERS: usize = 16 * 1024;

/// What a form held.
#[derive(Debug, Default)]
pub struct Form {
    /// Bytes written for the `file` part, if there was one.
    pub file_bytes: Option<u64>,
    pub fields: Vec<(String, String)>,
}

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty() && b.len() <= 200)
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `name` of a part from its headers.
fn part_name(headers: &str) -> Option<String> {
    let disposition = headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(v)
    })?;
    disposition.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        (k.trim() == "name").then(|| v.trim().trim_matches('"').to_string())
    })
}

enum State {
    /// Before the first boundary.
    Preamble,
    Headers,
    Body {
        name: String,
    },
    Done,
}

/// Read a form from `body`; the part named `file_field` goes to `dest` (at most `limit` bytes).
pub async fn read(
    body: axum::body::Body,
    boundary: &str,
    file_field: &str,
    dest: &Path,
    limit: u64,
) -> Result<Form, String> {
    // Every delimiter, the first included, is CRLF "--" boundary: start with a CRLF.
    let delim = format!("\r\n--{boundary}").into_bytes();
    let mut buf: Vec<u8> = b"\r\n".to_vec();
    let mut stream = body.into_data_stream();
    let mut state = State::Preamble;
    let mut form = Form::default();
    let mut file: Option<tokio::fs::File> = None;
    let mut field = Vec::new();
    let mut eof = false;
    loop {
        // Make as much progress as the buffer allows.
        let progressed = match &mut state {
            State::Preamble => match find(&buf, &delim) {
                Some(i) => {
                    buf.drain(..i + delim.len());
                    state = State::Headers;
                    true
                }
                None => {
                    let keep = buf.len().min(delim.len());
                    buf.drain(..buf.len() - keep);
                    false
                }
            },
            State::Headers => {
                if buf.len() >= 2 && &buf[..2] == b"--" {
                    state = State::Done;
                    true
                } else if let Some(i) = find(&buf, b"\r\n\r\n") {
                    let headers = String::from_utf8_lossy(&buf[..i]).into_owned();
                    buf.drain(..i + 4);
                    let name = part_name(&headers).unwrap_or_default();
                    if name == file_field {
                        if let Some(dir) = dest.parent() {
                            tokio::fs::create_dir_all(dir)
                                .await
                                .map_err(|e| e.to_string())?;
                        }
                        file = Some(
                            tokio::fs::File::create(dest)
                                .await
                                .map_err(|e| e.to_string())?,
                        );
                        form.file_bytes = Some(0);
                    }
                    state = State::Body { name };
                    true
                } else if buf.len() > MAX_HEADERS {
                    return Err("multipart part headers are too large".into());
                } else {
                    false
                }
            }
            State::Body { name } => {
                let end = find(&buf, &delim);
                let take = match end {
                    Some(i) => i,
                    None => buf.len().saturating_sub(delim.len()),
                };
                if take > 0 {
                    if *name == file_field {
                        let written = form.file_bytes.unwrap_or(0) + take as u64;
                        if written > limit {
                            return Err(format!("the uploaded file exceeds {limit} bytes"));
                        }
                        if let Some(f) = file.as_mut() {
                            f.write_all(&buf[..take]).await.map_err(|e| e.to_string())?;
                        }
                        form.file_bytes = Some(written);
                    } else {
                        field.extend_from_slice(&buf[..take]);
                        if field.len() > MAX_FIELD {
                            return Err(format!("form field '{name}' is too large"));
                        }
                    }
                    buf.drain(..take);
                }
                match end {
                    Some(_) => {
                        buf.drain(..delim.len());
                        if *name == file_field {
                            if let Some(mut f) = file.take() {
                                f.flush().await.map_err(|e| e.to_string())?;
                                f.sync_all().await.map_err(|e| e.to_string())?;
                            }
                        } else {
                            form.fields.push((
                                std::mem::take(name),
                                String::from_utf8_lossy(&field).into_owned(),
                            ));
                            field.clear();
                        }
                        // After a delimiter: "--" ends the form, CRLF starts the next part.
                        if buf.len() >= 2 && &buf[..2] == b"\r\n" {
                            buf.drain(..2);
                        }
                        state = State::Headers;
                        true
                    }
                    None => take > 0,
                }
            }
            State::Done => return Ok(form),
        };
        if progressed {
            continue;
        }
        if eof {
            return match state {
                State::Done => Ok(form),
                State::Preamble if form.file_bytes.is_none() && form.fields.is_empty() => Ok(form),
                _ => Err("the multipart body ended before its closing boundary".into()),
            };
        }
        match stream.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(format!("cannot read the request body: {e}")),
            None => eof = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(body: &'static [u8], limit: u64) -> (Result<Form, String>, Vec<u8>) {
        let dir = std::env::temp_dir().join(format!("lodge-mp-{}", lodge_model::id::secret_hex()));
        let dest = dir.join("file");
        // Feed it in awkward 7-byte chunks to cross every boundary.
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = body
            .chunks(7)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let stream = futures_util::stream::iter(chunks);
        let r = read(
            axum::body::Body::from_stream(stream),
            "XyZ",
            "file",
            &dest,
            limit,
        )
        .await;
        let data = std::fs::read(&dest).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        (r, data)
    }

    #[tokio::test]
    async fn reads_the_file_part_and_fields() {
        let body = b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"key\"\r\n\r\nbld-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"C:\\\\a b\\\\game.tgz\"\r\nContent-Type: application/octet-stream\r\n\r\nhello\r\n--Xy world\r\n--XyZ--\r\n";
        let (r, data) = parse(body, 1 << 20).await;
        let form = r.unwrap();
        assert_eq!(data, b"hello\r\n--Xy world");
        assert_eq!(form.file_bytes, Some(17));
        assert_eq!(form.fields, vec![("key".into(), "bld-1".into())]);
    }

    #[tokio::test]
    async fn no_preamble_and_limits() {
        let body =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n0123456789\r\n--XyZ--";
        let (r, data) = parse(body, 1 << 20).await;
        assert_eq!(r.unwrap().file_bytes, Some(10));
        assert_eq!(data, b"0123456789");
        let (r, _) = parse(body, 4).await;
        assert!(r.is_err());
        let (r, _) = parse(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
            1 << 20,
        )
        .await;
        assert!(r.is_err(), "an unterminated body is an error");
        let (r, _) = parse(b"", 1 << 20).await;
        assert_eq!(r.unwrap().file_bytes, None);
    }

    #[test]
    fn boundary_from_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=WebKitFormBoundaryePkpFF7tjBAqy44L").as_deref(),
            Some("WebKitFormBoundaryePkpFF7tjBAqy44L")
        );
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(boundary("application/json"), None);
    }
}
