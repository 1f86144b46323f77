//! The warm controller: for every app with a static process allocation in its `serviceConfig`,
//! keep each region's processes of the latest deployment at the target (the autoscaler's,
//! when autoscaling), roll older deployments' processes out as new ones are ready (draining
//! those with rooms), and stop idle ones beyond the target after the scale-down delay. It runs
//! on the replica holding the singletons' lease, every second and whenever something it
//! depends on changes (an app's configuration, a deployment, a process's start or end).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodge_model::warm::{RegionAllocation, ServiceConfig};
use lodge_model::{App, Deployment, ProcessStatus, Region};
use lodge_scheduler::warm::{Scaled, StopWhy, WarmPlan, WarmProcess, WarmSpec};
use lodge_store::ProcessQuery;
use tokio::sync::Notify;

use crate::{Control, Result};

/// How often the warm controller looks, when nothing wakes it sooner.
const WARM_EVERY: Duration = Duration::from_secs(1);
/// The most processes one pass starts in one region (the next pass starts more).
const STARTS_PER_PASS: u32 = 64;

#[derive(Default)]
pub(crate) struct WarmState {
    /// Autoscaled targets by app and region.
    targets: Mutex<HashMap<(String, Region), Scaled>>,
    nudge: Notify,
}

impl Control {
    /// Wake the warm controller now (it runs at most once at a time).
    pub(crate) fn nudge_warm(&self) {
        self.warm.nudge.notify_one();
    }

    /// The autoscaled target of an app's region, as this replica's warm controller last set it.
    pub(crate) fn warm_target(&self, app_id: &str, region: Region) -> Option<u32> {
        let targets = self.warm.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.get(&(app_id.to_string(), region)).map(|s| s.target)
    }

