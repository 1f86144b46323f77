//! The control plane with a fake node at the node boundary (no processes run): allocation
//! under races, the idle reaper on a clock the test moves, retention of what the node keeps.

use std::sync::Arc;

use lodge_control::{Caller, Control, ControlConfig};
use lodge_model::node::{LinkError, LinkResult};
use lodge_model::wire::{CreateRoomParams, DeploymentConfigV3};
use lodge_model::*;
use lodge_store::{ProcessQuery, SqliteStore, Store};

use crate::TempDir;

/// A node that runs nothing and keeps process logs in a directory: the control plane's side of
/// the node boundary, without an agent.
struct FakeNode {
    id: String,
    processes: std::path::PathBuf,
}

#[async_trait::async_trait]
impl lodge_model::node::NodeLink for FakeNode {
    fn node_id(&self) -> &str {
        &self.id
    }
    fn wake(&self, _: &str) {}
    fn stats(&self, _: &str) -> Option<lodge_model::node::ProcessStats> {
        None
    }
    fn flows(&self) -> lodge_model::node::FlowTotals {
        Default::default()
    }
    async fn log_tail(&self, id: &str, lines: usize) -> LinkResult<(Vec<u8>, u64)> {
        let dir = lodge_agent::logs::process_dir(&self.processes, id)?;
        lodge_agent::logs::tail_lines(&dir.join("log"), lines)
            .await
            .map_err(|e| LinkError::io("log", e))
    }
    async fn log_read(&self, id: &str, offset: u64, max: usize) -> LinkResult<Vec<u8>> {
        let dir = lodge_agent::logs::process_dir(&self.processes, id)?;
        lodge_agent::logs::read_at(&dir.join("log"), offset, max)
            .await
            .map_err(|e| LinkError::io("log", e))
    }
    async fn kept_processes(&self) -> LinkResult<Vec<String>> {
        Ok(std::fs::read_dir(&self.processes)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn forget_process(&self, id: &str) -> LinkResult<()> {
        let dir = lodge_agent::logs::process_dir(&self.processes, id)?;
        std::fs::remove_dir_all(dir).map_err(|e| LinkError::io("forget", e))
    }
    async fn metrics(
        &self,
        _: &str,
        _: i64,
        _: i64,
        _: i64,
    ) -> LinkResult<lodge_model::node::MetricSeries> {
        Ok(Default::default())
    }
}

struct Setup {
    control: Arc<Control>,
    caller: Caller,
    app_id: String,
}

async fn setup(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    dir: &std::path::Path,
    rooms_per_process: u32,
    idle: bool,
) -> Setup {
    let control = Control::new(store.clone(), clock, ControlConfig::new(dir.to_path_buf()));
    let org = control.bootstrap().await.unwrap();
    let caller = Caller {
        org_id: org.org_id.clone(),
        token_id: None,
        name: "test".into(),
        scopes: None,
        instance_admin: true,
    };
    let node = FakeNode {
        id: "n1".into(),
        processes: dir.join("processes"),
    };
    control
        .register_local_node(
            Node::local("n1".into(), "127.0.0.1".into(), None, 0),
            Arc::new(node),
        )
        .await
        .unwrap();
    let app = control
        .create_app(
            &caller,
            None,
            serde_json::from_value(serde_json::json!({"appName": "race", "authConfiguration": {}}))
                .unwrap(),
        )
        .await
        .unwrap();
    let build = Build {
        build_id: "bld-1".into(),
        org_id: org.org_id,
        created_by: "test".into(),
        created_at: 0,
        status: BuildStatus::Succeeded,
        image_size: 1,
        started_at: None,
        finished_at: None,
        deleted_at: None,
        build_tag: None,
        content_hash: None,
        upload: None,
        runner: None,
    };
    if store.build("bld-1").await.unwrap().is_none() {
        store.insert_build(&build).await.unwrap();
    }
    let cfg: DeploymentConfigV3 = serde_json::from_value(serde_json::json!({
        "buildId": "bld-1", "idleTimeoutEnabled": idle, "env": [], "roomsPerProcess": rooms_per_process,
        "transportType": "udp", "containerPort": 7777, "requestedCPU": 0.5, "requestedMemoryMB": 512
    }))
    .unwrap();
    control
        .create_deployment(&caller, &app.app_id, cfg)
        .await
        .unwrap();
    Setup {
        control,
        caller,
        app_id: app.app_id,
    }
}

fn params(region: Region) -> CreateRoomParams {
    serde_json::from_value(serde_json::json!({ "region": region })).unwrap()
}

/// Hundreds of concurrent CreateRoom calls, from two control-plane instances sharing one
/// database file, never put more rooms on a process than `roomsPerProcess`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_creates_never_overallocate() {
    let dir = TempDir::new("race");
    let db = dir.0.join("lodge.db");
    let store_a: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
    let store_b: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
    let a = setup(store_a.clone(), Arc::new(SystemClock), &dir.0, 3, false).await;
    let b = Control::new(
        store_b,
        Arc::new(SystemClock),
        ControlConfig::new(dir.0.clone()),
    );
    const N: usize = 400;
    let mut tasks = Vec::new();
    for i in 0..N {
        let control = if i % 2 == 0 {
            a.control.clone()
        } else {
            b.clone()
        };
        let (caller, app) = (a.caller.clone(), a.app_id.clone());
        let region = if i % 5 == 0 {
            Region::Tokyo
        } else {
            Region::London
        };
        tasks.push(tokio::spawn(async move {
            control
                .create_room(&caller, &app, params(region), None)
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        t.await.unwrap().unwrap();
        ok += 1;
    }
    assert_eq!(ok, N);
    let procs = store_a.processes(&ProcessQuery::default()).await.unwrap();
    let mut total = 0;
    for p in &procs {
        let rooms = store_a.rooms_of_process(&p.process_id, true).await.unwrap();
        assert!(
            p.rooms_allocated <= 3,
            "process {} has {} rooms",
            p.process_id,
            p.rooms_allocated
        );
        assert_eq!(
            rooms.len() as u32,
            p.rooms_allocated,
            "slot count matches the rooms on {}",
            p.process_id
        );
        for r in &rooms {
            let region = p.region;
            assert!(r.current_allocation().is_some());
            assert!(matches!(region, Region::London | Region::Tokyo));
        }
        total += p.rooms_allocated as usize;
    }
    assert_eq!(total, N);
    // Every process is in the region its rooms asked for, and processes are mostly full.
    assert!(procs.len() >= N.div_ceil(3));
}

#[tokio::test]
async fn packing_and_custom_ids() {
    let dir = TempDir::new("pack");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.0.join("db")).unwrap());
    let s = setup(store, Arc::new(SystemClock), &dir.0, 2, false).await;
    let c = |id: Option<&str>| {
        let (control, caller, app) = (s.control.clone(), s.caller.clone(), s.app_id.clone());
        let id = id.map(str::to_string);
        async move {
            control
                .create_room(&caller, &app, params(Region::Frankfurt), id)
                .await
        }
    };
    let r1 = c(Some("my-room_1")).await.unwrap();
    let r2 = c(None).await.unwrap();
    let r3 = c(None).await.unwrap();
    assert_eq!(r1.room_id, "my-room_1");
    assert_eq!(r1.process_id, r2.process_id);
    assert_ne!(r1.process_id, r3.process_id);
    assert!(matches!(
        c(Some("my-room_1")).await,
        Err(lodge_control::Error::Invalid(_))
    ));
    assert!(matches!(
        c(Some("bad id")).await,
        Err(lodge_control::Error::Invalid(_))
    ));
    // A destroyed room frees its slot: the next two rooms fill the two processes, no third.
    s.control
        .destroy_room(&s.caller, &s.app_id, "my-room_1")
        .await
        .unwrap();
    let r4 = c(None).await.unwrap();
    let r5 = c(None).await.unwrap();
    let used: std::collections::BTreeSet<_> = [&r1, &r3, &r4, &r5]
        .iter()
        .map(|r| r.process_id.clone())
        .collect();
    assert_eq!(used.len(), 2, "no new process while slots are free");
    assert_ne!(r4.process_id, r5.process_id);
}

#[tokio::test]
async fn idle_reaper_follows_the_clock() {
    let dir = TempDir::new("reaper");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.0.join("db")).unwrap());
    let clock = ManualClock::new(1_000_000);
    let s = setup(store.clone(), Arc::new(clock.clone()), &dir.0, 1, true).await;
    let room = s
        .control
        .create_room(&s.caller, &s.app_id, params(Region::Sydney), None)
        .await
        .unwrap();
    let pid = room.process_id.clone().unwrap();
    // Pretend the node started it.
    s.control
        .handle_event(spec::AgentEvent::Running {
            process_id: pid.clone(),
            at: clock.now_ms(),
        })
        .await
        .unwrap();
    clock.advance_ms(600_000);
    assert!(
        s.control.reap_idle().await.unwrap().is_empty(),
        "a process with a room is not idle"
    );
    s.control
        .destroy_room(&s.caller, &s.app_id, &room.room_id)
        .await
        .unwrap();
    clock.advance_ms(299_999);
    assert!(
        s.control.reap_idle().await.unwrap().is_empty(),
        "not idle for 5 minutes yet"
    );
    // Connections keep it busy.
    s.control
        .handle_event(spec::AgentEvent::Activity {
            process_id: pid.clone(),
            at: clock.now_ms(),
            active_connections: 2,
        })
        .await
        .unwrap();
    clock.advance_ms(299_999);
    assert!(s.control.reap_idle().await.unwrap().is_empty());
    clock.advance_ms(1);
    assert_eq!(s.control.reap_idle().await.unwrap(), vec![pid.clone()]);
    assert_eq!(
        store.process(&pid).await.unwrap().unwrap().status,
        ProcessStatus::Stopping
    );
    // The node reports the exit: stopped, not failed.
    let exit = spec::ExitInfo {
        code: None,
        reason: "killed by signal 15".into(),
    };
    s.control
        .handle_event(spec::AgentEvent::Exited {
            process_id: pid.clone(),
            at: clock.now_ms(),
            exit,
            failed: false,
        })
        .await
        .unwrap();
    assert_eq!(
        store.process(&pid).await.unwrap().unwrap().status,
        ProcessStatus::Stopped
    );
}

