// The create wizard: five steps of plain form fields; the request is built here, checked by
// POST /v1/validate as the user types (the CLI's own checks: errors with line and column),
// shown as YAML (downloadable for `vmforge run -f`) and sent to POST /v1/vms.
import { api, announce, el, fmtBytes, setupPage, showError } from './common.js';

setupPage();

const form = document.getElementById('wizard');
const sections = [...form.querySelectorAll('section.step')];
const stepButtons = [...document.querySelectorAll('#steps button')];
const $ = (id) => document.getElementById(id);
let step = 0;
let images = [];
let lastResult = null;
let seq = 0;
let timer = null;
let autoFilled = null; // user-data text that came from the SSH key
let bootTouched = false;
let yamlUrl = null;
let showAll = false; // after Review or a submit: every error shows, also of untouched fields
const touched = new Set();

// ---------------------------------------------------------------- steps
function goTo(i, { focus = true } = {}) {
  step = Math.max(0, Math.min(sections.length - 1, i));
  sections.forEach((s, n) => { s.hidden = n !== step; });
  stepButtons.forEach((b, n) => {
    if (n === step) b.setAttribute('aria-current', 'step'); else b.removeAttribute('aria-current');
  });
  if (focus) sections[step].querySelector('h2').focus();
  announce(`Step ${step + 1} of ${sections.length}: ${sections[step].querySelector('h2').textContent}`);
  if (step === sections.length - 1) { showAll = true; validateNow(); }
}

function checkStep(i) {
  if (i === 0) {
    const name = $('name');
    if (!name.value || !name.checkValidity()) {
      touched.add('name');
      setErrors('name', [{ message: name.value ? 'name: use 1-63 letters, digits and “-”, starting and ending with a letter or digit'
                                                : 'name: give the VM a name' }]);
      name.focus();
      return false;
    }
  }
  return true;
}

stepButtons.forEach((b) => b.addEventListener('click', () => goTo(Number(b.dataset.goto))));
form.addEventListener('click', (e) => {
  const t = e.target;
  if (!(t instanceof HTMLButtonElement)) return;
  if (t.classList.contains('next')) { if (checkStep(step)) goTo(step + 1); }
  else if (t.classList.contains('back')) goTo(step - 1);
});

// ---------------------------------------------------------------- images and sources
async function loadImages() {
  const sel = $('image');
  try {
    images = await api('/v1/images');
  } catch (e) {
    images = [];
    setErrors('image', [{ message: `cannot list images: ${e.message}` }]);
  }
  sel.textContent = '';
  if (!images.length) {
    sel.append(el('option', { value: '', text: '(the library is empty: pull or build an image)' }));
  }
  const sorted = [...images].sort((a, b) => a.name.localeCompare(b.name) || b.version - a.version);
  for (const img of sorted) {
    const what = img.files?.disk ? 'disk' : 'kernel';
    sel.append(el('option', { value: img.ref, text: `${img.ref} — ${what} image, ${fmtBytes(img.size)}` }));
  }
  const minimal = sorted.find((i) => i.name === 'minimal');
  if (minimal) sel.value = minimal.ref;
  describeSource();
}

function source() {
  return form.querySelector('input[name="source"]:checked').value;
}

function selectedImage() {
  return images.find((i) => i.ref === $('image').value) || null;
}

function describeSource() {
  const s = source();
  for (const k of ['image', 'backing', 'iso']) form.querySelector(`.source-${k}`).hidden = s !== k;
  const img = selectedImage();
  const help = $('disk-size-help');
  const imgHelp = $('image-help');
  if (s === 'image' && img && !img.files?.disk) {
    imgHelp.textContent = 'A kernel image: the VM boots its kernel directly.';
    help.textContent = 'Optional: a blank data disk of this size.';
  } else if (s === 'image' || s === 'backing') {
    imgHelp.textContent = img ? 'A disk image: the VM gets a copy-on-write overlay of it.' : '';
    help.textContent = 'Optional: grow the boot disk to this size.';
  } else if (s === 'iso') {
    help.textContent = 'The blank disk the installer installs to (default 20 GiB).';
  } else {
    help.textContent = 'The blank disk (required).';
  }
  if (s === 'iso' && !bootTouched) setBootOrder(['cdrom', 'disk']);
}

form.querySelectorAll('input[name="source"]').forEach((r) => r.addEventListener('change', describeSource));
$('image').addEventListener('change', describeSource);

