// Test harness for the Lodge conformance suite.
//
// Starts a real `lodge serve` as a child process on a temporary data dir and
// free ports, and offers the helpers the tests share: an SDK client, the v3
// multipart build upload, the echo deployment, polling, and UDP/TCP probes.
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

import { spawn, execFile } from 'node:child_process';
import crypto from 'node:crypto';
import dgram from 'node:dgram';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
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
 * A random 200-port window for the public proxy ports that avoids `avoid`.
 * Windows below the kernel's ephemeral range (normally 20000-32767) are
 * preferred: no client socket or port-0 bind can then squat on a port Lodge
 * wants. Without room below it, the window falls inside 40000-59999.
 */
function pickPortRange(avoid) {
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
    if (!avoid.some((p) => p >= start && p <= end)) return { start, end };
  }
}

// ---------------------------------------------------------------------------
// The server

export class Lodge {
  constructor({ args = [], env = {}, isolation = 'none', apiHost = '127.0.0.1' } = {}) {
    this.extraArgs = args;
    this.apiHost = apiHost;
    this.isolation = isolation;
    this.extraEnv = env;
    this.adminToken = `lodge-test-${crypto.randomBytes(16).toString('hex')}`;
    this.child = null;
    this.exited = null;
    this.failed = false;
    this.dataDir = null;
  }

  get url() {
    return `http://${this.apiHost}:${this.apiPort}`;
  }

  get logFile() {
    return path.join(this.tmpDir, 'lodge.log');
  }

  /** Starts the server (first call: fresh data dir and ports; later: the same ones). */
  async start() {
    if (this.child) throw new Error('lodge is already running');
    if (!fs.existsSync(LODGE_BIN)) {
      throw new Error(`lodge binary not found at ${LODGE_BIN} (build it, or set LODGE_BIN)`);
    }
    if (!this.tmpDir) {
      this.tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-conformance-'));
      this.dataDir = path.join(this.tmpDir, 'data');
      this.apiPort = await freeTcpPort();
      do {
        this.pingPort = await freeTcpUdpPort();
      } while (this.pingPort === this.apiPort);
      this.portRange = pickPortRange([this.apiPort, this.pingPort]);
      if (TEST_STORE && !this.extraArgs.includes('--store')) {
        this.pgSchema = `lodge_conf_${process.pid}_${crypto.randomBytes(4).toString('hex')}`;
        await psql(`CREATE SCHEMA ${this.pgSchema}`);
        const sep = TEST_STORE.includes('?') ? '&' : '?';
        this.storeArgs = ['--store', `${TEST_STORE}${sep}options=-csearch_path%3D${this.pgSchema}`];
      }
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

    const logFd = fs.openSync(this.logFile, 'a');
    fs.writeSync(logFd, `\n=== ${new Date().toISOString()} ${LODGE_BIN} ${args.join(' ')}\n`);
    const child = spawn(LODGE_BIN, args, { env, stdio: ['ignore', logFd, logFd] });
    fs.closeSync(logFd);
    this.child = child;
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

    try {
      await this.#waitReady(child);
    } catch (err) {
      this.failed = true; // teardown prints the log
      throw err;
    }
  }

  async #waitReady(child) {
    const deadline = Date.now() + READY_TIMEOUT_MS;
    let lastError = 'no answer yet';
    while (Date.now() < deadline) {
      if (this.child !== child) {
        const { code, signal } = await this.exited;
        throw new Error(`lodge exited before it was ready (code ${code}, signal ${signal})`);
      }
      try {
        const res = await fetch(`${this.url}/readyz`, { signal: AbortSignal.timeout(1000) });
        await res.arrayBuffer();
        if (res.status === 200) return;
        lastError = `GET /readyz answered ${res.status}`;
      } catch (err) {
        lastError = err.cause?.code ?? err.message;
      }
      await sleep(READY_POLL_MS);
    }
    throw new Error(`lodge was not ready within ${READY_TIMEOUT_MS} ms (${lastError})`);
  }

  /** SIGTERM, then waits for the exit. Returns {code, signal}. */
  async stop(timeoutMs = STOP_TIMEOUT_MS) {
    const child = this.child;
    if (!child) return null;
    child.kill('SIGTERM');
    try {
      return await withTimeout(this.exited, timeoutMs);
    } catch {
      child.kill('SIGKILL');
      await this.exited;
      throw new Error(`lodge did not exit within ${timeoutMs} ms of SIGTERM`);
    }
  }

  /** SIGKILL, then waits for the exit. */
  async kill9() {
    const child = this.child;
    if (!child) return null;
    child.kill('SIGKILL');
    return this.exited;
  }

  /** Starts the server again on the same data dir and ports (stopping it first if it runs). */
  async restart() {
    if (this.child) await this.stop();
    await this.start();
  }

  /** Per-process state written by the server: [{processId, shimPid, gamePid, ...}]. */
  processStates() {
    const dir = path.join(this.dataDir, 'processes');
    let entries = [];
    try {
      entries = fs.readdirSync(dir);
    } catch {
      return [];
    }
    const states = [];
    for (const processId of entries) {
      try {
        const state = JSON.parse(fs.readFileSync(path.join(dir, processId, 'state.json'), 'utf8'));
        states.push({ processId, ...state });
      } catch {
        // not written yet, or being rewritten
      }
    }
    return states;
  }

  processState(processId) {
    return this.processStates().find((s) => s.processId === processId) ?? null;
  }

  /** Stops the server, kills leftover game-server processes, prints the log if needed. */
  async teardown() {
    try {
      if (this.child) {
        try {
          await this.stop();
        } catch (err) {
          this.failed = true;
          console.error(String(err));
        }
      }
    } finally {
      if (this.dataDir && fs.existsSync(this.dataDir)) {
        // Game servers outlive Lodge by design: end them, with their namespaces, cgroups,
        // containers and the bridge (`lodge cleanup`).
        try {
          await execFileAsync(LODGE_BIN, ['cleanup', '--data-dir', this.dataDir]);
        } catch (err) {
          console.error(`lodge cleanup failed: ${err.stderr || err.message}`);
        }
      }
      if (this.pgSchema && process.env.LODGE_KEEP !== '1') {
        await psql(`DROP SCHEMA IF EXISTS ${this.pgSchema} CASCADE`).catch((err) =>
          console.error(`dropping schema ${this.pgSchema} failed: ${err.stderr || err.message}`));
      }
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

  readLog() {
    try {
      return fs.readFileSync(this.logFile, 'utf8');
    } catch {
      return '';
    }
  }

  /** Prints the server log, then the last lines of every game-server log. */
  printLog(title) {
    const show = (heading, text) => {
      const lines = text.split('\n').map((line) => `| ${line}`);
      console.error(`---- ${heading} ----\n${lines.join('\n')}\n---- end ----`);
    };
    show(`${title} (${this.logFile})`, this.readLog());
    const dir = this.dataDir && path.join(this.dataDir, 'processes');
    let processIds = [];
    try {
      processIds = fs.readdirSync(dir);
    } catch {
      return;
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
  after(() => lodge.teardown(), { timeout: STOP_TIMEOUT_MS + 10_000 });
  return lodge;
}

// ---------------------------------------------------------------------------
// Builds and deployments

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
