// Threadline console: plain JavaScript, no build step, no dependency.
// Invariant: the auditor token lives only in sessionStorage and travels only in an
// Authorization header; it is never put in a URL, a log line or another storage.
'use strict';

const KEY = 'threadline.console.token';
const PAGE = 200; // events per audit call while paging
const MAX_ROWS = 20000; // rows kept in the timeline; older ones are dropped (memory bound)
const ROW_H = 28; // px, must match --row in app.css
const LIVE_MS = 1000;
const $ = (id) => document.getElementById(id);

// ---------- API ----------
class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, params = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) {
    if (v !== '' && v !== undefined && v !== null) url.searchParams.set(k, String(v));
  }
  const res = await fetch(url, {
    headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY) ?? ''}` },
    cache: 'no-store',
  });
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  if (res.status === 401) {
    signOut('The server refused the token (expired or invalid). Sign in again.');
  }
  if (!res.ok) {
    throw new ApiError(res.status, body?.error?.code ?? String(res.status), body?.error?.message ?? res.statusText);
  }
  return body;
}

// ---------- helpers ----------
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ''));
  return e;
}

function table(headers, rows) {
  return el('table', {},
    el('thead', {}, el('tr', {}, ...headers.map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, ...rows));
}

const time = (iso) => (iso ? iso.replace('T', ' ').replace('Z', '') : '—');
const localToIso = (v) => (v ? new Date(v).toISOString() : '');

function claims(jwt) {
  try {
    const body = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(body));
  } catch { return {}; }
}

// ---------- sign in ----------
function showApp(on) {
  $('signin').hidden = on;
  $('app').hidden = !on;
  $('nav').hidden = !on;
  $('signout').hidden = !on;
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  stopLive();
  clearInterval(healthTimer);
  clearInterval(ledgerTimer);
  showApp(false);
  $('who').textContent = '';
  $('signin-error').textContent = message ?? '';
  $('token').focus();
}

async function signIn(jwt) {
  sessionStorage.setItem(KEY, jwt);
  try {
    await api('/v1/audit/events', { limit: 1 });
  } catch (e) {
    sessionStorage.removeItem(KEY);
    $('signin-error').textContent = e.status === 403
      ? 'This token is valid but not an auditor\'s: mint one with --role auditor.'
      : `Sign-in failed: ${e.message}`;
    return false;
  }
  start();
  return true;
}

function start() {
  const c = claims(sessionStorage.getItem(KEY));
  const exp = c.exp ? ` · token expires ${new Date(c.exp * 1000).toISOString().slice(0, 19).replace('T', ' ')} UTC` : '';
  $('who').textContent = `Signed in as ${c.sub ?? '?'} (${c.role ?? '?'})${exp}`;
  $('signin-error').textContent = '';
  showApp(true);
  selectTab('timeline');
  applyFilters();
  refreshHealth();
  healthTimer = setInterval(refreshHealth, 2000);
}

// ---------- tabs ----------
const TABS = ['timeline', 'thread', 'ledger', 'health'];
function selectTab(name, focus = false) {
  for (const t of TABS) {
    const tab = $(`tab-${t}`);
    const on = t === name;
    tab.setAttribute('aria-selected', String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`view-${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  if (name === 'timeline') renderRows();
}

// ---------- timeline (paged, virtually windowed) ----------
const tl = {
  rows: [], // envelopes, in log order
  next: 0, // next_after of the last page
  filters: {},
  busy: null,
  end: false,
  dropped: 0,
  active: -1,
  fresh: new Set(),
  gen: 0, // bumped when the filters change: a page fetched for older filters is dropped
  loading: null, // the gen a load is running for
};

function readFilters() {
  const f = new FormData($('filters'));
  return {
    user_id: f.get('user_id').trim(),
    thread_id: f.get('thread_id').trim(),
    run_id: f.get('run_id').trim(),
    type: f.get('type'),
    since: localToIso(f.get('since')),
    until: localToIso(f.get('until')),
    after: Number(f.get('after') || 0),
  };
}