#[tokio::test]
async fn processes_without_idle_timeout_are_never_reaped() {
    let dir = TempDir::new("noreap");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.0.join("db")).unwrap());
    let clock = ManualClock::new(0);
    let s = setup(store, Arc::new(clock.clone()), &dir.0, 1, false).await;
    let p = s
        .control
        .create_process(&s.caller, &s.app_id, Region::Dubai)
        .await
        .unwrap();
    s.control
        .handle_event(spec::AgentEvent::Running {
            process_id: p.process_id.clone(),
            at: 0,
        })
        .await
        .unwrap();
    clock.advance_ms(86_400_000);
    assert!(s.control.reap_idle().await.unwrap().is_empty());
}

/// Logs and metrics of ended processes are kept for the retention period (72 h by default),
/// then deleted; the logs API then answers 410.
#[tokio::test]
async fn logs_are_kept_for_the_retention_period() {
    let dir = TempDir::new("retention");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.0.join("db")).unwrap());
    let clock = ManualClock::new(1_000_000);
    let s = setup(store.clone(), Arc::new(clock.clone()), &dir.0, 1, false).await;
    let room = s
        .control
        .create_room(&s.caller, &s.app_id, params(Region::Sydney), None)
        .await
        .unwrap();
    let pid = room.process_id.clone().unwrap();
    let pdir = dir.0.join("processes").join(&pid);
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(pdir.join("log"), "hello\n").unwrap();
    s.control
        .handle_event(spec::AgentEvent::Exited {
            process_id: pid.clone(),
            at: clock.now_ms(),
            exit: spec::ExitInfo {
                code: Some(0),
                reason: "exited with code 0".into(),
            },
            failed: false,
        })
        .await
        .unwrap();
    clock.advance_ms(71 * 3_600_000);
    assert_eq!(s.control.sweep_retention().await.unwrap(), 0);
    assert!(s
        .control
        .process_log(&s.caller, &s.app_id, &pid)
        .await
        .is_ok());
    clock.advance_ms(2 * 3_600_000);
    assert!(matches!(
        s.control.process_log(&s.caller, &s.app_id, &pid).await,
        Err(lodge_control::Error::Gone(_))
    ));
    assert_eq!(s.control.sweep_retention().await.unwrap(), 1);
    assert!(!pdir.exists());
}

