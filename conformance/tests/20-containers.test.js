// Container builds and the oci driver (issue: Dockerfile tarballs, images, registries, limits,
// metrics). Everything is built offline: a static game server (fixtures/gs.c, compiled here with
// gcc -static) packed FROM scratch. Through the official SDK: a Dockerfile upload built with
// buildah, a docker-archive and an OCI-layout upload imported as they are, registry pulls from a
// real local registry (Debian's docker-registry) with and without auth; then rooms answering
// over UDP and TCP through the proxy, isolation (every container binds 7777, read-only root,
// tmpfs /tmp, own hostname), an out-of-memory kill, a CPU quota, metrics, a restart of Lodge.
// Needs root (network namespaces, cgroups, the OCI runtime); .ci/run installs buildah, crun,
// runc and docker-registry and runs as root, so nothing here is skipped in CI.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import {
  Lodge,
  CONFORMANCE_DIR,
  uniqueName,
  uploadBuild,
  waitActive,
  waitFor,
  waitProcessStatus,
  udpRequest,
  tcpRequest,
  streamText,
  sleep,
  expectHttpError,
  TEARDOWN_TIMEOUT_MS,
} from '../lib/lodge.js';

const run = promisify(execFile);
const REGION = 'Dallas';
const isRoot = process.getuid?.() === 0;
const skip = isRoot ? false : 'needs root (network namespaces, cgroups, an OCI runtime)';

let work;
let ctxTgz; // the Dockerfile build context, as uploaded
let dockerArchive;
let ociArchive;
const buildahArgs = () => ['--root', path.join(work, 'bstore'), '--runroot', path.join(work, 'brun'), '--storage-driver', 'vfs'];

async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/** A docker-registry on a free port, optionally with htpasswd auth. */
async function startRegistry(auth) {
  const port = await freePort();
  const dir = path.join(work, `registry-${port}`);
  fs.mkdirSync(dir, { recursive: true });
  let authBlock = '';
  if (auth) {
    const { stdout } = await run('htpasswd', ['-Bbn', auth.user, auth.password]);
    fs.writeFileSync(path.join(dir, 'htpasswd'), stdout);
    authBlock = `auth:\n  htpasswd:\n    realm: lodge-test\n    path: ${path.join(dir, 'htpasswd')}\n`;
  }
  fs.writeFileSync(
    path.join(dir, 'config.yml'),
    `version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: ${dir}/data\nhttp:\n  addr: 127.0.0.1:${port}\n${authBlock}`,
  );
  const child = spawn('docker-registry', ['serve', path.join(dir, 'config.yml')], { stdio: 'ignore' });
  await waitFor(
    async () => {
      try {
        const res = await fetch(`http://127.0.0.1:${port}/v2/`);
        return res.status === 200 || res.status === 401;
      } catch {
        return false;
      }
    },
    { timeoutMs: 10_000, what: 'the registry to listen' },
  );
  return { port, child };
}

async function pushTo(registry, creds) {
  const args = [...buildahArgs(), 'push', '--tls-verify=false'];
  if (creds) args.push('--creds', `${creds.user}:${creds.password}`);
  await run('buildah', [...args, 'localhost/gs-fixture:1', `docker://127.0.0.1:${registry.port}/games/gs:1`]);
}

const registries = [];

before(async () => {
  if (skip) return;
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-containers-'));
  const ctx = path.join(work, 'ctx');
  fs.mkdirSync(ctx);
  await run('gcc', ['-static', '-O2', '-o', path.join(ctx, 'gs'), path.join(CONFORMANCE_DIR, 'fixtures', 'gs.c')]);
  fs.writeFileSync(
    path.join(ctx, 'Dockerfile'),
    'FROM scratch\nCOPY gs /gs\nENV GS_FLAVOUR=containerised\nEXPOSE 7777/udp\nENTRYPOINT ["/gs"]\n',
  );
  ctxTgz = (await run('tar', ['czf', '-', '-C', ctx, '.'], { encoding: 'buffer', maxBuffer: 64 << 20 })).stdout;
  // The same image as a docker-archive and as an OCI layout, made offline with buildah.
  await run('buildah', [...buildahArgs(), 'bud', '--isolation', 'chroot', '-t', 'localhost/gs-fixture:1', ctx]);
  await run('buildah', [...buildahArgs(), 'push', 'localhost/gs-fixture:1', `docker-archive:${work}/gs-docker.tar:gs:1`]);
  await run('buildah', [...buildahArgs(), 'push', 'localhost/gs-fixture:1', `oci-archive:${work}/gs-oci.tar:gs:1`]);
  dockerArchive = fs.readFileSync(path.join(work, 'gs-docker.tar'));
  ociArchive = fs.readFileSync(path.join(work, 'gs-oci.tar'));
});