function applyFilters() {
  const { after, ...filters } = readFilters();
  tl.filters = filters;
  tl.rows = [];
  tl.next = after;
  tl.end = false;
  tl.dropped = 0;
  tl.active = -1;
  tl.fresh.clear();
  tl.gen++;
  $('timeline').scrollTop = 0;
  renderRows();
  return loadPage();
}

/** One audit call after `tl.next`; serialized so paging and live polls never overlap. */
function fetchMore(limit) {
  const gen = tl.gen;
  const run = async () => {
    if (gen !== tl.gen) return { stale: true };
    const page = await api('/v1/audit/events', { ...tl.filters, after: tl.next, limit });
    if (gen !== tl.gen) return { stale: true };
    const progressed = page.next_after > tl.next || page.events.length > 0;
    tl.next = Math.max(tl.next, page.next_after);
    append(page.events);
    return { page, progressed };
  };
  tl.busy = (tl.busy ?? Promise.resolve()).then(run, run);
  return tl.busy;
}

async function loadPage() {
  const gen = tl.gen;
  if (tl.loading === gen) return; // one load at a time per set of filters
  tl.loading = gen;
  const status = $('timeline-status');
  try {
    // A rare filter may scan a stretch of the log without a match: keep going a few calls.
    for (let i = 0; i < 8; i++) {
      const before = tl.rows.length;
      const { progressed, stale } = await fetchMore(PAGE);
      if (stale) return;
      if (!progressed) { tl.end = true; break; }
      if (tl.rows.length > before) break;
    }
    status.textContent = `${tl.rows.length + tl.dropped} events loaded (examined up to position ${tl.next})` +
      (tl.dropped ? `; the ${tl.dropped} oldest were dropped to stay light (set “After position” to revisit them)` : '') +
      (tl.end ? '; end of the history so far.' : '.');
  } catch (e) {
    status.textContent = `Could not load events: ${e.message}`;
  } finally {
    if (tl.loading === gen) tl.loading = null;
  }
}

function append(events) {
  if (events.length === 0) return;
  const grid = $('timeline');
  const atBottom = grid.scrollTop + grid.clientHeight >= grid.scrollHeight - ROW_H;
  tl.rows.push(...events);
  if (tl.rows.length > MAX_ROWS) {
    const drop = tl.rows.length - MAX_ROWS;
    tl.rows.splice(0, drop);
    tl.dropped += drop;
    tl.active = Math.max(-1, tl.active - drop);
    grid.scrollTop = Math.max(0, grid.scrollTop - drop * ROW_H);
  }
  renderRows();
  if (live && atBottom) grid.scrollTop = grid.scrollHeight;
}

function renderRows() {
  const grid = $('timeline');
  if (grid.offsetParent === null) return; // hidden: render when shown
  const spacer = grid.querySelector('.spacer');
  spacer.style.height = `${tl.rows.length * ROW_H}px`;
  grid.setAttribute('aria-rowcount', String(tl.rows.length));
  for (const r of grid.querySelectorAll('.row')) r.remove();
  const first = Math.max(0, Math.floor(grid.scrollTop / ROW_H) - 5);
  const last = Math.min(tl.rows.length, Math.ceil((grid.scrollTop + grid.clientHeight) / ROW_H) + 5);
  const frag = document.createDocumentFragment();
  for (let i = first; i < last; i++) {
    const e = tl.rows[i];
    const row = el('div', {
      class: `row${tl.fresh.has(e.position) ? ' new' : ''}`,
      role: 'row',
      id: `row-${i}`,
      'aria-rowindex': String(i + 1),
      'data-position': String(e.position),
      'aria-selected': String(i === tl.active),
      onclick: () => { tl.active = i; openDetail(e); },
    },
    el('span', { role: 'gridcell' }, String(e.position)),
    el('span', { role: 'gridcell' }, time(e.recorded_at)),
    el('span', { role: 'gridcell' }, e.user_id),
    el('span', { role: 'gridcell' }, e.thread_id),
    el('span', { role: 'gridcell' }, e.run_id ?? '—'),
    el('span', { role: 'gridcell' }, e.event),
    el('span', { role: 'gridcell' }, `${e.actor?.role}:${e.actor?.sub}`));
    row.style.top = `${i * ROW_H}px`;
    frag.append(row);
  }
  grid.append(frag);
  if (tl.active >= first && tl.active < last) grid.setAttribute('aria-activedescendant', `row-${tl.active}`);
  else grid.removeAttribute('aria-activedescendant');
}

