//! The `Store` contract: one suite, run on every backend. SQLite on a file (reopening proves
//! durability; a second handle on the file is a second writer) and PostgreSQL in a schema of
//! its own per test, dropped after (a second store on its own pool is a second replica).
//!
//! PostgreSQL comes from `LODGE_TEST_POSTGRES` (default `postgres://root@127.0.0.1/test`, which
//! `scripts/install-deps` starts); when it cannot be reached the PostgreSQL half fails and
//! says so.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use lodge_model::*;
use lodge_store::{PlaceTarget, PostgresStore, ProcessQuery, SqliteStore, Store, StoreError};

use crate::TempDir;

/// Somewhere a store lives; `open` gives another handle on the same data.
#[async_trait::async_trait]
trait Backend: Send + Sync {
    async fn open(&self) -> Arc<dyn Store>;
}

struct Sqlite {
    dir: TempDir,
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(SqliteStore::open(&self.dir.0.join("lodge.db")).unwrap())
    }
}

fn sqlite() -> Sqlite {
    Sqlite {
        dir: TempDir::new("store"),
    }
}

pub fn postgres_url() -> String {
    std::env::var("LODGE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1/test".to_string())
}

/// A schema of its own on the test database, dropped with this value.
pub struct PgSchema {
    pub name: String,
}

impl PgSchema {
    pub async fn new() -> PgSchema {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "lodge_it_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        pg_admin(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
        ))
        .await;
        PgSchema { name }
    }

    /// The store URL whose connections use this schema.
    pub fn url(&self) -> String {
        let base = postgres_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-csearch_path%3D{}", self.name)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        // A runtime of its own: this may run inside a test's runtime, which cannot block.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(pg_admin(&sql));
        })
        .join();
    }
}

async fn pg_admin(sql: &str) {
    let url = postgres_url();
    let (client, conn) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is not reachable at {url} ({e}); start it (scripts/install-deps does) or set LODGE_TEST_POSTGRES"
        ),
    };
    let task = tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap();
    drop(client);
    let _ = task.await;
}

struct Postgres {
    schema: PgSchema,
}

#[async_trait::async_trait]
impl Backend for Postgres {
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(PostgresStore::connect(&self.schema.url()).await.unwrap())
    }
}

async fn postgres() -> Postgres {
    Postgres {
        schema: PgSchema::new().await,
    }
}

/// Each contract test, once per backend.
macro_rules! contract {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(&super::sqlite()).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(&super::postgres().await).await
                }
            )+
        }
    };
}

contract!(
    placement_is_conditional_and_durable,
    names_are_unique_among_live_entities,
    tokens_builds_and_deployments,
    process_queries_filter_and_order,
    lobbies_and_their_limits,
    legacy_numbers_are_issued_once,
    racing_new_processes_never_pass_the_app_limit,
    racing_placements_never_overfill_a_process,
    racing_updates_lose_nothing,
    ending_a_process_races_placement_cleanly,
    ending_a_process_races_its_rooms_ending,
    churn_keeps_counts_exact,
    documents_keep_any_text,
    nodes_join_tokens_and_fleets,
    coordination_between_replicas,
);

