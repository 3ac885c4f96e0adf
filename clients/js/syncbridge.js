// syncbridge browser client: keeps IndexedDB object stores in step with a syncbridge server's
// cloud collections, offline first. Dependency-free ES module; served by the bridge at
// /client/syncbridge.js. Protocol: README.md, "Offline-first clients".
//
//   import { SyncBridge } from '/client/syncbridge.js';
//   const sb = new SyncBridge({ collections: ['todos'], conflict: 'latest' });
//   await sb.open();                 // opens IndexedDB, syncs, follows the server live
//   await sb.put('todos', 't1', { title: 'milk' });   // applied locally at once, queued
//   sb.addEventListener('change', (e) => render(e.detail));
//
// Local writes go to IndexedDB at once and to an outbox (an object store, so it survives a
// reload); sync() pushes the outbox, then pulls everything after the saved checkpoint. Live mode
// follows the server's event stream and pulls when it announces a new checkpoint. The browser's
// offline/online events (and setOffline()) pause and resume. A push the server refuses because
// the record changed there goes to the conflict handler:
//   'latest' (default): the later updatedAt wins (last writer wins, like the bridge),
//   'server-wins', 'client-wins', or a function (local, server) => merged document | null
//   (null deletes). `local` and `server` are { id, doc, deleted, updatedAt }.

const OUTBOX = '_outbox';
const META = '_meta';

function req(r) {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error('transaction aborted'));
  });
}

function ms(t) {
  if (typeof t === 'number') return t;
  const v = Date.parse(t);
  return Number.isNaN(v) ? 0 : v;
}

export class SyncBridge extends EventTarget {
  /**
   * @param {object} o
   * @param {string[]} o.collections  server collections to keep (one object store each)
   * @param {string} [o.url]          the bridge's base URL (default: this page's origin)
   * @param {string} [o.token]        the API's bearer token, if it has one
   * @param {string} [o.dbName]       IndexedDB database name (default 'syncbridge')
   * @param {string|Function} [o.conflict] 'latest' | 'server-wins' | 'client-wins' | (local, server) => doc|null
   * @param {boolean} [o.live]        follow the event stream (default true)
   * @param {number} [o.debounceMs]   delay between a local write and its push (default 20)
   */
  constructor(o) {
    super();
    this.url = (o.url || globalThis.location?.origin || '').replace(/\/$/, '');
    this.collections = o.collections;
    this.token = o.token;
    this.dbName = o.dbName || 'syncbridge';
    this.conflict = o.conflict || 'latest';
    this.liveWanted = o.live !== false;
    this.debounceMs = o.debounceMs ?? 20;
    this.offline = globalThis.navigator ? !navigator.onLine : false;
    this.forcedOffline = false;
    this.streams = new Map();
    this.stats = { pushed: 0, pulled: 0, conflicts: 0, syncs: 0, errors: 0 };
    this._syncing = null;
    this._again = false;
    this._timer = null;
    this._retry = 500;
  }

  /** Opens the database (creating the object stores), then syncs and goes live if online. */
  async open() {
    const open = indexedDB.open(this.dbName, 1);
    open.onupgradeneeded = () => {
      const db = open.result;
      for (const c of this.collections) {
        if (!db.objectStoreNames.contains(c)) db.createObjectStore(c, { keyPath: 'id' });
      }
      if (!db.objectStoreNames.contains(OUTBOX)) db.createObjectStore(OUTBOX, { keyPath: 'key' });
      if (!db.objectStoreNames.contains(META)) db.createObjectStore(META, { keyPath: 'key' });
    };
    this.db = await req(open);
    this.clientId = await this._meta('clientId');
    if (!this.clientId) {
      this.clientId = crypto.randomUUID();
      await this._setMeta('clientId', this.clientId);
    }
    if (globalThis.addEventListener) {
      globalThis.addEventListener('online', () => { this.offline = false; this._resume(); });
      globalThis.addEventListener('offline', () => { this.offline = true; this._pause(); });
    }
    this._resume();
    return this;
  }

  /** Whether the client talks to the server now. */
  get online() { return !this.offline && !this.forcedOffline; }

  /** Pauses (true) or resumes (false) all network traffic, as the demo's offline switch does. */
  setOffline(off) {
    this.forcedOffline = !!off;
    if (off) this._pause(); else this._resume();
  }

  /** Writes a document locally (stamping updatedAt) and queues it for the server. */
  async put(collection, id, doc) {
    const record = { ...doc, id, updatedAt: new Date().toISOString() };
    await this._local(collection, id, { doc: record, deleted: false, updatedAt: record.updatedAt });
    return record;
  }

  /** Deletes a record locally and queues the delete. */
  async delete(collection, id) {
    await this._local(collection, id, { doc: null, deleted: true, updatedAt: new Date().toISOString() });
  }

  /** One live record's document, or undefined. */
  async get(collection, id) {
    const r = await req(this.db.transaction(collection).objectStore(collection).get(id));
    return r && !r.deleted ? r.doc : undefined;
  }