function onGridScroll() {
  renderRows();
  const grid = $('timeline');
  if (!tl.end && !live && grid.scrollTop + grid.clientHeight >= grid.scrollHeight - 5 * ROW_H) loadPage();
}

function onGridKey(ev) {
  const grid = $('timeline');
  const visible = Math.max(1, Math.floor(grid.clientHeight / ROW_H));
  const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: visible, PageUp: -visible, Home: -Infinity, End: Infinity };
  if (ev.key in moves) {
    ev.preventDefault();
    tl.active = Math.min(tl.rows.length - 1, Math.max(0, (tl.active < 0 ? -1 : tl.active) + moves[ev.key]));
    const top = tl.active * ROW_H;
    if (top < grid.scrollTop) grid.scrollTop = top;
    else if (top + ROW_H > grid.scrollTop + grid.clientHeight) grid.scrollTop = top + ROW_H - grid.clientHeight;
    renderRows();
    if (tl.active === tl.rows.length - 1 && !tl.end) loadPage();
  } else if (ev.key === 'Enter' && tl.active >= 0) {
    ev.preventDefault();
    openDetail(tl.rows[tl.active]);
  }
}

// ---------- live tail ----------
let live = false;
let liveTimer = null;

async function startLive() {
  live = true;
  const ready = await fetch('/readyz', { cache: 'no-store' }).then((r) => r.json()).catch(() => null);
  // Far behind the head: jump to the tail rather than page through the whole history.
  if (ready && ready.projected - tl.next > 5 * PAGE) {
    tl.rows = [];
    tl.dropped = 0;
    tl.active = -1;
    tl.next = Math.max(0, ready.projected - 50);
    $('timeline-status').textContent = `Live: following from position ${tl.next}.`;
  }
  const poll = async () => {
    if (!live) return;
    try {
      const before = new Set(tl.rows.slice(-1000).map((e) => e.position));
      await fetchMore(1000);
      for (const e of tl.rows.slice(-1000)) if (!before.has(e.position)) tl.fresh.add(e.position);
      // Only the newest highlights are kept (a Set iterates in insertion order).
      for (const p of tl.fresh) { if (tl.fresh.size <= 1000) break; tl.fresh.delete(p); }
      renderRows();
      $('timeline-status').textContent = `Live: ${tl.rows.length} events shown, up to position ${tl.next}.`;
    } catch (e) {
      $('timeline-status').textContent = `Live tail paused: ${e.message}`;
    }
    if (live) liveTimer = setTimeout(poll, LIVE_MS);
  };
  poll();
}

function stopLive() {
  live = false;
  clearTimeout(liveTimer);
  if ($('live')) $('live').checked = false;
}

// ---------- event detail ----------
let returnFocus = null;
function openDetail(obj) {
  returnFocus = document.activeElement;
  $('detail-h').textContent = obj.position ? `Event at position ${obj.position}` : 'Event';
  $('detail-json').textContent = JSON.stringify(obj, null, 2);
  const actions = $('detail').querySelector('.actions') ?? el('p', { class: 'actions' });
  actions.replaceChildren();
  if (obj.thread_id) {
    actions.append(
      el('button', { type: 'button', onclick: () => { closeDetail(); openThread(obj.thread_id); } }, 'Open its thread'), ' ',
      el('button', { type: 'button', onclick: () => { closeDetail(); openLedger(obj.thread_id); } }, 'Its delivery ledger'), ' ',
      el('button', {
        type: 'button',
        onclick: () => {
          closeDetail();
          selectTab('timeline');
          $('filters').elements.thread_id.value = obj.thread_id;
          $('filters').requestSubmit();
        },
      }, 'Only this thread in the timeline'));
  }
  $('detail-close').after(actions);
  $('detail').hidden = false;
  $('detail-close').focus();
}

