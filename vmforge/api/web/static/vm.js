// One VM: its record (live), serial console (followed), exec with streamed output, health,
// files up and down, and the boot timeline.
import {
  api, ApiError, announce, appendTo, b64bytes, confirmAction, csrf, el, fmtBytes, fmtDuration, fmtMib,
  fmtTime, followEvents, onLeave, readLines, readText, setupPage, showError, whileVisible,
} from './common.js';

setupPage();

const $ = (id) => document.getElementById(id);
const name = decodeURIComponent(location.pathname.split('/')[2] || '');
const N = encodeURIComponent(name);
const errorBox = $('error');
let rec = null;
let gone = false;

document.title = `${name} · vmforge`;
$('vm-name').textContent = name;

// ---------------------------------------------------------------- the record
function fact(dl, label, value) {
  if (value === null || value === undefined || value === '') return;
  dl.append(el('dt', { text: label }), el('dd', { text: String(value) }));
}

function renderRecord() {
  const st = $('vm-state');
  st.textContent = rec.state + (rec.state === 'running' && rec.ready_at ? ' · ready' : '');
  st.dataset.state = rec.state;
  document.body.dataset.state = rec.state;
  document.body.dataset.ready = rec.ready_at && rec.state === 'running' ? 'true' : 'false';
  const dl = $('facts');
  dl.textContent = '';
  fact(dl, 'Backend', rec.backend);
  fact(dl, 'Accel', rec.accel);
  fact(dl, 'CPUs', rec.cpu_cores);
  fact(dl, 'Memory', fmtMib(rec.memory_mib));
  fact(dl, 'IP', rec.ipv4?.length ? rec.ipv4.join(', ') : null);
  const fwd = (rec.spec?.nics || []).flatMap((n) => (n.forwards || []).map(
    (f) => `${f.host_addr || '127.0.0.1'}:${f.host_port} → ${f.guest_port}/${f.protocol || 'tcp'}`));
  fact(dl, 'Port forwards', fwd.join(', '));
  fact(dl, 'PID', rec.pid);
  fact(dl, 'Created', fmtTime(rec.created_at));
  fact(dl, 'Started', rec.started_at ? fmtTime(rec.started_at) : null);
  fact(dl, 'Ready', rec.ready_at ? fmtTime(rec.ready_at) : null);
  fact(dl, 'Boot time', rec.boot_seconds != null ? fmtDuration(rec.boot_seconds) : null);
  fact(dl, 'Stopped', rec.stopped_at ? fmtTime(rec.stopped_at) : null);
  fact(dl, 'Stop reason', rec.stop_reason);
  fact(dl, 'Last error', rec.last_error);
  fact(dl, 'Directory', rec.dir);
  const s = rec.state;
  $('btn-start').hidden = !['created', 'stopped', 'crashed'].includes(s);
  $('btn-stop').hidden = !['running', 'starting'].includes(s);
  $('btn-kill').hidden = !['running', 'starting', 'stopping'].includes(s);
  const running = s === 'running';
  for (const id of ['run', 'health-btn', 'upload', 'download']) $(id).disabled = !running;
}

async function load() {
  try {
    rec = await api(`/v1/vms/${N}`);
    renderRecord();
    showError(errorBox, null);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      gone = true;
      $('vm-state').textContent = 'deleted';
      $('vm-state').dataset.state = 'deleted';
      showError(errorBox, new Error(`There is no VM ${name} (any more).`));
      for (const b of document.querySelectorAll('main button')) b.disabled = true;
    } else {
      showError(errorBox, e);
    }
  }
}

// ---------------------------------------------------------------- actions
async function act(verb) {
  const asks = {
    start: [`Start VM ${name}?`, 'Start', false],
    stop: [`Stop VM ${name}? The guest is asked to shut down (forced after 30 s).`, 'Stop', true],
    kill: [`Kill VM ${name} now? Unsaved guest data is lost.`, 'Kill', true],
    delete: [`Delete VM ${name}? Its disks are removed; this cannot be undone.`, 'Delete', true],
  };
  const [q, label, danger] = asks[verb];
  if (!await confirmAction(q, label, { danger })) return;
  const buttons = [...document.querySelectorAll('#vm-actions button')];
  buttons.forEach((b) => { b.disabled = true; });
  $('vm-state').textContent = { start: 'starting…', stop: 'stopping…', kill: 'killing…', delete: 'deleting…' }[verb];
  try {
    if (verb === 'start') await api(`/v1/vms/${N}/start?wait=none`, { method: 'POST' });
    else if (verb === 'stop') await api(`/v1/vms/${N}/stop?timeout=30`, { method: 'POST' });
    else if (verb === 'kill') await api(`/v1/vms/${N}/kill`, { method: 'POST' });
    else {
      await api(`/v1/vms/${N}?force=true&stop_timeout=10`, { method: 'DELETE' });
      location.assign('/');
      return;
    }
    announce(`${label}: done`);
  } catch (e) {
    showError(errorBox, e);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
    if (!gone) await load();
  }
}
for (const verb of ['start', 'stop', 'kill', 'delete']) $(`btn-${verb}`).addEventListener('click', () => act(verb));

