// kiln dashboard: the page's script. Everything a device sends reaches the page as
// data and goes into text nodes only (never innerHTML), so no message can add markup.
'use strict';

const state = { devices: new Map(), rollouts: new Map(), open: null, dirty: false };
// Read by the browser test: when the first snapshot was drawn, and how long the last
// update took from the server's send to the page's render.
window.kiln = { firstRenderMs: null, lastUpdateLatencyMs: null, updates: 0 };
const started = performance.now();

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function ago(ms) {
  if (!ms) return '-';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + 's ago';
  if (s < 3600) return Math.round(s / 60) + 'm ago';
  return Math.round(s / 3600) + 'h ago';
}

function moduleText(m) {
  return m.name + ' v' + m.version + ' ' + m.state;
}

function take(message) {
  let data;
  try {
    data = JSON.parse(message.data);
  } catch (e) {
    return;
  }
  for (const d of data.devices || []) state.devices.set(d.device, d);
  for (const r of data.rollouts || []) state.rollouts.set(r.group, r);
  state.sent = data.sent_ms;
  schedule();
}

let pending = false;
function schedule() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    render();
    if (window.kiln.firstRenderMs === null) window.kiln.firstRenderMs = Math.round(performance.now() - started);
    if (state.sent) window.kiln.lastUpdateLatencyMs = Date.now() - state.sent;
    window.kiln.updates += 1;
  });
}

function fillSelect(select, values) {
  const keep = select.value;
  const have = new Set(Array.from(select.options).map((o) => o.value));
  for (const v of Array.from(values).sort()) {
    if (!have.has(v)) select.appendChild(new Option(v, v));
  }
  select.value = keep;
}

function matches(d, f) {
  if (f.group && !(d.groups || []).includes(f.group)) return false;
  if (f.target && d.target !== f.target) return false;
  if (f.version && !(d.modules || []).some((m) => m.name + ' v' + m.version === f.version)) return false;
  if (f.state) {
    const states = (d.modules || []).map((m) => m.state);
    if (d.invalid_count) states.push('invalid');
    if (d.online === false) states.push('offline');
    if (!states.includes(f.state)) return false;
  }
  if (f.text && !d.device.includes(f.text)) return false;
  return true;
}

function render() {
  const f = {
    group: $('f-group').value, target: $('f-target').value, version: $('f-version').value,
    state: $('f-state').value, text: $('f-text').value.trim(),
  };
  const groups = new Set(), targets = new Set(), versions = new Set(), states = new Set(['offline', 'invalid']);
  const counts = new Map();
  const body = document.createDocumentFragment();
  let shown = 0;
  const names = Array.from(state.devices.keys()).sort();
  for (const name of names) {
    const d = state.devices.get(name);
    (d.groups || []).forEach((g) => groups.add(g));
    if (d.target) targets.add(d.target);
    for (const m of d.modules || []) {
      const v = m.name + ' v' + m.version;
      versions.add(v);
      states.add(m.state);
      counts.set(v, (counts.get(v) || 0) + 1);
    }
    if (!matches(d, f)) continue;
    shown += 1;
    const tr = el('tr', null, 'device');
    tr.dataset.device = name;
    tr.appendChild(el('td', name));
    tr.appendChild(el('td', d.online === null ? '?' : d.online ? 'online' : 'offline', d.online ? 'online' : 'offline'));
    tr.appendChild(el('td', d.target || '-'));
    tr.appendChild(el('td', d.kilnd || '-'));
    tr.appendChild(el('td', (d.groups || []).join(', ')));
    const mods = el('td');
    mods.className = 'modules';
    for (const m of d.modules || []) {
      const span = el('span', moduleText(m), m.state);
      span.dataset.module = m.name;
      span.dataset.version = m.version;
      mods.appendChild(span);
      mods.appendChild(el('br'));
    }
    tr.appendChild(mods);
    // Events are not retained: until one arrives, the reported state's last word.
    const reported = (d.modules || []).filter((m) => m.last_event).map((m) => m.name + ' v' + m.version + ': ' + m.last_event);
    const last = el('td', d.last_event ? d.last_event.text : reported.join('; ') || '-', 'last-event');
    if (d.invalid) {
      last.appendChild(el('br'));
      last.appendChild(el('span', 'invalid: ' + d.invalid.why, 'badge invalid'));
    }
    tr.appendChild(last);
    tr.appendChild(el('td', ago(d.last_seen_ms)));
    const t = d.telemetry || {};
    const tele = el('td', t.batches + ' batches');
    if (t.gaps) tele.appendChild(el('div', t.gaps + ' gaps (' + (t.last_gap || '') + ')', 'bad gap'));
    if (t.duplicates) tele.appendChild(el('div', t.duplicates + ' duplicates', 'warn duplicate'));
    tr.appendChild(tele);
    tr.addEventListener('click', () => openDevice(name));
    body.appendChild(tr);
  }
  const tbody = $('devices');
  tbody.replaceChildren(body);
  fillSelect($('f-group'), groups);
  fillSelect($('f-target'), targets);
  fillSelect($('f-version'), versions);
  fillSelect($('f-state'), states);
  const c = $('counts');
  c.replaceChildren();
  for (const [v, n] of Array.from(counts.entries()).sort()) {
    const s = el('span', v + ': ' + n + ' devices');
    s.dataset.version = v;
    c.appendChild(s);
  }
  $('total').textContent = shown + ' of ' + state.devices.size + ' devices';
  renderRollouts();
}

