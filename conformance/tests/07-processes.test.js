// ProcessesV3 (hathora-api.md §3.5).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  useLodge,
  expectHttpError,
  waitActive,
  waitFor,
  waitProcessStatus,
  waitRoomStatus,
  udpRequest,
  udpAnswers,
} from '../lib/lodge.js';


let sdk;
let appId;
let deployment;
let warm; // the pre-warmed Frankfurt process, running
let warmRoom; // a room placed on it
let london; // a London room's connection data

const lodge = useLodge({
  setup: async (server) => {
    ({ sdk, appId, deployment } = await server.echoApp({ roomsPerProcess: 2 }));
  },
});

test('CreateProcess pre-warms a process that CreateRoom then uses', async () => {
  const created = await sdk.processesV3.createProcess('Frankfurt', appId);
  assert.equal(created.status, 'starting');
  assert.equal(created.region, 'Frankfurt');
  assert.equal(created.appId, appId);
  assert.equal(created.deploymentId, deployment.deploymentId);
  assert.equal(created.roomsPerProcess, 2);
  assert.equal(created.roomsAllocated, 0);
  assert.ok(created.createdAt instanceof Date);
  assert.equal(created.terminatedAt, null);

  warm = await waitProcessStatus(sdk, appId, created.processId, 'running');
  assert.ok(warm.startedAt instanceof Date, 'startedAt is set once running');
  assert.ok(warm.exposedPort, 'a running process has an exposedPort');
  assert.equal(warm.exposedPort.name, 'default');
  assert.equal(warm.exposedPort.transportType, 'udp');
  assert.ok(Number.isInteger(warm.exposedPort.port));

  warmRoom = await sdk.roomsV2.createRoom({ region: 'Frankfurt' }, appId);
  assert.equal(warmRoom.processId, warm.processId, 'the room lands on the pre-warmed process');
  assert.equal(warmRoom.status, 'active', 'a room on a running process is active at once');
  assert.deepEqual(warmRoom.exposedPort, warm.exposedPort);

  london = await sdk.roomsV2.createRoom({ region: 'London' }, appId);
  assert.notEqual(london.processId, warm.processId, 'another region, another process');
  await waitActive(sdk, appId, london.roomId);
});

test('GetProcess reports a running process with its rooms', async () => {
  const process = await sdk.processesV3.getProcess(warm.processId, appId);
  assert.equal(process.processId, warm.processId);
  assert.equal(process.status, 'running');
  assert.equal(process.roomsAllocated, 1);
  assert.deepEqual(process.exposedPort, warm.exposedPort);
  assert.deepEqual(process.additionalExposedPorts, []);
  assert.equal(process.stoppingAt, null);
  assert.equal(process.terminatedAt, null);

  await expectHttpError(sdk.processesV3.getProcess('00000000-0000-0000-0000-000000000000', appId), 404);
});

test('GetLatestProcesses filters by region and status; the count agrees', async () => {
  const frankfurt = await sdk.processesV3.getLatestProcesses(appId, undefined, ['Frankfurt']);
  assert.deepEqual(
    frankfurt.map((p) => p.processId),
    [warm.processId],
  );

  const all = await sdk.processesV3.getLatestProcesses(appId);
  assert.deepEqual(
    all.map((p) => p.processId).sort(),
    [warm.processId, london.processId].sort(),
  );

  const running = await sdk.processesV3.getLatestProcesses(appId, ['running']);
  assert.equal(running.length, 2);
  assert.ok(running.every((p) => p.status === 'running'));

  const both = await sdk.processesV3.getLatestProcesses(appId, ['running'], ['London', 'Frankfurt']);
  assert.equal(both.length, 2);
  assert.deepEqual(await sdk.processesV3.getLatestProcesses(appId, ['stopped']), []);
  assert.deepEqual(await sdk.processesV3.getLatestProcesses(appId, undefined, ['Tokyo']), []);

  assert.deepEqual(await sdk.processesV3.getProcessesCountExperimental(appId), { count: 2 });
  assert.deepEqual(await sdk.processesV3.getProcessesCountExperimental(appId, ['running']), { count: 2 });
  assert.deepEqual(
    await sdk.processesV3.getProcessesCountExperimental(appId, ['running'], ['London']),
    { count: 1 },
  );
  assert.deepEqual(await sdk.processesV3.getProcessesCountExperimental(appId, ['failed']), { count: 0 });
});

test('StopProcess stops it, destroys its rooms, and closes its port', async () => {
  const { host, port } = warm.exposedPort;
  assert.equal(await udpRequest(host, port, 'before stop'), 'before stop');

  assert.equal(await sdk.processesV3.stopProcess(warm.processId, appId), undefined);
  const stopped = await waitProcessStatus(sdk, appId, warm.processId, 'stopped');
  assert.ok(stopped.stoppingAt instanceof Date, 'stoppingAt is set');
  assert.ok(stopped.terminatedAt instanceof Date, 'terminatedAt is set');

  await waitRoomStatus(sdk, appId, warmRoom.roomId, 'destroyed');
  assert.deepEqual(await sdk.roomsV2.getActiveRoomsForProcess(warm.processId, appId), []);
  const inactive = await sdk.roomsV2.getInactiveRoomsForProcess(warm.processId, appId);
  assert.ok(inactive.some((r) => r.roomId === warmRoom.roomId));

  await waitFor(async () => !(await udpAnswers(host, port)), {
    timeoutMs: 5000,
    what: 'the stopped process to stop answering',
  });

  const stoppedList = await sdk.processesV3.getLatestProcesses(appId, ['stopped']);
  assert.deepEqual(
    stoppedList.map((p) => p.processId),
    [warm.processId],
  );
  assert.deepEqual(await sdk.processesV3.getProcessesCountExperimental(appId, ['running']), { count: 1 });

  // The London process is untouched.
  assert.equal((await sdk.processesV3.getProcess(london.processId, appId)).status, 'running');
});

test('a new room in the region of a stopped process starts a new process', async () => {
  const room = await sdk.roomsV2.createRoom({ region: 'Frankfurt' }, appId);
  assert.notEqual(room.processId, warm.processId);
  const info = await waitActive(sdk, appId, room.roomId);
  assert.equal(await udpRequest(info.exposedPort.host, info.exposedPort.port, 'again'), 'again');
});

test('CreateProcess in an unknown region is rejected with 422', async () => {
  await expectHttpError(sdk.processesV3.createProcess('Atlantis', appId), 422);
});
