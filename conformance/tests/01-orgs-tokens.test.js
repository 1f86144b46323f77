// Organizations and org tokens (hathora-api.md §2, §3.13, §3.14).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { useLodge, expectHttpError, uniqueName } from '../lib/lodge.js';

const lodge = useLodge();

test('GetOrgs returns exactly the default org', async () => {
  const { orgs } = await lodge.sdk().organizationsV1.getOrgs();
  assert.equal(orgs.length, 1);
  const [org] = orgs;
  assert.equal(typeof org.orgId, 'string');
  assert.ok(org.orgId.length > 0);
  assert.ok(Array.isArray(org.scopes));
  assert.equal(typeof org.isSingleTenant, 'boolean');
  assert.equal(typeof org.maxRequestedMemoryMB, 'number');
});

test('an org token authenticates, is listed without its secret, and stops working once revoked', async () => {
  const sdk = lodge.sdk();
  const orgId = await lodge.orgId();
  const name = uniqueName('ci-token');

  const created = await sdk.tokensV1.createOrgToken(orgId, { name });
  const { plainTextToken, orgToken } = created;
  assert.equal(typeof plainTextToken, 'string');
  assert.ok(plainTextToken.length >= 16, 'the secret is not trivially short');
  assert.equal(orgToken.name, name);
  assert.equal(orgToken.orgId, orgId);
  assert.equal(orgToken.status, 'active');
  assert.equal(orgToken.lastFourCharsOfKey, plainTextToken.slice(-4));
  assert.ok(orgToken.createdAt instanceof Date);

  // The new token is a working developer credential.
  const { orgs } = await lodge.sdk(plainTextToken).organizationsV1.getOrgs();
  assert.deepEqual(
    orgs.map((o) => o.orgId),
    [orgId],
  );

  // Listed, without the secret anywhere in the response.
  const { tokens } = await sdk.tokensV1.getOrgTokens(orgId);
  const listed = tokens.find((t) => t.orgTokenId === orgToken.orgTokenId);
  assert.ok(listed, 'GetOrgTokens lists the new token');
  assert.equal(listed.status, 'active');
  assert.equal(listed.name, name);
  const raw = await fetch(`${lodge.url}/tokens/v1/orgs/${encodeURIComponent(orgId)}`, {
    headers: { Authorization: `Bearer ${lodge.adminToken}` },
  });
  assert.equal(raw.status, 200);
  assert.ok(!(await raw.text()).includes(plainTextToken), 'GetOrgTokens never returns the secret');

  // Revoked: the call answers the JSON boolean true and the token is dead.
  assert.equal(await sdk.tokensV1.revokeOrgToken(orgId, orgToken.orgTokenId), true);
  await expectHttpError(lodge.sdk(plainTextToken).organizationsV1.getOrgs(), 401);
  const after = (await sdk.tokensV1.getOrgTokens(orgId)).tokens.find(
    (t) => t.orgTokenId === orgToken.orgTokenId,
  );
  assert.equal(after?.status, 'revoked');
});

test('a request without a token gets 401', async () => {
  await expectHttpError(lodge.sdk(null).organizationsV1.getOrgs(), 401);
  await expectHttpError(lodge.sdk(null).appsV2.getApps(), 401);
});

test('a garbage token gets 401', async () => {
  await expectHttpError(lodge.sdk('not-a-real-token').organizationsV1.getOrgs(), 401);
  await expectHttpError(lodge.sdk(`${lodge.adminToken}x`).appsV2.getApps(), 401);
});

test('wire: a 401 is a JSON body with a message', async () => {
  const res = await fetch(`${lodge.url}/orgs/v1`);
  assert.equal(res.status, 401);
  assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
  const body = await res.json();
  assert.equal(typeof body.message, 'string');
  assert.ok(body.message.length > 0);
});

test('wire: /livez and /readyz answer 200', async () => {
  for (const path of ['/livez', '/readyz']) {
    const res = await fetch(`${lodge.url}${path}`);
    await res.arrayBuffer();
    assert.equal(res.status, 200, path);
  }
});