// ---------------------------------------------------------------- boot order
const DEVICES = { disk: 'Disk', cdrom: 'CD-ROM', network: 'Network (PXE)' };
let bootItems = ['disk', 'cdrom', 'network'].map((d) => ({ dev: d, on: false }));

function setBootOrder(devs) {
  bootItems = [...devs.map((d) => ({ dev: d, on: true })),
               ...bootItems.filter((b) => !devs.includes(b.dev)).map((b) => ({ dev: b.dev, on: false }))];
  renderBoot();
}

function renderBoot(focusDev, focusWhat) {
  const ol = $('boot-order');
  ol.textContent = '';
  bootItems.forEach((b, i) => {
    const id = `boot-${b.dev}`;
    const cb = el('input', { type: 'checkbox', id, checked: b.on });
    cb.addEventListener('change', () => { b.on = cb.checked; bootTouched = true; schedule(); });
    const up = el('button', { type: 'button', class: 'secondary', 'aria-label': `Move ${DEVICES[b.dev]} up`,
                              text: '↑', disabled: i === 0 });
    const down = el('button', { type: 'button', class: 'secondary', 'aria-label': `Move ${DEVICES[b.dev]} down`,
                                text: '↓', disabled: i === bootItems.length - 1 });
    up.addEventListener('click', () => move(i, -1, 'up'));
    down.addEventListener('click', () => move(i, 1, 'down'));
    ol.append(el('li', {}, cb, el('label', { for: id, text: DEVICES[b.dev] }), up, down));
    if (b.dev === focusDev) (focusWhat === 'up' ? (i === 0 ? down : up) : (i === bootItems.length - 1 ? up : down)).focus();
  });
}

function move(i, by, what) {
  const j = i + by;
  if (j < 0 || j >= bootItems.length) return;
  [bootItems[i], bootItems[j]] = [bootItems[j], bootItems[i]];
  bootTouched = true;
  renderBoot(bootItems[j].dev, what);
  schedule();
}

// ---------------------------------------------------------------- repeated rows
let uid = 0;
function field(label, input, extra) {
  const id = `f${++uid}`;
  input.id = id;
  return el('div', { class: 'field' }, el('label', { for: id, text: label }), input, extra);
}

function addCdrom(values = {}) {
  const n = $('cdroms').children.length + 1;
  const idIn = el('input', { value: values.id || `cd${n}`, size: 10, spellcheck: 'false', class: 'cd-id' });
  const path = el('input', { value: values.iso_path || '', size: 36, spellcheck: 'false', class: 'cd-path',
                             placeholder: '/srv/isos/drivers.iso' });
  const boot = el('input', { type: 'checkbox', class: 'cd-boot' });
  const bootId = `f${++uid}`;
  boot.id = bootId;
  const row = el('div', { class: 'row cdrom' },
    el('div', { class: 'inline' },
      field('CD-ROM id', idIn), field('ISO path', path),
      el('div', { class: 'field' }, boot, ' ', el('label', { for: bootId, text: 'Bootable' })),
      el('button', { type: 'button', class: 'danger', text: 'Remove', 'aria-label': `Remove CD-ROM ${n}`,
                     onclick: () => { row.remove(); $('add-cdrom').focus(); schedule(); } })));
  $('cdroms').append(row);
  return row;
}

function addForward(list, values = {}) {
  const host = el('input', { type: 'number', min: 0, max: 65535, value: values.host_port ?? '', class: 'fw-host', size: 6 });
  const guest = el('input', { type: 'number', min: 1, max: 65535, value: values.guest_port ?? '', class: 'fw-guest', size: 6 });
  const proto = el('select', { class: 'fw-proto' }, el('option', { value: 'tcp', text: 'TCP' }), el('option', { value: 'udp', text: 'UDP' }));
  const row = el('div', { class: 'inline forward' },
    field('Host port', host), field('Guest port', guest), field('Protocol', proto),
    el('button', { type: 'button', class: 'danger', text: 'Remove', 'aria-label': 'Remove this port forward',
                   onclick: () => { row.remove(); schedule(); } }));
  list.append(row);
  return host;
}

