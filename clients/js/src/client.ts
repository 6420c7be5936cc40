// The connection machinery behind `connect()`: opens the socket, checks every frame's
// place in the sequence, batches acks, answers flush() with ping/pong, renews the
// token, and reconnects with backoff and jitter when anything breaks.

import { ThreadlineError } from './errors.js';
import { isTerminal, type MessageText, type ThreadlineEvent } from './events.js';

/** The standard WebSocket interface this client needs (browsers, `ws`, undici). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export type TokenSource = string | (() => string | Promise<string>);

export type State = 'connecting' | 'replaying' | 'live' | 'reconnecting' | 'closed';

export interface ConnectOptions {
  /** `ws://host:port`, `http://host:port` (`/v1/ws` is added) or the full `…/v1/ws`. */
  url: string;
  /** A JWT, or a function returning a fresh one (then renewed before `exp`). */
  token: TokenSource;
  /** Whose durable cursor acks move (the server's default is `default`). */
  clientId?: string;
  /** Where the first connection starts: after this user_seq, or `latest`; without it,
   *  after this client id's durable cursor. Later connections resume after the last
   *  user_seq delivered. */
  after?: number | 'latest';
  /** Only this thread's events (user_seq then has gaps; thread_version stays dense). */
  threadId?: string;
  /** The WebSocket constructor; defaults to `globalThis.WebSocket` (Node 20: pass `ws`). */
  WebSocket?: WebSocketConstructor;
  acks?: {
    /** `delivery` (default): an event is handled once delivered (yielded, or its
     *  `event` listeners returned); `manual`: only what `ack()` marks; `off`: never ack. */
    mode?: 'delivery' | 'manual' | 'off';
    /** Ack once this many events wait (default 100). */
    maxEvents?: number;
    /** … or this long after the first of them (default 250 ms). */
    maxDelayMs?: number;
  };
  backoff?: { initialMs?: number; maxMs?: number; factor?: number };
  /** With nothing received this long the client pings; with no answer for as long
   *  again, it reconnects (default 15 s). */
  keepaliveMs?: number;
  /** Opening a socket up to its welcome (default 10 s). */
  connectTimeoutMs?: number;
  /** Events the async iterator may hold before the client stops its socket until the
   *  consumer catches up (default 5000; the server keeps the rest in its log). */
  highWaterMark?: number;
  onEvent?: (e: ThreadlineEvent) => void;
  /** Merged and compacted message frames (`merge=1`, default true). */
  merge?: boolean;
  /** Each frame of a streamed message, with the message's text accumulated so far. */
  onDelta?: (m: MessageText, e: ThreadlineEvent) => void;
  onCaughtUp?: (userSeq: number) => void;
  onState?: (s: State) => void;
  onError?: (e: ThreadlineError) => void;
}

type Listeners = {
  event: (e: ThreadlineEvent) => void;
  caughtUp: (userSeq: number) => void;
  state: (s: State) => void;
  error: (e: ThreadlineError) => void;
};

const OPEN = 1;
const MAX_AUTH_REFUSALS = 3;
/** A failed or premature renewal is retried after this, or sooner as `exp` nears. */
const RENEW_RETRY_MS = 1000;
/** The shortest wait between renewal attempts. */
const RENEW_RETRY_MIN_MS = 50;

interface Conn {
  ws: WebSocketLike;
  asked: number | null;
  welcomed: boolean;
  resumedAfter: number;
  /** The highest ack sent on this connection (starts at what is durable). */
  acked: number;
  /** Pings not yet answered: the ack each covers, and when it went. */
  pings: { acked: number; at: number }[];
  lastRx: number;
  progressed: boolean;
  /** An error frame that may precede a close. */
  held: { code: string; message: string } | null;
  /** An invalid_ack since the last pong: that pong confirms nothing. */
  refusedAck: string | null;
  /** A renewed token sent with refresh, awaiting refreshed. */
  offered: string | null;
  renewing: boolean;
  timers: {
    connect?: ReturnType<typeof setTimeout>;
    keepalive?: ReturnType<typeof setTimeout>;
    ack?: ReturnType<typeof setTimeout>;
    renew?: ReturnType<typeof setTimeout>;
    /** close(): how long the last acks may take to be confirmed. */
    closing?: ReturnType<typeof setTimeout>;
  };
  ended: boolean;
}