function renderRollouts() {
  const list = $('rollout-list');
  list.replaceChildren();
  $('rollouts').hidden = state.rollouts.size === 0;
  for (const r of state.rollouts.values()) {
    const box = el('div', null, 'rollout');
    box.dataset.group = r.group;
    if (r.invalid) {
      box.appendChild(el('p', 'group ' + r.group + ': invalid rollout record: ' + r.invalid, 'bad'));
      list.appendChild(box);
      continue;
    }
    box.appendChild(el('p', 'group ' + r.group + ': ' + r.release + ' - ' + r.phase, 'phase'));
    if (r.cohort && r.cohort.length) box.appendChild(el('p', 'cohort: --where ' + r.cohort.join(' --where '), 'cohort'));
    const c = r.counts;
    box.appendChild(el('p', c.committed + ' committed, ' + c.failed + ' failed, ' + c.pending + ' pending, ' + c.waiting + ' waiting; started by ' + r.started_by, 'muted'));
    r.waves.forEach((wave, i) => {
      const w = el('div', 'wave ' + (i + 1) + ': ');
      for (const d of wave) {
        const chip = el('span', d.device + (d.why ? ' (' + d.why + ')' : ''), 'chip ' + d.outcome);
        chip.title = d.outcome + (d.returned ? ', given back' : '');
        w.appendChild(chip);
      }
      box.appendChild(w);
    });
    for (const [device, why] of r.skipped || []) box.appendChild(el('div', 'left out: ' + device + ': ' + why, 'muted'));
    for (const g of r.gates || []) box.appendChild(gateTable(g));
    const h = el('ul', null, 'history');
    for (const line of (r.history || []).slice(-10)) h.appendChild(el('li', new Date(line.at_ms).toLocaleTimeString() + ' ' + line.text));
    box.appendChild(h);
    list.appendChild(box);
  }
}

// A value of a gate's signal: rates are small, so significant digits, not decimals.
function num(v) {
  return v === null || v === undefined ? '-' : String(Number(v.toPrecision(4)));
}

// One gate of a rollout: a row per started wave, its signal in the wave, the control
// and the baseline (devices reporting in brackets), the limit, and the verdict.
function gateTable(g) {
  const box = el('div', null, 'gate');
  box.dataset.gate = g.gate;
  box.appendChild(el('div', 'gate ' + g.gate, g.error ? 'bad' : 'muted'));
  if (g.error) {
    box.appendChild(el('div', g.error, 'bad'));
    return box;
  }
  const t = el('table', null, 'gates');
  const head = el('tr');
  for (const h of ['wave', 'wave value', 'control', 'baseline', 'bound', 'verdict']) head.appendChild(el('th', h));
  t.appendChild(head);
  const level = (l) => num(l.value) + ' (' + l.devices + ')';
  for (const w of g.waves) {
    const tr = el('tr', null, w.verdict === 'breach' ? 'bad' : '');
    tr.dataset.wave = w.wave;
    tr.appendChild(el('td', w.wave));
    tr.appendChild(el('td', level(w.wave_value)));
    tr.appendChild(el('td', level(w.control) + (w.control_is_baseline ? ' = baseline' : '')));
    tr.appendChild(el('td', level(w.baseline)));
    tr.appendChild(el('td', num(w.limit) + ' (' + w.bound + (w.min > 1 ? ', min ' + w.min : '') + ')'));
    const v = el('td', w.verdict === 'not yet judged' ? w.verdict + ' (now ' + w.now + ')' : w.verdict, 'verdict');
    if (w.line) v.title = w.line;
    tr.appendChild(v);
    t.appendChild(tr);
  }
  box.appendChild(t);
  return box;
}

