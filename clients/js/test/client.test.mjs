// The client against the real server binary, through the faults a chat client meets:
// the server killed mid-stream and restarted on its data dir, the TCP connection
// dropped or gone silent, a token expiring, a thousand events appended while
// disconnected, a relay that drops, repeats or swaps a frame. Every case ends with
// every event delivered exactly once and in order.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { WebSocket } from 'ws';
import { connect } from '../dist/index.js';
import {
  Proxy,
  Relay,
  Server,
  assertExactlyOnce,
  collect,
  nowSecs,
  sign,
  token,
  waitFor,
} from './harness.mjs';

const cleanups = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

const backoff = { initialMs: 50, maxMs: 500 };

async function server() {
  const s = await Server.start();
  cleanups.push(() => s.dispose());
  return s;
}

async function proxy(port) {
  const p = await Proxy.start(port);
  cleanups.push(() => p.close());
  return p;
}

function client(opts) {
  const c = connect({ WebSocket, backoff, clientId: 'js', ...opts });
  cleanups.push(() => c.close());
  return c;
}

test('replays, goes live, and flush() resolves once the acks are durable', async () => {
  const s = await server();
  const { run } = await s.startedRun('alice');
  await s.appendThinking(run, 0, 10); // 1..=13
  const c = client({ url: `http://${s.addr}`, token: token('alice') });
  const seen = collect(c);
  await seen.until(13);
  await s.appendThinking(run, 10, 5); // 14..=18, live
  await seen.until(18);
  assert.equal(await c.flush(), 18);
  // The pong came after the ack was durable: a new socket resumes after it at once.
  assert.equal(await s.cursor('alice', 'js'), 18);
  await c.close();
  await waitFor('the iterator to end', () => seen.ended);
  assertExactlyOnce(assert, seen, 18);
  assert.equal(seen.viaCallback, 18, 'callbacks saw every event too');
  assert.deepEqual(seen.states, ['replaying', 'live', 'closed']);
  assert.deepEqual(seen.caughtUp, [13]);
  assert.deepEqual(seen.errors, []);
});

test('the server killed mid-stream and restarted on its data dir: nothing lost or repeated', async () => {
  let s = await server();
  const { run } = await s.startedRun('alice');
  for (let k = 0; k < 5; k++) await s.appendThinking(run, k * 1000, 1000); // 1..=5003
  const p = await proxy(s.port);
  const c = client({ url: p.url, token: token('alice') });
  let killedAt = null;
  c.on('event', (e) => {
    if (e.user_seq === 300) {
      // SIGKILL mid-replay: no shutdown code runs.
      s.child.kill('SIGKILL');
      killedAt = e.user_seq;
    }
  });
  const seen = collect(c);
  await waitFor('the kill', () => killedAt !== null);
  await s.kill();
  s = await Server.start(s.data);
  cleanups.push(() => s.kill());
  p.target = s.port;
  await s.appendThinking(run, 5000, 1000); // 5004..=6003
  await seen.until(6003);
  assertExactlyOnce(assert, seen, 6003);
  assert.ok(seen.states.includes('reconnecting'));
  assert.equal(await c.flush(), 6003);
  assert.equal(await s.cursor('alice', 'js'), 6003);
});

test('TCP connections dropped mid-stream: nothing lost or repeated', async () => {
  const s = await server();
  const { run } = await s.startedRun('alice');
  for (let k = 0; k < 3; k++) await s.appendThinking(run, k * 1000, 1000); // 1..=3003
  const p = await proxy(s.port);
  const c = client({ url: p.url, token: token('alice') });
  const cuts = new Set([100, 1000, 2000]);
  c.on('event', (e) => cuts.has(e.user_seq) && (cuts.delete(e.user_seq), p.cut()));
  const seen = collect(c);
  await seen.until(3003);
  // And live, with appends racing the cuts.
  const appending = (async () => {
    for (let k = 0; k < 10; k++) await s.appendThinking(run, 3000 + k * 50, 50);
  })();
  for (let k = 0; k < 2; k++) {
    const before = p.accepted;
    p.cut();
    await waitFor('a reconnect', () => p.accepted > before);
  }
  await appending;
  await seen.until(3503);
  assertExactlyOnce(assert, seen, 3503);
  assert.ok(p.accepted >= 6, `${p.accepted} connections`);
});

