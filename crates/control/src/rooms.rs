//! Rooms and processes: the allocator and the process use-cases.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use lodge_model::node::NodeLink;
use lodge_model::wire::{ConnectionInfoV2, CreateRoomParams, ProcessV3, RoomOut};
use lodge_model::{
    id, validate, App, Deployment, Process, ProcessStatus, Region, Room, RoomAllocation, RoomStatus,
};
use lodge_scheduler::{Candidate, Placement, PlacementError};
use lodge_store::{PlaceTarget, ProcessQuery, StoreError};

use crate::{Caller, Control, Error, Result};

fn placement_error(e: PlacementError) -> Error {
    match e {
        PlacementError::NoNode(r) => Error::BadRequest(format!(
            "no node serves region {r} now (nodes that are draining, stopped or silent for 10 s \
             take no new processes; `lodge nodes list` shows them)"
        )),
        PlacementError::NoCapacity(r) => Error::NoCapacity(format!(
            "no capacity in {r}: every node serving it is full (its public ports, or the CPU \
             and memory the deployments of its processes requested); destroy rooms, stop \
             processes, or add nodes or ports"
        )),
    }
}

/// How often a placement is retried after losing a race for the last slot of a process.
const PLACEMENT_ATTEMPTS: usize = 64;

/// Filter of the process listings.
#[derive(Debug, Clone, Default)]
pub struct ProcessFilter {
    pub statuses: Vec<ProcessStatus>,
    pub regions: Vec<Region>,
    pub before: Option<i64>,
}

impl Control {
    fn new_process(
        &self,
        d: &Deployment,
        region: Region,
        node_id: String,
        first_room: Option<&Room>,
    ) -> Process {
        let now = self.now();
        Process {
            process_id: id::process_id(),
            app_id: d.app_id.clone(),
            deployment_id: d.deployment_id.clone(),
            node_id,
            region,
            status: ProcessStatus::Starting,
            rooms_per_process: d.rooms_per_process,
            rooms_allocated: u32::from(first_room.is_some()),
            exposed_ports: Vec::new(),
            created_at: now,
            scheduled_at: Some(now),
            booted_at: None,
            started_at: None,
            stopping_at: None,
            terminated_at: None,
            summary_exit_reason: None,
            last_busy_at: now,
            initial_room_id: first_room.map(|r| r.room_id.clone()),
            initial_room_config: first_room.and_then(|r| r.room_config.clone()),
            port_count: d.ports().count() as u32,
        }
    }

    /// The store's refusal of one more process for an app, as a 402 naming the flag.
    fn process_limit(&self, e: StoreError) -> Error {
        match e {
            StoreError::Limit(m) => Error::NoCapacity(format!(
                "{m}, the most one app may have (--max-processes-per-app {}); destroy rooms or stop processes",
                self.cfg.max_processes_per_app
            )),
            other => other.into(),
        }
    }

    pub(crate) async fn node_loads(&self) -> Result<Vec<lodge_scheduler::NodeLoad>> {
        let usage = self.store.node_usage().await?;
        Ok(self
            .nodes_now()
            .await?
            .iter()
            .filter(|node| self.schedulable(node))
            .cloned()
            .map(|node| {
                let u = usage
                    .iter()
                    .find(|u| u.node_id == node.node_id)
                    .cloned()
                    .unwrap_or_default();
                lodge_scheduler::NodeLoad {
                    node,
                    live_processes: u.live_processes,
                    ports_in_use: u.ports,
                    cpu_in_use: u.cpu,
                    memory_mb_in_use: u.memory_mb,
                }
            })
            .collect())
    }