function addNic(values = {}) {
  const n = $('nics').children.length;
  const idIn = el('input', { value: values.id || `net${n}`, size: 10, spellcheck: 'false', class: 'nic-id' });
  const mode = el('select', { class: 'nic-mode' },
    el('option', { value: 'user', text: 'user (NAT, port forwards)' }),
    el('option', { value: 'bridge', text: 'bridge (a host bridge)' }),
    el('option', { value: 'network', text: 'network (a vmforge network)' }));
  const target = el('input', { size: 16, spellcheck: 'false', class: 'nic-target', placeholder: 'br0 / lan' });
  const mac = el('input', { size: 18, spellcheck: 'false', class: 'nic-mac', placeholder: '52:54:00:12:34:56' });
  const forwards = el('div', { class: 'forwards' });
  const targetField = field('Bridge or network name', target);
  const addFw = el('button', { type: 'button', class: 'secondary', text: 'Add a port forward',
                               onclick: () => { addForward(forwards).focus(); schedule(); } });
  const fwBox = el('div', { class: 'fw-box' }, forwards, addFw);
  const sync = () => { targetField.hidden = mode.value === 'user'; fwBox.hidden = mode.value !== 'user'; };
  mode.addEventListener('change', sync);
  const row = el('div', { class: 'row nic' },
    el('div', { class: 'inline' }, field('NIC id', idIn), field('Mode', mode), targetField,
      field('MAC (optional)', mac),
      el('button', { type: 'button', class: 'danger', text: 'Remove NIC', 'aria-label': `Remove NIC ${n}`,
                     onclick: () => { row.remove(); $('add-nic').focus(); schedule(); } })),
    fwBox);
  sync();
  $('nics').append(row);
  for (const f of values.forwards || []) addForward(forwards, f);
  return row;
}

$('add-cdrom').addEventListener('click', () => { addCdrom().querySelector('.cd-path').focus(); schedule(); });
$('add-nic').addEventListener('click', () => { addNic().querySelector('.nic-id').focus(); schedule(); });

// ---------------------------------------------------------------- the request
function num(v) {
  if (v === '' || v === null || v === undefined) return undefined;
  const n = Number(v);
  return Number.isFinite(n) ? n : v;
}

function buildRequest() {
  const spec = {
    cpu_cores: num($('cpus').value),
    memory_mib: num($('memory').value),
    firmware: $('firmware').value,
  };
  if ($('machine').value !== 'q35') spec.machine = $('machine').value;
  const size = num($('disk-size').value);
  const disks = [];
  const cdroms = [];
  const s = source();
  if (s === 'image') {
    const img = selectedImage();
    const ref = $('image').value || undefined;
    if (img && !img.files?.disk) {
      spec.kernel = { image: ref };
      if (size) disks.push({ id: 'data', size_gib: size });
    } else {
      const d = { id: 'boot', image: ref, bootable: true };
      if (size) d.size_gib = size;
      disks.push(d);
    }
  } else if (s === 'backing') {
    const d = { id: 'boot', backing_file: $('backing').value.trim(), bootable: true };
    if (size) d.size_gib = size;
    disks.push(d);
  } else if (s === 'iso') {
    cdroms.push({ id: 'installer', iso_path: $('iso').value.trim(), bootable: true });
    disks.push({ id: 'disk0', size_gib: size || 20 });
  } else {
    const d = { id: 'disk0' };
    if (size) d.size_gib = size;
    disks.push(d);
  }
  for (const row of $('cdroms').children) {
    const c = { id: row.querySelector('.cd-id').value.trim(), iso_path: row.querySelector('.cd-path').value.trim() };
    if (row.querySelector('.cd-boot').checked) c.bootable = true;
    cdroms.push(c);
  }
  if (disks.length) spec.disks = disks;
  if (cdroms.length) spec.cdroms = cdroms;
  const order = bootItems.filter((b) => b.on).map((b) => `BOOT_DEVICE_${b.dev.toUpperCase()}`);
  if (order.length) spec.boot_order = order;

  const nics = [];
  for (const row of $('nics').children) {
    const nic = { id: row.querySelector('.nic-id').value.trim() };
    const mode = row.querySelector('.nic-mode').value;
    if (mode !== 'user') {
      nic.mode = mode;
      nic[mode] = row.querySelector('.nic-target').value.trim();
    }
    const mac = row.querySelector('.nic-mac').value.trim();
    if (mac) nic.mac = mac;
    if (mode === 'user') {
      const fws = [];
      for (const f of row.querySelectorAll('.forward')) {
        const fw = { host_port: num(f.querySelector('.fw-host').value) ?? null,
                     guest_port: num(f.querySelector('.fw-guest').value) ?? null };
        if (f.querySelector('.fw-proto').value !== 'tcp') fw.protocol = f.querySelector('.fw-proto').value;
        fws.push(fw);
      }
      if (fws.length) nic.forwards = fws;
    }
    nics.push(nic);
  }
  const plain = nics.length === 1 && nics[0].id === 'net0' && Object.keys(nics[0]).length === 1;
  if (!plain) spec.nics = nics;

  const ci = {};
  for (const [key, id] of [['user_data', 'user-data'], ['meta_data', 'meta-data'],
                           ['network_config', 'network-config'], ['vendor_data', 'vendor-data']]) {
    const v = $(id).value;
    if (v.trim()) ci[key] = v;
  }
  if (Object.keys(ci).length) spec.cloud_init = ci;
  return { name: $('name').value.trim(), spec };
}

