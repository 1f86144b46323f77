// Test harness for the Lodge conformance suite.
//
// Starts a real `lodge serve` as a child process on a temporary data dir and
// free ports (in replicas mode a cluster of them, see LODGE_TEST_REPLICAS),
// and offers the helpers the tests share: an SDK client, the v3 multipart
// build upload, the echo deployment, polling, and UDP/TCP probes.
//
// Environment knobs:
//   LODGE_BIN   path of the lodge binary (default ../target/debug/lodge,
//               relative to conformance/)
//   LODGE_LOG=1 always print the server log at teardown (it is printed
//               anyway when a test of the file failed)
//   LODGE_KEEP=1 keep the temporary data dir after teardown
//   LODGE_TEST_STORE=postgres://USER@HOST/DB  run every server on PostgreSQL
//               instead of the embedded store: each server gets a schema of
//               its own on that database (made with psql, dropped at teardown)
//   LODGE_TEST_REPLICAS=N  (N >= 2; needs LODGE_TEST_STORE) replicas mode: each
//               Lodge is N control-plane replicas (`lodge serve --no-local-node`,
//               a data dir and ports each) on the Lodge's one schema; a
//               round-robin HTTP front (lib/front.js, in a worker thread) that
//               sends each request, and each node upgrade, to the next replica
//               and is `lodge.url`; and one `lodge agent` per region of
//               NODE_REGIONS, joined through the front with a join token, with
//               a port window and a ping port of its own. A Lodge made with
//               --no-local-node gets no agents (its test brings its nodes). See
//               "Replicas mode" in class Lodge for what dataDir, pingPort,
//               processStates(), stop(), ... mean then.
//   LODGE_TEST_FRONT=first  (replicas mode) the front sends everything to
//               replica 0, the others only take over while it refuses
//               connections (default: round-robin). With it, agents attach to
//               replica 0 too: a failure that goes away is one of requests
//               spread over replicas, not of the harness.