test('a connection gone silent is detected by keep-alive and replaced', async () => {
  const s = await server();
  const { run } = await s.startedRun('alice');
  const p = await proxy(s.port);
  const c = client({ url: p.url, token: token('alice'), keepaliveMs: 300 });
  const seen = collect(c);
  await seen.until(3);
  p.freeze();
  await s.appendThinking(run, 0, 20); // 4..=23, swallowed by the frozen link
  await seen.until(23);
  assertExactlyOnce(assert, seen, 23);
  assert.ok(seen.errors.some((e) => e.kind === 'timeout'), seen.errors.map(String).join('; '));
  assert.equal(p.accepted, 2);
});

test('a thousand events appended while disconnected arrive once, in order', async () => {
  const s = await server();
  const { run } = await s.startedRun('alice');
  const p = await proxy(s.port);
  const c = client({ url: p.url, token: token('alice') });
  const seen = collect(c);
  await seen.until(3);
  p.mode = 'refuse';
  p.cut();
  await s.appendThinking(run, 0, 1000); // 4..=1003
  const refused = p.accepted + 2;
  await waitFor('two refused reconnects', () => p.accepted >= refused);
  assert.equal(seen.events.length, 3);
  p.mode = 'pass';
  await seen.until(1003);
  assertExactlyOnce(assert, seen, 1003);
});

/**
 * A client whose provider `provide(call)` hands out two-second tokens keeps its one
 * connection across three renewals (well past the first token's exp): later events
 * arrive exactly once, with no reconnect and no error.
 */
async function assertRenewsOnTheOpenSocket(provide) {
  const s = await server();
  const { run } = await s.startedRun('alice');
  const p = await proxy(s.port);
  let calls = 0;
  const c = client({ url: p.url, token: async () => provide(++calls) });
  const seen = collect(c);
  await seen.until(3);
  await waitFor('three renewals', () => calls >= 4);
  await s.appendThinking(run, 0, 10);
  await seen.until(13);
  assertExactlyOnce(assert, seen, 13);
  assert.equal(p.accepted, 1, 'renewal needed no reconnect');
  assert.ok(!seen.states.includes('reconnecting'));
  assert.deepEqual(seen.errors, []);
}

test('a token provider renews before exp with refresh, on the open socket', () =>
  assertRenewsOnTheOpenSocket(() => token('alice', 'user', 2)));

test('a provider that first returns its cached token is asked again before exp', () => {
  // The first renewal (one second before exp) gets the same token back, as from a
  // provider that caches. A retry a fixed second later would land on exp and the server
  // would close the socket (4001); the retry must come sooner.
  let current = null;
  return assertRenewsOnTheOpenSocket((call) => {
    if (call !== 2) current = token('alice', 'user', 2);
    return current;
  });
});

test('an expired token (4001) gets a new token and a reconnect', async () => {
  const s = await server();
  const { run } = await s.startedRun('alice');
  // A provider that will not renew early: a new token only half a second after the
  // current one expired, so the server's 4001 comes first.
  let exp = null;
  const provider = async () => {
    if (exp !== null && Date.now() < exp * 1000 + 500) throw new Error('too early to renew');
    exp = nowSecs() + 2;
    return sign({ sub: 'alice', exp });
  };
  const c = client({ url: `ws://${s.addr}`, token: provider });
  const seen = collect(c);
  await seen.until(3);
  await waitFor('a 4001', () => seen.errors.some((e) => e.kind === 'closed' && e.code === 4001));
  await s.appendThinking(run, 0, 10);
  await seen.until(13);
  assertExactlyOnce(assert, seen, 13);
  assert.equal(await c.flush(), 13);
});