    /// Place `room` (status and config set, allocations as before) onto a process of the
    /// deployment in the region. Returns the process it landed on.
    async fn allocate(
        &self,
        d: &Deployment,
        region: Region,
        mut room: Room,
    ) -> Result<(Room, Process)> {
        room.status = RoomStatus::Active;
        for attempt in 0..PLACEMENT_ATTEMPTS {
            // Only processes with a free slot, best first; a handful is plenty to choose from
            // (the rest matter only if all of these fill up first, and then we retry).
            let q = ProcessQuery {
                deployment_id: Some(d.deployment_id.clone()),
                regions: vec![region],
                statuses: ProcessStatus::PLACEABLE.to_vec(),
                with_free_slot: true,
                limit: Some(8),
                ..Default::default()
            };
            let procs = self.store.processes(&q).await?;
            // A process on a node that takes no new work (draining, stopped, silent) takes no
            // new room either.
            let nodes_now = self.nodes_now().await?;
            let takes_work = |node_id: &str| {
                nodes_now
                    .iter()
                    .any(|n| n.node_id == node_id && self.schedulable(n))
            };
            let candidates: Vec<Candidate> = procs
                .iter()
                .filter(|p| takes_work(&p.node_id))
                .map(|p| Candidate {
                    process_id: p.process_id.clone(),
                    status: p.status,
                    rooms_allocated: p.rooms_allocated,
                    rooms_per_process: p.rooms_per_process,
                    created_at: p.created_at,
                })
                .collect();
            // Node loads matter only when a new process must start.
            let nodes = if candidates.is_empty() {
                self.node_loads().await?
            } else {
                Vec::new()
            };
            let placement = lodge_scheduler::place_room(region, need(d), &candidates, &nodes)
                .map_err(placement_error)?;
            let (process_id, target, new) = match placement {
                Placement::Existing { process_id } => {
                    (process_id.clone(), PlaceTarget::Existing(process_id), None)
                }
                Placement::NewProcess { node_id } => {
                    self.check_region_max(d, region).await?;
                    let p = self.new_process(d, region, node_id, Some(&room));
                    (
                        p.process_id.clone(),
                        PlaceTarget::New(Box::new(p.clone()), Some(self.cfg.max_processes_per_app)),
                        Some(p),
                    )
                }
            };
            room.allocations.push(RoomAllocation {
                room_allocation_id: id::allocation_id(),
                process_id: process_id.clone(),
                scheduled_at: self.now(),
                unscheduled_at: None,
            });
            match self.store.place_room(&room, target).await {
                Ok(()) => {
                    let process = match new {
                        Some(p) => {
                            self.metrics
                                .processes_started
                                .fetch_add(1, Ordering::Relaxed);
                            self.wake_node(&p.node_id, &p.process_id);
                            // A cold start: the autoscaler may want more headroom now.
                            self.nudge_warm();
                            p
                        }
                        // The process as read before taking the slot: its ports and status
                        // are what the answer needs, and they do not change with a room.
                        None => match procs.into_iter().find(|p| p.process_id == process_id) {
                            Some(mut p) => {
                                p.rooms_allocated += 1;
                                p
                            }
                            None => self.store.process(&process_id).await?.ok_or_else(|| {
                                Error::Internal(format!("process {process_id} vanished"))
                            })?,
                        },
                    };
                    return Ok((room, process));
                }
                Err(StoreError::Conflict(_)) => {
                    room.allocations.pop();
                    self.metrics
                        .placement_retries
                        .fetch_add(1, Ordering::Relaxed);
                    if attempt > 4 {
                        tokio::task::yield_now().await;
                    }
                }
                Err(e) => return Err(self.process_limit(e)),
            }
        }
        Err(Error::Internal(
            "could not place the room: too much contention, try again".into(),
        ))
    }

    /// A region's `maxProcesses` (the app's `serviceConfig`) holds for cold starts too: 402
    /// once the app's live processes there reach it.
    async fn check_region_max(&self, d: &Deployment, region: Region) -> Result<()> {
        let Some(app) = self.store.app(&d.app_id).await? else {
            return Ok(());
        };
        let Some(max) = self.configured_max(&app, region) else {
            return Ok(());
        };
        let q = ProcessQuery {
            app_id: Some(app.app_id.clone()),
            regions: vec![region],
            statuses: ProcessStatus::PLACEABLE.to_vec(),
            ..Default::default()
        };
        if self.store.count_processes(&q).await? >= u64::from(max) {
            return Err(Error::NoCapacity(format!(
                "no capacity in {region}: the app's {max} processes there (maxProcesses in its \
                 serviceConfig) have no free room slot"
            )));
        }
        Ok(())
    }

