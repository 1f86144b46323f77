//! Warm capacity for one app in one region, as pure functions: how many processes the
//! autoscaler wants, and what the warm controller does about the processes it sees (start new
//! ones, drain or stop those of older deployments, stop idle ones beyond the target).

use lodge_model::{Millis, ProcessStatus};

/// A live process of the app in the region.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmProcess {
    pub process_id: String,
    pub status: ProcessStatus,
    /// Of the app's latest deployment.
    pub latest: bool,
    pub rooms_allocated: u32,
    /// When it last had a room or a connection (its creation, at first).
    pub last_busy_at: Millis,
}

/// The numbers for the region, resolved: `min <= target <= max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmSpec {
    pub min: u32,
    pub target: u32,
    pub max: u32,
}

/// Why a process is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// Of an older deployment, without rooms, and no longer needed to keep `min` ready.
    Replaced,
    /// Draining and its last room ended.
    Drained,
    /// Beyond the target and idle for the scale-down delay.
    Excess,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmPlan {
    /// New processes of the latest deployment to start.
    pub start: u32,
    /// Running processes of older deployments that take no new room from now on.
    pub drain: Vec<String>,
    /// Processes to stop; each has no room (the stop is made conditional on that).
    pub stop: Vec<(String, StopWhy)>,
}

/// What to do now. Never stops a process with rooms; never lets the ready processes (running,
/// not draining) fall below `min` by its own doing: older processes leave only as newer ones
/// are ready, and idle ones beyond the target leave only after `idle_for_ms` without a room.
pub fn plan(spec: WarmSpec, procs: &[WarmProcess], now: Millis, idle_for_ms: i64) -> WarmPlan {
    let mut out = WarmPlan::default();
    let placeable = |p: &&WarmProcess| ProcessStatus::PLACEABLE.contains(&p.status);
    let latest: Vec<&WarmProcess> = procs
        .iter()
        .filter(|p| p.latest)
        .filter(placeable)
        .collect();
    let target = spec.target.min(spec.max);
    out.start = target.saturating_sub(latest.len() as u32);
    let mut ready = procs
        .iter()
        .filter(|p| p.status == ProcessStatus::Running)
        .count() as u32;
    // Older deployments: one leaves for each ready process beyond what the target needs.
    let floor = spec.min.max(target);
    let mut old: Vec<&WarmProcess> = procs
        .iter()
        .filter(|p| !p.latest && p.status == ProcessStatus::Running)
        .collect();
    old.sort_by_key(|p| (p.rooms_allocated, std::cmp::Reverse(p.last_busy_at)));
    for p in old {
        if ready <= floor {
            break;
        }
        ready -= 1;
        if p.rooms_allocated == 0 {
            out.stop.push((p.process_id.clone(), StopWhy::Replaced));
        } else {
            out.drain.push(p.process_id.clone());
        }
    }
    // An older process still starting without a room is not waited for.
    for p in procs {
        if !p.latest && p.status == ProcessStatus::Starting && p.rooms_allocated == 0 {
            out.stop.push((p.process_id.clone(), StopWhy::Replaced));
        }
        if p.status == ProcessStatus::Draining && p.rooms_allocated == 0 {
            out.stop.push((p.process_id.clone(), StopWhy::Drained));
        }
    }
    // Beyond the target: idle ones, those still starting first, never below `min` ready.
    let mut excess = (latest.len() as u32).saturating_sub(target);
    let mut idle: Vec<&&WarmProcess> = latest
        .iter()
        .filter(|p| p.rooms_allocated == 0 && now.saturating_sub(p.last_busy_at) >= idle_for_ms)
        .collect();
    idle.sort_by_key(|p| (p.status == ProcessStatus::Running, p.last_busy_at));
    for p in idle {
        if excess == 0 {
            break;
        }
        if p.status == ProcessStatus::Running {
            if ready <= spec.min {
                continue;
            }
            ready -= 1;
        }
        excess -= 1;
        out.stop.push((p.process_id.clone(), StopWhy::Excess));
    }
    out
}

/// The processes demand asks for: enough that the rooms on them average at most `per_process`
/// (the autoscaler's target metric, at most `rooms_per_process`; the rest of each process is
/// headroom for bursts), within `min..=max`.
pub fn desired(rooms: u32, rooms_per_process: u32, per_process: f64, min: u32, max: u32) -> u32 {
    let per = per_process
        .min(f64::from(rooms_per_process.max(1)))
        .max(1e-3);
    let want = (f64::from(rooms) / per).ceil();
    let want = if want >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        want as u32
    };
    want.clamp(min, max.max(min))
}

/// The autoscaler's target over time: it follows demand up at once, and down only once demand
/// has stayed below it for `delay_ms`, so that it does not flap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaled {
    pub target: u32,
    /// When demand last asked for at least `target`.
    pub since: Millis,
}

