// As root, `--isolation netns`: every process has its own network namespace, binds the
// deployment's containerPort itself (as on Hathora), and is reached through its own public port.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';

import { useLodge, waitActive, waitProcessStatus, udpRequest, tcpRequest } from '../lib/lodge.js';

const root = process.getuid?.() === 0;
const lodge = root ? useLodge({ isolation: 'netns' }) : null;

test('isolated processes all bind the container port', { skip: !root && 'needs root' }, async () => {
  const { sdk, appId } = await lodge.echoApp({ roomsPerProcess: 1, debug: true });
  const rooms = [];
  for (let i = 0; i < 3; i++) rooms.push(await sdk.roomsV2.createRoom({ region: 'Tokyo' }, appId));
  assert.equal(new Set(rooms.map((r) => r.processId)).size, 3, 'one room per process');

  const seen = new Set();
  for (const room of rooms) {
    const info = await waitActive(sdk, appId, room.roomId);
    const { host, port } = info.exposedPort;
    assert.equal(await udpRequest(host, port, 'env PORT'), '7777', 'binds the containerPort itself');
    assert.equal(await udpRequest(host, port, 'env HATHORA_PROCESS_ID'), room.processId);
    assert.match(await udpRequest(host, port, 'env LODGE_API_URL'), /^http:\/\/10\.\d+\.\d+\.\d+:\d+$/);
    const debug = info.additionalExposedPorts.find((p) => p.name === 'debug');
    assert.equal(await tcpRequest(debug.host, debug.port, 'over tcp'), 'over tcp');
    seen.add(port);
  }
  assert.equal(seen.size, 3, 'distinct public ports');

  for (const room of rooms) await sdk.processesV3.stopProcess(room.processId, appId);
  for (const room of rooms) {
    const p = await waitProcessStatus(sdk, appId, room.processId, ['stopped', 'failed']);
    assert.equal(p.status, 'stopped');
    const netns = execFileSync('ip', ['netns', 'list']).toString();
    assert.ok(!netns.includes(room.processId), 'its namespace is removed');
  }
});
