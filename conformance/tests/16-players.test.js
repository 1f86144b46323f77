// Players: AuthV1 logins (anonymous, nickname, Google), player tokens a game
// server verifies with the app secret, LobbiesV3, the per-player lobby rate
// limit (hathora-api.md §2.5, §3.7, §3.8).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import {
  useLodge,
  expectHttpError,
  uniqueName,
  deployEcho,
  waitActive,
  udpRequest,
} from '../lib/lodge.js';

const REGION = 'Frankfurt';
const RATE_LIMIT = 4;
const CLIENT_ID = 'lodge-test.apps.googleusercontent.com';

// A Google stand-in: an RSA key whose public half is the JWKS Lodge trusts.
const google = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const otherKey = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const KID = 'lodge-test-key';
const jwksDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-jwks-'));
const jwksFile = path.join(jwksDir, 'jwks.json');
fs.writeFileSync(
  jwksFile,
  JSON.stringify({ keys: [{ ...google.publicKey.export({ format: 'jwk' }), kid: KID, alg: 'RS256', use: 'sig' }] }),
);

const b64url = (x) => Buffer.from(typeof x === 'string' ? x : JSON.stringify(x)).toString('base64url');

function googleIdToken(claims, { key = google.privateKey, kid = KID } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const payload = {
    iss: 'https://accounts.google.com',
    aud: CLIENT_ID,
    sub: '1098765432101234567890',
    email: 'ada@example.com',
    iat: now,
    exp: now + 3600,
    ...claims,
  };
  const input = `${b64url({ alg: 'RS256', typ: 'JWT', kid })}.${b64url(payload)}`;
  const sig = crypto.createSign('RSA-SHA256').update(input).sign(key).toString('base64url');
  return `${input}.${sig}`;
}

/** What a game server does with a player token: check the HS256 signature with the app secret. */
function verifyPlayerToken(token, secret) {
  const [h, p, s] = token.split('.');
  const expected = crypto.createHmac('sha256', secret).update(`${h}.${p}`).digest('base64url');
  assert.equal(s, expected, 'the token is signed with the app secret (HS256)');
  assert.deepEqual(JSON.parse(Buffer.from(h, 'base64url')), { alg: 'HS256', typ: 'JWT' });
  return JSON.parse(Buffer.from(p, 'base64url'));
}

let sdk;
let app;
let playersApp; // a second app: rate-limit counting is per app and player
let build;

const lodge = useLodge({
  args: ['--google-jwks', jwksFile, '--lobby-rate-limit', String(RATE_LIMIT)],
  setup: async (server) => {
    sdk = server.sdk();
    const orgId = await server.orgId();
    build = await server.echoBuild();
    const authConfiguration = { anonymous: {}, nickname: {}, google: { clientId: CLIENT_ID } };
    app = await sdk.appsV2.createApp({ appName: uniqueName('players'), authConfiguration }, orgId);
    await deployEcho(sdk, app.appId, build.buildId, { roomsPerProcess: 50 });
    playersApp = await sdk.appsV2.createApp({ appName: uniqueName('limits'), authConfiguration }, orgId);
    await deployEcho(sdk, playersApp.appId, build.buildId, { roomsPerProcess: 50 });
  },
});

test.after(() => fs.rmSync(jwksDir, { recursive: true, force: true }));

/** A client without a developer token, as a game client is. */
const player = () => lodge.sdk(null);

test('anonymous login: an HS256 token with type, id, name and iat, signed with the app secret', async () => {
  const { token } = await player().authV1.loginAnonymous(app.appId);
  const claims = verifyPlayerToken(token, app.appSecret);
  assert.equal(claims.type, 'anonymous');
  assert.equal(typeof claims.id, 'string');
  assert.ok(claims.id.length > 0);
  assert.match(claims.name, /^[a-z]+-[a-z]+-[a-z]+$/);
  assert.ok(Number.isInteger(claims.iat) && Math.abs(claims.iat - Date.now() / 1000) < 60);
  const again = verifyPlayerToken((await player().authV1.loginAnonymous(app.appId)).token, app.appSecret);
  assert.notEqual(again.id, claims.id, 'every anonymous login is a new player');
});

test('nickname login: the player id is the nickname', async () => {
  const { token } = await player().authV1.loginNickname({ nickname: 'ada' }, app.appId);
  const claims = verifyPlayerToken(token, app.appSecret);
  assert.equal(claims.type, 'nickname');
  assert.equal(claims.id, 'ada');
  assert.equal(claims.name, 'ada');
  await expectHttpError(player().authV1.loginNickname({ nickname: '' }, app.appId), 422);
});

