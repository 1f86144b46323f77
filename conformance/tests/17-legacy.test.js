// The deprecated v1/v2 operations the official SDK still carries and shipped
// games and editor plugins still call (hathora-api.md §4): apps v1, builds
// v1/v2 (multipart `file` upload on run), deployments v1/v2 with integer ids,
// processes v1/v2, rooms v1, lobbies v1/v2, discovery v1. Every call goes
// through the SDK, which validates each response against its schema.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  useLodge,
  expectHttpError,
  uniqueName,
  makeBundle,
  streamText,
  waitFor,
  waitActive,
  udpRequest,
  ECHO_DIR,
} from '../lib/lodge.js';

const REGION = 'Chicago';

let sdk;
let bundle;

const lodge = useLodge({
  setup: async (server) => {
    sdk = server.sdk();
    bundle = await makeBundle(ECHO_DIR);
  },
});

/** A v1 app with a build run through the v1 multipart upload, and a v1 deployment. */
async function legacyApp(roomsPerProcess = 2) {
  const app = await sdk.appsV1.createAppV1Deprecated({
    appName: uniqueName('legacy'),
    authConfiguration: { anonymous: {} },
  });
  const build = await sdk.buildsV1.createBuildDeprecated({ buildTag: 'v1-tag' }, app.appId);
  assert.ok(Number.isInteger(build.buildId));
  const log = await sdk.buildsV1.runBuildDeprecated(
    build.buildId,
    { file: { fileName: 'C:\\Users\\dev\\game server\\build.tgz', content: new Uint8Array(bundle) } },
    app.appId,
  );
  assert.equal(typeof log, 'string');
  assert.match(log, /succeeded/);
  const deployment = await sdk.deploymentsV1.createDeploymentV1Deprecated(
    build.buildId,
    {
      planName: 'tiny',
      roomsPerProcess,
      transportType: 'udp',
      containerPort: 7777,
      env: [{ name: 'GREETING', value: 'legacy' }],
      additionalContainerPorts: [],
    },
    app.appId,
  );
  return { app, appId: app.appId, build, deployment };
}

test('apps v1: create, list with latest deployment and build, info, update, delete', async () => {
  const { app, appId, build, deployment } = await legacyApp();
  const list = await sdk.appsV1.getAppsV1Deprecated();
  const mine = list.find((a) => a.appId === appId);
  assert.ok(mine, 'the app is listed');
  assert.equal(mine.deployment.deploymentId, deployment.deploymentId);
  assert.equal(mine.deployment.build.buildId, build.buildId);
  assert.equal(mine.deployment.build.status, 'succeeded');
  const info = await sdk.appsV1.getAppInfoV1Deprecated(appId);
  assert.equal(info.appName, app.appName);
  const renamed = uniqueName('renamed');
  const updated = await sdk.appsV1.updateAppV1Deprecated(
    { appName: renamed, authConfiguration: { nickname: {} } },
    appId,
  );
  assert.equal(updated.appName, renamed);
  await sdk.appsV1.deleteAppV1Deprecated(appId);
  await expectHttpError(sdk.appsV1.getAppInfoV1Deprecated(appId), 404);
});

test('builds v1: integer ids per app, run with a multipart file, info, list, delete', async () => {
  const { appId, build } = await legacyApp();
  const info = await sdk.buildsV1.getBuildInfoDeprecated(build.buildId, appId);
  assert.equal(info.status, 'succeeded');
  assert.equal(info.buildTag, 'v1-tag');
  assert.ok(info.imageSize > 0);
  const second = await sdk.buildsV1.createBuildDeprecated({}, appId);
  assert.equal(second.buildId, build.buildId + 1, 'build numbers count up per app');
  const list = await sdk.buildsV1.getBuildsDeprecated(appId);
  assert.deepEqual(
    list.map((b) => b.buildId),
    [second.buildId, build.buildId],
  );
  // Running without the required file part is a clean 4xx.
  const res = await fetch(`${lodge.url}/builds/v1/${appId}/run/${second.buildId}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${lodge.adminToken}` },
  });
  assert.equal(res.status, 422);
  assert.match((await res.json()).message, /file/);
  await sdk.buildsV1.deleteBuildDeprecated(second.buildId, appId);
  await expectHttpError(sdk.buildsV1.getBuildInfoDeprecated(second.buildId, appId), 404);
  await expectHttpError(sdk.buildsV1.getBuildInfoDeprecated(999, appId), 404);
});

