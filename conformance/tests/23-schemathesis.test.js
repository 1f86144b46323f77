// The OpenAPI document at /openapi.json against the server it describes: schemathesis (PyPI,
// pinned by scripts/install-deps) generates requests for every operation from the document,
// with real ids of a live app, build, deployment, process, room and lobby, and checks that no
// answer is a server error and every status, content type and body is one the document allows.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import { useLodge, waitActive } from '../lib/lodge.js';

const run = promisify(execFile);
const ST = path.join(process.env.LODGE_TEST_TOOLS ?? '/opt/lodge-test-tools', 'bin', 'st');
const REGION = 'Seattle';

const lodge = useLodge();

test('schemathesis finds no server error and no answer outside the OpenAPI document', { timeout: 600_000 }, async () => {
  assert.ok(fs.existsSync(ST), `schemathesis is not installed at ${ST}: run scripts/install-deps`);
  const doc = await (await fetch(`${lodge.url}/openapi.json`)).json();
  assert.equal(doc.openapi, '3.0.3');

  // Real objects for the path parameters, so that operations reach past their 404s.
  const { sdk, orgId, appId, build, deployment } = await lodge.echoApp({ roomsPerProcess: 4 });
  const room = await sdk.roomsV2.createRoom({ region: REGION }, appId);
  await waitActive(sdk, appId, room.roomId);
  const { token } = await lodge.sdk(null).authV1.loginAnonymous(appId);
  const lobby = await lodge.sdk(null).lobbiesV3.createLobby(
    { playerAuth: token },
    { visibility: 'public', region: REGION },
    appId,
  );
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-st-'));
  try {
    const config = path.join(work, 'schemathesis.toml');
    fs.writeFileSync(
      config,
      [
        '[parameters]',
        `app_id = "${appId}"`,
        `org_id = "${orgId}"`,
        `build_id = "${build.buildId}"`,
        `deployment_id = "${deployment.deploymentId}"`,
        `process_id = "${room.processId}"`,
        `room_id = "${lobby.roomId}"`,
        `short_code = "${lobby.shortCode}"`,
        '',
      ].join('\n'),
    );
    const args = [
      '--config-file', config,
      'run', `${lodge.url}/openapi.json`,
      '-H', `Authorization: Bearer ${lodge.adminToken}`,
      '--checks', 'not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance',
      // A followed log stays open while its process runs.
      '--exclude-operation-id', 'GetLogsForProcess',
      '--phases', 'examples,coverage,fuzzing',
      '--max-examples', '10',
      '--seed', '23',
      '--request-timeout', '10',
      // One worker: with two, Debian's Python 3.11 sometimes fails inside schemathesis itself
      // ("SystemError: AST constructor recursion depth mismatch", a CPython bug with threads
      // compiling at once, fixed in 3.12), which is no finding about Lodge.
      '--workers', '1',
      '--no-color',
    ];
    let out;
    try {
      // Its working directory is the scratch dir: schemathesis keeps a cache there.
      out = await run(ST, args, { cwd: work, maxBuffer: 64 << 20, timeout: 540_000 });
    } catch (err) {
      assert.fail(`schemathesis found problems:\n${err.stdout?.slice(-20_000) ?? err.message}\n${err.stderr ?? ''}`);
    }
    const summary = out.stdout.slice(out.stdout.lastIndexOf('SUMMARY'));
    console.log(summary);
    assert.match(summary, /\d+ generated, \d+ passed/);
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
    await sdk.processesV3.stopProcess(room.processId, appId).catch(() => {});
  }
});