/// What replicas coordinate through: one holder per lease however many race for it (across two
/// handles where the backend has them), leases that move only once expired, a setting whose
/// first writer wins for everyone, blobs by part and by prefix, and hints from one replica
/// heard by another.
async fn coordination_between_replicas(b: &dyn Backend) {
    let s = b.open().await;
    let s2 = b.open().await;
    let r = |id: &str, seen: Millis| Replica {
        replica_id: id.into(),
        address: format!("http://{id}"),
        started_at: 1,
        seen_at: seen,
    };
    s.put_replica(&r("a", 10)).await.unwrap();
    s2.put_replica(&r("b", 20)).await.unwrap();
    s.put_replica(&r("a", 30)).await.unwrap();
    assert_eq!(s2.replicas().await.unwrap(), vec![r("a", 30), r("b", 20)]);
    s.delete_replica("b").await.unwrap();
    assert_eq!(s2.replicas().await.unwrap(), vec![r("a", 30)]);

    let mut racers = Vec::new();
    for i in 0..16 {
        let store = if i % 2 == 0 { s.clone() } else { s2.clone() };
        racers.push(tokio::spawn(async move {
            let me = format!("replica-{i}");
            store
                .acquire_lease("reaper", &me, 1_000, 100)
                .await
                .unwrap()
                .then_some(me)
        }));
    }
    let mut winners = Vec::new();
    for t in racers {
        winners.extend(t.await.unwrap());
    }
    assert_eq!(winners.len(), 1, "exactly one holder: {winners:?}");
    let holder = winners.pop().unwrap();
    assert!(
        s2.acquire_lease("reaper", &holder, 1_050, 100)
            .await
            .unwrap(),
        "the holder extends"
    );
    assert_eq!(
        s.lease_holder("reaper", 1_150).await.unwrap().as_deref(),
        Some(holder.as_str())
    );
    assert_eq!(
        s.lease_holder("reaper", 1_151).await.unwrap(),
        None,
        "expired"
    );
    assert!(
        !s.acquire_lease("reaper", "other", 1_149, 100)
            .await
            .unwrap(),
        "not yet expired"
    );
    assert!(
        s.acquire_lease("other-lease", "other", 1_149, 100)
            .await
            .unwrap(),
        "leases are apart"
    );
    s.release_lease("reaper", "other").await.unwrap();
    assert!(
        !s.acquire_lease("reaper", "other", 1_149, 100)
            .await
            .unwrap(),
        "only its holder releases it"
    );
    assert!(
        s.acquire_lease("reaper", "other", 1_151, 100)
            .await
            .unwrap(),
        "expired: it moves"
    );
    assert!(
        !s2.acquire_lease("reaper", &holder, 1_152, 100)
            .await
            .unwrap(),
        "the old holder lost it"
    );
    s2.release_lease("reaper", "other").await.unwrap();
    assert!(
        s.acquire_lease("reaper", &holder, 1_153, 100)
            .await
            .unwrap(),
        "released: free at once"
    );

    let mut writers = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { s.clone() } else { s2.clone() };
        writers.push(tokio::spawn(async move {
            store
                .setting_or_insert("secret", &format!("v{i}"))
                .await
                .unwrap()
        }));
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in writers {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(
        seen.len(),
        1,
        "every caller gets the first writer's value: {seen:?}"
    );
    assert_eq!(
        &s.setting_or_insert("secret", "later").await.unwrap(),
        seen.first().unwrap()
    );

    // A window of 1,000 ms taking 5: 16 racers across two handles, 5 get through.
    let mut hits = Vec::new();
    for i in 0..16 {
        let store = if i % 2 == 0 { s.clone() } else { s2.clone() };
        hits.push(tokio::spawn(async move {
            store
                .hit_window("source 1.2.3.4", 10_000, 1_000, 5)
                .await
                .unwrap()
        }));
    }
    let mut through = 0;
    for t in hits {
        match t.await.unwrap() {
            None => through += 1,
            Some(start) => assert_eq!(start, 10_000, "the window's start, for Retry-After"),
        }
    }
    assert_eq!(through, 5, "replicas count together");
    assert_eq!(
        s.hit_window("source 1.2.3.4", 10_999, 1_000, 5)
            .await
            .unwrap(),
        Some(10_000)
    );
    assert_eq!(
        s.hit_window("other", 10_999, 1_000, 5).await.unwrap(),
        None,
        "keys apart"
    );
    assert_eq!(
        s2.hit_window("source 1.2.3.4", 11_000, 1_000, 5)
            .await
            .unwrap(),
        None,
        "a new window"
    );
    assert_eq!(
        s.prune_windows(10_999).await.unwrap(),
        0,
        "none started before"
    );
    assert_eq!(
        s.prune_windows(11_000).await.unwrap(),
        1,
        "the one that started before goes"
    );

    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    s.put_blob_part("build/b1/part", 2, &bytes).await.unwrap();
    s.put_blob_part("build/b1/part", 1, b"one").await.unwrap();
    s2.put_blob_part("build/b1/part", 1, b"first")
        .await
        .unwrap();
    s.put_blob_part("build/b10/part", 1, b"other build")
        .await
        .unwrap();
    assert_eq!(
        s2.blob_part("build/b1/part", 2).await.unwrap().as_deref(),
        Some(&bytes[..])
    );
    assert_eq!(
        s.blob_part("build/b1/part", 1).await.unwrap().as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(s.blob_part("build/b1/part", 3).await.unwrap(), None);
    assert_eq!(
        s.blob_parts("build/b1/part").await.unwrap(),
        vec![(1, 5), (2, 70_000)]
    );
    assert_eq!(s2.delete_blobs("build/b1").await.unwrap(), 2);
    assert!(s.blob_parts("build/b1/part").await.unwrap().is_empty());
    assert_eq!(
        s.blob_parts("build/b10/part").await.unwrap(),
        vec![(1, 11)],
        "a prefix is a path"
    );

    match s.hints() {
        None => assert!(!s.shared(), "a shared store carries hints"),
        Some(mut heard) => {
            assert!(s.shared());
            let first = tokio::time::timeout(std::time::Duration::from_secs(10), heard.recv())
                .await
                .expect("the listener connects");
            assert_eq!(
                first.as_deref(),
                Some(""),
                "a (re)connected listener says so"
            );
            // A Lodge on another schema of the same database is not heard (NOTIFY channels
            // are per database): its hint, sent first, is not what arrives.
            let elsewhere = PgSchema::new().await;
            let other: Arc<dyn Store> =
                Arc::new(PostgresStore::connect(&elsewhere.url()).await.unwrap());
            other.send_hint("another schema's").await.unwrap();
            // Another handle's hint arrives; a long one is cut to what NOTIFY takes.
            s2.send_hint("n1 p1").await.unwrap();
            s2.send_hint(&"x".repeat(10_000)).await.unwrap();
            let got = tokio::time::timeout(std::time::Duration::from_secs(10), heard.recv())
                .await
                .expect("the hint arrives");
            assert_eq!(got.as_deref(), Some("n1 p1"));
            let long = tokio::time::timeout(std::time::Duration::from_secs(10), heard.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(long.len(), lodge_store::MAX_HINT);
        }
    }
}

/// The fleet's records: nodes updated atomically (racing read-modify-writes lose nothing),
/// join tokens found only by the hash of their secret, fleets unique by name in an org.
async fn nodes_join_tokens_and_fleets(b: &dyn Backend) {
    let s = b.open().await;
    let mut n = Node::local("n1".into(), "h".into(), Some(vec![Region::Tokyo]), 1);
    n.remote = true;
    s.put_node(&n).await.unwrap();
    assert!(s.update_node("nope", &|_| true).await.unwrap().is_none());
    // 32 racing increments of one field, through two handles where the backend has them.
    let s2 = b.open().await;
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let store = if i % 2 == 0 { s.clone() } else { s2.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .update_node("n1", &|n| {
                    n.last_event_seq += 1;
                    true
                })
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = s.node("n1").await.unwrap().unwrap();
    assert_eq!(got.last_event_seq, 32, "no update lost");
    assert_eq!(
        (got.remote, got.regions.clone()),
        (true, Some(vec![Region::Tokyo]))
    );
    // Declining leaves it as it was.
    let same = s.update_node("n1", &|_| false).await.unwrap().unwrap();
    assert_eq!(same, got);

    let t = JoinToken {
        token_id: "join-1".into(),
        region: Region::Frankfurt,
        fleet_id: None,
        created_at: 1,
        expires_at: 2,
    };
    s.insert_join_token(&t, "hash-1").await.unwrap();
    assert_eq!(s.join_token_by_hash("hash-1").await.unwrap(), Some(t));
    assert_eq!(s.join_token_by_hash("join-1").await.unwrap(), None);

    let fleet = |id: &str, org: &str, name: &str| Fleet {
        fleet_id: id.into(),
        org_id: org.into(),
        name: name.into(),
        node_shape_id: "shape-amd64-4-8".into(),
        scale_up_threshold: 100,
        baselines: [(Region::London, 2)].into(),
        created_at: 1,
    };
    s.put_fleet(&fleet("f1", "o1", "ranked")).await.unwrap();
    s.put_fleet(&fleet("f2", "o1", "casual")).await.unwrap();
    s.put_fleet(&fleet("f1", "o2", "ranked")).await.unwrap();
    assert!(matches!(
        s.put_fleet(&fleet("f3", "o1", "ranked")).await,
        Err(StoreError::Duplicate(_))
    ));
    let mut renamed = fleet("f2", "o1", "weekend");
    renamed.scale_up_threshold = 50;
    s.put_fleet(&renamed).await.unwrap();
    let names: Vec<String> = s
        .fleets("o1")
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["ranked", "weekend"]);
    assert_eq!(s.fleets("o1").await.unwrap()[1], renamed);
    assert_eq!(s.fleets("o2").await.unwrap().len(), 1);
}

fn process(id: &str, cap: u32, allocated: u32) -> Process {
    Process {
        process_id: id.into(),
        app_id: "app".into(),
        deployment_id: "dep".into(),
        node_id: "node".into(),
        region: Region::London,
        status: ProcessStatus::Running,
        rooms_per_process: cap,
        rooms_allocated: allocated,
        exposed_ports: vec![],
        created_at: 1,
        scheduled_at: None,
        booted_at: None,
        started_at: None,
        stopping_at: None,
        terminated_at: None,
        summary_exit_reason: None,
        last_busy_at: 0,
        initial_room_id: None,
        initial_room_config: None,
        port_count: 1,
    }
}

fn room(id: &str, process_id: &str) -> Room {
    Room {
        room_id: id.into(),
        app_id: "app".into(),
        status: RoomStatus::Active,
        room_config: Some("cfg".into()),
        created_at: 5,
        allocations: vec![RoomAllocation {
            room_allocation_id: format!("alloc-{id}"),
            process_id: process_id.into(),
            scheduled_at: 5,
            unscheduled_at: None,
        }],
    }
}

fn app(id: &str, name: &str) -> App {
    App {
        app_id: id.into(),
        app_name: name.into(),
        app_secret: "s".into(),
        org_id: "o".into(),
        created_by: "x".into(),
        created_at: 0,
        deleted_at: None,
        deleted_by: None,
        auth_configuration: serde_json::json!({}),
        service_config: None,
    }
}

fn deployment(id: &str, created_at: Millis) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "deploymentId": id, "appId": "app", "buildId": "b1", "buildTag": null,
        "createdBy": "x", "createdAt": created_at, "idleTimeoutEnabled": true, "env": [],
        "roomsPerProcess": 4,
        "defaultContainerPort": {"name": "default", "port": 7777, "transportType": "udp"},
        "additionalContainerPorts": [], "requestedCPU": 0.5, "requestedMemoryMB": 1024.0,
        "requestedGPU": null, "deploymentTag": null, "fleetId": null
    }))
    .unwrap()
}