import { spawn, execFile, execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import dgram from 'node:dgram';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { Worker } from 'node:worker_threads';
import assert from 'node:assert/strict';
import { before, after, afterEach } from 'node:test';

import { HathoraCloud } from '@hathora/cloud-sdk-typescript';
import {
  ApiError,
  HathoraCloudError,
  ResponseValidationError,
} from '@hathora/cloud-sdk-typescript/models/errors/index.js';

const execFileAsync = promisify(execFile);

export const CONFORMANCE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const REPO_DIR = path.resolve(CONFORMANCE_DIR, '..');
export const ECHO_DIR = path.join(REPO_DIR, 'examples', 'echo');
export const LODGE_BIN = process.env.LODGE_BIN
  ? path.resolve(CONFORMANCE_DIR, process.env.LODGE_BIN)
  : path.join(REPO_DIR, 'target', 'debug', 'lodge');

const READY_TIMEOUT_MS = 30_000;
const READY_POLL_MS = 50;
const STOP_TIMEOUT_MS = 15_000;
/** For an `after` hook that calls teardown() (replicas mode cleans up after every agent). */
export const TEARDOWN_TIMEOUT_MS = STOP_TIMEOUT_MS + 10_000 + (process.env.LODGE_TEST_REPLICAS ? 60_000 : 0);

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Resolves like `promise`, or rejects with `message` after `ms`. The timer is
 * cleared either way, so it never keeps the test process alive.
 */
export async function withTimeout(promise, ms, message) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(message ?? `timed out after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}

// Every server still running when the test process exits is killed, so an
// aborted run never leaves a lodge behind.
const running = new Set();

/** The PostgreSQL database every server of the run uses, if any (LODGE_TEST_STORE). */
export const TEST_STORE = process.env.LODGE_TEST_STORE || '';

async function psql(sql) {
  await execFileAsync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', TEST_STORE, '-c', sql]);
}

/**
 * Replicas per Lodge (LODGE_TEST_REPLICAS); 0 is the one box, a single `lodge serve`. A bad
 * value fails every test file at once, saying why.
 */
export const TEST_REPLICAS = (() => {
  const raw = process.env.LODGE_TEST_REPLICAS;
  if (raw === undefined || raw === '') return 0;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 2) {
    throw new Error(`LODGE_TEST_REPLICAS=${raw}: expected a whole number of at least 2 (unset it for one box)`);
  }
  if (!TEST_STORE) {
    throw new Error(
      'LODGE_TEST_REPLICAS needs LODGE_TEST_STORE=postgres://USER@HOST/DB: the replicas share one PostgreSQL database',
    );
  }
  return n;
})();
/** True in replicas mode (LODGE_TEST_REPLICAS). */
export const REPLICAS = TEST_REPLICAS > 0;
const FRONT_MODE = process.env.LODGE_TEST_FRONT || 'round-robin';
if (!['round-robin', 'first'].includes(FRONT_MODE)) {
  throw new Error(`LODGE_TEST_FRONT=${FRONT_MODE}: expected round-robin or first`);
}
/**
 * Replicas mode: the regions that get a `lodge agent`, every region a test of the suite
 * places work in (the one box's embedded node serves all fourteen).
 */
export const NODE_REGIONS = ['Seattle', 'Washington_DC', 'Chicago', 'Dallas', 'London', 'Frankfurt', 'Tokyo', 'Sydney'];
process.on('exit', () => {
  for (const lodge of running) {
    try {
      lodge.child?.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

// ---------------------------------------------------------------------------
// Ports

async function freeTcpPort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A port free for both TCP and UDP (the ping service serves both on one port). */
async function freeTcpUdpPort() {
  for (let i = 0; i < 50; i++) {
    const port = await freeTcpPort();
    const socket = dgram.createSocket('udp4');
    const ok = await new Promise((resolve) => {
      socket.once('error', () => resolve(false));
      socket.bind(port, '0.0.0.0', () => resolve(true));
    });
    await new Promise((resolve) => socket.close(() => resolve()));
    if (ok) return port;
  }
  throw new Error('no port free for both TCP and UDP');
}

/**
 * A random 200-port window for the public proxy ports that avoids the ports `avoid` and the
 * windows `taken`.
 * Windows below the kernel's ephemeral range (normally 20000-32767) are
 * preferred: no client socket or port-0 bind can then squat on a port Lodge
 * wants. Without room below it, the window falls inside 40000-59999.
 */
function pickPortRange(avoid, taken = []) {
  let low = 40000;
  let high = 59999;
  try {
    const [ephemeralLow] = fs
      .readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8')
      .trim()
      .split(/\s+/)
      .map(Number);
    if (ephemeralLow - 1 >= 20000 + 199 * 10) {
      low = 20000;
      high = ephemeralLow - 1;
    }
  } catch {
    // not Linux, or not readable: keep the default
  }
  const windows = Math.floor((high - low + 1) / 200);
  for (;;) {
    const start = low + 200 * crypto.randomInt(0, windows);
    const end = start + 199;
    if (avoid.some((p) => p >= start && p <= end)) continue;
    if (taken.some((r) => r.start <= end && start <= r.end)) continue;
    return { start, end };
  }
}

// ---------------------------------------------------------------------------
// The server

/**
 * Polls `url`/readyz until it answers 200, for as long as `owner.child` is still `child`
 * (an exit fails at once, with its code and signal).
 */
async function waitReady(owner, child, url, what) {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let lastError = 'no answer yet';
  while (Date.now() < deadline) {
    if (owner.child !== child) {
      const { code, signal } = await owner.exited;
      throw new Error(`${what} exited before it was ready (code ${code}, signal ${signal})`);
    }
    try {
      const res = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(1000) });
      await res.arrayBuffer();
      if (res.status === 200) return;
      lastError = `GET /readyz answered ${res.status}`;
    } catch (err) {
      lastError = err.cause?.code ?? err.message;
    }
    await sleep(READY_POLL_MS);
  }
  throw new Error(`${what} was not ready within ${READY_TIMEOUT_MS} ms (${lastError})`);
}

/** One exit of several: the first that was not a clean exit 0, else a clean exit 0. */
function combinedExit(results) {
  const exits = results.filter(Boolean).map(({ code, signal }) => ({ code, signal }));
  if (exits.length === 0) return null;
  return exits.find((e) => e.code !== 0 || e.signal !== null) ?? { code: 0, signal: null };
}

export class Lodge {
  constructor({ args = [], env = {}, isolation = 'none', apiHost = '127.0.0.1' } = {}) {
    this.extraArgs = args;
    this.apiHost = apiHost;
    this.isolation = isolation;
    this.extraEnv = env;
    this.adminToken = `lodge-test-${crypto.randomBytes(16).toString('hex')}`;
    /** The one box's `lodge serve` (a Member, as a replica is; made at the first start). */
    this.box = null;
    this.failed = false;
    this.dataDir = null;
    /** Replicas mode: the `lodge serve --no-local-node` replicas and the `lodge agent`s. */
    this.replicas = null;
    this.agents = null;
  }

  /** The one box's running server process (null when it is not running). */
  get child() {
    return this.box?.child ?? null;
  }

  /** The one box's last exit: resolves with {code, signal}. */
  get exited() {
    return this.box?.exited ?? null;
  }

  get url() {
    return `http://${this.apiHost}:${this.apiPort}`;
  }

  /** The server's log (replicas mode: replica 0's, the one that prints a minted admin token). */
  get logFile() {
    if (this.replicas) return this.replicas[0].logFile;
    return path.join(this.tmpDir, 'lodge.log');
  }

  /** Starts the server (first call: fresh data dir and ports; later: the same ones). */
  async start() {
    if (!fs.existsSync(LODGE_BIN)) {
      throw new Error(`lodge binary not found at ${LODGE_BIN} (build it, or set LODGE_BIN)`);
    }
    if (REPLICAS) return this.#startCluster();
    if (this.child) throw new Error('lodge is already running');
    if (!this.tmpDir) {
      this.tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-conformance-'));
      this.dataDir = path.join(this.tmpDir, 'data');
      this.apiPort = await freeTcpPort();
      do {
        this.pingPort = await freeTcpUdpPort();
      } while (this.pingPort === this.apiPort);
      this.portRange = pickPortRange([this.apiPort, this.pingPort]);
      await this.#makeSchema();
    }

    const args = [
      'serve',
      '--data-dir', this.dataDir,
      '--api-addr', `${this.apiHost}:${this.apiPort}`,
      '--port-range', `${this.portRange.start}-${this.portRange.end}`,
      '--ping-port', String(this.pingPort),
      '--isolation', this.isolation,
      ...(this.storeArgs ?? []),
      ...this.extraArgs,
    ];
    this.box ??= new Member('lodge', this.logFile);
    const child = this.box.spawn(args, this.#env());

    try {
      await waitReady(this.box, child, this.url, 'lodge');
    } catch (err) {
      this.failed = true; // teardown prints the log
      throw err;
    }
  }

  /** LODGE_TEST_STORE: a schema of this Lodge's own, and the --store that selects it. */
  async #makeSchema() {
    if (TEST_STORE && !this.extraArgs.includes('--store')) {
      this.pgSchema = `lodge_conf_${process.pid}_${crypto.randomBytes(4).toString('hex')}`;
      await psql(`CREATE SCHEMA ${this.pgSchema}`);
      const sep = TEST_STORE.includes('?') ? '&' : '?';
      this.storeArgs = ['--store', `${TEST_STORE}${sep}options=-csearch_path%3D${this.pgSchema}`];
    }
  }

  /** The environment of the server (and in replicas mode of every replica and agent). */
  #env() {
    // Inherited LODGE_* settings (a developer's shell) must not leak into the test server.
    const env = Object.fromEntries(
      Object.entries(process.env).filter(([key]) => !key.startsWith('LODGE_')),
    );
    Object.assign(env, {
      LODGE_ADMIN_TOKEN: this.adminToken,
      RUST_LOG: process.env.RUST_LOG || 'info',
      NO_COLOR: '1', // plain log lines in lodge.log
      ...this.extraEnv,
    });
    return env;
  }

  /** SIGTERM, then waits for the exit. Returns {code, signal}. */
  async stop(timeoutMs = STOP_TIMEOUT_MS) {
    if (this.replicas) {
      // Every member at once; the first exit that was not a clean 0 is the answer.
      const members = this.#members().filter((m) => m.child);
      const results = await Promise.allSettled(members.map((m) => m.stop(timeoutMs)));
      const failed = results.find((r) => r.status === 'rejected');
      if (failed) throw failed.reason;
      return combinedExit(results.map((r) => r.value));
    }
    return this.box ? this.box.stop(timeoutMs) : null;
  }

  /** SIGKILL, then waits for the exit. */
  async kill9() {
    if (this.replicas) return combinedExit(await Promise.all(this.#members().map((m) => m.kill9())));
    return this.box ? this.box.kill9() : null;
  }

  /** Starts the server again on the same data dir and ports (stopping it first if it runs). */
  async restart() {
    if (this.child || this.#members().some((m) => m.child)) await this.stop();
    await this.start();
  }

  /** Per-process state written by the server: [{processId, shimPid, gamePid, ...}]. */
  processStates() {
    const states = [];
    for (const dataDir of this.nodeDataDirs) {
      const dir = path.join(dataDir, 'processes');
      let entries = [];
      try {
        entries = fs.readdirSync(dir);
      } catch {
        continue;
      }
      for (const processId of entries) {
        try {
          const state = JSON.parse(fs.readFileSync(path.join(dir, processId, 'state.json'), 'utf8'));
          states.push({ processId, ...state });
        } catch {
          // not written yet, or being rewritten
        }
      }
    }
    return states;
  }

  processState(processId) {
    return this.processStates().find((s) => s.processId === processId) ?? null;
  }

  /**
   * The data dirs that hold processes (`<dir>/processes/<id>`): the one box's data dir, or
   * in replicas mode every agent's.
   */
  get nodeDataDirs() {
    if (this.agents) return this.agents.map((a) => a.dataDir);
    return this.dataDir ? [this.dataDir] : [];
  }

  /** The directory of a process's files (state.json, log, ...), wherever its node keeps it. */
  processDir(processId) {
    const dirs = this.nodeDataDirs.map((d) => path.join(d, 'processes', processId));
    return dirs.find((d) => fs.existsSync(d)) ?? dirs[0];
  }

  /** The node that runs `region`'s processes: {pid, dataDir} (the one box: lodge serve). */
  nodeFor(region) {
    if (!this.agents) return { pid: this.child?.pid, dataDir: this.dataDir };
    const agent = this.agents.find((a) => a.region === region);
    assert.ok(agent, `replicas mode: no agent serves ${region} (NODE_REGIONS)`);
    return { pid: agent.child?.pid, dataDir: agent.dataDir };
  }

  /** Regions with a node (null: every region, as the one box's embedded node serves all). */
  get nodeRegions() {
    return this.agents ? this.agents.map((a) => a.region) : null;
  }

  /** The ping port DiscoveryV2 lists for `region`. */
  pingPortOf(region) {
    if (!this.agents) return this.pingPort;
    return this.agents.find((a) => a.region === region)?.pingPort;
  }

  /**
   * Where the server unpacked a build. In replicas mode the upload's parts, its assembly and
   * RunBuild may each have gone to a different replica, so several may have a directory for
   * it: the one with the unpacked `bundle` is the replica that ran it.
   */
  buildDir(buildId) {
    const dirs = (this.replicas ?? [this]).map((r) => path.join(r.dataDir, 'builds', buildId));
    return (
      dirs.find((d) => fs.existsSync(path.join(d, 'bundle')))
      ?? dirs.find((d) => fs.existsSync(d))
      ?? dirs[0]
    );
  }

  /** Stops the server, kills leftover game-server processes, prints the log if needed. */
  async teardown() {
    try {
      if (this.child || this.#members().some((m) => m.child)) {
        try {
          await this.stop();
        } catch (err) {
          this.failed = true;
          console.error(String(err));
        }
      }
    } finally {
      // Game servers outlive Lodge by design: end them, with their namespaces, cgroups,
      // containers and the bridge (`lodge cleanup`).
      await Promise.all(
        this.nodeDataDirs
          .filter((dir) => fs.existsSync(dir))
          .map((dir) =>
            execFileAsync(LODGE_BIN, ['cleanup', '--data-dir', dir]).catch((err) =>
              console.error(`lodge cleanup --data-dir ${dir} failed: ${err.stderr || err.message}`)),
          ),
      );
      if (this.pgSchema && process.env.LODGE_KEEP !== '1') {
        await psql(`DROP SCHEMA IF EXISTS ${this.pgSchema} CASCADE`).catch((err) =>
          console.error(`dropping schema ${this.pgSchema} failed: ${err.stderr || err.message}`));
      }
      await this.front?.close();
      if (this.tmpDir) {
        if (this.failed || process.env.LODGE_LOG === '1') this.printLog('lodge log');
        if (!this.failed && process.env.LODGE_KEEP !== '1') {
          fs.rmSync(this.tmpDir, { recursive: true, force: true });
        } else {
          console.error(`lodge data kept in ${this.tmpDir}`);
        }
      }
    }
  }

  /** The server's log (replicas mode: every replica's and agent's, one after the other). */
  readLog() {
    const read = (file) => {
      try {
        return fs.readFileSync(file, 'utf8');
      } catch {
        return '';
      }
    };
    if (!this.replicas) return read(this.logFile);
    return this.#members()
      .map((m) => `=== ${m.name} (${m.logFile})\n${read(m.logFile)}`)
      .join('\n');
  }

  /** Prints the server log, then the last lines of every game-server log. */
  printLog(title) {
    const show = (heading, text) => {
      const lines = text.split('\n').map((line) => `| ${line}`);
      console.error(`---- ${heading} ----\n${lines.join('\n')}\n---- end ----`);
    };
    if (this.replicas) {
      for (const m of this.#members()) {
        let text = '';
        try {
          text = fs.readFileSync(m.logFile, 'utf8');
        } catch {
          // never started
        }
        show(`${title}: ${m.name} (${m.logFile})`, text);
      }
      if (this.front) console.error(`front ${this.url} (${FRONT_MODE}): requests per replica ${JSON.stringify(this.front.requests)}`);
    } else {
      show(`${title} (${this.logFile})`, this.readLog());
    }
    for (const dataDir of this.nodeDataDirs) {
      const dir = path.join(dataDir, 'processes');
      let processIds = [];
      try {
        processIds = fs.readdirSync(dir);
      } catch {
        continue;
      }
      for (const processId of processIds) {
        const file = path.join(dir, processId, 'log');
        try {
          const tail = fs.readFileSync(file, 'utf8').split('\n').slice(-40).join('\n');
          show(`game server log, last 40 lines (${file})`, tail);
        } catch {
          // no log for this process
        }
      }
    }
  }

  // -------------------------------------------------------------------------
  // Replicas mode (LODGE_TEST_REPLICAS)
  //
  // What the one box's fields mean here:
  //   url, apiPort   the front (the only address tests and agents use)
  //   dataDir        replica 0's data dir (admin-token, builds it took); buildDir() finds a
  //                  build on whichever replica took it
  //   logFile        replica 0's log; readLog() is every replica's and agent's
  //   pingPort       the ping port of the first agent (pingPortOf(region) for the others)
  //   portRange      the first agent's window (every agent has one of its own: agents[i])
  //   processStates(), processDir(), nodeDataDirs   every agent's data dir
  //   stop(), kill9(), start(), restart()           every replica and agent at once (a
  //                  restart keeps data dirs, ports and the agents' credentials)
  //   killReplica(i), stopReplica(i), startReplica(i)  one replica; frontCounts() says how
  //                  many requests each replica took
  //   nodeFor(region), nodeRegions, pingPortOf(region)  the agents, by region

  #members() {
    return [...(this.replicas ?? []), ...(this.agents ?? [])];
  }

  async #initCluster() {
    this.tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-conformance-'));
    await this.#makeSchema();
    const { serve, agent } = splitArgs(this.extraArgs);
    this.serveArgs = serve;
    this.agentArgs = agent;
    const taken = new Set();
    const port = async (udpToo) => {
      for (;;) {
        const p = udpToo ? await freeTcpUdpPort() : await freeTcpPort();
        if (!taken.has(p)) {
          taken.add(p);
          return p;
        }
      }
    };
    this.replicas = [];
    for (let i = 0; i < TEST_REPLICAS; i++) {
      const r = new Member(`replica-${i}`, path.join(this.tmpDir, `replica-${i}.log`));
      r.index = i;
      r.dataDir = path.join(this.tmpDir, `replica-${i}`);
      r.apiPort = await port(false);
      r.pingPort = await port(true);
      this.replicas.push(r);
    }
    this.front = await FrontHandle.start(this.apiHost, this.replicas.map((r) => r.apiPort), FRONT_MODE);
    this.apiPort = this.front.port;
    taken.add(this.apiPort);
    // --no-local-node: the test brings its own nodes. --regions: only those get an agent.
    const listed = flagValue(serve, '--regions');
    const regions = hasFlag(serve, '--no-local-node')
      ? []
      : listed && listed !== 'all'
        ? listed.split(',').map((r) => r.trim())
        : NODE_REGIONS;
    this.agents = [];
    for (const region of regions) {
      const a = new Member(`agent-${region}`, path.join(this.tmpDir, `agent-${region}.log`));
      a.region = region;
      a.dataDir = path.join(this.tmpDir, `agent-${region}`);
      a.pingPort = await port(true);
      this.agents.push(a);
    }
    for (const a of this.agents) {
      a.portRange = pickPortRange([...taken], this.agents.map((b) => b.portRange).filter(Boolean));
    }
    this.dataDir = this.replicas[0].dataDir;
    this.pingPort = this.agents[0]?.pingPort ?? this.replicas[0].pingPort;
    this.portRange = this.agents[0]?.portRange ?? null;
  }

  async #startCluster() {
    if (!this.tmpDir) await this.#initCluster();
    const members = this.#members();
    if (members.every((m) => m.child)) throw new Error('lodge is already running');
    try {
      if (!this.booted) {
        // Replica 0 alone first: it makes the schema and, without LODGE_ADMIN_TOKEN, mints the
        // admin token, which the others then get as a file (an operator's copy).
        await this.#startReplica(this.replicas[0]);
        if (this.#mintsToken()) {
          const saved = path.join(this.replicas[0].dataDir, 'admin-token');
          for (const r of this.replicas.slice(1)) {
            fs.mkdirSync(r.dataDir, { recursive: true, mode: 0o700 });
            fs.copyFileSync(saved, path.join(r.dataDir, 'admin-token'));
            fs.chmodSync(path.join(r.dataDir, 'admin-token'), 0o600);
          }
        }
      }
      await Promise.all(this.replicas.filter((r) => !r.child).map((r) => this.#startReplica(r)));
      const down = this.agents.filter((a) => !a.child);
      if (down.length > 0) {
        await Promise.all(down.map((a) => this.#startAgent(a)));
        await this.#waitNodes(down);
      }
      this.booted = true;
    } catch (err) {
      this.failed = true; // teardown prints the logs
      throw err;
    }
  }

  /** SIGKILL to replica `i`; resolves with its exit. */
  async killReplica(i) {
    assert.ok(this.replicas?.[i], `no replica ${i} (LODGE_TEST_REPLICAS=${TEST_REPLICAS})`);
    return this.replicas[i].kill9();
  }

  /** SIGTERM to replica `i`; resolves with its exit. */
  async stopReplica(i, timeoutMs = STOP_TIMEOUT_MS) {
    assert.ok(this.replicas?.[i], `no replica ${i} (LODGE_TEST_REPLICAS=${TEST_REPLICAS})`);
    return this.replicas[i].stop(timeoutMs);
  }

  /** Starts replica `i` again (same data dir and ports) and waits for its /readyz. */
  async startReplica(i) {
    assert.ok(this.replicas?.[i], `no replica ${i} (LODGE_TEST_REPLICAS=${TEST_REPLICAS})`);
    try {
      await this.#startReplica(this.replicas[i]);
    } catch (err) {
      this.failed = true;
      throw err;
    }
  }

  /** Requests the front sent to each replica so far: {'replica-0': n, ...}. */
  frontCounts() {
    return this.front?.requests ?? {};
  }

  async #startReplica(r) {
    const args = [
      'serve',
      '--data-dir', r.dataDir,
      '--api-addr', `${this.apiHost}:${r.apiPort}`,
      '--ping-port', String(r.pingPort),
      ...(hasFlag(this.serveArgs, '--no-local-node') ? [] : ['--no-local-node']),
      ...(this.storeArgs ?? []),
      ...this.serveArgs,
    ];
    const child = r.spawn(args, this.#env());
    await waitReady(r, child, `http://${this.apiHost}:${r.apiPort}`, r.name);
  }

  /** Without LODGE_ADMIN_TOKEN (env: {LODGE_ADMIN_TOKEN: ''}) Lodge mints the admin token. */
  #mintsToken() {
    return 'LODGE_ADMIN_TOKEN' in this.extraEnv && !this.extraEnv.LODGE_ADMIN_TOKEN;
  }

  /** The admin token the harness itself uses (join tokens, node checks). */
  #harnessToken() {
    if (this.#mintsToken()) {
      return fs.readFileSync(path.join(this.replicas[0].dataDir, 'admin-token'), 'utf8').trim();
    }
    return this.extraEnv.LODGE_ADMIN_TOKEN ?? this.adminToken;
  }

  async #startAgent(a) {
    const credential = path.join(a.dataDir, 'node-credential.json');
    const own = [
      ['--control-plane', this.url],
      ['--region', a.region],
      ['--data-dir', a.dataDir],
      ['--public-host', this.apiHost],
      ['--port-range', `${a.portRange.start}-${a.portRange.end}`],
      ['--ping-port', String(a.pingPort)],
      ['--isolation', this.isolation],
      // The one box's embedded node places by ports only: so do these, unless a test says.
      ['--cpu', '1024'],
      ['--memory-mb', String(1 << 20)],
    ];
    // The first start joins with a join token; later ones connect with the saved credential.
    if (!fs.existsSync(credential)) {
      const res = await fetch(`${this.url}/lodge/v1/nodes/join-tokens`, {
        method: 'POST',
        headers: { authorization: `Bearer ${this.#harnessToken()}`, 'content-type': 'application/json' },
        body: JSON.stringify({ region: a.region, ttlSeconds: 600 }),
        signal: AbortSignal.timeout(10_000),
      });
      const text = await res.text();
      assert.ok(res.ok, `POST /lodge/v1/nodes/join-tokens for ${a.region} answered ${res.status}: ${text}`);
      own.push(['--join-token', JSON.parse(text).token]);
    }
    const args = ['agent', ...own.filter(([flag]) => !hasFlag(this.agentArgs, flag)).flat(), ...this.agentArgs];
    a.spawn(args, this.#env());
  }

  /**
   * Waits until every agent of `agents` is attached: its node connected to some replica
   * since the agent started, and reachable in every running replica's view.
   */
  async #waitNodes(agents) {
    const token = this.#harnessToken();
    const deadline = Date.now() + READY_TIMEOUT_MS;
    let last = 'no answer yet';
    while (Date.now() < deadline) {
      for (const a of agents) {
        if (!a.child) {
          const { code, signal } = await a.exited;
          throw new Error(`${a.name} exited before it was attached (code ${code}, signal ${signal})`);
        }
        if (!a.nodeId) {
          try {
            a.nodeId = JSON.parse(fs.readFileSync(path.join(a.dataDir, 'node-credential.json'), 'utf8')).nodeId;
          } catch {
            // not joined yet
          }
        }
      }
      const unjoined = agents.filter((a) => !a.nodeId);
      if (unjoined.length > 0) {
        last = `not joined yet: ${unjoined.map((a) => a.name).join(', ')}`;
      } else {
        try {
          const views = await Promise.all(
            this.replicas
              .filter((r) => r.child)
              .map(async (r) => {
                const res = await fetch(`http://${this.apiHost}:${r.apiPort}/lodge/v1/nodes`, {
                  headers: { authorization: `Bearer ${token}` },
                  signal: AbortSignal.timeout(2000),
                });
                const body = await res.json();
                if (!res.ok) throw new Error(`${r.name}: GET /lodge/v1/nodes answered ${res.status}: ${body.message}`);
                return new Map(body.nodes.map((n) => [n.nodeId, n]));
              }),
          );
          const pending = agents.filter((a) => {
            const seen = views.map((v) => v.get(a.nodeId));
            const attached = seen.some(
              (n) => n?.connected && n.lastHeardAt && Date.parse(n.lastHeardAt) >= a.startedAt - 1000,
            );
            return !attached || !seen.every((n) => n?.reachable);
          });
          if (pending.length === 0) return;
          last = `not attached yet: ${pending.map((a) => a.name).join(', ')}`;
        } catch (err) {
          last = err.cause?.code ?? err.message;
        }
      }
      await sleep(100);
    }
    throw new Error(`the agents were not attached within ${READY_TIMEOUT_MS} ms (${last})`);
  }

  /** An SDK client. `token` defaults to the admin token; pass null for no token at all. */
  sdk(token = this.adminToken) {
    const options = { serverURL: this.url };
    if (token !== null) options.hathoraDevToken = token;
    return new HathoraCloud(options);
  }

  /** The default org's id, discovered through GetOrgs. */
  async orgId() {
    if (!this._orgId) {
      const { orgs } = await this.sdk().organizationsV1.getOrgs();
      assert.equal(orgs.length, 1, 'the admin token sees exactly one org');
      this._orgId = orgs[0].orgId;
    }
    return this._orgId;
  }

  /** The echo bundle uploaded once per server (builds are org-scoped). */
  async echoBuild() {
    if (!this._echoBuild) {
      this._echoBuild = (async () => {
        const bundle = await makeBundle(ECHO_DIR);
        const { build } = await uploadBuild(this.sdk(), await this.orgId(), bundle, {
          buildTag: 'echo-1.0.0',
        });
        assert.equal(build.status, 'succeeded', 'echo build succeeded');
        return build;
      })();
    }
    return this._echoBuild;
  }

  /**
   * A new app with a deployment of the echo server.
   * opts: {roomsPerProcess, debug, deploymentTag, env} (see deployEcho).
   */
  async echoApp(opts = {}) {
    const sdk = this.sdk();
    const orgId = await this.orgId();
    const app = await sdk.appsV2.createApp(
      { appName: uniqueName('echo'), authConfiguration: { anonymous: {} } },
      orgId,
    );
    const build = await this.echoBuild();
    const deployment = await deployEcho(sdk, app.appId, build.buildId, opts);
    return { sdk, orgId, app, appId: app.appId, build, deployment };
  }
}

