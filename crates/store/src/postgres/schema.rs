//! The PostgreSQL store's schema: forward-only migrations, numbered by their place in the list
//! and recorded in `lodge_schema`. They run at start inside one transaction under a
//! transaction-level advisory lock, so replicas that start together apply each exactly once
//! (the others wait, then find nothing to do).

use tokio_postgres::Client;

use super::pg;
use crate::Result;

/// An arbitrary constant: the advisory lock key under which migrations run.
const MIGRATION_LOCK: i64 = 0x6c6f_6467_6501;

/// Documents are JSON text, as in the embedded store: `jsonb` refuses a NUL character
/// (`\u0000`), which users' configs may hold. What a query filters or updates on its own has
/// a column of its own.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE orgs (seq BIGSERIAL NOT NULL, org_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE tokens (
    seq BIGSERIAL NOT NULL,
    org_token_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    name TEXT NOT NULL,
    active BOOLEAN NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);
CREATE UNIQUE INDEX tokens_active_name ON tokens (org_id, name) WHERE active;
CREATE TABLE apps (
    seq BIGSERIAL NOT NULL,
    app_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    app_name TEXT NOT NULL,
    deleted BOOLEAN NOT NULL,
    doc TEXT NOT NULL
);
CREATE UNIQUE INDEX apps_live_name ON apps (org_id, app_name) WHERE NOT deleted;
CREATE TABLE builds (
    seq BIGSERIAL NOT NULL,
    build_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    status TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX builds_org ON builds (org_id, created_at);
CREATE TABLE deployments (
    seq BIGSERIAL PRIMARY KEY,
    deployment_id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX deployments_app ON deployments (app_id, seq);
CREATE TABLE nodes (node_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE processes (
    seq BIGSERIAL PRIMARY KEY,
    process_id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    deployment_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    region TEXT NOT NULL,
    status TEXT NOT NULL,
    rooms_per_process INTEGER NOT NULL,
    rooms_allocated INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    port_count INTEGER NOT NULL,
    last_busy_at BIGINT NOT NULL,
    doc TEXT NOT NULL,
    CONSTRAINT rooms_within_capacity CHECK (rooms_allocated >= 0 AND rooms_allocated <= rooms_per_process)
) WITH (fillfactor = 50);
CREATE INDEX processes_app ON processes (app_id, created_at);
-- No index names rooms_allocated (not even in a predicate), and pages keep room to spare:
-- taking and freeing a slot, the hottest update there is, stays a heap-only (HOT) update
-- that leaves no index entries and no dead versions for the next one to wade through.
CREATE INDEX processes_place ON processes (deployment_id, region, status);
CREATE INDEX processes_node ON processes (node_id, status, port_count);
CREATE TABLE rooms (
    room_id TEXT PRIMARY KEY,
    seq BIGSERIAL NOT NULL,
    app_id TEXT NOT NULL,
    status TEXT NOT NULL,
    process_id TEXT,
    doc TEXT NOT NULL
);
CREATE INDEX rooms_process ON rooms (process_id);
CREATE TABLE allocations (
    room_allocation_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    process_id TEXT NOT NULL,
    scheduled_at BIGINT NOT NULL,
    unscheduled_at BIGINT,
    seq INTEGER NOT NULL,
    UNIQUE (room_id, seq)
);
CREATE INDEX allocations_process ON allocations (process_id, unscheduled_at);
CREATE UNIQUE INDEX allocations_one_current ON allocations (room_id) WHERE unscheduled_at IS NULL;
CREATE TABLE lobbies (
    seq BIGSERIAL NOT NULL,
    room_id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    short_code TEXT,
    visibility TEXT NOT NULL,
    region TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX lobbies_short_code ON lobbies (app_id, short_code, created_at);
CREATE INDEX lobbies_creator ON lobbies (app_id, created_by, created_at);
CREATE INDEX lobbies_listing ON lobbies (app_id, visibility, created_at);
CREATE TABLE legacy_ids (
    scope TEXT NOT NULL,
    kind TEXT NOT NULL,
    num BIGINT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (scope, kind, num),
    UNIQUE (scope, kind, id)
);

-- A room onto a process, or resumed there: the room row and its allocation, 'ok', or 'taken'
-- (the id belongs to another room that is not suspended) with nothing written. The process's
-- count is its caller's: the transaction inserting a new process, or `lodge_batch`.
CREATE FUNCTION lodge_place_room(p_room TEXT, p_app TEXT, p_status TEXT, p_process TEXT,
                                 p_doc TEXT, p_alloc TEXT, p_at BIGINT)
RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    n_seq INTEGER := 0;
BEGIN
    INSERT INTO rooms (room_id, app_id, status, process_id, doc)
    VALUES (p_room, p_app, p_status, p_process, p_doc)
    ON CONFLICT (room_id) DO NOTHING;
    IF NOT FOUND THEN
        UPDATE rooms SET status = p_status, process_id = p_process
        WHERE room_id = p_room AND app_id = p_app AND process_id IS NULL AND status = 'suspended';
        IF NOT FOUND THEN
            RETURN 'taken';
        END IF;
        SELECT COUNT(*) INTO n_seq FROM allocations WHERE room_id = p_room;
    END IF;
    INSERT INTO allocations (room_allocation_id, room_id, process_id, scheduled_at, unscheduled_at, seq)
    VALUES (p_alloc, p_room, p_process, p_at, NULL, n_seq);
    RETURN 'ok';
END $$;

-- Group commit: every placement into an existing process and every freed room a replica has
-- waiting, in one call and one commit, so a busy process's row is locked, updated and flushed
-- once per batch instead of once per room. Rooms to free are locked first (in id order), then
-- every process involved (in id order). Frees come first, so their slots serve the
-- placements after them; each process's count moves once, by the batch's total.
CREATE FUNCTION lodge_batch(
    f_room TEXT[], f_status TEXT[], f_at BIGINT[],
    p_room TEXT[], p_app TEXT[], p_status TEXT[], p_process TEXT[], p_doc TEXT[], p_alloc TEXT[],
    p_at BIGINT[],
    OUT freed BOOLEAN[], OUT placed TEXT[])
LANGUAGE plpgsql AS $$
DECLARE
    i INTEGER;
    j INTEGER;
    outcome TEXT;
    cur TEXT;
    pid TEXT;
    free_slots INTEGER;
    placeable BOOLEAN;
    dec_pid TEXT[] := '{}';
    dec_at BIGINT[] := '{}';
    seen_pid TEXT[] := '{}';
    seen_free INTEGER[] := '{}';
    seen_n INTEGER[] := '{}';
    seen_at BIGINT[] := '{}';
BEGIN
    freed := '{}';
    placed := '{}';
    PERFORM 1 FROM rooms WHERE room_id = ANY(f_room) ORDER BY room_id FOR UPDATE;
    PERFORM 1 FROM processes
    WHERE process_id = ANY(p_process)
       OR process_id IN (SELECT r.process_id FROM rooms r WHERE r.room_id = ANY(f_room))
    ORDER BY process_id FOR UPDATE;

    FOR i IN 1..COALESCE(array_length(f_room, 1), 0) LOOP
        SELECT status, process_id INTO cur, pid FROM rooms WHERE room_id = f_room[i];
        IF NOT FOUND OR cur = f_status[i] OR cur = 'destroyed' THEN
            freed := freed || FALSE;
            CONTINUE;
        END IF;
        IF pid IS NOT NULL THEN
            UPDATE allocations SET unscheduled_at = f_at[i]
            WHERE room_id = f_room[i] AND process_id = pid AND unscheduled_at IS NULL;
            dec_pid := dec_pid || pid;
            dec_at := dec_at || f_at[i];
        END IF;
        UPDATE rooms SET status = f_status[i], process_id = NULL WHERE room_id = f_room[i];
        freed := freed || TRUE;
    END LOOP;
    UPDATE processes p SET rooms_allocated = GREATEST(p.rooms_allocated - d.n, 0), last_busy_at = d.at
    FROM (SELECT u.pid, COUNT(*)::INTEGER AS n, MAX(u.at) AS at
          FROM unnest(dec_pid, dec_at) AS u(pid, at) GROUP BY u.pid) d
    WHERE p.process_id = d.pid;

    FOR i IN 1..COALESCE(array_length(p_room, 1), 0) LOOP
        j := array_position(seen_pid, p_process[i]);
        IF j IS NULL THEN
            SELECT rooms_per_process - rooms_allocated, status IN ('starting', 'running')
            INTO free_slots, placeable FROM processes WHERE process_id = p_process[i];
            IF NOT FOUND OR NOT placeable THEN
                free_slots := 0;
            END IF;
            seen_pid := seen_pid || p_process[i];
            seen_free := seen_free || free_slots;
            seen_n := seen_n || 0;
            seen_at := seen_at || p_at[i];
            j := array_length(seen_pid, 1);
        END IF;
        IF seen_free[j] <= 0 THEN
            placed := placed || 'full'::TEXT;
            CONTINUE;
        END IF;
        outcome := lodge_place_room(p_room[i], p_app[i], p_status[i], p_process[i], p_doc[i],
                                    p_alloc[i], p_at[i]);
        placed := placed || outcome;
        IF outcome <> 'ok' THEN
            CONTINUE;
        END IF;
        seen_free[j] := seen_free[j] - 1;
        seen_n[j] := seen_n[j] + 1;
        seen_at[j] := GREATEST(seen_at[j], p_at[i]);
    END LOOP;
    UPDATE processes p SET rooms_allocated = p.rooms_allocated + u.n, last_busy_at = u.at
    FROM unnest(seen_pid, seen_n, seen_at) AS u(pid, n, at)
    WHERE p.process_id = u.pid AND u.n > 0;
END $$;
"#,
    r#"
CREATE TABLE join_tokens (token_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL UNIQUE, doc TEXT NOT NULL);
"#,
    r#"
CREATE TABLE fleets (
    org_id TEXT NOT NULL,
    fleet_id TEXT NOT NULL,
    name TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (org_id, fleet_id),
    UNIQUE (org_id, name)
);
"#,
    // Coordination between replicas: who is alive, singletons' leases (unlogged: a lease is
    // worth nothing after a crash of the database), a shared secret, blobs every replica
    // reads (stored as they come: uploads and artifacts are compressed already), and the
    // counters of rate limits that every replica must count together.
    r#"
CREATE TABLE replicas (replica_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE UNLOGGED TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at BIGINT NOT NULL);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blobs (key TEXT NOT NULL, part INTEGER NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (key, part));
ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE rate_windows (key TEXT PRIMARY KEY, window_start BIGINT NOT NULL, count INTEGER NOT NULL);
"#,
];

/// Apply the migrations this database has not seen yet; returns the schema version.
pub(super) async fn migrate(client: &mut Client) -> Result<usize> {
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS lodge_schema (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(pg)?;
    let row = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM lodge_schema", &[])
        .await
        .map_err(pg)?;
    let have = usize::try_from(row.get::<_, i32>(0)).unwrap_or(0);
    if have > MIGRATIONS.len() {
        return Err(crate::StoreError::Backend(format!(
            "the database's schema is version {have}, newer than this Lodge knows ({}); run a newer Lodge",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
        tx.batch_execute(sql).await.map_err(pg)?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO lodge_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    Ok(MIGRATIONS.len())
}
