// Durability: state survives kill -9 of the server, running game servers
// keep their public ports, and a game server that died while the server was
// down is noticed after the restart (DESIGN "Contracts").

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';

import {
  useLodge,
  waitActive,
  waitFor,
  waitProcessStatus,
  waitRoomStatus,
  udpRequest,
} from '../lib/lodge.js';

const lodge = useLodge();

/** True while `pid` runs (a zombie waiting to be reaped counts as dead). */
function alive(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

/** Waits for <data-dir>/processes/<processId>/state.json to name the game pid. */
function gameState(processId) {
  return waitFor(
    () => {
      const state = lodge.processState(processId);
      return state?.gamePid ? state : null;
    },
    { what: `state.json with a gamePid for process ${processId}` },
  );
}

test('kill -9 and restart: everything acknowledged is still there and still answers', async () => {
  const { sdk, appId, deployment } = await lodge.echoApp();

  const kept = await sdk.roomsV2.createRoom({ region: 'Seattle', roomConfig: 'kept' }, appId);
  const doomed = await sdk.roomsV2.createRoom({ region: 'London' }, appId);
  assert.notEqual(kept.processId, doomed.processId);
  const keptInfo = await waitActive(sdk, appId, kept.roomId);
  await waitActive(sdk, appId, doomed.roomId);
  const { host, port } = keptInfo.exposedPort;
  assert.equal(await udpRequest(host, port, 'before'), 'before');

  const keptState = await gameState(kept.processId);
  const doomedState = await gameState(doomed.processId);

  await lodge.kill9();
  assert.ok(alive(keptState.gamePid), 'game servers outlive a kill -9 of lodge');
  process.kill(doomedState.gamePid, 'SIGKILL');
  await waitFor(() => !alive(doomedState.gamePid), { what: 'the doomed game server to die' });

  await lodge.restart();

  // Control-plane state is intact.
  assert.equal((await sdk.appsV2.getApp(appId)).appId, appId);
  assert.equal(
    (await sdk.deploymentsV3.getDeployment(deployment.deploymentId, appId)).deploymentId,
    deployment.deploymentId,
  );
  assert.equal((await sdk.deploymentsV3.getLatestDeployment(appId)).deploymentId, deployment.deploymentId);

  // The surviving room is still active, on the same public port, and answers.
  const room = await sdk.roomsV2.getRoomInfo(kept.roomId, appId);
  assert.equal(room.status, 'active');
  assert.equal(room.roomConfig, 'kept');
  assert.equal(room.currentAllocation?.processId, kept.processId);
  const info = await waitActive(sdk, appId, kept.roomId);
  assert.deepEqual(info.exposedPort, keptInfo.exposedPort, 'the same exposed port after the restart');
  assert.equal(await udpRequest(host, port, 'after', 5000), 'after');
  assert.equal(await udpRequest(host, port, 'env HATHORA_PROCESS_ID'), kept.processId);
  assert.equal((await sdk.processesV3.getProcess(kept.processId, appId)).status, 'running');

  // The game server killed while lodge was down is reported, and its room is gone.
  const dead = await waitProcessStatus(sdk, appId, doomed.processId, ['failed', 'stopped']);
  assert.ok(dead.terminatedAt instanceof Date);
  await waitRoomStatus(sdk, appId, doomed.roomId, 'destroyed');

  // New work is placed as usual after the restart.
  const fresh = await sdk.roomsV2.createRoom({ region: 'London' }, appId);
  assert.notEqual(fresh.processId, doomed.processId);
  const freshInfo = await waitActive(sdk, appId, fresh.roomId);
  assert.equal(await udpRequest(freshInfo.exposedPort.host, freshInfo.exposedPort.port, 'new'), 'new');
});

test('SIGTERM exits 0, and a graceful restart keeps the apps', async () => {
  const { sdk, appId } = await lodge.echoApp();
  const result = await lodge.stop();
  assert.deepEqual(result, { code: 0, signal: null }, 'lodge exits 0 on SIGTERM');
  await lodge.start();
  assert.equal((await sdk.appsV2.getApp(appId)).appId, appId);
});
