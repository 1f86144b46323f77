// Room packing: rooms fill a process up to roomsPerProcess before a new
// process starts (hathora-api.md §1.3).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { useLodge, waitActive, udpRequest } from '../lib/lodge.js';

const lodge = useLodge();

test('with roomsPerProcess 2, the third room in a region gets a new process', async () => {
  const { sdk, appId } = await lodge.echoApp({ roomsPerProcess: 2 });
  const region = 'Frankfurt';

  const first = await sdk.roomsV2.createRoom({ region }, appId);
  const second = await sdk.roomsV2.createRoom({ region }, appId);
  const third = await sdk.roomsV2.createRoom({ region }, appId);

  assert.equal(second.processId, first.processId, 'the first two rooms share a process');
  assert.notEqual(third.processId, first.processId, 'the third room starts another process');

  const infos = [];
  for (const room of [first, second, third]) infos.push(await waitActive(sdk, appId, room.roomId));
  assert.deepEqual(infos[1].exposedPort, infos[0].exposedPort, 'rooms on one process share its port');
  assert.notEqual(infos[2].exposedPort.port, infos[0].exposedPort.port);

  for (const { exposedPort } of infos) {
    assert.equal(await udpRequest(exposedPort.host, exposedPort.port, 'packed'), 'packed');
  }

  const full = await sdk.processesV3.getProcess(first.processId, appId);
  assert.equal(full.roomsPerProcess, 2);
  assert.equal(full.roomsAllocated, 2);
  const next = await sdk.processesV3.getProcess(third.processId, appId);
  assert.equal(next.roomsAllocated, 1);
  assert.equal(next.region, region);
});