/// Node loss on a clock the test moves: a joined node silent for 10 s takes no new process,
/// one silent for `--node-lost-after` has its processes ended (rooms destroyed) with the reason
/// saying so, and when most of a fleet of three goes silent at once, none is declared lost.
#[tokio::test]
async fn node_loss_follows_the_clock() {
    let dir = TempDir::new("node-loss");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.0.join("db")).unwrap());
    let clock = ManualClock::new(1_000_000);
    let s = setup(store.clone(), Arc::new(clock.clone()), &dir.0, 1, false).await;
    // Only the joined nodes take work.
    s.control.set_draining(&s.caller, "n1", true).await.unwrap();
    // Each node has room for `cpu / 0.5` processes of the deployment.
    let heard = |ids: &'static [&'static str], cpu: f64| {
        let (store, now) = (store.clone(), clock.now_ms());
        async move {
            for id in ids {
                let mut n = Node::local(
                    id.to_string(),
                    format!("{id}.example"),
                    Some(vec![Region::Frankfurt]),
                    0,
                );
                n.remote = true;
                n.last_seen_at = Some(now);
                n.cpu = cpu;
                n.memory_mb = 1024.0;
                store.put_node(&n).await.unwrap();
            }
        }
    };
    // Room for one process each, so that packing puts one on each.
    heard(&["r1", "r2", "r3"], 0.5).await;
    let mut on = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let room = s
            .control
            .create_room(&s.caller, &s.app_id, params(Region::Frankfurt), None)
            .await
            .unwrap();
        let pid = room.process_id.clone().unwrap();
        let node = store.process(&pid).await.unwrap().unwrap().node_id;
        on.insert(node, (pid, room.room_id));
    }
    assert_eq!(on.len(), 3, "one process on each joined node");
    let lost_after = std::time::Duration::from_secs(300);

    // r1 goes silent; the others keep talking.
    clock.advance_ms(11_000);
    heard(&["r2", "r3"], 2.0).await;
    let room = s
        .control
        .create_room(&s.caller, &s.app_id, params(Region::Frankfurt), None)
        .await
        .unwrap();
    let node = store
        .process(room.process_id.as_ref().unwrap())
        .await
        .unwrap()
        .unwrap()
        .node_id;
    assert_ne!(node, "r1", "a node silent for 10 s takes no new process");
    assert!(
        s.control
            .judge_lost_nodes(lost_after)
            .await
            .unwrap()
            .is_empty(),
        "not lost yet"
    );
    clock.advance_ms(290_000);
    heard(&["r2", "r3"], 2.0).await;
    let ended = s.control.judge_lost_nodes(lost_after).await.unwrap();
    assert_eq!(ended, vec![on["r1"].0.clone()]);
    let p = store.process(&on["r1"].0).await.unwrap().unwrap();
    assert_eq!(p.status, ProcessStatus::Failed);
    assert!(
        p.summary_exit_reason
            .as_deref()
            .unwrap_or("")
            .contains("node lost"),
        "{:?}",
        p.summary_exit_reason
    );
    assert_eq!(
        store.room(&on["r1"].1).await.unwrap().unwrap().status,
        RoomStatus::Destroyed
    );

    // Now r2 goes silent too: two of three at once is likelier the control plane's fault.
    clock.advance_ms(301_000);
    heard(&["r3"], 2.0).await;
    assert!(s
        .control
        .judge_lost_nodes(lost_after)
        .await
        .unwrap()
        .is_empty());
    assert!(!store
        .process(&on["r2"].0)
        .await
        .unwrap()
        .unwrap()
        .status
        .is_terminal());
}

