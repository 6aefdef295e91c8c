// New-job page: a form generated from the registry's schemas (GET /optimizers, /tasks), checked
// in the browser against the same ranges, previewing the runs it creates, submitted to POST /jobs.
// The API's 422 errors (detail[].loc) are shown next to the field they name.

import { ApiError, errorText, get, getKey, post } from './api.js';
import { initKeyBox, onKeyChange } from './common.js';
import { $, $$, banner, fill, h, stateBlock } from './dom.js';
import { checkValue, parseList, parseNumber, rangeHint, runCount, runLabels } from './stats.js';

// The server's name rule (worker/spec.py valid_name): letters and digits of any script (with their
// combining marks), spaces and ._+-, starting with a letter or digit; 1-80 characters.
const NAME_PATTERN = /^[\p{L}\p{N}][\p{L}\p{M}\p{N} ._+-]{0,79}$/u;

const MAX_RUNS = 256;
const DEFAULT_OPTIMIZERS = ['adamw', 'dykaf'];
const JOB_FIELDS = ['name', 'seeds', 'target_loss', 'device', 'sweep_selection'];

const state = {
  optimizers: [], // registry schemas
  byName: new Map(),
  taskSchema: null,
  jobSchema: null,
  fields: [], // {loc: () => string[], read: () => {value, error, skip}, el, container}
  cards: [],
  uid: 0,
  submitting: false,
};

// ------------------------------------------------------------------ schema helpers

function deref(schema, defs) {
  if (schema && schema.$ref) return defs[schema.$ref.split('/').pop()];
  return schema;
}

/** For `anyOf: [X, null]` returns X (the field is optional); otherwise null. */
function nullableInner(schema) {
  if (!schema || !Array.isArray(schema.anyOf)) return null;
  const rest = schema.anyOf.filter((s) => s.type !== 'null');
  return rest.length === 1 && rest.length < schema.anyOf.length ? rest[0] : null;
}

/** Schema descriptions come from Python docstrings: drop reStructuredText double backquotes. */
function clean(text) {
  return text ? String(text).replace(/``/g, '') : text;
}

function humanize(key) {
  return key.replace(/_/g, ' ');
}

let idCounter = 0;
const nextId = (prefix) => `${prefix}-${(idCounter += 1)}`;

// ------------------------------------------------------------------ fields

/**
 * A form field for one scalar schema entry. `loc` is a function (optimizer cards move when one is
 * removed). The returned record reads and validates the value.
 */
function scalarField({ key, schema, loc, value, title, optional = false, hint }) {
  const id = nextId('f');
  const inner = nullableInner(schema);
  const base = inner || schema;
  const isOptional = optional || Boolean(inner) || schema.nullable === true;
  const type = base.type || (base.const !== undefined ? 'string' : 'string');
  const listLike = Array.isArray(schema.anyOf) && schema.anyOf.some((s) => s.type === 'array');
  let input;
  let kind;
  if (base.enum) {
    kind = 'enum';
    input = h('select', { id }, (isOptional ? [h('option', { value: '', text: '(none)' })] : []).concat(
      base.enum.map((v) => h('option', { value: v, text: v }))));
  } else if (type === 'boolean') {
    kind = 'boolean';
    input = h('input', { id, type: 'checkbox' });
  } else if (listLike) {
    kind = 'list';
    input = h('input', { id, type: 'text', placeholder: schema.default === 'auto' ? 'auto, or names separated by commas' : 'comma-separated' });
  } else if (type === 'number' || type === 'integer') {
    kind = type;
    input = h('input', { id, type: 'text', inputmode: type === 'integer' ? 'numeric' : 'decimal', autocomplete: 'off', spellcheck: 'false' });
  } else {
    kind = 'string';
    input = h('input', { id, type: 'text', autocomplete: 'off', spellcheck: 'false' });
  }
  const check = { ...base, optional: isOptional, nullable: isOptional };
  const error = h('div', { class: 'field-error', id: `${id}-error`, 'aria-live': 'polite' });
  input.setAttribute('aria-describedby', `${id}-error`);
  const range = (kind === 'number' || kind === 'integer') ? rangeHint(check) : '';
  const container = h('div', { class: `field${kind === 'boolean' ? ' checkbox' : ''}` },
    kind === 'boolean' ? [input, h('label', { for: id, text: title || humanize(key) })] : [h('label', { for: id, text: title || humanize(key) }), input],
    range ? h('span', { class: 'range', text: range }) : null,
    hint || schema.description || schema.help ? h('span', { class: 'hint', text: clean(hint || schema.description || schema.help) }) : null,
    error);

  const set = (v) => {
    if (kind === 'boolean') input.checked = Boolean(v);
    else if (kind === 'list') input.value = Array.isArray(v) ? v.join(', ') : (v ?? '');
    else input.value = v === null || v === undefined ? '' : String(v);
  };
  set(value !== undefined ? value : schema.default);

  const read = () => {
    let v;
    if (kind === 'boolean') v = input.checked;
    else if (kind === 'enum') v = input.value === '' ? null : input.value;
    else if (kind === 'list') {
      const text = input.value.trim();
      if (text === '' ) v = isOptional ? null : schema.default;
      else if (text === 'auto' && schema.default === 'auto') v = 'auto';
      else v = parseList(text, 'string').values;
      return { value: v, error: null };
    } else if (kind === 'number' || kind === 'integer') {
      const parsed = parseNumber(input.value);
      if (parsed === undefined) v = null;
      else if (Number.isNaN(parsed)) return { value: undefined, error: 'not a number' };
      else v = parsed;
    } else {
      v = input.value.trim() === '' ? null : input.value;
    }
    if (v === null && !isOptional && schema.default !== undefined && kind !== 'string') {
      return { value: undefined, error: 'a value is required' };
    }
    if (v === null && kind === 'string' && !isOptional) return { value: undefined, error: 'a value is required' };
    return { value: v, error: checkValue(check, v) };
  };
  const record = { key, loc, read, set, input, container, error, kind, schema, defaultValue: schema.default };
  input.addEventListener(kind === 'boolean' || kind === 'enum' ? 'change' : 'input', () => {
    validateField(record);
    updatePreview();
  });
  input.addEventListener('blur', () => validateField(record, true));
  return record;
}

