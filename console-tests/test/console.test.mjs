// The console in a real browser (Debian's headless Chromium, driven by playwright-core)
// against the real `threadline` binary: sign in, filter, event detail, thread view, a
// live event arriving, an ack appearing in the delivery ledger, paging through history,
// the health panel. Each view's screenshot goes to docs/console/ (shown by docs/console.md).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { WebSocket } from 'ws';
import { DEADLINE_MS, Server, token, waitFor } from './harness.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const shots = resolve(here, '..', '..', 'docs', 'console');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const AGENT = token('bot', 'agent');
const AUDITOR = token('ada', 'auditor');
const AXE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

let server;
let browser;
let page;
let base;
const seeded = {};

/** Saves the view's screenshot and checks it with axe-core: WCAG 2 A, AA and AAA rules
 * (AAA includes text contrast of at least 7:1), no violation allowed. */
async function shot(name) {
  await page.screenshot({ path: join(shots, `${name}.png`) });
  const loaded = await page.evaluate(() => typeof window.axe === 'object');
  if (!loaded) await page.evaluate(AXE); // evaluated by the driver, not subject to the page's CSP
  const violations = await page.evaluate(async () => {
    const r = await window.axe.run(document, { runOnly: ['wcag2a', 'wcag2aa', 'wcag2aaa', 'best-practice'] });
    return r.violations.map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(' ')).slice(0, 3).join(', ')})`);
  });
  assert.deepEqual(violations, [], `accessibility of ${name}`);
}

/** The rows the virtual grid currently renders, as {position, thread, event}. */
async function renderedRows() {
  return page.$$eval('#timeline .row', (rows) => rows.map((r) => ({
    position: Number(r.dataset.position),
    thread: r.children[3].textContent,
    event: r.children[5].textContent,
    fresh: r.classList.contains('new'),
  })));
}

async function agentRun(user, events) {
  const [, t] = await server.post(AGENT, '/v1/threads', { user_id: user, title: `${user}'s thread` });
  const [, r] = await server.post(AGENT, `/v1/threads/${t.thread_id}/runs`, { agent_name: 'planner' });
  for (const [type, data] of events) {
    const [status, body] = await server.post(AGENT, `/v1/runs/${r.run_id}/events`, { type, data });
    assert.equal(status, 201, JSON.stringify(body));
  }
  return { thread: t.thread_id, run: r.run_id };
}