function closeDetail() {
  $('detail').hidden = true;
  returnFocus?.focus?.();
}

// ---------- thread view ----------
async function openThread(threadId) {
  selectTab('thread');
  $('thread-form').elements.thread_id.value = threadId;
  const out = $('thread-out');
  out.replaceChildren(el('p', { class: 'status' }, 'Loading…'));
  try {
    const thread = await api(`/v1/threads/${encodeURIComponent(threadId)}`);
    const events = [];
    let after = 0;
    // A thread's events, a page at a time, at most 5000 shown.
    for (let i = 0; i < 5; i++) {
      const page = await api(`/v1/threads/${encodeURIComponent(threadId)}/events`, { after_version: after, limit: 1000 });
      events.push(...page.events);
      if (page.events.length < 1000) break;
      after = page.next_after_version;
    }
    renderThread(thread, events);
  } catch (e) {
    out.replaceChildren(el('p', { class: 'error', role: 'alert' }, `Could not open the thread: ${e.message}`));
  }
}

function lifecycle(events) {
  const parts = [];
  for (const e of events) {
    const last = parts[parts.length - 1];
    if (last && last.event === e.event) last.n++;
    else parts.push({ event: e.event, n: 1 });
  }
  return parts.map((p) => (p.n > 1 ? `${p.event} ×${p.n}` : p.event)).join(' → ');
}

function toolCalls(events) {
  const calls = new Map();
  for (const e of events) {
    const id = e.data?.tool_call_id;
    if (!id) continue;
    const c = calls.get(id) ?? { id, tool: e.data?.tool ?? e.data?.name ?? '', started: null, done: null };
    if (e.event === 'tool_executing') c.started = e;
    if (e.event === 'tool_completed') c.done = e;
    calls.set(id, c);
  }
  return [...calls.values()];
}

function renderThread(thread, events) {
  const out = $('thread-out');
  const byRun = new Map();
  for (const e of events) if (e.run_id) (byRun.get(e.run_id) ?? byRun.set(e.run_id, []).get(e.run_id)).push(e);
  const runRows = thread.runs.map((r) => {
    const evs = byRun.get(r.run_id) ?? [];
    const calls = toolCalls(evs);
    const pairs = calls.length === 0 ? '—' : el('ul', {}, ...calls.map((c) => el('li', {},
      `${c.id}${c.tool ? ` (${c.tool})` : ''}: `,
      c.started ? `executing @${c.started.position}` : 'no tool_executing',
      ' → ',
      c.done ? el('span', { class: 'acked' }, `completed @${c.done.position}`) : el('span', { class: 'unacked' }, 'open'))));
    return el('tr', {},
      el('td', {}, r.run_id), el('td', {}, r.agent_name),
      el('td', {}, el('span', { class: 'pill' }, r.status)),
      el('td', {}, time(r.registered_at)), el('td', {}, lifecycle(evs)), el('td', {}, pairs));
  });
  const eventRows = events.map((e) => el('tr', {},
    el('td', {}, String(e.thread_version)), el('td', {}, String(e.position)), el('td', {}, String(e.user_seq)),
    el('td', {}, e.run_id ?? '—'),
    el('td', {}, el('button', { type: 'button', class: 'link', onclick: () => openDetail(e) }, e.event)),
    el('td', {}, time(e.recorded_at))));
  out.replaceChildren(
    el('h2', {}, `Thread ${thread.thread_id}`),
    el('p', {}, `Owner ${thread.user_id} · title ${thread.title ?? '—'} · created ${time(thread.created_at)} · ` +
      (events.length === 5000 ? `the first 5000 of ${thread.version} events (the timeline, filtered by this thread, pages through all)` : `${events.length} events`)),
    el('p', {}, el('button', { type: 'button', onclick: () => openLedger(thread.thread_id) }, 'Delivery ledger of this thread')),
    el('h3', {}, 'Runs'),
    table(['Run', 'Agent', 'Status', 'Registered', 'Lifecycle', 'Tool calls'], runRows),
    el('h3', {}, 'Events'),
    table(['Version', 'Position', 'user_seq', 'Run', 'Event', 'Recorded'], eventRows));
}