pub fn autoscale(prev: Option<Scaled>, desired: u32, now: Millis, delay_ms: i64) -> Scaled {
    match prev {
        Some(p) if desired < p.target && now.saturating_sub(p.since) < delay_ms => p,
        _ => Scaled {
            target: desired,
            since: now,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProcessStatus::*;

    fn p(id: &str, status: ProcessStatus, latest: bool, rooms: u32, busy: Millis) -> WarmProcess {
        WarmProcess {
            process_id: id.into(),
            status,
            latest,
            rooms_allocated: rooms,
            last_busy_at: busy,
        }
    }

    fn spec(min: u32, target: u32, max: u32) -> WarmSpec {
        WarmSpec { min, target, max }
    }

    #[test]
    fn starts_up_to_the_target() {
        assert_eq!(plan(spec(1, 3, 5), &[], 0, 1000).start, 3);
        let ps = [p("a", Running, true, 0, 0), p("b", Starting, true, 0, 0)];
        assert_eq!(plan(spec(1, 3, 5), &ps, 0, 1000).start, 1);
        assert_eq!(plan(spec(1, 3, 2), &[], 0, 1000).start, 2);
    }

    #[test]
    fn a_roll_keeps_the_floor_and_never_cuts_a_room() {
        // Two old ready processes, one with a room; the new ones are still starting.
        let mut ps = vec![
            p("o1", Running, false, 1, 0),
            p("o2", Running, false, 0, 0),
            p("n1", Starting, true, 0, 0),
            p("n2", Starting, true, 0, 0),
        ];
        let pl = plan(spec(2, 2, 4), &ps, 0, 1000);
        assert_eq!(pl.start, 0);
        assert!(pl.drain.is_empty() && pl.stop.is_empty(), "{pl:?}");
        // One new one is ready: one old one leaves, the empty one first.
        ps[2].status = Running;
        let pl = plan(spec(2, 2, 4), &ps, 0, 1000);
        assert_eq!(pl.stop, vec![("o2".to_string(), StopWhy::Replaced)]);
        assert!(pl.drain.is_empty());
        // Both ready: the one with a room drains rather than stops.
        ps[3].status = Running;
        ps.remove(1);
        let pl = plan(spec(2, 2, 4), &ps, 0, 1000);
        assert_eq!(pl.drain, vec!["o1".to_string()]);
        assert!(pl.stop.is_empty());
        // Its last room ends: it stops.
        ps[0].status = Draining;
        ps[0].rooms_allocated = 0;
        let pl = plan(spec(2, 2, 4), &ps, 0, 1000);
        assert_eq!(pl.stop, vec![("o1".to_string(), StopWhy::Drained)]);
    }

    #[test]
    fn excess_goes_only_when_idle_long_enough() {
        let ps = [
            p("a", Running, true, 1, 0),
            p("b", Running, true, 0, 900),
            p("c", Running, true, 0, 100),
        ];
        assert!(plan(spec(1, 1, 5), &ps, 1000, 1000).stop.is_empty());
        let pl = plan(spec(1, 1, 5), &ps, 2000, 1000);
        assert_eq!(pl.stop.len(), 2);
        assert!(pl.stop.iter().all(|(_, w)| *w == StopWhy::Excess));
        // Never the one with a room, never below min ready.
        let ps = [p("a", Running, true, 0, 0), p("b", Running, true, 0, 0)];
        assert_eq!(plan(spec(2, 1, 5), &ps, 5000, 1000).stop.len(), 0);
        assert_eq!(plan(spec(0, 0, 5), &ps, 5000, 1000).stop.len(), 2);
    }

    /// Over random snapshots: no stop of a process with rooms, no start beyond max, and the
    /// ready processes left by the plan never below min unless they already were.
    #[test]
    fn property_plans_are_safe() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let statuses = [Starting, Running, Draining];
        for _ in 0..5000 {
            let min = next(4) as u32;
            let target = min + next(4) as u32;
            let max = target + next(3) as u32;
            let ps: Vec<WarmProcess> = (0..next(9))
                .map(|i| {
                    p(
                        &format!("p{i}"),
                        statuses[next(3) as usize],
                        next(2) == 0,
                        next(3) as u32,
                        next(3000) as Millis,
                    )
                })
                .collect();
            let pl = plan(spec(min, target, max), &ps, 3000, 1000);
            let latest_live = ps
                .iter()
                .filter(|q| q.latest && ProcessStatus::PLACEABLE.contains(&q.status))
                .count() as u32;
            assert!(latest_live + pl.start <= max.max(latest_live));
            let ready_before = ps.iter().filter(|q| q.status == Running).count() as u32;
            let mut ready_after = ready_before;
            for (id, _) in &pl.stop {
                let q = ps.iter().find(|q| &q.process_id == id).unwrap();
                assert_eq!(q.rooms_allocated, 0, "stopped a process with rooms");
                if q.status == Running {
                    ready_after -= 1;
                }
            }
            for id in &pl.drain {
                let q = ps.iter().find(|q| &q.process_id == id).unwrap();
                assert_eq!(q.status, Running);
                ready_after -= 1;
            }
            assert!(ready_after >= min.min(ready_before), "{ps:?} {pl:?}");
        }
    }

    #[test]
    fn autoscaling_follows_demand_up_at_once_and_down_after_the_delay() {
        assert_eq!(desired(0, 1, 1.0, 0, 10), 0);
        assert_eq!(desired(3, 1, 0.5, 0, 10), 6);
        assert_eq!(desired(30, 1, 0.5, 0, 10), 10);
        assert_eq!(desired(7, 4, 2.0, 1, 10), 4);
        let s = autoscale(None, 2, 0, 1000);
        let s = autoscale(Some(s), 5, 10, 1000);
        assert_eq!(s.target, 5);
        let s = autoscale(Some(s), 1, 500, 1000);
        assert_eq!(s.target, 5);
        let s = autoscale(Some(s), 1, 1010, 1000);
        assert_eq!(s.target, 1);
    }
}
