// Raw HTTP replays of the request shapes Hathora's engine plugins send
// (Unreal, Unity, Godot), with the quirks of hathora-api.md §2.3 and §5.3:
// JSON content type on GETs and empty-body POSTs, a bearer token on public
// endpoints, unknown keys in bodies, unencoded query values, integer legacy
// ids, multipart build uploads with a preamble CRLF, a trailing-slash
// discovery path, CORS preflights. Then the region ping service over UDP and
// WebSocket, as the plugins measure it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import dgram from 'node:dgram';
import net from 'node:net';

import { useLodge, uniqueName, makeBundle, waitFor, sleep, ECHO_DIR } from '../lib/lodge.js';

const REGION = 'Frankfurt';

let appId;
let bundle;

const lodge = useLodge({
  setup: async (server) => {
    const sdk = server.sdk();
    const app = await sdk.appsV2.createApp(
      { appName: uniqueName('engines'), authConfiguration: { anonymous: {}, nickname: {} } },
      await server.orgId(),
    );
    appId = app.appId;
    bundle = await makeBundle(ECHO_DIR);
  },
});

/** One HTTP exchange; returns {status, type, text, json, headers}. */
async function http(method, path, { token, body, headers = {}, raw } = {}) {
  const h = { ...headers };
  if (token) h.authorization = `Bearer ${token}`;
  const res = await fetch(`${lodge.url}${path}`, {
    method,
    headers: h,
    body: raw ?? (body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body)),
  });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, type: res.headers.get('content-type') ?? '', text, json, headers: res.headers };
}

/** What the Unreal plugin sends on every call: a JSON content type and its bearer token. */
const unreal = (token) => ({ token, headers: { 'content-type': 'application/json', accept: 'application/json' } });

function expectJson(r, status) {
  assert.equal(r.status, status, `HTTP ${r.status}: ${r.text}`);
  assert.match(r.type, /^application\/json/);
  return r.json;
}

/** A multipart body as the Godot editor builds it by hand: a CRLF before the first boundary. */
function godotMultipart(file) {
  const boundary = 'WebKitFormBoundaryePkpFF7tjBAqy44L';
  const head = Buffer.from(
    `\r\n--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="file.tgz"\r\nContent-Type: application/octet-stream\r\n\r\n`,
  );
  const tail = Buffer.from(`\r\n--${boundary}--\r\n`);
  return { body: Buffer.concat([head, file, tail]), type: `multipart/form-data; boundary=${boundary}` };
}

let deploymentNumber;

test('Godot 2024 editor: build v1 create without a body, run with a hand-made multipart body, deploy v1', async () => {
  const dev = lodge.adminToken;
  const created = expectJson(
    await http('POST', `/builds/v1/${appId}/create`, { token: dev, headers: { accept: 'application/json' } }),
    201,
  );
  assert.ok(Number.isInteger(created.buildId));
  const { body, type } = godotMultipart(bundle);
  const run = await http('POST', `/builds/v1/${appId}/run/${created.buildId}`, {
    token: dev,
    raw: body,
    headers: { 'content-type': type, accept: 'text/plain' },
  });
  assert.equal(run.status, 200, run.text);
  assert.match(run.type, /^text\/plain/);
  assert.match(run.text, /succeeded/);

  const deployment = expectJson(
    await http('POST', `/deployments/v1/${appId}/create/${created.buildId}`, {
      token: dev,
      headers: { 'content-type': 'application/json' },
      body: { planName: 'tiny', roomsPerProcess: 4, transportType: 'udp', containerPort: 7777, env: [], additionalContainerPorts: [] },
    }),
    201,
  );
  assert.ok(Number.isInteger(deployment.deploymentId));
  assert.ok(Number.isInteger(deployment.requestedMemoryMB));
  deploymentNumber = deployment.deploymentId;
  const list = expectJson(await http('GET', `/deployments/v1/${appId}/list`, { token: dev }), 200);
  assert.equal(list[0].deploymentId, deploymentNumber, 'newest first');

  const ping = expectJson(await http('GET', '/discovery/v1/ping/'), 200);
  assert.ok(ping.length > 0 && ping.every((p) => p.region && p.host && Number.isInteger(p.port)));
});

let roomId;
let processId;

