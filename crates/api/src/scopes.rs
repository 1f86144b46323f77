//! Which token scope each developer endpoint needs (reference §2.4). The rule follows the path's
//! API family and the method: reads need `FAMILY:read`, everything else `FAMILY:read-write`.
//! A path of no known family needs an admin token, so a new route is closed until mapped.

use axum::http::Method;
use lodge_control::{Caller, Error};

/// The scope a developer-token request needs, or `None` when only an admin token may call it.
pub(crate) fn required(method: &Method, path: &str) -> Option<String> {
    let mut segments = path.trim_start_matches('/').split('/');
    let family = match (segments.next()?, segments.next(), segments.nth(1)) {
        // Lodge's own instance-wide Prometheus metrics.
        ("metrics", None, _) => return None,
        ("apps", ..) => "applications",
        ("builds", ..) => "builds",
        ("deployments", ..) => "deployments",
        ("processes" | "rooms" | "logs" | "metrics", ..) => "processes",
        // The one developer endpoint among lobbies: SetLobbyState.
        ("lobby", Some("v2"), Some("setState")) => "processes",
        ("orgs", ..) => "orgs",
        ("fleets" | "nodes", ..) => "fleets",
        ("tokens", ..) => "tokens",
        _ => return None,
    };
    let write = !matches!(*method, Method::GET | Method::HEAD);
    Some(format!(
        "{family}:{}",
        if write { "read-write" } else { "read" }
    ))
}

/// Refuse a caller whose token lacks what the endpoint needs (401, as the SDKs expect).
pub(crate) fn authorize(caller: &Caller, method: &Method, path: &str) -> Result<(), Error> {
    match required(method, path) {
        Some(scope) => caller.require(&scope),
        None if caller.scopes.is_none() => Ok(()),
        None => Err(Error::Unauthorized(format!(
            "{method} {path} needs an admin token"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_patterns() -> Vec<String> {
        crate::route_table::routes()
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    /// Endpoints without a developer token (reference §2.2), health and signed upload URLs.
    fn public(path: &str) -> bool {
        path == "/livez"
            || path == "/readyz"
            || path == "/openapi.json"
            || path.starts_with("/auth/")
            || path.starts_with("/discovery/")
            || path.starts_with("/uploads/")
            // A join token or a node credential, not a developer token.
            || path.starts_with("/lodge/v1/node/")
            // The replicas' shared secret.
            || path.starts_with("/lodge/v1/replica/")
            || path.contains("/connectioninfo/")
            || (path.starts_with("/lobby/") && !path.contains("/setState/"))
    }

    #[test]
    fn every_developer_route_maps_to_a_scope_or_admin() {
        let admin_only = ["/metrics", "/lodge/v1/orgs", "/lodge/v1/replicas"];
        for path in route_patterns() {
            let mapped = required(&Method::GET, &path).is_some();
            assert!(
                mapped
                    || public(&path)
                    || admin_only.contains(&path.as_str())
                    || path.starts_with("/lodge/v1/nodes"),
                "route {path} has no scope"
            );
        }
    }

    #[test]
    fn reads_and_writes() {
        let r = |m: Method, p: &str| required(&m, p);
        assert_eq!(
            r(Method::GET, "/apps/v2/apps").as_deref(),
            Some("applications:read")
        );
        assert_eq!(
            r(Method::POST, "/rooms/v2/app/create").as_deref(),
            Some("processes:read-write")
        );
        assert_eq!(
            r(Method::GET, "/logs/v1/a/process/p").as_deref(),
            Some("processes:read")
        );
        assert_eq!(
            r(Method::DELETE, "/builds/v3/builds/b").as_deref(),
            Some("builds:read-write")
        );
        assert_eq!(
            r(Method::POST, "/lobby/v2/a/setState/r").as_deref(),
            Some("processes:read-write")
        );
        assert_eq!(r(Method::POST, "/lodge/v1/orgs"), None);
        assert_eq!(r(Method::GET, "/lobby/v3/a/list/public"), None);
    }

    #[test]
    fn read_write_includes_read_and_nothing_else() {
        let caller = Caller {
            org_id: "o".into(),
            token_id: None,
            name: "t".into(),
            scopes: Some(vec!["builds:read-write".into()]),
            instance_admin: false,
        };
        assert!(authorize(&caller, &Method::GET, "/builds/v3/builds").is_ok());
        assert!(authorize(&caller, &Method::POST, "/builds/v3/builds").is_ok());
        assert!(authorize(&caller, &Method::GET, "/apps/v2/apps").is_err());
        assert!(authorize(&caller, &Method::POST, "/tokens/v1/orgs/o/create").is_err());
        assert!(authorize(&caller, &Method::GET, "/lodge/v1/orgs").is_err());
        let admin = Caller {
            scopes: None,
            ..caller
        };
        assert!(authorize(&admin, &Method::GET, "/lodge/v1/orgs").is_ok());
    }
}
