// `transportType: "tls"` ports: the node terminates TLS, as Hathora's TLS proxy did, and the
// game server gets plain TCP. A browser-style client (the WHATWG WebSocket of Node, with
// `--experimental-websocket`) opens `wss://host:port` on a WebSocket echo game server and
// trusts nothing but the node's certificate (self-signed for --public-host, made at the
// first start and kept); a client that does not trust it fails its handshake.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';

import { CONFORMANCE_DIR, useLodge, makeBundle, uploadBuild, uniqueName, waitActive, waitFor } from '../lib/lodge.js';

const execFileAsync = promisify(execFile);
// As root the node forwards its other ports by the kernel; tls ports are terminated by the node
// either way.
const lodge = useLodge({ isolation: process.getuid?.() === 0 ? 'netns' : 'none' });

/** A browser's WebSocket, in a Node of its own (the CA it trusts is fixed at its start). */
async function browser(url, messages, { ca } = {}) {
  const script = `
    const ws = new WebSocket(${JSON.stringify(url)});
    const got = [];
    const done = (r) => { console.log(JSON.stringify(r)); process.exit(0); };
    ws.onopen = () => { for (const m of ${JSON.stringify(messages)}) ws.send(m); };
    ws.onmessage = (e) => { got.push(e.data); if (got.length === ${messages.length}) { ws.close(); done({ got }); } };
    ws.onerror = () => done({ error: 'the connection failed', got });
    setTimeout(() => done({ error: 'timed out', got }), 10000);
  `;
  const env = { ...process.env };
  delete env.NODE_EXTRA_CA_CERTS;
  if (ca) env.NODE_EXTRA_CA_CERTS = ca;
  const { stdout } = await execFileAsync(process.execPath, ['--experimental-websocket', '--no-warnings', '-e', script], { env });
  return JSON.parse(stdout.trim().split('\n').at(-1));
}

test('a browser WebSocket reaches a wss:// game server through a tls port', async () => {
  const sdk = lodge.sdk();
  const orgId = await lodge.orgId();
  const app = await sdk.appsV2.createApp({ appName: uniqueName('wss'), authConfiguration: { anonymous: {} } }, orgId);
  const bundle = await makeBundle(path.join(CONFORMANCE_DIR, 'fixtures', 'ws-echo'));
  const { build } = await uploadBuild(sdk, orgId, bundle, { buildTag: 'ws-echo' });
  assert.equal(build.status, 'succeeded');
  await sdk.deploymentsV3.createDeployment(
    {
      buildId: build.buildId,
      idleTimeoutEnabled: false,
      env: [],
      roomsPerProcess: 1,
      transportType: 'tls',
      containerPort: 8080,
      requestedCPU: 0.5,
      requestedMemoryMB: 256,
    },
    app.appId,
  );
  const room = await sdk.roomsV2.createRoom({ region: 'Frankfurt' }, app.appId);
  const info = await waitActive(sdk, app.appId, room.roomId);
  assert.equal(info.exposedPort.transportType, 'tls');
  const { host, port } = info.exposedPort;
  const url = `wss://${host}:${port}/`;

  // The data dir of the node that runs the process (replicas mode has one per region).
  const nodeDir = path.dirname(path.dirname(lodge.processDir(room.processId)));
  const cert = path.join(nodeDir, 'tls', 'cert.pem');
  assert.ok(fs.existsSync(cert), 'the node made and kept a certificate');
  const ok = await browser(url, ['hello', 'peer'], { ca: cert });
  assert.equal(ok.error, undefined, `wss:// through the tls port: ${JSON.stringify(ok)}`);
  assert.equal(ok.got[0], 'hello', 'the game server echoed over the TLS-terminated connection');
  assert.match(ok.got[1], /^\d+\.\d+\.\d+\.\d+:\d+$/, 'the game server answered a plain-TCP WebSocket');

  // A client that does not trust the node's certificate gets no connection.
  const untrusted = await browser(url, ['hello']);
  assert.equal(untrusted.error, 'the connection failed');
  assert.deepEqual(untrusted.got, []);

  // Plaintext bytes are counted for the process like any TCP port's (the node reports them
  // every few seconds).
  const bytesIn = async () => {
    const res = await fetch(`${lodge.url}/metrics`, { headers: { authorization: `Bearer ${lodge.adminToken}` } });
    const line = (await res.text())
      .split('\n')
      .find((l) => l.startsWith('lodge_process_bytes_total{') && l.includes(room.processId) && l.includes('direction="in"'));
    return line ? Number(line.split(' ').at(-1)) : 0;
  };
  await waitFor(async () => (await bytesIn()) > 0, { what: 'bytes in of the tls port to be counted' });

  // The certificate is kept across a restart: clients that pinned it keep working.
  const before = fs.readFileSync(cert, 'utf8');
  await lodge.restart();
  assert.equal(fs.readFileSync(cert, 'utf8'), before, 'the same certificate after a restart');
  // Ready means adoption has begun; the tls port is open once the process is adopted.
  const again = await waitFor(
    async () => {
      const r = await browser(url, ['after restart'], { ca: cert });
      return r.error ? null : r;
    },
    { timeoutMs: 15_000, intervalMs: 200, what: 'wss:// through the tls port after the restart' },
  );
  assert.deepEqual(again.got, ['after restart'], JSON.stringify(again));
});
