// examples/arena end to end: two rooms with their own config on one process, bots play both
// matches, and the server ends cleanly (exit 0 → process stopped, rooms destroyed).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';

import { LODGE_BIN, REPO_DIR, sleep, useLodge } from '../lib/lodge.js';

const lodge = useLodge();
const run = promisify(execFile);
const ARENA = path.join(REPO_DIR, 'examples', 'arena');

function env() {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('LODGE_') && !k.startsWith('HATHORA_')));
  return { ...clean, LODGE_API_URL: lodge.url, LODGE_TOKEN: lodge.adminToken };
}

async function lodgeJson(...args) {
  const { stdout } = await run(LODGE_BIN, [...args, '--json'], { env: env(), timeout: 60_000 });
  return JSON.parse(stdout);
}

function bot(addr, room, name) {
  return run('python3', [path.join(ARENA, 'client.py'), addr, room, '--bot', '--name', name], { timeout: 70_000 });
}

test('two matches on one process, then a clean exit', async () => {
  await run(LODGE_BIN, ['deploy', ARENA, '--rooms-per-process', '2', '--env', `HATHORA_DEV_TOKEN=${lodge.adminToken}`], {
    env: env(),
    timeout: 60_000,
  });
  const a = await lodgeJson('rooms', 'create', '--region', 'London', '--config', '{"targetScore":3,"size":8}');
  const b = await lodgeJson('rooms', 'create', '--region', 'London', '--config', '{"targetScore":2,"size":6}');
  assert.equal(a.processId, b.processId, 'both rooms share one process');
  const addrOf = async (room) => {
    const info = await lodgeJson('rooms', 'connect', room);
    return `${info.exposedPort.host}:${info.exposedPort.port}`;
  };
  const [addrA, addrB] = [await addrOf(a.roomId), await addrOf(b.roomId)];

  const results = await Promise.all([
    bot(addrA, a.roomId, 'ada'),
    bot(addrA, a.roomId, 'bob'),
    bot(addrB, b.roomId, 'cy'),
  ]);
  const winnersA = results.slice(0, 2).map((r) => r.stdout.trim());
  assert.equal(new Set(winnersA).size, 1, 'both players of room A saw the same winner');
  assert.match(winnersA[0], /^winner: (ada|bob)$/);
  assert.equal(results[2].stdout.trim(), 'winner: cy');

  let process;
  for (let i = 0; i < 200; i++) {
    process = await lodgeJson('processes', 'info', a.processId);
    if (process.status === 'stopped' || process.status === 'failed') break;
    await sleep(50);
  }
  assert.equal(process.status, 'stopped', 'exit 0 at the end of the matches');
  for (const room of [a, b]) {
    assert.equal((await lodgeJson('rooms', 'info', room.roomId)).status, 'destroyed');
  }
  const { stdout: log } = await run(LODGE_BIN, ['logs', a.processId, '--tail', '50'], { env: env() });
  assert.match(log, /match over in room .*: (ada|bob) wins/);
  assert.match(log, /match over in room .*: cy wins/);
});
