//! The HTTP surface: Hathora's API, wire-exact, plus health, metrics and Lodge's upload URLs.
//! Handlers are thin: parse, authenticate, call the control plane, shape the answer.

mod fleets;
mod handlers;
mod legacy;
mod lodge_routes;
mod logs;
mod multipart;
mod nodes;
mod players;
mod replicas;
#[cfg(test)]
mod route_table;
mod scopes;
pub mod server;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lodge_control::{Caller, Control, Error};
use lodge_model::wire::ApiError;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub control: Arc<Control>,
    pub ready: Arc<AtomicBool>,
    /// The ping port of nodes that did not say theirs.
    pub ping_port: u16,
}

/// An error as the SDKs expect it: a status and `{"message"}`.
#[derive(Debug)]
pub struct ApiFailure(pub StatusCode, pub String, pub Option<u64>);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let mut res = (self.0, Json(ApiError { message: self.1 })).into_response();
        if let Some(secs) = self.2 {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl From<Error> for ApiFailure {
    fn from(e: Error) -> Self {
        if let Error::RateLimited(m, secs) = e {
            return ApiFailure(StatusCode::TOO_MANY_REQUESTS, m, Some(secs));
        }
        let status = match &e {
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Gone(_) => StatusCode::GONE,
            Error::NoCapacity(_) => StatusCode::PAYMENT_REQUIRED,
            Error::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiFailure(status, e.to_string(), None)
    }
}

pub type ApiResult<T> = Result<T, ApiFailure>;

pub(crate) fn invalid(msg: impl Into<String>) -> ApiFailure {
    ApiFailure(StatusCode::UNPROCESSABLE_ENTITY, msg.into(), None)
}

/// A developer-token caller.
pub struct Dev(pub Caller);

impl FromRequestParts<AppState> for Dev {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller = state.control.authenticate(header).await?;
        scopes::authorize(&caller, &parts.method, parts.uri.path())?;
        Ok(Dev(caller))
    }
}

/// The address a request came from (set by [`server::serve`]; absent under other servers).
pub struct Source(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Source(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// The request body, or `None` when it is empty or only whitespace.
async fn non_blank_body<S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<Option<axum::body::Bytes>, ApiFailure> {
    let bytes = <axum::body::Bytes as axum::extract::FromRequest<S>>::from_request(req, state)
        .await
        .map_err(|e| {
            ApiFailure(
                StatusCode::BAD_REQUEST,
                format!("cannot read request body: {e}"),
                None,
            )
        })?;
    Ok((!bytes.iter().all(u8::is_ascii_whitespace)).then_some(bytes))
}

/// JSON body parsed with our error shape: malformed or invalid → 422 with serde's message.
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Some(bytes) = non_blank_body(req, state).await? else {
            return Err(invalid("a JSON request body is required"));
        };
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| invalid(format!("invalid request body: {e}")))
    }
}

/// An optional JSON body: absent or blank (whatever the content type) is `None`.
pub struct OptBody<T>(pub Option<T>);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for OptBody<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Some(bytes) = non_blank_body(req, state).await? else {
            return Ok(OptBody(None));
        };
        serde_json::from_slice(&bytes)
            .map(|v| OptBody(Some(v)))
            .map_err(|e| invalid(format!("invalid request body: {e}")))
    }
}

/// Path parameters; a segment that cannot be decoded is a 400 with our error shape.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ApiFailure(StatusCode::BAD_REQUEST, e.body_text(), None)),
        }
    }
}

/// Query parameters as repeated `key=value` pairs (Hathora's SDKs repeat keys for arrays).
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(QueryPairs(parse_query(parts.uri.query().unwrap_or(""))))
    }
}

impl QueryPairs {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key || *k == format!("{key}[]"))
            .map(|(_, v)| v.as_str())
    }
    /// Every value of `key`, parsed; a bad value is a 422 naming it.
    pub fn parse_all<T: std::str::FromStr<Err = String>>(&self, key: &str) -> ApiResult<Vec<T>> {
        self.all(key)
            .flat_map(|v| v.split(','))
            .filter(|v| !v.is_empty())
            .map(|v| v.parse().map_err(invalid))
            .collect()
    }
    pub fn parse_opt<T: std::str::FromStr>(&self, key: &str) -> ApiResult<Option<T>> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| invalid(format!("invalid value '{v}' for query parameter {key}"))),
        }
    }
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// CORS for browser games and tools: any origin, the headers the SDKs send.
async fn cors(req: Request, next: Next) -> Response {
    let preflight = req.method() == Method::OPTIONS;
    let mut res = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("authorization, content-type, accept, user-agent"),
    );
    h.insert(
        "access-control-expose-headers",
        HeaderValue::from_static("etag"),
    );
    h.insert("access-control-max-age", HeaderValue::from_static("86400"));
    res
}

/// The base URL a client used to reach us, for self-served upload URLs.
pub(crate) fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http");
    format!("{proto}://{host}")
}

pub fn router(state: AppState) -> axum::Router {
    handlers::routes()
        .merge(players::routes())
        .merge(legacy::routes())
        .merge(lodge_routes::routes())
        .merge(nodes::routes())
        .merge(replicas::routes())
        .merge(fleets::routes())
        .fallback(|method: Method, uri: axum::http::Uri| async move {
            ApiFailure(
                StatusCode::NOT_FOUND,
                format!("No such endpoint: {method} {}", uri.path()),
                None,
            )
        })
        .method_not_allowed_fallback(|method: Method, uri: axum::http::Uri| async move {
            ApiFailure(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {}", uri.path()),
                None,
            )
        })
        .layer(axum::middleware::from_fn(cors))
        .with_state(state)
}

/// `/metrics` without a token, for a listener on its own address (`--metrics-addr`).
pub fn metrics_router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(handlers::metrics_text))
        .with_state(state)
}

pub(crate) fn is_ready(state: &AppState) -> bool {
    state.ready.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lodge_model::Region;

    #[test]
    fn query_parsing() {
        let q = parse_query("status=running&status=starting&region=Washington_DC&x=a%20b+c&empty=");
        let q = QueryPairs(q);
        assert_eq!(
            q.all("status").collect::<Vec<_>>(),
            vec!["running", "starting"]
        );
        assert_eq!(q.get("x"), Some("a b c"));
        let regions: Vec<Region> = q.parse_all("region").unwrap();
        assert_eq!(regions, vec![Region::WashingtonDc]);
        assert!(QueryPairs(parse_query("region=Mars"))
            .parse_all::<Region>("region")
            .is_err());
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
