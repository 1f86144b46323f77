//! Bad input never panics and never answers 500: every rejection is a 4xx with a JSON
//! `{"message"}`, and public endpoints ignore `Authorization`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lodge_control::{Control, ControlConfig};
use lodge_model::{Node, Region, SystemClock};
use lodge_store::SqliteStore;
use serde_json::{json, Value};

use crate::TempDir;

async fn serve(dir: &std::path::Path) -> String {
    let store = Arc::new(SqliteStore::open(&dir.join("db")).unwrap());
    let mut cfg = ControlConfig::new(dir.to_path_buf());
    cfg.admin_token = Some("admin".into());
    let control = Control::new(store, Arc::new(SystemClock), cfg);
    control
        .put_node(&Node {
            node_id: "n".into(),
            public_host: "127.0.0.1".into(),
            regions: None,
            started_at: 0,
            port_capacity: None,
        })
        .await
        .unwrap();
    let state = lodge_api::AppState {
        control,
        ready: Arc::new(AtomicBool::new(true)),
        public_host: "127.0.0.1".into(),
        ping_port: 10000,
        regions: Region::ALL.to_vec(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, lodge_api::router(state)).await });
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
    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("# TYPE lodge_rooms_created_total counter"));
    assert!(metrics.contains("lodge_processes{status=\"running\"} 0"));
}