/// The one box is the only replica: it always runs the singletons, without a lease to write.
#[tokio::test]
async fn the_one_box_always_leads() {
    let dir = TempDir::new("solo");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.0.join("db")).unwrap());
    let control = Control::new(
        store.clone(),
        Arc::new(ManualClock::new(1_000_000)),
        ControlConfig::new(dir.0.clone()),
    );
    assert!(control.leads());
    assert!(control.lead().await);
    assert_eq!(
        store.lease_holder("singletons", 1_000_000).await.unwrap(),
        None
    );
}

/// Two replicas on one PostgreSQL schema: the singletons run on one at a time; when its
/// holder stops renewing, the lease moves once it expires, and the new holder counts a node's
/// silence from when it took over (a node had the whole period to reach it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn singletons_run_on_one_replica_and_move_when_it_dies() {
    let dir = TempDir::new("lease");
    let schema = crate::store::PgSchema::new().await;
    let store: Arc<dyn Store> = Arc::new(
        lodge_store::PostgresStore::connect(&schema.url())
            .await
            .unwrap(),
    );
    let clock = ManualClock::new(1_000_000);
    let a = setup(store.clone(), Arc::new(clock.clone()), &dir.0, 1, false).await;
    let b = Control::new(
        store.clone(),
        Arc::new(clock.clone()),
        ControlConfig::new(dir.0.clone()),
    );
    a.control.set_draining(&a.caller, "n1", true).await.unwrap();
    let mut n = Node::local(
        "r1".into(),
        "r1.example".into(),
        Some(vec![Region::Frankfurt]),
        0,
    );
    n.remote = true;
    n.last_seen_at = Some(clock.now_ms());
    n.cpu = 1.0;
    n.memory_mb = 1024.0;
    store.put_node(&n).await.unwrap();
    let room = a
        .control
        .create_room(&a.caller, &a.app_id, params(Region::Frankfurt), None)
        .await
        .unwrap();
    let pid = room.process_id.unwrap();

    assert!(a.control.lead().await, "the first to ask leads");
    assert!(!b.lead().await, "one holder at a time");
    assert!(a.control.leads() && !b.leads());
    clock.advance_ms(10_000);
    assert!(a.control.lead().await, "its holder renews it");
    assert!(!b.lead().await);
    // a dies (stops renewing); its lease expires 15 s after its last renewal, and it stops
    // acting as the holder a margin before that.
    clock.advance_ms(11_000);
    assert!(a.control.leads(), "within its renewal's deadline");
    clock.advance_ms(1_000);
    assert!(
        !a.control.leads(),
        "past it: no more singleton steps without a renewal"
    );
    clock.advance_ms(2_000);
    assert!(!b.lead().await, "not expired yet");
    clock.advance_ms(2_000);
    assert!(b.lead().await, "expired: it moves");
    assert!(
        !a.control.lead().await,
        "the old holder does not take it back"
    );

    // r1 was last heard 26 s ago; b took over just now, so it waits the whole period from here.
    let lost_after = std::time::Duration::from_secs(300);
    clock.advance_ms(290_000);
    assert!(b.lead().await);
    assert!(
        b.judge_lost_nodes(lost_after).await.unwrap().is_empty(),
        "within the grace"
    );
    clock.advance_ms(11_000);
    assert_eq!(b.judge_lost_nodes(lost_after).await.unwrap(), vec![pid]);
}