test('builds v2: multipart URLs, presigned POST form, run with and without a file', async () => {
  const app = await sdk.appsV1.createAppV1Deprecated({
    appName: uniqueName('buildsv2'),
    authConfiguration: {},
  });
  const appId = app.appId;

  // 1. S3-style multipart URLs, then run with no file part.
  const mp = await sdk.buildsV2.createWithMultipartUploadsV2Deprecated(
    { buildSizeInBytes: bundle.length, buildTag: 'mp' },
    appId,
  );
  assert.ok(Number.isInteger(mp.buildId));
  for (const part of mp.uploadParts) {
    const start = mp.maxChunkSize * (part.partNumber - 1);
    const res = await fetch(part.putRequestUrl, {
      method: 'PUT',
      body: bundle.subarray(start, Math.min(start + mp.maxChunkSize, bundle.length)),
    });
    assert.equal(res.status, 200);
    assert.ok(res.headers.get('etag'));
  }
  const log1 = await streamText(await sdk.buildsV2.runBuildV2Deprecated(mp.buildId, {}, appId));
  assert.match(log1, /succeeded/);

  // 2. Presigned POST form: the form fields, then the file.
  const form = await sdk.buildsV2.createBuildWithUploadUrlV2Deprecated({}, appId);
  const body = new FormData();
  for (const { key, value } of form.uploadBodyParams) body.append(key, value);
  body.append('file', new Blob([bundle]), 'server.tgz');
  const posted = await fetch(form.uploadUrl, { method: 'POST', body });
  assert.ok(posted.status >= 200 && posted.status < 300, `form upload: ${posted.status}`);
  const log2 = await streamText(await sdk.buildsV2.runBuildV2Deprecated(form.buildId, {}, appId));
  assert.match(log2, /succeeded/);

  // 3. Plain create, file given on run.
  const plain = await sdk.buildsV2.createBuildV2Deprecated({ buildTag: 'plain' }, appId);
  const log3 = await streamText(
    await sdk.buildsV2.runBuildV2Deprecated(plain.buildId, { file: new Blob([bundle]) }, appId),
  );
  assert.match(log3, /succeeded/);
  assert.equal((await sdk.buildsV2.getBuildInfoV2Deprecated(plain.buildId, appId)).status, 'succeeded');

  const list = await sdk.buildsV2.getBuildsV2Deprecated(appId);
  assert.deepEqual(
    list.map((b) => b.buildId),
    [plain.buildId, form.buildId, mp.buildId],
  );
  await sdk.buildsV2.deleteBuildV2Deprecated(mp.buildId, appId);
  assert.equal((await sdk.buildsV2.getBuildsV2Deprecated(appId)).length, 2);
});

