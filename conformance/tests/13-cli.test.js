// The `lodge` CLI against a real Lodge: the README quickstart commands, output formats, and
// errors shown verbatim with a non-zero exit.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import {
  deployEcho,
  ECHO_DIR,
  LODGE_BIN,
  REPO_DIR,
  tcpRequest,
  udpRequest,
  useLodge,
  waitFor,
  withTimeout,
} from '../lib/lodge.js';

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

/** A failure reported as exactly one `error: ...` line on stderr, with a non-zero exit. */
async function cliFailsWithOneLine(args, extra = {}) {
  const e = await cliFails(args, extra);
  assert.notEqual(e.code, 0, `lodge ${args.join(' ')} exits non-zero`);
  const lines = e.stderr.split('\n').filter((l) => l !== '');
  assert.equal(lines.length, 1, `lodge ${args.join(' ')}: one line on stderr, got ${JSON.stringify(e.stderr)}`);
  assert.match(lines[0], /^error: \S/);
  assert.equal(e.stdout, '', 'nothing on stdout');
  return lines[0];
}

/** Every regular file below `dir`, relative, `/`-separated, sorted. */
function listFiles(dir, rel = '') {
  const out = [];
  for (const e of fs.readdirSync(path.join(dir, rel), { withFileTypes: true })) {
    const p = rel ? `${rel}/${e.name}` : e.name;
    if (e.isDirectory()) out.push(...listFiles(dir, p));
    else out.push(p);
  }
  return out.sort();
}

test('deploy checks its input before creating anything on the server', async () => {
  const missing = await cliFailsWithOneLine(['deploy', path.join(os.tmpdir(), 'lodge-no-such-dir')]);
  assert.match(missing, /lodge-no-such-dir: No such file or directory/);
  const notArchive = await cliFailsWithOneLine(['deploy', path.join(ECHO_DIR, 'server.py')]);
  assert.match(notArchive, /is neither a directory nor a \.tgz\/\.tar\.gz\/\.tar archive/);
  const badPort = await cliFailsWithOneLine(['deploy', ECHO_DIR, '--additional-port', 'debug']);
  assert.match(badPort, /--additional-port 'debug': expected NAME:PORT\/PROTO/);
  const apps = JSON.parse((await cli(['apps', 'list', '--json'])).stdout).applications;
  assert.deepEqual(apps, [], 'no application was created');
  const builds = JSON.parse((await cli(['builds', 'list', '--json'])).stdout).builds;
  assert.deepEqual(builds, [], 'no build was created');
});

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
    const write = (rel, data = 'x') => {
      fs.mkdirSync(path.dirname(path.join(dir, rel)), { recursive: true });
      fs.writeFileSync(path.join(dir, rel), data);
    };
    write('huge.bin', Buffer.alloc(1 << 20));
    write('node_modules/x.js', '1');
    write('logs/debug.log');
    write('logs/notes.txt');
    // Docker's exceptions: the directory is excluded, but what `!` names inside it is kept.
    write('assets/big.png');
    write('assets/keep/readme.txt');
    write('assets/keep/skip.png');
    write('assets/keep/deeper/other.txt');
    write('.gitignore', 'node_modules/\n*.log\n');
    write('.dockerignore', '*.bin\nassets\n!assets/keep/*.txt\n');
    const apps = JSON.parse((await cli(['apps', 'list', '--json'])).stdout).applications;
    const appId = apps[0].appId;
    const first = await cli(['deploy', dir, '--app-id', appId, '--rooms-per-process', '3', '--additional-port', 'debug:7778/tcp', '--build-tag', 'v1', '--json']);
    const expected = [
      ...fs.readdirSync(ECHO_DIR),
      '.dockerignore',
      '.gitignore',
      'assets/keep/readme.txt',
      'logs/notes.txt',
    ].sort();
    assert.match(first.stderr, new RegExp(`packed ${expected.length} files`));
    // What was uploaded: the server unpacks each build under <data-dir>/builds/<buildId>/bundle.
    const { buildId } = JSON.parse(first.stdout);
    assert.deepEqual(listFiles(path.join(lodge.buildDir(buildId), 'bundle')), expected);
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
  assert.equal(
    await cliFailsWithOneLine(['apps', 'list'], { LODGE_TOKEN: 'nope' }),
    'error: Invalid developer token (HTTP 401)',
  );
  assert.equal(
    await cliFailsWithOneLine(['rooms', 'list', '--app-id', 'app-does-not-exist']),
    'error: App not found: app-does-not-exist (HTTP 404)',
  );
  const buildsBefore = JSON.parse((await cli(['builds', 'list', '--json'])).stdout).builds.length;
  assert.equal(
    await cliFailsWithOneLine(['deploy', ECHO_DIR, '--app-id', 'app-does-not-exist']),
    'error: App not found: app-does-not-exist (HTTP 404)',
  );
  const buildsAfter = JSON.parse((await cli(['builds', 'list', '--json'])).stdout).builds.length;
  assert.equal(buildsAfter, buildsBefore, 'deploy to an unknown app uploads no build');
  assert.match(
    await cliFailsWithOneLine(['apps', 'list', '--api-url', 'http://127.0.0.1:1']),
    /^error: cannot reach http:\/\/127\.0\.0\.1:1: Connection refused/,
  );
  const token = await cli(['tokens', 'create', 'ci']);
  assert.match(token.stdout.trim(), /^lodge_org_st_/);
  const orgs = await cli(['apps', 'list', '--json'], { LODGE_TOKEN: token.stdout.trim() });
  assert.ok(JSON.parse(orgs.stdout).applications.length >= 1, 'the new token works');
});

