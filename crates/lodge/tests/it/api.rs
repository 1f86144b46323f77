//! Bad input never panics and never answers 500: every rejection is a 4xx with a JSON
//! `{"message"}`, and public endpoints ignore `Authorization`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lodge_control::{Control, ControlConfig};
use lodge_model::{Node, SystemClock};
use lodge_store::SqliteStore;
use serde_json::{json, Value};

use crate::TempDir;

pub(crate) async fn serve(dir: &std::path::Path) -> String {
    serve_with(dir, lodge_api::server::ServeLimits::default()).await
}

async fn serve_with(dir: &std::path::Path, limits: lodge_api::server::ServeLimits) -> String {
    let store = Arc::new(SqliteStore::open(&dir.join("db")).unwrap());
    let mut cfg = ControlConfig::new(dir.to_path_buf());
    cfg.admin_token = Some("admin".into());
    let control = Control::new(store, Arc::new(SystemClock), cfg);
    control
        .put_node(&Node::local("n".into(), "127.0.0.1".into(), None, 0))
        .await
        .unwrap();
    let state = lodge_api::AppState {
        control,
        ready: Arc::new(AtomicBool::new(true)),
        ping_port: 10000,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(lodge_api::server::serve(
        listener,
        lodge_api::router(state),
        limits,
        std::future::pending(),
        std::time::Duration::ZERO,
    ));
    url
}

/// Method, path, token, body, expected status.
type Case<'a> = (&'a str, String, Option<&'a str>, Option<String>, u16);

#[tokio::test]
async fn bad_input_gets_a_4xx_message() {
    let dir = TempDir::new("api");
    let url = serve(&dir.0).await;
    let http = reqwest::Client::new();
    let app: Value = http
        .post(format!("{url}/apps/v2/apps"))
        .bearer_auth("admin")
        .json(&json!({"appName": "bad-input", "authConfiguration": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let app = app["appId"].as_str().unwrap().to_string();
    let long = "x".repeat(10_001);
    let cases: Vec<Case> = vec![
        ("POST", "/apps/v2/apps".into(), Some("admin"), Some("not json".into()), 422),
        ("POST", "/apps/v2/apps".into(), Some("admin"), Some("{}".into()), 422),
        ("POST", "/apps/v2/apps".into(), Some("admin"), Some(r#"{"appName":"UPPER","authConfiguration":{}}"#.into()), 422),
        ("POST", "/apps/v2/apps".into(), Some("admin"), Some(r#"{"appName":"bad-input","authConfiguration":{}}"#.into()), 422),
        ("GET", "/apps/v2/apps".into(), None, None, 401),
        ("GET", "/apps/v2/apps".into(), Some("nope"), None, 401),
        ("GET", "/apps/v2/apps/app-unknown".into(), Some("admin"), None, 404),
        ("GET", "/apps/v2/apps?orgId=org-other".into(), Some("admin"), None, 404),
        ("POST", format!("/rooms/v2/{app}/create"), Some("admin"), Some(r#"{"region":"Mars"}"#.into()), 422),
        ("POST", format!("/rooms/v2/{app}/create"), Some("admin"), Some(String::new()), 422),
        ("POST", format!("/rooms/v2/{app}/create?roomId=bad%20id"), Some("admin"), Some(r#"{"region":"London"}"#.into()), 422),
        ("POST", format!("/rooms/v2/{app}/create"), Some("admin"), Some(json!({"region": "London", "roomConfig": long}).to_string()), 422),
        ("POST", format!("/rooms/v2/{app}/create"), Some("admin"), Some(r#"{"region":"London"}"#.into()), 404),
        ("GET", format!("/rooms/v2/{app}/connectioninfo/missing"), Some("garbage"), None, 404),
        ("GET", format!("/rooms/v2/{app}/info/missing"), Some("admin"), None, 404),
        ("GET", format!("/processes/v3/apps/{app}/processes/latest?status=bogus"), Some("admin"), None, 422),
        ("GET", format!("/processes/v3/apps/{app}/processes/latest?before=abc"), Some("admin"), None, 422),
        ("POST", format!("/processes/v3/apps/{app}/processes/regions/Mars"), Some("admin"), None, 422),
        ("GET", format!("/processes/v3/apps/{app}/processes/nope"), Some("admin"), None, 404),
        ("GET", format!("/logs/v1/{app}/process/x?tailLines=0"), Some("admin"), None, 422),
        ("GET", format!("/logs/v1/{app}/process/x?follow=maybe"), Some("admin"), None, 422),
        ("PUT", "/uploads/bld-x/parts/abc".into(), None, Some("data".into()), 422),
        ("PUT", "/uploads/bld-x/parts/1?signature=s".into(), None, Some("data".into()), 404),
        ("POST", "/builds/v3/builds".into(), Some("admin"), Some(r#"{"buildSizeInBytes":-1}"#.into()), 422),
        ("POST", "/builds/v3/builds".into(), Some("admin"), Some(r#"{"buildSizeInBytes":1.5}"#.into()), 422),
        ("POST", "/builds/v3/builds/bld-x/run".into(), Some("admin"), None, 404),
        (
            "POST",
            format!("/deployments/v3/apps/{app}/deployments"),
            Some("admin"),
            Some(r#"{"buildId":"b","idleTimeoutEnabled":true,"env":[],"roomsPerProcess":1,"transportType":"udp","containerPort":70000,"requestedCPU":1,"requestedMemoryMB":1024}"#.into()),
            422,
        ),
        (
            "POST",
            format!("/deployments/v3/apps/{app}/deployments"),
            Some("admin"),
            Some(r#"{"buildId":"b","idleTimeoutEnabled":true,"env":[{"name":"1BAD","value":""}],"roomsPerProcess":1,"transportType":"udp","containerPort":7777,"requestedCPU":1,"requestedMemoryMB":1024}"#.into()),
            422,
        ),
        (
            "POST",
            format!("/deployments/v3/apps/{app}/deployments"),
            Some("admin"),
            Some(r#"{"buildId":"b","idleTimeoutEnabled":true,"env":[],"roomsPerProcess":1,"transportType":"quic","containerPort":7777,"requestedCPU":1,"requestedMemoryMB":1024}"#.into()),
            422,
        ),
        (
            "POST",
            format!("/deployments/v3/apps/{app}/deployments"),
            Some("admin"),
            Some(r#"{"buildId":"missing","idleTimeoutEnabled":true,"env":[],"roomsPerProcess":1,"transportType":"udp","containerPort":7777,"requestedCPU":1,"requestedMemoryMB":1024}"#.into()),
            404,
        ),
        ("GET", format!("/deployments/v3/apps/{app}/deployments/latest"), Some("admin"), None, 404),
        ("GET", format!("/deployments/v3/apps/{app}/deployments?nextPageToken=zz"), Some("admin"), None, 422),
        ("POST", "/tokens/v1/orgs/org-other/create".into(), Some("admin"), Some(r#"{"name":"x"}"#.into()), 404),
        ("DELETE", format!("/rooms/v2/{app}/create"), Some("admin"), None, 405),
        ("GET", "/no/such/endpoint".into(), None, None, 404),
    ];
    for (method, path, token, body, status) in cases {
        let mut req = http.request(method.parse().unwrap(), format!("{url}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let res = req.send().await.unwrap();
        let got = res.status().as_u16();
        let ct = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = res.text().await.unwrap();
        assert_eq!(got, status, "{method} {path}: {text}");
        assert!(
            ct.starts_with("application/json"),
            "{method} {path}: content-type {ct}"
        );
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"));
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{method} {path}: {text}"
        );
    }
}

#[tokio::test]
async fn health_and_cors() {
    let dir = TempDir::new("health");
    let url = serve(&dir.0).await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{url}/livez"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{url}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let pre = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{url}/rooms/v2/a/connectioninfo/r"),
        )
        .header("origin", "https://game.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success());
    assert_eq!(pre.headers()["access-control-allow-origin"], "*");
    let anonymous = http.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let metrics = http
        .get(format!("{url}/metrics"))
        .bearer_auth("admin")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("# TYPE lodge_rooms_created_total counter"));
    assert!(metrics.contains("lodge_processes{status=\"running\"} 0"));
}

/// A request as an attacker holding `token` would send it; the status and body.
pub(crate) async fn call(
    url: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut req = http
        .request(method.parse().unwrap(), format!("{url}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Only the status of [`call`].
async fn status_of(url: &str, method: &str, path: &str, token: &str, body: Option<Value>) -> u16 {
    call(url, method, path, token, body).await.0
}

#[tokio::test]
async fn scopes_are_enforced_and_never_escalate() {
    let dir = TempDir::new("scopes");
    let url = serve(&dir.0).await;
    let (_, orgs) = call(&url, "GET", "/orgs/v1", "admin", None).await;
    let org = orgs["orgs"][0]["orgId"].as_str().unwrap().to_string();
    let (status, app) = call(
        &url,
        "POST",
        "/apps/v2/apps",
        "admin",
        Some(json!({"appName": "game", "authConfiguration": {}})),
    )
    .await;
    assert_eq!(status, 201, "{app}");
    let app_id = app["appId"].as_str().unwrap();
    let mint = |scopes: Value| {
        let url = url.clone();
        let org = org.clone();
        async move {
            let (status, v) = call(&url, "POST", &format!("/tokens/v1/orgs/{org}/create"), "admin", Some(json!({"name": format!("t{}", lodge_model::id::secret_hex()), "scopes": scopes}))).await;
            assert_eq!(status, 201, "{v}");
            v["plainTextToken"].as_str().unwrap().to_string()
        }
    };
    let builds_read = mint(json!(["builds:read"])).await;
    // What a builds:read token may and may not do.
    assert_eq!(
        status_of(&url, "GET", "/builds/v3/builds", &builds_read, None).await,
        200
    );
    let denied: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            "/builds/v3/builds".into(),
            Some(json!({"buildSizeInBytes": 10})),
        ),
        (
            "POST",
            "/apps/v2/apps".into(),
            Some(json!({"appName": "x", "authConfiguration": {}})),
        ),
        ("GET", "/apps/v2/apps".into(), None),
        ("GET", format!("/apps/v2/apps/{app_id}"), None),
        ("GET", "/apps/v1/list".into(), None),
        (
            "POST",
            format!("/rooms/v2/{app_id}/create"),
            Some(json!({"region": "London"})),
        ),
        (
            "POST",
            format!("/rooms/v1/{app_id}/create"),
            Some(json!({"region": "London"})),
        ),
        (
            "GET",
            format!("/processes/v3/apps/{app_id}/processes/latest"),
            None,
        ),
        (
            "GET",
            format!("/deployments/v3/apps/{app_id}/deployments"),
            None,
        ),
        ("GET", format!("/tokens/v1/orgs/{org}"), None),
        (
            "POST",
            format!("/tokens/v1/orgs/{org}/create"),
            Some(json!({"name": "escalate"})),
        ),
        ("GET", "/lodge/v1/orgs".into(), None),
        (
            "POST",
            "/lodge/v1/orgs".into(),
            Some(json!({"name": "mine"})),
        ),
        ("GET", "/metrics".into(), None),
    ];
    for (method, path, body) in denied {
        let (status, v) = call(&url, method, &path, &builds_read, body).await;
        assert_eq!(status, 401, "{method} {path} with builds:read: {v}");
        assert!(v["message"].is_string(), "{method} {path}: {v}");
    }
    // A token manager cannot mint more than it has.
    let tokens_rw = mint(json!(["tokens:read-write", "builds:read"])).await;
    for scopes in [
        json!("admin"),
        Value::Null,
        json!(["applications:read-write"]),
    ] {
        let mut body = json!({"name": "escalate"});
        if !scopes.is_null() {
            body["scopes"] = scopes.clone();
        }
        let (status, v) = call(
            &url,
            "POST",
            &format!("/tokens/v1/orgs/{org}/create"),
            &tokens_rw,
            Some(body),
        )
        .await;
        assert_eq!(status, 401, "minting {scopes} with tokens:read-write: {v}");
    }
    let (status, v) = call(
        &url,
        "POST",
        &format!("/tokens/v1/orgs/{org}/create"),
        &tokens_rw,
        Some(json!({"name": "narrower", "scopes": ["builds:read"]})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    // read-write includes read; a processes token reads rooms but not apps.
    let procs = mint(json!(["processes:read-write"])).await;
    assert_eq!(
        status_of(
            &url,
            "GET",
            &format!("/processes/v3/apps/{app_id}/processes/latest"),
            &procs,
            None
        )
        .await,
        200
    );
    assert_eq!(
        status_of(
            &url,
            "GET",
            &format!("/apps/v2/apps/{app_id}"),
            &procs,
            None
        )
        .await,
        401
    );
}

#[tokio::test]
async fn orgs_are_isolated() {
    let dir = TempDir::new("orgs");
    let url = serve(&dir.0).await;
    let (status, made) = call(
        &url,
        "POST",
        "/lodge/v1/orgs",
        "admin",
        Some(json!({"name": "studio-b"})),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let b_org = made["orgId"].as_str().unwrap().to_string();
    let b = made["token"]["plainTextToken"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        status_of(
            &url,
            "POST",
            "/lodge/v1/orgs",
            "admin",
            Some(json!({"name": "studio-b"}))
        )
        .await,
        422
    );
    // Org A's app and build, invisible to B.
    let (_, app) = call(
        &url,
        "POST",
        "/apps/v2/apps",
        "admin",
        Some(json!({"appName": "a-game", "authConfiguration": {}})),
    )
    .await;
    let a_app = app["appId"].as_str().unwrap();
    let (status, build) = call(
        &url,
        "POST",
        "/builds/v3/builds",
        "admin",
        Some(json!({"buildSizeInBytes": 10})),
    )
    .await;
    assert_eq!(status, 201, "{build}");
    let a_build = build["buildId"].as_str().unwrap();
    let (_, orgs) = call(&url, "GET", "/orgs/v1", &b, None).await;
    assert_eq!(orgs["orgs"].as_array().unwrap().len(), 1);
    assert_eq!(orgs["orgs"][0]["orgId"], b_org.as_str());
    let (_, apps) = call(&url, "GET", "/apps/v2/apps", &b, None).await;
    assert_eq!(apps["applications"], json!([]));
    let (_, builds) = call(&url, "GET", "/builds/v3/builds", &b, None).await;
    assert_eq!(builds["builds"], json!([]));
    for (method, path) in [
        ("GET", format!("/apps/v2/apps/{a_app}")),
        ("DELETE", format!("/apps/v2/apps/{a_app}")),
        ("GET", format!("/builds/v3/builds/{a_build}")),
        ("DELETE", format!("/builds/v3/builds/{a_build}")),
        ("GET", format!("/deployments/v3/apps/{a_app}/deployments")),
        ("POST", format!("/rooms/v2/{a_app}/create")),
        (
            "GET",
            format!("/processes/v3/apps/{a_app}/processes/latest"),
        ),
    ] {
        let body = (method == "POST").then(|| json!({"region": "London"}));
        let (status, v) = call(&url, method, &path, &b, body).await;
        assert_eq!(status, 404, "org B {method} {path}: {v}");
    }
    let (_, admin_orgs) = call(&url, "GET", "/orgs/v1", "admin", None).await;
    let a_org = admin_orgs["orgs"][0]["orgId"].as_str().unwrap();
    assert_eq!(
        status_of(&url, "GET", &format!("/tokens/v1/orgs/{a_org}"), &b, None).await,
        404
    );
    // B's admin token administers B, not the instance.
    assert_eq!(
        status_of(&url, "GET", "/lodge/v1/orgs", &b, None).await,
        401
    );
    assert_eq!(
        status_of(
            &url,
            "POST",
            "/lodge/v1/orgs",
            &b,
            Some(json!({"name": "c"}))
        )
        .await,
        401
    );
    assert_eq!(status_of(&url, "GET", "/metrics", &b, None).await, 401);
    let (status, all) = call(&url, "GET", "/lodge/v1/orgs", "admin", None).await;
    assert_eq!(status, 200);
    assert_eq!(all["orgs"].as_array().unwrap().len(), 2);
    // B's own app works.
    assert_eq!(
        status_of(
            &url,
            "POST",
            "/apps/v2/apps",
            &b,
            Some(json!({"appName": "a-game", "authConfiguration": {}}))
        )
        .await,
        201
    );
}

#[tokio::test]
async fn slow_and_oversized_clients_are_bounded() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new("slow");
    let limits = lodge_api::server::ServeLimits {
        header_timeout: Duration::from_millis(300),
        body_idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let url = serve_with(&dir.0, limits).await;
    let addr = url.trim_start_matches("http://").to_string();
    let http = reqwest::Client::new();

    // Headers that never finish: the connection is closed, not held.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a connection whose headers never end is closed"
    );

    // A body that stalls fails the request with a JSON 4xx.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"POST /apps/v2/apps HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"appName\"")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf))
        .await
        .expect("a stalled body gets an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"message\""), "{answer}");

    // Oversized URI and headers: JSON 414 and 431.
    let long = "a".repeat(9000);
    let res = http
        .get(format!("{url}/apps/v2/apps/{long}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 414);
    assert!(res.json::<Value>().await.unwrap()["message"].is_string());
    let res = http
        .get(format!("{url}/livez"))
        .header("x-filler", "b".repeat(40_000))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 431);
    assert!(res.json::<Value>().await.unwrap()["message"].is_string());

    // Past the connection cap, new connections are closed; /livez answers again once the
    // idle ones go. (A server of its own with the default 10 s header timeout, so the idle
    // connections cannot time out while the test looks.)
    let capped = TempDir::new("capped");
    let url = serve_with(
        &capped.0,
        lodge_api::server::ServeLimits {
            max_connections: 8,
            ..Default::default()
        },
    )
    .await;
    let addr = url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut buf)).await;
    assert!(buf.is_empty(), "over the cap: closed without an answer");
    drop(idle);
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(r) = http.get(format!("{url}/livez")).send().await {
            ok = r.status() == 200;
            if ok {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "/livez answers once the idle connections are gone");
}

#[tokio::test]
async fn upload_sessions_close_and_failed_or_deleted_builds_give_disk_back() {
    let dir = TempDir::new("uploads");
    let url = serve(&dir.0).await;
    let http = reqwest::Client::new();
    let archive = {
        // A gzipped tar holding one file and no lodge.toml: the build fails.
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, "readme.txt", &b"hello"[..])
            .unwrap();
        let raw = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        gz.finish().unwrap()
    };
    let (status, made) = call(
        &url,
        "POST",
        "/builds/v3/builds",
        "admin",
        Some(json!({"buildSizeInBytes": archive.len()})),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let build_id = made["buildId"].as_str().unwrap().to_string();
    let part_url = made["uploadParts"][0]["putRequestUrl"]
        .as_str()
        .unwrap()
        .to_string();
    let complete_url = made["completeUploadPostRequestUrl"]
        .as_str()
        .unwrap()
        .to_string();

    // Completing before any part: a 4xx with a message, not a 500.
    let res = http
        .post(&complete_url)
        .body("<CompleteMultipartUpload/>")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(res.json::<Value>().await.unwrap()["message"].is_string());

    // Six concurrent PUTs of one part all succeed.
    let puts: Vec<_> = (0..6)
        .map(|_| tokio::spawn(http.put(&part_url).body(archive.clone()).send()))
        .collect();
    for put in puts {
        let res = put.await.unwrap().unwrap();
        assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    }
    let res = http
        .post(&complete_url)
        .body("<CompleteMultipartUpload/>")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The session is closed: no part can replace the archive, and it completes once.
    let res = http
        .put(&part_url)
        .body(b"other".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(res.json::<Value>().await.unwrap()["message"].is_string());
    let res = http
        .post(&complete_url)
        .body("<CompleteMultipartUpload/>")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    // The build fails (no lodge.toml) and keeps nothing on disk.
    let build_dir = dir.0.join("builds").join(&build_id);
    assert!(build_dir.join("archive").exists());
    let log = http
        .post(format!("{url}/builds/v3/builds/{build_id}/run"))
        .bearer_auth("admin")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.contains("failed"), "{log}");
    let (_, b) = call(
        &url,
        "GET",
        &format!("/builds/v3/builds/{build_id}"),
        "admin",
        None,
    )
    .await;
    assert_eq!(b["status"], "failed");
    assert!(!build_dir.exists(), "a failed build's files are removed");

    // A deleted build with no process gives its disk back at once.
    let (_, other) = call(
        &url,
        "POST",
        "/builds/v3/builds",
        "admin",
        Some(json!({"buildSizeInBytes": archive.len()})),
    )
    .await;
    let other_id = other["buildId"].as_str().unwrap();
    let put = http
        .put(other["uploadParts"][0]["putRequestUrl"].as_str().unwrap())
        .body(archive.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let other_dir = dir.0.join("builds").join(other_id);
    assert!(other_dir.exists());
    assert_eq!(
        status_of(
            &url,
            "DELETE",
            &format!("/builds/v3/builds/{other_id}"),
            "admin",
            None
        )
        .await,
        200
    );
    assert!(!other_dir.exists(), "a deleted build's files are removed");
}