// ---------------------------------------------------------------- validation
const FIELD_INPUT = [
  [/^name$/, 'name'], [/^spec\.cpu_cores/, 'cpus'], [/^spec\.memory_mib/, 'memory'],
  [/^spec\.cloud_init\.user_data/, 'user-data'], [/^spec\.cloud_init\.meta_data/, 'meta-data'],
  [/^spec\.cloud_init\.network_config/, 'network-config'], [/^spec\.cloud_init\.vendor_data/, 'vendor-data'],
  [/^spec\.kernel/, 'image'], [/^spec\.boot_order/, 'boot'], [/^spec\.nics/, 'nic'], [/^ssh_key$/, 'ssh-key'],
];

function inputFor(field) {
  if (!field) return null;
  for (const [re, id] of FIELD_INPUT) if (re.test(field)) return id;
  const s = source();
  let m = /^spec\.disks\[(\d+)\](\.(\w+))?/.exec(field);
  if (m) {
    if (m[3] === 'backing_file') return 'backing';
    if (m[3] === 'image') return 'image';
    return 'disk-size';
  }
  m = /^spec\.cdroms\[(\d+)\]/.exec(field);
  if (m) return s === 'iso' && m[1] === '0' ? 'iso' : 'cdrom';
  return null;
}

const STEP_OF = { name: 0, cpus: 0, memory: 0, image: 1, backing: 1, iso: 1, 'disk-size': 1, boot: 1, cdrom: 1,
                  nic: 2, 'ssh-key': 3, 'user-data': 3, 'meta-data': 3, 'network-config': 3, 'vendor-data': 3 };

function goToField(id, line, column) {
  goTo(STEP_OF[id] ?? 4, { focus: false });
  const input = $(id) || $(`${id}-errors`);
  if (!input) return;
  if (input instanceof HTMLTextAreaElement && line) {
    const lines = input.value.split('\n');
    let pos = 0;
    for (let i = 0; i < Math.min(line - 1, lines.length); i++) pos += lines[i].length + 1;
    pos += Math.max(0, (column || 1) - 1);
    input.focus();
    input.setSelectionRange(pos, Math.min(pos + 1, input.value.length));
    const lh = parseFloat(getComputedStyle(input).lineHeight) || 16;
    input.scrollTop = Math.max(0, (line - 3) * lh);
  } else {
    (input.matches?.('input, select, textarea') ? input : input.previousElementSibling || input).focus?.();
  }
}

function errorItem(err, id, { withField = false } = {}) {
  const li = el('li', { class: 'problem', dataset: { field: err.field || '', line: err.line || '', column: err.column || '' } },
    err.message);
  if (err.line && id) {
    li.append(el('button', { type: 'button', class: 'link', text: `Go to line ${err.line}, column ${err.column}`,
                             onclick: () => goToField(id, err.line, err.column) }));
  } else if (withField && id) {
    li.append(el('button', { type: 'button', class: 'link', text: 'Fix', onclick: () => goToField(id) }));
  }
  if (err.hint && withField) li.append(el('div', { class: 'help', text: err.hint }));
  return li;
}

function setErrors(id, errs) {
  const list = $(`${id}-errors`);
  if (!list) return;
  list.textContent = '';
  for (const e of errs) list.append(errorItem(e, id));
  const input = $(id);
  if (input && input.matches('input, select, textarea')) {
    if (errs.length) input.setAttribute('aria-invalid', 'true'); else input.removeAttribute('aria-invalid');
  }
}

