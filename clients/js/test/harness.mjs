// The test harness: the real `threadline` binary on a temp data dir, real JWTs
// (HS256 with node:crypto), a TCP proxy a test can cut, refuse, freeze or point at
// a restarted server, and a WebSocket relay that tampers with one connection's frames.

import { spawn, spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { WebSocket, WebSocketServer } from 'ws';

export const SECRET = 'threadline-test-secret-0123456789abcdef';
/** How long any wait in a test may take before it fails. */
export const DEADLINE_MS = 30_000;

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..', '..', '..');

/** The server binary: $THREADLINE_BIN, else the workspace's debug build (built if missing). */
export function binary() {
  if (process.env.THREADLINE_BIN) return process.env.THREADLINE_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? join(root, 'target');
  const bin = join(target, 'debug', 'threadline');
  if (!existsSync(bin)) {
    const r = spawnSync('cargo', ['build', '-p', 'threadline-cli', '--bin', 'threadline'], {
      cwd: root,
      stdio: 'inherit',
    });
    if (r.status !== 0) throw new Error('building threadline failed');
  }
  return bin;
}

export const nowSecs = () => Math.floor(Date.now() / 1000);

const b64url = (b) => Buffer.from(b).toString('base64url');

/** An HS256 JWT of `claims` signed with SECRET. */
export function sign(claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

export const token = (sub, role = 'user', ttl = 3600) => sign({ sub, role, exp: nowSecs() + ttl });

/** Polls `f` until it returns a truthy value, failing after the deadline. */
export async function waitFor(what, f, ms = DEADLINE_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A running `threadline serve`, on `data` (a fresh temp dir by default). */
export class Server {
  static async start(data) {
    const dir = data ?? mkdtempSync(join(tmpdir(), 'threadline-js-'));
    const child = spawn(
      binary(),
      ['serve', '--data', dir, '--listen', '127.0.0.1:0', '--jwt-secret', SECRET],
      { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, THREADLINE_LOG: 'info' } },
    );
    const addr = await new Promise((resolveAddr, reject) => {
      let buf = '';
      const timer = setTimeout(() => reject(new Error(`server did not start: ${buf}`)), DEADLINE_MS);
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (chunk) => {
        buf += chunk;
        const m = /threadline listening on http:\/\/(\S+)\s/.exec(buf);
        if (m) {
          clearTimeout(timer);
          resolveAddr(m[1]);
        }
      });
      child.on('exit', (code) => reject(new Error(`server exited with ${code}: ${buf}`)));
    });
    child.stderr.resume();
    const s = new Server();
    Object.assign(s, { child, addr, data: dir, owned: data === undefined });
    return s;
  }

  get port() {
    return Number(this.addr.split(':').pop());
  }

  /** SIGKILL (no shutdown code runs) and wait for the exit. */
  async kill() {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill('SIGKILL');
    await exited;
  }

  /** Kills it and removes its data dir (when it made one). */
  async dispose() {
    await this.kill();
    if (this.owned) rmSync(this.data, { recursive: true, force: true });
  }

  /** POSTs JSON with `jwt`; returns [status, body]. */
  async post(jwt, path, body) {
    const r = await fetch(`http://${this.addr}${path}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${jwt}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    const text = await r.text();
    try {
      return [r.status, JSON.parse(text)];
    } catch {
      throw new Error(`POST ${path}: ${r.status} ${text}`);
    }
  }

  /** An agent creates a thread for `user`, registers a run and starts it: three events. */
  async startedRun(user) {
    const agent = token('bot', 'agent');
    const [s1, t] = await this.post(agent, '/v1/threads', { user_id: user });
    const [s2, r] = await this.post(agent, `/v1/threads/${t.thread_id}/runs`, { agent_name: 'js' });
    const [s3] = await this.post(agent, `/v1/runs/${r.run_id}/events`, { type: 'agent_started', data: {} });
    if (s1 !== 201 || s2 !== 201 || s3 !== 201) throw new Error(`setup failed: ${s1} ${s2} ${s3}`);
    return { thread: t.thread_id, run: r.run_id };
  }

  /** Appends `n` agent_thinking events with data.i = first … in one batch. */
  async appendThinking(run, first, n) {
    const events = Array.from({ length: n }, (_, k) => ({
      run_id: run,
      type: 'agent_thinking',
      data: { i: first + k },
    }));
    const [status, body] = await this.post(token('bot', 'agent'), '/v1/events', { events });
    if (status !== 201) throw new Error(`append failed: ${status} ${JSON.stringify(body)}`);
    return body.results;
  }

  /** The durable cursor of `clientId`, as a new socket's welcome tells it. */
  async cursor(user, clientId) {
    const ws = new WebSocket(`ws://${this.addr}/v1/ws?client_id=${clientId}`, {
      headers: { authorization: `Bearer ${token(user)}` },
    });
    const welcome = await new Promise((res, rej) => {
      ws.once('message', (d) => res(JSON.parse(String(d))));
      ws.once('error', rej);
    });
    ws.close();
    return welcome.resume_after;
  }
}

