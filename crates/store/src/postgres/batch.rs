//! Group commit on PostgreSQL: one task per store takes every placement into an existing
//! process and every freed room that is waiting, and runs them as one `lodge_batch` call (one
//! round trip, one commit). A busy process's row is then locked and flushed once per batch, not
//! once per room. Callers hear their own outcome only after the batch committed.

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::{pg, pool_error};
use crate::{Result, StoreError};

/// The most operations one call takes; more wait for the next.
const MAX_BATCH: usize = 256;
/// Operations waiting at most; callers beyond it wait to hand theirs over.
const QUEUE: usize = 4096;

pub(super) struct Place {
    pub room: String,
    pub app: String,
    pub status: String,
    pub process: String,
    pub doc: String,
    pub alloc: String,
    pub at: i64,
}

pub(super) struct Free {
    pub room: String,
    pub status: String,
    pub at: i64,
}

enum Op {
    Place(Place, oneshot::Sender<Result<()>>),
    Free(Free, oneshot::Sender<Result<bool>>),
}

#[derive(Clone)]
pub(super) struct Batcher {
    tx: mpsc::Sender<Op>,
}

/// A placement whose room id another room holds.
pub(super) fn taken(room: &str) -> StoreError {
    StoreError::Duplicate(format!("room id '{room}' is already taken"))
}

fn stopped() -> StoreError {
    StoreError::Backend("the store's batch writer has stopped".into())
}

impl Batcher {
    /// Start the task; it ends when the last `Batcher` is dropped.
    pub(super) fn start(pool: Pool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, rx));
        Self { tx }
    }

    pub(super) async fn place(&self, p: Place) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Op::Place(p, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Whether the room was freed (false: unknown, or already in that state).
    pub(super) async fn free(&self, f: Free) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Op::Free(f, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(pool: Pool, mut rx: mpsc::Receiver<Op>) {
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut places = Vec::new();
        let mut frees = Vec::new();
        for op in ops {
            match op {
                Op::Place(p, reply) => places.push((p, reply)),
                Op::Free(f, reply) => frees.push((f, reply)),
            }
        }
        match call(&pool, &places, &frees).await {
            Ok((freed, placed)) => {
                for ((_, reply), ok) in frees.into_iter().zip(freed) {
                    let _ = reply.send(Ok(ok));
                }
                for ((p, reply), outcome) in places.into_iter().zip(placed) {
                    let _ = reply.send(match outcome.as_str() {
                        "ok" => Ok(()),
                        "full" => Err(StoreError::Conflict(format!(
                            "process {} has no free slot",
                            p.process
                        ))),
                        _ => Err(taken(&p.room)),
                    });
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let again = |m: &str| match &e {
                    StoreError::Conflict(_) => StoreError::Conflict(m.to_string()),
                    _ => StoreError::Backend(m.to_string()),
                };
                for (_, reply) in frees {
                    let _ = reply.send(Err(again(&msg)));
                }
                for (_, reply) in places {
                    let _ = reply.send(Err(again(&msg)));
                }
            }
        }
    }
}

type Outcomes = (Vec<bool>, Vec<String>);

async fn call(
    pool: &Pool,
    places: &[(Place, oneshot::Sender<Result<()>>)],
    frees: &[(Free, oneshot::Sender<Result<bool>>)],
) -> Result<Outcomes> {
    let col = |f: &dyn Fn(&Place) -> String| places.iter().map(|(p, _)| f(p)).collect::<Vec<_>>();
    let p_room = col(&|p| p.room.clone());
    let p_app = col(&|p| p.app.clone());
    let p_status = col(&|p| p.status.clone());
    let p_process = col(&|p| p.process.clone());
    let p_doc = col(&|p| p.doc.clone());
    let p_alloc = col(&|p| p.alloc.clone());
    let p_at: Vec<i64> = places.iter().map(|(p, _)| p.at).collect();
    let f_room: Vec<String> = frees.iter().map(|(f, _)| f.room.clone()).collect();
    let f_status: Vec<String> = frees.iter().map(|(f, _)| f.status.clone()).collect();
    let f_at: Vec<i64> = frees.iter().map(|(f, _)| f.at).collect();
    let client = pool.get().await.map_err(pool_error)?;
    let stmt = client
        .prepare_cached(
            "SELECT freed, placed FROM lodge_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .await
        .map_err(pg)?;
    let row = client
        .query_one(
            &stmt,
            &[
                &f_room, &f_status, &f_at, &p_room, &p_app, &p_status, &p_process, &p_doc,
                &p_alloc, &p_at,
            ],
        )
        .await
        .map_err(pg)?;
    let freed: Vec<bool> = row.get(0);
    let placed: Vec<String> = row.get(1);
    if freed.len() != frees.len() || placed.len() != places.len() {
        return Err(StoreError::Backend(format!(
            "lodge_batch answered {} + {} outcomes for {} + {} operations",
            freed.len(),
            placed.len(),
            frees.len(),
            places.len()
        )));
    }
    Ok((freed, placed))
}