test('google login: a Google ID token is verified (signature, issuer, audience, expiry)', async () => {
  const { token } = await player().authV1.loginGoogle({ idToken: googleIdToken({}) }, app.appId);
  const claims = verifyPlayerToken(token, app.appSecret);
  assert.equal(claims.type, 'google');
  assert.equal(claims.id, '1098765432101234567890');
  assert.equal(claims.name, 'ada@example.com');

  const rejected = [
    googleIdToken({ aud: 'someone-else.apps.googleusercontent.com' }),
    googleIdToken({ iss: 'https://evil.example.com' }),
    googleIdToken({ exp: Math.floor(Date.now() / 1000) - 3600 }),
    googleIdToken({}, { key: otherKey.privateKey }),
    'not-a-jwt',
  ];
  for (const idToken of rejected) {
    await expectHttpError(player().authV1.loginGoogle({ idToken }, app.appId), 401);
  }
});

test('a provider the app did not enable is 404; so is an unknown app', async () => {
  const orgId = await lodge.orgId();
  const closed = await sdk.appsV2.createApp(
    { appName: uniqueName('closed'), authConfiguration: {} },
    orgId,
  );
  await expectHttpError(player().authV1.loginAnonymous(closed.appId), 404);
  await expectHttpError(player().authV1.loginNickname({ nickname: 'x' }, closed.appId), 404);
  await expectHttpError(player().authV1.loginGoogle({ idToken: googleIdToken({}) }, closed.appId), 404);
  await expectHttpError(player().authV1.loginAnonymous('app-does-not-exist'), 404);
});

test('a game server in a room verifies the player token with HATHORA_APP_SECRET', async () => {
  const { token } = await player().authV1.loginNickname({ nickname: 'grace' }, app.appId);
  const lobby = await player().lobbiesV3.createLobby(
    { playerAuth: token },
    { visibility: 'private', region: REGION },
    app.appId,
  );
  const info = await waitActive(sdk, app.appId, lobby.roomId);
  const { host, port } = info.exposedPort;
  assert.equal(await udpRequest(host, port, `auth ${token}`), 'player grace grace');
  const forged = token.slice(0, -4) + (token.endsWith('AAAA') ? 'BBBB' : 'AAAA');
  assert.match(await udpRequest(host, port, `auth ${forged}`), /^denied /);
});

