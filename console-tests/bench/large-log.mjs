// Manual measurement (not part of CI): the console against a large log.
//   THREADLINE_BIN=target/release/threadline node bench/large-log.mjs [events]
// Appends `events` (default 1,000,000) agent events in batches of 1000 over 100 threads,
// then measures in headless Chromium: sign-in to first rows, paging, a deep start, the live
// tail's jump to the head, a filtered scan, and the tab's JS heap. Prints one table.

import { chromium } from 'playwright-core';
import { Server, token, waitFor } from '../test/harness.mjs';

const N = Number(process.argv[2] ?? 1_000_000);
const AGENT = token('bot', 'agent');
const server = await Server.start();
const base = `http://${server.addr}`;
const rows = [];
const t = () => performance.now();
const row = (what, ms, note = '') => rows.push([what, `${ms.toFixed(0)} ms`, note]);

try {
  const runs = [];
  for (let i = 0; i < 100; i++) {
    const [, th] = await server.post(AGENT, '/v1/threads', { user_id: `user-${i % 10}` });
    const [, r] = await server.post(AGENT, `/v1/threads/${th.thread_id}/runs`, { agent_name: 'bench' });
    await server.post(AGENT, `/v1/runs/${r.run_id}/events`, { type: 'agent_started', data: {} });
    runs.push({ thread: th.thread_id, run: r.run_id });
  }
  let t0 = t();
  for (let done = 0; done < N; done += 1000) {
    const events = Array.from({ length: 1000 }, (_, k) => ({
      run_id: runs[(done / 1000) % runs.length].run, type: 'agent_thinking', data: { i: done + k },
    }));
    const [status, body] = await server.post(AGENT, '/v1/events', { events });
    if (status !== 201) throw new Error(`append: ${status} ${JSON.stringify(body)}`);
  }
  row(`append ${N} events (batches of 1000)`, t() - t0);
  const head = (await (await fetch(`${base}/readyz`)).json()).head;

  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'] });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const client = await page.context().newCDPSession(page);
  await client.send('Performance.enable');
  const heap = async () => {
    const { metrics } = await client.send('Performance.getMetrics');
    return (metrics.find((m) => m.name === 'JSHeapUsedSize').value / 2 ** 20).toFixed(1);
  };
  const count = () => page.$eval('#timeline', (g) => Number(g.getAttribute('aria-rowcount')));

  await page.goto(`${base}/console`);
  t0 = t();
  await page.fill('#token', token('ada', 'auditor'));
  await page.click('#signin-form button[type=submit]');
  await page.locator('#timeline .row').first().waitFor();
  row('sign in → first rows', t() - t0, `head ${head}`);

  t0 = t();
  await waitFor('50 pages', async () => {
    await page.$eval('#timeline', (g) => { g.scrollTop = g.scrollHeight; });
    return (await count()) >= 10_000;
  }, 300_000);
  row('scroll through 10,000 rows (50 pages)', t() - t0, `heap ${await heap()} MiB, ${await page.locator('#timeline .row').count()} rows in the DOM`);

  t0 = t();
  await waitFor('the row cap', async () => {
    await page.$eval('#timeline', (g) => { g.scrollTop = g.scrollHeight; });
    return (await page.textContent('#timeline-status')).includes('dropped');
  }, 600_000);
  row('keep scrolling past the 20,000-row cap', t() - t0, `heap ${await heap()} MiB, rows held ${await count()}`);

  t0 = t();
  await page.fill('#filters input[name=after]', String(head - 1000));
  await page.click('#filters button[type=submit]');
  await waitFor('deep page', async () => (await count()) > 0);
  row('start at position head − 1000', t() - t0);

  await page.fill('#filters input[name=after]', '0');
  await page.click('#filters button[type=submit]');
  await waitFor('reset', async () => (await count()) > 0);
  t0 = t();
  await page.check('#live');
  await waitFor('live jump', async () => (await page.textContent('#timeline-status')).startsWith('Live:') && (await count()) > 0);
  row('live tail from position 0 (jumps to the head)', t() - t0);
  await page.uncheck('#live');

  t0 = t();
  await page.fill('#filters input[name=thread_id]', runs[7].thread);
  await page.click('#filters button[type=submit]');
  await waitFor('filtered rows', async () => (await count()) >= 200, 120_000);
  row('filter one thread of 100 (first 200 rows)', t() - t0);

  t0 = t();
  await page.click('#tab-thread');
  await page.fill('#thread-form input[name=thread_id]', runs[7].thread);
  await page.click('#thread-form button[type=submit]');
  await page.locator('#thread-out table').first().waitFor({ timeout: 120_000 });
  row('thread view (first 5000 of its events)', t() - t0);

  t0 = t();
  await page.click('#tab-ledger');
  await page.fill('#ledger-form input[name=thread_id]', runs[7].thread);
  await page.click('#ledger-form button[type=submit]');
  await page.locator('#ledger-out table').first().waitFor({ timeout: 120_000 });
  row('delivery ledger of that thread (1000 events)', t() - t0);

  const rss = (await import('node:fs')).readFileSync(`/proc/${server.child.pid}/status`, 'utf8')
    .split('\n').find((l) => l.startsWith('VmRSS'));
  row('server', 0, rss.replace(/\s+/g, ' '));
  await browser.close();
} finally {
  await server.dispose();
}
console.log(`| measurement | time | note |\n|---|---|---|\n${rows.map((r) => `| ${r.join(' | ')} |`).join('\n')}`);
