// LogsV1 (hathora-api.md §3.9).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  useLodge,
  expectHttpError,
  sleep,
  streamText,
  waitActive,
  waitFor,
  waitProcessStatus,
  withTimeout,
} from '../lib/lodge.js';

const lodge = useLodge();

test('process logs: tail, follow until the process ends, download', async () => {
  const { sdk, appId } = await lodge.echoApp();
  const room = await sdk.roomsV2.createRoom({ region: 'Sydney' }, appId);
  await waitActive(sdk, appId, room.roomId);
  const { processId } = room;

  // Tail: the start line shows up (log capture may lag the bind a little).
  const tail = await waitFor(
    async () => {
      const text = await streamText(await sdk.logsV1.getLogsForProcess(processId, appId, false, 100));
      return text.includes('echo server listening') ? text : null;
    },
    { timeoutMs: 5000, what: 'the start line in the process log' },
  );
  assert.match(tail, /echo server listening on port \d+/);
  assert.match(tail, /greeting: from-deployment/);

  const one = await streamText(await sdk.logsV1.getLogsForProcess(processId, appId, false, 1));
  assert.ok(
    one.split('\n').filter((line) => line.length > 0).length <= 1,
    `tailLines=1 returns at most one line:\n${one}`,
  );

  // Follow: the stream stays open while the process runs and ends when it stops.
  const follow = await sdk.logsV1.getLogsForProcess(processId, appId, true, 100);
  let ended = false;
  const followed = streamText(follow).then((text) => {
    ended = true;
    return text;
  });
  await sleep(300);
  assert.equal(ended, false, 'a follow stream stays open while the process runs');

  await sdk.processesV3.stopProcess(processId, appId);
  await waitProcessStatus(sdk, appId, processId, 'stopped');
  const text = await withTimeout(
    followed,
    10_000,
    'the follow stream did not end within 10 s of the process stopping',
  );
  assert.match(text, /echo server listening/);
  assert.match(text, /shutting down/, 'a line printed after the follow began arrives on the stream');

  const whole = await streamText(await sdk.logsV1.downloadLogForProcess(processId, appId));
  assert.match(whole, /echo server listening on port \d+/);
  assert.ok(whole.length >= tail.length, 'the download holds the whole log');
});

test('logs of an unknown process are 404', async () => {
  const { sdk, appId } = await lodge.echoApp();
  await expectHttpError(
    sdk.logsV1.getLogsForProcess('00000000-0000-0000-0000-000000000000', appId, false, 10),
    404,
  );
});