/**
 * Registers before/after hooks that run one Lodge for the current file (or
 * describe block) and returns it. `setup(lodge)`, if given, runs in the same
 * before hook once the server is ready (a separate before hook is not
 * guaranteed to wait for the server). The log is printed if any test failed.
 */
export function useLodge({ setup, ...options } = {}) {
  const lodge = new Lodge(options);
  before(
    async () => {
      await lodge.start();
      if (setup) {
        try {
          await setup(lodge);
        } catch (err) {
          lodge.failed = true;
          throw err;
        }
      }
    },
    { timeout: READY_TIMEOUT_MS + 60_000 },
  );
  afterEach((t) => {
    if (t?.passed === false) lodge.failed = true;
  });
  after(() => lodge.teardown(), { timeout: TEARDOWN_TIMEOUT_MS });
  return lodge;
}

// ---------------------------------------------------------------------------
// Replicas mode: the members of a Lodge, their flags, and the front

/** One `lodge serve` replica or `lodge agent` of a Lodge in replicas mode. */
class Member {
  constructor(name, logFile) {
    this.name = name;
    this.logFile = logFile;
    this.child = null;
    this.exited = null;
    this.startedAt = 0;
    /** The executable: another binary on the same data dir is how an upgrade is tested. */
    this.bin = LODGE_BIN;
  }

