//! Warm capacity as an app's `serviceConfig` asks for it: Hathora's static process allocation
//! per region (`minProcesses`, `targetProcesses`, `maxProcesses`, `autoscalingEnabled`) and the
//! process autoscaler's target (`processAutoscalerConfig.targetMetric`). Parsed and validated
//! here, as Hathora does, so that a bad configuration is refused with a 422 before it is stored.

use serde_json::{Map, Value};

use crate::Region;

/// The most processes one region's configuration may name (any count beyond the instance's
/// `--max-processes-per-app` is refused by the control plane as well).
pub const MAX_PROCESSES: u64 = 10_000;

/// One region's allocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionAllocation {
    pub region: Region,
    pub min: u32,
    /// Absent when autoscaling (the autoscaler sets it).
    pub target: Option<u32>,
    /// Absent (`null`): the instance's maximum.
    pub max: Option<u32>,
    pub autoscaling: bool,
}

/// An app's warm-capacity configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceConfig {
    pub regions: Vec<RegionAllocation>,
    /// `processAutoscalerConfig.targetMetric.metricValue`: the rooms per process the
    /// autoscaler aims at; the rest of each process's `roomsPerProcess` is headroom.
    pub rooms_per_process_target: Option<f64>,
}

fn count(o: &Map<String, Value>, key: &str, at: usize) -> Result<Option<u32>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_PROCESSES => Ok(Some(n as u32)),
            _ => Err(format!(
                "serviceConfig.staticProcessAllocation[{at}].{key} must be an integer from 0 to {MAX_PROCESSES}"
            )),
        },
    }
}

impl ServiceConfig {
    /// Parse and validate a stored or submitted `serviceConfig` (`null` is no configuration).
    pub fn parse(v: &Value) -> Result<Self, String> {
        let o = match v {
            Value::Null => return Ok(Self::default()),
            Value::Object(o) => o,
            _ => return Err("serviceConfig must be an object".into()),
        };
        let rooms_per_process_target =
            match o.get("processAutoscalerConfig") {
                None | Some(Value::Null) => None,
                Some(c) => {
                    let m = c.get("targetMetric");
                    let name = m.and_then(|m| m.get("metricName")).and_then(Value::as_str);
                    if name != Some("concurrent-requests") {
                        return Err(
                            "serviceConfig.processAutoscalerConfig.targetMetric.metricName \
                                must be \"concurrent-requests\""
                                .into(),
                        );
                    }
                    match m.and_then(|m| m.get("metricValue")).and_then(Value::as_f64) {
                        Some(x) if x > 0.0 && x <= 10_000.0 => Some(x),
                        _ => return Err(
                            "serviceConfig.processAutoscalerConfig.targetMetric.metricValue must \
                             be a number above 0 and at most 10000 (rooms per process to aim at)"
                                .into(),
                        ),
                    }
                }
            };
        let list = match o.get("staticProcessAllocation") {
            Some(Value::Array(a)) => a,
            _ => return Err("serviceConfig.staticProcessAllocation must be a list".into()),
        };
        if list.len() > Region::ALL.len() {
            return Err(format!(
                "serviceConfig.staticProcessAllocation has {} entries; at most one per region ({})",
                list.len(),
                Region::ALL.len()
            ));
        }
        let mut regions: Vec<RegionAllocation> = Vec::new();
        for (at, e) in list.iter().enumerate() {
            let Some(e) = e.as_object() else {
                return Err(format!(
                    "serviceConfig.staticProcessAllocation[{at}] must be an object"
                ));
            };
            let region = e
                .get("region")
                .and_then(Value::as_str)
                .and_then(|r| r.parse::<Region>().ok())
                .ok_or_else(|| {
                    format!("serviceConfig.staticProcessAllocation[{at}].region is not a region")
                })?;
            if regions.iter().any(|r| r.region == region) {
                return Err(format!(
                    "serviceConfig.staticProcessAllocation names {region} twice"
                ));
            }
            let min = count(e, "minProcesses", at)?.ok_or_else(|| {
                format!("serviceConfig.staticProcessAllocation[{at}].minProcesses is required")
            })?;
            let target = count(e, "targetProcesses", at)?;
            let max = count(e, "maxProcesses", at)?;
            let autoscaling = match e.get("autoscalingEnabled") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(format!(
                        "serviceConfig.staticProcessAllocation[{at}].autoscalingEnabled must be a boolean"
                    ))
                }
            };
            let r = RegionAllocation {
                region,
                min,
                target,
                max,
                autoscaling,
            };
            r.check(at, rooms_per_process_target.is_some())?;
            regions.push(r);
        }
        Ok(Self {
            regions,
            rooms_per_process_target,
        })
    }

    pub fn region(&self, region: Region) -> Option<&RegionAllocation> {
        self.regions.iter().find(|r| r.region == region)
    }
}

