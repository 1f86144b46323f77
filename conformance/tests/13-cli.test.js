// The `lodge` CLI against a real Lodge: the README quickstart commands, output formats, and
// errors shown verbatim with a non-zero exit.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import { ECHO_DIR, LODGE_BIN, REPO_DIR, useLodge } from '../lib/lodge.js';

const lodge = useLodge();
const run = promisify(execFile);

function env(extra = {}) {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('LODGE_') && !k.startsWith('HATHORA_')));
  return { ...clean, LODGE_API_URL: lodge.url, LODGE_TOKEN: lodge.adminToken, ...extra };
}

async function cli(args, extra = {}) {
  return run(LODGE_BIN, args, { env: env(extra), timeout: 120_000, maxBuffer: 16 << 20 });
}

async function cliFails(args, extra = {}) {
  try {
    await cli(args, extra);
  } catch (e) {
    return e;
  }
  assert.fail(`lodge ${args.join(' ')} should have failed`);
}

test('quickstart: deploy, create a room, get a UDP reply, read logs', async () => {
  const deploy = await cli(['deploy', ECHO_DIR, '--rooms-per-process', '2', '--env', 'GREETING=from-cli']);
  const deploymentId = deploy.stdout.trim();
  assert.match(deploymentId, /^dep-/);
  assert.match(deploy.stderr, /created application app-/);
  assert.match(deploy.stderr, /build .* succeeded/);

  const { stdout: addr } = await cli(['rooms', 'create', '--region', 'London', '--wait']);
  assert.match(addr.trim(), /^127\.0\.0\.1:\d+$/);
  const say = path.join(REPO_DIR, 'examples', 'echo', 'say.py');
  const { stdout: reply } = await run('python3', [say, addr.trim(), 'env', 'GREETING']);
  assert.equal(reply.trim(), 'from-cli');

  const processes = JSON.parse((await cli(['processes', 'list', '--json', '--status', 'running'])).stdout);
  assert.equal(processes.length, 1);
  const processId = processes[0].processId;
  assert.equal(`${processes[0].exposedPort.host}:${processes[0].exposedPort.port}`, addr.trim());

  const table = (await cli(['processes', 'list'])).stdout;
  assert.match(table, /^PROCESS ID +STATUS +REGION/m);
  assert.match(table, new RegExp(`^${processId} +running +London +1/2`, 'm'));

  const logs = (await cli(['logs', processId, '--tail', '5'])).stdout;
  assert.match(logs, /echo server listening on port 7777|echo server listening on port \d+/);

  const rooms = JSON.parse((await cli(['rooms', 'list', '--json'])).stdout);
  assert.equal(rooms.length, 1);
  const connect = (await cli(['rooms', 'connect', rooms[0].roomId])).stdout;
  assert.match(connect, new RegExp(`^default +udp +${addr.trim()}$`, 'm'));

  await cli(['rooms', 'destroy', rooms[0].roomId]);
  const info = JSON.parse((await cli(['rooms', 'info', rooms[0].roomId, '--json'])).stdout);
  assert.equal(info.status, 'destroyed');

  await cli(['processes', 'stop', processId]);
});

test('deploy honours ignore files and --from-latest keeps settings', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-cli-'));
  try {
    for (const f of fs.readdirSync(ECHO_DIR)) fs.copyFileSync(path.join(ECHO_DIR, f), path.join(dir, f));
    fs.writeFileSync(path.join(dir, 'huge.bin'), Buffer.alloc(1 << 20));
    fs.mkdirSync(path.join(dir, 'node_modules'));
    fs.writeFileSync(path.join(dir, 'node_modules', 'x.js'), '1');
    fs.writeFileSync(path.join(dir, '.gitignore'), 'node_modules/\n');
    fs.writeFileSync(path.join(dir, '.dockerignore'), '*.bin\n');
    const apps = JSON.parse((await cli(['apps', 'list', '--json'])).stdout).applications;
    const appId = apps[0].appId;
    const first = await cli(['deploy', dir, '--app-id', appId, '--rooms-per-process', '3', '--additional-port', 'debug:7778/tcp', '--build-tag', 'v1']);
    const files = fs.readdirSync(ECHO_DIR).length + 2; // + .gitignore + .dockerignore
    assert.match(first.stderr, new RegExp(`packed ${files} files`));
    const second = await cli(['deploy', dir, '--app-id', appId, '--from-latest', '--build-tag', 'v2', '--json']);
    const d = JSON.parse(second.stdout);
    assert.equal(d.roomsPerProcess, 3, 'copied from the latest deployment');
    assert.deepEqual(d.additionalContainerPorts, [{ name: 'debug', port: 7778, transportType: 'tcp' }]);
    assert.equal(d.buildTag, 'v2');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('errors: the API message verbatim and a non-zero exit', async () => {
  const missing = await cliFails(['rooms', 'info', 'no-such-room']);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /^error: Room not found: no-such-room \(HTTP 404\)$/m);
  const bad = await cliFails(['apps', 'list'], { LODGE_TOKEN: 'nope' });
  assert.match(bad.stderr, /error: Invalid developer token \(HTTP 401\)/);
  const usage = await cliFails(['rooms', 'create']);
  assert.equal(usage.code, 2, 'usage errors exit 2');
  const token = await cli(['tokens', 'create', 'ci']);
  assert.match(token.stdout.trim(), /^lodge_org_st_/);
  const orgs = await cli(['apps', 'list', '--json'], { LODGE_TOKEN: token.stdout.trim() });
  assert.ok(JSON.parse(orgs.stdout).applications.length >= 1, 'the new token works');
});

test('completions and help', async () => {
  assert.match((await cli(['completions', 'bash'])).stdout, /_lodge\(\)/);
  assert.match((await cli(['--help'])).stdout, /lodge rooms create --region London --wait/);
});