  /** Starts `lodge ARGS`, appending to its log (0600: it may hold a minted admin token). */
  spawn(args, env) {
    if (this.child) throw new Error(`${this.name} is already running`);
    const logFd = fs.openSync(this.logFile, 'a', 0o600);
    fs.writeSync(logFd, `\n=== ${new Date().toISOString()} ${this.bin} ${args.join(' ')}\n`);
    const child = spawn(this.bin, args, { env, stdio: ['ignore', logFd, logFd] });
    fs.closeSync(logFd);
    this.child = child;
    this.startedAt = Date.now();
    running.add(this);
    this.exited = new Promise((resolve) => {
      const gone = (result) => {
        running.delete(this);
        if (this.child === child) this.child = null;
        resolve(result);
      };
      child.once('exit', (code, signal) => gone({ code, signal }));
      child.once('error', (err) => {
        fs.appendFileSync(this.logFile, `spawn error: ${err.stack}\n`);
        gone({ code: null, signal: null, error: err });
      });
    });
    return child;
  }

  async stop(timeoutMs = STOP_TIMEOUT_MS) {
    const child = this.child;
    if (!child) return null;
    child.kill('SIGTERM');
    try {
      return await withTimeout(this.exited, timeoutMs);
    } catch {
      child.kill('SIGKILL');
      await this.exited;
      throw new Error(`${this.name} did not exit within ${timeoutMs} ms of SIGTERM`);
    }
  }