// ---------------------------------------------------------------- console
const con = $('console');
let conCtl = null;
let conRetry = null;

async function followConsole() {
  clearTimeout(conRetry);
  conCtl?.abort();
  const ctl = new AbortController();
  conCtl = ctl;
  const follow = $('follow').checked;
  con.textContent = '';
  $('console-status').textContent = follow ? 'following…' : '';
  try {
    const r = await api(`/v1/vms/${N}/console?tail=2000${follow ? '&follow=true' : ''}`,
                        { raw: true, signal: ctl.signal });
    await readText(r, (t) => appendTo(con, t), ctl.signal);
    if (ctl !== conCtl) return;
    $('console-status').textContent = follow ? 'the console stream ended (the VM is not running)' : '';
  } catch (e) {
    if (e.name === 'AbortError' || ctl !== conCtl) return;
    $('console-status').textContent = `console: ${e.message}`;
  }
  if (follow && !gone && rec && ['running', 'starting'].includes(rec.state)) {
    conRetry = setTimeout(followConsole, 2000);
  }
}
$('follow').addEventListener('change', followConsole);
const stopConsole = () => { clearTimeout(conRetry); const c = conCtl; conCtl = null; c?.abort(); };
onLeave(stopConsole);
whileVisible(() => { stopConsole(); $('console-status').textContent = 'paused while hidden'; },
             followConsole);

// ---------------------------------------------------------------- exec
const out = $('exec-out');
$('exec-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const cmd = $('cmd').value.trim();
  if (!cmd) return;
  const btn = $('run');
  btn.disabled = true;
  out.textContent = '';
  out.dataset.done = 'false';
  $('exec-status').textContent = `running: ${cmd}`;
  const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
  try {
    const body = { argv: [cmd], shell: true };
    const t = Number($('cmd-timeout').value);
    if (t > 0) body.timeout = t;
    const r = await api(`/v1/vms/${N}/exec`, { method: 'POST', json: body, raw: true });
    await readLines(r, (line) => {
      if (line.stream) {
        appendTo(out, decoders[line.stream].decode(b64bytes(line.data), { stream: true }),
                 { cls: line.stream === 'stderr' ? 'stderr' : undefined });
        return;
      }
      let status;
      if (line.error) status = `could not run: ${line.error.message}`;
      else if (line.timed_out) status = 'timed out';
      else if (line.signal !== null && line.signal !== undefined) status = `killed by signal ${line.signal}`;
      else status = `exit code ${line.exit_code}`;
      if (line.duration !== undefined) status += ` · ${line.duration.toFixed(2)} s`;
      $('exec-status').textContent = status;
      out.dataset.exitCode = String(line.exit_code);
    });
  } catch (err) {
    $('exec-status').textContent = err instanceof ApiError ? err.text : String(err);
  } finally {
    out.dataset.done = 'true';
    btn.disabled = rec?.state !== 'running';
  }
});

// ---------------------------------------------------------------- health
function renderValue(v) {
  if (v === null || v === undefined) return el('span', { class: 'muted', text: '—' });
  if (Array.isArray(v)) return el('ul', {}, v.map((item) => el('li', {}, renderValue(item))));
  if (typeof v === 'object') {
    const dl = el('dl', { class: 'facts' });
    for (const [k, x] of Object.entries(v)) dl.append(el('dt', { text: k }), el('dd', {}, renderValue(x)));
    return dl;
  }
  return document.createTextNode(String(v));
}

function renderHealth(h) {
  const dl = el('dl', { class: 'facts', id: 'health-facts' });
  const add = (label, value) => dl.append(el('dt', { text: label }),
                                          el('dd', {}, value instanceof Node ? value : String(value)));
  const rest = { ...h };
  const take = (k) => { const v = rest[k]; delete rest[k]; return v; };
  const healthy = take('healthy');
  const checks = take('checks') || [];
  add('Healthy', el('span', { class: healthy ? 'ok' : 'error', text: healthy ? 'yes' : 'no' }));
  add('Agent', take('agent') ?? '—');
  const load = take('load');
  if (Array.isArray(load)) add('Load (1, 5, 15 min)', load.map((x) => Number(x).toFixed(2)).join('  '));
  const mem = take('memory');
  if (mem && mem.MemTotal) add('Memory', `${fmtBytes(mem.MemAvailable ?? mem.MemFree)} available of ${fmtBytes(mem.MemTotal)}`);
  const disk = take('disk');
  if (disk && disk.total) add('Disk (/)', `${fmtBytes(disk.free)} free of ${fmtBytes(disk.total)}`);
  const up = take('uptime');
  if (up !== undefined) add('Uptime', fmtDuration(Number(up)));
  const ci = take('cloud_init');
  if (ci) add('cloud-init', `${ci.status || '—'}${ci.errors?.length ? ` (${ci.errors.length} error(s): ${ci.errors.join('; ')})` : ''}`);
  add('Checks', checks.length ? el('ul', {}, checks.map((c) => el('li', { class: c.ok ? 'ok' : 'error' },
    `${c.ok ? '✓' : '✗'} ${c.name}${c.detail ? ` — ${c.detail}` : ''}`))) : 'none in the spec');
  for (const [k, v] of Object.entries(rest)) add(k, renderValue(v));
  return dl;
}

