//! WAL checkpoints off the writer's path. SQLite's default is an automatic checkpoint inside
//! the commit that crosses 1,000 WAL pages, which copies pages into the database and waits for
//! two `fsync`s while every write queued behind it waits too (a profile of the sustained
//! CreateRoom load had 18 % of the writer thread there, and the p99 stalls with it). Here the
//! writer turns that off and nudges this thread after its commits; the thread runs a PASSIVE
//! checkpoint on a connection of its own, which waits for no reader or writer, at most every
//! [`EVERY`], and once more when the writer stops.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::Result;

/// The shortest time between two checkpoints.
const EVERY: Duration = Duration::from_millis(200);
/// A checkpoint runs this often even without a nudge (writes made by another connection).
const IDLE: Duration = Duration::from_secs(5);

pub(super) struct Checkpointer {
    nudge: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Start the thread, on a connection of its own to the database at `path`.
    pub(super) fn start(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(super::backend)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(super::backend)?;
        let (nudge, nudged) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("lodge-store-checkpoint".into())
            .spawn(move || run(&conn, &nudged))
            .map_err(super::backend)?;
        Ok(Self {
            nudge: Some(nudge),
            thread: Some(thread),
        })
    }

    /// A handle for the writer: after a commit, `try_send(())` (a nudge already waiting is
    /// enough, so it never blocks).
    pub(super) fn nudger(&self) -> Option<SyncSender<()>> {
        self.nudge.clone()
    }

    /// Stop after a last checkpoint (once every nudger is gone too).
    pub(super) fn stop(&mut self) {
        self.nudge.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(conn: &Connection, nudged: &mpsc::Receiver<()>) {
    let mut last = Instant::now();
    loop {
        let stopping = match nudged.recv_timeout(IDLE) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if !stopping {
            // Let the WAL gather a few commits' worth: one checkpoint per EVERY at most.
            let wait = EVERY.saturating_sub(last.elapsed());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            // Nudges that came meanwhile are covered by this checkpoint.
            while let Ok(()) = nudged.try_recv() {}
        }
        last = Instant::now();
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries");
        }
        if stopping {
            return;
        }
    }
}
