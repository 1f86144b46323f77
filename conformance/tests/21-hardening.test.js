// Hardening: token scopes enforced on every endpoint through the official SDK (a token never
// mints one with more than it holds), several organizations that see nothing of each other
// (Lodge's own /lodge/v1/orgs), /metrics for an instance admin only, and, as root, game
// servers that run as users of their own and cannot read Lodge's secrets (fixtures/probe, a
// python game server that reports what it can touch).

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';

import {
  useLodge,
  CONFORMANCE_DIR,
  expectHttpError,
  uniqueName,
  makeBundle,
  uploadBuild,
  deployEcho,
  waitActive,
  waitFor,
  waitProcessStatus,
  udpRequest,
  TEST_STORE,
} from '../lib/lodge.js';

const REGION = 'Frankfurt';
const PROBE_DIR = path.join(CONFORMANCE_DIR, 'fixtures', 'probe');
const root = process.getuid?.() === 0;

const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** A 401 whose message names exactly `scope` (not a longer one such as X:read-write for X:read). */
async function expectScope401(promise, scope) {
  const err = await expectHttpError(promise, 401);
  assert.match(err.data$.message, new RegExp(`${escapeRe(scope)}(?![\\w:-])`), `the 401 names ${scope}`);
  return err;
}

/** Plain fetch of a Lodge-specific endpoint: {status, body (parsed JSON, or text)}. */
async function call(lodge, method, urlPath, { token, body } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(`${lodge.url}${urlPath}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // not JSON (Prometheus text)
  }
  return { status: res.status, contentType: res.headers.get('content-type') ?? '', body: parsed, text };
}

/** Ends a process a test started if it still runs, without masking the test's own failure. */
async function stopQuietly(sdk, appId, processId) {
  try {
    const p = await sdk.processesV3.getProcess(processId, appId);
    if (p.status === 'stopped' || p.status === 'failed') return;
    await sdk.processesV3.stopProcess(processId, appId);
    await waitProcessStatus(sdk, appId, processId, ['stopped', 'failed']);
  } catch (err) {
    console.error(`could not stop ${processId}: ${err.message}`);
  }
}

/**
 * mkdtemp's 0700 temp dir above the data dir would hide the data dir from game servers by
 * itself (game servers reach their bundle through a mount of their own, so they start either
 * way). Opening it leaves only the permissions Lodge sets between a game server and Lodge's
 * files. The harness log holds the admin token Lodge may print, so it stays root's.
 */
function openTmpDir(server) {
  fs.chmodSync(server.tmpDir, 0o755);
  fs.chmodSync(server.logFile, 0o600);
}

// ---------------------------------------------------------------------------
// Scopes, organizations, /metrics

describe('scopes and organizations', () => {
  let first; // the default org's echo app: {sdk, orgId, appId, build, deployment}
  const lodge = useLodge({
    setup: async (server) => {
      first = await server.echoApp({ roomsPerProcess: 1 });
    },
  });

  /** A new token of the default org with `scopes`, and an SDK using it. */
  async function scoped(scopes) {
    const created = await first.sdk.tokensV1.createOrgToken(first.orgId, {
      name: uniqueName('scoped'),
      scopes,
    });
    assert.deepEqual(created.orgToken.scopes, scopes, 'the token records its scopes');
    return { ...created, token: created.plainTextToken, sdk: lodge.sdk(created.plainTextToken) };
  }

  test('a builds:read token reads builds and is refused everything else with 401', async () => {
    const { sdk } = await scoped(['builds:read']);
    const { builds } = await sdk.buildsV3.getBuilds();
    assert.ok(builds.some((b) => b.buildId === first.build.buildId), 'GetBuilds lists the echo build');
    assert.equal((await sdk.buildsV3.getBuild(first.build.buildId)).buildId, first.build.buildId);

    await expectScope401(sdk.buildsV3.createBuild({ buildSizeInBytes: 10 }, first.orgId), 'builds:read-write');
    await expectScope401(
      sdk.appsV2.createApp({ appName: uniqueName('denied'), authConfiguration: { anonymous: {} } }, first.orgId),
      'applications:read-write',
    );
    await expectScope401(sdk.appsV2.getApps(), 'applications:read');
    await expectScope401(sdk.appsV2.getApp(first.appId), 'applications:read');
    for (const scopes of [['builds:read'], 'admin', undefined]) {
      await expectScope401(
        sdk.tokensV1.createOrgToken(first.orgId, { name: uniqueName('denied'), scopes }),
        'tokens:read-write',
      );
    }
    await expectScope401(sdk.tokensV1.getOrgTokens(first.orgId), 'tokens:read');
    await expectScope401(sdk.roomsV2.createRoom({ region: REGION }, first.appId), 'processes:read-write');
    await expectScope401(sdk.processesV3.getLatestProcesses(first.appId), 'processes:read');
    await expectScope401(sdk.deploymentsV3.getDeployments(first.appId), 'deployments:read');
    await expectScope401(sdk.organizationsV1.getOrgs(), 'orgs:read');

    // Nothing refused was done anyway.
    assert.deepEqual(await first.sdk.processesV3.getLatestProcesses(first.appId), [], 'the refused CreateRoom started no process');
  });

  test('X:read-write includes X:read, and nothing of another family', async () => {
    const apps = await scoped(['applications:read-write']);
    const made = await apps.sdk.appsV2.createApp(
      { appName: uniqueName('rw'), authConfiguration: { anonymous: {} } },
      first.orgId,
    );
    const listed = (await apps.sdk.appsV2.getApps()).applications.map((a) => a.appId);
    assert.ok(listed.includes(made.appId) && listed.includes(first.appId), 'read through read-write');
    assert.equal((await apps.sdk.appsV2.getApp(made.appId)).appId, made.appId);
    await apps.sdk.appsV2.deleteApp(made.appId);
    await expectScope401(apps.sdk.buildsV3.getBuilds(), 'builds:read');
    await expectScope401(apps.sdk.roomsV2.createRoom({ region: REGION }, first.appId), 'processes:read-write');

    const procs = await scoped(['processes:read-write']);
    const room = await procs.sdk.roomsV2.createRoom({ region: REGION }, first.appId);
    try {
      const info = await waitActive(procs.sdk, first.appId, room.roomId);
      assert.equal(await udpRequest(info.exposedPort.host, info.exposedPort.port, 'scoped'), 'scoped');
      assert.equal((await procs.sdk.roomsV2.getRoomInfo(room.roomId, first.appId)).status, 'active');
      assert.ok((await procs.sdk.processesV3.getLatestProcesses(first.appId)).some((p) => p.processId === room.processId));
      await expectScope401(procs.sdk.appsV2.getApps(), 'applications:read');
      await expectScope401(procs.sdk.deploymentsV3.getDeployments(first.appId), 'deployments:read');
      await procs.sdk.processesV3.stopProcess(room.processId, first.appId);
      const stopped = await waitProcessStatus(procs.sdk, first.appId, room.processId, ['stopped', 'failed']);
      assert.equal(stopped.status, 'stopped', 'StopProcess with processes:read-write');
    } finally {
      await stopQuietly(first.sdk, first.appId, room.processId);
    }
  });

  test('a token never creates a token with more than it holds', async () => {
    const minter = await scoped(['tokens:read-write', 'builds:read']);
    const refused = [
      ['admin', 'admin'],
      ['absent (admin)', undefined],
      ['applications:read-write', ['applications:read-write']],
      ['builds:read-write (more than builds:read)', ['builds:read-write']],
      ['builds:read + applications:read', ['builds:read', 'applications:read']],
    ];
    const refusedNames = [];
    for (const [what, scopes] of refused) {
      const name = uniqueName('escalate');
      refusedNames.push(name);
      try {
        await expectHttpError(minter.sdk.tokensV1.createOrgToken(first.orgId, { name, scopes }), 401);
      } catch (err) {
        err.message = `minting ${what}: ${err.message}`;
        throw err;
      }
    }

    const child = await minter.sdk.tokensV1.createOrgToken(first.orgId, {
      name: uniqueName('child'),
      scopes: ['builds:read'],
    });
    assert.deepEqual(child.orgToken.scopes, ['builds:read']);
    assert.equal(child.orgToken.orgId, first.orgId);
    const childSdk = lodge.sdk(child.plainTextToken);
    assert.ok((await childSdk.buildsV3.getBuilds()).builds.some((b) => b.buildId === first.build.buildId));
    await expectScope401(childSdk.appsV2.getApps(), 'applications:read');
    await expectScope401(
      childSdk.tokensV1.createOrgToken(first.orgId, { name: uniqueName('grandchild'), scopes: ['builds:read'] }),
      'tokens:read-write',
    );

    // tokens:read-write holds tokens:read, so it may hand that on; the refused ones do not exist.
    const reader = await minter.sdk.tokensV1.createOrgToken(first.orgId, {
      name: uniqueName('reader'),
      scopes: ['tokens:read'],
    });
    assert.deepEqual(reader.orgToken.scopes, ['tokens:read']);
    const { tokens } = await minter.sdk.tokensV1.getOrgTokens(first.orgId);
    const names = new Set(tokens.map((t) => t.name));
    assert.ok(names.has(child.orgToken.name) && names.has(reader.orgToken.name));
    for (const name of refusedNames) assert.ok(!names.has(name), `refused token ${name} was not created`);
    // The admin token (scopes absent) still creates admin tokens.
    const admin = await first.sdk.tokensV1.createOrgToken(first.orgId, { name: uniqueName('admin') });
    assert.ok(admin.orgToken.scopes === undefined || admin.orgToken.scopes === 'admin');
  });

  let second; // {orgId, name, token}: the org made through /lodge/v1/orgs

  test('POST /lodge/v1/orgs makes an org and its first admin token; GET lists every org', async () => {
    const name = uniqueName('tenant');
    const created = await call(lodge, 'POST', '/lodge/v1/orgs', { token: lodge.adminToken, body: { name } });
    assert.equal(created.status, 201, created.text);
    const { orgId, createdAt, token } = created.body;
    assert.equal(typeof orgId, 'string');
    assert.ok(orgId.length > 0);
    assert.notEqual(orgId, first.orgId);
    assert.equal(created.body.name, name);
    assert.ok(!Number.isNaN(Date.parse(createdAt)), `createdAt ${createdAt} is a date`);
    assert.equal(typeof token.plainTextToken, 'string');
    assert.ok(token.plainTextToken.length >= 16);
    assert.equal(token.orgToken.orgId, orgId);
    assert.equal(token.orgToken.status, 'active');
    assert.equal(token.orgToken.lastFourCharsOfKey, token.plainTextToken.slice(-4));
    assert.ok(token.orgToken.scopes === undefined || token.orgToken.scopes === 'admin', 'an admin token');
    second = { orgId, name, token: token.plainTextToken };

    const listed = await call(lodge, 'GET', '/lodge/v1/orgs', { token: lodge.adminToken });
    assert.equal(listed.status, 200, listed.text);
    const byId = new Map(listed.body.orgs.map((o) => [o.orgId, o]));
    assert.equal(byId.size, 2, 'the default org and the new one');
    assert.ok(byId.has(first.orgId));
    assert.equal(byId.get(orgId).name, name);
    assert.equal(byId.get(orgId).createdAt, createdAt);

    // Refused: a duplicate name, no token, and any token that is not an instance admin's.
    const dup = await call(lodge, 'POST', '/lodge/v1/orgs', { token: lodge.adminToken, body: { name } });
    assert.equal(dup.status, 422, dup.text);
    assert.equal((await call(lodge, 'POST', '/lodge/v1/orgs', { body: { name: uniqueName('x') } })).status, 401);
    assert.equal((await call(lodge, 'GET', '/lodge/v1/orgs')).status, 401);
    const scopedToken = (await scoped(['orgs:read-write', 'tokens:read-write'])).token;
    assert.equal((await call(lodge, 'GET', '/lodge/v1/orgs', { token: scopedToken })).status, 401);
    const post = await call(lodge, 'POST', '/lodge/v1/orgs', { token: scopedToken, body: { name: uniqueName('x') } });
    assert.equal(post.status, 401, post.text);
    assert.equal(
      (await call(lodge, 'GET', '/lodge/v1/orgs', { token: lodge.adminToken })).body.orgs.length,
      2,
      'no refused call made an org',
    );
  });

  test("an org's token sees nothing of another org", async () => {
    assert.ok(second, 'the org of the previous test exists');
    const other = lodge.sdk(second.token);
    const processesBefore = (await first.sdk.processesV3.getLatestProcesses(first.appId)).length;

    const { orgs } = await other.organizationsV1.getOrgs();
    assert.deepEqual(orgs.map((o) => o.orgId), [second.orgId], 'GetOrgs shows only its own org');
    assert.deepEqual((await other.appsV2.getApps()).applications, []);
    assert.deepEqual((await other.buildsV3.getBuilds()).builds, []);

    await expectHttpError(other.appsV2.getApp(first.appId), 404);
    await expectHttpError(other.buildsV3.getBuild(first.build.buildId), 404);
    await expectHttpError(other.buildsV3.getBuild(first.build.buildId, first.orgId), 404);
    await expectHttpError(other.deploymentsV3.getDeployments(first.appId), 404);
    await expectHttpError(other.roomsV2.createRoom({ region: REGION }, first.appId), 404);
    await expectHttpError(other.tokensV1.getOrgTokens(first.orgId), 404);
    await expectHttpError(other.tokensV1.createOrgToken(first.orgId, { name: uniqueName('intruder') }), 404);
    assert.equal(
      (await first.sdk.processesV3.getLatestProcesses(first.appId)).length,
      processesBefore,
      'the refused CreateRoom started no process',
    );

    // Not an instance admin: no org administration, no /metrics.
    assert.equal((await call(lodge, 'GET', '/lodge/v1/orgs', { token: second.token })).status, 401);
    const post = await call(lodge, 'POST', '/lodge/v1/orgs', { token: second.token, body: { name: uniqueName('x') } });
    assert.equal(post.status, 401, post.text);

    // The other way round: the default org's admin token cannot see the new org's app.
    const theirs = await other.appsV2.createApp({ appName: uniqueName('theirs'), authConfiguration: { anonymous: {} } });
    assert.deepEqual((await other.appsV2.getApps()).applications.map((a) => a.appId), [theirs.appId]);
    await expectHttpError(first.sdk.appsV2.getApp(theirs.appId), 404);
    assert.ok(!(await first.sdk.appsV2.getApps()).applications.some((a) => a.appId === theirs.appId));
    await expectHttpError(first.sdk.tokensV1.getOrgTokens(second.orgId), 404);
  });

  test('/metrics answers only an admin token of the instance', async () => {
    const anonymous = await call(lodge, 'GET', '/metrics');
    assert.equal(anonymous.status, 401);
    assert.equal(typeof anonymous.body.message, 'string');

    const admin = await call(lodge, 'GET', '/metrics', { token: lodge.adminToken });
    assert.equal(admin.status, 200);
    assert.match(admin.contentType, /^text\/plain/);
    assert.match(admin.text, /^# TYPE lodge_rooms_created_total counter$/m);
    assert.match(admin.text, /^lodge_rooms_created_total \d+$/m);
    assert.match(admin.text, /^# TYPE lodge_processes gauge$/m);

    assert.equal((await call(lodge, 'GET', '/metrics', { token: 'not-a-token' })).status, 401);
    const { token } = await scoped(['processes:read-write', 'orgs:read-write']);
    assert.equal((await call(lodge, 'GET', '/metrics', { token })).status, 401, 'a scoped token');
    if (second) {
      assert.equal((await call(lodge, 'GET', '/metrics', { token: second.token })).status, 401, "another org's admin");
    }
  });
});

// ---------------------------------------------------------------------------
// Game servers against Lodge's secrets (root only)

/** Sends the probe a request; returns its report (failing on the probe's own error). */
async function probe(info, request = {}) {
  const reply = JSON.parse(await udpRequest(info.exposedPort.host, info.exposedPort.port, JSON.stringify(request), 5000));
  assert.equal(reply.error, undefined, `the probe failed: ${reply.error}`);
  return reply;
}

function uidOf(pid) {
  const line = fs.readFileSync(`/proc/${pid}/status`, 'utf8').split('\n').find((l) => l.startsWith('Uid:'));
  return Number(line.split(/\s+/)[1]);
}

// Lodge's default isolation as root (`auto`, which is netns) and the shared host network:
// the game-server users do not depend on the network namespace.
for (const isolation of ['auto', 'none']) {
  describe(`game servers cannot read Lodge's secrets (--isolation ${isolation})`, { skip: !root && 'needs root' }, () => {
    const lodge = root
      ? useLodge({
          isolation,
          // No LODGE_ADMIN_TOKEN: Lodge mints one and writes it to <data-dir>/admin-token, the
          // file a game server must not read. PROBE_CANARY must not reach any game server.
          env: { LODGE_ADMIN_TOKEN: '', PROBE_CANARY: 'lodge-env-canary' },
          setup: async (server) => {
            server.adminToken = fs.readFileSync(path.join(server.dataDir, 'admin-token'), 'utf8').trim();
            // Besides, mkdtemp's 0700 would hide the data dir by itself: with the way to it open,
            // only the permissions Lodge sets stand between a game server and its files.
            openTmpDir(server);
          },
        })
      : null;

    test('each process runs as its own user, reads and writes only what is its own', async () => {
      const sdk = lodge.sdk();
      const orgId = await lodge.orgId();
      // The one box: lodge serve is the node, its data dir holds everything. Replicas mode
      // (LODGE_TEST_REPLICAS): the region's `lodge agent` is the node, with the processes and
      // its node credential in its data dir; the admin token is in the replicas' data dirs.
      const node = lodge.nodeFor(REGION);
      const servePid = node.pid;
      const lodgeUid = uidOf(servePid);
      const dataDir = lodge.dataDir;
      const nodeDir = node.dataDir;
      const adminToken = path.join(dataDir, 'admin-token');
      const db = path.join(dataDir, 'lodge.db');
      // On PostgreSQL (LODGE_TEST_STORE) there is no database file to protect.
      const secrets = TEST_STORE ? [adminToken] : [adminToken, db];
      for (const f of secrets) assert.ok(fs.statSync(f).isFile(), `${f} exists (so EACCES means refused)`);
      const nodeSecrets = nodeDir === dataDir ? [] : [path.join(nodeDir, 'node-credential.json')];
      for (const f of nodeSecrets) assert.ok(fs.statSync(f).isFile(), `${f} exists (so EACCES means refused)`);

      const { build } = await uploadBuild(sdk, orgId, await makeBundle(PROBE_DIR), { buildTag: 'probe' });
      assert.equal(build.status, 'succeeded');
      const bundleDir = path.join(lodge.buildDir(build.buildId), 'bundle');
      assert.ok(fs.statSync(path.join(bundleDir, 'probe.py')).isFile(), `the bundle is at ${bundleDir}`);

      const app = await sdk.appsV2.createApp({ appName: uniqueName('probe'), authConfiguration: { anonymous: {} } }, orgId);
      await deployEcho(sdk, app.appId, build.buildId, {
        roomsPerProcess: 1,
        env: [{ name: 'PROBE_DATA_DIR', value: dataDir }],
      });
      const rooms = [];
      for (let i = 0; i < 2; i++) rooms.push(await sdk.roomsV2.createRoom({ region: REGION }, app.appId));
      assert.notEqual(rooms[0].processId, rooms[1].processId, 'one process per room');

      try {
        const procs = [];
        for (const room of rooms) {
          const info = await waitActive(sdk, app.appId, room.roomId);
          procs.push({ processId: room.processId, info, me: await probe(info) });
        }

        for (const { processId, me } of procs) {
          const state = lodge.processState(processId);
          assert.ok(state, `state.json of ${processId}`);
          assert.equal(me.pid, state.gamePid, 'the probe is the recorded game server');
          assert.equal(me.parent, state.shimPid, "the game's parent is its lodge shim");
          assert.equal(me.grandparent, servePid, "the shim's parent is lodge serve");

          assert.notEqual(me.uid, 0, 'not root');
          assert.notEqual(me.uid, lodgeUid, "not Lodge's user");
          assert.equal(me.euid, me.uid);
          assert.equal(me.uid, state.user?.uid, 'the uid Lodge recorded');
          assert.notEqual(me.gid, 0, 'not the root group');
          assert.ok(me.groups.every((g) => g === me.gid), `no supplementary groups (${me.groups})`);
          // Its bundle, mounted read-only beside its HOME, outside the data dir.
          assert.equal(me.cwd, path.join(path.dirname(me.home), 'bundle'), 'runs in its bundle');
          assert.ok(!me.cwd.startsWith(dataDir) && !me.cwd.startsWith(nodeDir), `${me.cwd} is outside the data dir`);

          for (const name of ['PROBE_CANARY', 'LODGE_ADMIN_TOKEN', 'RUST_LOG', 'NO_COLOR']) {
            assert.ok(!me.envNames.includes(name), `Lodge's ${name} is not in the game's environment`);
          }
          assert.ok(me.envNames.includes('PROBE_DATA_DIR') && me.envNames.includes('HATHORA_PROCESS_ID'));

          // Lodge's secrets: every read refused (EACCES, not ENOENT: the files are there).
          const environs = [`/proc/${me.parent}/environ`, `/proc/${servePid}/environ`];
          for (const p of [...environs, ...secrets]) assert.equal(me.read[p], 'EACCES', `reading ${p}`);
          assert.equal(me.list[dataDir], 'EACCES', 'listing the data dir');

          // The bundle is read-only; HOME and TMPDIR are its own and writable.
          // Refused twice over: a read-only mount (EROFS) of files it does not own.
          assert.equal(me.write.cwd, 'EROFS', 'creating a file in the bundle');
          assert.ok(['EACCES', 'EROFS'].includes(me.write.bundleFile), `writing to a bundle file: ${me.write.bundleFile}`);
          assert.equal(me.write.home, 'ok', `writing into HOME ${me.home}`);
          assert.equal(me.write.tmpdir, 'ok', `writing into TMPDIR ${me.tmpdir}`);
          assert.ok(me.marker, 'wrote its marker into HOME at start');
          for (const dir of [me.home, me.tmpdir]) {
            assert.ok(path.isAbsolute(dir) && !dir.startsWith(dataDir) && !dir.startsWith(nodeDir) && dir !== '/root', `${dir} is a scratch dir`);
            const st = fs.statSync(dir);
            assert.equal(st.uid, me.uid, `${dir} belongs to the game's user`);
            assert.equal(st.mode & 0o077, 0, `${dir} is private (mode ${(st.mode & 0o777).toString(8)})`);
          }
        }

        const [a, b] = procs;
        assert.notEqual(a.me.uid, b.me.uid, 'two processes of one deployment have different uids');
        assert.equal(a.me.gid, b.me.gid, 'the group of their build');
        assert.notEqual(a.me.home, b.me.home, 'and HOMEs of their own');

        // Each against the other, its own launch file and Lodge; the bundle by its absolute
        // path and its own environ are the controls that reading works at all.
        for (const [self, peer] of [[a, b], [b, a]]) {
          const launch = path.join(nodeDir, 'processes', self.processId, 'launch.json');
          assert.ok(fs.existsSync(launch), `${launch} exists`);
          const own = `/proc/${self.me.pid}/environ`;
          const theirs = `/proc/${peer.me.pid}/environ`;
          const script = path.join(self.me.cwd, 'probe.py');
          const r = await probe(self.info, {
            read: [peer.me.marker, theirs, launch, script, own, ...nodeSecrets],
            list: [peer.me.home, path.join(nodeDir, 'processes'), nodeDir],
            signal: [peer.me.pid, servePid, self.me.parent, self.me.pid],
          });
          assert.equal(r.read[peer.me.marker], 'EACCES', "reading the other process's HOME");
          assert.equal(r.read[theirs], 'EACCES', "reading the other process's environment");
          assert.equal(r.read[launch], 'EACCES', 'reading its own launch file');
          assert.equal(r.list[peer.me.home], 'EACCES', "listing the other process's HOME");
          assert.equal(r.list[path.join(nodeDir, 'processes')], 'EACCES', "listing Lodge's process dirs");
          assert.equal(r.list[nodeDir], 'EACCES', "listing the node's data dir");
          for (const f of nodeSecrets) assert.equal(r.read[f], 'EACCES', `reading ${f}`);
          assert.equal(r.signal[String(peer.me.pid)], 'EPERM', 'signalling the other process');
          assert.equal(r.signal[String(servePid)], 'EPERM', 'signalling lodge serve');
          assert.equal(r.signal[String(self.me.parent)], 'EPERM', 'signalling its shim');
          assert.equal(r.read[script], 'ok', 'control: it reads its bundle by its absolute path');
          assert.equal(r.read[own], 'ok', 'control: it reads its own environ');
          assert.equal(r.signal[String(self.me.pid)], 'ok', 'control: it signals itself');
        }

        // Ended, each process's scratch dir goes with it.
        for (const { processId } of procs) await sdk.processesV3.stopProcess(processId, app.appId);
        for (const { processId, me } of procs) {
          assert.equal((await waitProcessStatus(sdk, app.appId, processId, ['stopped', 'failed'])).status, 'stopped');
          await waitFor(() => !fs.existsSync(me.home), { timeoutMs: 10_000, what: `${me.home} to be removed` });
        }
      } finally {
        // Whatever failed above, no probe outlives the test.
        for (const { processId } of rooms) await stopQuietly(sdk, app.appId, processId);
      }
    });
  });
}