after(async () => {
  for (const r of registries) r.child.kill('SIGKILL');
  if (work) {
    await run('buildah', [...buildahArgs(), 'rmi', '--all', '--force']).catch(() => {});
    fs.rmSync(work, { recursive: true, force: true });
  }
});

/** A Lodge with container support (root, netns isolation) and an app. */
function containerLodge(extraArgs = []) {
  const lodge = new Lodge({
    isolation: 'netns',
    args: ['--metrics-interval', '0.2', '--stop-grace', '2', ...extraArgs],
  });
  const ctx = { lodge };
  before(
    async () => {
      if (skip) return;
      await lodge.start();
      ctx.sdk = lodge.sdk();
      ctx.orgId = await lodge.orgId();
      ctx.app = await ctx.sdk.appsV2.createApp({ appName: uniqueName('ctr'), authConfiguration: {} }, ctx.orgId);
      ctx.appId = ctx.app.appId;
    },
    { timeout: 60_000 },
  );
  after(() => lodge.teardown(), { timeout: Math.max(30_000, TEARDOWN_TIMEOUT_MS) });
  return ctx;
}

function deploy(ctx, buildId, opts = {}) {
  return ctx.sdk.deploymentsV3.createDeployment(
    {
      buildId,
      idleTimeoutEnabled: false,
      env: [{ name: 'FROM_DEPLOYMENT', value: 'yes' }],
      roomsPerProcess: 1,
      transportType: opts.transport ?? 'udp',
      containerPort: 7777,
      requestedCPU: opts.cpu ?? 0.5,
      requestedMemoryMB: opts.memory ?? 128,
    },
    ctx.appId,
  );
}

async function room(ctx) {
  const created = await ctx.sdk.roomsV2.createRoom({ region: REGION }, ctx.appId);
  const info = await waitActive(ctx.sdk, ctx.appId, created.roomId, 30_000);
  return { ...created, port: info.exposedPort.port, host: info.exposedPort.host, info };
}

const say = (r, msg) => udpRequest(r.host, r.port, msg, 5000);

