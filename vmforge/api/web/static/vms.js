// The VM table: loaded once, then kept current from the event stream (no reloads).
import {
  api, ApiError, announce, confirmAction, el, fmtAge, fmtDuration, fmtMib, followEvents,
  setupPage, showError,
} from './common.js';

setupPage();

const tbody = document.querySelector('#vms tbody');
const empty = document.getElementById('empty');
const errorBox = document.getElementById('error');
const live = document.getElementById('live');
const rows = new Map(); // name -> { rec, tr, cells, buttons }
const pending = new Map(); // name -> timer of a scheduled refresh
const created = new URLSearchParams(location.search).get('created');

const COLUMNS = ['Name', 'State', 'Accel', 'Backend', 'CPUs', 'Memory', 'IP', 'Boot time', 'Age', 'Actions'];

function ipText(rec) {
  if (rec.ipv4 && rec.ipv4.length) return rec.ipv4.join(', ');
  if (rec.state !== 'running') return '—';
  const nics = rec.spec?.nics || [{ mode: 'user' }];
  const fwd = [];
  for (const n of nics) {
    for (const f of n.forwards || []) fwd.push(`${f.host_addr || '127.0.0.1'}:${f.host_port}→${f.guest_port}`);
  }
  return nics.every((n) => (n.mode || 'user') === 'user') ? `NAT${fwd.length ? ' · ' + fwd.join(', ') : ''}` : '—';
}

function makeRow(name) {
  const cells = {};
  const tr = el('tr', { dataset: { vm: name } });
  for (const col of COLUMNS) {
    const key = col.toLowerCase().replace(' ', '-');
    cells[key] = el('td', { dataset: { label: col }, class: `col-${key}` });
    tr.append(cells[key]);
  }
  cells.name.append(el('a', { href: `/vms/${encodeURIComponent(name)}`, text: name }));
  for (const k of ['cpus', 'memory', 'boot-time', 'age']) cells[k].classList.add('num');
  const buttons = {
    start: el('button', { type: 'button', class: 'secondary', 'aria-label': `Start ${name}`, text: 'Start',
                          onclick: () => act(name, 'start') }),
    stop: el('button', { type: 'button', class: 'secondary', 'aria-label': `Stop ${name}`, text: 'Stop',
                         onclick: () => act(name, 'stop') }),
    kill: el('button', { type: 'button', class: 'danger', 'aria-label': `Kill ${name}`, text: 'Kill',
                         onclick: () => act(name, 'kill') }),
    delete: el('button', { type: 'button', class: 'danger', 'aria-label': `Delete ${name}`, text: 'Delete',
                           onclick: () => act(name, 'delete') }),
  };
  cells.actions.append(el('div', { class: 'actions' }, Object.values(buttons)));
  return { tr, cells, buttons, rec: null };
}

function setState(row, state, ready, error) {
  const c = row.cells.state;
  c.textContent = '';
  const box = el('div', {}, el('span', { class: 'state', dataset: { state }, text: state }));
  if (ready && state === 'running') box.append(el('span', { class: 'badge', text: 'ready' }));
  if (error) box.append(el('div', { class: 'help', text: error.slice(0, 200) }));
  c.append(box);
  row.tr.dataset.state = state;
  row.tr.dataset.ready = ready && state === 'running' ? 'true' : 'false';
  const b = row.buttons;
  b.start.hidden = !['created', 'stopped', 'crashed'].includes(state);
  b.stop.hidden = !['running', 'starting'].includes(state);
  b.kill.hidden = !['running', 'starting', 'stopping'].includes(state);
}

function render(rec) {
  let row = rows.get(rec.name);
  const fresh = !row;
  if (fresh) {
    row = makeRow(rec.name);
    rows.set(rec.name, row);
    insertSorted(row.tr, rec.name);
  }
  row.rec = rec;
  const c = row.cells;
  setState(row, rec.state, Boolean(rec.ready_at),
           ['crashed', 'broken', 'stopped'].includes(rec.state) ? rec.last_error : null);
  c.accel.textContent = rec.accel || '—';
  c.backend.textContent = rec.backend || '—';
  c.cpus.textContent = rec.cpu_cores ?? '—';
  c.memory.textContent = fmtMib(rec.memory_mib);
  c.ip.textContent = ipText(rec);
  c['boot-time'].textContent = rec.boot_seconds != null ? fmtDuration(rec.boot_seconds) : '—';
  c.age.textContent = fmtAge(rec.created_at);
  c.age.dataset.created = rec.created_at;
  if (fresh && rec.name === created) {
    row.tr.classList.add('flash');
    announce(`VM ${rec.name} created`);
  }
  empty.hidden = rows.size > 0;
}