const ERROR_LISTS = ['name', 'cpus', 'memory', 'image', 'backing', 'iso', 'disk-size', 'boot', 'cdrom', 'nic',
                     'ssh-key', 'user-data', 'meta-data', 'network-config', 'vendor-data'];

function show(result) {
  lastResult = result;
  if (result.user_data && ($('user-data').value.trim() === '' || $('user-data').value === autoFilled)) {
    autoFilled = result.user_data;
    $('user-data').value = result.user_data;
  }
  const byInput = Object.fromEntries(ERROR_LISTS.map((k) => [k, []]));
  const stepsWithErrors = new Set();
  const summary = $('summary-list');
  summary.textContent = '';
  for (const e of result.errors) {
    const id = inputFor(e.field);
    if (id && (showAll || touched.has(id) || id !== 'name')) {
      byInput[id].push(e);
      stepsWithErrors.add(STEP_OF[id]);
    }
    summary.append(errorItem(e, id, { withField: true }));
  }
  for (const [id, errs] of Object.entries(byInput)) setErrors(id, errs);
  stepButtons.forEach((b, n) => b.classList.toggle('has-errors', stepsWithErrors.has(n)));
  $('summary').hidden = result.errors.length === 0;
  $('check-status').textContent = result.errors.length
    ? `${result.errors.length} problem${result.errors.length > 1 ? 's' : ''} found.`
    : 'Checked: no problems found.';
  $('yaml').textContent = result.yaml || '(the request does not parse yet: see the problems above)';
  if (yamlUrl) URL.revokeObjectURL(yamlUrl);
  yamlUrl = result.yaml ? URL.createObjectURL(new Blob([result.yaml], { type: 'application/yaml' })) : null;
  const dl = $('download');
  dl.href = yamlUrl || '#';
  dl.setAttribute('download', `${$('name').value.trim() || 'vm'}.yaml`);
  dl.setAttribute('aria-disabled', yamlUrl ? 'false' : 'true');
  form.dataset.checked = String(seq);
}

async function validateNow() {
  clearTimeout(timer);
  const mine = ++seq;
  const body = { request: buildRequest(), plan: true };
  const key = $('ssh-key').value.trim();
  if (key) {
    body.ssh_key = key;
    if ($('ssh-user').value.trim()) body.ssh_user = $('ssh-user').value.trim();
  }
  form.dataset.checking = 'true';
  try {
    const result = await api('/v1/validate', { method: 'POST', json: body });
    if (mine !== seq) return null; // a newer check is on its way
    show(result);
    return result;
  } catch (e) {
    if (mine === seq) showError($('create-error'), e);
    return null;
  } finally {
    if (mine === seq) form.dataset.checking = 'false';
  }
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(validateNow, 350);
}

for (const kind of ['input', 'change']) {
  form.addEventListener(kind, (e) => {
    if (e.target?.id) touched.add(e.target.id);
    schedule();
  });
}
$('download').addEventListener('click', (e) => { if (!yamlUrl) e.preventDefault(); });

// ---------------------------------------------------------------- create
form.addEventListener('submit', async (e) => {
  e.preventDefault();
  if (step !== sections.length - 1) { // Enter in a field: the next step, not a VM
    if (checkStep(step)) goTo(step + 1);
    return;
  }
  const btn = $('create');
  btn.disabled = true;
  showAll = true;
  showError($('create-error'), null);
  try {
    const result = await validateNow();
    if (!result) return;
    if (!result.ok) {
      $('summary').hidden = false;
      $('summary-list').querySelector('button')?.focus();
      announce(`${result.errors.length} problems: nothing was created`);
      return;
    }
    const start = $('start').checked;
    const vm = await api(`/v1/vms?start=${start}&wait=none`, { method: 'POST', json: result.request });
    announce(`VM ${vm.name} created`);
    location.assign(`/?created=${encodeURIComponent(vm.name)}`);
  } catch (err) {
    showError($('create-error'), err);
    $('create-error').focus?.();
  } finally {
    btn.disabled = false;
  }
});

// ---------------------------------------------------------------- start
renderBoot();
addNic({ id: 'net0' });
goTo(0, { focus: false });
$('name').focus();
loadImages().then(schedule);