describe('containers with crun', { skip }, () => {
  // The test registries run on loopback, which the operator must allow explicitly.
  const ctx = containerLodge(['--oci-runtime', 'crun', '--registry-allow', '127.0.0.1']);
  let dockerfileBuild;

  test('a Dockerfile tarball is built with buildah, its image stored and measured', async () => {
    const { build, log } = await uploadBuild(ctx.sdk, ctx.orgId, ctxTgz, { buildTag: 'ctr-1' });
    assert.equal(build.status, 'succeeded', log);
    assert.ok(build.imageSize > 0, 'imageSize is set');
    assert.match(build.contentHash, /^sha256:[0-9a-f]{64}$/);
    assert.match(log, /buildah/);
    assert.match(log, /runs: \/gs/);
    dockerfileBuild = build;
  });

  test('rooms in containers: isolation, read-only root, tmpfs /tmp, environment, UDP and TCP', async () => {
    assert.ok(dockerfileBuild, 'needs the Dockerfile build');
    await deploy(ctx, dockerfileBuild.buildId);
    const [a, b] = [await room(ctx), await room(ctx)];
    assert.notEqual(a.processId, b.processId);
    for (const r of [a, b]) {
      assert.equal(await say(r, 'hello container'), 'hello container');
      assert.equal(await say(r, 'env PORT'), '7777', 'every container binds the container port itself');
      assert.equal(await say(r, 'env HATHORA_PROCESS_ID'), r.processId);
      assert.equal(await say(r, 'env GS_FLAVOUR'), 'containerised', 'the image ENV is kept');
      assert.equal(await say(r, 'env FROM_DEPLOYMENT'), 'yes');
      assert.equal(await say(r, 'host'), `lodge-${r.processId.slice(0, 8)}`);
      assert.match(await say(r, 'write'), /^refused: Read-only file system/);
      assert.equal(await say(r, 'tmp'), 'tmp ok');
    }
    await deploy(ctx, dockerfileBuild.buildId, { transport: 'tcp' });
    const t = await room(ctx);
    assert.equal(t.info.exposedPort.transportType, 'tcp');
    assert.equal(await tcpRequest(t.host, t.port, 'over tcp'), 'over tcp');
  });

  test('a docker-archive and an OCI image layout are imported as they are', async () => {
    for (const [name, archive] of [['docker-archive', dockerArchive], ['oci-layout', ociArchive]]) {
      const { build, log } = await uploadBuild(ctx.sdk, ctx.orgId, archive);
      assert.equal(build.status, 'succeeded', `${name}: ${log}`);
      assert.match(log, /image archive/);
      assert.doesNotMatch(log, /buildah/, `${name} needs no builder`);
      await deploy(ctx, build.buildId);
      const r = await room(ctx);
      assert.equal(await say(r, `hello ${name}`), `hello ${name}`);
    }
  });

  test('requestedMemoryMB is enforced: an out-of-memory kill fails the process and says so', async () => {
    await deploy(ctx, dockerfileBuild.buildId, { memory: 64 });
    const r = await room(ctx);
    await say(r, 'eat 300').catch(() => {}); // the reply never comes: it is killed first
    const p = await waitProcessStatus(ctx.sdk, ctx.appId, r.processId, ['failed', 'stopped'], 15_000);
    assert.equal(p.status, 'failed');
    assert.match(p.summaryExitReason, /out of memory/);
    assert.equal((await ctx.sdk.roomsV2.getRoomInfo(r.roomId, ctx.appId)).status, 'destroyed');
  });

  test('requestedCPU is a CPU quota, and metrics come back through the SDK', async () => {
    await deploy(ctx, dockerfileBuild.buildId, { cpu: 0.25 });
    const r = await room(ctx);
    const cpuMs = Number(await say(r, 'burn 1500'));
    // 1.5 s of spinning at a quarter of a core is about 375 ms of CPU; a whole core would be 1500.
    assert.ok(cpuMs > 100 && cpuMs < 750, `CPU time under a 0.25 quota: ${cpuMs} ms`);
    const now = Math.floor(Date.now() / 1000);
    const m = await waitFor(
      async () => {
        const got = await ctx.sdk.processesV3.getProcessMetrics({
          appId: ctx.appId,
          processId: r.processId,
          start: now - 60,
          end: now + 60,
          step: 1,
        });
        return got.cpu?.some((x) => x.value > 0.1) && got.totalEgress?.at(-1)?.value > 0 ? got : null;
      },
      { timeoutMs: 5000, what: 'CPU to show in the metrics' },
    );
    const peak = Math.max(...m.cpu.map((x) => x.value));
    assert.ok(peak <= 0.45, `CPU stays near the 0.25 quota (peak ${peak})`);
    assert.ok(m.memory.some((x) => x.value > 0));
    assert.ok(m.totalEgress.at(-1).value > 0);
  });

  test('registry builds pull from a real registry, anonymously and with auth', async () => {
    const open = await startRegistry();
    registries.push(open);
    await pushTo(open);
    const plain = await ctx.sdk.buildsV3.createBuildRegistry({ buildTag: 'from-registry' }, ctx.orgId);
    assert.equal(plain.status, 'created');
    const log = await streamText(
      await ctx.sdk.buildsV3.runBuildRegistry(plain.buildId, { image: `127.0.0.1:${open.port}/games/gs:1` }, ctx.orgId),
    );
    assert.match(log, /pulled sha256:/);
    const built = await ctx.sdk.buildsV3.getBuild(plain.buildId, ctx.orgId);
    assert.equal(built.status, 'succeeded', log);
    assert.ok(built.imageSize > 0);
    await deploy(ctx, plain.buildId);
    assert.equal(await say(await room(ctx), 'pulled'), 'pulled');

    const creds = { user: 'lodge', password: crypto.randomBytes(8).toString('hex') };
    const locked = await startRegistry(creds);
    registries.push(locked);
    await pushTo(locked, creds);
    const ok = await ctx.sdk.buildsV3.createBuildRegistry({}, ctx.orgId);
    const okLog = await streamText(
      await ctx.sdk.buildsV3.runBuildRegistry(
        ok.buildId,
        { image: 'games/gs:1', registryUrl: `http://127.0.0.1:${locked.port}`, auth: `${creds.user}:${creds.password}` },
        ctx.orgId,
      ),
    );
    assert.equal((await ctx.sdk.buildsV3.getBuild(ok.buildId, ctx.orgId)).status, 'succeeded', okLog);
    const bad = await ctx.sdk.buildsV3.createBuildRegistry({}, ctx.orgId);
    const badLog = await streamText(
      await ctx.sdk.buildsV3.runBuildRegistry(
        bad.buildId,
        { image: 'games/gs:1', registryUrl: `http://127.0.0.1:${locked.port}`, auth: 'lodge:wrong' },
        ctx.orgId,
      ),
    );
    assert.equal((await ctx.sdk.buildsV3.getBuild(bad.buildId, ctx.orgId)).status, 'failed');
    assert.match(badLog, /credentials/);
    const none = await ctx.sdk.buildsV3.createBuildRegistry({}, ctx.orgId);
    const noneLog = await streamText(
      await ctx.sdk.buildsV3.runBuildRegistry(none.buildId, { image: `127.0.0.1:${locked.port}/games/gs:1` }, ctx.orgId),
    );
    assert.match(noneLog, /credentials/);
  });

  test('containers survive kill -9 of Lodge and are re-adopted on the same port', async () => {
    await deploy(ctx, dockerfileBuild.buildId);
    const r = await room(ctx);
    assert.equal(await say(r, 'before'), 'before');
    await ctx.lodge.kill9();
    await ctx.lodge.start();
    assert.equal((await waitActive(ctx.sdk, ctx.appId, r.roomId)).exposedPort.port, r.port);
    assert.equal(await say(r, 'after'), 'after');
    await ctx.sdk.processesV3.stopProcess(r.processId, ctx.appId);
    const p = await waitProcessStatus(ctx.sdk, ctx.appId, r.processId, ['stopped', 'failed'], 20_000);
    assert.equal(p.status, 'stopped', p.summaryExitReason);
  });
});