  /** Every live record's document, each with its record id as `id`. */
  async all(collection) {
    const rows = await req(this.db.transaction(collection).objectStore(collection).getAll());
    return rows.filter((r) => !r.deleted).map((r) => ({ ...r.doc, id: r.id }));
  }

  /** Changes waiting for the server. */
  async pending() {
    return req(this.db.transaction(OUTBOX).objectStore(OUTBOX).count());
  }

  /** Pushes the outbox, then pulls what changed on the server. One at a time; a call during a
   * sync runs another right after. Rejects if the server cannot be reached. */
  async sync() {
    if (this._syncing) { this._again = true; return this._syncing; }
    this._syncing = (async () => {
      try {
        do {
          this._again = false;
          for (const c of this.collections) {
            await this._push(c);
            await this._pull(c);
          }
          this.stats.syncs += 1;
        } while (this._again && this.online);
        this._retry = 500;
        this._emit('synced', {});
      } finally {
        this._syncing = null;
      }
    })();
    return this._syncing;
  }

  /** Closes streams and the database. */
  close() {
    this._pause();
    this.db?.close();
  }

  // --- internals ---

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  async _meta(key) {
    const r = await req(this.db.transaction(META).objectStore(META).get(key));
    return r?.value;
  }

  async _setMeta(key, value) {
    const tx = this.db.transaction(META, 'readwrite');
    tx.objectStore(META).put({ key, value });
    await done(tx);
  }

  async _local(collection, id, change) {
    const tx = this.db.transaction([collection, OUTBOX], 'readwrite');
    const store = tx.objectStore(collection);
    const old = await req(store.get(id));
    const rev = (old?.rev || 0) + 1;
    store.put({ id, ...change, serverVersion: old?.serverVersion ?? null, rev });
    tx.objectStore(OUTBOX).put({ key: `${collection}\u0000${id}`, collection, id, rev });
    await done(tx);
    this._emit('change', { collection, id, origin: 'local' });
    this._schedule();
  }