function showFieldError(record, message) {
  record.error.textContent = message || '';
  record.input.setAttribute('aria-invalid', message ? 'true' : 'false');
}

function validateField(record, onBlur = false) {
  const { error } = record.read();
  const extra = record.extraCheck ? record.extraCheck() : null;
  const message = error || extra;
  // While typing, only clear errors or show a range problem; blank-field errors wait for blur/submit.
  if (!message || onBlur || record.input.value.trim() !== '') showFieldError(record, message);
  return !message;
}

function register(record) {
  record.input.dataset.loc = record.loc().join('.');
  state.fields.push(record);
  return record;
}

// ------------------------------------------------------------------ job and task sections

function jobSection(values = {}) {
  const props = state.jobSchema.properties;
  const fs = h('fieldset', { dataset: { loc: '' } }, h('legend', { text: 'Job' }));
  const grid = h('div', { class: 'fields' });
  const name = register(scalarField({ key: 'name', schema: props.name, loc: () => ['name'], value: values.name, hint: '1–80 letters, digits, spaces or ._+-' }));
  name.extraCheck = () => (NAME_PATTERN.test(name.input.value) ? null : 'use 1–80 letters, digits, spaces or ._+- (starting with a letter or digit)');
  const seedsSchema = { type: 'string', default: '0', description: 'integers separated by commas; every optimizer config runs once per seed' };
  const seeds = register(scalarField({ key: 'seeds', schema: seedsSchema, loc: () => ['seeds'], value: (values.seeds || props.seeds.default || [0]).join(', ') }));
  seeds.read = () => {
    const { values: list, error } = parseList(seeds.input.value, 'integer');
    if (error) return { value: undefined, error };
    if (list.length === 0) return { value: undefined, error: 'at least one seed' };
    if (new Set(list).size !== list.length) return { value: undefined, error: 'seeds must be distinct' };
    if (list.some((s) => s < 0 || s >= 2 ** 31)) return { value: undefined, error: 'seeds must be in [0, 2³¹)' };
    if (list.length > (props.seeds.maxItems || 32)) return { value: undefined, error: `at most ${props.seeds.maxItems || 32} seeds` };
    return { value: list, error: null };
  };
  const target = register(scalarField({ key: 'target_loss', schema: props.target_loss, loc: () => ['target_loss'], value: values.target_loss, title: 'target loss' }));
  target.input.placeholder = 'optional, e.g. 2.5';
  const device = register(scalarField({ key: 'device', schema: props.device, loc: () => ['device'], value: values.device }));
  const selection = register(scalarField({ key: 'sweep_selection', schema: props.sweep_selection, loc: () => ['sweep_selection'], value: values.sweep_selection, title: 'sweep selection' }));
  for (const r of [name, seeds, target, device, selection]) grid.append(r.container);
  fs.append(grid, h('div', { class: 'group-error', dataset: { groupLoc: '' } }));
  return fs;
}

