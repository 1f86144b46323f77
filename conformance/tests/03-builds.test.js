// BuildsV3 and the multipart upload flow (hathora-api.md §3.3, §6.2).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import {
  useLodge,
  expectHttpError,
  makeBundle,
  uploadBuild,
  uniqueName,
  ECHO_DIR,
} from '../lib/lodge.js';

const lodge = useLodge();

test('the echo bundle goes through the multipart flow and succeeds', async () => {
  const sdk = lodge.sdk();
  const orgId = await lodge.orgId();
  const bundle = await makeBundle(ECHO_DIR);
  const buildTag = uniqueName('v');

  const { created, build, log } = await uploadBuild(sdk, orgId, bundle, { buildTag });

  // CreateBuild's answer.
  assert.equal(created.orgId, orgId);
  assert.equal(created.buildTag, buildTag);
  assert.equal(created.imageSize, 0);
  assert.equal(created.startedAt, null);
  assert.equal(created.finishedAt, null);
  assert.equal(created.deletedAt, null);
  assert.ok(created.uploadParts.length >= 1);
  created.uploadParts.forEach((part, i) => assert.equal(part.partNumber, i + 1));
  for (const url of [
    ...created.uploadParts.map((p) => p.putRequestUrl),
    created.completeUploadPostRequestUrl,
  ]) {
    assert.match(url, /^https?:\/\//, `presigned URLs are absolute (${url})`);
  }

  // The finished build.
  assert.equal(build.buildId, created.buildId);
  assert.equal(build.status, 'succeeded', `build log:\n${log}`);
  assert.equal(build.buildTag, buildTag);
  assert.ok(Number.isInteger(build.imageSize));
  assert.ok(build.startedAt instanceof Date, 'startedAt is set');
  assert.ok(build.finishedAt instanceof Date, 'finishedAt is set');
  assert.equal(build.deletedAt, null);
  assert.ok(log.trim().length > 0, 'RunBuild streams a non-empty log');

  const { builds } = await sdk.buildsV3.getBuilds(orgId);
  const listed = builds.find((b) => b.buildId === build.buildId);
  assert.ok(listed, 'GetBuilds lists the build');
  assert.equal(listed.status, 'succeeded');

  const got = await sdk.buildsV3.getBuild(build.buildId, orgId);
  assert.equal(got.status, 'succeeded');
  assert.equal(got.buildTag, buildTag);

  // DeleteBuild answers 200 with {} (not 204); the build is gone afterwards.
  assert.deepEqual(await sdk.buildsV3.deleteBuild(build.buildId, orgId), {});
  await expectHttpError(sdk.buildsV3.getBuild(build.buildId, orgId), 404);
});

test('a bundle without lodge.toml fails, and the log says why', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lodge-bad-bundle-'));
  try {
    fs.copyFileSync(path.join(ECHO_DIR, 'server.py'), path.join(dir, 'server.py'));
    const bundle = await makeBundle(dir);
    const { build, log } = await uploadBuild(lodge.sdk(), await lodge.orgId(), bundle);
    assert.equal(build.status, 'failed');
    assert.ok(build.finishedAt instanceof Date, 'a failed build is finished');
    assert.match(log, /lodge\.toml/, `the log names the missing file:\n${log}`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('CreateBuild accepts a caller-chosen buildId', async () => {
  const sdk = lodge.sdk();
  const orgId = await lodge.orgId();
  const buildId = uniqueName('bld-custom');
  const { build } = await uploadBuild(sdk, orgId, await makeBundle(ECHO_DIR), { buildId });
  assert.equal(build.buildId, buildId);
  assert.equal(build.status, 'succeeded');
  assert.equal((await sdk.buildsV3.getBuild(buildId, orgId)).buildId, buildId);
});

test('an unknown buildId is 404', async () => {
  const sdk = lodge.sdk();
  const orgId = await lodge.orgId();
  await expectHttpError(sdk.buildsV3.getBuild('bld-does-not-exist', orgId), 404);
  await expectHttpError(sdk.buildsV3.deleteBuild('bld-does-not-exist', orgId), 404);
});