describe('containers with runc', { skip }, () => {
  const ctx = containerLodge(['--oci-runtime', 'runc']);

  test('the same image runs under runc, and its memory limit holds', async () => {
    const { build, log } = await uploadBuild(ctx.sdk, ctx.orgId, ociArchive);
    assert.equal(build.status, 'succeeded', log);
    await deploy(ctx, build.buildId, { memory: 64 });
    const r = await room(ctx);
    assert.equal(await say(r, 'hello runc'), 'hello runc');
    await say(r, 'eat 300').catch(() => {});
    const p = await waitProcessStatus(ctx.sdk, ctx.appId, r.processId, ['failed', 'stopped'], 15_000);
    assert.match(p.summaryExitReason, /out of memory/);
  });
});

describe('without an image builder', { skip }, () => {
  const ctx = containerLodge(['--image-builder', '/nonexistent/buildah']);

  test('a Dockerfile build fails with a log line that says what to install', async () => {
    const { build, log } = await uploadBuild(ctx.sdk, ctx.orgId, ctxTgz);
    assert.equal(build.status, 'failed');
    assert.match(log, /install buildah/);
    await sleep(10);
  });

  test('registry pulls reach no private address the operator did not allow, and take a host only', async () => {
    const registry = registries[0];
    assert.ok(registry, 'the registry test ran first and left its registry up');
    const refused = [
      { image: `127.0.0.1:${registry.port}/games/gs:1` },
      { image: 'games/gs:1', registryUrl: `http://127.0.0.1:${registry.port}` },
      { image: 'games/gs:1', registryUrl: `http://localhost:${registry.port}` },
      { image: 'games/gs:1', registryUrl: 'http://169.254.169.254' },
    ];
    for (const params of refused) {
      const b = await ctx.sdk.buildsV3.createBuildRegistry({}, ctx.orgId);
      const log = await streamText(await ctx.sdk.buildsV3.runBuildRegistry(b.buildId, params, ctx.orgId));
      assert.equal((await ctx.sdk.buildsV3.getBuild(b.buildId, ctx.orgId)).status, 'failed', log);
      assert.match(log, /private, loopback or link-local/, JSON.stringify(params));
    }
    // Anything but a scheme and a host is refused before a build starts.
    for (const registryUrl of [
      `http://example.com/v2/x?u=http://127.0.0.1:${registry.port}`,
      'http://user:pw@example.com',
      'http://example.com#frag',
      'file:///etc',
    ]) {
      const b = await ctx.sdk.buildsV3.createBuildRegistry({}, ctx.orgId);
      await expectHttpError(ctx.sdk.buildsV3.runBuildRegistry(b.buildId, { image: 'games/gs:1', registryUrl }, ctx.orgId), 422);
    }
  });
});
