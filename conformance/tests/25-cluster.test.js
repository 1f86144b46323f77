// A fleet on one machine: the real `lodge` as a control plane with no node of its own, and
// three `lodge agent`s, each in a network namespace of its own with its own address (a
// "host") on a bridge this test creates, in two regions. Through the official SDK: rooms in
// each region answer UDP at their own node's address, a remote process's log is read, a node
// is drained. Then faults: an agent killed with -9 (unschedulable within 10 s, its processes
// ended after --node-lost-after, and stopped on its return), a partition shorter than that
// (nothing stopped), and the control plane killed and restarted while a client keeps
// exchanging packets with a room (none lost, every node back).

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import dgram from 'node:dgram';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import {
  CONFORMANCE_DIR,
  LODGE_BIN,
  Lodge,
  uniqueName,
  uploadBuild,
  sleep,
  waitFor,
  waitActive,
  waitProcessStatus,
  udpRequest,
  streamText,
  expectHttpError,
} from '../lib/lodge.js';
import { Net } from '../lib/net.js';

const root = process.getuid?.() === 0;
const LOST_AFTER_S = 20;

/**
 * One `lodge agent` in a namespace. With `isolation: 'netns'` it runs under `nsenter --net`,
 * which changes only the network namespace: the agent's own namespaces and cgroups stay
 * visible to the host (`ip netns exec` would give it a mount namespace and a /sys of its own).
 */
class Agent {
  constructor(tmp, host, region, controlUrl, { isolation = 'none' } = {}) {
    this.isolation = isolation;
    this.host = host;
    this.region = region;
    this.controlUrl = controlUrl;
    this.dataDir = path.join(tmp, `agent-${host.ns}`);
    this.logFile = path.join(tmp, `agent-${host.ns}.log`);
    this.child = null;
  }

  start(joinToken) {
    const args = [
      ...this.enter(), LODGE_BIN, 'agent',
      '--control-plane', this.controlUrl,
      '--region', this.region,
      '--public-host', this.host.addr,
      '--data-dir', this.dataDir,
      '--port-range', '31000-31099',
      '--ping-port', '10000',
      '--isolation', this.isolation,
      '--stop-grace', '2',
      // Reservations are not what this test is about: offer more cores than it requests.
      '--cpu', '64',
    ];
    if (joinToken) args.push('--join-token', joinToken);
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('LODGE_')));
    const log = fs.openSync(this.logFile, 'a');
    this.child = spawn(args[0], args.slice(1), { env: { ...env, NO_COLOR: '1' }, stdio: ['ignore', log, log] });
    fs.closeSync(log);
    this.exited = new Promise((resolve) => this.child.once('exit', resolve));
  }

  /** The command that runs a program on this agent's host. */
  enter() {
    return this.isolation === 'netns'
      ? ['nsenter', `--net=/run/netns/${this.host.ns}`]
      : ['ip', 'netns', 'exec', this.host.ns];
  }

  async kill9() {
    if (!this.child) return;
    this.child.kill('SIGKILL');
    await this.exited;
    this.child = null;
  }

  async stop() {
    if (!this.child) return;
    this.child.kill('SIGTERM');
    await Promise.race([this.exited, sleep(10_000)]);
    this.child?.kill('SIGKILL');
    this.child = null;
  }

  cleanup() {
    try {
      const [cmd, ...rest] = this.enter();
      execFileSync(cmd, [...rest, LODGE_BIN, 'cleanup', '--data-dir', this.dataDir], { stdio: 'ignore' });
    } catch {
      // nothing to clean
    }
  }

  /** The game server's pid the agent recorded for a process. */
  gamePid(processId) {
    try {
      const state = JSON.parse(fs.readFileSync(path.join(this.dataDir, 'processes', processId, 'state.json'), 'utf8'));
      return state.gamePid;
    } catch {
      return null;
    }
  }
}

const alive = (pid) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