test('deployments v1 and v2: integer ids, plans, latest, info, newest first', async () => {
  const { appId, build, deployment } = await legacyApp();
  assert.ok(Number.isInteger(deployment.deploymentId));
  assert.equal(deployment.buildId, build.buildId);
  assert.equal(deployment.planName, 'tiny');
  assert.equal(deployment.requestedCPU, 0.5);
  assert.equal(deployment.requestedMemoryMB, 1024);
  assert.equal(deployment.containerPort, 7777);
  assert.equal(deployment.transportType, 'udp');
  assert.equal(deployment.idleTimeoutEnabled, true, 'v1 deployments default to idle timeout');

  const v2 = await sdk.deploymentsV2.createDeploymentV2Deprecated(
    build.buildId,
    {
      idleTimeoutEnabled: false,
      env: [],
      roomsPerProcess: 3,
      transportType: 'tcp',
      containerPort: 7777,
      requestedCPU: 1,
      requestedMemoryMB: 2048,
    },
    appId,
  );
  assert.equal(v2.deploymentId, deployment.deploymentId + 1);
  assert.equal(v2.defaultContainerPort.transportType, 'tcp');

  const latest1 = await sdk.deploymentsV1.getLatestDeploymentV1Deprecated(appId);
  assert.equal(latest1.deploymentId, v2.deploymentId);
  assert.equal(latest1.planName, 'small');
  const list = await sdk.deploymentsV2.getDeploymentsV2Deprecated(appId);
  assert.deepEqual(
    list.map((d) => d.deploymentId),
    [v2.deploymentId, deployment.deploymentId],
    'newest first (the Godot editor takes [0] as the latest)',
  );
  const info = await sdk.deploymentsV2.getDeploymentInfoV2Deprecated(deployment.deploymentId, appId);
  assert.equal(info.roomsPerProcess, 2);
  assert.equal((await sdk.deploymentsV1.getDeploymentsV1Deprecated(appId)).length, 2);

  // The same objects through v3, with their string ids.
  const v3 = await sdk.deploymentsV3.getLatestDeployment(appId);
  assert.equal(v3.roomsPerProcess, 3);
  await expectHttpError(sdk.deploymentsV2.getDeploymentInfoV2Deprecated(999, appId), 404);
  await expectHttpError(sdk.deploymentsV1.createDeploymentV1Deprecated(999, {
    planName: 'tiny', roomsPerProcess: 1, transportType: 'udp', containerPort: 7777, env: [],
  }, appId), 404);
});

test('rooms v1 and processes v1/v2: the room comes alive, integer deployment ids, stop', async () => {
  const { appId, deployment } = await legacyApp();
  const roomId = await sdk.roomsV1.createRoomDeprecated({ region: REGION }, appId);
  assert.equal(typeof roomId, 'string');

  const conn = await waitFor(
    async () => {
      const c = await sdk.roomsV1.getConnectionInfoDeprecated(roomId, appId);
      return c.status === 'active' ? c : null;
    },
    { what: 'v1 connection info to be active' },
  );
  assert.equal(conn.roomId, roomId);
  assert.ok(Number.isInteger(conn.port));
  assert.equal(conn.transportType, 'udp');
  assert.equal(await udpRequest(conn.host, conn.port, 'legacy hello'), 'legacy hello');

  const room = await sdk.roomsV1.getRoomInfoDeprecated(roomId, appId);
  const processId = room.currentAllocation.processId;

  const v1 = await sdk.processesV1.getProcessInfoDeprecated(processId, appId);
  assert.equal(v1.deploymentId, deployment.deploymentId);
  assert.equal(v1.port, conn.port);
  assert.equal(v1.host, conn.host);
  assert.equal(v1.roomsAllocated, 1);
  assert.equal(v1.roomSlotsAvailable, 1);
  assert.equal(v1.draining, false);
  assert.equal(v1.idleSince, null);

  const running = await sdk.processesV1.getRunningProcesses(appId, REGION);
  const mine = running.find((p) => p.processId === processId);
  assert.ok(mine, 'the process is listed as running');
  assert.equal(mine.totalRooms, 1);
  assert.equal(mine.rooms[0].roomId, roomId);
  assert.equal((await sdk.processesV1.getRunningProcesses(appId, 'Sydney')).length, 0);

  const v2 = await sdk.processesV2.getProcessInfoV2Deprecated(processId, appId);
  assert.equal(v2.deploymentId, deployment.deploymentId);
  assert.equal(v2.status, 'running');
  const latest = await sdk.processesV2.getLatestProcessesV2Deprecated(appId, ['running'], [REGION]);
  assert.ok(latest.some((p) => p.processId === processId));
  const { count } = await sdk.processesV2.getProcessesCountExperimentalV2Deprecated(appId, ['running']);
  assert.equal(count, 1);

  assert.equal((await sdk.roomsV1.getActiveRoomsForProcessDeprecated(processId, appId)).length, 1);
  await sdk.roomsV1.suspendRoomDeprecated(roomId, appId);
  assert.equal((await sdk.roomsV1.getInactiveRoomsForProcessDeprecated(processId, appId)).length, 1);
  await waitActive(sdk, appId, roomId); // connection info resumes a suspended room
  await sdk.roomsV1.destroyRoomDeprecated(roomId, appId);
  assert.equal((await sdk.roomsV1.getRoomInfoDeprecated(roomId, appId)).status, 'destroyed');

  const pre = await sdk.processesV2.createProcessV2Deprecated(REGION, appId);
  assert.equal(pre.status, 'starting');
  assert.equal(pre.deploymentId, deployment.deploymentId);
  assert.equal(pre.exposedPort, null, 'exposedPort is null (not missing) until the process runs');
  await sdk.processesV2.stopProcessV2Deprecated(processId, appId);
  await waitFor(
    async () => (await sdk.processesV1.getStoppedProcesses(appId)).some((p) => p.processId === processId),
    { what: 'the stopped process to be listed' },
  );
  await sdk.processesV2.stopProcessV2Deprecated(pre.processId, appId);
});