  _schedule(delay = this.debounceMs) {
    if (!this.online) return;
    clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      this.sync().catch((e) => {
        this.stats.errors += 1;
        this._emit('error', { error: String(e) });
        this._retry = Math.min(this._retry * 2, 30000);
        this._schedule(this._retry);
      });
    }, delay);
  }

  async _fetch(path, init = {}) {
    if (!this.online) throw new Error('offline');
    const headers = { 'X-Client-Id': this.clientId, ...(init.headers || {}) };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    const resp = await fetch(this.url + path, { ...init, headers });
    if (!resp.ok) throw new Error(`${init.method || 'GET'} ${path}: ${resp.status} ${await resp.text()}`);
    return resp.json();
  }

  async _push(collection) {
    for (let round = 0; round < 5; round++) {
      const entries = (await req(this.db.transaction(OUTBOX).objectStore(OUTBOX).getAll()))
        .filter((e) => e.collection === collection)
        .slice(0, 500);
      if (entries.length === 0) return;
      const rows = new Map();
      const tx = this.db.transaction(collection);
      for (const e of entries) rows.set(e.id, await req(tx.objectStore(collection).get(e.id)));
      const changes = entries.filter((e) => rows.get(e.id)).map((e) => {
        const r = rows.get(e.id);
        return r.deleted
          ? { id: e.id, deleted: true, updatedAt: r.updatedAt, assumed: r.serverVersion }
          : { id: e.id, doc: r.doc, assumed: r.serverVersion };
      });
      const res = await this._fetch(`/api/replicate/${encodeURIComponent(collection)}/push`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ changes }),
      });
      const sent = new Map(entries.map((e) => [e.id, e.rev]));
      const wtx = this.db.transaction([collection, OUTBOX], 'readwrite');
      const store = wtx.objectStore(collection);
      const outbox = wtx.objectStore(OUTBOX);
      const settle = async (id, update) => {
        const cur = await req(store.get(id));
        if (!cur) return;
        Object.assign(cur, update);
        store.put(cur);
        // Only a record not edited since it was sent leaves the outbox.
        if (cur.rev === sent.get(id)) outbox.delete(`${collection}\u0000${id}`);
      };
      for (const a of res.applied) {
        this.stats.pushed += 1;
        await settle(a.id, { serverVersion: a.version });
      }
      for (const r of res.rejected) {
        this._emit('error', { collection, id: r.id, error: r.detail });
        await settle(r.id, {});
      }
      let again = false;
      for (const srv of res.conflicts) {
        this.stats.conflicts += 1;
        const cur = await req(store.get(srv.id));
        const local = { id: srv.id, doc: cur.doc, deleted: cur.deleted, updatedAt: cur.updatedAt };
        const server = { id: srv.id, doc: srv.doc ?? null, deleted: srv.deleted, updatedAt: srv.version.updatedAt };
        const pick = this._resolve(local, server);
        this._emit('conflict', { collection, local, server, resolved: pick });
        if (pick.take === 'server') {
          store.put({ id: srv.id, doc: server.doc, deleted: server.deleted, updatedAt: server.updatedAt, serverVersion: srv.version, rev: cur.rev + 1 });
          outbox.delete(`${collection}\u0000${srv.id}`);
        } else {
          // Keep (or write) our version, now assuming the server's: the next round applies it.
          const doc = pick.doc === undefined ? cur.doc : pick.doc;
          const deleted = pick.doc === undefined ? cur.deleted : pick.doc === null;
          const updatedAt = new Date(Math.max(Date.now(), ms(server.updatedAt) + 1)).toISOString();
          store.put({ id: srv.id, doc: deleted ? null : { ...doc, id: srv.id, updatedAt }, deleted, updatedAt, serverVersion: srv.version, rev: cur.rev + 1 });
          outbox.put({ key: `${collection}\u0000${srv.id}`, collection, id: srv.id, rev: cur.rev + 1 });
          again = true;
        }
        this._emit('change', { collection, id: srv.id, origin: 'conflict' });
      }
      await done(wtx);
      if (!again && entries.length < 500) return;
    }
  }

  _resolve(local, server) {
    const h = this.conflict;
    if (typeof h === 'function') {
      const merged = h(local, server);
      return { take: 'merge', doc: merged === null ? null : merged };
    }
    if (h === 'server-wins') return { take: 'server' };
    if (h === 'client-wins') return { take: 'client' };
    // latest updatedAt; a tie goes to the server (every client then agrees).
    return ms(local.updatedAt) > ms(server.updatedAt) ? { take: 'client' } : { take: 'server' };
  }

  async _pull(collection) {
    const key = `checkpoint:${collection}`;
    let checkpoint = (await this._meta(key)) || '';
    for (;;) {
      const page = await this._fetch(
        `/api/replicate/${encodeURIComponent(collection)}/pull?limit=500&checkpoint=${encodeURIComponent(checkpoint)}`);
      const tx = this.db.transaction([collection, OUTBOX, META], 'readwrite');
      const store = tx.objectStore(collection);
      const outbox = tx.objectStore(OUTBOX);
      const changed = [];
      for (const d of page.documents) {
        // A record with local changes waiting keeps them: its push meets the server's version
        // as a conflict and the handler decides.
        const waiting = await req(outbox.get(`${collection}\u0000${d.id}`));
        if (waiting) continue;
        const cur = await req(store.get(d.id));
        if (cur?.serverVersion && cur.serverVersion.hash === d.version.hash
            && ms(cur.serverVersion.updatedAt) === ms(d.version.updatedAt)) continue;
        store.put({ id: d.id, doc: d.deleted ? null : d.doc, deleted: d.deleted, updatedAt: d.version.updatedAt, serverVersion: d.version, rev: (cur?.rev || 0) + 1 });
        changed.push(d.id);
        this.stats.pulled += 1;
      }
      checkpoint = page.checkpoint;
      tx.objectStore(META).put({ key, value: checkpoint });
      await done(tx);
      for (const id of changed) this._emit('change', { collection, id, origin: 'server' });
      if (!page.hasMore) return;
    }
  }

  _resume() {
    if (!this.online || !this.db) return;
    this._schedule(0);
    if (this.liveWanted) for (const c of this.collections) this._follow(c);
  }

  _pause() {
    clearTimeout(this._timer);
    for (const s of this.streams.values()) s.close();
    this.streams.clear();
  }

  _follow(collection) {
    if (this.streams.has(collection)) return;
    const path = `/api/replicate/${encodeURIComponent(collection)}/stream`;
    const onCheckpoint = () => this._schedule(0);
    if (!this.token && globalThis.EventSource) {
      // EventSource reconnects by itself and sends Last-Event-ID.
      const es = new EventSource(this.url + path);
      es.addEventListener('checkpoint', onCheckpoint);
      es.addEventListener('open', () => this._emit('live', { collection, up: true }));
      es.addEventListener('error', () => this._emit('live', { collection, up: false }));
      this.streams.set(collection, es);
      return;
    }
    // EventSource cannot send a bearer token: read the stream with fetch instead.
    const ctl = new AbortController();
    this.streams.set(collection, { close: () => ctl.abort() });
    let last = '';
    const run = async () => {
      while (!ctl.signal.aborted) {
        try {
          const headers = { Authorization: `Bearer ${this.token}`, 'X-Client-Id': this.clientId };
          if (last) headers['Last-Event-ID'] = last;
          const resp = await fetch(this.url + path, { headers, signal: ctl.signal });
          this._emit('live', { collection, up: resp.ok });
          const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
          let buf = '';
          for (;;) {
            const { value, done: end } = await reader.read();
            if (end) break;
            buf += value;
            let i;
            while ((i = buf.indexOf('\n\n')) >= 0) {
              const block = buf.slice(0, i);
              buf = buf.slice(i + 2);
              const id = /^id: ?(.*)$/m.exec(block);
              if (id) last = id[1];
              if (/^event: ?checkpoint$/m.test(block)) onCheckpoint();
            }
          }
        } catch (e) {
          if (ctl.signal.aborted) return;
          this._emit('live', { collection, up: false });
        }
        await new Promise((r) => setTimeout(r, 1000));
      }
    };
    run();
  }
}