  async kill9() {
    const child = this.child;
    if (!child) return null;
    child.kill('SIGKILL');
    return this.exited;
  }
}

const flagTables = new Map();

/** The flags `lodge SUBCOMMAND` accepts (from its --help): flag → whether it takes a value. */
function flagsOf(subcommand) {
  if (!flagTables.has(subcommand)) {
    const help = execFileSync(LODGE_BIN, [subcommand, '--help'], { encoding: 'utf8' });
    const flags = new Map();
    for (const m of help.matchAll(/^ {2,}(?:-[A-Za-z], )?(--[a-z0-9][a-z0-9-]*)( <[^>]+>)?/gm)) {
      flags.set(m[1], Boolean(m[2]));
    }
    assert.ok(flags.size > 0, `no flags found in lodge ${subcommand} --help`);
    flagTables.set(subcommand, flags);
  }
  return flagTables.get(subcommand);
}

/**
 * A Lodge's extra args, split between its replicas and its agents by the flags each
 * subcommand accepts: control-plane flags (--lobby-rate-limit, --google-jwks, ...) go to the
 * replicas, node flags (--cpu, ...) to the agents, the node flags `lodge serve` takes too
 * (--metrics-interval, --stop-grace, --oci-runtime, --proxy-bind, ...) to both. A flag
 * neither knows goes to the replicas, which refuse it.
 */