fn lobby(room_id: &str, by: &str, at: Millis, code: &str, region: Region) -> Lobby {
    Lobby {
        room_id: room_id.into(),
        app_id: "app".into(),
        region,
        visibility: LobbyVisibility::Public,
        short_code: Some(code.into()),
        created_by: by.into(),
        created_at: at,
        initial_config: None,
        state: None,
        room_config: None,
    }
}

async fn placement_is_conditional_and_durable(b: &dyn Backend) {
    {
        let s = b.open().await;
        s.place_room(
            &room("r1", "p1"),
            PlaceTarget::New(Box::new(process("p1", 2, 1)), None),
        )
        .await
        .unwrap();
        s.place_room(&room("r2", "p1"), PlaceTarget::Existing("p1".into()))
            .await
            .unwrap();
        // Full: the conditional update refuses.
        let e = s
            .place_room(&room("r3", "p1"), PlaceTarget::Existing("p1".into()))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
        // Room ids are unique.
        let e = s
            .place_room(
                &room("r1", "p2"),
                PlaceTarget::New(Box::new(process("p2", 2, 1)), None),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Duplicate(_)), "{e:?}");
        assert!(
            s.process("p2").await.unwrap().is_none(),
            "the failed placement left nothing behind"
        );
    }
    // Reopen: everything acknowledged is there.
    let s = b.open().await;
    let p = s.process("p1").await.unwrap().unwrap();
    assert_eq!(p.rooms_allocated, 2);
    assert_eq!(s.rooms_of_process("p1", true).await.unwrap().len(), 2);
    let r = s.room("r1").await.unwrap().unwrap();
    assert_eq!(r.room_config.as_deref(), Some("cfg"));
    assert_eq!(r.current_allocation().unwrap().process_id, "p1");
    assert!(s.room("nope").await.unwrap().is_none());

    // Destroying frees the slot and records history.
    let r = s
        .unallocate_room("r1", RoomStatus::Destroyed, 9)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, RoomStatus::Destroyed);
    assert!(r.current_allocation().is_none());
    assert_eq!(r.allocations[0].unscheduled_at, Some(9));
    let p = s.process("p1").await.unwrap().unwrap();
    assert_eq!(p.rooms_allocated, 1);
    assert_eq!(
        p.last_busy_at, 9,
        "freeing a slot marks the process busy then"
    );
    assert_eq!(
        s.rooms_of_process("p1", false).await.unwrap()[0].room_id,
        "r1"
    );
    assert!(s
        .unallocate_room("r1", RoomStatus::Destroyed, 10)
        .await
        .unwrap()
        .is_none());
    assert!(!s.update_room_config("r1", "late").await.unwrap());
    assert!(s.update_room_config("r2", "new").await.unwrap());
    assert_eq!(
        s.room("r2").await.unwrap().unwrap().room_config.as_deref(),
        Some("new")
    );

    // Suspend then resume onto the same process.
    s.unallocate_room("r2", RoomStatus::Suspended, 11)
        .await
        .unwrap()
        .unwrap();
    let mut resumed = s.room("r2").await.unwrap().unwrap();
    resumed.status = RoomStatus::Active;
    resumed.allocations.push(RoomAllocation {
        room_allocation_id: "again".into(),
        process_id: "p1".into(),
        scheduled_at: 12,
        unscheduled_at: None,
    });
    s.place_room(&resumed, PlaceTarget::Existing("p1".into()))
        .await
        .unwrap();
    let r2 = s.room("r2").await.unwrap().unwrap();
    assert_eq!(r2.allocations.len(), 2);
    assert_eq!(r2.current_allocation().unwrap().room_allocation_id, "again");
    // An active room cannot be placed again.
    let e = s
        .place_room(&resumed, PlaceTarget::Existing("p1".into()))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Duplicate(_)), "{e:?}");

    // A stop Lodge asked for keeps its reason, then how it went.
    s.update_process("p1", &|p| {
        p.status = ProcessStatus::Stopping;
        p.summary_exit_reason = Some("stopped by request".into());
        true
    })
    .await
    .unwrap()
    .unwrap();
    // Ending the process destroys its rooms atomically, once.
    let ended = s
        .end_process("p1", ProcessStatus::Stopped, 20, "exited with code 0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.destroyed_rooms, vec!["r2".to_string()]);
    assert_eq!(ended.process.rooms_allocated, 0);
    assert_eq!(
        ended.process.summary_exit_reason.as_deref(),
        Some("stopped by request (exited with code 0)")
    );
    assert!(s
        .end_process("p1", ProcessStatus::Failed, 21, "again")
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        s.room("r2").await.unwrap().unwrap().status,
        RoomStatus::Destroyed
    );
    // Terminal processes are not modified by update_process.
    let p = s.update_process("p1", &|p| {
        p.status = ProcessStatus::Running;
        true
    });
    assert_eq!(p.await.unwrap().unwrap().status, ProcessStatus::Stopped);
    assert!(s.update_process("nope", &|_| true).await.unwrap().is_none());
    let q = ProcessQuery {
        statuses: vec![ProcessStatus::Stopped],
        ..Default::default()
    };
    assert_eq!(s.count_processes(&q).await.unwrap(), 1);
}