// ---------- delivery ledger ----------
let ledgerTimer = null;
let ledgerQuery = null;
const LEDGER_PAGE = 500;
let ledgerPages = [0]; // the `after` of each page shown so far: the last one is the current page

async function openLedger(threadId, clientId = '') {
  selectTab('ledger');
  const form = $('ledger-form');
  form.elements.thread_id.value = threadId;
  form.elements.client_id.value = clientId;
  ledgerQuery = { thread_id: threadId, client_id: clientId };
  ledgerPages = [0];
  await refreshLedger(true);
  clearInterval(ledgerTimer);
  ledgerTimer = setInterval(() => {
    if ($('ledger-live').checked && !$('view-ledger').hidden) refreshLedger(false);
  }, 2000);
}

async function refreshLedger(loading) {
  if (!ledgerQuery) return;
  const out = $('ledger-out');
  if (loading) out.replaceChildren(el('p', { class: 'status' }, 'Loading…'));
  try {
    const after = ledgerPages[ledgerPages.length - 1];
    const page = await api('/v1/audit/deliveries', { ...ledgerQuery, after, limit: LEDGER_PAGE });
    renderLedger(page, after);
  } catch (e) {
    out.replaceChildren(el('p', { class: 'error', role: 'alert' }, `Could not read the ledger: ${e.message}`));
  }
}

function ledgerPager(page, after) {
  const nav = el('p', { class: 'pager' });
  if (ledgerPages.length > 1) {
    nav.append(el('button', { type: 'button', id: 'ledger-prev', onclick: () => { ledgerPages.pop(); refreshLedger(true); } }, 'Previous events'), ' ');
  }
  if (page.thread.events.length === LEDGER_PAGE) {
    nav.append(el('button', { type: 'button', id: 'ledger-next', onclick: () => { ledgerPages.push(page.next_after); refreshLedger(true); } }, 'Next events'));
  }
  nav.prepend(`Events after position ${after}. `);
  return nav;
}

function renderLedger(page, after) {
  const t = page.thread;
  const clients = t.clients.map((c) => c.client_id);
  const unackedBy = Object.fromEntries(clients.map((c) => [c, 0]));
  for (const e of t.events) for (const c of e.unacked) unackedBy[c]++;
  const clientRows = t.clients.map((c) => el('tr', { 'data-client': c.client_id },
    el('th', { scope: 'row' }, c.client_id),
    el('td', {}, String(c.acked_user_seq)),
    el('td', {}, time(c.acked_at)),
    el('td', {}, String(c.position)),
    el('td', { class: unackedBy[c.client_id] ? 'unacked' : 'acked' }, String(unackedBy[c.client_id])),
    el('td', {}, String(Math.max(0, t.user_head - c.acked_user_seq)))));
  const eventRows = t.events.map((e) => {
    const acks = Object.fromEntries(e.acks.map((a) => [a.client_id, a]));
    return el('tr', { 'data-position': String(e.position) },
      el('td', {}, String(e.position)), el('td', {}, String(e.user_seq)), el('td', {}, String(e.thread_version)),
      el('td', {}, e.event), el('td', {}, time(e.recorded_at)),
      ...clients.map((c) => (acks[c]
        ? el('td', { class: 'acked', 'data-client': c }, `✓ ${time(acks[c].acked_at)} (ack @${acks[c].position})`)
        : el('td', { class: 'unacked', 'data-client': c }, 'not acknowledged'))));
  });
  $('ledger-out').replaceChildren(
    el('h2', {}, `Delivery ledger of ${t.thread_id}`),
    el('p', {}, `Owner ${t.user_id}, whose last user_seq is ${t.user_head}. ${t.events.length} events of this thread shown` +
      ' (unacknowledged counts are of the events shown).'),
    clients.length === 0
      ? el('p', { class: 'unacked', id: 'no-clients' }, 'No client of this user has acknowledged anything yet.')
      : table(['Client', 'Acked up to user_seq', 'Acked at', 'Ack position', 'Unacked events shown', 'Unacked events of the user'], clientRows),
    el('h3', {}, 'Events and their acks'),
    ledgerPager(page, after),
    table(['Position', 'user_seq', 'Version', 'Event', 'Recorded', ...clients], eventRows));
}