function splitArgs(args) {
  const serveFlags = flagsOf('serve');
  const agentFlags = flagsOf('agent');
  const out = { serve: [], agent: [] };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (!arg.startsWith('--')) {
      out.serve.push(arg);
      continue;
    }
    const name = arg.split('=')[0];
    const takesValue = (serveFlags.get(name) ?? agentFlags.get(name)) && !arg.includes('=');
    const group = takesValue && i + 1 < args.length ? [arg, args[++i]] : [arg];
    if (serveFlags.has(name) || !agentFlags.has(name)) out.serve.push(...group);
    if (agentFlags.has(name)) out.agent.push(...group);
  }
  return out;
}

const hasFlag = (args, flag) => args.some((a) => a === flag || a.startsWith(`${flag}=`));

function flagValue(args, flag) {
  for (let i = 0; i < args.length; i++) {
    if (args[i] === flag) return args[i + 1];
    if (args[i].startsWith(`${flag}=`)) return args[i].slice(flag.length + 1);
  }
  return undefined;
}

/**
 * The round-robin HTTP front of a Lodge in replicas mode (lib/front.js, in a worker thread: it
 * serves while a test blocks its own thread). `lodge.url` is its address.
 */
class FrontHandle {
  static async start(host, ports, mode) {
    const counts = new Int32Array(new SharedArrayBuffer(4 * ports.length));
    const worker = new Worker(new URL('./front.js', import.meta.url), { workerData: { host, ports, mode, counts } });
    const port = await new Promise((resolve, reject) => {
      worker.once('message', (msg) => resolve(msg.listening));
      worker.once('error', reject);
      worker.once('exit', (code) => reject(new Error(`the front exited with ${code} before it listened`)));
    });
    worker.on('error', (err) => console.error(`the replicas' front failed: ${err.stack}`));
    worker.unref(); // an abandoned Lodge must not keep the test process alive
    const front = new FrontHandle();
    Object.assign(front, { worker, port, counts });
    return front;
  }

