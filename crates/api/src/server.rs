//! The HTTP server loop: hyper's HTTP/1 with the bounds an internet-facing API needs, which
//! `axum::serve` does not set. Headers must arrive within [`ServeLimits::header_timeout`] and
//! fit in [`ServeLimits::max_header_bytes`]; a request body that stalls longer than
//! [`ServeLimits::body_idle_timeout`] fails; at most [`ServeLimits::max_connections`] are open
//! at once (more are closed on accept, so descriptors stay free). Each request carries the
//! peer's address as `ConnectInfo`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use crate::ApiFailure;

#[derive(Debug, Clone)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_idle_timeout: Duration,
    /// Request line plus headers; larger is 414 (URI) or 431 (headers), as JSON.
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    /// Reverse proxies in front of Lodge: for requests from these addresses the player's
    /// address is the last one of `X-Forwarded-For` (the one the proxy added).
    pub trusted_proxies: Arc<Vec<std::net::IpAddr>>,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            max_header_bytes: 32 << 10,
            max_uri_bytes: 8 << 10,
            trusted_proxies: Arc::default(),
        }
    }
}

/// Serve `router` on `listener` until `shutdown` resolves, then let open requests finish for
/// up to `drain`.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "api accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let limits = limits.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let header_timeout = limits.header_timeout;
            let max_buf = (limits.max_header_bytes * 2).max(8192);
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let router = router.clone();
                let limits = limits.clone();
                async move { Ok::<_, Infallible>(handle(router, req, peer, &limits).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(max_buf);
            // Upgrades carry node connections (`/lodge/v1/node/connect`).
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    // Connections end as their requests finish; wait until all are gone or `drain` passes.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(drain, permits.acquire_many(all)).await;
}

async fn handle(
    router: axum::Router,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    limits: &ServeLimits,
) -> axum::response::Response {
    let uri_len = req.uri().to_string().len();
    if uri_len > limits.max_uri_bytes {
        return ApiFailure(
            StatusCode::URI_TOO_LONG,
            format!(
                "the request URI is {uri_len} bytes; at most {}",
                limits.max_uri_bytes
            ),
            None,
        )
        .into_response();
    }
    let header_len: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_len > limits.max_header_bytes {
        return ApiFailure(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request headers are {header_len} bytes; at most {}",
                limits.max_header_bytes
            ),
            None,
        )
        .into_response();
    }
    let (mut parts, body) = req.into_parts();
    let peer = player_address(peer, &parts.headers, &limits.trusted_proxies);
    parts.extensions.insert(ConnectInfo(peer));
    let body = Body::new(IdleTimeout::new(body, limits.body_idle_timeout));
    match router.oneshot(Request::from_parts(parts, body)).await {
        Ok(res) => res,
        Err(never) => match never {},
    }
}

/// The address a request came from: the peer, or behind a trusted reverse proxy the last
/// address it appended to `X-Forwarded-For` (earlier entries are the client's to forge).
fn player_address(
    peer: SocketAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[std::net::IpAddr],
) -> SocketAddr {
    if !trusted.contains(&peer.ip()) {
        return peer;
    }
    // Only the last entry: anything the proxy did not write itself (or could not) is ignored.
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map_or(peer, |ip| SocketAddr::new(ip, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let mut h = axum::http::HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6, 1.2.3.4".parse().unwrap());
        let proxy: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let trusted = ["10.0.0.1".parse().unwrap()];
        assert_eq!(
            player_address(proxy, &h, &trusted).ip().to_string(),
            "1.2.3.4"
        );
        assert_eq!(
            player_address(proxy, &h, &[]),
            proxy,
            "untrusted peers are taken as they are"
        );
        assert_eq!(
            player_address(proxy, &axum::http::HeaderMap::new(), &trusted),
            proxy
        );
    }
}

/// A request body that fails when no data arrives for `timeout` (a stalled or trickling
/// upload never pins a task and its buffers).
struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<B> IdleTimeout<B> {
    fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for {0:?}")]
struct Stalled(Duration);

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.timeout;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Stalled(this.timeout).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
