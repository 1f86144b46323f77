// AppsV2 (hathora-api.md §3.2).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { useLodge, expectHttpError, uniqueName } from '../lib/lodge.js';

const lodge = useLodge();

test('app lifecycle: create, list, get, update, patch, delete', async () => {
  const sdk = lodge.sdk();
  const orgId = await lodge.orgId();
  const appName = uniqueName('game');

  const app = await sdk.appsV2.createApp({ appName, authConfiguration: { anonymous: {} } }, orgId);
  assert.equal(app.appName, appName);
  assert.equal(app.orgId, orgId);
  assert.equal(typeof app.appId, 'string');
  assert.ok(app.appId.length > 0);
  assert.equal(typeof app.appSecret, 'string');
  assert.ok(app.appSecret.length >= 16, 'the app secret is not trivially short');
  assert.deepEqual(app.authConfiguration, { anonymous: {} });
  assert.ok(app.createdAt instanceof Date);
  assert.equal(app.deletedAt, null);
  assert.equal(app.deletedBy, null);
  const { appId } = app;

  const { applications } = await sdk.appsV2.getApps(orgId);
  const listed = applications.find((a) => a.appId === appId);
  assert.ok(listed, 'GetApps lists the new app');
  assert.equal(listed.appName, appName);
  assert.equal(listed.appSecret, app.appSecret);

  const got = await sdk.appsV2.getApp(appId);
  assert.equal(got.appId, appId);
  assert.equal(got.appName, appName);
  assert.equal(got.appSecret, app.appSecret);

  // UpdateApp replaces the whole config.
  const renamed = uniqueName('game');
  const updated = await sdk.appsV2.updateApp(
    { appName: renamed, authConfiguration: { anonymous: {}, nickname: {} } },
    appId,
  );
  assert.equal(updated.appId, appId);
  assert.equal(updated.appName, renamed);
  assert.deepEqual(updated.authConfiguration, { anonymous: {}, nickname: {} });
  assert.equal(updated.appSecret, app.appSecret, 'updating keeps the secret');

  // PatchApp changes only the fields it is given.
  const patchedName = uniqueName('game');
  const patched = await sdk.appsV2.patchApp({ appName: patchedName }, appId);
  assert.equal(patched.appName, patchedName);
  assert.deepEqual(patched.authConfiguration, { anonymous: {}, nickname: {} });
  assert.equal((await sdk.appsV2.getApp(appId)).appName, patchedName);

  // DeleteApp answers 204; the app is gone afterwards.
  assert.equal(await sdk.appsV2.deleteApp(appId), undefined);
  await expectHttpError(sdk.appsV2.getApp(appId), 404);
  const after = await sdk.appsV2.getApps(orgId);
  assert.ok(!after.applications.some((a) => a.appId === appId), 'a deleted app is not listed');
});

test('an appName with uppercase letters is rejected with 422', async () => {
  const sdk = lodge.sdk();
  await expectHttpError(
    sdk.appsV2.createApp({ appName: 'My-Game', authConfiguration: {} }, await lodge.orgId()),
    422,
  );
});

test('a duplicate appName in the org is rejected with 422', async () => {
  const sdk = lodge.sdk();
  const orgId = await lodge.orgId();
  const appName = uniqueName('dup');
  await sdk.appsV2.createApp({ appName, authConfiguration: {} }, orgId);
  await expectHttpError(sdk.appsV2.createApp({ appName, authConfiguration: {} }, orgId), 422);
});

test('an unknown appId is 404', async () => {
  const sdk = lodge.sdk();
  await expectHttpError(sdk.appsV2.getApp('app-00000000-0000-0000-0000-000000000000'), 404);
});
