// The README's quickstart, terminal 2, run as written: the commands are read from README.md.
// The token comes from ./lodge-data/admin-token, as for a local `lodge serve`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import { LODGE_BIN, REPO_DIR, useLodge } from '../lib/lodge.js';

const lodge = useLodge();

function quickstartCommands() {
  const readme = fs.readFileSync(path.join(REPO_DIR, 'README.md'), 'utf8');
  const after = readme.slice(readme.indexOf('Terminal 2'));
  const block = after.match(/```sh\n([\s\S]*?)```/);
  assert.ok(block, 'README has a terminal-2 block');
  return block[1].trim().split('\n');
}

test('README quickstart commands work as written', async () => {
  const lines = quickstartCommands();
  assert.ok(lines.some((l) => l.startsWith('lodge deploy')));
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-readme-'));
  try {
    fs.mkdirSync(path.join(work, 'lodge-data'));
    fs.writeFileSync(path.join(work, 'lodge-data', 'admin-token'), `${lodge.adminToken}\n`);
    fs.symlinkSync(path.join(REPO_DIR, 'examples'), path.join(work, 'examples'));
    const pid = '$(lodge processes list --status running --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0][\'processId\'])")';
    const script = ['set -euo pipefail', ...lines.map((l) => l.replaceAll('PROCESS_ID', pid))].join('\n');
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('LODGE_') && !k.startsWith('HATHORA_')));
    env.PATH = `${path.dirname(LODGE_BIN)}:${env.PATH}`;
    env.LODGE_API_URL = lodge.url;
    const { stdout } = await promisify(execFile)('bash', ['-c', script], { cwd: work, env, timeout: 120_000 });
    assert.match(stdout, /^hello$/m, 'the echo server answered through the proxy');
    assert.match(stdout, /running +London +1\/2/);
    assert.match(stdout, /echo server listening/);
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
});