// ---------------------------------------------------------------------------
// Unauthenticated exhaustion: anonymous players flooding lobbies, one app taking every port

describe('no anonymous player and no single app can exhaust the node', () => {
  const lodge = useLodge({
    args: ['--lobby-rate-limit-source', '5', '--max-processes-per-app', '3', '--stop-grace', '1'],
  });

  test('lobby floods stop at the per-source limit and at the per-app process cap; other apps still get rooms', async () => {
    const { sdk, appId } = await lodge.echoApp({ roomsPerProcess: 1 });
    const player = lodge.sdk(null);
    const started = [];
    try {
      // Every call is a new anonymous player, so the per-player limit never binds: the
      // per-source limit (5) and the app's process cap (3) must.
      const outcomes = [];
      for (let i = 0; i < 8; i++) {
        const { token } = await player.authV1.loginAnonymous(appId);
        try {
          const lobby = await player.lobbiesV3.createLobby({ playerAuth: token }, { visibility: 'public', region: REGION }, appId);
          outcomes.push(201);
          const info = await sdk.roomsV2.getRoomInfo(lobby.roomId, appId);
          started.push(info.currentAllocation.processId);
        } catch (err) {
          outcomes.push(err.statusCode);
          if (err.statusCode === 402) assert.match(err.data$?.message ?? err.message, /max-processes-per-app 3/);
          if (err.statusCode === 429) assert.match(err.data$?.message ?? err.message, /source address/);
        }
      }
      assert.deepEqual(outcomes.slice(0, 3), [201, 201, 201], 'the first three lobbies each start a process');
      assert.deepEqual(outcomes.slice(3, 5), [402, 402], 'then the app has all the processes it may have');
      assert.deepEqual(outcomes.slice(5), [429, 429, 429], 'and this address has used its five creations');
      // (Refused attempts count too: hammering through the 402s used the address's window.)
      // Another app on the same node still gets a room at once.
      const other = await lodge.echoApp({ roomsPerProcess: 1 });
      const room = await other.sdk.roomsV2.createRoom({ region: REGION }, other.appId);
      const info = await waitActive(other.sdk, other.appId, room.roomId);
      assert.equal(await udpRequest(info.exposedPort.host, info.exposedPort.port, 'still here'), 'still here');
      await stopQuietly(other.sdk, other.appId, room.processId);
      // /livez keeps answering.
      assert.equal((await fetch(`${lodge.url}/livez`)).status, 200);
    } finally {
      for (const p of started) await stopQuietly(sdk, appId, p).catch(() => {});
    }
  });
});
