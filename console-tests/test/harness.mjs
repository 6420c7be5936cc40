// The real `threadline` binary on a temp data dir and HS256 JWTs signed with node:crypto.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const SECRET = 'threadline-console-test-secret-0123456789';
/** How long any wait in a test may take before it fails. */
export const DEADLINE_MS = 30_000;

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The server binary: $THREADLINE_BIN, else the workspace's debug build. */
export function binary() {
  if (process.env.THREADLINE_BIN) return process.env.THREADLINE_BIN;
  return join(process.env.CARGO_TARGET_DIR ?? join(root, 'target'), 'debug', 'threadline');
}

const b64url = (b) => Buffer.from(b).toString('base64url');

export function token(sub, role = 'user', ttl = 3600) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ sub, role, exp: Math.floor(Date.now() / 1000) + ttl }));
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** Polls `f` until it returns a truthy value, failing after the deadline. */
export async function waitFor(what, f, ms = DEADLINE_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A running `threadline serve` on a fresh temp dir. */
export class Server {
  static async start() {
    const dir = mkdtempSync(join(tmpdir(), 'threadline-console-'));
    const child = spawn(binary(), ['serve', '--data', dir, '--listen', '127.0.0.1:0', '--jwt-secret', SECRET], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, THREADLINE_LOG: 'info' },
    });
    const addr = await new Promise((ok, fail) => {
      let buf = '';
      const timer = setTimeout(() => fail(new Error(`server did not start: ${buf}`)), DEADLINE_MS);
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (chunk) => {
        buf += chunk;
        const m = /threadline listening on http:\/\/(\S+)\s/.exec(buf);
        if (m) { clearTimeout(timer); ok(m[1]); }
      });
      child.on('exit', (code) => fail(new Error(`server exited with ${code}: ${buf}`)));
    });
    child.stderr.resume();
    return Object.assign(new Server(), { child, addr, dir });
  }

  async dispose() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((r) => this.child.once('exit', r));
      this.child.kill('SIGTERM');
      await exited;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** POSTs JSON with `jwt`; returns [status, body]. */
  async post(jwt, path, body) {
    const r = await fetch(`http://${this.addr}${path}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${jwt}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    return [r.status, await r.json()];
  }
}
