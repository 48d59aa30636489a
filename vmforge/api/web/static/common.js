// vmforge web console: what every page shares. Plain ES module, no dependencies.
// The DOM is built with textContent only (never innerHTML), so no data becomes markup.

export const csrf = document.querySelector('meta[name="csrf-token"]')?.content || '';

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
    this.field = this.body.field || null;
    this.hint = this.body.hint || null;
  }
  get text() { return this.hint ? `${this.message}\nHint: ${this.hint}` : this.message; }
}

function toLogin() {
  location.assign('/login');
}

/** fetch() against the daemon's API: JSON in and out, the CSRF header on changes, errors as
 * ApiError (the daemon's JSON error body), a lost session back to the login form. */
export async function api(path, { method = 'GET', json, body, headers = {}, signal, raw = false } = {}) {
  const h = new Headers(headers);
  if (json !== undefined) {
    h.set('Content-Type', 'application/json');
    body = JSON.stringify(json);
  }
  if (!['GET', 'HEAD'].includes(method) && csrf) h.set('X-CSRF-Token', csrf);
  const r = await fetch(path, { method, body, headers: h, signal, credentials: 'same-origin' });
  if (r.status === 401) {
    toLogin();
    throw new ApiError(401, { message: 'not logged in' });
  }
  if (!r.ok) {
    let b;
    try { b = await r.json(); } catch { b = { message: `${r.status} ${r.statusText}` }; }
    throw new ApiError(r.status, b);
  }
  if (raw) return r;
  const ct = r.headers.get('content-type') || '';
  return ct.includes('json') ? r.json() : r.text();
}

/** el('td', {class: 'num', dataset: {label: 'CPUs'}}, '2') */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
    else if (v === true) e.setAttribute(k, '');
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v < 10 && i ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

export function fmtMib(mib) {
  if (mib === null || mib === undefined) return '—';
  return mib >= 1024 && mib % 1024 === 0 ? `${mib / 1024} GiB` : `${mib} MiB`;
}

export function fmtDuration(s) {
  if (s === null || s === undefined) return '—';
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

export function fmtAge(epoch) {
  if (!epoch) return '—';
  const s = Math.max(0, Date.now() / 1000 - epoch);
  if (s < 60) return `${Math.floor(s)} s`;
  return fmtDuration(s).replace(/ \d+ s$/, '');
}

export function fmtTime(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleString() : '—';
}

let announcer;
/** Say something to screen readers (and show it in the status line when there is one). */
export function announce(message) {
  announcer ||= document.getElementById('announce');
  if (announcer) {
    announcer.textContent = '';
    setTimeout(() => { announcer.textContent = message; }, 30);
  }
}

/** Show an error (ApiError or other) in a role=alert element; null hides it. */
export function showError(box, err) {
  if (!box) return;
  if (!err) { box.hidden = true; box.textContent = ''; return; }
  box.textContent = err instanceof ApiError ? err.text : String(err.message || err);
  box.hidden = false;
}

let dialog;
/** A modal confirmation (the native <dialog>: focus stays inside, Escape cancels). */
export function confirmAction(message, verb = 'OK', { danger = true } = {}) {
  if (!dialog) {
    dialog = el('dialog', { id: 'confirm-dialog', 'aria-labelledby': 'confirm-title',
                            'aria-describedby': 'confirm-message' },
      el('h2', { id: 'confirm-title', text: 'Please confirm' }),
      el('p', { id: 'confirm-message' }),
      el('form', { method: 'dialog', class: 'step-nav' },
        el('button', { value: 'cancel', class: 'secondary', id: 'confirm-cancel', text: 'Cancel' }),
        el('button', { value: 'ok', id: 'confirm-ok', text: 'OK' })));
    document.body.append(dialog);
  }
  dialog.querySelector('#confirm-message').textContent = message;
  const ok = dialog.querySelector('#confirm-ok');
  ok.textContent = verb;
  ok.className = danger ? 'danger solid' : '';
  dialog.returnValue = 'cancel';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.showModal();
    dialog.querySelector('#confirm-cancel').focus();
  });
}