const TASK_GROUPS = [
  ['Model', ['kind', 'n_layer', 'n_head', 'd_model', 'context', 'dropout', 'tie_weights']],
  ['Batch and schedule', ['batch_size', 'grad_accum', 'devices_per_run', 'distributed', 'steps', 'warmup_steps', 'schedule', 'min_lr_ratio', 'grad_clip']],
  ['Measurement', ['eval_every', 'eval_batches', 'log_every', 'fisher_every', 'fisher_window', 'fisher_layers', 'checkpoint_every']],
];

/** Render an object schema's properties under `path` into fieldsets (nested objects get their own). */
function objectFields(schema, defs, path, values, groups = null) {
  const out = [];
  const props = schema.properties || {};
  const scalarKeys = [];
  const nested = [];
  for (const [key, prop] of Object.entries(props)) {
    const inner = nullableInner(prop);
    const target = prop.$ref ? prop : (inner && inner.$ref ? inner : null);
    if (target) nested.push([key, prop, deref(target, defs), Boolean(inner)]);
    else scalarKeys.push(key);
  }
  const makeGrid = (keys) => {
    const grid = h('div', { class: 'fields' });
    for (const key of keys) {
      const loc = [...path, key];
      const record = register(scalarField({ key, schema: props[key], loc: () => loc, value: values ? values[key] : undefined }));
      grid.append(record.container);
    }
    return grid;
  };
  if (groups) {
    const used = new Set();
    for (const [title, keys] of groups) {
      const present = keys.filter((k) => scalarKeys.includes(k));
      present.forEach((k) => used.add(k));
      if (present.length) out.push(h('fieldset', {}, h('legend', { text: title }), makeGrid(present)));
    }
    const rest = scalarKeys.filter((k) => !used.has(k));
    if (rest.length) out.push(h('fieldset', {}, h('legend', { text: 'Other' }), makeGrid(rest)));
  } else if (scalarKeys.length) {
    out.push(makeGrid(scalarKeys));
  }
  for (const [key, , sub, optional] of nested) {
    const loc = [...path, key];
    const subValues = values ? values[key] : undefined;
    const legend = h('legend', { text: sub.description ? `${humanize(key)} — ${clean(sub.description)}` : humanize(key) });
    const body = h('div', {}, objectFields(sub, defs, loc, subValues || undefined));
    const fs = h('fieldset', { dataset: { loc: loc.join('.'), group: '1' } }, legend);
    if (optional) {
      const id = nextId('opt');
      const toggle = h('input', { id, type: 'checkbox', checked: Boolean(subValues) });
      const sync = () => {
        body.classList.toggle('hidden', !toggle.checked);
        fs.dataset.enabled = toggle.checked ? '1' : '0';
        updatePreview();
      };
      toggle.addEventListener('change', sync);
      fs.append(h('div', { class: 'field checkbox' }, toggle, h('label', { for: id, text: `set ${humanize(key)}` })));
      fs.dataset.optional = '1';
      fs.append(body);
      sync();
    } else {
      fs.append(body);
    }
    fs.append(h('div', { class: 'group-error', dataset: { groupLoc: loc.join('.') } }));
    out.push(fs);
  }
  return out;
}

function taskSection(values) {
  const schema = state.taskSchema;
  const defs = schema.$defs || {};
  const fs = h('fieldset', { dataset: { loc: 'task' } }, h('legend', { text: 'Task' }),
    h('div', { class: 'group-error', dataset: { groupLoc: 'task' } }),
    objectFields(schema, defs, ['task'], values, TASK_GROUPS));
  return fs;
}

// ------------------------------------------------------------------ optimizer cards

function cardIndex(card) {
  return state.cards.indexOf(card);
}