    async fn deployment_for(
        &self,
        app_id: &str,
        deployment_id: Option<&str>,
    ) -> Result<Deployment> {
        match deployment_id {
            Some(id) => match self.store.deployment(id).await? {
                Some(d) if d.app_id == app_id => Ok(d),
                _ => Err(Error::NotFound(format!("Deployment not found: {id}"))),
            },
            None => self.store.latest_deployment(app_id).await?.ok_or_else(|| {
                Error::NotFound(format!(
                    "No deployment found for app {app_id}; create one first"
                ))
            }),
        }
    }

    pub async fn create_room(
        &self,
        caller: &Caller,
        app_id: &str,
        p: CreateRoomParams,
        room_id: Option<String>,
    ) -> Result<ConnectionInfoV2> {
        let app = self.app_of(caller, app_id).await?;
        self.create_room_in(&app, p, room_id, false).await
    }

    /// CreateRoom for an app already authorised. `reserved`: the room id was reserved by a
    /// lobby, so it is known to be free.
    pub(crate) async fn create_room_in(
        &self,
        app: &App,
        p: CreateRoomParams,
        room_id: Option<String>,
        reserved: bool,
    ) -> Result<ConnectionInfoV2> {
        if let Some(id) = &room_id {
            validate::room_id(id).map_err(Error::Invalid)?;
        }
        if let Some(c) = &p.room_config {
            validate::max_len("roomConfig", c, 10_000).map_err(Error::Invalid)?;
        }
        let d = self
            .deployment_for(&app.app_id, p.deployment_id.as_deref())
            .await?;
        if let Some(existing) = match &room_id {
            Some(id) if !reserved => self.store.room(id).await?,
            _ => None,
        } {
            return Err(Error::Invalid(format!(
                "room id '{}' is already taken",
                existing.room_id
            )));
        }
        let room = Room {
            room_id: room_id.unwrap_or_else(id::room_id),
            app_id: app.app_id.clone(),
            status: RoomStatus::Active,
            room_config: p.room_config,
            created_at: self.now(),
            allocations: Vec::new(),
        };
        let (room, process) = self.allocate(&d, p.region, room).await?;
        self.metrics.rooms_created.fetch_add(1, Ordering::Relaxed);
        tracing::info!(room_id = %room.room_id, process_id = %process.process_id, region = %p.region, "room created");
        let mut info = ConnectionInfoV2::of(&room.room_id, Some(&process));
        info.process_id = Some(process.process_id);
        Ok(info)
    }

    async fn room_of(&self, app_id: &str, room_id: &str) -> Result<Room> {
        match self.store.room(room_id).await? {
            Some(r) if r.app_id == app_id => Ok(r),
            _ => Err(Error::NotFound(format!("Room not found: {room_id}"))),
        }
    }

    pub async fn get_room(&self, caller: &Caller, app_id: &str, room_id: &str) -> Result<RoomOut> {
        let app = self.app_of(caller, app_id).await?;
        Ok(RoomOut::with_allocations(
            &self.room_of(&app.app_id, room_id).await?,
        ))
    }

    pub async fn rooms_for_process(
        &self,
        caller: &Caller,
        app_id: &str,
        process_id: &str,
        active: bool,
    ) -> Result<Vec<RoomOut>> {
        let app = self.app_of(caller, app_id).await?;
        self.process_of(&app.app_id, process_id).await?;
        let rooms = self.store.rooms_of_process(process_id, active).await?;
        Ok(rooms.iter().map(RoomOut::without_allocations).collect())
    }