test('Unreal: login, lobby, rooms and processes with a JSON content type and a bearer token everywhere', async () => {
  assert.ok(deploymentNumber, 'needs the deployment of the previous test');
  const login = expectJson(
    await http('POST', `/auth/v1/${appId}/login/anonymous`, { ...unreal(), raw: '' }),
    200,
  );
  const player = login.token;
  assert.equal(typeof player, 'string');

  // Unreal does not URL-encode the query; it always sends roomConfig, possibly empty.
  const lobby = expectJson(
    await http('POST', `/lobby/v3/${appId}/create?roomId=&shortCode=UE-${crypto.randomInt(1e6)}`, {
      ...unreal(player),
      body: { visibility: 'public', region: REGION, roomConfig: '' },
    }),
    201,
  );
  for (const key of ['roomId', 'appId', 'region', 'visibility', 'shortCode', 'createdAt', 'createdBy']) {
    assert.ok(key in lobby, `LobbyV3.${key}`);
  }
  assert.match(lobby.createdAt, /Z$/);
  roomId = lobby.roomId;

  // Public endpoints ignore the player token Unreal sends along.
  const listed = expectJson(await http('GET', `/lobby/v3/${appId}/list/public?region=${REGION}`, unreal(player)), 200);
  assert.ok(listed.some((l) => l.roomId === roomId));
  const conn = await waitFor(
    async () => {
      const c = expectJson(await http('GET', `/rooms/v2/${appId}/connectioninfo/${roomId}`, unreal(player)), 200);
      return c.status === 'active' ? c : null;
    },
    { what: 'the lobby room to be active' },
  );
  assert.ok(Number.isInteger(conn.exposedPort.port));

  const dev = lodge.adminToken;
  const room = expectJson(await http('GET', `/rooms/v2/${appId}/info/${roomId}`, unreal(dev)), 200);
  processId = room.currentAllocation.processId;
  const latest = expectJson(
    await http('GET', `/processes/v2/${appId}/list/latest?status=running&status=starting&region=${REGION}`, unreal(dev)),
    200,
  );
  const p2 = latest.find((p) => p.processId === processId);
  assert.ok(p2, 'the process is in the v2 list');
  assert.equal(typeof p2.deploymentId, 'number', 'Unreal reads deploymentId with GetIntegerField');
  assert.equal(p2.deploymentId, deploymentNumber);
  const p1 = expectJson(await http('GET', `/processes/v1/${appId}/info/${processId}`, unreal(dev)), 200);
  assert.equal(p1.deploymentId, deploymentNumber);
  assert.equal(p1.port, conn.exposedPort.port);

  // Extra keys in a body are ignored; an empty JSON body on a body-less POST is fine.
  const extra = expectJson(
    await http('POST', `/rooms/v2/${appId}/create`, {
      ...unreal(dev),
      body: { region: REGION, roomConfig: 'x', orgId: 'ignored', somethingNew: [1, 2] },
    }),
    201,
  );
  assert.equal(extra.status === 'active' || extra.status === 'starting', true);
  const suspended = await http('POST', `/rooms/v2/${appId}/suspend/${extra.roomId}`, { ...unreal(dev), raw: '' });
  assert.equal(suspended.status, 204);
  const destroyed = await http('POST', `/rooms/v2/${appId}/destroy/${extra.roomId}`, { ...unreal(dev), raw: '' });
  assert.equal(destroyed.status, 204);
});

test('Godot HEAD: lobby v3 create with roomId and shortCode in the JSON body', async () => {
  const { token } = expectJson(await http('POST', `/auth/v1/${appId}/login/nickname`, { body: { nickname: 'godot' }, headers: { 'content-type': 'application/json' } }), 200);
  const wanted = uniqueName('godot-room');
  const lobby = expectJson(
    await http('POST', `/lobby/v3/${appId}/create`, {
      token,
      headers: { 'content-type': 'application/json' },
      body: { visibility: 'private', region: REGION, roomConfig: '{}', shortCode: 'GDT1', roomId: wanted },
    }),
    201,
  );
  assert.equal(lobby.roomId, wanted);
  assert.equal(lobby.shortCode, 'GDT1');
});

test('Unity 2023: lobby v2 create with initialConfig, build v1 upload with a full local path as file name', async () => {
  const login = expectJson(await http('POST', `/auth/v1/${appId}/login/anonymous`), 200);
  const lobby = expectJson(
    await http('POST', `/lobby/v2/${appId}/create`, {
      token: login.token,
      headers: { 'content-type': 'application/json' },
      body: { visibility: 'public', region: REGION, initialConfig: { gameMode: 'ctf' } },
    }),
    201,
  );
  assert.equal(lobby.local, false);
  assert.deepEqual(lobby.initialConfig, { gameMode: 'ctf' });
  assert.ok('shortCode' in lobby && lobby.shortCode === null);

  const dev = lodge.adminToken;
  const build = expectJson(await http('POST', `/builds/v1/${appId}/create`, { token: dev, headers: { 'content-type': 'application/json' }, body: {} }), 201);
  const form = new FormData();
  form.append('file', new Blob([bundle], { type: 'application/octet-stream' }), 'C:\\Users\\Dev\\My Game\\Build\\server.tar.gz');
  const res = await fetch(`${lodge.url}/builds/v1/${appId}/run/${build.buildId}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${dev}` },
    body: form,
  });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/plain/);
  assert.match(await res.text(), /succeeded/);
  const info = expectJson(await http('GET', `/builds/v1/${appId}/info/${build.buildId}`, { token: dev }), 200);
  assert.equal(info.status, 'succeeded');
});

