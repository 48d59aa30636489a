// The image library: versions, sizes, lineage and users; pull and import as jobs with live
// progress (the event stream, with the job's record as a fallback); delete (refused in use).
import {
  api, ApiError, announce, confirmAction, el, fmtBytes, fmtTime, followEvents, setupPage, showError,
} from './common.js';

setupPage();

const $ = (id) => document.getElementById(id);
const tbody = document.querySelector('#images tbody');
const errorBox = $('error');
const jobs = new Map(); // id -> { box, bar, pct, msg, job }
const rows = new Map(); // ref -> { key, tr }

// ---------------------------------------------------------------- library
async function loadImages() {
  let list;
  try {
    list = await api('/v1/images');
  } catch (e) {
    showError(errorBox, e);
    return;
  }
  const details = await Promise.all(list.map((i) => api(`/v1/images/${encodeURIComponent(i.ref)}`).catch(() => i)));
  details.sort((a, b) => a.name.localeCompare(b.name) || b.version - a.version);
  // Rows are replaced only when their image changed: focus and references stay put.
  const keep = new Map();
  for (const img of details) {
    const key = JSON.stringify(img);
    const old = rows.get(img.ref);
    keep.set(img.ref, old && old.key === key ? old : { key, tr: row(img) });
  }
  for (const [ref, r] of rows) {
    if (!keep.has(ref)) r.tr.remove();
    else if (keep.get(ref) !== r) r.tr.replaceWith(keep.get(ref).tr);
  }
  let at = tbody.firstChild;
  for (const img of details) {
    const r = keep.get(img.ref);
    if (r.tr !== at) tbody.insertBefore(r.tr, at); else at = at.nextSibling;
  }
  rows.clear();
  for (const [ref, r] of keep) rows.set(ref, r);
  $('empty').hidden = details.length > 0;
}

function row(img) {
  const lineage = img.lineage?.length ? [...img.lineage].reverse().concat([img.ref]).join(' → ') : '';
  const lineageCell = el('td', { dataset: { label: 'Lineage' }, class: 'lineage' });
  if (lineage) lineageCell.append(el('div', { text: lineage }));
  if (img.child_images?.length) lineageCell.append(el('div', { text: `${img.ref} → ${img.child_images.join(', ')}` }));
  if (!lineageCell.childNodes.length) lineageCell.append(el('span', { class: 'muted', text: img.source ? `from ${img.source}` : '—' }));
  const users = el('td', { dataset: { label: 'Used by' }, class: 'users' });
  for (const vm of img.used_by_vms || []) {
    users.append(el('a', { href: `/vms/${encodeURIComponent(vm)}`, text: vm }), ' ');
  }
  for (const child of img.child_images || []) users.append(el('span', { text: `image ${child}` }), ' ');
  if (!users.childNodes.length) users.append(el('span', { class: 'muted', text: 'nothing' }));
  const del = el('button', { type: 'button', class: 'danger', text: 'Delete', 'aria-label': `Delete image ${img.ref}`,
                             onclick: () => remove(img) });
  return el('tr', { dataset: { ref: img.ref } },
    el('td', { dataset: { label: 'Image' } }, el('strong', { text: img.name }), `:${img.version}`),
    el('td', { dataset: { label: 'Kind' }, text: [img.kind, img.format].filter(Boolean).join(' · ') }),
    el('td', { dataset: { label: 'Size' }, class: 'num', text: fmtBytes(img.size) }),
    el('td', { dataset: { label: 'Virtual size' }, class: 'num', text: img.virtual_size ? fmtBytes(img.virtual_size) : '—' }),
    el('td', { dataset: { label: 'Created' }, text: fmtTime(img.created_at) }),
    lineageCell, users,
    el('td', { dataset: { label: 'Actions' } }, del));
}

async function remove(img) {
  const users = img.used_by_vms?.length ? ` It is used by ${img.used_by_vms.join(', ')}: the daemon will refuse.` : '';
  if (!await confirmAction(`Delete image ${img.ref}?${users}`, 'Delete')) return;
  try {
    await api(`/v1/images/${encodeURIComponent(img.ref)}`, { method: 'DELETE' });
    showError(errorBox, null);
    announce(`image ${img.ref} deleted`);
  } catch (e) {
    showError(errorBox, e instanceof ApiError ? new Error(`Not deleted: ${e.text}`) : e);
    errorBox.focus();
  }
  loadImages();
}