    pub async fn destroy_room(&self, caller: &Caller, app_id: &str, room_id: &str) -> Result<()> {
        let app = self.app_of(caller, app_id).await?;
        let room = self.room_of(&app.app_id, room_id).await?;
        if room.status == RoomStatus::Destroyed {
            return Ok(());
        }
        self.store
            .unallocate_room(room_id, RoomStatus::Destroyed, self.now())
            .await?;
        self.metrics.rooms_destroyed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(room_id, "room destroyed");
        Ok(())
    }

    pub async fn suspend_room(&self, caller: &Caller, app_id: &str, room_id: &str) -> Result<()> {
        let app = self.app_of(caller, app_id).await?;
        let room = self.room_of(&app.app_id, room_id).await?;
        if room.status == RoomStatus::Destroyed {
            return Err(Error::BadRequest(format!("room {room_id} is destroyed")));
        }
        self.store
            .unallocate_room(room_id, RoomStatus::Suspended, self.now())
            .await?;
        Ok(())
    }

    /// ResumeRoom: re-allocate a suspended room; an allocated room is returned as it is.
    pub async fn resume_room(
        &self,
        caller: &Caller,
        app_id: &str,
        room_id: &str,
    ) -> Result<ConnectionInfoV2> {
        let app = self.app_of(caller, app_id).await?;
        let room = self.room_of(&app.app_id, room_id).await?;
        self.resume(room).await
    }

    async fn resume(&self, room: Room) -> Result<ConnectionInfoV2> {
        match room.status {
            RoomStatus::Destroyed => Err(Error::BadRequest(format!(
                "room {} is destroyed",
                room.room_id
            ))),
            RoomStatus::Suspended => {
                let last = room.allocations.last().map(|a| a.process_id.clone());
                let prior = match last {
                    Some(p) => self.store.process(&p).await?,
                    None => None,
                };
                let Some(prior) = prior else {
                    return Err(Error::BadRequest(format!(
                        "room {} has no allocation to resume from",
                        room.room_id
                    )));
                };
                let d = self
                    .deployment_for(&room.app_id, Some(&prior.deployment_id))
                    .await?;
                let (room, process) = self.allocate(&d, prior.region, room).await?;
                let mut info = ConnectionInfoV2::of(&room.room_id, Some(&process));
                info.process_id = Some(process.process_id);
                Ok(info)
            }
            _ => self.connection_info_of(&room).await,
        }
    }

    async fn connection_info_of(&self, room: &Room) -> Result<ConnectionInfoV2> {
        let process = match room.current_allocation() {
            Some(a) => self.store.process(&a.process_id).await?,
            None => None,
        };
        let mut info = ConnectionInfoV2::of(&room.room_id, process.as_ref());
        info.process_id = process.map(|p| p.process_id);
        Ok(info)
    }

    /// GetConnectionInfo (public). A suspended room is re-scheduled, as Hathora's legacy did.
    pub async fn connection_info(&self, app_id: &str, room_id: &str) -> Result<ConnectionInfoV2> {
        let room = self.room_of(app_id, room_id).await?;
        let mut info = match room.status {
            RoomStatus::Destroyed => {
                return Err(Error::NotFound(format!(
                    "Room {room_id} has been destroyed"
                )));
            }
            RoomStatus::Suspended => self.resume(room).await?,
            _ => self.connection_info_of(&room).await?,
        };
        info.process_id = None;
        Ok(info)
    }

    pub async fn update_room_config(
        &self,
        caller: &Caller,
        app_id: &str,
        room_id: &str,
        config: &str,
    ) -> Result<()> {
        let app = self.app_of(caller, app_id).await?;
        validate::max_len("roomConfig", config, 10_000).map_err(Error::Invalid)?;
        self.room_of(&app.app_id, room_id).await?;
        if !self.store.update_room_config(room_id, config).await? {
            return Err(Error::BadRequest(format!("room {room_id} is destroyed")));
        }
        Ok(())
    }

    pub(crate) async fn process_of(&self, app_id: &str, process_id: &str) -> Result<Process> {
        match self.store.process(process_id).await? {
            Some(p) if p.app_id == app_id => Ok(p),
            _ => Err(Error::NotFound(format!("Process not found: {process_id}"))),
        }
    }

