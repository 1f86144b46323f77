// Chaos: a steady CreateRoom/DestroyRoom stream with client retries while Lodge is killed with
// kill -9 and restarted, again and again. Then a checker over the recorded history and the final
// state: no acknowledged room lost, every destroy that was acknowledged holds, no process ever
// seen over roomsPerProcess, each process's count equal to its active rooms, and at least
// 99.9 % of operations succeed with retries. It runs on the embedded store and, in the second
// pass of scripts/test, on PostgreSQL.
//
// In replicas mode (LODGE_TEST_REPLICAS) the whole Lodge never goes down: every 10 s one
// replica (each in turn) is killed with kill -9 and started again, while the front sends the
// stream to whichever replicas answer. Same checker; that operations needed retries is not
// required then (a balancer routes around a dead replica), that every kill landed is.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { useLodge, sleep, uniqueName, REPLICAS } from '../lib/lodge.js';

/** The HTTP status of an SDK error; undefined when no answer came (the server was down). */
const statusOf = (err) => (typeof err?.statusCode === 'number' ? err.statusCode : undefined);

const lodge = useLodge();

const ROOMS_PER_PROCESS = 3;
const WORKERS = 6;
const KILLS = 5;
/** Replicas mode: one replica killed every this often. */
const REPLICA_KILL_EVERY_MS = 10_000;
const REGIONS = ['Seattle', 'London'];
/** How long one operation is retried before it counts as failed. */
const RETRY_FOR_MS = 30_000;
/** Rooms kept to the end (each worker destroys the others), within the test's port range. */
const MAX_KEPT = 24;

/** Runs `op` until it succeeds or says `done`, retrying connection errors and 5xx. */
async function withRetry(op, stats) {
  const deadline = Date.now() + RETRY_FOR_MS;
  let attempt = 0;
  for (;;) {
    try {
      const value = await op(attempt);
      stats.ok += 1;
      if (attempt > 0) stats.retried += 1;
      return value;
    } catch (err) {
      const status = statusOf(err);
      // A 4xx other than the server saying it is busy is an answer, not an outage.
      if (status !== undefined && status < 500 && status !== 429) throw err;
      if (Date.now() > deadline) {
        stats.failed += 1;
        stats.errors.push(String(err));
        return undefined;
      }
      attempt += 1;
      await sleep(Math.min(50 * attempt, 500));
    }
  }
}

const TITLE = REPLICAS
  ? 'kill -9 and restart of one replica at a time under a CreateRoom/DestroyRoom stream: nothing acknowledged is lost, nothing over-allocated'
  : 'kill -9 and restart under a CreateRoom/DestroyRoom stream: nothing acknowledged is lost, nothing over-allocated';