function addCard(name, values = {}) {
  const schema = state.byName.get(name);
  if (!schema) return null;
  const card = { uid: (state.uid += 1), name, records: [], sweeps: [] };
  const loc = (...rest) => () => ['optimizers', cardIndex(card), ...rest];
  const el = h('div', { class: 'opt-card', dataset: { optimizer: name } });
  card.el = el;
  const removeBtn = h('button', { type: 'button', class: 'small', text: 'Remove', 'aria-label': `Remove ${name}` });
  removeBtn.addEventListener('click', () => {
    state.cards = state.cards.filter((c) => c !== card);
    state.fields = state.fields.filter((f) => !card.records.includes(f) && !card.sweeps.includes(f));
    el.remove();
    refreshLocs();
    updatePreview();
  });
  const labelRecord = register(scalarField({
    key: 'label', schema: { type: 'string', default: null, description: 'shown in charts and tables; must be unique in the job' },
    loc: loc('label'), value: values.label ?? null, optional: true,
  }));
  labelRecord.input.placeholder = name;
  labelRecord.extraCheck = () => {
    const text = labelRecord.input.value.trim();
    if (text && !NAME_PATTERN.test(text)) return 'use 1–80 letters, digits, spaces or ._+-';
    const mine = text || name;
    const clash = state.cards.some((c) => c !== card && (c.labelRecord.input.value.trim() || c.name) === mine);
    return clash ? `label “${mine}” is already used; set a different label` : null;
  };
  card.labelRecord = labelRecord;
  card.records.push(labelRecord);
  const grid = h('div', { class: 'fields' });
  const hyper = values.hyperparameters || {};
  const sweep = values.sweep || {};
  for (const [hp, hs] of Object.entries(schema.hyperparameters)) {
    const record = register(scalarField({ key: hp, schema: hs, loc: loc('hyperparameters', hp), value: hp in hyper ? hyper[hp] : hs.default }));
    card.records.push(record);
    // Sweep values for this hyperparameter (a grid over all swept hyperparameters).
    const sweepId = nextId('sweep');
    const sweepInput = h('input', {
      id: sweepId, type: 'text', class: 'sweep', placeholder: 'sweep: values, comma-separated',
      'aria-label': `${hp} sweep values`, 'aria-describedby': `${sweepId}-error`,
    });
    if (sweep[hp]) sweepInput.value = sweep[hp].join(', ');
    const sweepError = h('div', { class: 'field-error', id: `${sweepId}-error`, 'aria-live': 'polite' });
    const sweepRecord = {
      key: hp, loc: loc('sweep', hp), input: sweepInput, error: sweepError, container: null, kind: 'sweep',
      read: () => {
        const text = sweepInput.value.trim();
        if (!text) return { value: undefined, error: null, skip: true };
        const type = hs.type === 'integer' ? 'integer' : hs.type === 'boolean' ? 'boolean' : hs.type === 'string' ? 'string' : 'number';
        const { values: list, error } = parseList(text, type);
        if (error) return { value: undefined, error };
        if (list.length > 16) return { value: undefined, error: 'at most 16 values' };
        for (const v of list) {
          const problem = checkValue(hs, v);
          if (problem) return { value: undefined, error: `${v}: ${problem}` };
        }
        return { value: list, error: null };
      },
    };
    sweepInput.addEventListener('input', () => {
      validateField(sweepRecord);
      updatePreview();
    });
    register(sweepRecord);
    card.sweeps.push(sweepRecord);
    if (hs.type !== 'boolean') record.container.insertBefore(sweepInput, record.error);
    record.container.append(sweepError);
    record.defaultValue = hs.default;
    grid.append(record.container);
  }
  el.append(
    h('header', {}, h('h3', { text: name }), h('span', { class: 'muted small', text: schema.source ? `from ${schema.source}` : '' }), h('span', { class: 'spacer' }), removeBtn),
    h('p', { class: 'desc', text: schema.description }),
    h('div', { class: 'fields' }, labelRecord.container),
    h('details', { open: true }, h('summary', { text: 'hyperparameters (defaults from the registry)' }), grid),
    h('div', { class: 'group-error', dataset: { groupLoc: '' } }));
  state.cards.push(card);
  $('#cards').append(el);
  refreshLocs();
  return card;
}

/** Keep data-loc attributes in step with card positions (used to place the API's errors). */
function refreshLocs() {
  for (const f of state.fields) f.input.dataset.loc = f.loc().join('.');
  state.cards.forEach((card, i) => {
    card.el.dataset.loc = `optimizers.${i}`;
    card.el.querySelector(':scope > .group-error').dataset.groupLoc = `optimizers.${i}`;
  });
}