async fn names_are_unique_among_live_entities(b: &dyn Backend) {
    let s = b.open().await;
    let a = app("a1", "game");
    s.insert_app(&a).await.unwrap();
    assert!(matches!(
        s.insert_app(&app("a2", "game")).await,
        Err(StoreError::Duplicate(_))
    ));
    let mut deleted = a.clone();
    deleted.deleted_at = Some(1);
    s.update_app(&deleted).await.unwrap();
    s.insert_app(&app("a2", "game")).await.unwrap();
    assert_eq!(s.apps("o").await.unwrap().len(), 1);
    assert_eq!(s.app("a1").await.unwrap().unwrap().deleted_at, Some(1));
    // Renaming onto a live name is refused too.
    s.insert_app(&app("a3", "other")).await.unwrap();
    assert!(matches!(
        s.update_app(&app("a3", "game")).await,
        Err(StoreError::Duplicate(_))
    ));
    let names: Vec<String> = s
        .apps("o")
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.app_id)
        .collect();
    assert_eq!(names, ["a2", "a3"], "in creation order");
}

async fn tokens_builds_and_deployments(b: &dyn Backend) {
    let s = b.open().await;
    for (id, name) in [("o1", "first"), ("o2", "second")] {
        s.put_org(&Org {
            org_id: id.into(),
            name: name.into(),
            created_at: 1,
        })
        .await
        .unwrap();
    }
    // Putting an org again changes nothing.
    s.put_org(&Org {
        org_id: "o1".into(),
        name: "renamed".into(),
        created_at: 2,
    })
    .await
    .unwrap();
    let orgs = s.orgs().await.unwrap();
    assert_eq!(orgs.len(), 2);
    assert_eq!(
        (orgs[0].org_id.as_str(), orgs[0].name.as_str()),
        ("o1", "first")
    );

    let token = |id: &str, name: &str| OrgToken {
        org_token_id: id.into(),
        org_id: "o1".into(),
        name: name.into(),
        status: OrgTokenStatus::Active,
        last_four_chars_of_key: "abcd".into(),
        created_at: 1,
        created_by: "x".into(),
        scopes: Some(serde_json::json!(["builds:read"])),
    };
    s.insert_token(&token("t1", "ci"), "h1").await.unwrap();
    assert!(matches!(
        s.insert_token(&token("t2", "ci"), "h2").await,
        Err(StoreError::Duplicate(_))
    ));
    let t = s.token_by_hash("h1").await.unwrap().unwrap();
    assert_eq!(t.scopes, Some(serde_json::json!(["builds:read"])));
    assert!(s.token_by_hash("h2").await.unwrap().is_none());
    assert!(
        s.revoke_token("o2", "t1").await.unwrap().is_none(),
        "another org's"
    );
    let revoked = s.revoke_token("o1", "t1").await.unwrap().unwrap();
    assert_eq!(revoked.status, OrgTokenStatus::Revoked);
    // A revoked token's name is free again; both stay listed.
    s.insert_token(&token("t2", "ci"), "h2").await.unwrap();
    let all = s.tokens("o1").await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].status, OrgTokenStatus::Revoked);

    let build = |id: &str, at: Millis| Build {
        build_id: id.into(),
        org_id: "o1".into(),
        created_by: "x".into(),
        created_at: at,
        status: BuildStatus::Created,
        image_size: 0,
        started_at: None,
        finished_at: None,
        deleted_at: None,
        build_tag: None,
        content_hash: None,
        upload: None,
        runner: None,
    };
    s.insert_build(&build("b1", 10)).await.unwrap();
    s.insert_build(&build("b2", 20)).await.unwrap();
    assert!(matches!(
        s.insert_build(&build("b1", 30)).await,
        Err(StoreError::Duplicate(_))
    ));
    let mut running = build("b1", 10);
    running.status = BuildStatus::Running;
    assert!(s
        .update_build_if(&running, BuildStatus::Created)
        .await
        .unwrap());
    assert!(
        !s.update_build_if(&running, BuildStatus::Created)
            .await
            .unwrap(),
        "the status moved on"
    );
    running.image_size = 42;
    s.update_build(&running).await.unwrap();
    assert_eq!(s.build("b1").await.unwrap().unwrap().image_size, 42);
    let ids: Vec<String> = s
        .builds("o1")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.build_id)
        .collect();
    assert_eq!(ids, ["b2", "b1"], "newest first");

    assert!(s.latest_deployment("app").await.unwrap().is_none());
    s.insert_deployment(&deployment("d1", 5)).await.unwrap();
    s.insert_deployment(&deployment("d2", 5)).await.unwrap();
    assert!(matches!(
        s.insert_deployment(&deployment("d1", 6)).await,
        Err(StoreError::Duplicate(_))
    ));
    assert_eq!(
        s.latest_deployment("app")
            .await
            .unwrap()
            .unwrap()
            .deployment_id,
        "d2"
    );
    assert_eq!(
        s.deployment("d1").await.unwrap().unwrap().rooms_per_process,
        4
    );
    let ids: Vec<String> = s
        .deployments("app")
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.deployment_id)
        .collect();
    assert_eq!(ids, ["d2", "d1"]);
}