  /** Requests sent to each replica so far: {'replica-0': n, ...}. */
  get requests() {
    return Object.fromEntries([...this.counts].map((n, i) => [`replica-${i}`, Atomics.load(this.counts, i)]));
  }

  async close() {
    if (this.closed) return;
    this.closed = true;
    const exited = new Promise((resolve) => this.worker.once('exit', resolve));
    this.worker.postMessage({ close: true });
    await withTimeout(exited, 5000).catch(() => this.worker.terminate());
  }
}

// ---------------------------------------------------------------------------
// Builds and deployments

/**
 * The key Lodge derives from a node's data dir (FNV-1a of its real path, 24 bits, hex): its
 * bridge (`lodge<key>`), nftables table (`lodge_<key>`) and namespaces (`lodge-<key>-N`).
 */
export function instanceKey(dataDir) {
  let h = 0xcbf29ce484222325n;
  // A removed data dir (after teardown) keys by its path as given.
  for (const b of Buffer.from(fs.existsSync(dataDir) ? fs.realpathSync(dataDir) : dataDir)) {
    h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  }
  return (h & 0xffffffn).toString(16).padStart(6, '0');
}

export function uniqueName(prefix) {
  return `${prefix}-${crypto.randomBytes(4).toString('hex')}`;
}

/** A gzipped tarball of `dir` (its contents at the archive root), as a Buffer. */
export async function makeBundle(dir) {
  const { stdout } = await execFileAsync('tar', ['czf', '-', '-C', dir, '.'], {
    encoding: 'buffer',
    maxBuffer: 256 * 1024 * 1024,
  });
  return stdout;
}

function xmlText(value) {
  return String(value).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/**
 * The v3 multipart upload, as hathora/ci and the engine plugins do it
 * (hathora-api.md §6.2): CreateBuild, PUT every part to its presigned URL,
 * POST the CompleteMultipartUpload XML, RunBuild (stream read to the end),
 * GetBuild. Returns {created, build, log}.
 */
export async function uploadBuild(sdk, orgId, buf, { buildTag, buildId } = {}) {
  const created = await sdk.buildsV3.createBuild(
    { buildSizeInBytes: buf.length, buildTag, buildId },
    orgId,
  );
  assert.equal(created.status, 'created');
  const chunk = created.maxChunkSize;
  assert.ok(Number.isInteger(chunk) && chunk > 0, `maxChunkSize is a positive integer (${chunk})`);
  assert.equal(
    created.uploadParts.length,
    Math.ceil(buf.length / chunk),
    'one upload part per maxChunkSize bytes',
  );

  const parts = await Promise.all(
    created.uploadParts.map(async ({ partNumber, putRequestUrl }) => {
      const body = buf.subarray(chunk * (partNumber - 1), Math.min(chunk * partNumber, buf.length));
      const res = await fetch(putRequestUrl, {
        method: 'PUT',
        body,
        headers: {
          'Content-Type': 'application/octet-stream',
          'Content-Length': String(body.length),
        },
      });
      const text = await res.text();
      assert.equal(res.status, 200, `PUT part ${partNumber} answered ${res.status}: ${text}`);
      const etag = res.headers.get('etag');
      assert.ok(etag, `PUT part ${partNumber} answered with an ETag header`);
      return { partNumber, etag };
    }),
  );

  parts.sort((a, b) => a.partNumber - b.partNumber);
  const xml =
    '<CompleteMultipartUpload>' +
    parts
      .map((p) => `<Part><PartNumber>${p.partNumber}</PartNumber><ETag>${xmlText(p.etag)}</ETag></Part>`)
      .join('') +
    '</CompleteMultipartUpload>';
  const done = await fetch(created.completeUploadPostRequestUrl, {
    method: 'POST',
    body: xml,
    headers: { 'Content-Type': 'application/xml' },
  });
  const doneText = await done.text();
  assert.equal(done.status, 200, `completing the upload answered ${done.status}: ${doneText}`);

  const stream = await sdk.buildsV3.runBuild(created.buildId, orgId);
  const log = await new Response(stream).text();
  const build = await sdk.buildsV3.getBuild(created.buildId, orgId);
  return { created, build, log };
}

/**
 * Deploys the echo server: UDP on container port 7777, optionally a TCP
 * 'debug' port 7778. opts: {roomsPerProcess = 2, debug = false, deploymentTag, env = []}.
 */
export function deployEcho(sdk, appId, buildId, opts = {}) {
  const config = {
    buildId,
    idleTimeoutEnabled: false,
    env: [{ name: 'GREETING', value: 'from-deployment' }, ...(opts.env ?? [])],
    roomsPerProcess: opts.roomsPerProcess ?? 2,
    transportType: 'udp',
    containerPort: 7777,
    requestedCPU: 0.5,
    requestedMemoryMB: 1024,
  };
  if (opts.debug) config.additionalContainerPorts = [{ name: 'debug', port: 7778, transportType: 'tcp' }];
  if (opts.deploymentTag !== undefined) config.deploymentTag = opts.deploymentTag;
  return sdk.deploymentsV3.createDeployment(config, appId);
}

// ---------------------------------------------------------------------------
// Polling

/**
 * Calls `fn` every `intervalMs` until it returns a truthy value, and returns
 * that value; fails after `timeoutMs` with `what` and the last value seen.
 */
export async function waitFor(fn, { timeoutMs = 15_000, intervalMs = 25, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await sleep(intervalMs);
  }
}

/** Polls GetConnectionInfo until the room is active; returns the ConnectionInfoV2. */
export async function waitActive(sdk, appId, roomId, timeoutMs = 20_000) {
  let last;
  try {
    return await waitFor(
      async () => {
        last = await sdk.roomsV2.getConnectionInfo(roomId, appId);
        return last.status === 'active' ? last : null;
      },
      { timeoutMs, what: `room ${roomId} to become active` },
    );
  } catch (err) {
    err.message += ` (last connection info: ${JSON.stringify(last)})`;
    throw err;
  }
}

/** Polls GetProcess until its status is one of `statuses`; returns the ProcessV3. */
export async function waitProcessStatus(sdk, appId, processId, statuses, timeoutMs = 15_000) {
  const wanted = [].concat(statuses);
  let last;
  try {
    return await waitFor(
      async () => {
        last = await sdk.processesV3.getProcess(processId, appId);
        return wanted.includes(last.status) ? last : null;
      },
      { timeoutMs, what: `process ${processId} to reach ${wanted.join('|')}` },
    );
  } catch (err) {
    err.message += ` (last status: ${last?.status})`;
    throw err;
  }
}

/** Polls GetRoomInfo until the room has `status`; returns the Room. */
export async function waitRoomStatus(sdk, appId, roomId, status, timeoutMs = 15_000) {
  let last;
  try {
    return await waitFor(
      async () => {
        last = await sdk.roomsV2.getRoomInfo(roomId, appId);
        return last.status === status ? last : null;
      },
      { timeoutMs, what: `room ${roomId} to be ${status}` },
    );
  } catch (err) {
    err.message += ` (last status: ${last?.status})`;
    throw err;
  }
}

// ---------------------------------------------------------------------------
// Talking to game servers

/**
 * Sends `msg` over UDP (again every `resendMs` until answered) and resolves
 * with the first reply as a string; rejects after `timeoutMs` without one.
 */
export function udpRequest(host, port, msg, timeoutMs = 3000, { resendMs = 200 } = {}) {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket(net.isIPv6(host) ? 'udp6' : 'udp4');
    const payload = Buffer.from(msg);
    let closed = false;
    const finish = (err, value) => {
      if (closed) return;
      closed = true;
      clearTimeout(timer);
      clearInterval(resender);
      socket.close();
      if (err) reject(err);
      else resolve(value);
    };
    const send = () => {
      if (!closed) socket.send(payload, port, host, () => {});
    };
    socket.on('message', (data) => finish(null, data.toString('utf8')));
    socket.on('error', (err) => finish(err));
    const timer = setTimeout(
      () => finish(new Error(`no UDP reply from ${host}:${port} within ${timeoutMs} ms`)),
      timeoutMs,
    );
    const resender = setInterval(send, resendMs);
    send();
  });
}