type Outcome =
  | { kind: 'stop' }
  | { kind: 'fatal'; error: ThreadlineError }
  | { kind: 'retry'; error: ThreadlineError; now?: boolean };

/** `exp` (unix seconds) of a JWT, read without verifying it. */
export function tokenExpiry(token: string): number | undefined {
  const part = token.split('.')[1];
  if (!part) return undefined;
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const json = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
    const exp = JSON.parse(json).exp;
    return typeof exp === 'number' ? exp : undefined;
  } catch {
    return undefined;
  }
}

/** The socket URL for a connection resuming after `after` (null: the cursor). */
export function socketUrl(opts: ConnectOptions, after: string | null): string {
  const url = opts.url.trim();
  if (/[?#]/.test(url)) {
    throw new ThreadlineError('config', 'the url takes no query: use clientId, threadId and after');
  }
  const m = /^([a-zA-Z]+):\/\/(.+)$/.exec(url);
  if (!m) throw new ThreadlineError('config', `${JSON.stringify(url)} is not a ws:// or http:// URL`);
  const scheme = ({ ws: 'ws', http: 'ws', wss: 'wss', https: 'wss' } as Record<string, string>)[
    m[1].toLowerCase()
  ];
  if (!scheme) throw new ThreadlineError('config', `unsupported URL scheme ${m[1]}`);
  const rest = m[2].replace(/\/+$/, '');
  const path = rest.endsWith('/v1/ws') ? '' : '/v1/ws';
  const query: string[] = [];
  if (after !== null) query.push(`after=${after}`);
  if (opts.clientId !== undefined) query.push(`client_id=${encodeURIComponent(opts.clientId)}`);
  if (opts.threadId !== undefined) query.push(`thread_id=${encodeURIComponent(opts.threadId)}`);
  if (opts.merge !== false) query.push('merge=1');
  return `${scheme}://${rest}${path}${query.length ? '?' + query.join('&') : ''}`;
}

/** A running client: an async iterable of events, with callbacks besides. */
export class ThreadlineClient implements AsyncIterable<ThreadlineEvent> {
  readonly #opts: ConnectOptions;
  readonly #WS: WebSocketConstructor;
  readonly #mode: 'delivery' | 'manual' | 'off';
  readonly #maxEvents: number;
  readonly #maxDelayMs: number;
  readonly #keepaliveMs: number;
  readonly #connectTimeoutMs: number;
  readonly #highWater: number;
  readonly #listeners: { [K in keyof Listeners]: Set<Listeners[K]> } = {
    event: new Set(),
    caughtUp: new Set(),
    state: new Set(),
    error: new Set(),
  };

  #state: State = 'connecting';
  #conn: Conn | null = null;
  #token: string | null = null;
  #exp: number | undefined;
  /** The last user_seq received and accepted (null before the first welcome). */
  #last: number | null = null;
  #lastVersion: number | null = null;
  #delivered = 0;
  #handled = 0;
  #durable = 0;
  #flushes: { target: number; resolve: (n: number) => void; reject: (e: unknown) => void }[] = [];
  #failures = 0;
  #authRefusals = 0;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #closing: { resolve: () => void; promise: Promise<void> } | null = null;
  #done = false;
  /** The async iterator's queue, and the next() waiting on it. */
  #iterating = false;
  #queue: ThreadlineEvent[] = [];
  #waiting: ((r: IteratorResult<ThreadlineEvent>) => void) | null = null;
  #paused = false;

  constructor(opts: ConnectOptions) {
    this.#opts = opts;
    const WS = opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    this.#mode = opts.acks?.mode ?? 'delivery';
    this.#maxEvents = opts.acks?.maxEvents ?? 100;
    this.#maxDelayMs = opts.acks?.maxDelayMs ?? 250;
    this.#keepaliveMs = opts.keepaliveMs ?? 15_000;
    this.#connectTimeoutMs = opts.connectTimeoutMs ?? 10_000;
    this.#highWater = opts.highWaterMark ?? 5000;
    if (opts.onEvent) this.#listeners.event.add(opts.onEvent);
    if (opts.onCaughtUp) this.#listeners.caughtUp.add(opts.onCaughtUp);
    if (opts.onState) this.#listeners.state.add(opts.onState);
    if (opts.onError) this.#listeners.error.add(opts.onError);
    if (!WS) {
      this.#WS = undefined as unknown as WebSocketConstructor;
      queueMicrotask(() =>
        this.#finish(
          new ThreadlineError('config', 'no WebSocket: pass one as `WebSocket` (e.g. from the ws package)'),
        ),
      );
      return;
    }
    this.#WS = WS;
    queueMicrotask(() => void this.#attempt());
  }

  /** Listens to `event`, `caughtUp`, `state` or `error`; returns the unsubscribe. */
  on<K extends keyof Listeners>(type: K, listener: Listeners[K]): () => void {
    this.#listeners[type].add(listener);
    return () => this.#listeners[type].delete(listener);
  }

  get state(): State {
    return this.#state;
  }

  /** The last user_seq delivered (0 before the first). */
  get lastDelivered(): number {
    return this.#delivered;
  }

  /** With `acks.mode: 'manual'`: every delivered event up to `userSeq` is handled. */
  ack(userSeq: number): void {
    const seq = Math.min(userSeq, this.#delivered);
    if (seq > this.#handled) {
      this.#handled = seq;
      this.#considerAck();
    }
  }

  /** Acks what was handled and resolves once the server made it durable (ping after
   *  ack: the pong comes only after the acks before it are durable). Survives reconnects. */
  flush(): Promise<number> {
    const target = this.#handled;
    if (target <= this.#durable || this.#mode === 'off') return Promise.resolve(this.#durable);
    if (this.#done) return Promise.reject(new ThreadlineError('client_closed', 'the client is closed'));
    return new Promise((resolve, reject) => {
      this.#flushes.push({ target, resolve, reject });
      if (this.#conn?.welcomed) this.#ensureFlush(this.#conn);
    });
  }

  /** Acks what was handled (waiting up to 2 s for it to be durable), closes the socket
   *  and ends the iterator. */
  close(): Promise<void> {
    if (this.#done) return Promise.resolve();
    if (this.#closing) return this.#closing.promise;
    let resolve!: () => void;
    const promise = new Promise<void>((r) => (resolve = r));
    this.#closing = { resolve, promise };
    const conn = this.#conn;
    if (conn?.welcomed && conn.ws.readyState === OPEN) {
      this.#sendAck(conn);
      if (conn.acked > this.#durable) {
        this.#ping(conn);
        conn.timers.closing = setTimeout(() => this.#endConn(conn, { kind: 'stop' }), 2000);
        return promise;
      }
    }
    if (conn) this.#endConn(conn, { kind: 'stop' });
    else this.#finish(null);
    return promise;
  }

  [Symbol.asyncIterator](): AsyncIterator<ThreadlineEvent> {
    this.#iterating = true;
    return {
      next: () => {
        const e = this.#queue.shift();
        if (e) {
          this.#delivered = e.user_seq;
          if (this.#mode === 'delivery') this.ack(e.user_seq);
          if (this.#paused && this.#queue.length <= this.#highWater / 2) {
            this.#paused = false;
            this.#scheduleRetry(0);
          }
          return Promise.resolve({ value: e, done: false });
        }
        if (this.#done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => (this.#waiting = resolve));
      },
      return: () => {
        this.#iterating = false;
        this.#queue = [];
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }

  // ------------------------------------------------------------------ reporting

  #emit<K extends keyof Listeners>(type: K, arg: Parameters<Listeners[K]>[0]): void {
    for (const l of this.#listeners[type]) {
      try {
        (l as (a: typeof arg) => void)(arg);
      } catch (e) {
        // A listener's own failure is not the connection's; it must not stop delivery.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  #report(e: ThreadlineError): void {
    this.#emit('error', e);
  }

  #setState(s: State): void {
    if (this.#state !== s) {
      this.#state = s;
      this.#emit('state', s);
    }
  }

  // ------------------------------------------------------------------ connecting

  async #token_(): Promise<string | Outcome> {
    const source = this.#opts.token;
    const valid = (exp: number | undefined) => exp === undefined || exp * 1000 > Date.now();
    if (this.#token !== null && valid(this.#exp)) return this.#token;
    if (typeof source === 'string') {
      this.#token = source;
      this.#exp = tokenExpiry(source);
      return valid(this.#exp)
        ? source
        : { kind: 'fatal', error: new ThreadlineError('token_expired', 'the token expired and it is fixed (pass a function to renew it)') };
    }
    try {
      const t = await source();
      this.#token = t;
      this.#exp = tokenExpiry(t);
      return t;
    } catch (e) {
      return { kind: 'retry', error: new ThreadlineError('token', `token provider: ${String(e)}`) };
    }
  }

  async #attempt(): Promise<void> {
    this.#retryTimer = undefined;
    if (this.#done || this.#closing || this.#paused) {
      if (this.#closing && !this.#done) this.#finish(null);
      return;
    }
    const token = await this.#token_();
    if (this.#done || this.#closing) {
      if (!this.#done) this.#finish(null);
      return;
    }
    if (typeof token !== 'string') return this.#after(token, false);
    const after =
      this.#last !== null
        ? String(this.#last)
        : this.#opts.after === undefined
          ? null
          : String(this.#opts.after);
    let url: string;
    let ws: WebSocketLike;
    try {
      url = socketUrl(this.#opts, after);
      ws = new this.#WS(url, ['threadline.v1', `bearer.${token}`]);
    } catch (e) {
      const error =
        e instanceof ThreadlineError ? e : new ThreadlineError('config', `cannot open a socket: ${String(e)}`);
      return this.#after(error.kind === 'config' ? { kind: 'fatal', error } : { kind: 'retry', error }, false);
    }
    const asked = after !== null && after !== 'latest' ? Number(after) : null;
    const conn: Conn = {
      ws,
      asked,
      welcomed: false,
      resumedAfter: 0,
      acked: this.#durable,
      pings: [],
      lastRx: Date.now(),
      progressed: false,
      held: null,
      refusedAck: null,
      offered: null,
      renewing: false,
      timers: {},
      ended: false,
    };
    this.#conn = conn;
    conn.timers.connect = setTimeout(
      () =>
        this.#endConn(conn, {
          kind: 'retry',
          error: new ThreadlineError('timeout', `no welcome within ${this.#connectTimeoutMs} ms`),
        }),
      this.#connectTimeoutMs,
    );
    ws.onmessage = (m) => {
      if (conn.ended) return;
      conn.lastRx = Date.now();
      if (typeof m.data === 'string') this.#onText(conn, m.data);
    };
    ws.onclose = (ev) => {
      if (!conn.ended) this.#endConn(conn, this.#closed(conn, ev.code, ev.reason), true);
    };
    ws.onerror = () => {
      // A close event follows; it says what happened.
    };
  }

  /** Ends a connection and decides what comes next. */
  #endConn(conn: Conn, outcome: Outcome, alreadyClosed = false): void {
    if (conn.ended) return;
    conn.ended = true;
    for (const t of Object.values(conn.timers)) clearTimeout(t);
    conn.ws.onmessage = null;
    conn.ws.onclose = null;
    if (!alreadyClosed) {
      try {
        conn.ws.close(1000, outcome.kind === 'stop' ? 'client closed' : 'reconnecting');
      } catch {
        // Already closing.
      }
    }
    if (this.#conn === conn) this.#conn = null;
    // Flushes a filtered connection could not serve stay pending for the next.
    this.#after(outcome, conn.progressed);
  }

  #after(outcome: Outcome, progressed: boolean): void {
    if (outcome.kind === 'stop' || this.#closing) return this.#finish(null);
    if (outcome.kind === 'fatal') return this.#finish(outcome.error);
    this.#report(outcome.error);
    if (this.#paused) {
      this.#setState('reconnecting');
      return;
    }
    if (progressed) this.#failures = 0;
    let delay = 0;
    if (!outcome.now) {
      const b = this.#opts.backoff ?? {};
      const ceiling = Math.min(
        b.maxMs ?? 30_000,
        (b.initialMs ?? 250) * Math.pow(Math.max(1, b.factor ?? 2), Math.min(this.#failures, 64)),
      );
      delay = ceiling / 2 + (Math.random() * ceiling) / 2;
      this.#failures++;
    }
    this.#setState('reconnecting');
    this.#scheduleRetry(delay);
  }

  #scheduleRetry(delay: number): void {
    if (this.#retryTimer !== undefined || this.#done) return;
    this.#retryTimer = setTimeout(() => void this.#attempt(), delay);
  }

  #finish(error: ThreadlineError | null): void {
    if (this.#done) return;
    this.#done = true;
    clearTimeout(this.#retryTimer);
    if (this.#conn) {
      const c = this.#conn;
      this.#conn = null;
      c.ended = true;
      for (const t of Object.values(c.timers)) clearTimeout(t);
      try {
        c.ws.close(1000, 'client closed');
      } catch {
        // Already closing.
      }
    }
    if (error) this.#report(error);
    const failure = error ?? new ThreadlineError('client_closed', 'the client is closed');
    for (const f of this.#flushes.splice(0)) {
      if (f.target <= this.#durable) f.resolve(this.#durable);
      else f.reject(failure);
    }
    this.#setState('closed');
    if (this.#waiting && this.#queue.length === 0) {
      const w = this.#waiting;
      this.#waiting = null;
      w({ value: undefined, done: true });
    }
    this.#closing?.resolve();
  }

  /** Maps the server's close to what happens next. */
  #closed(conn: Conn, code: number, reason: string): Outcome {
    const held = conn.held;
    const text = held ? `${held.code}: ${held.message}` : reason;
    const fixed = typeof this.#opts.token === 'string';
    const error = new ThreadlineError('closed', `closed by the server: ${code} ${text}`, { code });
    if (code === 4001) {
      if (fixed) {
        return { kind: 'fatal', error: new ThreadlineError('token_expired', 'the token expired and it is fixed (pass a function to renew it)') };
      }
      this.#token = null;
      return { kind: 'retry', error, now: true };
    }
    if (code === 1008 && (held?.code === 'unauthorized' || held?.code === 'token_subject_changed')) {
      this.#authRefusals++;
      if (fixed || held.code === 'token_subject_changed' || this.#authRefusals >= MAX_AUTH_REFUSALS) {
        return { kind: 'fatal', error: new ThreadlineError('unauthorized', `unauthorized: ${text}`, { code }) };
      }
      this.#token = null;
      return { kind: 'retry', error };
    }
    if (code === 4400) {
      return { kind: 'fatal', error: new ThreadlineError('bad_request', `bad request: ${text}`, { code }) };
    }
    if (!conn.welcomed && code === 1006) {
      return { kind: 'retry', error: new ThreadlineError('connection', 'the socket could not be opened', { code }) };
    }
    return { kind: 'retry', error };
  }

  // ------------------------------------------------------------------ frames

  #onText(conn: Conn, text: string): void {
    let f: { type?: string; [k: string]: unknown };
    try {
      f = JSON.parse(text);
    } catch {
      return this.#endConn(conn, { kind: 'retry', error: new ThreadlineError('connection', 'an unreadable frame') });
    }
    switch (f.type) {
      case 'welcome':
        return this.#onWelcome(conn, Number(f.resume_after));
      case 'event':
        return this.#onEvent(conn, f as unknown as ThreadlineEvent);
      case 'caught_up':
        return this.#onCaughtUp(conn, Number(f.user_seq));
      case 'pong':
        return this.#onPong(conn);
      case 'refreshed':
        if (conn.offered !== null) this.#token = conn.offered;
        conn.offered = null;
        this.#exp = Number(f.exp);
        return this.#scheduleRenewal(conn);
      case 'error': {
        const code = String(f.code ?? '');
        const message = String(f.message ?? '');
        const error = new ThreadlineError('server', `server error ${code}: ${message}`, { code });
        if (code === 'invalid_ack') {
          conn.refusedAck = message;
          this.#report(error);
        } else if (code === 'invalid_token') {
          // The renewal was refused; the old token holds until its exp.
          conn.offered = null;
          this.#retryRenew(conn);
          this.#report(error);
        } else if (code === 'invalid_message') {
          this.#report(error);
        } else {
          conn.held = { code, message };
        }
        return;
      }
      default:
        return; // A frame of a later protocol version.
    }
  }

  #onWelcome(conn: Conn, resumedAfter: number): void {
    if (conn.welcomed) return;
    if (conn.asked !== null && conn.asked !== resumedAfter) {
      return this.#endConn(conn, {
        kind: 'retry',
        error: new ThreadlineError(
          'resume_mismatch',
          `asked to resume after ${conn.asked}, the server resumed after ${resumedAfter}`,
          { expected: conn.asked, got: resumedAfter },
        ),
      });
    }
    clearTimeout(conn.timers.connect);
    conn.welcomed = true;
    conn.resumedAfter = resumedAfter;
    this.#authRefusals = 0;
    if (this.#last === null) {
      this.#last = resumedAfter;
      if (this.#opts.threadId !== undefined && resumedAfter === 0) this.#lastVersion = 0;
    }
    if (conn.asked === null && this.#opts.after === undefined) {
      // Resumed after the durable cursor: that much is acknowledged already.
      this.#durable = Math.max(this.#durable, resumedAfter);
      conn.acked = Math.max(conn.acked, this.#durable);
    }
    this.#setState('replaying');
    this.#armKeepalive(conn);
    this.#scheduleRenewal(conn);
    // Acks sent on an earlier connection and not confirmed are sent again.
    this.#considerAck();
    this.#ensureFlush(conn);
  }

  /** Open streamed messages, by id: they leave when complete or when their run ends. */
  #messages = new Map<string, MessageText>();

  #accumulate(e: ThreadlineEvent): void {
    if (isTerminal(e)) {
      for (const [id, m] of this.#messages) if (m.run_id === e.run_id) this.#messages.delete(id);
      return;
    }
    if (e.event !== 'message_started' && e.event !== 'message_delta' && e.event !== 'message_completed') return;
    const data = e.data as { message_id: string; seq?: number; from_seq?: number; text?: string };
    let m = this.#messages.get(data.message_id);
    if (!m) {
      const first = data.from_seq ?? data.seq ?? 0;
      m = {
        message_id: data.message_id,
        run_id: e.run_id,
        delta: '',
        text: '',
        seq: 0,
        complete: false,
        partial: e.event !== 'message_started' && first > 1,
      };
      this.#messages.set(data.message_id, m);
    }
    m.delta = data.text ?? '';
    m.text += m.delta;
    if (data.seq !== undefined) m.seq = data.seq;
    m.complete = e.event === 'message_completed';
    if (m.complete) this.#messages.delete(data.message_id);
    const onDelta = this.#opts.onDelta;
    if (onDelta) {
      try {
        onDelta({ ...m }, e);
      } catch {
        // A throwing callback must not break the sequence.
      }
    }
  }

  #onEvent(conn: Conn, e: ThreadlineEvent): void {
    if (!conn.welcomed) return;
    const last = this.#last ?? 0;
    const seq = e.user_seq;
    // A merged frame covers from_user_seq..=user_seq: it must begin where the last ended.
    const from = e.from_user_seq ?? seq;
    let error: ThreadlineError | null = null;
    if (seq <= last || from <= last) {
      error = new ThreadlineError('duplicate', `duplicate: user_seq ${from} after ${last}; resuming after ${last}`, {
        got: from,
        expected: last + 1,
        resumeAfter: last,
      });
    } else if (this.#opts.threadId === undefined) {
      if (from !== last + 1 || seq < from) {
        error = new ThreadlineError('gap', `gap: expected user_seq ${last + 1}, got ${from}; resuming after ${last}`, {
          expected: last + 1,
          got: from,
          resumeAfter: last,
        });
      }
    } else if (
      this.#lastVersion !== null &&
      (e.from_thread_version ?? e.thread_version) !== this.#lastVersion + 1
    ) {
      error = new ThreadlineError(
        'version_gap',
        `thread_version ${e.thread_version} after ${this.#lastVersion}; resuming after user_seq ${last}`,
        { expected: this.#lastVersion + 1, got: e.thread_version, resumeAfter: last },
      );
    }
    if (error) return this.#endConn(conn, { kind: 'retry', error });
    this.#last = seq;
    this.#lastVersion = e.thread_version;
    conn.progressed = true;
    this.#accumulate(e);
    this.#emit('event', e);
    if (this.#iterating) {
      if (this.#waiting) {
        const w = this.#waiting;
        this.#waiting = null;
        this.#delivered = seq;
        if (this.#mode === 'delivery') this.ack(seq);
        w({ value: e, done: false });
      } else {
        this.#queue.push(e);
        if (this.#queue.length >= this.#highWater && !this.#paused) {
          // The consumer is behind: stop this socket; the log keeps the rest.
          this.#paused = true;
          this.#endConn(conn, {
            kind: 'retry',
            error: new ThreadlineError('connection', 'paused: the consumer is behind'),
          });
        }
      }
    } else {
      this.#delivered = seq;
      if (this.#mode === 'delivery') this.ack(seq);
    }
  }

  #onCaughtUp(conn: Conn, userSeq: number): void {
    const last = this.#last ?? 0;
    const beyond = this.#opts.threadId === undefined ? userSeq !== last : userSeq < last;
    if (beyond) {
      return this.#endConn(conn, {
        kind: 'retry',
        error: new ThreadlineError('caught_up_beyond', `caught_up at ${userSeq} but the last event was ${last}`, {
          expected: last,
          got: userSeq,
        }),
      });
    }
    conn.progressed = true;
    this.#emit('caughtUp', userSeq);
    this.#setState('live');
  }

  // ------------------------------------------------------------------ acks

  #considerAck(): void {
    const conn = this.#conn;
    if (!conn?.welcomed || this.#mode === 'off' || this.#handled <= conn.acked) return;
    if (this.#handled - conn.acked >= this.#maxEvents) return this.#sendAck(conn);
    if (conn.timers.ack === undefined) {
      conn.timers.ack = setTimeout(() => {
        conn.timers.ack = undefined;
        if (!conn.ended) this.#sendAck(conn);
      }, this.#maxDelayMs);
    }
  }

  #sendAck(conn: Conn): void {
    clearTimeout(conn.timers.ack);
    conn.timers.ack = undefined;
    const handled = this.#handled;
    if (this.#mode === 'off' || handled <= conn.acked) return;
    // A filtered connection may ack only what it delivered itself.
    if (this.#opts.threadId !== undefined && handled <= conn.resumedAfter) return;
    if (this.#send(conn, { type: 'ack', user_seq: handled })) conn.acked = handled;
  }

  #ping(conn: Conn): void {
    if (this.#send(conn, { type: 'ping' })) {
      conn.pings.push({ acked: conn.acked, at: Date.now() });
      this.#armKeepalive(conn);
    }
  }

  #ensureFlush(conn: Conn): void {
    if (!this.#flushes.length || !conn.welcomed) return;
    const target = Math.max(...this.#flushes.map((f) => f.target));
    this.#sendAck(conn);
    if (conn.acked < target) {
      // Delivered on an earlier connection, not ackable on this filtered one.
      this.#flushes = this.#flushes.filter((f) => {
        if (f.target <= conn.acked) return true;
        if (f.target <= this.#durable) f.resolve(this.#durable);
        else f.reject(new ThreadlineError('flush_interrupted', 'the connection dropped before the ack was confirmed'));
        return false;
      });
      if (!this.#flushes.length) return;
    }
    const lastPing = conn.pings[conn.pings.length - 1];
    if (!lastPing || lastPing.acked < conn.acked) this.#ping(conn);
  }

  #onPong(conn: Conn): void {
    const ping = conn.pings.shift();
    if (!ping) return;
    if (conn.refusedAck !== null) {
      const reason = conn.refusedAck;
      conn.refusedAck = null;
      this.#flushes = this.#flushes.filter((f) => {
        if (f.target <= ping.acked && f.target > this.#durable) {
          f.reject(new ThreadlineError('ack_refused', `an ack was refused: ${reason}`));
          return false;
        }
        return true;
      });
    } else {
      this.#durable = Math.max(this.#durable, ping.acked);
    }
    this.#flushes = this.#flushes.filter((f) => {
      if (f.target <= this.#durable) {
        f.resolve(this.#durable);
        return false;
      }
      return true;
    });
    if (this.#closing && conn.pings.length === 0) this.#endConn(conn, { kind: 'stop' });
  }

  #send(conn: Conn, msg: object): boolean {
    if (conn.ended || conn.ws.readyState !== OPEN) return false;
    try {
      conn.ws.send(JSON.stringify(msg));
      return true;
    } catch {
      return false;
    }
  }

  // ------------------------------------------------------------------ liveness

  /** With no ping out: ping after keepaliveMs of silence. With one out: the connection
   *  is dead after keepaliveMs more without a frame. */
  #armKeepalive(conn: Conn): void {
    clearTimeout(conn.timers.keepalive);
    if (conn.ended) return;
    const deadline = () => {
      const first = conn.pings[0];
      return (first ? Math.max(conn.lastRx, first.at) : conn.lastRx) + this.#keepaliveMs;
    };
    const check = () => {
      if (conn.ended) return;
      const left = deadline() - Date.now();
      if (left > 0) {
        // Something arrived meanwhile: wait for the rest.
        conn.timers.keepalive = setTimeout(check, left);
      } else if (conn.pings.length) {
        this.#endConn(conn, {
          kind: 'retry',
          error: new ThreadlineError('timeout', `no answer within ${this.#keepaliveMs} ms: the connection is presumed dead`),
        });
      } else {
        this.#ping(conn);
      }
    };
    conn.timers.keepalive = setTimeout(check, Math.max(0, deadline() - Date.now()));
  }

  // ------------------------------------------------------------------ token renewal

  /** Renews a quarter of the token's remaining life before exp (between 1 s and 60 s). */
  #scheduleRenewal(conn: Conn): void {
    clearTimeout(conn.timers.renew);
    conn.timers.renew = undefined;
    if (typeof this.#opts.token === 'string' || this.#exp === undefined) return;
    const left = Math.max(0, this.#exp * 1000 - Date.now());
    const margin = Math.min(60_000, Math.max(1000, left / 4));
    this.#armRenew(conn, Math.max(0, left - margin));
  }

  /**
   * Asks again after a second, or after a quarter of the current token's remaining life
   * when that is shorter: a fixed second could land the retry past `exp` (a two-second
   * token renewed one second before it), and the server would close the socket (4001).
   */
  #retryRenew(conn: Conn): void {
    const left = this.#exp === undefined ? Infinity : this.#exp * 1000 - Date.now();
    this.#armRenew(conn, Math.max(RENEW_RETRY_MIN_MS, Math.min(RENEW_RETRY_MS, left / 4)));
  }

  #armRenew(conn: Conn, delay: number): void {
    clearTimeout(conn.timers.renew);
    conn.timers.renew = setTimeout(() => void this.#renew(conn), delay);
  }

  async #renew(conn: Conn): Promise<void> {
    const source = this.#opts.token;
    if (conn.ended || conn.renewing || typeof source === 'string') return;
    conn.renewing = true;
    let token: string;
    try {
      token = await source();
    } catch (e) {
      conn.renewing = false;
      if (conn.ended) return;
      this.#report(new ThreadlineError('token', `token provider: ${String(e)}`));
      return this.#retryRenew(conn);
    }
    conn.renewing = false;
    if (conn.ended) return;
    const exp = tokenExpiry(token);
    if (exp !== undefined && (this.#exp === undefined || exp > this.#exp)) {
      if (this.#send(conn, { type: 'refresh', token })) conn.offered = token;
    } else {
      // Not newer than the current one (a provider caching its token, or one minted in
      // the same second): ask again shortly.
      this.#retryRenew(conn);
    }
  }
}