/// A minted admin token: on the one box a lost file means a new token and the old one revoked;
/// on a shared store a replica without the file mints its own and leaves the others' valid
/// (revoking them would lock the other replicas' operators out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_minted_by_replicas_stay_valid() {
    let dir = TempDir::new("admin");
    let clock = Arc::new(ManualClock::new(1_000_000));
    // The one box.
    let solo = Control::new(
        Arc::new(SqliteStore::open(&dir.0.join("db")).unwrap()),
        clock.clone(),
        ControlConfig::new(dir.0.clone()),
    );
    let file = dir.0.join("admin-token");
    let first = solo.ensure_admin_token(&file).await.unwrap().unwrap();
    assert_eq!(solo.ensure_admin_token(&file).await.unwrap(), None, "kept");
    std::fs::remove_file(&file).unwrap();
    let second = solo.ensure_admin_token(&file).await.unwrap().unwrap();
    assert!(solo.authenticate(Some(second.as_str())).await.is_ok());
    assert!(
        solo.authenticate(Some(first.as_str())).await.is_err(),
        "a lost file's token is revoked"
    );

    // Two replicas on one schema, each with a data dir of its own.
    let schema = crate::store::PgSchema::new().await;
    let store: Arc<dyn Store> = Arc::new(
        lodge_store::PostgresStore::connect(&schema.url())
            .await
            .unwrap(),
    );
    let a = Control::new(
        store.clone(),
        clock.clone(),
        ControlConfig::new(dir.0.join("a")),
    );
    let b = Control::new(store, clock, ControlConfig::new(dir.0.join("b")));
    std::fs::create_dir_all(dir.0.join("a")).unwrap();
    std::fs::create_dir_all(dir.0.join("b")).unwrap();
    let of_a = a
        .ensure_admin_token(&dir.0.join("a/admin-token"))
        .await
        .unwrap()
        .unwrap();
    let of_b = b
        .ensure_admin_token(&dir.0.join("b/admin-token"))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(of_a, of_b);
    for (who, token) in [("a", &of_a), ("b", &of_b)] {
        for c in [&a, &b] {
            let caller = c
                .authenticate(Some(token.as_str()))
                .await
                .unwrap_or_else(|e| panic!("replica {who}'s admin token is refused: {e}"));
            assert!(caller.instance_admin);
        }
    }
}
