// Moving up: a game that started on a one-box Lodge (embedded store) moves to PostgreSQL with
// `lodge migrate`, and is then served by two control-plane replicas with no node of their own
// and a joined `lodge agent`. Everything the one box knew is there through either replica
// (app, build, deployment, rooms), and a new room runs the build the one box made: the agent
// downloads its artifact from the replica it is attached to, which never built it (migrate
// put it in the database). Runs in every pass of scripts/test except replicas mode, which it
// builds by itself.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import { HathoraCloud } from '@hathora/cloud-sdk-typescript';

import {
  Lodge, LODGE_BIN, REPLICAS, sleep, streamText, udpRequest, waitActive, waitFor,
} from '../lib/lodge.js';

const run = promisify(execFile);
const PG = process.env.LODGE_TEST_POSTGRES || 'postgres://root@127.0.0.1/test';
const psql = (sql) => run('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', PG, '-c', sql]);

async function freePort() {
  const s = net.createServer();
  await new Promise((resolve) => s.listen(0, '127.0.0.1', resolve));
  const { port } = s.address();
  await new Promise((resolve) => s.close(resolve));
  return port;
}

/** A child process whose output goes to a log file, ended (and waited for) at teardown. */
class Child {
  constructor(name, dir, args, env) {
    this.log = path.join(dir, `${name}.log`);
    const fd = fs.openSync(this.log, 'a');
    this.child = spawn(LODGE_BIN, args, { env, stdio: ['ignore', fd, fd] });
    fs.closeSync(fd);
    this.exited = new Promise((resolve) => this.child.once('exit', resolve));
  }

  async stop() {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGTERM');
    await Promise.race([this.exited, sleep(10_000)]);
    this.child.kill('SIGKILL');
    await this.exited;
  }
}

const opts = REPLICAS ? { skip: 'replicas mode: this test moves a one box to replicas by itself' } : {};

test('lodge migrate moves a one-box Lodge to two replicas on PostgreSQL and a joined agent', { ...opts, timeout: 180_000 }, async (t) => {
  // The one box: the embedded store whatever the pass (the point is to leave it).
  const box = new Lodge({ args: ['--store', 'sqlite'] });
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-migrate-'));
  const schema = `lodge_migrate_${process.pid}_${crypto.randomBytes(4).toString('hex')}`;
  const children = [];
  let failed = true;
  after(async () => {
    for (const c of children.reverse()) await c.stop();
    await run(LODGE_BIN, ['cleanup', '--data-dir', path.join(tmp, 'agent')]).catch(() => {});
    await box.teardown();
    await psql(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).catch(() => {});
    if (failed) {
      for (const f of fs.readdirSync(tmp).filter((n) => n.endsWith('.log'))) {
        console.error(`---- ${f} ----\n${fs.readFileSync(path.join(tmp, f), 'utf8')}`);
      }
    }
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  await box.start();
  const { appId } = await box.echoApp();
  const sdk = box.sdk();
  const before = await sdk.roomsV2.createRoom({ region: 'London' }, appId);
  await waitActive(sdk, appId, before.roomId);
  const build = await box.echoBuild();
  await box.stop();

  // Into an empty database; then it refuses to run again on the same one.
  await psql(`CREATE SCHEMA ${schema}`);
  const url = `${PG}${PG.includes('?') ? '&' : '?'}options=-csearch_path%3D${schema}`;
  const { stdout } = await run(LODGE_BIN, ['migrate', '--from', box.dataDir, '--to', url]);
  assert.match(stdout, /artifacts\s+1/, `the build's artifact went into the database:\n${stdout}`);
  await assert.rejects(run(LODGE_BIN, ['migrate', '--from', box.dataDir, '--to', url]), /not empty/);

  // Two replicas: the one box's data dir on PostgreSQL, and a fresh one.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('LODGE_')));
  Object.assign(env, { LODGE_ADMIN_TOKEN: box.adminToken, NO_COLOR: '1', RUST_LOG: 'info' });
  const ports = [await freePort(), await freePort()];
  const dirs = [box.dataDir, path.join(tmp, 'replica-1')];
  const urls = ports.map((p) => `http://127.0.0.1:${p}`);
  for (let i = 0; i < 2; i++) {
    children.push(new Child(`replica-${i}`, tmp, [
      'serve', '--no-local-node', '--store', url, '--data-dir', dirs[i],
      '--api-addr', `127.0.0.1:${ports[i]}`, '--ping-port', String(await freePort()),
    ], env));
  }
  for (const u of urls) {
    await waitFor(async () => (await fetch(`${u}/readyz`).catch(() => ({ status: 0 }))).status === 200, {
      timeoutMs: 30_000,
      what: `replica ${u} ready`,
    });
  }
  const sdks = urls.map((serverURL) => new HathoraCloud({ serverURL, hathoraDevToken: box.adminToken }));

  // What the one box knew, through either replica.
  for (const s of sdks) {
    assert.equal((await s.appsV2.getApp(appId)).appId, appId);
    assert.equal((await s.buildsV3.getBuild(build.buildId)).status, 'succeeded');
    assert.equal((await s.roomsV2.getRoomInfo(before.roomId, appId)).roomId, before.roomId);
  }

  // A node joins through replica 1 (which never saw the build) and runs a new room.
  const res = await fetch(`${urls[1]}/lodge/v1/nodes/join-tokens`, {
    method: 'POST',
    headers: { authorization: `Bearer ${box.adminToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ region: 'Frankfurt', ttlSeconds: 600 }),
  });
  assert.equal(res.status, 201, await res.clone().text());
  const { token } = await res.json();
  children.push(new Child('agent', tmp, [
    'agent', '--control-plane', urls[1], '--join-token', token, '--region', 'Frankfurt',
    '--public-host', '127.0.0.1', '--data-dir', path.join(tmp, 'agent'),
    '--port-range', `${box.portRange.start}-${box.portRange.end}`, '--ping-port', String(await freePort()),
    '--isolation', 'none', '--cpu', '8',
  ], env));
  // The one box's embedded node went with it: it takes no new work once it has been silent
  // for 10 s, and the agent does.
  await waitFor(async () => {
    const r = await fetch(`${urls[0]}/lodge/v1/nodes`, { headers: { authorization: `Bearer ${box.adminToken}` } });
    const { nodes } = await r.json();
    return nodes.some((n) => !n.embedded && n.reachable) && nodes.filter((n) => n.embedded).every((n) => !n.reachable);
  }, { timeoutMs: 30_000, what: 'the agent reachable, the one box\'s node not' });
  const room = await sdks[0].roomsV2.createRoom({ region: 'Frankfurt' }, appId);
  const info = await waitActive(sdks[0], appId, room.roomId, 30_000);
  assert.equal(await udpRequest(info.exposedPort.host, info.exposedPort.port, 'moved'), 'moved');
  // Its log, asked of the replica that does not hold the node's session.
  const log = await streamText(await sdks[0].logsV1.getLogsForProcess(room.processId, appId, false, 50));
  assert.match(log, /listening/, `the log comes through the other replica: ${log}`);
  await sdks[1].roomsV2.destroyRoom(room.roomId, appId);
  await sdks[0].processesV3.stopProcess(room.processId, appId);
  t.diagnostic(`migrated: ${stdout.trim().split('\n').length} lines of counts`);
  failed = false;
});