// Browsers give a site 6 HTTP/1.1 connections, and every event stream or followed console
// holds one: streams are closed when the page goes away, and paused while it is hidden for
// a while (an event stream resumes from the last event id it saw).
const closers = new Set();
export function onLeave(fn) {
  closers.add(fn);
  return () => closers.delete(fn);
}
window.addEventListener('pagehide', () => {
  for (const fn of closers) { try { fn(); } catch { /* leaving anyway */ } }
});
const HIDDEN_PAUSE_MS = 30000;

/** Run pause() when the page has been hidden for a while, resume() when it shows again. */
export function whileVisible(pause, resume) {
  let timer = null;
  let paused = false;
  document.addEventListener('visibilitychange', () => {
    if (document.hidden) {
      timer = setTimeout(() => { paused = true; pause(); }, HIDDEN_PAUSE_MS);
    } else {
      clearTimeout(timer);
      if (paused) { paused = false; resume(); }
    }
  });
}

/** Follow the daemon's event stream (Server-Sent Events). onEvent(data) for each event;
 * onOpen() at each (re)connection (refresh what the page shows then). */
export function followEvents(onEvent, { vm, onOpen, onState } = {}) {
  let es = null;
  let retry = 1000;
  let lastId = null;
  let stopped = false;
  const url = () => {
    const q = new URLSearchParams();
    if (vm) q.set('vm', vm);
    if (lastId) q.set('last_event_id', lastId);
    return '/v1/events' + (q.toString() ? `?${q}` : '');
  };
  const handler = (m) => {
    if (m.lastEventId) lastId = m.lastEventId;
    try { onEvent(JSON.parse(m.data)); } catch (e) { console.error(e); }
  };
  const connect = () => {
    if (stopped) return;
    es = new EventSource(url(), { withCredentials: true });
    es.onopen = () => { retry = 1000; onState?.('live'); onOpen?.(); };
    for (const kind of ['vm', 'job', 'daemon']) es.addEventListener(kind, handler);
    es.onerror = async () => {
      onState?.('reconnecting');
      if (es.readyState === EventSource.CLOSED && !stopped) {
        // Closed for good (e.g. 401): check the session, then reconnect.
        try { await api('/v1/jobs'); } catch { return; }
        setTimeout(connect, retry);
        retry = Math.min(retry * 2, 15000);
      }
    };
  };
  const close = () => { es?.close(); es = null; };
  onLeave(() => { stopped = true; close(); });
  whileVisible(() => { close(); onState?.('paused'); }, connect);
  connect();
  return { close: () => { stopped = true; close(); } };
}

/** Read a streamed response body, calling onText(string) as chunks arrive. */
export async function readText(response, onText, signal) {
  const reader = response.body.getReader();
  const dec = new TextDecoder();
  try {
    for (;;) {
      if (signal?.aborted) break;
      const { value, done } = await reader.read();
      if (done) break;
      onText(dec.decode(value, { stream: true }));
    }
    const tail = dec.decode();
    if (tail) onText(tail);
  } finally {
    reader.releaseLock?.();
  }
}

/** Read an NDJSON stream: onLine(object) per line. */
export async function readLines(response, onLine, signal) {
  let buf = '';
  await readText(response, (t) => {
    buf += t;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (line) onLine(JSON.parse(line));
    }
  }, signal);
  if (buf.trim()) onLine(JSON.parse(buf));
}

export function b64bytes(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Append to a <pre>, keeping it scrolled to the end when it was, and bounded in size. */
export function appendTo(pre, text, { max = 400000, cls } = {}) {
  const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
  if (cls) pre.append(el('span', { class: cls }, text));
  else pre.append(document.createTextNode(text));
  if (pre.textContent.length > max) {
    const keep = pre.textContent.slice(-Math.floor(max * 0.8));
    pre.textContent = keep;
  }
  if (stick) pre.scrollTop = pre.scrollHeight;
}

/** The header's log-out button (hidden where no login is needed: the unix socket). */
export function setupPage() {
  const out = document.getElementById('logout');
  if (out) {
    out.hidden = !csrf;
    out.addEventListener('click', async () => {
      try { await api('/logout', { method: 'POST' }); } catch { /* gone anyway */ }
      location.assign('/login');
    });
  }
  document.body.dataset.loadedAt = String(Date.now());
}
