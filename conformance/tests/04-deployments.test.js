// DeploymentsV3 (hathora-api.md §3.4).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { useLodge, expectHttpError, deployEcho, uniqueName } from '../lib/lodge.js';

const lodge = useLodge();

async function newApp(sdk) {
  return sdk.appsV2.createApp(
    { appName: uniqueName('deploy'), authConfiguration: {} },
    await lodge.orgId(),
  );
}

test('create, latest, get, and tag filters', async () => {
  const sdk = lodge.sdk();
  const { appId } = await newApp(sdk);
  const build = await lodge.echoBuild();

  await expectHttpError(sdk.deploymentsV3.getLatestDeployment(appId), 404);

  const alpha = await deployEcho(sdk, appId, build.buildId, { debug: true, deploymentTag: 'alpha' });
  assert.equal(alpha.appId, appId);
  assert.equal(alpha.buildId, build.buildId);
  assert.equal(alpha.buildTag, build.buildTag, 'buildTag is copied from the build');
  assert.equal(alpha.deploymentTag, 'alpha');
  assert.deepEqual(alpha.defaultContainerPort, { name: 'default', port: 7777, transportType: 'udp' });
  assert.deepEqual(alpha.additionalContainerPorts, [{ name: 'debug', port: 7778, transportType: 'tcp' }]);
  assert.deepEqual(alpha.env, [{ name: 'GREETING', value: 'from-deployment' }]);
  assert.equal(alpha.roomsPerProcess, 2);
  assert.equal(alpha.requestedCPU, 0.5);
  assert.equal(alpha.requestedMemoryMB, 1024);
  assert.equal(alpha.idleTimeoutEnabled, false);
  assert.ok(alpha.createdAt instanceof Date);
  assert.equal(typeof alpha.createdBy, 'string');

  assert.equal((await sdk.deploymentsV3.getLatestDeployment(appId)).deploymentId, alpha.deploymentId);

  const beta = await deployEcho(sdk, appId, build.buildId, { deploymentTag: 'beta' });
  assert.notEqual(beta.deploymentId, alpha.deploymentId);
  assert.deepEqual(beta.additionalContainerPorts, [], 'no additional ports → []');
  assert.equal((await sdk.deploymentsV3.getLatestDeployment(appId)).deploymentId, beta.deploymentId);

  const got = await sdk.deploymentsV3.getDeployment(alpha.deploymentId, appId);
  assert.equal(got.deploymentId, alpha.deploymentId);
  assert.equal(got.deploymentTag, 'alpha');
  assert.deepEqual(got.additionalContainerPorts, alpha.additionalContainerPorts);

  const ids = (page) => page.deployments.map((d) => d.deploymentId).sort();
  const all = await sdk.deploymentsV3.getDeployments(appId);
  assert.deepEqual(ids(all), [alpha.deploymentId, beta.deploymentId].sort());
  assert.deepEqual(ids(await sdk.deploymentsV3.getDeployments(appId, 'alpha')), [alpha.deploymentId]);
  assert.deepEqual(ids(await sdk.deploymentsV3.getDeployments(appId, 'beta')), [beta.deploymentId]);
  assert.deepEqual(
    ids(await sdk.deploymentsV3.getDeployments(appId, undefined, build.buildTag)),
    [alpha.deploymentId, beta.deploymentId].sort(),
  );
  assert.deepEqual(ids(await sdk.deploymentsV3.getDeployments(appId, undefined, 'no-such-tag')), []);
  assert.deepEqual(ids(await sdk.deploymentsV3.getDeployments(appId, 'alpha', build.buildTag)), [
    alpha.deploymentId,
  ]);

  await expectHttpError(sdk.deploymentsV3.getDeployment('dep-does-not-exist', appId), 404);
});

test('GetDeployments pages through 25 deployments with nextPageToken', async () => {
  const sdk = lodge.sdk();
  const { appId } = await newApp(sdk);
  const build = await lodge.echoBuild();
  const created = [];
  for (let i = 0; i < 25; i++) {
    created.push((await deployEcho(sdk, appId, build.buildId)).deploymentId);
  }

  // The SDK (2.25.6) neither sends nextPageToken nor exposes it, so the walk
  // uses plain HTTP; the SDK still has to accept the first page as is.
  const firstViaSdk = await sdk.deploymentsV3.getDeployments(appId);
  // The default page (100) holds all 25, so SDK versions without paging see everything.
  assert.equal(firstViaSdk.deployments.length, 25);

  const seen = [];
  let token;
  let pages = 0;
  do {
    const url = new URL(`${lodge.url}/deployments/v3/apps/${encodeURIComponent(appId)}/deployments`);
    // pageSize is a Lodge extension (default 100) so that paging is exercised with few rows.
    url.searchParams.set('pageSize', '10');
    if (token !== undefined) url.searchParams.set('nextPageToken', token);
    const res = await fetch(url, { headers: { Authorization: `Bearer ${lodge.adminToken}` } });
    assert.equal(res.status, 200);
    const page = await res.json();
    assert.ok(Array.isArray(page.deployments));
    if (pages === 0) {
      assert.deepEqual(
        page.deployments.map((d) => d.deploymentId),
        firstViaSdk.deployments.slice(0, 10).map((d) => d.deploymentId),
        'pages follow the same newest-first order the SDK sees',
      );
    }
    assert.notEqual(page.nextPageToken, null, 'nextPageToken is omitted on the last page, never null');
    seen.push(...page.deployments.map((d) => d.deploymentId));
    token = page.nextPageToken;
    pages += 1;
    assert.ok(pages <= 26, 'paging terminates');
  } while (token !== undefined);

  assert.equal(pages, 3, '25 deployments in pages of 10');
  assert.equal(new Set(seen).size, seen.length, 'no deployment appears twice');
  assert.deepEqual([...seen].sort(), [...created].sort(), 'every deployment appears');
});

test('roomsPerProcess 0 is rejected with 422', async () => {
  const sdk = lodge.sdk();
  const { appId } = await newApp(sdk);
  const build = await lodge.echoBuild();
  await expectHttpError(deployEcho(sdk, appId, build.buildId, { roomsPerProcess: 0 }), 422);
});

test('an unknown build is 404', async () => {
  const sdk = lodge.sdk();
  const { appId } = await newApp(sdk);
  await expectHttpError(deployEcho(sdk, appId, 'bld-does-not-exist'), 404);
});
