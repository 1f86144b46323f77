// Crash during start: kill -9 of Lodge while processes are starting never leaves two game
// servers for one process id, and `lodge cleanup` ends everything a data dir started
// (game servers, shims, network namespaces).
//
// The echo server is deployed with ECHO_STARTUP_DELAY so that every start takes a while, one
// room per process, and Lodge is killed with SIGKILL at a (seeded, deterministic) random
// moment after each batch of room creations, then started again on the same data dir. Game
// servers are counted from /proc: a game server is a process whose environment carries
// HATHORA_PROCESS_ID=<id> and whose parent does not (the root of a game-server tree).
//
// In replicas mode (LODGE_TEST_REPLICAS) the kill -9 takes down every replica and every agent
// at once, and the game servers are their agents'.
//
// Knobs: CRASH_SEED (default 22), CRASH_CYCLES (default 15).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';

import { Lodge, LODGE_BIN, instanceKey, sleep, waitFor, withTimeout } from '../lib/lodge.js';

const execFileAsync = promisify(execFile);

const root = process.getuid?.() === 0;
// As root processes get their own network namespace (as on Hathora); without root, none.
const ISOLATION = root ? 'netns' : 'none';
const SEED = Number(process.env.CRASH_SEED ?? 22) >>> 0;
const CYCLES = Number(process.env.CRASH_CYCLES ?? 15);
const STARTUP_DELAY_S = '0.3';
const MAX_KILL_DELAY_MS = 400;
const LOOP_BUDGET_MS = 120_000; // the loop stops early (with fewer cycles) past this
const SETTLE_TIMEOUT_MS = 60_000;
const ENDED = new Set(['stopped', 'failed']);

/** mulberry32: a small deterministic PRNG, [0, 1). */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ---------------------------------------------------------------------------
// /proc

/** Every live (non-zombie) process: {pid, ppid, state, env (Map), cmdline [..]}. */
function scanProc() {
  const out = [];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const state = rest[0];
      if (state === 'Z' || state === 'X') continue;
      const ppid = Number(rest[1]);
      const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (cmdline.at(-1) === '') cmdline.pop();
      let env = new Map();
      try {
        env = new Map(
          fs
            .readFileSync(`/proc/${pid}/environ`, 'utf8')
            .split('\0')
            .filter(Boolean)
            .map((kv) => {
              const i = kv.indexOf('=');
              return i < 0 ? [kv, ''] : [kv.slice(0, i), kv.slice(i + 1)];
            }),
        );
      } catch {
        // another user's process (without root): not one of ours
      }
      out.push({ pid, ppid, state, env, cmdline });
    } catch {
      // gone while reading
    }
  }
  return out;
}

/**
 * Game servers of the app (or of a known process id) in a /proc scan:
 * Map processId -> [root process of each game-server tree].
 */
function gameServers(procs, appId, knownIds) {
  const byPid = new Map(procs.map((p) => [p.pid, p]));
  const trees = new Map();
  for (const p of procs) {
    const id = p.env.get('HATHORA_PROCESS_ID');
    if (!id) continue;
    if (p.env.get('HATHORA_APP_ID') !== appId && !knownIds.has(id)) continue;
    if (byPid.get(p.ppid)?.env.get('HATHORA_PROCESS_ID') === id) continue; // inside a tree
    if (!trees.has(id)) trees.set(id, []);
    trees.get(id).push(p);
  }
  return trees;
}

/** `lodge shim <dataDir>/...` processes, for any of `dataDirs` (the nodes' data dirs). */
function shimsOf(procs, dataDirs) {
  return procs.filter(
    (p) => p.cmdline[1] === 'shim' && dataDirs.some((d) => (p.cmdline[2] ?? '').startsWith(d + path.sep)),
  );
}

/** Whether network namespace `name` is one of this Lodge's: a process's, or made ahead. */
function ownsNetns(lodge, knownIds, name) {
  if (knownIds.has(name.replace(/^lodge-/, ''))) return true;
  return lodge.nodeDataDirs.some((dir) => name.startsWith(`lodge-${instanceKey(dir)}-`));
}

