// The README's quickstart script, run as written against a fresh Lodge.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';

import { REPO_DIR, useLodge } from '../lib/lodge.js';

const lodge = useLodge();

test('examples/quickstart.sh reaches a live room over UDP', async () => {
  const script = path.join(REPO_DIR, 'examples', 'quickstart.sh');
  const { stdout } = await promisify(execFile)(script, [lodge.url], {
    env: { ...process.env, LODGE_TOKEN: lodge.adminToken },
    timeout: 60_000,
  });
  assert.match(stdout, /^active {5}127\.0\.0\.1:\d+$/m);
  assert.match(stdout, /^reply {6}hello from quickstart$/m);
});