function insertSorted(tr, name) {
  for (const other of tbody.children) {
    if (other.dataset.vm > name) { tbody.insertBefore(tr, other); return; }
  }
  tbody.append(tr);
}

function remove(name) {
  const row = rows.get(name);
  if (!row) return;
  const hadFocus = row.tr.contains(document.activeElement);
  row.tr.remove();
  rows.delete(name);
  empty.hidden = rows.size > 0;
  if (hadFocus) document.querySelector('h1').focus?.();
}

async function refreshAll() {
  try {
    const list = await api('/v1/vms');
    const seen = new Set(list.map((r) => r.name));
    for (const name of [...rows.keys()]) if (!seen.has(name)) remove(name);
    for (const rec of list) render(rec);
    empty.hidden = rows.size > 0;
    showError(errorBox, null);
  } catch (e) {
    showError(errorBox, e);
  }
}

async function refresh(name) {
  pending.delete(name);
  try {
    render(await api(`/v1/vms/${encodeURIComponent(name)}`));
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) remove(name);
  }
}

function scheduleRefresh(name, delay = 250) {
  if (pending.has(name)) return;
  pending.set(name, setTimeout(() => refresh(name), delay));
}

const VERBS = {
  start: { ask: (n) => `Start VM ${n}?`, label: 'Start', danger: false },
  stop: { ask: (n) => `Stop VM ${n}? The guest is asked to shut down (forced after 30 s).`, label: 'Stop' },
  kill: { ask: (n) => `Kill VM ${n} now? Like pulling the plug: unsaved guest data is lost.`, label: 'Kill' },
  delete: { ask: (n, s) => `Delete VM ${n}? Its disks and seed are removed; this cannot be undone.` +
                            (['running', 'starting'].includes(s) ? ' It is running: it is stopped first.' : ''),
            label: 'Delete' },
};

async function act(name, verb) {
  const row = rows.get(name);
  const v = VERBS[verb];
  if (!await confirmAction(v.ask(name, row?.rec?.state), v.label, { danger: v.danger !== false })) return;
  const btns = row ? Object.values(row.buttons) : [];
  btns.forEach((b) => { b.disabled = true; });
  const n = encodeURIComponent(name);
  try {
    if (verb === 'start') await api(`/v1/vms/${n}/start?wait=none`, { method: 'POST' });
    else if (verb === 'stop') await api(`/v1/vms/${n}/stop?timeout=30`, { method: 'POST' });
    else if (verb === 'kill') await api(`/v1/vms/${n}/kill`, { method: 'POST' });
    else {
      await api(`/v1/vms/${n}?force=true&stop_timeout=10`, { method: 'DELETE' });
      remove(name);
    }
    announce(`${v.label}: ${name} done`);
    showError(errorBox, null);
  } catch (e) {
    showError(errorBox, e);
  } finally {
    btns.forEach((b) => { b.disabled = false; });
    if (verb !== 'delete') scheduleRefresh(name, 0);
  }
}

followEvents((ev) => {
  if (!ev.vm) return;
  if (ev.state === 'deleted') { remove(ev.vm); return; }
  const row = rows.get(ev.vm);
  if (row && ev.state && ev.state !== 'ready' && ev.phase === 'state') {
    setState(row, ev.state, Boolean(row.rec?.ready_at));
  }
  if (ev.state || ev.phase === 'failed' || ev.phase === 'succeeded' || !row) scheduleRefresh(ev.vm);
}, {
  onOpen: refreshAll,
  onState: (s) => { live.textContent = { live: 'connected', paused: 'paused while hidden' }[s] || 'reconnecting…'; },
});

setInterval(() => {
  for (const row of rows.values()) {
    if (row.rec) row.cells.age.textContent = fmtAge(row.rec.created_at);
  }
}, 1000);

refreshAll();