// ---------- health ----------
let healthTimer = null;
let lastHead = null;

async function refreshHealth() {
  try {
    const ready = await fetch('/readyz', { cache: 'no-store' }).then((r) => r.json());
    const metrics = await fetch('/metrics', { cache: 'no-store' }).then((r) => r.text());
    const metric = (name) => metrics.split('\n')
      .filter((l) => l.startsWith(name) && (l[name.length] === ' ' || l[name.length] === '{'))
      .reduce((sum, l) => sum + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
    const now = performance.now();
    const rate = lastHead && now > lastHead.at
      ? ((ready.head - lastHead.head) * 1000) / (now - lastHead.at) : null;
    lastHead = { head: ready.head, at: now };
    const items = [
      ['Ready', ready.ready ? 'yes' : `no: ${ready.reason ?? ''}`],
      ['Log head (position)', ready.head],
      ['Projected position', ready.projected],
      ['Projection lag (events)', Math.max(0, ready.head - ready.projected)],
      ['Sockets connected', metric('threadline_sockets_connected')],
      ['Ingest rate (events/s)', rate === null ? 'measuring…' : rate.toFixed(1)],
      ['Appends since start', metric('threadline_appends_total')],
      ['Checked at', new Date().toISOString().slice(11, 19)],
    ];
    $('health').replaceChildren(...items.flatMap(([k, v]) => [el('dt', {}, k), el('dd', { 'data-key': k }, String(v))]));
  } catch (e) {
    $('health').replaceChildren(el('dt', {}, 'Unreachable'), el('dd', {}, e.message));
  }
}

// ---------- wiring ----------
document.addEventListener('DOMContentLoaded', () => {
  $('signin-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const input = $('token');
    const jwt = input.value.trim();
    input.value = '';
    if (jwt) await signIn(jwt);
  });
  $('signout').addEventListener('click', () => signOut('Signed out.'));
  $('filters').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const wasLive = live;
    stopLive();
    applyFilters().then(() => { if (wasLive) { $('live').checked = true; startLive(); } });
  });
  $('live').addEventListener('change', (ev) => (ev.target.checked ? startLive() : stopLive()));
  $('more').addEventListener('click', () => loadPage());
  $('timeline').addEventListener('scroll', onGridScroll, { passive: true });
  $('timeline').addEventListener('keydown', onGridKey);
  $('thread-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    openThread(ev.target.elements.thread_id.value.trim());
  });
  $('ledger-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    openLedger(ev.target.elements.thread_id.value.trim(), ev.target.elements.client_id.value.trim());
  });
  $('detail-close').addEventListener('click', closeDetail);
  document.addEventListener('keydown', (ev) => { if (ev.key === 'Escape' && !$('detail').hidden) closeDetail(); });
  for (const t of TABS) $(`tab-${t}`).addEventListener('click', () => selectTab(t));
  $('tabs').addEventListener('keydown', (ev) => {
    const i = TABS.findIndex((t) => $(`tab-${t}`).getAttribute('aria-selected') === 'true');
    const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
    if (step) selectTab(TABS[(i + step + TABS.length) % TABS.length], true);
  });
  window.addEventListener('resize', renderRows);
  if (sessionStorage.getItem(KEY)) start();
  else showApp(false);
});
