// Warm capacity from an app's serviceConfig (hathora-api.md §3.1, §3.2): static process
// allocation per region, replacement of processes that end, a rolling upgrade that never goes
// below minProcesses ready and cuts no room, autoscaling to demand and back to zero.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

import {
  useLodge,
  deployEcho,
  expectHttpError,
  waitActive,
  waitFor,
  LODGE_BIN,
  REPLICAS,
} from '../lib/lodge.js';

const run = promisify(execFile);

const REGION = 'Chicago';
let sdk;
let appId;
let build;
let deployment;

const lodge = useLodge({
  args: ['--scale-down-delay', '3s'],
  setup: async (server) => {
    ({ sdk, appId, build, deployment } = await server.echoApp({ roomsPerProcess: 2 }));
  },
});

const live = async () =>
  (await sdk.processesV3.getLatestProcesses(appId, ['starting', 'running', 'draining'], [REGION])) ?? [];

const patch = (serviceConfig) => sdk.appsV2.patchApp({ serviceConfig }, appId);

const alloc = (e) => ({ staticProcessAllocation: [{ region: REGION, ...e }] });

test('invalid allocations are refused with 422 and a message', async () => {
  for (const bad of [
    alloc({ minProcesses: 2, targetProcesses: 1, maxProcesses: 3 }),
    alloc({ minProcesses: 1, targetProcesses: 4, maxProcesses: 3 }),
    alloc({ minProcesses: 1, targetProcesses: 1, maxProcesses: 3, autoscalingEnabled: true }),
    alloc({ minProcesses: 0, maxProcesses: 3, autoscalingEnabled: true }),
    alloc({ minProcesses: 1, maxProcesses: 3 }),
    alloc({ minProcesses: 100000, targetProcesses: 100000, maxProcesses: 100000 }),
  ]) {
    const err = await expectHttpError(patch(bad), 422);
    assert.ok(err.message.length > 0);
  }
  const got = await sdk.appsV2.getApp(appId);
  assert.equal(got.serviceConfig ?? null, null, 'nothing was stored');
});

test('a static allocation brings up the target, and a process that ends is replaced', async () => {
  const updated = await patch(alloc({ minProcesses: 1, targetProcesses: 2, maxProcesses: 3 }));
  const shown = updated.serviceConfig.staticProcessAllocation[0];
  assert.equal(shown.targetProcesses, 2);
  assert.equal(shown.maxProcesses, 3);
  const running = await waitFor(
    async () => {
      const ps = (await live()).filter((p) => p.status === 'running');
      return ps.length === 2 && ps;
    },
    { timeoutMs: 30_000, what: 'two warm processes running' },
  );
  assert.ok(running.every((p) => p.deploymentId === deployment.deploymentId && p.roomsAllocated === 0));
  // A room goes to a warm process at once.
  const room = await sdk.roomsV2.createRoom({ region: REGION }, appId);
  assert.equal(room.status, 'active');
  assert.ok(running.some((p) => p.processId === room.processId), 'served by a warm process');
  await sdk.roomsV2.destroyRoom(room.roomId, appId);

  // One is stopped: another takes its place.
  const gone = running[0].processId;
  await sdk.processesV3.stopProcess(gone, appId);
  await waitFor(
    async () => {
      const ps = (await live()).filter((p) => p.status === 'running' && p.processId !== gone);
      return ps.length === 2;
    },
    { timeoutMs: 30_000, what: 'the stopped process replaced' },
  );
  // Never more than the target are kept.
  assert.equal((await live()).filter((p) => p.processId !== gone).length, 2);
});

