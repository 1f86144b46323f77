//! Tests only: the route table as written in the source, `(path, methods)` per `.route(...)`,
//! so that the scope rule and the OpenAPI document can be checked against every route.

const SOURCES: [&str; 7] = [
    include_str!("handlers.rs"),
    include_str!("legacy.rs"),
    include_str!("players.rs"),
    include_str!("lodge_routes.rs"),
    include_str!("nodes.rs"),
    include_str!("fleets.rs"),
    include_str!("replicas.rs"),
];

pub fn routes() -> Vec<(String, Vec<&'static str>)> {
    let mut out = Vec::new();
    for src in SOURCES {
        let mut rest = src;
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + 7..];
            let start = rest.find('"').unwrap() + 1;
            let end = start + rest[start..].find('"').unwrap();
            let path = rest[start..end].to_string();
            // The method chain runs to the `)` that closes `.route(`.
            let mut depth = 1;
            let mut close = end;
            for (k, ch) in rest[end..].char_indices() {
                match ch {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    close = end + k;
                    break;
                }
            }
            let chain = &rest[end..close];
            // `get(handler)` and `.post(handler)`, not `get_app(` nor `forget(`.
            let methods = ["get", "post", "put", "patch", "delete"]
                .into_iter()
                .filter(|m| {
                    chain.match_indices(&format!("{m}(")).any(|(at, _)| {
                        at == 0 || {
                            let before = chain.as_bytes()[at - 1];
                            !before.is_ascii_alphanumeric() && before != b'_'
                        }
                    })
                })
                .collect();
            out.push((path, methods));
        }
    }
    assert!(out.len() > 80, "found only {} routes", out.len());
    out
}

#[test]
fn the_openapi_document_lists_every_route_and_method() {
    let doc: serde_json::Value = serde_json::from_str(crate::handlers::OPENAPI).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    let routes = routes();
    for (path, methods) in &routes {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is served but not in openapi.json"));
        assert!(!methods.is_empty(), "no method found for {path}");
        for m in methods {
            assert!(
                item.get(*m).is_some(),
                "{} {path} is served but not documented",
                m.to_uppercase()
            );
        }
        for m in ["get", "post", "put", "patch", "delete"] {
            if item.get(m).is_some() {
                assert!(
                    methods.contains(&m),
                    "{} {path} is documented but not served",
                    m.to_uppercase()
                );
            }
        }
    }
    for path in paths.keys() {
        assert!(
            routes.iter().any(|(p, _)| p == path),
            "{path} is documented but not served"
        );
    }
}
