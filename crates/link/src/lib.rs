//! How the node protocol ([`lodge_model::protocol`]) travels. One message per line of JSON,
//! bounded in size, over any byte stream: an in-process pipe for the node embedded in
//! `lodge serve`, or a TCP connection an agent opens to the control plane's API address and
//! upgrades from HTTP (`GET /lodge/v1/node/connect`, `Upgrade: lodge-node/1`). Also the agent's
//! side of joining (a join token exchanged for a node credential) and of fetching builds.

pub mod artifacts;
pub mod dial;
pub mod frame;

pub use frame::{write_frame, FrameError, FrameReader};

/// The `Upgrade` protocol name of a node connection.
pub const UPGRADE: &str = "lodge-node/1";
/// Where agents connect, exchange join tokens and fetch builds.
pub const CONNECT_PATH: &str = "/lodge/v1/node/connect";
pub const JOIN_PATH: &str = "/lodge/v1/node/join";
pub fn artifact_path(build_id: &str) -> String {
    format!("/lodge/v1/node/builds/{build_id}/artifact")
}
/// The response header that names an artifact's SHA-256.
pub const DIGEST_HEADER: &str = "x-lodge-artifact-sha256";
