//! Group commit: one thread owns SQLite's write connection and commits every write that is
//! waiting in one transaction. Each write runs in a savepoint of its own, so one that fails
//! (a duplicate id, a full process) is undone alone while the others of the batch commit;
//! nobody hears "done" before the transaction that holds their write has committed. Callers
//! await a channel, so no write blocks the async runtime, and a request's commit no longer
//! waits for every other request's commit in turn.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::checkpoint::Checkpointer;
use crate::{Result, StoreError};

/// The most writes one transaction takes; more wait for the next.
const MAX_BATCH: usize = 512;

/// A write waiting for the writer: it runs inside the batch's transaction, then hears how the
/// commit went.
trait Pending: Send {
    fn run(&mut self, conn: &Connection);
    fn finish(self: Box<Self>, commit: std::result::Result<(), &str>);
}

struct Op<T, F> {
    op: Option<F>,
    out: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Pending for Op<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) {
        if let Some(op) = self.op.take() {
            self.out = Some(in_savepoint(conn, op));
        }
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), &str>) {
        let out = match (self.out, commit) {
            // A write that failed was undone on its own; its error stands either way.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Ok(_)), Err(e)) | (None, Err(e)) => {
                Err(StoreError::Backend(format!("commit failed: {e}")))
            }
            (None, Ok(())) => Err(StoreError::Backend("write was not run".into())),
        };
        // The caller may have gone (a dropped request); its write stands regardless.
        let _ = self.reply.send(out);
    }
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn in_savepoint<T>(conn: &Connection, op: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    exec(conn, "SAVEPOINT w").map_err(crate::sqlite::backend)?;
    let out = catch_unwind(AssertUnwindSafe(|| op(conn)))
        .unwrap_or_else(|_| Err(StoreError::Backend("store write panicked".into())));
    let undo = if out.is_err() {
        exec(conn, "ROLLBACK TO w")
    } else {
        Ok(())
    };
    match undo.and_then(|()| exec(conn, "RELEASE w")) {
        Ok(()) => out,
        Err(e) => Err(crate::sqlite::backend(e)),
    }
}

pub(super) struct Writer {
    tx: Option<mpsc::Sender<Box<dyn Pending>>>,
    thread: Option<JoinHandle<()>>,
    checkpointer: Checkpointer,
}

impl Writer {
    /// Take the write connection of the database at `path` (checkpoints run beside it).
    pub(super) fn start(conn: Connection, path: &Path) -> Result<Self> {
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(crate::sqlite::backend)?;
        let checkpointer = Checkpointer::start(path)?;
        let nudge = checkpointer.nudger();
        let (tx, rx) = mpsc::channel::<Box<dyn Pending>>();
        let thread = std::thread::Builder::new()
            .name("lodge-store-writer".into())
            .spawn(move || writer_loop(conn, rx, nudge))
            .map_err(crate::sqlite::backend)?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            checkpointer,
        })
    }

    /// Run `op` in the next batch; resolves once its transaction committed (or it failed).
    pub(super) async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let stopped = || StoreError::Backend("the store's writer has stopped".into());
        let (reply, answer) = oneshot::channel();
        let pending: Box<dyn Pending> = Box::new(Op {
            op: Some(op),
            out: None,
            reply,
        });
        self.tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(pending)
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Writer {
    /// Close the channel and wait until the writes already queued are committed and the
    /// connection is closed.
    pub(super) fn stop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // After the writer: its last commits are checkpointed too.
        self.checkpointer.stop();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Box<dyn Pending>>,
    nudge: Option<SyncSender<()>>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE") {
            let e = e.to_string();
            for p in batch {
                p.finish(Err(&e));
            }
            continue;
        }
        for p in &mut batch {
            p.run(&conn);
        }
        match exec(&conn, "COMMIT") {
            Ok(()) => {
                for p in batch {
                    p.finish(Ok(()));
                }
                if let Some(n) = &nudge {
                    // Full means a checkpoint is already due; it covers this commit.
                    let _ = n.try_send(());
                }
            }
            Err(e) => {
                let _ = exec(&conn, "ROLLBACK");
                let e = e.to_string();
                for p in batch {
                    p.finish(Err(&e));
                }
            }
        }
    }
}