impl RegionAllocation {
    fn check(&self, at: usize, has_autoscaler: bool) -> Result<(), String> {
        let here = format!(
            "serviceConfig.staticProcessAllocation[{at}] ({})",
            self.region
        );
        if self.autoscaling {
            if self.target.is_some() {
                return Err(format!(
                    "{here}: targetProcesses must be absent when autoscalingEnabled is true"
                ));
            }
            if !has_autoscaler {
                return Err(format!(
                    "{here}: autoscalingEnabled needs serviceConfig.processAutoscalerConfig"
                ));
            }
        } else if self.target.is_none() {
            return Err(format!(
                "{here}: targetProcesses is required unless autoscalingEnabled is true"
            ));
        }
        let target = self.target.unwrap_or(self.min);
        if target < self.min {
            return Err(format!(
                "{here}: targetProcesses ({target}) is below minProcesses ({})",
                self.min
            ));
        }
        if let Some(max) = self.max {
            if max < target || max < self.min {
                return Err(format!(
                    "{here}: maxProcesses ({max}) is below {} ({})",
                    if self.target.is_some() {
                        "targetProcesses"
                    } else {
                        "minProcesses"
                    },
                    target
                ));
            }
        }
        Ok(())
    }

    /// The maximum, with the instance's own when the configuration leaves it open.
    pub fn max_or(&self, system: u32) -> u32 {
        self.max.unwrap_or(system).max(self.min)
    }
}

/// `serviceConfig` as GetApp shows it: Hathora's response always has `targetProcesses` and
/// `maxProcesses`; `target` gives each region's target now (the autoscaler's when autoscaling).
pub fn echo(stored: &Value, system_max: u32, target: impl Fn(Region) -> Option<u32>) -> Value {
    let mut out = stored.clone();
    let Ok(cfg) = ServiceConfig::parse(stored) else {
        return out;
    };
    if let Some(Value::Array(list)) = out.get_mut("staticProcessAllocation") {
        for (e, r) in list.iter_mut().zip(&cfg.regions) {
            if let Some(e) = e.as_object_mut() {
                let t = r.target.or_else(|| target(r.region)).unwrap_or(r.min);
                e.insert("targetProcesses".into(), t.into());
                e.insert("maxProcesses".into(), r.max_or(system_max).into());
                e.insert("autoscalingEnabled".into(), r.autoscaling.into());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(e: Value) -> Result<ServiceConfig, String> {
        ServiceConfig::parse(&json!({"staticProcessAllocation": [e]}))
    }

    #[test]
    fn validates_as_hathora_does() {
        let ok = one(json!({"region": "Chicago", "minProcesses": 1, "targetProcesses": 2, "maxProcesses": 3})).unwrap();
        assert_eq!(ok.regions[0].target, Some(2));
        assert!(one(json!({"region": "Chicago", "minProcesses": 1, "targetProcesses": 2, "maxProcesses": null})).is_ok());
        for bad in [
            json!({"region": "Chicago", "minProcesses": 2, "targetProcesses": 1, "maxProcesses": 3}),
            json!({"region": "Chicago", "minProcesses": 1, "targetProcesses": 4, "maxProcesses": 3}),
            json!({"region": "Chicago", "minProcesses": -1, "targetProcesses": 1, "maxProcesses": 3}),
            json!({"region": "Chicago", "minProcesses": 1, "maxProcesses": 3}),
            json!({"region": "Atlantis", "minProcesses": 1, "targetProcesses": 1, "maxProcesses": 3}),
            json!({"region": "Chicago", "minProcesses": 1, "targetProcesses": 1, "maxProcesses": 3, "autoscalingEnabled": true}),
            json!({"region": "Chicago", "minProcesses": 1, "maxProcesses": 3, "autoscalingEnabled": true}),
            json!({"region": "Chicago", "minProcesses": 20000, "targetProcesses": 20000, "maxProcesses": 20000}),
        ] {
            assert!(one(bad.clone()).is_err(), "{bad}");
        }
        let auto = ServiceConfig::parse(&json!({
            "staticProcessAllocation": [{"region": "Chicago", "minProcesses": 0, "maxProcesses": 5, "autoscalingEnabled": true}],
            "processAutoscalerConfig": {"targetMetric": {"metricName": "concurrent-requests", "metricValue": 0.5}}
        }))
        .unwrap();
        assert!(auto.regions[0].autoscaling);
        assert_eq!(auto.rooms_per_process_target, Some(0.5));
        let twice = ServiceConfig::parse(&json!({"staticProcessAllocation": [
            {"region": "Chicago", "minProcesses": 1, "targetProcesses": 1, "maxProcesses": 1},
            {"region": "Chicago", "minProcesses": 1, "targetProcesses": 1, "maxProcesses": 1}]}));
        assert!(twice.is_err());
    }

    #[test]
    fn echo_fills_target_and_max() {
        let stored = json!({
            "staticProcessAllocation": [{"region": "Chicago", "minProcesses": 1, "maxProcesses": null, "autoscalingEnabled": true}],
            "processAutoscalerConfig": {"targetMetric": {"metricName": "concurrent-requests", "metricValue": 1}}
        });
        let out = echo(&stored, 500, |_| Some(4));
        let e = &out["staticProcessAllocation"][0];
        assert_eq!(e["targetProcesses"], 4);
        assert_eq!(e["maxProcesses"], 500);
    }
}