describe('console', () => {
  before(async () => {
    mkdirSync(shots, { recursive: true });
    server = await Server.start();
    base = `http://${server.addr}`;
    seeded.alice = await agentRun('alice', [
      ['agent_started', {}],
      ['agent_thinking', { text: 'looking for flights' }],
      ['tool_executing', { tool_call_id: 'call-1', tool: 'search' }],
      ['tool_completed', { tool_call_id: 'call-1', result: '3 flights' }],
      ['tool_executing', { tool_call_id: 'call-2', tool: 'book' }],
    ]);
    seeded.bob = await agentRun('bob', [['agent_started', {}], ['agent_completed', { text: 'done' }]]);
    // A longer history to page through: 700 more events.
    seeded.carol = await agentRun('carol', [['agent_started', {}]]);
    for (let first = 0; first < 700; first += 350) {
      const events = Array.from({ length: 350 }, (_, k) => ({
        run_id: seeded.carol.run, type: 'agent_thinking', data: { i: first + k },
      }));
      const [status] = await server.post(AGENT, '/v1/events', { events });
      assert.equal(status, 201);
    }
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.setDefaultTimeout(DEADLINE_MS);
  });

  after(async () => {
    await browser?.close();
    await server?.dispose();
  });

  test('signs in with an auditor token kept only in sessionStorage', async () => {
    await page.goto(`${base}/console`);
    await page.locator('#signin').waitFor();
    await shot('sign-in');
    // A valid token of another role is refused with a reason, and not kept.
    await page.fill('#token', token('alice', 'user'));
    await page.click('#signin-form button[type=submit]');
    await page.getByText('not an auditor').waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);

    await page.fill('#token', AUDITOR);
    await page.click('#signin-form button[type=submit]');
    await page.locator('#timeline .row').first().waitFor();
    assert.ok(!page.url().includes(AUDITOR.slice(-20)), 'the token is not in the URL');
    assert.equal(await page.evaluate(() => sessionStorage.getItem('threadline.console.token')), AUDITOR);
    assert.equal(await page.evaluate(() => localStorage.length), 0);
    assert.equal(await page.inputValue('#token'), '', 'the input is cleared');
    await shot('timeline');
  });

  test('filters the timeline by thread and by type', async () => {
    await page.fill('#filters input[name=thread_id]', seeded.alice.thread);
    await page.click('#filters button[type=submit]');
    await waitFor('only alice\'s thread', async () => {
      const rows = await renderedRows();
      return rows.length === 7 && rows.every((r) => r.thread === seeded.alice.thread);
    });
    await shot('timeline-filtered');
    await page.selectOption('#filters select[name=type]', 'tool_executing');
    await page.click('#filters button[type=submit]');
    await waitFor('only its tool_executing events', async () => {
      const rows = await renderedRows();
      return rows.length === 2 && rows.every((r) => r.event === 'tool_executing');
    });
    await page.selectOption('#filters select[name=type]', '');
    await page.click('#filters button[type=submit]');
    await waitFor('the whole thread again', async () => (await renderedRows()).length === 7);
  });

  test('opens an event\'s envelope, from the keyboard', async () => {
    await page.focus('#timeline');
    await page.keyboard.press('ArrowDown');
    await page.keyboard.press('Enter');
    await page.locator('#detail').waitFor();
    const json = JSON.parse(await page.textContent('#detail-json'));
    assert.equal(json.event, 'thread_created');
    assert.equal(json.thread_id, seeded.alice.thread);
    assert.equal(json.user_id, 'alice');
    assert.equal(json.actor.role, 'agent');
    await shot('event-detail');
    await page.keyboard.press('Escape');
    await page.locator('#detail').waitFor({ state: 'hidden' });
  });

  test('shows a thread: runs, lifecycle, status and tool call pairs', async () => {
    await page.click('#timeline .row >> nth=0');
    await page.click('text=Open its thread');
    const runs = page.locator('#thread-out table').first();
    await runs.getByText('running').waitFor();
    const text = await runs.textContent();
    assert.match(text, /agent_started → agent_thinking → tool_executing → tool_completed → tool_executing/);
    assert.match(text, /call-1 \(search\): executing @\d+ → completed @\d+/);
    assert.match(text, /call-2 \(book\): executing @\d+ → open/);
    await shot('thread');
  });

  test('shows a live event as it is appended', async () => {
    await page.click('#tab-timeline');
    await page.check('#live');
    const [status, appended] = await server.post(AGENT, `/v1/runs/${seeded.alice.run}/events`, {
      type: 'agent_thinking', data: { text: 'a live thought' },
    });
    assert.equal(status, 201);
    await waitFor('the live event in the timeline', async () => (await renderedRows())
      .some((r) => r.position === appended.position && r.fresh));
    await shot('live-tail');
    await page.uncheck('#live');
  });

  test('shows an ack in the delivery ledger', async () => {
    await page.click('#tab-ledger');
    await page.fill('#ledger-form input[name=thread_id]', seeded.alice.thread);
    await page.click('#ledger-form button[type=submit]');
    await page.locator('#no-clients').waitFor();

    // alice's phone receives her history and acknowledges the first three events.
    const ws = new WebSocket(`ws://${server.addr}/v1/ws?client_id=phone`, ['threadline.v1', `bearer.${token('alice')}`]);
    const frames = [];
    let ponged = null;
    const pong = new Promise((r) => { ponged = r; });
    ws.on('message', (m) => {
      const f = JSON.parse(m.toString());
      if (f.type === 'pong') ponged();
      frames.push(f);
    });
    await waitFor('the caught_up frame', () => frames.some((f) => f.type === 'caught_up'));
    ws.send(JSON.stringify({ type: 'ack', user_seq: 3 }));
    ws.send(JSON.stringify({ type: 'ping' }));
    await pong; // the ack is durable

    const phone = page.locator('#ledger-out tr[data-client=phone]');
    await phone.waitFor();
    assert.match(await phone.textContent(), /^phone3/);
    const acked = await page.locator('#ledger-out td.acked[data-client=phone]').count();
    const unacked = await page.locator('#ledger-out td.unacked[data-client=phone]').count();
    assert.equal(acked, 3);
    assert.equal(unacked, 5);
    await shot('ledger');

    // Acknowledging everything turns the whole column green.
    const last = frames.filter((f) => f.type === 'event').at(-1).user_seq;
    ws.send(JSON.stringify({ type: 'ack', user_seq: last }));
    await waitFor('every event acknowledged', async () =>
      (await page.locator('#ledger-out td.unacked[data-client=phone]').count()) === 0);
    seeded.ws = ws;
  });

  test('pages through the history without rendering all of it', async () => {
    await page.click('#tab-timeline');
    await page.fill('#filters input[name=thread_id]', '');
    await page.click('#filters button[type=submit]');
    const count = () => page.$eval('#timeline', (g) => Number(g.getAttribute('aria-rowcount')));
    await waitFor('the first page', async () => (await count()) === 200);
    // Scrolling to the end of what is loaded fetches the next page, until the end.
    await waitFor('the whole history, page by page', async () => {
      await page.$eval('#timeline', (g) => { g.scrollTop = g.scrollHeight; });
      return (await count()) >= 700;
    });
    const rendered = await page.locator('#timeline .row').count();
    assert.ok(rendered < 60, `only the visible window is rendered (${rendered} rows)`);
    const rows = await renderedRows();
    assert.ok(rows.every((r, i) => i === 0 || r.position > rows[i - 1].position), 'in log order');
    await shot('paging');

    // The ledger of a long thread pages too, 500 events at a time, forward and back.
    await page.click('#tab-ledger');
    await page.fill('#ledger-form input[name=thread_id]', seeded.carol.thread);
    await page.click('#ledger-form button[type=submit]');
    await page.locator('#ledger-next').waitFor();
    const firstRows = () => page.$$eval('#ledger-out tr[data-position]', (trs) => trs.map((t) => Number(t.dataset.position)));
    const first = await firstRows();
    assert.equal(first.length, 500);
    await page.click('#ledger-next');
    await waitFor('the second ledger page', async () => {
      const second = await firstRows();
      return second.length === 703 - 500 && second[0] > first.at(-1);
    });
    await page.click('#ledger-prev');
    await waitFor('the first ledger page again', async () => (await firstRows())[0] === first[0]);
  });

  test('shows health: head, lag, sockets, ingest rate', async () => {
    await page.click('#tab-health');
    const head = await fetch(`${base}/readyz`).then((r) => r.json()).then((r) => r.head);
    await waitFor('the head and the open socket', async () => {
      const v = (k) => page.locator(`#health dd[data-key="${k}"]`).textContent().catch(() => '');
      return Number(await v('Log head (position)')) >= head && Number(await v('Sockets connected')) >= 1
        && (await v('Ingest rate (events/s)')) !== 'measuring…';
    });
    await shot('health');
    seeded.ws?.close();
  });

  test('signing out forgets the token', async () => {
    await page.click('#signout');
    await page.locator('#signin').waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  });
});