    pub async fn get_process(
        &self,
        caller: &Caller,
        app_id: &str,
        process_id: &str,
    ) -> Result<ProcessV3> {
        let app = self.app_of(caller, app_id).await?;
        Ok((&self.process_of(&app.app_id, process_id).await?).into())
    }

    fn process_query(app_id: &str, f: ProcessFilter) -> ProcessQuery {
        ProcessQuery {
            app_id: Some(app_id.to_string()),
            statuses: f.statuses,
            regions: f.regions,
            created_before: f.before,
            ..Default::default()
        }
    }

    pub async fn latest_processes(
        &self,
        caller: &Caller,
        app_id: &str,
        f: ProcessFilter,
    ) -> Result<Vec<ProcessV3>> {
        let app = self.app_of(caller, app_id).await?;
        let mut q = Self::process_query(&app.app_id, f);
        q.limit = Some(10);
        Ok(self
            .store
            .processes(&q)
            .await?
            .iter()
            .map(Into::into)
            .collect())
    }

    pub async fn count_processes(
        &self,
        caller: &Caller,
        app_id: &str,
        f: ProcessFilter,
    ) -> Result<u64> {
        let app = self.app_of(caller, app_id).await?;
        Ok(self
            .store
            .count_processes(&Self::process_query(&app.app_id, f))
            .await?)
    }

    /// CreateProcess: pre-warm a process of the latest deployment.
    pub async fn create_process(
        &self,
        caller: &Caller,
        app_id: &str,
        region: Region,
    ) -> Result<ProcessV3> {
        let app = self.app_of(caller, app_id).await?;
        let d = self.deployment_for(&app.app_id, None).await?;
        Ok((&self.start_process(&d, region).await?).into())
    }

    /// Start a process of `d` in `region` without a room, on the node placement chooses.
    pub(crate) async fn start_process(&self, d: &Deployment, region: Region) -> Result<Process> {
        let nodes = self.node_loads().await?;
        let node_id =
            lodge_scheduler::place_process(region, need(d), &nodes).map_err(placement_error)?;
        let p = self.new_process(d, region, node_id, None);
        self.store
            .insert_process(&p, Some(self.cfg.max_processes_per_app))
            .await
            .map_err(|e| self.process_limit(e))?;
        self.metrics
            .processes_started
            .fetch_add(1, Ordering::Relaxed);
        self.wake_node(&p.node_id, &p.process_id);
        Ok(p)
    }

    /// StopProcess: SIGTERM now, SIGKILL after the grace period; its rooms are destroyed when
    /// it ends.
    pub async fn stop_process(
        &self,
        caller: &Caller,
        app_id: &str,
        process_id: &str,
    ) -> Result<()> {
        let app = self.app_of(caller, app_id).await?;
        let p = self.process_of(&app.app_id, process_id).await?;
        self.request_stop(&p.process_id, "stopped by request").await
    }