/** A TCP proxy in front of a server: pass, refuse, cut, freeze, retarget. */
export class Proxy {
  static async start(port) {
    const p = new Proxy();
    p.target = port;
    p.mode = 'pass';
    p.accepted = 0;
    p.conns = new Set();
    p.server = net.createServer((client) => p.#accept(client));
    await new Promise((r) => p.server.listen(0, '127.0.0.1', r));
    p.port = p.server.address().port;
    return p;
  }

  #accept(client) {
    this.accepted++;
    client.on('error', () => {});
    if (this.mode === 'refuse') return client.destroy();
    const conn = { client, upstream: null, frozen: false };
    this.conns.add(conn);
    client.on('close', () => this.conns.delete(conn));
    if (this.mode === 'stall') return;
    const upstream = net.connect(this.target, '127.0.0.1');
    conn.upstream = upstream;
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
    client.on('data', (d) => conn.frozen || upstream.write(d));
    upstream.on('data', (d) => conn.frozen || client.write(d));
  }

  get url() {
    return `ws://127.0.0.1:${this.port}`;
  }

  /** Drops every connection open now. */
  cut() {
    for (const c of this.conns) {
      c.client.destroy();
      c.upstream?.destroy();
    }
    this.conns.clear();
  }

  /** Every connection open now goes silent: both directions swallowed, nothing closed. */
  freeze() {
    for (const c of this.conns) c.frozen = true;
  }

  async close() {
    this.cut();
    await new Promise((r) => this.server.close(r));
  }
}

/** A WebSocket relay that drops ('drop'), repeats ('repeat') or swaps with the next
 *  ('swap') the n-th event frame of its first connection; later ones pass untouched. */
export class Relay {
  static async start(port, tamper, n) {
    const r = new Relay();
    let first = true;
    r.wss = new WebSocketServer({
      host: '127.0.0.1',
      port: 0,
      handleProtocols: () => 'threadline.v1',
    });
    await new Promise((res) => r.wss.on('listening', res));
    r.port = r.wss.address().port;
    r.wss.on('connection', (down, req) => {
      const tampering = first;
      first = false;
      const protocols = String(req.headers['sec-websocket-protocol'] ?? '')
        .split(',')
        .map((p) => p.trim());
      const up = new WebSocket(`ws://127.0.0.1:${port}${req.url}`, protocols);
      let events = 0;
      let held = null;
      const pending = [];
      up.on('open', () => pending.splice(0).forEach((m) => up.send(m)));
      down.on('message', (m) => (up.readyState === 1 ? up.send(String(m)) : pending.push(String(m))));
      up.on('message', (d) => {
        const text = String(d);
        const isEvent = text.startsWith('{"type":"event"');
        if (isEvent) events++;
        let out = [text];
        if (tampering && isEvent) {
          if (tamper === 'drop' && events === n) out = [];
          if (tamper === 'repeat' && events === n) out = [text, text];
          if (tamper === 'swap' && events === n) [held, out] = [text, []];
          if (tamper === 'swap' && events === n + 1) out = [text, held];
        }
        for (const m of out) if (down.readyState === 1) down.send(m);
      });
      up.on('close', () => down.close());
      down.on('close', () => up.close());
      up.on('error', () => down.terminate());
      down.on('error', () => up.terminate());
    });
    return r;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}`;
  }

  async close() {
    for (const c of this.wss.clients) c.terminate();
    await new Promise((r) => this.wss.close(r));
  }
}

/** Collects what a client delivers, through its async iterator and its callbacks. */
export function collect(client, { iterate = true } = {}) {
  const seen = { events: [], errors: [], states: [], caughtUp: [], ended: false, viaCallback: 0 };
  client.on('error', (e) => seen.errors.push(e));
  client.on('state', (s) => seen.states.push(s));
  client.on('caughtUp', (n) => seen.caughtUp.push(n));
  client.on('event', () => seen.viaCallback++);
  if (iterate) {
    (async () => {
      for await (const e of client) seen.events.push(e);
      seen.ended = true;
    })();
  } else {
    client.on('event', (e) => seen.events.push(e));
    client.on('state', (s) => s === 'closed' && (seen.ended = true));
  }
  seen.until = (n) => waitFor(`${n} events (have ${seen.events.length})`, () => seen.events.length >= n);
  return seen;
}

/** Every event 1..=n exactly once and in order; events 4.. are agent_thinking with i = user_seq - 4. */
export function assertExactlyOnce(assert, seen, n) {
  assert.deepEqual(
    seen.events.map((e) => e.user_seq),
    Array.from({ length: n }, (_, k) => k + 1),
    `errors: ${seen.errors.map(String).join('; ')}`,
  );
  for (const e of seen.events.slice(3)) {
    assert.equal(e.event, 'agent_thinking');
    assert.equal(e.data.i, e.user_seq - 4);
  }
}