$('health-btn').addEventListener('click', async () => {
  const box = $('health');
  box.textContent = 'checking…';
  try {
    const h = await api(`/v1/vms/${N}/health?timeout=30`);
    box.textContent = '';
    box.append(renderHealth(h));
  } catch (e) {
    box.textContent = '';
    box.append(el('p', { class: 'error', text: e instanceof ApiError ? e.text : String(e) }));
  }
});

// ---------------------------------------------------------------- files
async function sha256hex(file) {
  if (!globalThis.crypto?.subtle || file.size > 256 * 1024 * 1024) return null; // secure contexts only
  const d = await crypto.subtle.digest('SHA-256', await file.arrayBuffer());
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

$('upload-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const file = $('up-file').files[0];
  const path = $('up-path').value.trim();
  const status = $('up-status');
  if (!file || !path.startsWith('/')) {
    status.textContent = 'Choose a file and give an absolute guest path.';
    return;
  }
  const bar = $('up-progress');
  bar.hidden = false;
  bar.value = 0;
  status.textContent = `uploading ${file.name}…`;
  const sha = await sha256hex(file);
  const xhr = new XMLHttpRequest();
  xhr.open('PUT', `/v1/vms/${N}/files?path=${encodeURIComponent(path)}`);
  xhr.setRequestHeader('Content-Type', 'application/octet-stream');
  if (csrf) xhr.setRequestHeader('X-CSRF-Token', csrf);
  if (sha) xhr.setRequestHeader('X-Content-SHA256', sha);
  xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) bar.value = (100 * ev.loaded) / ev.total; };
  xhr.onload = () => {
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
    if (xhr.status === 200) {
      bar.value = 100;
      status.textContent = `uploaded ${body.path} (${body.size} bytes, sha256 ${body.sha256.slice(0, 12)}…, checked in the guest)`;
      status.dataset.done = 'ok';
    } else {
      status.textContent = `upload failed: ${body.message || xhr.status}`;
      status.dataset.done = 'error';
    }
  };
  xhr.onerror = () => { status.textContent = 'upload failed: the connection broke'; status.dataset.done = 'error'; };
  xhr.send(file);
});

$('download-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const path = $('down-path').value.trim();
  const status = $('up-status');
  try {
    const r = await api(`/v1/vms/${N}/files?path=${encodeURIComponent(path)}`, { raw: true });
    const blob = await r.blob();
    const url = URL.createObjectURL(blob);
    const a = el('a', { href: url, download: path.split('/').pop() || 'download' });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    status.textContent = `downloaded ${path} (${blob.size} bytes, sha256 ${(r.headers.get('x-content-sha256') || '').slice(0, 12)}…)`;
  } catch (err) {
    status.textContent = `download failed: ${err instanceof ApiError ? err.text : err}`;
  }
});

// ---------------------------------------------------------------- timeline
async function loadTimeline() {
  const summary = $('timeline-summary');
  summary.textContent = 'loading…';
  try {
    const tl = await api(`/v1/vms/${N}/timeline`);
    summary.textContent = tl.summary;
    const tbody = $('timeline-table').querySelector('tbody');
    tbody.textContent = '';
    for (const p of tl.phases) {
      tbody.append(el('tr', {},
        el('td', { text: '\u00a0\u00a0'.repeat(p.depth) + p.name }),
        el('td', { class: 'num', text: `${p.start.toFixed(2)} s` }),
        el('td', { class: 'num', text: `${p.seconds.toFixed(2)} s` }),
        el('td', { text: p.detail || '' })));
    }
    $('timeline-table').hidden = tl.phases.length === 0;
    const notes = $('timeline-notes');
    notes.textContent = '';
    for (const n of tl.notes) notes.append(el('li', { text: n }));
    const img = $('timeline-img');
    img.alt = `Boot timeline chart of ${name}: ${tl.summary}`;
    img.src = `/v1/vms/${N}/timeline?format=svg&t=${Date.now()}`;
    $('timeline-figure').hidden = tl.phases.length === 0;
  } catch (e) {
    summary.textContent = `timeline: ${e instanceof ApiError ? e.text : e}`;
  }
}
$('timeline-btn').addEventListener('click', loadTimeline);

// ---------------------------------------------------------------- live
let lastState = null;
followEvents((ev) => {
  if (ev.vm !== name) return;
  if (ev.state === 'deleted') { load(); return; }
  if (ev.state) {
    load().then(() => {
      const s = rec?.state;
      if (s !== lastState && ['running', 'starting'].includes(s) && $('follow').checked) followConsole();
      if (ev.state === 'ready') loadTimeline();
      lastState = s;
    });
  }
}, { vm: name, onOpen: load });

load().then(() => {
  lastState = rec?.state;
  followConsole();
  loadTimeline();
  $('cmd').focus();
});
