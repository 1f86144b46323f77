//! The store contract, on SQLite (file-backed, so reopening proves durability).

use lodge_model::*;
use lodge_store::{PlaceTarget, ProcessQuery, SqliteStore, Store, StoreError};

use crate::TempDir;

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

#[tokio::test]
async fn placement_is_conditional_and_durable() {
    let dir = TempDir::new("store");
    let path = dir.0.join("lodge.db");
    {
        let s = SqliteStore::open(&path).unwrap();
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
    let s = SqliteStore::open(&path).unwrap();
    let p = s.process("p1").await.unwrap().unwrap();
    assert_eq!(p.rooms_allocated, 2);
    assert_eq!(s.rooms_of_process("p1", true).await.unwrap().len(), 2);
    let r = s.room("r1").await.unwrap().unwrap();
    assert_eq!(r.room_config.as_deref(), Some("cfg"));
    assert_eq!(r.current_allocation().unwrap().process_id, "p1");

    // Destroying frees the slot and records history.
    let r = s
        .unallocate_room("r1", RoomStatus::Destroyed, 9)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, RoomStatus::Destroyed);
    assert!(r.current_allocation().is_none());
    assert_eq!(r.allocations[0].unscheduled_at, Some(9));
    assert_eq!(s.process("p1").await.unwrap().unwrap().rooms_allocated, 1);
    assert_eq!(
        s.rooms_of_process("p1", false).await.unwrap()[0].room_id,
        "r1"
    );
    assert!(s
        .unallocate_room("r1", RoomStatus::Destroyed, 10)
        .await
        .unwrap()
        .is_none());

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

    // Ending the process destroys its rooms atomically, once.
    let ended = s
        .end_process("p1", ProcessStatus::Stopped, 20, "exited with code 0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.destroyed_rooms, vec!["r2".to_string()]);
    assert_eq!(ended.process.rooms_allocated, 0);
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
    let q = ProcessQuery {
        statuses: vec![ProcessStatus::Stopped],
        ..Default::default()
    };
    assert_eq!(s.count_processes(&q).await.unwrap(), 1);
}

#[tokio::test]
async fn names_are_unique_among_live_entities() {
    let s = SqliteStore::in_memory().unwrap();
    let app = App {
        app_id: "a1".into(),
        app_name: "game".into(),
        app_secret: "s".into(),
        org_id: "o".into(),
        created_by: "x".into(),
        created_at: 0,
        deleted_at: None,
        deleted_by: None,
        auth_configuration: serde_json::json!({}),
        service_config: None,
    };
    s.insert_app(&app).await.unwrap();
    let mut twin = app.clone();
    twin.app_id = "a2".into();
    assert!(matches!(
        s.insert_app(&twin).await,
        Err(StoreError::Duplicate(_))
    ));
    let mut deleted = app.clone();
    deleted.deleted_at = Some(1);
    s.update_app(&deleted).await.unwrap();
    s.insert_app(&twin).await.unwrap();
    assert_eq!(s.apps("o").await.unwrap().len(), 1);
}

#[tokio::test]
async fn racing_new_processes_never_pass_the_app_limit() {
    let dir = TempDir::new("store-limit");
    let store = std::sync::Arc::new(SqliteStore::open(&dir.0.join("db")).unwrap());
    let mut tasks = Vec::new();
    for i in 0..24 {
        let store = store.clone();
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
    let live = store
        .count_processes(&ProcessQuery {
            app_id: Some("app".into()),
            statuses: ProcessStatus::LIVE.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(live, 5);
}
