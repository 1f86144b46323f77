//! The embedded store's schema: forward-only migrations, applied in order at open and counted
//! in `PRAGMA user_version`.

pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE orgs (org_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE tokens (
    org_token_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    name TEXT NOT NULL,
    active INTEGER NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);
CREATE UNIQUE INDEX tokens_active_name ON tokens (org_id, name) WHERE active = 1;
CREATE TABLE apps (
    app_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    app_name TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE UNIQUE INDEX apps_live_name ON apps (org_id, app_name) WHERE deleted = 0;
CREATE TABLE builds (build_id TEXT PRIMARY KEY, org_id TEXT NOT NULL, created_at INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX builds_org ON builds (org_id, created_at);
CREATE TABLE deployments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX deployments_app ON deployments (app_id, seq);
CREATE TABLE nodes (node_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE processes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    process_id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    deployment_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    region TEXT NOT NULL,
    status TEXT NOT NULL,
    rooms_per_process INTEGER NOT NULL,
    rooms_allocated INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX processes_app ON processes (app_id, created_at);
CREATE INDEX processes_place ON processes (deployment_id, region, status);
CREATE INDEX processes_node ON processes (node_id, status);
CREATE TABLE rooms (
    room_id TEXT PRIMARY KEY,
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
    scheduled_at INTEGER NOT NULL,
    unscheduled_at INTEGER,
    seq INTEGER NOT NULL
);
CREATE INDEX allocations_room ON allocations (room_id, seq);
CREATE INDEX allocations_process ON allocations (process_id, unscheduled_at);
"#,
    r#"
CREATE TABLE lobbies (
    room_id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    short_code TEXT,
    visibility TEXT NOT NULL,
    region TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX lobbies_short_code ON lobbies (app_id, short_code, created_at);
CREATE INDEX lobbies_creator ON lobbies (app_id, created_by, created_at);
CREATE INDEX lobbies_listing ON lobbies (app_id, visibility, created_at);
CREATE TABLE legacy_ids (
    scope TEXT NOT NULL,
    kind TEXT NOT NULL,
    num INTEGER NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (scope, kind, num),
    UNIQUE (scope, kind, id)
);
"#,
    r#"
ALTER TABLE processes ADD COLUMN port_count INTEGER NOT NULL DEFAULT 1;
UPDATE processes SET port_count = COALESCE(json_extract(doc, '$.portCount'), 1);
CREATE INDEX processes_free ON processes (deployment_id, region, status) WHERE rooms_allocated < rooms_per_process;
CREATE INDEX processes_node_ports ON processes (node_id, status, port_count);
"#,
    // When a process was last busy has a column of its own: placing and freeing rooms then
    // leave the document alone, so `update_process`'s compare-and-swap on it only meets real
    // concurrent changes, not every room placed on a busy process.
    r#"
ALTER TABLE processes ADD COLUMN last_busy_at INTEGER NOT NULL DEFAULT 0;
UPDATE processes SET last_busy_at = COALESCE(json_extract(doc, '$.lastBusyAt'), 0);
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
    // Coordination between replicas (the embedded store has one, but keeps the same shapes).
    r#"
CREATE TABLE replicas (replica_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blobs (key TEXT NOT NULL, part INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (key, part));
CREATE TABLE rate_windows (key TEXT PRIMARY KEY, window_start INTEGER NOT NULL, count INTEGER NOT NULL);
"#,
];