test('CORS: browser preflights for player and public endpoints are allowed', async () => {
  const res = await fetch(`${lodge.url}/lobby/v3/${appId}/create`, {
    method: 'OPTIONS',
    headers: {
      origin: 'https://game.example.com',
      'access-control-request-method': 'POST',
      'access-control-request-headers': 'authorization,content-type',
    },
  });
  assert.ok(res.status === 200 || res.status === 204, `preflight ${res.status}`);
  assert.equal(res.headers.get('access-control-allow-origin'), '*');
  const allowed = res.headers.get('access-control-allow-headers').toLowerCase();
  assert.ok(allowed.includes('authorization') && allowed.includes('content-type'));
  assert.match(res.headers.get('access-control-allow-methods'), /POST/);
  const get = await fetch(`${lodge.url}/lobby/v3/${appId}/list/public`, { headers: { origin: 'https://game.example.com' } });
  assert.equal(get.headers.get('access-control-allow-origin'), '*');
});

// ---------------------------------------------------------------------------
// The ping service

test('ping: a UDP datagram to the ping port comes back byte for byte', async () => {
  const socket = dgram.createSocket('udp4');
  try {
    const payload = crypto.randomBytes(22); // the size of the Unreal plugin's probe
    const reply = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no UDP ping reply')), 3000);
      socket.on('message', (msg) => {
        clearTimeout(timer);
        resolve(msg);
      });
      socket.send(payload, lodge.pingPort, '127.0.0.1');
    });
    assert.deepEqual(reply, payload);
  } finally {
    socket.close();
  }
});

/** A minimal WebSocket client (RFC 6455), enough to time an echo. */
async function wsEcho(port, path, messages) {
  const socket = net.connect({ host: '127.0.0.1', port });
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  let buf = Buffer.alloc(0);
  let wake = null;
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    wake?.();
  });
  const need = async (pred) => {
    const deadline = Date.now() + 3000;
    while (!pred()) {
      if (Date.now() > deadline) throw new Error('websocket: timed out');
      await Promise.race([new Promise((r) => (wake = r)), sleep(50)]);
    }
  };
  const key = crypto.randomBytes(16).toString('base64');
  socket.write(
    `GET ${path} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
  );
  await need(() => buf.includes('\r\n\r\n'));
  const end = buf.indexOf('\r\n\r\n');
  const head = buf.subarray(0, end).toString();
  buf = buf.subarray(end + 4);
  assert.match(head, /^HTTP\/1\.1 101/);
  const accept = crypto.createHash('sha1').update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
  assert.match(head, new RegExp(`Sec-WebSocket-Accept: ${accept.replace(/[+/]/g, '\\$&')}`, 'i'));

  const frame = (opcode, payload) => {
    const mask = crypto.randomBytes(4);
    const masked = Buffer.from(payload.map((b, i) => b ^ mask[i % 4]));
    const len = payload.length < 126 ? Buffer.from([0x80 | payload.length]) : Buffer.from([0x80 | 126, payload.length >> 8, payload.length & 255]);
    return Buffer.concat([Buffer.from([0x80 | opcode]), len, mask, masked]);
  };
  const readFrame = async () => {
    await need(() => buf.length >= 2);
    let len = buf[1] & 0x7f;
    let off = 2;
    if (len === 126) {
      await need(() => buf.length >= 4);
      len = buf.readUInt16BE(2);
      off = 4;
    }
    await need(() => buf.length >= off + len);
    const out = { opcode: buf[0] & 0x0f, fin: (buf[0] & 0x80) !== 0, payload: buf.subarray(off, off + len) };
    buf = buf.subarray(off + len);
    return out;
  };
  const replies = [];
  for (const m of messages) {
    const t0 = process.hrtime.bigint();
    socket.write(frame(m.opcode ?? 1, [...Buffer.from(m.data)]));
    const f = await readFrame();
    replies.push({ ...f, rttMs: Number(process.hrtime.bigint() - t0) / 1e6 });
  }
  socket.write(frame(8, [0x03, 0xe8]));
  const close = await readFrame();
  socket.destroy();
  return { replies, close };
}

test('ping: a WebSocket on the ping port echoes text, binary and ping frames (any path)', async () => {
  for (const path of ['/', '/ws']) {
    const big = 'x'.repeat(300);
    const { replies, close } = await wsEcho(lodge.pingPort, path, [
      { data: 'PING' },
      { data: big },
      { data: 'bin', opcode: 2 },
      { data: 'are you there', opcode: 9 },
    ]);
    assert.deepEqual(
      replies.map((r) => [r.opcode, r.payload.toString()]),
      [
        [1, 'PING'],
        [1, big],
        [2, 'bin'],
        [10, 'are you there'],
      ],
    );
    assert.ok(replies.every((r) => r.fin && r.rttMs < 1000));
    assert.equal(close.opcode, 8);
  }
  // A plain HTTP request is told to upgrade, not left hanging.
  const res = await fetch(`http://127.0.0.1:${lodge.pingPort}/`);
  assert.equal(res.status, 426);
});