let net;
let lodge;
const agents = [];
let tmp;
after(async () => {
  for (const a of agents) await a.kill9().catch(() => {});
  for (const a of agents) a.cleanup();
  const failed = lodge?.failed;
  if (lodge) await lodge.teardown();
  if (failed && tmp) {
    for (const a of agents) {
      try {
        console.error(`---- ${a.logFile} ----\n${fs.readFileSync(a.logFile, 'utf8')}`);
      } catch {
        // no log
      }
    }
  }
  net?.teardown();
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

async function api(method, p, body) {
  const res = await fetch(`${lodge.url}${p}`, {
    method,
    headers: { authorization: `Bearer ${lodge.adminToken}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(5000),
  });
  const json = await res.json();
  if (!res.ok) throw Object.assign(new Error(`${method} ${p}: ${res.status} ${json.message}`), { status: res.status });
  return json;
}

const nodes = async () => (await api('GET', '/lodge/v1/nodes')).nodes;
const nodeAt = async (addr) => (await nodes()).find((n) => n.host === addr);

/** Sends a numbered datagram every `everyMs` for as long as it runs; counts the echoes. */
function udpStream(host, port, everyMs = 20) {
  const socket = dgram.createSocket('udp4');
  const seen = new Set();
  let sent = 0;
  socket.on('message', (m) => seen.add(m.toString()));
  const timer = setInterval(() => {
    sent += 1;
    socket.send(Buffer.from(`seq-${sent}`), port, host);
  }, everyMs);
  return {
    async stop() {
      clearInterval(timer);
      await sleep(500);
      socket.close();
      return { sent, received: seen.size };
    },
  };
}

test('a fleet of three agents in two regions, and its faults', { skip: !root && 'needs root (network namespaces)', timeout: 300_000 }, async (t) => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-cluster-'));
  net = new Net('lc', '10.213');
  const hosts = [0, 1, 2].map((i) => net.addHost(i));
  // A failing subtest has the logs printed at the end.
  const sub = (name, fn) =>
    t.test(name, async () => {
      try {
        await fn();
      } catch (err) {
        lodge.failed = true;
        throw err;
      }
    });
  lodge = new Lodge({
    apiHost: net.gateway,
    args: ['--no-local-node', '--node-lost-after', `${LOST_AFTER_S}s`],
  });
  await lodge.start();
  const join = async (region) =>
    (await api('POST', '/lodge/v1/nodes/join-tokens', { region, ttlSeconds: 600 })).token;
  const regions = ['Frankfurt', 'Frankfurt', 'Tokyo'];
  for (let i = 0; i < 3; i++) {
    const a = new Agent(tmp, hosts[i], regions[i], lodge.url);
    agents.push(a);
    a.start(await join(regions[i]));
  }
  await waitFor(async () => (await nodes()).filter((n) => n.reachable).length === 3, {
    timeoutMs: 20_000,
    what: 'three nodes joined',
  });

  // A bad join token: one line, non-zero exit.
  const bad = (() => {
    try {
      execFileSync('ip', ['netns', 'exec', hosts[0].ns, LODGE_BIN, 'agent', '--control-plane', lodge.url,
        '--region', 'Frankfurt', '--join-token', 'lodge_join_nope', '--data-dir', path.join(tmp, 'bad')],
      { stdio: ['ignore', 'pipe', 'pipe'] });
      return null;
    } catch (err) {
      return err;
    }
  })();
  assert.ok(bad && bad.status !== 0, 'a bad join token fails');
  assert.match(bad.stderr.toString(), /join token/);

  const { sdk, appId } = await lodge.echoApp({ roomsPerProcess: 1 });
  const frankfurt = new Set([hosts[0].addr, hosts[1].addr]);

  await sub('FleetsV2, NodesV1 and DiscoveryV2 show the nodes', async () => {
    const orgId = await lodge.orgId();
    const { orgs } = await sdk.organizationsV1.getOrgs();
    const fleetId = orgs[0].defaultFleetId;
    assert.ok(fleetId, 'the org has a default fleet');
    const { fleets } = await sdk.fleetsV2.getFleets(orgId);
    assert.ok(fleets.some((f) => f.fleetId === fleetId));
    const all = await sdk.nodesV1.listProvisionedNodes(fleetId, orgId);
    assert.deepEqual(all.map((n) => n.host).sort(), hosts.map((h) => h.addr).sort());
    const fra = await sdk.nodesV1.listProvisionedNodes(fleetId, orgId, 'Frankfurt');
    assert.deepEqual(new Set(fra.map((n) => n.host)), frankfurt);
    const one = await sdk.nodesV1.getNode(fra[0].nodeId);
    assert.equal(one.region, 'Frankfurt');
    assert.equal(one.status, 'running');
    assert.ok(one.cpu > 0 && one.memoryMb > 0, 'cpu and memory reported');
    const ping = await sdk.discoveryV2.getPingServiceEndpoints();
    assert.deepEqual(ping.map((p) => p.region).sort(), ['Frankfurt', 'Tokyo']);
    const tokyo = ping.find((p) => p.region === 'Tokyo');
    assert.deepEqual([tokyo.host, tokyo.port], [hosts[2].addr, 10000]);
    assert.equal(await udpRequest(tokyo.host, tokyo.port, 'ping?'), 'ping?', "the region's ping port answers");

    // Fleets an org creates and configures.
    const shapes = await sdk.fleetsV2.getNodeShapes(orgId);
    assert.ok(shapes.some((s) => s.nodeShapeId === 'shape-amd64-4-8' && s.minCPU === 4));
    const created = await sdk.fleetsV2.createFleet(
      { name: 'ranked', nodeShapeId: 'shape-amd64-8-16', autoscalerConfig: { scaleUpThreshold: 80 } },
      orgId,
    );
    assert.equal(created.name, 'ranked');
    await expectHttpError(
      sdk.fleetsV2.createFleet({ name: 'ranked', nodeShapeId: 'shape-amd64-8-16', autoscalerConfig: { scaleUpThreshold: 80 } }, orgId),
      422,
    );
    await sdk.fleetsV2.updateFleet(created.fleetId, { autoscalerConfig: { scaleUpThreshold: 60 } }, orgId);
    assert.equal((await sdk.fleetsV2.getFleet(created.fleetId, orgId)).autoscalerConfig.scaleUpThreshold, 60);
    await sdk.fleetsV2.updateFleetRegion(fleetId, 'Frankfurt', { nodeBaseline: 2 }, orgId);
    assert.equal((await sdk.fleetsV2.getFleetRegion(fleetId, 'Frankfurt', orgId)).nodeBaseline, 2);
    const m = await sdk.fleetsV2.getFleetRegionMetrics({ fleetId, region: 'Frankfurt', orgId, metrics: ['provisionedTotal', 'utilized'] });
    assert.equal(m.provisionedTotal.length, 1);
    assert.ok(m.provisionedTotal[0].value >= 2 * 64, 'two Frankfurt nodes offering 64 cores each');
  });

  await sub('rooms land in their region and answer at their node', async () => {
    const rooms = [];
    for (const region of ['Frankfurt', 'Frankfurt', 'Tokyo']) {
      const room = await sdk.roomsV2.createRoom({ region }, appId);
      const info = await waitActive(sdk, appId, room.roomId, 30_000);
      rooms.push({ ...room, region, info });
    }
    for (const r of rooms) {
      const { host, port } = r.info.exposedPort;
      if (r.region === 'Tokyo') assert.equal(host, hosts[2].addr, 'Tokyo room on the Tokyo node');
      else assert.ok(frankfurt.has(host), `Frankfurt room on a Frankfurt node, not ${host}`);
      assert.equal(await udpRequest(host, port, 'hello'), 'hello');
    }
    await expectHttpError(sdk.roomsV2.createRoom({ region: 'London' }, appId), 400);

    const text = await streamText(await sdk.logsV1.getLogsForProcess(rooms[2].processId, appId, false, 100));
    assert.match(text, /listening/, "a remote process's log is read through its node");
    // And followed: what the process writes next arrives on the open stream.
    const follow = await sdk.logsV1.getLogsForProcess(rooms[2].processId, appId, true, 1);
    const reader = follow.getReader();
    let seen = '';
    // A player joining makes the echo server log a line with the player's id.
    const { token } = await lodge.sdk(null).authV1.loginAnonymous(appId);
    const joined = await udpRequest(rooms[2].info.exposedPort.host, rooms[2].info.exposedPort.port, `auth ${token}`);
    const marker = `player ${joined.split(' ')[1]}`;
    const deadline = Date.now() + 10_000;
    while (!seen.includes(marker) && Date.now() < deadline) {
      const { value, done } = await Promise.race([reader.read(), sleep(10_000).then(() => ({ done: true }))]);
      if (done) break;
      seen += Buffer.from(value).toString();
    }
    await reader.cancel().catch(() => {});
    assert.ok(seen.includes(marker), `the followed log shows what the process wrote next (got ${JSON.stringify(seen.slice(-200))})`);
    for (const r of rooms) await sdk.roomsV2.destroyRoom(r.roomId, appId);
  });

  await sub('a drained node takes no new processes and stops when empty', async () => {
    const tokyo = await nodeAt(hosts[2].addr);
    const room = await sdk.roomsV2.createRoom({ region: 'Tokyo' }, appId);
    await waitActive(sdk, appId, room.roomId, 30_000);
    const drained = await api('POST', `/lodge/v1/nodes/${tokyo.nodeId}/drain`);
    assert.equal(drained.status, 'draining');
    await expectHttpError(sdk.roomsV2.createRoom({ region: 'Tokyo' }, appId), 400);
    assert.equal((await sdk.roomsV2.getRoomInfo(room.roomId, appId)).status, 'active', 'its room is kept');
    await sdk.processesV3.stopProcess(room.processId, appId);
    await waitFor(async () => (await nodeAt(hosts[2].addr)).status === 'stopped', {
      timeoutMs: 20_000,
      what: 'the drained node stopped',
    });
    assert.equal((await api('POST', `/lodge/v1/nodes/${tokyo.nodeId}/undrain`)).status, 'running');
  });

  await sub('a partition shorter than --node-lost-after stops nothing', async () => {
    const room = await sdk.roomsV2.createRoom({ region: 'Frankfurt' }, appId);
    const info = await waitActive(sdk, appId, room.roomId, 30_000);
    const host = hosts.find((h) => h.addr === info.exposedPort.host);
    net.setLink(host, false);
    try {
      await waitFor(async () => (await nodeAt(host.addr)).reachable === false, {
        timeoutMs: 15_000,
        what: 'the cut-off node unreachable',
      });
    } finally {
      net.setLink(host, true);
    }
    await waitFor(async () => (await nodeAt(host.addr)).reachable === true, {
      timeoutMs: 20_000,
      what: 'the node back',
    });
    assert.equal((await sdk.roomsV2.getRoomInfo(room.roomId, appId)).status, 'active');
    assert.equal((await sdk.processesV3.getProcess(room.processId, appId)).status, 'running');
    assert.equal(await udpRequest(info.exposedPort.host, info.exposedPort.port, 'still'), 'still');
    await sdk.roomsV2.destroyRoom(room.roomId, appId);
  });

  await sub('the control plane killed and restarted: no packet lost, every node back', async () => {
    const room = await sdk.roomsV2.createRoom({ region: 'Tokyo' }, appId);
    const info = await waitActive(sdk, appId, room.roomId, 30_000);
    const stream = udpStream(info.exposedPort.host, info.exposedPort.port);
    let result;
    try {
      await sleep(500);
      await lodge.kill9();
      await sleep(3000);
      await lodge.start();
      // (In replicas mode each node re-attaches to whichever replica the front gives it:
      // `connected` counts a session held by any live replica.)
      await waitFor(async () => (await nodes()).filter((n) => n.connected && n.reachable).length === 3, {
        timeoutMs: 20_000,
        what: 'every node re-attached',
      });
      await sleep(500);
    } finally {
      // Also on failure: an open socket and a running timer keep the test file from ending.
      result = await stream.stop();
    }
    const { sent, received } = result;
    assert.ok(sent > 100, `sent ${sent}`);
    assert.equal(received, sent, 'every datagram was answered');
    assert.equal((await sdk.roomsV2.getRoomInfo(room.roomId, appId)).status, 'active');
    await sdk.roomsV2.destroyRoom(room.roomId, appId);
  });

  await sub('a container image runs on a joined agent', async () => {
    // The fixture of 20-containers: a static echo server FROM scratch, as a docker archive.
    const ctx = path.join(tmp, 'ctx');
    fs.mkdirSync(ctx, { recursive: true });
    execFileSync('gcc', ['-static', '-O2', '-o', path.join(ctx, 'gs'), path.join(CONFORMANCE_DIR, 'fixtures', 'gs.c')]);
    fs.writeFileSync(path.join(ctx, 'Dockerfile'), 'FROM scratch\nCOPY gs /gs\nENV GS_FLAVOUR=containerised\nEXPOSE 7777/udp\nENTRYPOINT ["/gs"]\n');
    const b = ['--root', path.join(tmp, 'bstore'), '--runroot', path.join(tmp, 'brun'), '--storage-driver', 'vfs'];
    try {
      execFileSync('buildah', [...b, 'bud', '--isolation', 'chroot', '-t', 'localhost/cluster-gs:1', ctx], { stdio: 'ignore' });
      execFileSync('buildah', [...b, 'push', 'localhost/cluster-gs:1', `docker-archive:${tmp}/gs.tar:gs:1`], { stdio: 'ignore' });
    } finally {
      try {
        execFileSync('buildah', [...b, 'rmi', '--all', '--force'], { stdio: 'ignore' });
      } catch {
        // nothing to remove
      }
    }
    // A fourth host whose agent isolates processes and runs containers.
    const host = net.addHost(3);
    const a = new Agent(tmp, host, 'Sydney', lodge.url, { isolation: 'netns' });
    agents.push(a);
    a.start(await join('Sydney'));
    await waitFor(async () => (await nodeAt(host.addr))?.reachable === true, { timeoutMs: 20_000, what: 'the container node joined' });
    const orgId = await lodge.orgId();
    const app = await sdk.appsV2.createApp({ appName: uniqueName('ctr'), authConfiguration: {} }, orgId);
    const { build, log } = await uploadBuild(sdk, orgId, fs.readFileSync(path.join(tmp, 'gs.tar')));
    assert.equal(build.status, 'succeeded', log);
    await sdk.deploymentsV3.createDeployment(
      { buildId: build.buildId, idleTimeoutEnabled: false, env: [], roomsPerProcess: 1, transportType: 'udp', containerPort: 7777, requestedCPU: 0.5, requestedMemoryMB: 128 },
      app.appId,
    );
    const room = await sdk.roomsV2.createRoom({ region: 'Sydney' }, app.appId);
    const info = await waitActive(sdk, app.appId, room.roomId, 60_000);
    const { host: h, port } = info.exposedPort;
    assert.equal(h, host.addr, 'at the container node');
    assert.equal(await udpRequest(h, port, 'hello container', 5000), 'hello container');
    assert.equal(await udpRequest(h, port, 'env GS_FLAVOUR', 5000), 'containerised', "the image's ENV travelled with it");
    assert.equal(await udpRequest(h, port, 'env PORT', 5000), '7777', 'it binds the container port in its own namespace');
    await sdk.processesV3.stopProcess(room.processId, app.appId);
    await waitProcessStatus(sdk, app.appId, room.processId, ['stopped', 'failed'], 30_000);
  });

  await sub('an agent killed with -9: unschedulable, then lost; on return its processes stop', async () => {
    const room = await sdk.roomsV2.createRoom({ region: 'Frankfurt' }, appId);
    const info = await waitActive(sdk, appId, room.roomId, 30_000);
    const victim = agents.find((a) => a.host.addr === info.exposedPort.host);
    const pid = victim.gamePid(room.processId);
    assert.ok(pid && alive(pid), 'the game server runs');
    const killedAt = Date.now();
    await victim.kill9();
    await waitFor(async () => (await nodeAt(victim.host.addr)).reachable === false, {
      timeoutMs: 15_000,
      what: 'the killed node unschedulable',
    });
    const unschedulableMs = Date.now() - killedAt;
    assert.ok(alive(pid), 'its game server outlives its agent');
    // Its log is on the node: out of reach is a 503 that says so, not a 500.
    const e = await expectHttpError(sdk.logsV1.getLogsForProcess(room.processId, appId, false, 10), 503, {
      typed: false,
    });
    assert.match(e.body, /not connected/);
    // New Frankfurt rooms go to the other Frankfurt node.
    const other = await sdk.roomsV2.createRoom({ region: 'Frankfurt' }, appId);
    const otherInfo = await waitActive(sdk, appId, other.roomId, 30_000);
    assert.notEqual(otherInfo.exposedPort.host, victim.host.addr);
    assert.equal((await sdk.roomsV2.getRoomInfo(room.roomId, appId)).status, 'active', 'not lost yet');

    const p = await waitProcessStatus(sdk, appId, room.processId, ['failed', 'stopped'], (LOST_AFTER_S + 15) * 1000);
    assert.match(p.summaryExitReason ?? '', /node lost/i);
    assert.equal((await sdk.roomsV2.getRoomInfo(room.roomId, appId)).status, 'destroyed');
    // Silence counts from the node's last message, at most a second or two before the kill
    // (counters every second, pings every 2 s).
    const lostMs = new Date(p.terminatedAt).getTime() - killedAt;
    assert.ok(
      lostMs >= (LOST_AFTER_S - 2) * 1000,
      `not before --node-lost-after: ended ${lostMs} ms after the kill at ${new Date(killedAt).toISOString()} (${victim.host.addr})`,
    );

    // It comes back: the control plane's word wins, and the game server it kept is stopped.
    victim.start();
    await waitFor(async () => (await nodeAt(victim.host.addr)).reachable === true, {
      timeoutMs: 20_000,
      what: 'the node back',
    });
    await waitFor(async () => !alive(pid), { timeoutMs: 15_000, what: 'the ended process stopped on its node' });
    console.log(`cluster: killed node unschedulable after ${unschedulableMs} ms`);
    await sdk.roomsV2.destroyRoom(other.roomId, appId);
  });

  for (const a of agents) await a.stop();
});