test('lobbies: create public and private, list public by region, find by room id and short code', async () => {
  const { token } = await player().authV1.loginNickname({ nickname: 'linus' }, app.appId);
  const auth = { playerAuth: token };
  const code = `LFG-${crypto.randomBytes(3).toString('hex')}`;
  const pub = await player().lobbiesV3.createLobby(
    auth,
    { visibility: 'public', region: REGION, roomConfig: '{"map":"dust"}' },
    app.appId,
    code,
  );
  assert.equal(pub.appId, app.appId);
  assert.equal(pub.visibility, 'public');
  assert.equal(pub.region, REGION);
  assert.equal(pub.shortCode, code);
  assert.equal(pub.roomConfig, '{"map":"dust"}');
  assert.equal(pub.createdBy, 'linus');
  assert.ok(pub.createdAt instanceof Date);

  const priv = await player().lobbiesV3.createLobby(
    auth,
    { visibility: 'private', region: 'Tokyo' },
    app.appId,
    undefined,
    uniqueName('my-room'),
  );
  assert.match(priv.roomId, /^my-room-/);
  assert.equal(priv.shortCode, priv.roomId, 'without a short code, the room id is the code');

  // The lobby's room is a real room: the developer sees it and it comes alive.
  const room = await sdk.roomsV2.getRoomInfo(pub.roomId, app.appId);
  assert.equal(room.roomConfig, '{"map":"dust"}');
  await waitActive(sdk, app.appId, pub.roomId);

  const all = await player().lobbiesV3.listActivePublicLobbies(app.appId);
  assert.ok(all.some((l) => l.roomId === pub.roomId));
  assert.ok(!all.some((l) => l.roomId === priv.roomId), 'private lobbies are not listed');
  const here = await player().lobbiesV3.listActivePublicLobbies(app.appId, REGION);
  assert.ok(here.every((l) => l.region === REGION));
  assert.ok(here.some((l) => l.roomId === pub.roomId));
  const elsewhere = await player().lobbiesV3.listActivePublicLobbies(app.appId, 'Sydney');
  assert.ok(!elsewhere.some((l) => l.roomId === pub.roomId));

  const byId = await player().lobbiesV3.getLobbyInfoByRoomId(priv.roomId, app.appId);
  assert.equal(byId.visibility, 'private');
  const byCode = await player().lobbiesV3.getLobbyInfoByShortCode(code, app.appId);
  assert.equal(byCode.roomId, pub.roomId);

  // UpdateRoomConfig shows through the lobby.
  await sdk.roomsV2.updateRoomConfig(pub.roomId, { roomConfig: '{"map":"nuke"}' }, app.appId);
  assert.equal((await player().lobbiesV3.getLobbyInfoByRoomId(pub.roomId, app.appId)).roomConfig, '{"map":"nuke"}');

  // A second lobby with the same short code: the newest wins.
  const newer = await player().lobbiesV3.createLobby(auth, { visibility: 'public', region: REGION }, app.appId, code);
  assert.equal((await player().lobbiesV3.getLobbyInfoByShortCode(code, app.appId)).roomId, newer.roomId);

  // A destroyed room's lobby is gone.
  await sdk.roomsV2.destroyRoom(newer.roomId, app.appId);
  const after = await player().lobbiesV3.listActivePublicLobbies(app.appId);
  assert.ok(!after.some((l) => l.roomId === newer.roomId));
  await expectHttpError(player().lobbiesV3.getLobbyInfoByRoomId(newer.roomId, app.appId), 404);
  assert.equal((await player().lobbiesV3.getLobbyInfoByShortCode(code, app.appId)).roomId, pub.roomId);

  await expectHttpError(player().lobbiesV3.getLobbyInfoByShortCode('no-such-code', app.appId), 404);
  await expectHttpError(player().lobbiesV3.getLobbyInfoByRoomId('no-such-room', app.appId), 404);
});

test('lobby creation needs a valid player token of that app', async () => {
  const other = await player().authV1.loginNickname({ nickname: 'mallory' }, playersApp.appId);
  const params = { visibility: 'public', region: REGION };
  await expectHttpError(player().lobbiesV3.createLobby({ playerAuth: other.token }, params, app.appId), 401);
  await expectHttpError(player().lobbiesV3.createLobby({ playerAuth: 'garbage' }, params, app.appId), 401);
  // A developer token is not a player token.
  await expectHttpError(player().lobbiesV3.createLobby({ playerAuth: lodge.adminToken }, params, app.appId), 401);
  const { token } = await player().authV1.loginNickname({ nickname: 'bad-input' }, app.appId);
  const bad = { playerAuth: token };
  await expectHttpError(player().lobbiesV3.createLobby(bad, { visibility: 'secret', region: REGION }, app.appId), 422);
  await expectHttpError(player().lobbiesV3.createLobby(bad, { visibility: 'public', region: 'Atlantis' }, app.appId), 422);
});

test(`the per-player rate limit (${RATE_LIMIT} here) answers 429 with Retry-After`, async () => {
  const { token } = await player().authV1.loginNickname({ nickname: 'speedy' }, playersApp.appId);
  const auth = { playerAuth: token };
  const params = { visibility: 'private', region: REGION };
  const made = await Promise.all(
    Array.from({ length: RATE_LIMIT + 3 }, () =>
      player()
        .lobbiesV3.createLobby(auth, params, playersApp.appId)
        .then(
          () => 'ok',
          (err) => err.statusCode,
        ),
    ),
  );
  assert.equal(made.filter((r) => r === 'ok').length, RATE_LIMIT, `racing creations: ${made}`);
  assert.equal(made.filter((r) => r === 429).length, 3, `racing creations: ${made}`);

  const res = await fetch(`${lodge.url}/lobby/v3/${playersApp.appId}/create`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify(params),
  });
  assert.equal(res.status, 429);
  assert.match(res.headers.get('content-type'), /^application\/json/);
  const retry = Number(res.headers.get('retry-after'));
  assert.ok(retry > 3000 && retry <= 3600, `Retry-After ${retry}`);
  assert.match((await res.json()).message, /lobbies/);

  // Another player is not affected.
  const fresh = await player().authV1.loginNickname({ nickname: 'patient' }, playersApp.appId);
  await player().lobbiesV3.createLobby({ playerAuth: fresh.token }, params, playersApp.appId);
});
