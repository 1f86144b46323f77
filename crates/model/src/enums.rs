//! Enums with Hathora's exact wire strings. Parsing is strict: an unknown value is a 422, and
//! Lodge never emits a value outside these lists (closed-enum clients would throw on it).

use serde::{Deserialize, Serialize};

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $wire)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    other => Err(format!(
                        "invalid {} '{}': expected one of {}",
                        stringify!($name),
                        other,
                        [$($wire),+].join(", ")
                    )),
                }
            }
        }
    };
}

wire_enum!(
    /// A Hathora region.
    Region {
        Seattle => "Seattle",
        LosAngeles => "Los_Angeles",
        WashingtonDc => "Washington_DC",
        Chicago => "Chicago",
        London => "London",
        Frankfurt => "Frankfurt",
        Mumbai => "Mumbai",
        Singapore => "Singapore",
        Tokyo => "Tokyo",
        Sydney => "Sydney",
        SaoPaulo => "Sao_Paulo",
        Dallas => "Dallas",
        Johannesburg => "Johannesburg",
        Dubai => "Dubai",
    }
);

wire_enum!(
    ProcessStatus {
        Starting => "starting",
        Running => "running",
        Draining => "draining",
        Stopping => "stopping",
        Stopped => "stopped",
        Failed => "failed",
    }
);

impl ProcessStatus {
    /// Stopped or failed: nothing runs and nothing will.
    pub fn is_terminal(self) -> bool {
        matches!(self, ProcessStatus::Stopped | ProcessStatus::Failed)
    }
    /// Statuses in which a process accepts new rooms.
    pub const PLACEABLE: &'static [ProcessStatus] =
        &[ProcessStatus::Starting, ProcessStatus::Running];
    /// Statuses in which a process is (or should be) alive on its node.
    pub const LIVE: &'static [ProcessStatus] = &[
        ProcessStatus::Starting,
        ProcessStatus::Running,
        ProcessStatus::Draining,
        ProcessStatus::Stopping,
    ];
}

wire_enum!(
    RoomStatus {
        Scheduling => "scheduling",
        Active => "active",
        Suspended => "suspended",
        Destroyed => "destroyed",
    }
);

wire_enum!(
    RoomReadyStatus {
        Active => "active",
        Starting => "starting",
    }
);

wire_enum!(
    BuildStatus {
        Created => "created",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
    }
);

wire_enum!(
    TransportType {
        Tcp => "tcp",
        Udp => "udp",
        Tls => "tls",
    }
);

wire_enum!(
    LobbyVisibility {
        Private => "private",
        Public => "public",
        Local => "local",
    }
);

wire_enum!(
    /// v1 deployments size processes by plan instead of CPU and memory.
    PlanName {
        Tiny => "tiny",
        Small => "small",
        Medium => "medium",
        Large => "large",
    }
);

impl PlanName {
    /// vCPUs and MB of memory of the plan (Hathora's old CLI mapping).
    pub fn resources(self) -> (f64, f64) {
        match self {
            PlanName::Tiny => (0.5, 1024.0),
            PlanName::Small => (1.0, 2048.0),
            PlanName::Medium => (2.0, 4096.0),
            PlanName::Large => (4.0, 8192.0),
        }
    }
    /// The smallest plan that covers the given resources (the largest if none does).
    pub fn closest(cpu: f64, memory_mb: f64) -> PlanName {
        PlanName::ALL
            .iter()
            .copied()
            .find(|p| {
                let (c, m) = p.resources();
                cpu <= c && memory_mb <= m
            })
            .unwrap_or(PlanName::Large)
    }
}

wire_enum!(
    OrgTokenStatus {
        Active => "active",
        Revoked => "revoked",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_round_trip() {
        for r in Region::ALL {
            assert_eq!(r.as_str().parse::<Region>().unwrap(), *r);
            assert_eq!(
                serde_json::to_string(r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        assert_eq!(Region::ALL.len(), 14);
        assert!("washington_dc".parse::<Region>().is_err());
    }
}