function netnsList() {
  if (!root) return [];
  try {
    return execFileSync('ip', ['netns', 'list'])
      .toString()
      .split('\n')
      .map((line) => line.split(' ')[0])
      .filter(Boolean);
  } catch {
    return [];
  }
}

// ---------------------------------------------------------------------------
// Lodge's view

/** Every process of the app, through GetLatestProcesses paged with `before`. */
async function listAllProcesses(sdk, appId) {
  const seen = new Map();
  let before;
  for (let page = 0; page < 500; page++) {
    const batch = await sdk.processesV3.getLatestProcesses(appId, undefined, undefined, before);
    let fresh = 0;
    for (const p of batch) {
      if (!seen.has(p.processId)) {
        seen.set(p.processId, p);
        fresh++;
      }
    }
    if (batch.length === 0 || fresh === 0) break;
    // created_at < before: +1 so that processes of the same millisecond are not skipped.
    before = Math.min(...batch.map((p) => p.createdAt.getTime())) + 1;
  }
  return seen;
}

function readMaybe(file) {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (err) {
    return `<${err.code}>`;
  }
}

/** What the data dir and /proc say about one process id (for a failure message). */
function evidence(lodge, processId, procs) {
  const dir = lodge.processDir(processId);
  const lines = [`== process ${processId} (${dir})`];
  for (const f of ['state.json', 'shim.pid', 'pid', 'exit.json']) {
    lines.push(`-- ${f}: ${readMaybe(path.join(dir, f)).trim()}`);
  }
  const log = readMaybe(path.join(dir, 'log')).split('\n').slice(-15).join('\n');
  lines.push(`-- log (last 15 lines):\n${log}`);
  for (const p of procs) {
    const mine =
      p.env.get('HATHORA_PROCESS_ID') === processId ||
      (p.cmdline[1] === 'shim' && p.cmdline[2] === dir);
    if (!mine) continue;
    const env = ['HATHORA_PROCESS_ID', 'HATHORA_APP_ID', 'PORT', 'HATHORA_DEFAULT_PORT']
      .map((k) => `${k}=${p.env.get(k) ?? ''}`)
      .join(' ');
    lines.push(`-- pid ${p.pid} ppid ${p.ppid} state ${p.state} cmdline [${p.cmdline.join(' ')}] ${env}`);
  }
  return lines.join('\n');
}

/**
 * How far the start of a process had got when Lodge died, from its files (stable once Lodge
 * is dead, but for what its shim writes itself).
 */
function startPhase(dir) {
  let state;
  try {
    state = JSON.parse(fs.readFileSync(path.join(dir, 'state.json'), 'utf8'));
  } catch {
    return 'no state.json';
  }
  if (!state.shimPid) return 'shim not recorded';
  if (!fs.existsSync(path.join(dir, 'pid'))) return 'no game pid';
  if (!readMaybe(path.join(dir, 'log')).includes('listening on port')) return 'game not bound';
  return 'game bound';
}

// ---------------------------------------------------------------------------