/** True if a UDP echo at host:port answers within `timeoutMs`. */
export async function udpAnswers(host, port, timeoutMs = 600) {
  try {
    await udpRequest(host, port, 'ping', timeoutMs);
    return true;
  } catch {
    return false;
  }
}

/**
 * Opens a TCP connection, writes `msg`, and resolves with what came back once
 * at least `minBytes` arrived (default: the length of an echo of `msg`).
 */
export function tcpRequest(host, port, msg, { timeoutMs = 3000, minBytes } = {}) {
  const payload = Buffer.from(msg);
  const wanted = minBytes ?? payload.length;
  return new Promise((resolve, reject) => {
    const chunks = [];
    let received = 0;
    let settled = false;
    const socket = net.connect({ host, port });
    const finish = (err) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      if (err) reject(err);
      else resolve(Buffer.concat(chunks).toString('utf8'));
    };
    const timer = setTimeout(
      () => finish(new Error(`TCP ${host}:${port}: ${received} of ${wanted} bytes within ${timeoutMs} ms`)),
      timeoutMs,
    );
    socket.on('connect', () => socket.write(payload));
    socket.on('data', (data) => {
      chunks.push(data);
      received += data.length;
      if (received >= wanted) finish();
    });
    socket.on('error', finish);
    socket.on('close', () => finish(received >= wanted ? undefined : new Error(`TCP ${host}:${port} closed early`)));
  });
}

// ---------------------------------------------------------------------------
// Assertions

/**
 * Awaits `promise`, expects it to fail with an HTTP error whose status is
 * `status` (a number, an array of numbers, or a predicate), and returns the
 * error. With `typed` (default) the body must be the JSON ApiError
 * `{"message"}`, which the SDK decodes as errors.ApiError.
 */
export async function expectHttpError(promise, status, { typed = true } = {}) {
  let error;
  try {
    await promise;
  } catch (err) {
    error = err;
  }
  const wanted =
    typeof status === 'function' ? 'a matching status' : [].concat(status).join(' or ');
  assert.ok(error, `expected HTTP ${wanted}, but the call succeeded`);
  assert.ok(
    error instanceof HathoraCloudError && !(error instanceof ResponseValidationError),
    `expected an HTTP error response (${wanted}), got ${error?.name}: ${error?.message}`,
  );
  const ok =
    typeof status === 'function' ? status(error.statusCode) : [].concat(status).includes(error.statusCode);
  assert.ok(ok, `expected HTTP ${wanted}, got ${error.statusCode}: ${error.body}`);
  if (typed) {
    assert.ok(
      error instanceof ApiError,
      `expected a JSON {"message"} body for ${error.statusCode}, got ${error.contentType}: ${error.body}`,
    );
    assert.equal(typeof error.data$.message, 'string');
    assert.ok(error.data$.message.length > 0, 'error message is not empty');
  }
  return error;
}

export const is4xx = (status) => status >= 400 && status < 500;

/** Reads an SDK stream (ReadableStream<Uint8Array>) to the end as text. */
export function streamText(stream) {
  return new Response(stream).text();
}