for (const [tamper, n, filtered, expected] of [
  ['drop', 5, false, { kind: 'gap', expected: 5, got: 6, resumeAfter: 4 }],
  ['repeat', 5, false, { kind: 'duplicate', got: 5, resumeAfter: 5 }],
  ['swap', 5, false, { kind: 'gap', expected: 5, got: 6, resumeAfter: 4 }],
  ['drop', 5, true, { kind: 'version_gap', expected: 5, got: 6, resumeAfter: 4 }],
  ['repeat', 7, true, { kind: 'duplicate', got: 7, resumeAfter: 7 }],
]) {
  test(`a relay that does "${tamper} frame ${n}"${filtered ? ' (thread filter)' : ''}: reported, repaired`, async () => {
    const s = await server();
    const { thread, run } = await s.startedRun('alice');
    await s.appendThinking(run, 0, 17); // 1..=20
    const relay = await Relay.start(s.port, tamper, n);
    cleanups.push(() => relay.close());
    const c = client({
      url: relay.url,
      token: token('alice'),
      after: 0,
      ...(filtered ? { threadId: thread } : {}),
    });
    const seen = collect(c);
    await seen.until(20);
    assertExactlyOnce(assert, seen, 20);
    const e = seen.errors[0];
    assert.ok(e, 'the fault was reported');
    for (const [k, v] of Object.entries(expected)) assert.equal(e[k], v, `${k} of ${e}`);
    assert.equal(e.fatal, false);
  });
}

test('a flush interrupted by a dropped connection completes on the next one', async () => {
  const s = await server();
  const { run } = await s.startedRun('alice');
  await s.appendThinking(run, 0, 47); // 1..=50
  const p = await proxy(s.port);
  const c = client({ url: p.url, token: token('alice'), acks: { mode: 'manual' } });
  const seen = collect(c);
  await seen.until(50);
  c.ack(40);
  // The flush's ack and ping go on a frozen link; only the next connection can answer.
  p.freeze();
  const flushed = c.flush();
  p.cut();
  assert.equal(await flushed, 40);
  assert.equal(await s.cursor('alice', 'js'), 40);
});

test('callbacks alone (no iterator) deliver and ack the same way', async () => {
  const s = await server();
  const { run } = await s.startedRun('alice');
  await s.appendThinking(run, 0, 200);
  const c = client({ url: `ws://${s.addr}/v1/ws`, token: token('alice') });
  const seen = collect(c, { iterate: false });
  await seen.until(203);
  assertExactlyOnce(assert, seen, 203);
  assert.equal(await c.flush(), 203);
});

test('what cannot work closes the client with a fatal error', async () => {
  const s = await server();
  await s.startedRun('alice'); // head 3
  const cases = [
    ['bad token', { token: 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln' }, 'unauthorized'],
    ['expired fixed token', { token: sign({ sub: 'alice', exp: nowSecs() - 10 }) }, 'token_expired'],
    ['after beyond head', { token: token('alice'), after: 4 }, 'bad_request'],
    ['no WebSocket', { token: token('alice'), WebSocket: null }, 'config'],
    ['a query in the url', { token: token('alice'), url: `ws://${s.addr}/v1/ws?after=0` }, 'config'],
  ];
  for (const [what, opts, kind] of cases) {
    // Node 22 and browsers have a WebSocket of their own.
    if (opts.WebSocket === null && globalThis.WebSocket) continue;
    const c = client({ url: `ws://${s.addr}`, ...opts, WebSocket: opts.WebSocket === null ? undefined : WebSocket });
    const seen = collect(c);
    await waitFor(`${what}: the end`, () => seen.ended);
    const last = seen.errors.at(-1);
    assert.equal(last?.kind, kind, `${what}: ${seen.errors.map(String).join('; ')}`);
    assert.equal(last.fatal, true, what);
    assert.equal(seen.states.at(-1), 'closed', what);
    assert.equal(seen.events.length, 0, what);
  }
});

test('an iterator that falls behind pauses the socket and resumes from the log', async () => {
  const s = await server();
  const { run } = await s.startedRun('alice');
  await s.appendThinking(run, 0, 1000); // 1..=1003
  const c = client({ url: `ws://${s.addr}`, token: token('alice'), highWaterMark: 50 });
  const errors = [];
  c.on('error', (e) => errors.push(e));
  const got = [];
  for await (const e of c) {
    got.push(e);
    if (got.length % 100 === 0) await new Promise((r) => setTimeout(r, 20)); // a slow consumer
    if (got.length === 1003) break;
  }
  assert.deepEqual(
    got.map((e) => e.user_seq),
    Array.from({ length: 1003 }, (_, k) => k + 1),
  );
  assert.ok(errors.some((e) => e.message.includes('paused')), 'the socket was paused at least once');
});