test('deploy an archive, then a room answers over UDP', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-cli-'));
  try {
    const tgz = path.join(dir, 'echo-server.tgz');
    await run('tar', ['czf', tgz, '-C', ECHO_DIR, '.']);
    const deploy = await cli(['deploy', tgz, '--env', 'GREETING=from-archive', '--no-idle-timeout', '--idle-timeout', '--json']);
    assert.match(deploy.stderr, /uploading .*echo-server\.tgz/);
    assert.match(deploy.stderr, /build .* succeeded/);
    const d = JSON.parse(deploy.stdout);
    assert.equal(d.idleTimeoutEnabled, true, 'the last of --no-idle-timeout and --idle-timeout wins');

    const { stdout } = await cli(['rooms', 'create', '--region', 'London', '--wait', '--deployment-id', d.deploymentId, '--json']);
    const info = JSON.parse(stdout);
    assert.equal(info.status, 'active');
    const { host, port } = info.exposedPort;
    assert.equal(await udpRequest(host, port, 'env GREETING'), 'from-archive');
    assert.equal(await udpRequest(host, port, 'hello'), 'hello');

    const room = JSON.parse((await cli(['rooms', 'info', info.roomId, '--json'])).stdout);
    await cli(['processes', 'stop', room.currentAllocation.processId]);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('logs -f shows lines as the game server prints them, and ends with the process', async () => {
  // The echo server logs every TCP connection, so one to its debug port makes a new line.
  const deploy = await cli(['deploy', ECHO_DIR, '--additional-port', 'debug:7778/tcp', '--idle-timeout', '--no-idle-timeout', '--json']);
  const d = JSON.parse(deploy.stdout);
  assert.equal(d.idleTimeoutEnabled, false, 'the last of --idle-timeout and --no-idle-timeout wins');
  const info = JSON.parse((await cli(['rooms', 'create', '--region', 'London', '--wait', '--deployment-id', d.deploymentId, '--json'])).stdout);
  const debug = info.additionalExposedPorts.find((p) => p.name === 'debug');
  assert.ok(debug, `a debug port in ${JSON.stringify(info)}`);
  const room = JSON.parse((await cli(['rooms', 'info', info.roomId, '--json'])).stdout);
  const processId = room.currentAllocation.processId;

  const follow = spawn(LODGE_BIN, ['logs', processId, '-f'], { env: env(), stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  follow.stdout.on('data', (chunk) => (out += chunk));
  follow.stderr.on('data', (chunk) => (err += chunk));
  let ended = false;
  const closed = new Promise((resolve) => follow.once('close', (code, signal) => resolve({ code, signal })));
  closed.then(() => (ended = true));
  try {
    await waitFor(() => out.includes('echo server listening'), { what: 'the log so far on lodge logs -f' });
    assert.doesNotMatch(out, /tcp connection from/);

    await tcpRequest(debug.host, debug.port, 'hello');
    await waitFor(() => /tcp connection from \S+ on debug port/.test(out), {
      timeoutMs: 10_000,
      what: `the new line on lodge logs -f (stdout so far: ${JSON.stringify(out)})`,
    });
    assert.equal(ended, false, 'lodge logs -f is still following');

    await cli(['processes', 'stop', processId]);
    const { code } = await withTimeout(closed, 15_000, 'lodge logs -f did not end within 15 s of the process stopping');
    assert.equal(code, 0, `lodge logs -f exits 0 (stderr: ${err})`);
    assert.match(out, /shutting down/);
    assert.equal(err, '');
  } finally {
    if (!ended) follow.kill('SIGKILL');
  }
});

test('list commands show every page', async () => {
  const apps = JSON.parse((await cli(['apps', 'list', '--json'])).stdout).applications;
  const appId = apps[0].appId;
  const sdk = lodge.sdk();
  const latest = JSON.parse((await cli(['deployments', 'info', '--json'])).stdout);

  // ListDeployments answers 100 at a time.
  const before = JSON.parse((await cli(['deployments', 'list', '--json'])).stdout).deployments.length;
  for (let i = 0; i < 101; i++) await deployEcho(sdk, appId, latest.buildId, { roomsPerProcess: 1 });
  const all = JSON.parse((await cli(['deployments', 'list', '--json'])).stdout).deployments;
  assert.equal(all.length, before + 101);
  assert.equal(new Set(all.map((x) => x.deploymentId)).size, all.length, 'no deployment twice');
  const table = (await cli(['deployments', 'list'])).stdout.trim().split('\n');
  assert.equal(table.length, 1 + before + 101, 'a header and one row per deployment');

  // GetLatestProcesses answers 10 at a time; rooms list looks at every live process.
  const roomIds = [];
  for (let i = 0; i < 12; i++) {
    roomIds.push(JSON.parse((await cli(['rooms', 'create', '--region', 'London', '--json'])).stdout).roomId);
  }
  const rooms = JSON.parse((await cli(['rooms', 'list', '--json'])).stdout);
  try {
    assert.deepEqual(rooms.map((r) => r.roomId).sort(), [...roomIds].sort());
    assert.equal(new Set(rooms.map((r) => r.currentAllocation.processId)).size, 12, 'one process per room');
  } finally {
    for (const processId of new Set(rooms.map((r) => r.currentAllocation?.processId).filter(Boolean))) {
      await cli(['processes', 'stop', processId]);
    }
  }
});

test('completions and help', async () => {
  assert.match((await cli(['completions', 'bash'])).stdout, /_lodge\(\)/);
  assert.match((await cli(['--help'])).stdout, /lodge rooms create --region London --wait/);
});