test(
  'kill -9 during starts never leaves two game servers for one process id; cleanup ends all',
  { timeout: LOOP_BUDGET_MS + SETTLE_TIMEOUT_MS + 120_000 },
  async () => {
    const lodge = new Lodge({ isolation: ISOLATION });
    const rand = prng(SEED);
    const knownIds = new Set();
    let appId = null;
    let maxPerId = 0;
    const violations = []; // two game servers for one id, seen at any moment
    let passed = false;

    /** Scans /proc, records the per-id maximum, and notes any id with two game servers. */
    const sample = (when) => {
      if (!appId) return new Map();
      const procs = scanProc();
      const trees = gameServers(procs, appId, knownIds);
      for (const [id, roots] of trees) {
        maxPerId = Math.max(maxPerId, roots.length);
        if (roots.length > 1) {
          violations.push(`${when}: ${roots.length} game servers for ${id}\n${evidence(lodge, id, procs)}`);
        }
      }
      return trees;
    };

    try {
      await lodge.start();
      const { sdk, appId: app } = await lodge.echoApp({
        roomsPerProcess: 1,
        env: [{ name: 'ECHO_STARTUP_DELAY', value: STARTUP_DELAY_S }],
      });
      appId = app;

      // --- the crash loop -------------------------------------------------------------
      const loopStart = Date.now();
      let cycles = 0;
      let rooms = 0;
      const phases = {}; // how far the starts of each batch had got at the kill
      const phaseOf = new Map();
      while (cycles < CYCLES && Date.now() - loopStart < LOOP_BUDGET_MS) {
        const n = 1 + Math.floor(rand() * 2);
        const killAfter = Math.floor(rand() * (MAX_KILL_DELAY_MS + 1));
        const batch = [];
        for (let i = 0; i < n; i++) {
          const room = await sdk.roomsV2.createRoom({ region: 'Seattle' }, appId);
          knownIds.add(room.processId);
          batch.push(room.processId);
          rooms++;
        }
        await sleep(killAfter);
        sample(`cycle ${cycles} before kill -9`);
        await lodge.kill9();
        for (const id of batch) {
          const phase = startPhase(lodge.processDir(id));
          phases[phase] = (phases[phase] ?? 0) + 1;
          phaseOf.set(id, phase);
        }
        sample(`cycle ${cycles} after kill -9`);
        await lodge.start();
        sample(`cycle ${cycles} after restart`);
        cycles++;
      }
      const loopMs = Date.now() - loopStart;

      // --- settle: every live process is running or ended ------------------------------
      const statuses = new Map();
      await waitFor(
        async () => {
          for (const id of (await listAllProcesses(sdk, appId)).keys()) knownIds.add(id);
          for (const dir of lodge.nodeDataDirs) {
            if (!fs.existsSync(path.join(dir, 'processes'))) continue;
            for (const id of fs.readdirSync(path.join(dir, 'processes'))) knownIds.add(id);
          }
          for (const id of knownIds) {
            const p = await sdk.processesV3.getProcess(id, appId);
            statuses.set(id, p.status);
          }
          sample('settling');
          return [...statuses.values()].every((s) => s === 'running' || ENDED.has(s));
        },
        {
          timeoutMs: SETTLE_TIMEOUT_MS,
          intervalMs: 200,
          what: 'every process to be running or ended',
        },
      ).catch((err) => {
        err.message += ` (statuses: ${JSON.stringify(Object.fromEntries(statuses))})`;
        throw err;
      });

      // --- the invariants --------------------------------------------------------------
      const procs = scanProc();
      const trees = gameServers(procs, appId, knownIds);
      for (const [id, roots] of trees) maxPerId = Math.max(maxPerId, roots.length);
      const problems = [...violations];
      for (const [id, roots] of trees) {
        if (roots.length > 1) problems.push(`after settling: ${roots.length} game servers for ${id}`);
        if (!statuses.has(id)) problems.push(`a game server runs for ${id}, which Lodge does not list`);
      }
      for (const [id, status] of statuses) {
        const count = trees.get(id)?.length ?? 0;
        if (status === 'running' && count !== 1) {
          problems.push(`${id} is running but has ${count} game servers`);
        }
        if (ENDED.has(status) && count !== 0) {
          problems.push(`${id} is ${status} but ${count} game server(s) still run for it`);
        }
      }
      const counts = {};
      for (const s of statuses.values()) counts[s] = (counts[s] ?? 0) + 1;
      console.log(
        `crash-during-start: seed ${SEED}, isolation ${ISOLATION}, cycles ${cycles} in ${loopMs} ms, ` +
          `rooms created ${rooms}, processes created ${statuses.size} (${JSON.stringify(counts)}), ` +
          `start phase at the kill ${JSON.stringify(phases)}, ` +
          `max game servers seen per process id ${maxPerId}`,
      );
      // Why the processes that ended did (from Lodge's log): a crash in some windows of a
      // start costs the process, which is fine as long as no game server runs for it.
      for (const [id, status] of statuses) {
        if (!ENDED.has(status)) continue;
        const line = lodge
          .readLog()
          .split('\n')
          .find((l) => l.includes('process ended') && l.includes(id));
        const phase = phaseOf.get(id);
        console.log(`  ${id} ${status} (start phase at the kill: ${phase ?? 'not killed during its start'}): ${line?.replace(/^.*?reason=/, 'reason=') ?? 'no log line'}`);
      }
      if (problems.length) {
        const ids = new Set([...trees.keys(), ...statuses.keys()]);
        const details = [...ids]
          .filter((id) => problems.some((p) => p.includes(id)))
          .map((id) => evidence(lodge, id, procs));
        assert.fail(`${problems.join('\n')}\n${details.join('\n')}`);
      }
      assert.ok([...statuses.values()].includes('running'), 'some process survived the crashes running');

      // --- graceful stop, then `lodge cleanup` -----------------------------------------
      assert.deepEqual(await lodge.stop(), { code: 0, signal: null }, 'lodge exits 0 on SIGTERM');
      const stillRunning = gameServers(scanProc(), appId, knownIds);
      assert.ok(stillRunning.size > 0, 'game servers outlive a graceful stop of lodge');
      // Every node's data dir: the one box's, or in replicas mode every agent's.
      for (const dir of lodge.nodeDataDirs) {
        const { stdout, stderr } = await withTimeout(
          execFileAsync(LODGE_BIN, ['cleanup', '--data-dir', dir]),
          60_000,
          'lodge cleanup did not finish within 60 s',
        );
        console.log(`lodge cleanup --data-dir ${dir}: ${(stdout + stderr).trim()}`);
      }

      // SIGKILL is delivered at once, but an exiting process stays in /proc for a moment.
      let left = { games: [], shims: [], netns: [] };
      const leftovers = () => {
        const procs = scanProc();
        left = {
          procs,
          games: [...gameServers(procs, appId, knownIds).values()].flat(),
          shims: shimsOf(procs, lodge.nodeDataDirs),
          netns: netnsList().filter((n) => ownsNetns(lodge, knownIds, n)),
        };
        return left.games.length + left.shims.length + left.netns.length === 0;
      };
      try {
        await waitFor(leftovers, { timeoutMs: 3000, intervalMs: 50, what: 'cleanup to end everything' });
      } catch {
        const ids = new Set([
          ...left.games.map((p) => p.env.get('HATHORA_PROCESS_ID')),
          ...left.shims.map((p) => path.basename(p.cmdline[2])),
          ...left.netns.map((n) => n.replace(/^lodge-/, '')),
        ]);
        assert.fail(
          `left after lodge cleanup: game servers [${left.games.map((p) => p.pid)}], ` +
            `shims [${left.shims.map((p) => p.pid)}], namespaces [${left.netns}]\n` +
            [...ids].map((id) => evidence(lodge, id, left.procs)).join('\n'),
        );
      }
      passed = true;
    } finally {
      if (!passed) lodge.failed = true; // keeps the data dir and prints the log
      await lodge.teardown(); // stops lodge if it runs, then `lodge cleanup`
      // Whatever survived even that is ended here, so that no run leaves anything behind.
      if (appId && lodge.dataDir) {
        const procs = scanProc();
        const games = [...gameServers(procs, appId, knownIds).values()].flat();
        const shims = shimsOf(procs, lodge.nodeDataDirs);
        for (const p of [...shims, ...games]) {
          console.error(`killing leftover pid ${p.pid} [${p.cmdline.join(' ')}]`);
          try {
            process.kill(p.pid, 'SIGKILL');
          } catch {
            // already gone
          }
        }
        for (const ns of netnsList().filter((n) => ownsNetns(lodge, knownIds, n))) {
          console.error(`deleting leftover network namespace ${ns}`);
          try {
            execFileSync('ip', ['netns', 'del', ns]);
          } catch {
            // already gone
          }
        }
      }
    }
  },
);