test('a new deployment rolls the warm processes without going below min or cutting a room', async () => {
  const room = await sdk.roomsV2.createRoom({ region: REGION }, appId);
  const old = room.processId;
  const next = await deployEcho(sdk, appId, build.buildId, { roomsPerProcess: 2 });
  let lowest = Infinity;
  let samples = 0;
  const done = await waitFor(
    async () => {
      const ps = await live();
      const ready = ps.filter((p) => p.status === 'running').length;
      lowest = Math.min(lowest, ready);
      samples += 1;
      const fresh = ps.filter((p) => p.deploymentId === next.deploymentId && p.status === 'running');
      const drained = ps.find((p) => p.processId === old)?.status === 'draining';
      return fresh.length === 2 && drained && ps;
    },
    { timeoutMs: 45_000, intervalMs: 20, what: 'two new processes running, the old one with a room draining' },
  );
  assert.ok(lowest >= 1, `ready processes fell to ${lowest} (min 1) over ${samples} samples`);
  assert.ok(
    done.filter((p) => p.deploymentId !== next.deploymentId).every((p) => p.processId === old),
    'old processes without rooms are gone',
  );
  // The room on the draining process is untouched.
  const info = await sdk.roomsV2.getConnectionInfo(room.roomId, appId);
  assert.equal(info.status, 'active');
  // New rooms go to the new deployment only.
  const newer = await sdk.roomsV2.createRoom({ region: REGION }, appId);
  assert.notEqual(newer.processId, old);
  await sdk.roomsV2.destroyRoom(newer.roomId, appId);
  // Its last room ends: the draining process stops.
  await sdk.roomsV2.destroyRoom(room.roomId, appId);
  await waitFor(async () => !(await live()).some((p) => p.processId === old), {
    timeoutMs: 30_000,
    what: 'the drained process stopped',
  });
  deployment = next;
});

test('autoscaling follows demand with headroom, and scales to zero without it', async () => {
  // One room per process of demand (rooms per process 2: one slot of headroom each).
  const cfg = {
    ...alloc({ minProcesses: 0, maxProcesses: 4, autoscalingEnabled: true }),
    processAutoscalerConfig: { targetMetric: { metricName: 'concurrent-requests', metricValue: 1 } },
  };
  const updated = await patch(cfg);
  assert.equal(updated.serviceConfig.staticProcessAllocation[0].autoscalingEnabled, true);
  // No demand, min 0: after the scale-down delay nothing is left.
  await waitFor(async () => (await live()).length === 0, {
    timeoutMs: 30_000,
    what: 'scaled to zero',
  });
  // Demand: three rooms want three processes.
  const rooms = [];
  for (let i = 0; i < 3; i++) rooms.push(await sdk.roomsV2.createRoom({ region: REGION }, appId));
  for (const r of rooms) await waitActive(sdk, appId, r.roomId);
  await waitFor(async () => (await live()).filter((p) => p.status === 'running').length === 3, {
    timeoutMs: 30_000,
    what: 'the target grew to three processes',
  });
  if (!REPLICAS) {
    const shown = (await sdk.appsV2.getApp(appId)).serviceConfig.staticProcessAllocation[0];
    assert.equal(shown.targetProcesses, 3, 'GetApp shows the autoscaled target');
  }
  // A burst within the headroom is served by running processes.
  const burst = await sdk.roomsV2.createRoom({ region: REGION }, appId);
  assert.equal(burst.status, 'active', 'served warm');
  rooms.push(burst);
  for (const r of rooms) await sdk.roomsV2.destroyRoom(r.roomId, appId);
  await waitFor(async () => (await live()).length === 0, {
    timeoutMs: 30_000,
    what: 'back to zero after the delay',
  });
});

test('lodge apps scale sets a region\'s allocation; a deleted app keeps nothing warm', async () => {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('LODGE_')));
  const { stdout } = await run(
    LODGE_BIN,
    ['apps', 'scale', REGION, '--min', '1', '--target', '1', '--max', '1', '--app-id', appId],
    { env: { ...env, LODGE_API_URL: lodge.url, LODGE_TOKEN: lodge.adminToken }, timeout: 60_000 },
  );
  assert.match(stdout, /Chicago\s+1\s+1\s+1\s+false/);
  const shown = (await sdk.appsV2.getApp(appId)).serviceConfig.staticProcessAllocation;
  assert.deepEqual(
    shown.map((e) => [e.region, e.minProcesses, e.targetProcesses, e.maxProcesses]),
    [[REGION, 1, 1, 1]],
  );
  await waitFor(async () => (await live()).some((p) => p.status === 'running'), {
    timeoutMs: 30_000,
    what: 'one warm process',
  });
  const listed = await lodge.sdk().processesV3.getLatestProcesses(appId, ['running'], [REGION]);
  assert.equal(listed.length, 1);
  await sdk.appsV2.deleteApp(appId);
  await waitFor(
    async () =>
      (await lodge.sdk().processesV3.getLatestProcesses(appId, ['starting', 'running'], [REGION]).catch(() => [])).length === 0,
    { timeoutMs: 30_000, what: 'the warm process stopped with its app' },
  );
});