// ---------------------------------------------------------------- jobs
function label(job) {
  const verb = { 'image.pull': 'Pull', 'image.import': 'Import', 'image.build': 'Build' }[job.kind] || job.kind;
  return `${verb} ${job.target || ''}`.trim();
}

function jobBox(job) {
  let j = jobs.get(job.id);
  if (j) return j;
  $('no-jobs')?.remove();
  const title = label(job);
  const bar = el('progress', { max: 100, 'aria-label': `${title}: progress` });
  const pct = el('span', { class: 'pct', 'aria-hidden': 'true' });
  const msg = el('div', { class: 'help msg', role: 'status' });
  const box = el('div', { class: 'job', dataset: { job: job.id, state: 'running' } },
    el('div', {}, el('strong', { text: title })), bar, pct, msg);
  $('jobs').prepend(box);
  box.scrollIntoView({ block: 'nearest' });
  j = { box, bar, pct, msg, job };
  jobs.set(job.id, j);
  return j;
}

function update(j, { state, done, total, message, error }) {
  if (j.box.dataset.state !== 'running' && !state) return; // late progress after the end
  if (done !== undefined && done !== null) {
    if (total) {
      const p = Math.min(100, (100 * done) / total);
      j.bar.value = p;
      j.pct.textContent = `${Math.floor(p)} %`;
      j.msg.textContent = `${fmtBytes(done)} of ${fmtBytes(total)}`;
    } else {
      j.bar.removeAttribute('value');
      j.pct.textContent = fmtBytes(done);
    }
  }
  if (message && !state && !total) j.msg.textContent = message;
  if (state && state !== 'running') {
    j.box.dataset.state = state;
    if (state === 'succeeded') {
      j.bar.value = 100;
      j.pct.textContent = '100 %';
      const r = j.job.result;
      j.msg.textContent = r?.ref ? `done: ${r.ref} stored (${fmtBytes(r.size)})` : 'done';
      j.msg.className = 'ok msg';
      announce(`${label(j.job)}: done`);
      loadImages();
    } else {
      j.msg.textContent = `failed: ${error?.message || message || 'unknown error'}`;
      j.msg.className = 'error msg';
      announce(`${label(j.job)}: failed`);
    }
    clearInterval(j.poll);
  }
}

async function syncJob(id) {
  try {
    const job = await api(`/v1/jobs/${id}`);
    const j = jobBox(job);
    j.job = job;
    update(j, { done: job.done, total: job.total, message: job.message });
    if (job.state !== 'running') update(j, { state: job.state, error: job.error, message: job.message });
  } catch { /* the next event or poll */ }
}

function track(job) {
  const j = jobBox(job);
  j.job = job;
  // The event stream carries progress; the job's record is read too, in case events were missed.
  j.poll = setInterval(() => syncJob(job.id), 1500);
  syncJob(job.id);
}

followEvents((ev) => {
  if (ev.kind !== 'job' || !ev.job) return;
  const j = jobs.get(ev.job);
  if (!j) {
    if (ev.phase === 'started' && String(ev.data?.kind || '').startsWith('image.')) syncJob(ev.job).then(() => {
      const k = jobs.get(ev.job);
      if (k && k.job.state === 'running') track(k.job);
    });
    return;
  }
  if (ev.phase === 'succeeded' || ev.phase === 'failed') { syncJob(ev.job); return; }
  update(j, { done: ev.data?.done, total: ev.data?.total, message: ev.message });
}, { onOpen: loadImages });

async function submitJob(path, body, button) {
  button.disabled = true;
  try {
    const job = await api(path, { method: 'POST', json: body });
    showError(errorBox, null);
    track(job);
    announce(`${label(job)} started`);
    return true;
  } catch (e) {
    showError(errorBox, e);
    errorBox.focus();
    return false;
  } finally {
    button.disabled = false;
  }
}

$('pull-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const body = { url: $('pull-url').value.trim(), name: $('pull-name').value.trim() };
  const sha = $('pull-sha').value.trim();
  const sums = $('pull-sums').value.trim();
  if (sha) body.sha256 = sha;
  if (sums) body.sha256sums_url = sums;
  await submitJob('/v1/images/pull', body, $('pull'));
});

$('import-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  await submitJob('/v1/images/import', { path: $('import-path').value.trim(), name: $('import-name').value.trim() },
                  $('import'));
});

// Jobs still running from before this page was opened.
api('/v1/jobs').then((list) => {
  for (const job of list) if (job.kind.startsWith('image.') && job.state === 'running') track(job);
}).catch(() => {});
loadImages();
