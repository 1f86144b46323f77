//! Build artifacts, the format both sides of the node boundary read: native bundles (a tarball
//! with `lodge.toml`), OCI image layouts and docker archives, and the bounded tar walk under
//! both. The control plane checks and unpacks an upload with them; a node runs what they
//! produced. Every archive is hostile until bounded (sizes, counts, paths).

pub mod bundle;
pub mod image;
pub mod pack;
pub mod tarsafe;