test('lobbies v2 and v1: create, list, info, SetLobbyState', async () => {
  const { appId } = await legacyApp(10);
  const player = lodge.sdk(null);
  const { token } = await player.authV1.loginAnonymous(appId);
  const auth = { playerAuth: token };

  const pub = await player.lobbiesV2.createPublicLobby(
    auth,
    { region: REGION, initialConfig: { map: 'dust', maxPlayers: 8 } },
    appId,
  );
  assert.equal(pub.visibility, 'public');
  assert.equal(pub.local, false);
  assert.equal(pub.shortCode, null);
  assert.deepEqual(pub.initialConfig, { map: 'dust', maxPlayers: 8 });
  const priv = await player.lobbiesV2.createPrivateLobby(auth, { region: REGION }, appId);
  const local = await player.lobbiesV2.createLocalLobby(auth, { region: REGION }, appId);
  assert.equal(local.local, true);
  const generic = await player.lobbiesV2.createLobbyDeprecated(
    auth,
    { visibility: 'public', region: 'London', initialConfig: 'text config' },
    appId,
    uniqueName('v2-room'),
  );
  assert.match(generic.roomId, /^v2-room-/);

  const listed = await player.lobbiesV2.listActivePublicLobbiesDeprecatedV2(appId);
  const ids = listed.map((l) => l.roomId);
  assert.ok(ids.includes(pub.roomId) && ids.includes(generic.roomId));
  assert.ok(!ids.includes(priv.roomId) && !ids.includes(local.roomId));
  const london = await player.lobbiesV2.listActivePublicLobbiesDeprecatedV2(appId, 'London');
  assert.deepEqual(london.map((l) => l.roomId), [generic.roomId]);

  const withState = await sdk.lobbiesV2.setLobbyState(pub.roomId, { state: { round: 3 } }, appId);
  assert.deepEqual(withState.state, { round: 3 });
  assert.deepEqual((await player.lobbiesV2.getLobbyInfo(pub.roomId, appId)).state, { round: 3 });
  await expectHttpError(player.lobbiesV2.setLobbyState(pub.roomId, { state: 1 }, appId), 401);

  const v1room = await player.lobbiesV1.createPublicLobbyDeprecated(auth, appId, REGION, false);
  assert.equal(typeof v1room, 'string');
  const v1list = await player.lobbiesV1.listActivePublicLobbiesDeprecatedV1(appId, false, REGION);
  assert.ok(v1list.some((l) => l.roomId === v1room));
  const v1local = await player.lobbiesV1.createPrivateLobbyDeprecated(auth, appId, REGION, true);
  const locals = await player.lobbiesV1.listActivePublicLobbiesDeprecatedV1(appId, true);
  assert.ok(locals.some((l) => l.roomId === v1local));
  assert.ok(locals.some((l) => l.roomId === local.roomId));
});

test('discovery v1 lists the same ping endpoints as v2', async () => {
  const v1 = await lodge.sdk(null).discoveryV1.getPingServiceEndpointsDeprecated();
  const v2 = await lodge.sdk(null).discoveryV2.getPingServiceEndpoints();
  assert.deepEqual(v1, v2);
  // Every region (the one box's node serves all); in replicas mode those with an agent.
  assert.equal(v2.length, lodge.nodeRegions?.length ?? 14);
  assert.ok(v2.every((e) => e.port === lodge.pingPortOf(e.region) && typeof e.host === 'string'));
});