    pub(crate) fn spawn_warm(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(control) = weak.upgrade() else {
                    return;
                };
                if control.leads() {
                    if let Err(e) = control.keep_warm().await {
                        tracing::warn!(error = %e, "warm capacity pass failed");
                    }
                }
                let nudged = async { control.warm.nudge.notified().await };
                let _ = tokio::time::timeout(WARM_EVERY, nudged).await;
            }
        });
    }

    /// One pass over every app with a static process allocation.
    pub async fn keep_warm(&self) -> Result<()> {
        for org in self.store.orgs().await? {
            for app in self.store.apps(&org.org_id).await? {
                let Some(cfg) = app
                    .service_config
                    .as_ref()
                    .and_then(|v| ServiceConfig::parse(v).ok())
                else {
                    continue;
                };
                if cfg.regions.is_empty() {
                    continue;
                }
                let Some(d) = self.store.latest_deployment(&app.app_id).await? else {
                    continue;
                };
                for r in &cfg.regions {
                    if let Err(e) = self.keep_region_warm(&app, &d, &cfg, r).await {
                        tracing::warn!(app_id = %app.app_id, region = %r.region, error = %e,
                            "cannot keep the region's warm capacity");
                    }
                }
            }
        }
        Ok(())
    }

    async fn keep_region_warm(
        &self,
        app: &App,
        d: &Deployment,
        cfg: &ServiceConfig,
        r: &RegionAllocation,
    ) -> Result<()> {
        let q = ProcessQuery {
            app_id: Some(app.app_id.clone()),
            regions: vec![r.region],
            statuses: vec![
                ProcessStatus::Starting,
                ProcessStatus::Running,
                ProcessStatus::Draining,
            ],
            ..Default::default()
        };
        let procs = self.store.processes(&q).await?;
        let now = self.now();
        let delay = lodge_model::clock::millis(self.cfg.scale_down_delay);
        let max = r.max_or(self.cfg.max_processes_per_app.min(u64::from(u32::MAX)) as u32);
        let spec = if app.deleted_at.is_some() {
            // A deleted app keeps nothing warm; its rooms still end as they would.
            WarmSpec {
                min: 0,
                target: 0,
                max,
            }
        } else {
            let target = match r.target {
                Some(t) => t,
                None => {
                    let rooms = procs
                        .iter()
                        .filter(|p| ProcessStatus::PLACEABLE.contains(&p.status))
                        .map(|p| p.rooms_allocated)
                        .sum();
                    let per = cfg
                        .rooms_per_process_target
                        .unwrap_or(f64::from(d.rooms_per_process));
                    let want =
                        lodge_scheduler::warm::desired(rooms, d.rooms_per_process, per, r.min, max);
                    let mut targets = self.warm.targets.lock().unwrap_or_else(|p| p.into_inner());
                    let key = (app.app_id.clone(), r.region);
                    let prev = targets.get(&key).copied();
                    let next = lodge_scheduler::warm::autoscale(prev, want, now, delay);
                    if prev.map(|p| p.target) != Some(next.target) {
                        tracing::info!(app_id = %app.app_id, region = %r.region,
                            target = next.target, rooms, "autoscaled target");
                    }
                    targets.insert(key, next);
                    next.target
                }
            };
            WarmSpec {
                min: r.min,
                target: target.clamp(r.min, max),
                max,
            }
        };
        let seen: Vec<WarmProcess> = procs
            .iter()
            .map(|p| WarmProcess {
                process_id: p.process_id.clone(),
                status: p.status,
                latest: p.deployment_id == d.deployment_id,
                rooms_allocated: p.rooms_allocated,
                last_busy_at: p.last_busy_at,
            })
            .collect();
        let plan = lodge_scheduler::warm::plan(spec, &seen, now, delay);
        self.carry_out(app, d, r.region, plan).await
    }

    async fn carry_out(
        &self,
        app: &App,
        d: &Deployment,
        region: Region,
        plan: WarmPlan,
    ) -> Result<()> {
        for _ in 0..plan.start.min(STARTS_PER_PASS) {
            match self.start_process(d, region).await {
                Ok(p) => tracing::info!(app_id = %app.app_id, %region,
                    process_id = %p.process_id, "warm process started"),
                Err(e) => {
                    tracing::warn!(app_id = %app.app_id, %region, error = %e,
                        "cannot start a warm process");
                    break;
                }
            }
        }
        for id in &plan.drain {
            let drained = self
                .store
                .update_process(id, &|p| {
                    if p.status != ProcessStatus::Running {
                        return false;
                    }
                    p.status = ProcessStatus::Draining;
                    true
                })
                .await?;
            if drained.is_some_and(|p| p.status == ProcessStatus::Draining) {
                tracing::info!(process_id = %id, deployment_id = %d.deployment_id,
                    "draining: replaced by the latest deployment, keeps its rooms");
            }
        }
        for (id, why) in &plan.stop {
            let reason = match why {
                StopWhy::Replaced => "replaced by a newer deployment",
                StopWhy::Drained => "drained: its last room ended",
                StopWhy::Excess => "warm capacity beyond the target",
            };
            self.stop_if_idle(id, reason).await?;
        }
        Ok(())
    }

    /// Stop a process only if it has no room at that moment (checked in the same transaction
    /// that would place one), so that no room is ever cut by the warm controller.
    async fn stop_if_idle(&self, process_id: &str, why: &str) -> Result<bool> {
        let now = self.now();
        let applied = AtomicBool::new(false);
        let p = self
            .store
            .update_process(process_id, &|p| {
                let live = matches!(
                    p.status,
                    ProcessStatus::Starting | ProcessStatus::Running | ProcessStatus::Draining
                );
                if !live || p.rooms_allocated > 0 {
                    return false;
                }
                p.status = ProcessStatus::Stopping;
                p.stopping_at = Some(now);
                p.summary_exit_reason = Some(why.to_string());
                applied.store(true, Ordering::Relaxed);
                true
            })
            .await?;
        let stopped = applied.load(Ordering::Relaxed);
        if let (true, Some(p)) = (stopped, p) {
            tracing::info!(process_id, reason = why, "stopping process");
            self.wake_node(&p.node_id, &p.process_id);
        }
        Ok(stopped)
    }

    /// The most processes the app's configuration allows in the region, if it sets one.
    pub(crate) fn configured_max(&self, app: &App, region: Region) -> Option<u32> {
        let cfg = ServiceConfig::parse(app.service_config.as_ref()?).ok()?;
        let r = cfg.region(region)?;
        r.max.map(|m| m.max(r.min))
    }

    /// Whether the app keeps warm capacity in the region (the idle reaper leaves those
    /// processes to the warm controller).
    pub(crate) fn keeps_warm(app: &App, region: Region) -> bool {
        app.service_config
            .as_ref()
            .and_then(|v| ServiceConfig::parse(v).ok())
            .is_some_and(|c| c.region(region).is_some())
    }
}
