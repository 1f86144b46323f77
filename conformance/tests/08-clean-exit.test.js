// A game server that exits with code 0 ends its process cleanly and destroys
// all of its rooms (hathora-api.md §1.3).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { useLodge, waitActive, waitProcessStatus, waitRoomStatus, udpRequest } from '../lib/lodge.js';

const lodge = useLodge();

test('exit over UDP → process stopped, all its rooms destroyed', async () => {
  const { sdk, appId } = await lodge.echoApp({ roomsPerProcess: 2 });
  const first = await sdk.roomsV2.createRoom({ region: 'Chicago' }, appId);
  const second = await sdk.roomsV2.createRoom({ region: 'Chicago' }, appId);
  assert.equal(second.processId, first.processId);
  const { exposedPort } = await waitActive(sdk, appId, first.roomId);
  await waitActive(sdk, appId, second.roomId);

  assert.equal(await udpRequest(exposedPort.host, exposedPort.port, 'exit'), 'bye');

  const process = await waitProcessStatus(sdk, appId, first.processId, ['stopped', 'failed']);
  assert.equal(process.status, 'stopped', 'exit code 0 is a clean stop, not a failure');
  assert.ok(process.terminatedAt instanceof Date);

  for (const { roomId } of [first, second]) {
    const room = await waitRoomStatus(sdk, appId, roomId, 'destroyed');
    assert.ok(room.allocations.every((a) => a.unscheduledAt instanceof Date));
  }
  assert.deepEqual(await sdk.roomsV2.getActiveRoomsForProcess(first.processId, appId), []);
  const inactive = (await sdk.roomsV2.getInactiveRoomsForProcess(first.processId, appId)).map(
    (r) => r.roomId,
  );
  assert.deepEqual(inactive.sort(), [first.roomId, second.roomId].sort());

  // The app keeps working: the next room starts a fresh process.
  const next = await sdk.roomsV2.createRoom({ region: 'Chicago' }, appId);
  assert.notEqual(next.processId, first.processId);
  const info = await waitActive(sdk, appId, next.roomId);
  assert.equal(await udpRequest(info.exposedPort.host, info.exposedPort.port, 'still here'), 'still here');
});