function optimizersSection(values) {
  const select = h('select', { id: 'add-optimizer', 'aria-label': 'optimizer to add' },
    state.optimizers.map((o) => h('option', { value: o.name, text: `${o.name} — ${o.description}` })));
  const add = h('button', { type: 'button', id: 'add-optimizer-button', text: 'Add optimizer' });
  add.addEventListener('click', () => {
    const card = addCard(select.value);
    if (card) card.el.scrollIntoView({ block: 'nearest' });
    updatePreview();
  });
  const fs = h('fieldset', { dataset: { loc: 'optimizers' } }, h('legend', { text: 'Optimizers to compare' }),
    h('div', { class: 'group-error', dataset: { groupLoc: 'optimizers' } }),
    h('div', { id: 'cards' }),
    h('div', { class: 'toolbar' }, select, add));
  return { fs, init: () => (values || DEFAULT_OPTIMIZERS.map((name) => ({ name }))).forEach((o) => addCard(o.name, o)) };
}

// ------------------------------------------------------------------ build, preview, submit

function setAt(obj, path, value) {
  let cur = obj;
  for (let i = 0; i < path.length - 1; i += 1) {
    const k = path[i];
    if (cur[k] === undefined) cur[k] = typeof path[i + 1] === 'number' ? [] : {};
    cur = cur[k];
  }
  cur[path[path.length - 1]] = value;
}

/** The outermost switched-off optional fieldset around a field, or null. */
function disabledGroup(record) {
  let off = null;
  for (let fs = record.input.closest('fieldset[data-optional="1"]'); fs; fs = fs.parentElement && fs.parentElement.closest('fieldset[data-optional="1"]')) {
    if (fs.dataset.enabled !== '1') off = fs;
  }
  return off;
}

/** The spec as the API expects it, plus the first invalid field (if any). */
function buildSpec() {
  const spec = { optimizers: state.cards.map((c) => ({ name: c.name })) };
  const errors = [];
  const nulled = new Set();
  for (const f of state.fields) {
    const off = disabledGroup(f);
    if (off) {
      nulled.add(off.dataset.loc);
      continue;
    }
    const { value, error, skip } = f.read();
    const extra = f.extraCheck ? f.extraCheck() : null;
    if (error || extra) {
      errors.push([f, error || extra]);
      continue;
    }
    if (skip) continue;
    const loc = f.loc();
    if (loc[0] === 'optimizers') {
      // Only what differs from the registry's defaults (the server fills in the rest).
      if (loc[2] === 'label' && value === null) continue;
      if (loc[2] === 'hyperparameters' && value === f.defaultValue) continue;
    }
    if (loc[0] === 'target_loss' && value === null) continue;
    setAt(spec, loc, value);
  }
  for (const loc of nulled) {
    // An optional nested object that is switched off is sent as null (unless a parent is off too).
    const path = loc.split('.');
    if (![...nulled].some((other) => other !== loc && loc.startsWith(`${other}.`))) setAt(spec, path, null);
  }
  return { spec, errors };
}

function updatePreview() {
  const { spec } = buildSpec();
  const count = spec.seeds && spec.optimizers.length ? runCount(spec) : 0;
  $('#run-count').textContent = String(count);
  $('#run-count').dataset.count = String(count);
  const configs = spec.optimizers.length;
  const seeds = (spec.seeds || []).length;
  const text = $('#run-count-text');
  text.textContent = `run${count === 1 ? '' : 's'} = ${configs} optimizer config${configs === 1 ? '' : 's'} × sweep points × ${seeds} seed${seeds === 1 ? '' : 's'}${spec.sweep_selection === 'first_seed' ? ' (sweep on the first seed only)' : ''}`;
  text.classList.toggle('reason', count > MAX_RUNS);
  if (count > MAX_RUNS) text.textContent += ` — over the limit of ${MAX_RUNS}`;
  const labels = count <= 200 ? runLabels(spec) : [];
  fill($('#run-list'), labels.slice(0, 40).map((l) => h('li', { text: l })), labels.length > 40 ? h('li', { text: `… ${labels.length - 40} more` }) : null);
  $('#spec-json').textContent = JSON.stringify(spec, null, 2);
  $('#submit-hint').textContent = getKey() ? '' : 'Submitting needs an API key (top bar).';
}

function clearErrors() {
  for (const f of state.fields) showFieldError(f, '');
  for (const el of $$('.group-error')) el.textContent = '';
  fill($('#form-error'));
}

