// RoomsV2 and the full path: a room comes alive and its process answers
// through the public proxy port (hathora-api.md §3.6, §7; DESIGN "How a room
// comes alive").

import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  useLodge,
  expectHttpError,
  is4xx,
  uniqueName,
  waitActive,
  waitRoomStatus,
  udpRequest,
  tcpRequest,
} from '../lib/lodge.js';

const REGION = 'Washington_DC';

let sdk;
let appId;
let deployment;
let room; // {roomId, processId, info} of the first room, active

const lodge = useLodge({
  setup: async (server) => {
    ({ sdk, appId, deployment } = await server.echoApp({ debug: true }));
  },
});

test('CreateRoom → active → UDP and TCP echo through the exposed ports', async () => {
  const created = await sdk.roomsV2.createRoom({ region: REGION, roomConfig: '{"map":"dust"}' }, appId);
  assert.equal(typeof created.roomId, 'string');
  assert.match(created.roomId, /^[a-zA-Z0-9_-]{1,100}$/);
  assert.ok(['starting', 'active'].includes(created.status), `status ${created.status}`);
  assert.equal(typeof created.processId, 'string');
  assert.ok(created.processId.length > 0);
  assert.ok(Array.isArray(created.additionalExposedPorts));

  const info = await waitActive(sdk, appId, created.roomId);
  assert.equal(info.roomId, created.roomId);
  const { exposedPort } = info;
  assert.ok(exposedPort, 'an active room has an exposedPort');
  assert.equal(exposedPort.name, 'default');
  assert.equal(exposedPort.transportType, 'udp');
  assert.equal(typeof exposedPort.host, 'string');
  assert.ok(Number.isInteger(exposedPort.port) && exposedPort.port > 0);
  const debug = info.additionalExposedPorts.find((p) => p.name === 'debug');
  assert.ok(debug, 'the additional "debug" port is exposed');
  assert.equal(debug.transportType, 'tcp');
  assert.notEqual(debug.port, exposedPort.port);

  assert.equal(await udpRequest(exposedPort.host, exposedPort.port, 'hello lodge'), 'hello lodge');
  assert.equal(await tcpRequest(debug.host, debug.port, 'hello over tcp'), 'hello over tcp');

  room = { roomId: created.roomId, processId: created.processId, info };
});

test('the game server sees the documented environment', async () => {
  const { exposedPort, additionalExposedPorts } = room.info;
  const env = (name) => udpRequest(exposedPort.host, exposedPort.port, `env ${name}`);
  const debug = additionalExposedPorts.find((p) => p.name === 'debug');

  assert.equal(await env('GREETING'), 'from-deployment', 'deployment env wins over lodge.toml [env]');
  assert.equal(await env('HATHORA_ROOMS_PER_PROCESS'), '2');
  assert.equal(await env('HATHORA_DEFAULT_PORT'), String(exposedPort.port));
  assert.equal(await env('HATHORA_HOSTNAME'), exposedPort.host);
  assert.equal(await env('HATHORA_DEBUG_PORT'), String(debug.port));
  assert.equal(await env('HATHORA_PROCESS_ID'), room.processId);
  assert.equal(await env('HATHORA_APP_ID'), appId);
  assert.equal(await env('HATHORA_DEPLOYMENT_ID'), deployment.deploymentId);
  assert.equal(await env('HATHORA_REGION'), REGION);
  assert.equal(await env('HATHORA_INITIAL_ROOM_ID'), room.roomId);
  assert.match(await env('PORT'), /^\d+$/);
  assert.equal(await env('HATHORA_APP_SECRET'), 'refused', 'the echo example never hands a player the app secret');
});

test('GetRoomInfo shows the active room and its allocation', async () => {
  const info = await sdk.roomsV2.getRoomInfo(room.roomId, appId);
  assert.equal(info.roomId, room.roomId);
  assert.equal(info.appId, appId);
  assert.equal(info.status, 'active');
  assert.equal(info.roomConfig, '{"map":"dust"}');
  assert.ok(info.currentAllocation, 'currentAllocation is set');
  assert.equal(info.currentAllocation.processId, room.processId);
  assert.ok(info.currentAllocation.scheduledAt instanceof Date);
  assert.equal(info.currentAllocation.unscheduledAt, null);
  assert.equal(info.allocations.length, 1);
  assert.equal(info.allocations[0].roomAllocationId, info.currentAllocation.roomAllocationId);
});

test('a caller-chosen roomId is used, and a duplicate is rejected', async () => {
  const roomId = uniqueName('custom_room');
  const created = await sdk.roomsV2.createRoom({ region: REGION }, appId, roomId);
  assert.equal(created.roomId, roomId);
  assert.equal((await sdk.roomsV2.getRoomInfo(roomId, appId)).roomId, roomId);
  await expectHttpError(sdk.roomsV2.createRoom({ region: REGION }, appId, roomId), is4xx);
  await sdk.roomsV2.destroyRoom(roomId, appId);
});

test('UpdateRoomConfig replaces the config', async () => {
  assert.equal(
    await sdk.roomsV2.updateRoomConfig(room.roomId, { roomConfig: '{"map":"nuke"}' }, appId),
    undefined,
  );
  assert.equal((await sdk.roomsV2.getRoomInfo(room.roomId, appId)).roomConfig, '{"map":"nuke"}');
});

