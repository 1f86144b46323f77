// Room and proxy benchmarks against a real Lodge, through the official SDK.
// Every figure is printed beside a baseline measured in the same run, as a ratio:
//   - CreateRoom → active on a new process  vs  spawning the same game server directly until
//     it answers UDP (what Lodge adds around process start),
//   - CreateRoom on a warm slot (already active)  vs  an HTTP round trip to /livez,
//   - UDP round trip through the proxy  vs  straight to the game server's own port.
// Usage: npm run bench  (BENCH_ISOLATION=netns as root to measure isolated processes)

import { spawn } from 'node:child_process';
import dgram from 'node:dgram';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

import { ECHO_DIR, Lodge, deployEcho, sleep, udpRequest } from '../lib/lodge.js';

const N = Number(process.env.BENCH_N || 20);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))];
const ms = (x) => `${x.toFixed(2)} ms`;
const us = (x) => `${(x * 1000).toFixed(0)} µs`;

async function waitActiveFast(sdk, appId, roomId) {
  for (;;) {
    const info = await sdk.roomsV2.getConnectionInfo(roomId, appId);
    if (info.status === 'active') return info;
    await sleep(2);
  }
}

async function directSpawn(port) {
  const t0 = performance.now();
  const child = spawn('python3', [path.join(ECHO_DIR, 'server.py')], {
    env: { ...process.env, PORT: String(port) },
    stdio: 'ignore',
  });
  const sock = dgram.createSocket('udp4');
  try {
    await new Promise((resolve) => {
      const timer = setInterval(() => sock.send('ping', port, '127.0.0.1'), 2);
      sock.once('message', () => {
        clearInterval(timer);
        resolve();
      });
    });
    return performance.now() - t0;
  } finally {
    sock.close();
    child.kill('SIGKILL');
  }
}

async function udpRtts(port, count) {
  const sock = dgram.createSocket('udp4');
  await new Promise((r) => sock.bind(0, '127.0.0.1', r));
  const out = [];
  const payload = Buffer.alloc(100, 7);
  for (let i = 0; i < count; i++) {
    const t0 = performance.now();
    await new Promise((resolve) => {
      sock.once('message', resolve);
      sock.send(payload, port, '127.0.0.1');
    });
    out.push(performance.now() - t0);
  }
  sock.close();
  return out;
}

const isolation = process.env.BENCH_ISOLATION || 'none';
const lodge = new Lodge({ isolation });
await lodge.start();
try {
  const sdk = lodge.sdk();
  const orgId = await lodge.orgId();
  const build = await lodge.echoBuild();
  const app = await sdk.appsV2.createApp({ appName: `bench-${Date.now()}`, authConfiguration: {} }, orgId);
  const appId = app.appId;

  // New process per room.
  await deployEcho(sdk, appId, build.buildId, { roomsPerProcess: 1 });
  const cold = [];
  for (let i = 0; i < N; i++) {
    const t0 = performance.now();
    const room = await sdk.roomsV2.createRoom({ region: 'London' }, appId);
    await waitActiveFast(sdk, appId, room.roomId);
    cold.push(performance.now() - t0);
  }
  const direct = [];
  for (let i = 0; i < N; i++) direct.push(await directSpawn(47000 + i));

  // Warm slots: one running process with room for everything.
  await deployEcho(sdk, appId, build.buildId, { roomsPerProcess: 1000 });
  const warmUp = await sdk.roomsV2.createRoom({ region: 'Tokyo' }, appId);
  const active = await waitActiveFast(sdk, appId, warmUp.roomId);
  const warm = [];
  for (let i = 0; i < N; i++) {
    const t0 = performance.now();
    const room = await sdk.roomsV2.createRoom({ region: 'Tokyo' }, appId);
    if (room.status !== 'active') await waitActiveFast(sdk, appId, room.roomId);
    warm.push(performance.now() - t0);
  }
  const livez = [];
  for (let i = 0; i < N; i++) {
    const t0 = performance.now();
    await (await fetch(`${lodge.url}/livez`)).text();
    livez.push(performance.now() - t0);
  }

  // Proxy hop: same game server, through its public port and straight to its own port.
  const publicPort = active.exposedPort.port;
  let innerPort = null;
  if (isolation === 'none') innerPort = Number(await udpRequest('127.0.0.1', publicPort, 'env PORT'));
  const viaProxy = await udpRtts(publicPort, 2000);
  const straight = innerPort ? await udpRtts(innerPort, 2000) : null;

  console.log(`Lodge room benchmarks (isolation ${isolation}, median of ${N})`);
  console.log(`  CreateRoom → active, new process : ${ms(median(cold))}`);
  console.log(`    baseline: spawn python3 echo until it answers UDP: ${ms(median(direct))}  ratio ${(median(cold) / median(direct)).toFixed(2)}`);
  console.log(`  CreateRoom → active, warm slot   : ${ms(median(warm))}`);
  console.log(`    baseline: GET /livez round trip: ${ms(median(livez))}  ratio ${(median(warm) / median(livez)).toFixed(2)}`);
  console.log(`  UDP round trip via proxy, 100 B  : p50 ${us(pct(viaProxy, 0.5))}  p99 ${us(pct(viaProxy, 0.99))}`);
  if (straight) {
    console.log(`    baseline: straight to the game server: p50 ${us(pct(straight, 0.5))}  p99 ${us(pct(straight, 0.99))}  ratio p50 ${(pct(viaProxy, 0.5) / pct(straight, 0.5)).toFixed(2)}`);
  }
} finally {
  // Stop every process through the API so the node cleans up after itself, then stop Lodge.
  try {
    const sdk = lodge.sdk();
    for (const app of (await sdk.appsV2.getApps()).applications) {
      for (;;) {
        const live = await sdk.processesV3.getLatestProcesses(app.appId, ['starting', 'running', 'stopping']);
        if (live.length === 0) break;
        for (const p of live) if (p.status !== 'stopping') await sdk.processesV3.stopProcess(p.processId, app.appId);
        await sleep(50);
      }
    }
  } finally {
    await lodge.teardown();
  }
}
