//! How entities are kept as documents, the same on every backend.

use lodge_model::Millis;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Result, StoreError};

pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(format!("encoding a document: {e}")))
}

pub(crate) fn from_json<T: DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| StoreError::Backend(format!("a stored document does not decode: {e}")))
}

/// The room document holds everything but the allocations, which have their own table.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RoomDoc {
    pub room_config: Option<String>,
    pub created_at: Millis,
}
