// Browser test of clients/js/syncbridge.js against running bridges (started by
// scripts/browser-test.sh, which passes: the open bridge's URL, the cloud Redis URL, the directory
// for screenshots, and a second bridge's URL and API token (same Redis, its own SQLite file).
// Collections `todos` and `notes`; the cloud store is Redis (keys `todos:<id>`), written and read
// with redis-cli.
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import assert from 'node:assert/strict';

const [base, redisUrl, shots, lockedBase, token] = process.argv.slice(2);
if (!base || !redisUrl || !shots || !lockedBase || !token) {
  throw new Error('usage: offline.mjs <bridge url> <redis url> <screenshot dir> <token bridge url> <token>');
}
const redis = (...args) => execFileSync('redis-cli', ['-u', redisUrl, ...args], { encoding: 'utf8' }).trim();
const cloudGet = (id, collection = 'todos') => {
  const v = redis('GET', `${collection}:${id}`);
  return v ? JSON.parse(v) : null;
};
const cloudKeys = (prefix) => redis('--scan', '--pattern', `todos:${prefix}*`).split('\n').filter(Boolean);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function within(ms, what, check) {
  const t = Date.now();
  for (;;) {
    const v = await check();
    if (v) return Date.now() - t;
    if (Date.now() - t > ms) throw new Error(`not within ${ms} ms: ${what}`);
    await sleep(20);
  }
}
const step = (name, ms) => console.log(`ok  ${name}${ms === undefined ? '' : ` (${ms} ms)`}`);

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--headless', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run', '--disable-sync'],
});
try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error('page error:', e));
  const open = async (p) => {
    await p.goto(`${base}/demo?collection=todos`);
    await p.waitForSelector('body[data-ready="1"]', { timeout: 10000 });
  };
  await open(page);

  // 1. Created in the browser: in Redis within 1 s.
  await page.evaluate(() => sb.put('todos', 'b1', { title: 'from the browser' }));
  let ms = await within(1000, 'browser write in Redis', () => cloudGet('b1')?.title === 'from the browser');
  step('browser write reached Redis', ms);

  // 2. Written with redis-cli: in IndexedDB within 1 s, over the stream.
  redis('SET', 'todos:r1', JSON.stringify({ title: 'from redis', updatedAt: new Date().toISOString() }));
  ms = await within(1000, 'Redis write in IndexedDB', () =>
    page.evaluate(() => sb.get('todos', 'r1').then((d) => d?.title === 'from redis')));
  step('redis-cli write reached IndexedDB via the stream', ms);

  // 3. Offline: 80 creates and 20 deletes; nothing leaves the browser.
  await context.setOffline(true);
  await page.evaluate(async () => {
    for (let i = 0; i < 80; i++) await sb.put('todos', `e${i}`, { title: `edit ${i}` });
    for (let i = 0; i < 20; i++) await sb.delete('todos', `e${i}`);
  });
  await sleep(300);
  assert.equal(cloudKeys('e').length, 0, 'nothing pushed while offline');
  // Reload with the replication API still unreachable: the outbox must survive on disk.
  await page.route('**/api/replicate/**', (r) => r.abort());
  await context.setOffline(false);
  await open(page);
  const pending = await page.evaluate(() => sb.pending());
  assert.equal(pending, 80, 'the outbox survived the reload (one entry per record)');
  const pushedBefore = await page.evaluate(() => sb.stats.pushed);
  await page.unroute('**/api/replicate/**');
  await page.evaluate(() => window.dispatchEvent(new Event('online')));
  ms = await within(5000, 'offline edits in Redis', () => cloudKeys('e').length === 60);
  for (let i = 0; i < 80; i++) {
    const v = cloudGet(`e${i}`);
    if (i < 20) assert.equal(v, null, `e${i} deleted`);
    else assert.equal(v?.title, `edit ${i}`, `e${i}`);
  }
  await within(2000, 'outbox empty', () => page.evaluate(() => sb.pending().then((n) => n === 0)));
  const pushed = (await page.evaluate(() => sb.stats.pushed)) - pushedBefore;
  assert.equal(pushed, 80, 'each offline change pushed exactly once');
  step('100 offline edits and deletes survived a reload and arrived once', ms);

  // 4. Conflicts: the same record edited offline in the browser and in Redis.
  const cases = [
    // The server's edit is the older one: 'latest' would keep the browser's, server-wins must not.
    ['server-wins', 'earlier', (v) => v.title === 'server'],
    ['client-wins', 'later', (v) => v.title === 'browser'],
    ['latest', 'later', (v) => v.title === 'server'],
    ['latest', 'earlier', (v) => v.title === 'browser'],
    ['merge', 'later', (v) => v.title === 'browser' && v.extra === 'from server' && v.merged === true],
  ];
  for (const [i, [handler, when, expect]] of cases.entries()) {
    const id = `c${i}`;
    await page.evaluate(async ({ id, handler }) => {
      sb.conflict = handler === 'merge' ? (l, s) => ({ ...s.doc, ...l.doc, merged: true }) : handler;
      await sb.put('todos', id, { title: 'original' });
    }, { id, handler });
    await within(2000, `${id} synced`, () => cloudGet(id)?.title === 'original');
    await within(2000, `${id} settled`, () => page.evaluate(() => sb.pending().then((n) => n === 0)));
    const original = Date.parse(cloudGet(id).updatedAt);
    const browserAt = Date.parse(await page.evaluate(async (id) => {
      sb.setOffline(true);
      await sb.put('todos', id, { title: 'browser' });
      return (await sb.get('todos', id)).updatedAt;
    }, id));
    // 'earlier': after the agreed original (an edit older than that would be stale, and the
    // bridge itself would put the original back) but before the browser's edit.
    assert.ok(browserAt - original >= 2, `${id}: the browser edit is later than the original`);
    const at = when === 'earlier' ? Math.floor((original + browserAt) / 2) : Date.now() + 60000;
    redis('SET', `todos:${id}`, JSON.stringify({ id, title: 'server', extra: 'from server', updatedAt: new Date(at).toISOString() }));
    await sleep(200);
    await page.evaluate(() => sb.setOffline(false));
    await within(3000, `${id} resolved by ${handler} (${when})`, async () => {
      const local = await page.evaluate((id) => sb.get('todos', id), id);
      const cloud = cloudGet(id);
      return local && cloud && expect(local) && expect(cloud) && local.title === cloud.title;
    });
    step(`conflict resolved by ${handler} (server edit ${when})`);
  }

  // 5. Ten browser contexts writing at once converge. Each runs the client alone on a page of
  // the bridge's origin (not the demo, whose server panel polls the API every second).
  const pages = [];
  for (let i = 0; i < 10; i++) {
    const ctx = await browser.newContext();
    const p = await ctx.newPage();
    p.on('pageerror', (e) => console.error('page error:', e));
    await p.goto(`${base}/healthz`);
    await p.evaluate(async () => {
      const { SyncBridge } = await import('/client/syncbridge.js');
      window.sb = new SyncBridge({ collections: ['todos'] });
      await sb.open();
      await sb.sync();
    });
    pages.push(p);
  }
  await Promise.all(pages.map((p, i) => p.evaluate(async (i) => {
    for (let j = 0; j < 10; j++) await sb.put('todos', `m${i}-${j}`, { title: `page ${i}` });
    await sb.put('todos', 'shared', { title: `page ${i}` });
  }, i)));
  ms = await within(20000, 'all contexts converge', async () => {
    if (cloudKeys('m').length !== 100) return false;
    const cloudShared = cloudGet('shared')?.title;
    const views = await Promise.all([page, ...pages].map((p) => p.evaluate(async () => {
      const all = await sb.all('todos');
      return { n: all.filter((d) => d.id.startsWith('m')).length, shared: all.find((d) => d.id === 'shared')?.title };
    })));
    return views.every((v) => v.n === 100 && v.shared === cloudShared);
  });
  step('10 browser contexts converged', ms);
  await Promise.all(pages.map((p) => p.context().close()));

  // 6. A bridge with an API token: EventSource cannot send it, so the client reads the stream
  // with fetch (Last-Event-ID sent by hand). Without the token the protocol answers 401.
  const lockedCtx = await browser.newContext();
  const locked = await lockedCtx.newPage();
  locked.on('pageerror', (e) => console.error('page error:', e));
  await locked.goto(`${lockedBase}/demo?collection=todos&token=${token}`);
  await locked.waitForSelector('body[data-ready="1"]', { timeout: 10000 });
  const refused = await locked.evaluate(() => fetch('/api/replicate/todos/pull').then((r) => r.status));
  assert.equal(refused, 401, 'a pull without the token is refused');
  // Let its first pull (every record so far, from scratch) finish: the stream is timed, not that.
  await locked.evaluate(() => sb.sync());
  redis('SET', 'todos:t1', JSON.stringify({ title: 'to the token client', updatedAt: new Date().toISOString() }));
  ms = await within(1000, 'Redis write in the token client', () =>
    locked.evaluate(() => sb.get('todos', 't1').then((d) => d?.title === 'to the token client')));
  step('redis-cli write reached the token client via the fetch stream', ms);
  await locked.evaluate(() => sb.put('todos', 't2', { title: 'from the token client' }));
  ms = await within(1000, 'token client write in Redis', () => cloudGet('t2')?.title === 'from the token client');
  step('token client write reached Redis', ms);
  // ... and, through the shared Redis, the first bridge's browser.
  ms = await within(2000, 'token client write in the other browser', () =>
    page.evaluate(() => sb.get('todos', 't2').then((d) => d?.title === 'from the token client')));
  step('token client write reached the other bridge\'s browser', ms);

  await page.bringToFront();
  await sleep(1200);
  await page.screenshot({ path: `${shots}/demo.png`, fullPage: true });
  step(`screenshot ${shots}/demo.png`);

  // 7. The demo walk, through the page's own controls, on a collection of its own: save, go
  // offline with the switch, edit and add, back online. Screenshots of both states.
  const demoCtx = await browser.newContext({ viewport: { width: 1100, height: 620 } });
  const demo = await demoCtx.newPage();
  demo.on('pageerror', (e) => console.error('page error:', e));
  await demo.goto(`${base}/demo?collection=notes`);
  await demo.waitForSelector('body[data-ready="1"]', { timeout: 10000 });
  const save = async (id, title) => {
    await demo.fill('#id', id);
    await demo.fill('#title', title);
    await demo.click('button[type=submit]');
  };
  await save('n1', 'written in the browser');
  await within(1000, 'n1 in Redis', () => cloudGet('n1', 'notes')?.title === 'written in the browser');
  redis('SET', 'notes:n2', JSON.stringify({ title: 'written with redis-cli', updatedAt: new Date().toISOString() }));
  await within(1000, 'n2 in the page', () => demo.locator('#local', { hasText: 'written with redis-cli' }).count());
  await demo.click('#offline');
  await save('n3', 'made while offline');
  await save('n1', 'edited while offline');
  await sleep(1200);
  assert.equal(await demo.textContent('#pending'), '2', 'two changes wait in the outbox');
  assert.equal(cloudGet('n3', 'notes'), null, 'nothing leaves the browser while offline');
  assert.equal(await demo.textContent('#status'), 'offline');
  await demo.screenshot({ path: `${shots}/demo-offline.png` });
  step(`screenshot ${shots}/demo-offline.png (offline, 2 pending)`);
  await demo.click('#offline');
  ms = await within(2000, 'the offline changes in Redis', () =>
    cloudGet('n3', 'notes')?.title === 'made while offline' && cloudGet('n1', 'notes')?.title === 'edited while offline');
  await within(2000, 'the outbox empty and the server panel current', async () =>
    (await demo.textContent('#pending')) === '0'
    && (await demo.locator('#server', { hasText: 'made while offline' }).count()) > 0);
  await sleep(300);
  await demo.screenshot({ path: `${shots}/demo-online.png` });
  step(`demo walk: offline edits arrived on reconnect; screenshot ${shots}/demo-online.png`, ms);
} finally {
  await browser.close();
}