    pub(crate) async fn request_stop(&self, process_id: &str, why: &str) -> Result<()> {
        let now = self.now();
        let updated = self
            .store
            .update_process(process_id, &|p| {
                if p.status == ProcessStatus::Stopping {
                    return false;
                }
                p.status = ProcessStatus::Stopping;
                p.stopping_at = Some(now);
                p.summary_exit_reason = Some(why.to_string());
                true
            })
            .await?;
        if let Some(p) = updated {
            tracing::info!(process_id, reason = why, "stopping process");
            self.wake_node(&p.node_id, &p.process_id);
            // Its rooms end now, not when the process finally exits: a stopping process takes
            // no new rooms, so none can appear after this.
            for room in self.store.rooms_of_process(process_id, true).await? {
                if self
                    .store
                    .unallocate_room(&room.room_id, RoomStatus::Destroyed, now)
                    .await?
                    .is_some()
                {
                    self.metrics.rooms_destroyed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// For log endpoints: the process (checked against the app) and the node that keeps its log.
    pub async fn process_log(
        &self,
        caller: &Caller,
        app_id: &str,
        process_id: &str,
    ) -> Result<(Process, Arc<dyn NodeLink>)> {
        let app = self.app_of(caller, app_id).await?;
        let p = self.process_of(&app.app_id, process_id).await?;
        if self.past_retention(&p) {
            return Err(Error::Gone(format!(
                "the logs of process {process_id} are older than the {} h retention period",
                self.cfg.retention.as_secs() / 3600
            )));
        }
        let node = self.node_of(&p, "logs").await?;
        Ok((p, node))
    }

    /// The node that runs (or ran) the process, for what only the node has.
    async fn node_of(&self, p: &Process, what: &str) -> Result<Arc<dyn NodeLink>> {
        self.node_link(&p.node_id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "the {what} of process {} are on node {}, which this control plane cannot reach",
                p.process_id, p.node_id
            ))
        })
    }

    /// Whether an ended process's logs and metrics are past the retention period.
    fn past_retention(&self, p: &Process) -> bool {
        let keep = lodge_model::clock::millis(self.cfg.retention);
        p.terminated_at
            .is_some_and(|t| self.now().saturating_sub(t) > keep)
    }

    /// Have every node delete the logs and metrics of processes that ended more than the
    /// retention period ago.
    pub async fn sweep_retention(&self) -> Result<usize> {
        let mut removed = 0;
        for node in self.agents() {
            // A node out of reach keeps its files until the next sweep that reaches it.
            let Ok(kept) = node.kept_processes().await else {
                continue;
            };
            for id in kept {
                if let Some(p) = self.store.process(&id).await? {
                    if p.status.is_terminal()
                        && self.past_retention(&p)
                        && node.forget_process(&id).await.is_ok()
                    {
                        removed += 1;
                    }
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "deleted logs and metrics past the retention period"
            );
        }
        Ok(removed)
    }

    pub async fn process_status(&self, process_id: &str) -> Result<Option<ProcessStatus>> {
        Ok(self.store.process(process_id).await?.map(|p| p.status))
    }
}

/// Which metrics a GetProcessMetrics call asked for, and over what window (unix seconds).
#[derive(Debug, Clone)]
pub struct MetricsQuery {
    pub start: i64,
    pub end: i64,
    pub step: i64,
}

impl Control {
    /// The metric series of a process, read from the samples its node keeps.
    pub async fn process_metrics(
        &self,
        caller: &Caller,
        app_id: &str,
        process_id: &str,
        q: MetricsQuery,
    ) -> Result<crate::MetricSeries> {
        let app = self.app_of(caller, app_id).await?;
        let p = self.process_of(&app.app_id, process_id).await?;
        // Epoch seconds from 1970 to the year 5000: no arithmetic below can overflow.
        const LATEST: i64 = 95_617_584_000;
        for (name, v) in [("start", q.start), ("end", q.end)] {
            if !(0..=LATEST).contains(&v) {
                return Err(Error::Invalid(format!(
                    "{name} ({v}) must be a time in seconds since 1970, at most {LATEST}"
                )));
            }
        }
        if q.end <= q.start {
            return Err(Error::Invalid(format!(
                "end ({}) must be after start ({})",
                q.end, q.start
            )));
        }
        if q.step < 1 {
            return Err(Error::Invalid("step must be at least 1 second".into()));
        }
        if (q.end - q.start) / q.step > 10_000 {
            return Err(Error::Invalid(
                "at most 10000 points per series; use a larger step".into(),
            ));
        }
        let node = self.node_of(&p, "metrics").await?;
        Ok(node.metrics(process_id, q.start, q.end, q.step).await?)
    }
}

/// What a new process of `d` needs of a node.
pub(crate) fn need(d: &Deployment) -> lodge_scheduler::Need {
    lodge_scheduler::Need {
        ports: d.ports().count() as u32,
        cpu: d.requested_cpu,
        memory_mb: d.requested_memory_mb,
    }
}