async fn process_queries_filter_and_order(b: &dyn Backend) {
    let s = b.open().await;
    let node = |id: &str| Node {
        port_capacity: Some(10),
        ..Node::local(id.into(), format!("{id}.example"), None, 1)
    };
    s.put_node(&node("n2")).await.unwrap();
    s.put_node(&node("n1")).await.unwrap();
    let mut again = node("n1");
    again.public_host = "moved.example".into();
    s.put_node(&again).await.unwrap();
    let nodes = s.nodes().await.unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0].public_host, "moved.example");

    // Four processes: fullness and status decide placement order.
    let mut specs = vec![
        ("pa", ProcessStatus::Running, 4, 1, 10, "n1"),
        ("pb", ProcessStatus::Running, 4, 3, 20, "n1"),
        ("pc", ProcessStatus::Starting, 4, 3, 5, "n2"),
        ("pd", ProcessStatus::Running, 4, 4, 1, "n2"),
        ("pe", ProcessStatus::Stopped, 4, 0, 2, "n2"),
    ];
    for (id, status, cap, alloc, at, node) in specs.drain(..) {
        let mut p = process(id, cap, alloc);
        p.status = status;
        p.created_at = at;
        p.node_id = node.into();
        p.port_count = 2;
        s.insert_process(&p, None).await.unwrap();
    }
    assert!(matches!(
        s.insert_process(&process("pa", 1, 0), None).await,
        Err(StoreError::Duplicate(_))
    ));
    let ids = |ps: Vec<Process>| ps.into_iter().map(|p| p.process_id).collect::<Vec<_>>();
    let free = ProcessQuery {
        deployment_id: Some("dep".into()),
        regions: vec![Region::London],
        statuses: ProcessStatus::PLACEABLE.to_vec(),
        with_free_slot: true,
        limit: Some(8),
        ..Default::default()
    };
    assert_eq!(
        ids(s.processes(&free).await.unwrap()),
        ["pb", "pa", "pc"],
        "running before starting, fullest first"
    );
    let limited = ProcessQuery {
        limit: Some(1),
        ..free.clone()
    };
    assert_eq!(ids(s.processes(&limited).await.unwrap()), ["pb"]);
    let elsewhere = ProcessQuery {
        regions: vec![Region::Tokyo],
        ..free.clone()
    };
    assert!(s.processes(&elsewhere).await.unwrap().is_empty());
    assert_eq!(
        ids(s.processes(&ProcessQuery::default()).await.unwrap()),
        ["pb", "pa", "pc", "pe", "pd"],
        "newest first"
    );
    let q = ProcessQuery {
        node_id: Some("n2".into()),
        created_before: Some(5),
        ..Default::default()
    };
    assert_eq!(ids(s.processes(&q).await.unwrap()), ["pe", "pd"]);
    assert_eq!(s.count_processes(&q).await.unwrap(), 2);
    let q = ProcessQuery {
        app_id: Some("other".into()),
        ..Default::default()
    };
    assert_eq!(s.count_processes(&q).await.unwrap(), 0);
    let mut usage: Vec<(String, u32, u32)> = s
        .node_usage()
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.node_id, u.live_processes, u.ports))
        .collect();
    usage.sort();
    assert_eq!(
        usage,
        [("n1".to_string(), 2, 4), ("n2".to_string(), 2, 4)],
        "live processes and their ports per node"
    );
}

async fn lobbies_and_their_limits(b: &dyn Backend) {
    let s = b.open().await;
    let place = |id: &str| room(id, "p1");
    s.insert_process(&process("p1", 100, 0), None)
        .await
        .unwrap();
    // Two per player in the window.
    for (i, id) in ["l1", "l2"].iter().enumerate() {
        let l = lobby(id, "alice", 100 + i as Millis, "CODE", Region::London);
        assert_eq!(s.reserve_lobby(&l, 50, 2).await.unwrap(), None);
        s.place_room(&place(id), PlaceTarget::Existing("p1".into()))
            .await
            .unwrap();
    }
    let third = lobby("l3", "alice", 110, "X", Region::London);
    assert_eq!(
        s.reserve_lobby(&third, 50, 2).await.unwrap(),
        Some(100),
        "refused, with the oldest in the window"
    );
    assert_eq!(
        s.reserve_lobby(&third, 100, 2).await.unwrap(),
        None,
        "window moved"
    );
    assert!(
        s.lobby("l3").await.unwrap().is_none(),
        "a lobby whose room was never created is not shown"
    );
    s.delete_lobby("l3").await.unwrap();
    // Taken room ids.
    for taken in ["l1"] {
        let l = lobby(taken, "bob", 120, "Y", Region::London);
        assert!(matches!(
            s.reserve_lobby(&l, 0, 10).await,
            Err(StoreError::Duplicate(_))
        ));
    }
    s.place_room(&place("plain"), PlaceTarget::Existing("p1".into()))
        .await
        .unwrap();
    assert!(matches!(
        s.reserve_lobby(&lobby("plain", "bob", 120, "Z", Region::London), 0, 10)
            .await,
        Err(StoreError::Duplicate(_))
    ));
    let tokyo = lobby("l4", "bob", 130, "CODE", Region::Tokyo);
    s.reserve_lobby(&tokyo, 0, 10).await.unwrap();
    s.place_room(&place("l4"), PlaceTarget::Existing("p1".into()))
        .await
        .unwrap();

    let (l, status) = s.lobby_by_short_code("app", "CODE").await.unwrap().unwrap();
    assert_eq!(
        (l.room_id.as_str(), status),
        ("l4", RoomStatus::Active),
        "newest"
    );
    assert_eq!(l.room_config.as_deref(), Some("cfg"), "the room's config");
    let ids = |ls: Vec<Lobby>| ls.into_iter().map(|l| l.room_id).collect::<Vec<_>>();
    assert_eq!(
        ids(s
            .lobbies("app", LobbyVisibility::Public, None)
            .await
            .unwrap()),
        ["l4", "l2", "l1"]
    );
    assert_eq!(
        ids(s
            .lobbies("app", LobbyVisibility::Public, Some(Region::London))
            .await
            .unwrap()),
        ["l2", "l1"]
    );
    assert!(s
        .lobbies("app", LobbyVisibility::Private, None)
        .await
        .unwrap()
        .is_empty());
    let state = serde_json::json!({"round": 3});
    let l = s.set_lobby_state("l1", &state).await.unwrap().unwrap();
    assert_eq!(l.state, Some(state.clone()));
    assert_eq!(s.lobby("l1").await.unwrap().unwrap().0.state, Some(state));
    assert!(s
        .set_lobby_state("nope", &serde_json::json!(1))
        .await
        .unwrap()
        .is_none());
    // A destroyed room's lobby leaves the listings and the short code.
    s.unallocate_room("l4", RoomStatus::Destroyed, 200)
        .await
        .unwrap();
    let (l, _) = s.lobby_by_short_code("app", "CODE").await.unwrap().unwrap();
    assert_eq!(l.room_id, "l2");
    assert_eq!(
        s.lobby("l4").await.unwrap().unwrap().1,
        RoomStatus::Destroyed
    );
}