function chart(name, series) {
  const box = el('div', null, 'chart');
  box.dataset.series = name;
  box.appendChild(el('div', name, 'muted'));
  const pts = series.points || [];
  if (pts.length === 0) {
    box.appendChild(el('div', series.text === null ? '-' : series.text, 'text'));
    return box;
  }
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 200 60');
  svg.setAttribute('preserveAspectRatio', 'none');
  const xs = pts.map((p) => Number(p[0])), ys = pts.map((p) => Number(p[1]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => (x1 === x0 ? 100 : ((x - x0) / (x1 - x0)) * 200);
  const sy = (y) => (y1 === y0 ? 30 : 58 - ((y - y0) / (y1 - y0)) * 56);
  if (pts.length === 1) {
    const dot = document.createElementNS(ns, 'circle');
    dot.setAttribute('cx', '100');
    dot.setAttribute('cy', '30');
    dot.setAttribute('r', '2');
    svg.appendChild(dot);
  }
  const line = document.createElementNS(ns, 'polyline');
  line.setAttribute('points', pts.map((p) => sx(Number(p[0])).toFixed(1) + ',' + sy(Number(p[1])).toFixed(1)).join(' '));
  svg.appendChild(line);
  box.appendChild(svg);
  box.appendChild(el('div', 'last ' + ys[ys.length - 1] + ' (min ' + y0 + ', max ' + y1 + ')', 'muted'));
  return box;
}

async function openDevice(name) {
  state.open = name;
  location.hash = 'device=' + encodeURIComponent(name);
  await refreshDevice();
}

async function refreshDevice() {
  const name = state.open;
  if (!name) return;
  let d;
  try {
    const r = await fetch('/device/' + encodeURIComponent(name));
    if (!r.ok) return;
    d = await r.json();
  } catch (e) {
    return;
  }
  if (state.open !== name) return;
  $('device').hidden = false;
  $('d-name').textContent = name;
  const s = $('d-summary');
  s.replaceChildren();
  for (const m of d.modules || []) s.appendChild(el('div', moduleText(m) + ' - ' + m.last_event, m.state));
  s.appendChild(el('div', 'kilnd ' + (d.kilnd || '-') + ' on ' + (d.target || '-') + ', identity ' + (d.identity || '-'), 'muted'));
  const h = $('d-history');
  h.replaceChildren();
  const history = (d.history || []).slice().sort((a, b) => b.at_ms - a.at_ms);
  for (const e of history) h.appendChild(el('li', new Date(e.at_ms).toLocaleTimeString() + ' ' + e.module + ': ' + e.what));
  const charts = $('d-charts');
  charts.replaceChildren();
  for (const [k, v] of Object.entries(d.series || {})) charts.appendChild(chart(k, v));
  const inv = $('d-invalid');
  inv.replaceChildren();
  for (const i of d.invalid_messages || []) inv.appendChild(el('li', new Date(i.at_ms).toLocaleTimeString() + ' ' + i.why, 'bad'));
}

$('d-close').addEventListener('click', (e) => {
  e.preventDefault();
  state.open = null;
  location.hash = '';
  $('device').hidden = true;
});
for (const id of ['f-group', 'f-target', 'f-version', 'f-state', 'f-text']) $(id).addEventListener('input', schedule);
setInterval(refreshDevice, 2000);
setInterval(schedule, 5000); // "seen ... ago" moves on

const hash = decodeURIComponent(location.hash.replace(/^#device=/, ''));
if (hash && hash !== location.hash) openDevice(hash);

function connect() {
  const source = new EventSource('/events');
  source.addEventListener('snapshot', (m) => { state.devices.clear(); take(m); });
  source.addEventListener('update', take);
  source.onopen = () => { $('conn').textContent = 'live'; $('conn').className = 'live'; };
  source.onerror = () => { $('conn').textContent = 'reconnecting...'; $('conn').className = ''; };
}
connect();
