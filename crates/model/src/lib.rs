//! Domain types shared by every Lodge crate: ids, enums with Hathora's exact wire strings,
//! entities as they are stored, the wire DTOs, and the clock.

pub mod clock;
pub mod entity;
pub mod enums;
pub mod id;
pub mod legacy;
pub mod node;
pub mod protocol;
pub mod source;
pub mod spec;
pub mod validate;
pub mod warm;
pub mod wire;

pub use clock::{Clock, ManualClock, Millis, SystemClock};
pub use entity::*;
pub use enums::*;
pub use source::source_key;