/** Put each API error next to the field its loc names (or the closest enclosing group). */
export function placeErrors(detail) {
  const unplaced = [];
  for (const item of detail) {
    let loc = (item.loc || []).slice();
    if (loc[0] === 'body') loc = loc.slice(1);
    let msg = item.msg || 'invalid value';
    // "hyperparameters: lr must be …" from the optimizer's model validator names the field.
    const named = /^(hyperparameters|sweep): (\w+)/.exec(msg);
    if (named && loc[0] === 'optimizers' && loc.length === 2) loc = [...loc, named[1] === 'sweep' ? 'sweep' : 'hyperparameters', named[2]];
    let placed = false;
    for (let n = loc.length; n >= 0 && !placed; n -= 1) {
      const key = loc.slice(0, n).join('.');
      const record = state.fields.find((f) => f.input.dataset.loc === key);
      if (record) {
        if (n < loc.length) msg = `${loc.slice(n).join('.')}: ${msg}`;
        showFieldError(record, msg);
        placed = true;
        break;
      }
      const group = $$('.group-error').find((g) => g.dataset.groupLoc === key && key !== '');
      if (group) {
        group.textContent = group.textContent ? `${group.textContent} ${msg}` : msg;
        placed = true;
      }
    }
    if (!placed) unplaced.push(item.loc && item.loc.length > 1 ? `${item.loc.slice(1).join('.')}: ${item.msg}` : item.msg);
  }
  const count = detail.length;
  fill($('#form-error'),
    h('div', { text: `The server did not accept the job: ${count} problem${count === 1 ? '' : 's'}${unplaced.length < count ? ', shown next to the fields' : ''}.` }),
    unplaced.map((m) => h('div', { text: m })));
  const first = state.fields.find((f) => f.input.getAttribute('aria-invalid') === 'true');
  if (first) first.input.focus();
  else {
    const group = $$('.group-error').find((g) => g.textContent);
    if (group) group.scrollIntoView({ block: 'center' });
  }
}

async function submit(event) {
  event.preventDefault();
  if (state.submitting) return;
  clearErrors();
  const { spec, errors } = buildSpec();
  if (errors.length) {
    for (const [f, msg] of errors) showFieldError(f, msg);
    fill($('#form-error'), h('div', { text: `Fix the ${errors.length} highlighted field${errors.length === 1 ? '' : 's'} first.` }));
    errors[0][0].input.focus();
    return;
  }
  if (!spec.optimizers.length) {
    fill($('#form-error'), h('div', { text: 'Add at least one optimizer.' }));
    return;
  }
  if (!getKey()) {
    fill($('#form-error'), h('div', { text: 'Submitting needs an API key: paste one in the top bar (create it with `dykaf-lab keys create`).' }));
    $('#api-key').focus();
    return;
  }
  state.submitting = true;
  const button = $('#submit');
  button.disabled = true;
  button.textContent = 'Submitting…';
  try {
    const job = await post('/jobs', spec);
    document.body.dataset.submitted = String(job.id);
    window.location.href = `/jobs/${job.id}`;
  } catch (err) {
    if (err instanceof ApiError && err.status === 422) placeErrors(err.detail);
    else fill($('#form-error'), h('div', { text: errorText(err) }));
  } finally {
    state.submitting = false;
    button.disabled = false;
    button.textContent = 'Submit job';
  }
}

function renderForm(values = {}) {
  state.fields = [];
  state.cards = [];
  const opt = optimizersSection(values.optimizers);
  fill($('#form-root'), jobSection(values), opt.fs, taskSection(values.task));
  opt.init();
  updatePreview();
  document.body.dataset.formReady = '1';
}

async function main() {
  initKeyBox();
  onKeyChange(updatePreview);
  try {
    const [optimizers, tasks] = await Promise.all([get('/optimizers'), get('/tasks')]);
    state.optimizers = optimizers;
    state.byName = new Map(optimizers.map((o) => [o.name, o]));
    state.taskSchema = tasks.task;
    state.jobSchema = tasks.job;
  } catch (err) {
    fill($('#form-root'), stateBlock('error', 'Could not load the schemas.', errorText(err),
      h('div', { style: { marginTop: '.6rem' } }, h('button', { type: 'button', text: 'Retry', onclick: () => window.location.reload() }))));
    return;
  }
  let values = {};
  const from = new URLSearchParams(window.location.search).get('from');
  if (from && /^\d+$/.test(from)) {
    try {
      const job = await get(`/jobs/${from}`);
      values = job.spec || {};
      fill($('#new-banner'), banner('info', `Starting from the spec of job #${job.id} “${job.name}”.`));
    } catch (err) {
      fill($('#new-banner'), banner('warn', `Could not load job ${from}: ${errorText(err)}. Starting from the defaults.`));
    }
  }
  renderForm(values);
  $('#job-form').addEventListener('submit', submit);
  $('#reset').addEventListener('click', () => {
    clearErrors();
    renderForm({});
  });
}

main();