async fn legacy_numbers_are_issued_once(b: &dyn Backend) {
    let (s1, s2) = (b.open().await, b.open().await);
    let mut tasks = tokio::task::JoinSet::new();
    // 40 ids, each asked for twice, through two handles at once.
    for i in 0..80 {
        let s = if i % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.spawn(async move {
            let id = format!("id{}", i % 40);
            (
                id.clone(),
                s.legacy_number("app", "room", &id).await.unwrap(),
            )
        });
    }
    let mut by_id: HashMap<String, i64> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let (id, n) = r.unwrap();
        if let Some(prev) = by_id.insert(id.clone(), n) {
            assert_eq!(prev, n, "{id} got two numbers");
        }
    }
    let numbers: HashSet<i64> = by_id.values().copied().collect();
    assert_eq!(numbers, (1..=40).collect(), "1..=40, none twice");
    assert_eq!(
        s1.legacy_number("app", "lobby", "id0").await.unwrap(),
        1,
        "per kind"
    );
    assert_eq!(
        s1.legacy_number("other", "room", "id0").await.unwrap(),
        1,
        "per scope"
    );
    let n = by_id["id7"];
    assert_eq!(
        s2.legacy_id("app", "room", n).await.unwrap().as_deref(),
        Some("id7")
    );
    assert!(s2.legacy_id("app", "room", 41).await.unwrap().is_none());
    let entries = s2.legacy_entries("app", "room").await.unwrap();
    assert_eq!(entries.len(), 40);
    assert_eq!(entries[0].0, 40, "highest first");
}