test('active and inactive rooms of a process; DestroyRoom', async () => {
  const other = await sdk.roomsV2.createRoom({ region: REGION }, appId);
  assert.equal(other.processId, room.processId, 'the second room shares the process (2 per process)');
  await waitActive(sdk, appId, other.roomId);

  const activeIds = async () =>
    (await sdk.roomsV2.getActiveRoomsForProcess(room.processId, appId)).map((r) => r.roomId);
  const inactiveIds = async () =>
    (await sdk.roomsV2.getInactiveRoomsForProcess(room.processId, appId)).map((r) => r.roomId);

  const active = await sdk.roomsV2.getActiveRoomsForProcess(room.processId, appId);
  assert.ok(active.some((r) => r.roomId === room.roomId));
  assert.ok(active.some((r) => r.roomId === other.roomId));
  for (const r of active) {
    assert.equal(r.status, 'active');
    assert.equal(r.currentAllocation?.processId, room.processId);
  }
  assert.ok(!(await inactiveIds()).includes(other.roomId));

  assert.equal(await sdk.roomsV2.destroyRoom(other.roomId, appId), undefined);
  const destroyed = await waitRoomStatus(sdk, appId, other.roomId, 'destroyed');
  assert.equal(destroyed.allocations.length, 1);
  assert.ok(destroyed.allocations[0].unscheduledAt instanceof Date, 'the allocation ended');
  assert.ok(!(await activeIds()).includes(other.roomId));
  assert.ok((await inactiveIds()).includes(other.roomId));
  assert.ok((await activeIds()).includes(room.roomId), 'the other room is untouched');
});

test('SuspendRoom (deprecated) unallocates; ResumeRoom brings the room back', async () => {
  const { roomId } = await sdk.roomsV2.createRoom({ region: REGION }, appId);
  await waitActive(sdk, appId, roomId);

  assert.equal(await sdk.roomsV2.suspendRoomV2Deprecated(roomId, appId), undefined);
  const suspended = await sdk.roomsV2.getRoomInfo(roomId, appId);
  assert.equal(suspended.currentAllocation, null, 'a suspended room has no current allocation');
  assert.notEqual(suspended.status, 'destroyed');
  assert.ok(suspended.allocations[0].unscheduledAt instanceof Date);

  const resumed = await sdk.roomsV2.resumeRoom(roomId, appId);
  assert.equal(resumed.roomId, roomId);
  assert.ok(['starting', 'active'].includes(resumed.status), `status ${resumed.status}`);
  const info = await waitActive(sdk, appId, roomId);
  assert.equal(await udpRequest(info.exposedPort.host, info.exposedPort.port, 'resumed'), 'resumed');
  const after = await sdk.roomsV2.getRoomInfo(roomId, appId);
  assert.equal(after.status, 'active');
  assert.equal(after.allocations.length, 2, 'resuming adds an allocation');
  assert.ok(after.currentAllocation);
  await sdk.roomsV2.destroyRoom(roomId, appId);
});

test('GetConnectionInfo needs no token and ignores a bogus Authorization header', async () => {
  const anonymous = lodge.sdk(null);
  const info = await anonymous.roomsV2.getConnectionInfo(room.roomId, appId);
  assert.equal(info.status, 'active');
  assert.deepEqual(info.exposedPort, room.info.exposedPort);

  const bogus = await anonymous.roomsV2.getConnectionInfo(room.roomId, appId, {
    headers: { Authorization: 'Bearer bogus-token' },
  });
  assert.equal(bogus.status, 'active');

  const raw = await fetch(
    `${lodge.url}/rooms/v2/${encodeURIComponent(appId)}/connectioninfo/${encodeURIComponent(room.roomId)}`,
    { headers: { Authorization: 'Bearer bogus-token' } },
  );
  assert.equal(raw.status, 200);
  assert.match(raw.headers.get('content-type') ?? '', /^application\/json/);
  const body = await raw.json();
  assert.equal(body.status, 'active');
  assert.ok(Number.isInteger(body.exposedPort.port));
});

test('unknown rooms are 404', async () => {
  await expectHttpError(lodge.sdk(null).roomsV2.getConnectionInfo('no-such-room', appId), 404);
  await expectHttpError(sdk.roomsV2.getRoomInfo('no-such-room', appId), 404);
  await expectHttpError(sdk.roomsV2.destroyRoom('no-such-room', appId), 404);
});

test('an unknown region is rejected with 422', async () => {
  await expectHttpError(sdk.roomsV2.createRoom({ region: 'Atlantis' }, appId), 422);
});

test('wire: connection info while starting omits exposedPort (never null)', async () => {
  // A deployment whose server waits 1.5 s before binding keeps the room starting.
  const slow = await lodge.echoApp({ env: [{ name: 'ECHO_STARTUP_DELAY', value: '1.5' }] });
  const created = await slow.sdk.roomsV2.createRoom({ region: REGION }, slow.appId);
  assert.equal(created.status, 'starting');

  const res = await fetch(
    `${lodge.url}/rooms/v2/${encodeURIComponent(slow.appId)}/connectioninfo/${encodeURIComponent(created.roomId)}`,
  );
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(body.status, 'starting');
  assert.ok(!('exposedPort' in body), `exposedPort is omitted while starting: ${JSON.stringify(body)}`);
  assert.deepEqual(body.additionalExposedPorts, []);
  assert.equal(body.roomId, created.roomId);

  const process = await slow.sdk.processesV3.getProcess(created.processId, slow.appId);
  assert.equal(process.status, 'starting');

  const active = await waitActive(slow.sdk, slow.appId, created.roomId);
  assert.equal(await udpRequest(active.exposedPort.host, active.exposedPort.port, 'late'), 'late');
});