test(TITLE, { timeout: 240_000 }, async () => {
  const { appId } = await lodge.echoApp({ roomsPerProcess: ROOMS_PER_PROCESS });
  const sdk = () => lodge.sdk();
  const stats = { ok: 0, retried: 0, failed: 0, errors: [] };
  /** roomId → { region, created: processId once acknowledged, destroyed: true once acknowledged } */
  const history = new Map();
  const processes = new Set();
  const overAllocated = [];
  let running = true;
  let kept = 0;

  const worker = async (w) => {
    try {
      await stream(w);
    } catch (err) {
      running = false;
      throw err;
    }
  };
  const stream = async (w) => {
    let i = 0;
    while (running) {
      const roomId = uniqueName(`chaos-${w}-${i++}`).replace(/-/g, '_');
      const region = REGIONS[i % REGIONS.length];
      const entry = { region, created: null, destroyed: false };
      history.set(roomId, entry);
      // A client-chosen roomId makes CreateRoom safe to retry: if an earlier attempt committed
      // but its answer was lost with the server, the retry is told the id is taken.
      const created = await withRetry(async (attempt) => {
        try {
          return await sdk().roomsV2.createRoom({ region }, appId, roomId);
        } catch (err) {
          const status = statusOf(err);
          if (attempt > 0 && status >= 400 && status < 500) {
            const info = await sdk().roomsV2.getRoomInfo(roomId, appId);
            return { roomId, processId: info.currentAllocation?.processId ?? info.allocations.at(-1)?.processId };
          }
          throw err;
        }
      }, stats);
      if (!created) continue;
      entry.created = created.processId;
      processes.add(created.processId);
      // Keep some rooms (checked at the end), destroy the rest.
      if (i % 10 === 0 && kept < MAX_KEPT) {
        kept += 1;
        continue;
      }
      const destroyed = await withRetry(async () => {
        await sdk().roomsV2.destroyRoom(roomId, appId);
        return true;
      }, stats);
      entry.destroyed = destroyed === true;
    }
  };

  // Samples what every process holds while the stream runs.
  const sampler = async () => {
    while (running) {
      for (const processId of [...processes]) {
        try {
          const p = await sdk().processesV3.getProcess(processId, appId);
          if (p.roomsAllocated > p.roomsPerProcess) overAllocated.push({ processId, roomsAllocated: p.roomsAllocated });
        } catch {
          // the server is down at this moment
        }
      }
      await sleep(100);
    }
  };

  const workers = Array.from({ length: WORKERS }, (_, w) => worker(w));
  const sampling = sampler();
  const kills = []; // replicas mode: {replica, exit} of each kill
  try {
    for (let k = 0; k < KILLS; k++) {
      if (REPLICAS) {
        await sleep(REPLICA_KILL_EVERY_MS);
        const replica = k % lodge.replicas.length;
        kills.push({ replica, exit: await lodge.killReplica(replica) });
        await sleep(200);
        await lodge.startReplica(replica);
        continue;
      }
      await sleep(1500 + Math.random() * 1500);
      await lodge.kill9();
      await sleep(200);
      await lodge.restart();
    }
    await sleep(1000);
  } finally {
    // Whatever happened, the stream stops before the checker (or the teardown) runs.
    running = false;
  }
  await Promise.all([...workers, sampling]);

  // The checker.
  const total = stats.ok + stats.failed;
  assert.ok(total >= 100, `enough operations ran to mean something (${total})`);
  assert.ok(stats.failed / total <= 0.001, `${stats.failed} of ${total} operations failed even with retries: ${stats.errors.slice(0, 3).join('; ')}`);
  if (REPLICAS) {
    assert.deepEqual(
      kills.map((k) => k.exit?.signal),
      Array(KILLS).fill('SIGKILL'),
      `every kill landed on a running replica: ${JSON.stringify(kills)}`,
    );
  } else {
    assert.ok(stats.retried > 0, 'some operations met a dead server and were retried (the kills landed)');
  }
  assert.deepEqual(overAllocated, [], 'no process was ever seen holding more rooms than roomsPerProcess');

  const active = new Map();
  for (const [roomId, entry] of history) {
    if (!entry.created) continue;
    const info = await sdk().roomsV2.getRoomInfo(roomId, appId); // 404 here: an acknowledged room was lost
    if (entry.destroyed) {
      assert.equal(info.status, 'destroyed', `${roomId}: its acknowledged destroy holds`);
      continue;
    }
    if (info.status === 'destroyed') {
      // Only its process ending may take a kept room away.
      const p = await sdk().processesV3.getProcess(entry.created, appId);
      assert.ok(['stopped', 'failed'].includes(p.status), `${roomId} vanished while process ${entry.created} is ${p.status}`);
      continue;
    }
    assert.equal(info.status, 'active', roomId);
    const pid = info.currentAllocation.processId;
    active.set(pid, (active.get(pid) ?? 0) + 1);
  }
  for (const processId of processes) {
    const p = await sdk().processesV3.getProcess(processId, appId);
    const live = active.get(processId) ?? 0;
    assert.ok(p.roomsAllocated <= ROOMS_PER_PROCESS, `${processId} holds ${p.roomsAllocated}`);
    if (!['stopped', 'failed'].includes(p.status)) {
      assert.equal(p.roomsAllocated, live, `${processId}: its count matches its active rooms`);
    }
  }
  const killed = REPLICAS ? `${KILLS} kills of one replica (front: ${JSON.stringify(lodge.frontCounts())})` : `${KILLS} kills`;
  console.log(`chaos: ${total} operations (${stats.retried} needed retries, ${stats.failed} failed), ${history.size} rooms, ${processes.size} processes, ${killed}`);
});