async fn racing_new_processes_never_pass_the_app_limit(b: &dyn Backend) {
    let (s1, s2) = (b.open().await, b.open().await);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let store = if i % 3 == 0 { s2.clone() } else { s1.clone() };
        tasks.push(tokio::spawn(async move {
            let p = process(&format!("p{i}"), 1, 1);
            if i % 2 == 0 {
                store.insert_process(&p, Some(5)).await
            } else {
                store
                    .place_room(
                        &room(&format!("r{i}"), &p.process_id),
                        PlaceTarget::New(Box::new(p), Some(5)),
                    )
                    .await
            }
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(StoreError::Limit(m)) => {
                assert!(m.contains("5 live processes"), "{m}");
                limited += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, limited), (5, 19));
    let live = s1
        .count_processes(&ProcessQuery {
            app_id: Some("app".into()),
            statuses: ProcessStatus::LIVE.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(live, 5);
}

async fn racing_placements_never_overfill_a_process(b: &dyn Backend) {
    let (s1, s2) = (b.open().await, b.open().await);
    s1.insert_process(&process("p", 10, 0), None).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let s = if i % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.spawn(async move {
            s.place_room(
                &room(&format!("r{i}"), "p"),
                PlaceTarget::Existing("p".into()),
            )
            .await
            .map(|()| format!("r{i}"))
        });
    }
    let mut placed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(id) => placed.push(id),
            Err(StoreError::Conflict(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(placed.len(), 10, "exactly roomsPerProcess rooms won");
    assert_eq!(s2.process("p").await.unwrap().unwrap().rooms_allocated, 10);
    let mut on: Vec<String> = s1
        .rooms_of_process("p", true)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.room_id)
        .collect();
    on.sort();
    placed.sort();
    assert_eq!(on, placed, "every acknowledged room is there, no other");
}

async fn racing_updates_lose_nothing(b: &dyn Backend) {
    let (s1, s2) = (b.open().await, b.open().await);
    s1.insert_process(&process("p", 10, 0), None).await.unwrap();
    // Read-modify-write from 32 tasks on two handles, interleaved with placements that change
    // the same row: every increment lands.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32 {
        let s = if i % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.spawn(async move {
            if i % 4 == 0 {
                s.place_room(
                    &room(&format!("r{i}"), "p"),
                    PlaceTarget::Existing("p".into()),
                )
                .await
                .unwrap();
            }
            loop {
                match s
                    .update_process("p", &|p| {
                        p.booted_at = Some(p.booted_at.unwrap_or(0) + 1);
                        true
                    })
                    .await
                {
                    Ok(p) => break p.unwrap(),
                    Err(StoreError::Conflict(_)) => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let p = s2.process("p").await.unwrap().unwrap();
    assert_eq!(p.booted_at, Some(32), "no update lost");
    assert_eq!(p.rooms_allocated, 8, "no placement undone by an update");
}

async fn ending_a_process_races_placement_cleanly(b: &dyn Backend) {
    let (s1, s2) = (b.open().await, b.open().await);
    s1.insert_process(&process("p", 1000, 0), None)
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.spawn(async move {
            if i == 20 {
                let ended = s
                    .end_process("p", ProcessStatus::Stopped, 50, "exited")
                    .await
                    .unwrap()
                    .unwrap();
                return Some(ended.destroyed_rooms);
            }
            match s
                .place_room(
                    &room(&format!("r{i}"), "p"),
                    PlaceTarget::Existing("p".into()),
                )
                .await
            {
                Ok(()) | Err(StoreError::Conflict(_)) => None,
                Err(e) => panic!("{e}"),
            }
        });
    }
    let mut destroyed = None;
    while let Some(r) = tasks.join_next().await {
        if let Some(d) = r.unwrap() {
            destroyed = Some(d);
        }
    }
    let destroyed = destroyed.unwrap();
    let p = s1.process("p").await.unwrap().unwrap();
    assert_eq!((p.status, p.rooms_allocated), (ProcessStatus::Stopped, 0));
    assert!(s1.rooms_of_process("p", true).await.unwrap().is_empty());
    // Every room that was placed before the end was destroyed by it; none placed after.
    for id in &destroyed {
        let r = s2.room(id).await.unwrap().unwrap();
        assert_eq!(r.status, RoomStatus::Destroyed);
        assert_eq!(r.allocations[0].unscheduled_at, Some(50));
    }
    for i in (0..40).filter(|i| *i != 20) {
        if let Some(r) = s2.room(&format!("r{i}")).await.unwrap() {
            assert!(
                destroyed.contains(&r.room_id),
                "{} outlived its process",
                r.room_id
            );
        }
    }
}

async fn churn_keeps_counts_exact(b: &dyn Backend) {
    let (s1, s2) = (b.open().await, b.open().await);
    for p in ["p1", "p2"] {
        s1.insert_process(&process(p, 3, 0), None).await.unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let s = if w % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.spawn(async move {
            let mut held: Option<String> = None;
            for i in 0..20 {
                if let Some(id) = held.take() {
                    s.unallocate_room(&id, RoomStatus::Destroyed, i)
                        .await
                        .unwrap()
                        .unwrap();
                    continue;
                }
                let id = format!("w{w}-{i}");
                let target = if (w + i) % 2 == 0 { "p1" } else { "p2" };
                match s
                    .place_room(&room(&id, target), PlaceTarget::Existing(target.into()))
                    .await
                {
                    Ok(()) => held = Some(id),
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                // Check the invariant while it runs.
                let p = s.process(target).await.unwrap().unwrap();
                assert!(
                    p.rooms_allocated <= 3,
                    "{target} over capacity: {}",
                    p.rooms_allocated
                );
            }
            held
        });
    }
    let mut still: Vec<String> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        still.extend(r.unwrap());
    }
    for p in ["p1", "p2"] {
        let proc_ = s1.process(p).await.unwrap().unwrap();
        let active = s2.rooms_of_process(p, true).await.unwrap();
        assert_eq!(
            proc_.rooms_allocated as usize,
            active.len(),
            "{p}: count matches rooms"
        );
        assert!(active.iter().all(|r| still.contains(&r.room_id)));
    }
    let total: usize = [
        s1.rooms_of_process("p1", true).await.unwrap().len(),
        s1.rooms_of_process("p2", true).await.unwrap().len(),
    ]
    .iter()
    .sum();
    assert_eq!(total, still.len(), "no acknowledged room lost");
}

async fn ending_a_process_races_its_rooms_ending(b: &dyn Backend) {
    // StopProcess frees a process's rooms while the node reports it ended: both touch the
    // process and its rooms, from two handles, and neither may fail (no deadlock).
    let (s1, s2) = (b.open().await, b.open().await);
    for round in 0..5 {
        let pid = format!("p{round}");
        s1.insert_process(&process(&pid, 50, 0), None)
            .await
            .unwrap();
        for i in 0..20 {
            s1.place_room(
                &room(&format!("{pid}-r{i}"), &pid),
                PlaceTarget::Existing(pid.clone()),
            )
            .await
            .unwrap();
        }
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..20 {
            let (s, id) = (s2.clone(), format!("{pid}-r{i}"));
            tasks.spawn(async move {
                s.unallocate_room(&id, RoomStatus::Destroyed, 60)
                    .await
                    .map(|_| ())
            });
            if i == 10 {
                let (s, pid) = (s1.clone(), pid.clone());
                tasks.spawn(async move {
                    s.end_process(&pid, ProcessStatus::Stopped, 61, "exited")
                        .await
                        .map(|_| ())
                });
            }
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        let p = s1.process(&pid).await.unwrap().unwrap();
        assert_eq!((p.status, p.rooms_allocated), (ProcessStatus::Stopped, 0));
        for i in 0..20 {
            let r = s2.room(&format!("{pid}-r{i}")).await.unwrap().unwrap();
            assert_eq!(r.status, RoomStatus::Destroyed);
            assert!(r.allocations[0].unscheduled_at.is_some());
        }
    }
}

async fn documents_keep_any_text(b: &dyn Backend) {
    // What users send is kept as sent, NUL characters and lone surrogates' replacements too
    // (PostgreSQL's jsonb would refuse a NUL; the schemathesis run found it).
    let s = b.open().await;
    let odd = "a\u{0}b\u{1f}\u{ffff}\u{10ffff}\"'\\";
    let mut a = app("a1", "game");
    a.auth_configuration = serde_json::json!({ odd: [odd, 1e300, null] });
    a.service_config = Some(serde_json::json!({ "k": odd }));
    s.insert_app(&a).await.unwrap();
    assert_eq!(s.app("a1").await.unwrap().unwrap(), a);
    let mut r = room("r1", "p1");
    r.room_config = Some(odd.to_string());
    let mut p = process("p1", 2, 1);
    p.initial_room_config = Some(odd.to_string());
    s.place_room(&r, PlaceTarget::New(Box::new(p), None))
        .await
        .unwrap();
    assert_eq!(
        s.room("r1").await.unwrap().unwrap().room_config.as_deref(),
        Some(odd)
    );
    assert_eq!(
        s.process("p1")
            .await
            .unwrap()
            .unwrap()
            .initial_room_config
            .as_deref(),
        Some(odd)
    );
    let config = format!("{odd}{odd}");
    assert!(s.update_room_config("r1", &config).await.unwrap());
    assert_eq!(
        s.room("r1").await.unwrap().unwrap().room_config.as_deref(),
        Some(config.as_str())
    );
}

/// A one-box Lodge's state, moved into PostgreSQL, reads back the same through the trait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_copies_a_one_box_store_into_postgres() {
    let dir = TempDir::new("migrate");
    let db = dir.0.join("lodge.db");
    {
        let s = SqliteStore::open(&db).unwrap();
        s.put_org(&Org {
            org_id: "o".into(),
            name: "org".into(),
            created_at: 1,
        })
        .await
        .unwrap();
        let token = OrgToken {
            org_token_id: "t1".into(),
            org_id: "o".into(),
            name: "ci".into(),
            status: OrgTokenStatus::Active,
            last_four_chars_of_key: "abcd".into(),
            created_at: 1,
            created_by: "x".into(),
            scopes: None,
        };
        s.insert_token(&token, "hash").await.unwrap();
        s.insert_app(&app("app", "game")).await.unwrap();
        let mut gone = app("old", "gone");
        gone.deleted_at = Some(3);
        s.insert_app(&gone).await.unwrap();
        s.update_app(&gone).await.unwrap();
        s.insert_deployment(&deployment("d1", 1)).await.unwrap();
        s.insert_deployment(&deployment("d2", 2)).await.unwrap();
        s.reserve_lobby(&lobby("r1", "alice", 10, "CODE", Region::London), 0, 5)
            .await
            .unwrap();
        s.place_room(
            &room("r1", "p1"),
            PlaceTarget::New(Box::new(process("p1", 4, 1)), None),
        )
        .await
        .unwrap();
        s.place_room(&room("r2", "p1"), PlaceTarget::Existing("p1".into()))
            .await
            .unwrap();
        s.unallocate_room("r2", RoomStatus::Destroyed, 7)
            .await
            .unwrap();
        s.legacy_number("app", "room", "r1").await.unwrap();
        s.legacy_number("app", "room", "r2").await.unwrap();
    }
    let schema = PgSchema::new().await;
    let report = lodge_store::sqlite_into_postgres(&db, &schema.url())
        .await
        .unwrap();
    let rows: HashMap<&str, u64> = report.into_iter().collect();
    assert_eq!(
        (
            rows["orgs"],
            rows["apps"],
            rows["processes"],
            rows["rooms"],
            rows["allocations"]
        ),
        (1, 2, 1, 2, 2)
    );
    let (a, b): (Arc<dyn Store>, Arc<dyn Store>) = (
        Arc::new(SqliteStore::open(&db).unwrap()),
        Arc::new(PostgresStore::connect(&schema.url()).await.unwrap()),
    );
    assert_eq!(a.orgs().await.unwrap(), b.orgs().await.unwrap());
    assert_eq!(
        a.token_by_hash("hash").await.unwrap(),
        b.token_by_hash("hash").await.unwrap()
    );
    assert_eq!(a.apps("o").await.unwrap(), b.apps("o").await.unwrap());
    assert_eq!(a.app("old").await.unwrap(), b.app("old").await.unwrap());
    assert_eq!(
        a.deployments("app").await.unwrap(),
        b.deployments("app").await.unwrap()
    );
    assert_eq!(
        format!("{:?}", a.processes(&ProcessQuery::default()).await.unwrap()),
        format!("{:?}", b.processes(&ProcessQuery::default()).await.unwrap())
    );
    for r in ["r1", "r2"] {
        assert_eq!(
            format!("{:?}", a.room(r).await.unwrap()),
            format!("{:?}", b.room(r).await.unwrap())
        );
    }
    assert_eq!(
        format!("{:?}", a.lobby("r1").await.unwrap()),
        format!("{:?}", b.lobby("r1").await.unwrap())
    );
    assert_eq!(
        a.legacy_entries("app", "room").await.unwrap(),
        b.legacy_entries("app", "room").await.unwrap()
    );
    // The copy goes on where the original left off: the next legacy number, the free slot.
    assert_eq!(b.legacy_number("app", "room", "r3").await.unwrap(), 3);
    b.place_room(&room("r3", "p1"), PlaceTarget::Existing("p1".into()))
        .await
        .unwrap();
    assert_eq!(b.process("p1").await.unwrap().unwrap().rooms_allocated, 2);
    // A database that already holds anything is refused.
    let again = lodge_store::sqlite_into_postgres(&db, &schema.url()).await;
    assert!(
        matches!(again, Err(StoreError::Conflict(ref m)) if m.contains("not empty")),
        "{again:?}"
    );

    // `lodge migrate` refuses a data dir a Lodge is serving from (it holds the lock).
    let held = std::fs::File::create(dir.0.join("serve.lock")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let fresh = PgSchema::new().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lodge"))
        .args(["migrate", "--from"])
        .arg(&dir.0)
        .args(["--to", &fresh.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another lodge is using"), "{err}");
    drop(held);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lodge"))
        .args(["migrate", "--from"])
        .arg(&dir.0)
        .args(["--to", &fresh.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rooms        2"));
}

/// The embedded store checkpoints its WAL (on a thread of its own; the writer never does):
/// the WAL is reused after each checkpoint, so writes in rounds leave it about one round long
/// rather than as long as all of them together, which is what a store that never checkpoints
/// leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_wal_is_checkpointed() {
    let dir = TempDir::new("wal");
    let store = SqliteStore::open(&dir.0.join("lodge.db")).unwrap();
    let wal = dir.0.join("lodge.db-wal");
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 500;
    let mut sizes = Vec::new();
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            let org = Org {
                org_id: format!("org-{round}-{i}"),
                name: format!("org {round} {i}"),
                created_at: 0,
            };
            store.put_org(&org).await.unwrap();
        }
        // The file's length is its high-water mark: a reused WAL does not grow.
        sizes.push(std::fs::metadata(&wal).unwrap().len());
        // Longer than the checkpointer's pace (one per 200 ms at most).
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    }
    let (first, last) = (sizes[0], sizes[ROUNDS - 1]);
    assert!(
        last < 2 * first,
        "the WAL grew round after round ({sizes:?} bytes): it is not checkpointed"
    );
    assert_eq!(store.orgs().await.unwrap().len(), ROUNDS * PER_ROUND);
}
