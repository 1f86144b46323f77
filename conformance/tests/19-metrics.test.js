// Process metrics: GetProcessMetrics (v3) and the deprecated metrics v1, from
// the samples the node agent takes of every running process (CPU, memory,
// egress through the proxy, connections).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { useLodge, expectHttpError, waitActive, waitFor, udpRequest } from '../lib/lodge.js';

const REGION = 'Sydney';
let sdk;
let appId;

const lodge = useLodge({
  args: ['--metrics-interval', '0.2'],
  setup: async (server) => {
    ({ sdk, appId } = await server.echoApp());
  },
});

test('GetProcessMetrics: CPU, memory, egress and connections of a live process', async () => {
  const room = await sdk.roomsV2.createRoom({ region: REGION }, appId);
  const info = await waitActive(sdk, appId, room.roomId);
  const { host, port } = info.exposedPort;
  const payload = 'x'.repeat(1000);
  for (let i = 0; i < 20; i++) assert.equal(await udpRequest(host, port, payload), payload);

  const now = Math.floor(Date.now() / 1000);
  const metrics = await waitFor(
    async () => {
      const m = await sdk.processesV3.getProcessMetrics({
        appId,
        processId: room.processId,
        start: now - 120,
        end: now + 60,
        step: 1,
      });
      const total = m.totalEgress?.at(-1)?.value ?? 0;
      return total >= 20_000 ? m : null;
    },
    { timeoutMs: 10_000, what: 'egress to show in the metrics' },
  );
  for (const key of ['cpu', 'memory', 'rateEgress', 'totalEgress', 'activeConnections']) {
    assert.ok(Array.isArray(metrics[key]) && metrics[key].length > 0, `${key} has points`);
    for (const p of metrics[key]) {
      assert.ok(Number.isFinite(p.value) && p.value >= 0, `${key} value ${p.value}`);
      assert.ok(Number.isInteger(p.timestamp) && p.timestamp >= now - 120 && p.timestamp < now + 60);
    }
  }
  assert.equal(metrics.gpuMemory, undefined);
  assert.ok(metrics.memory.some((p) => p.value > 1), 'a python game server uses more than 1 MB');
  assert.ok(metrics.rateEgress.some((p) => p.value > 0));
  assert.ok(metrics.activeConnections.some((p) => p.value >= 1), 'the UDP session counts as a connection');

  // Only what was asked for; the legacy endpoint answers in snake_case.
  const some = await sdk.processesV3.getProcessMetrics({
    appId,
    processId: room.processId,
    metrics: ['memory'],
    start: now - 120,
    end: now + 60,
  });
  assert.deepEqual(Object.keys(some).filter((k) => some[k] !== undefined), ['memory']);
  const v1 = await sdk.metricsV1.getMetricsDeprecated({
    appId,
    processId: room.processId,
    metrics: ['total_egress', 'active_connections'],
    start: now - 120,
    end: now + 60,
    step: 10,
  });
  assert.ok(v1.totalEgress.at(-1).value >= 20_000);
  assert.ok(Array.isArray(v1.activeConnections));
  assert.equal(v1.cpu, undefined);

  await expectHttpError(
    sdk.processesV3.getProcessMetrics({ appId, processId: room.processId, start: now, end: now - 10 }),
    422,
  );
  // Times far outside any clock are a 422, not an overflow (schemathesis found this one).
  for (const q of [{ start: 0, end: 9223372036858376 }, { start: -9223372036854775808, end: now }, { end: -1e300 }]) {
    await expectHttpError(sdk.processesV3.getProcessMetrics({ appId, processId: room.processId, ...q }), 422);
    await expectHttpError(sdk.metricsV1.getMetricsDeprecated({ appId, processId: room.processId, ...q }), 422);
  }
  await expectHttpError(
    sdk.processesV3.getProcessMetrics({ appId, processId: 'no-such-process' }),
    404,
  );
});
