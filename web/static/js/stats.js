// Pure numeric helpers: smoothing, interpolation, the summary table's columns, run-count preview and
// client-side checks against the registry's hyperparameter schema. No DOM here (unit-tested).

import { TERMINAL } from './statuses.js';

const finite = (v) => typeof v === 'number' && Number.isFinite(v);

/**
 * TensorBoard-style exponential moving average with bias correction; `weight` in [0, 1).
 * Missing values (null/NaN) stay missing and do not advance the average.
 */
export function ema(values, weight) {
  if (!(weight > 0)) return values.slice();
  const out = new Array(values.length);
  let last = 0;
  let k = 0;
  for (let i = 0; i < values.length; i += 1) {
    const v = values[i];
    if (!finite(v)) {
      out[i] = null;
      continue;
    }
    k += 1;
    last = last * weight + (1 - weight) * v;
    out[i] = last / (1 - weight ** k);
  }
  return out;
}

/** Piecewise-linear y(x) for sorted `xs`; clamps outside the range; null when there is no data. */
export function interpolator(xs, ys) {
  const px = [];
  const py = [];
  for (let i = 0; i < xs.length; i += 1) {
    if (finite(xs[i]) && finite(ys[i])) {
      px.push(xs[i]);
      py.push(ys[i]);
    }
  }
  if (px.length === 0) return null;
  return (x) => {
    if (x <= px[0]) return py[0];
    if (x >= px[px.length - 1]) return py[py.length - 1];
    let lo = 0;
    let hi = px.length - 1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (px[mid] <= x) lo = mid;
      else hi = mid;
    }
    const t = (x - px[lo]) / (px[hi] - px[lo] || 1);
    return py[lo] + t * (py[hi] - py[lo]);
  };
}

/** Tokens consumed per optimizer step for a task spec (all devices together). */
export function tokensPerStep(task) {
  if (!task) return null;
  const b = Number(task.batch_size) || 0;
  const c = Number(task.context) || 0;
  const a = Number(task.grad_accum) || 1;
  const n = Number(task.devices_per_run) || 1; // batch_size is per device
  return b * c * a * n || null;
}

/** Number of runs a job spec expands to (mirror of server.jobs.spec.JobSpec.run_count). */
export function runCount(spec) {
  const seeds = (spec.seeds || []).length;
  const points = (spec.optimizers || []).reduce((acc, opt) => acc + sweepPoints(opt).length, 0);
  if (spec.sweep_selection === 'first_seed') return points + (spec.optimizers || []).length * Math.max(0, seeds - 1);
  return points * seeds;
}

/** Every combination of an optimizer's sweep values (keys sorted, like the server). */
export function sweepPoints(opt) {
  const sweep = opt.sweep || {};
  const keys = Object.keys(sweep).sort();
  if (keys.length === 0) return [{}];
  let points = [{}];
  for (const key of keys) {
    const next = [];
    for (const p of points) for (const v of sweep[key]) next.push({ ...p, [key]: v });
    points = next;
  }
  return points;
}

/** Python's `f"{v:g}"` (6 significant digits), so preview labels match the server's run labels. */
export function formatG(v) {
  if (v === 0) return Object.is(v, -0) ? '-0' : '0';
  if (!Number.isFinite(v)) return Number.isNaN(v) ? 'nan' : (v > 0 ? 'inf' : '-inf');
  const [mantissa, expText] = v.toExponential(5).split('e');
  const exp = Number(expText);
  const strip = (t) => (t.includes('.') ? t.replace(/0+$/, '').replace(/\.$/, '') : t);
  if (exp < -4 || exp >= 6) {
    const sign = exp < 0 ? '-' : '+';
    return `${strip(mantissa)}e${sign}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  return strip(v.toFixed(Math.max(0, 5 - exp)));
}

function formatValue(v) {
  // The server formats floats with :g and ints/bools/strings with str() (True/False for booleans).
  if (typeof v === 'boolean') return v ? 'True' : 'False';
  if (typeof v === 'number' && !Number.isInteger(v)) return formatG(v);
  return String(v);
}

/** Run labels the job will create, e.g. "adamw[lr=0.001]" (mirror of JobSpec._run). */
export function runLabels(spec) {
  const out = [];
  const seeds = spec.seeds || [];
  const stageSeeds = spec.sweep_selection === 'first_seed' ? seeds.slice(0, 1) : seeds;
  for (const opt of spec.optimizers || []) {
    const display = opt.label || opt.name;
    for (const point of sweepPoints(opt)) {
      const keys = Object.keys(point).sort();
      const suffix = keys.map((k) => `${k}=${formatValue(point[k])}`).join(',');
      const label = suffix ? `${display}[${suffix}]` : display;
      for (const seed of stageSeeds) out.push(`${label} · seed ${seed}`);
    }
    if (spec.sweep_selection === 'first_seed') {
      for (const seed of seeds.slice(1)) out.push(`${display}[best point] · seed ${seed}`);
    }
  }
  return out;
}

/**
 * Check one value against a schema entry. Accepts both the registry's snake_case bounds
 * (`exclusive_minimum`) and JSON Schema's camelCase ones (`exclusiveMinimum`).
 * Returns an error message or null.
 */
export function checkValue(schema, value) {
  if (value === null || value === undefined) {
    return schema.nullable || schema.optional ? null : 'a value is required';
  }
  const type = schema.type;
  if (type === 'boolean') return typeof value === 'boolean' ? null : 'must be true or false';
  if (type === 'string') {
    if (schema.enum && !schema.enum.includes(value)) return `must be one of ${schema.enum.join(', ')}`;
    return null;
  }
  if (type === 'number' || type === 'integer') {
    if (typeof value !== 'number' || !Number.isFinite(value)) return 'must be a finite number';
    if (type === 'integer' && !Number.isInteger(value)) return 'must be a whole number';
    const min = schema.minimum;
    const max = schema.maximum;
    const xmin = schema.exclusive_minimum ?? schema.exclusiveMinimum;
    const xmax = schema.exclusive_maximum ?? schema.exclusiveMaximum;
    const parts = [];
    if (finite(min)) parts.push(`≥ ${min}`);
    if (finite(xmin)) parts.push(`> ${xmin}`);
    if (finite(max)) parts.push(`≤ ${max}`);
    if (finite(xmax)) parts.push(`< ${xmax}`);
    const ok = (!finite(min) || value >= min) && (!finite(xmin) || value > xmin)
      && (!finite(max) || value <= max) && (!finite(xmax) || value < xmax);
    return ok ? null : `must be ${parts.join(' and ')}`;
  }
  return null;
}

/** A short range hint such as "(0, 10] · log" for a schema entry. */
export function rangeHint(schema) {
  const min = schema.minimum;
  const max = schema.maximum;
  const xmin = schema.exclusive_minimum ?? schema.exclusiveMinimum;
  const xmax = schema.exclusive_maximum ?? schema.exclusiveMaximum;
  if (![min, max, xmin, xmax].some(finite)) return schema.log_scale ? 'log scale' : '';
  const left = finite(min) ? `[${min}` : finite(xmin) ? `(${xmin}` : '(−∞';
  const right = finite(max) ? `${max}]` : finite(xmax) ? `${xmax})` : '∞)';
  return `${left}, ${right}${schema.log_scale ? ' · log scale' : ''}`;
}

/**
 * Parse a number typed by a person ("3e-4", "0.001"); '' gives undefined, junk gives NaN.
 */
export function parseNumber(text) {
  const t = String(text ?? '').trim();
  if (t === '') return undefined;
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(t)) return NaN;
  return Number(t);
}

/** "0, 1, 2" → [0, 1, 2]; returns {values, error}. */
export function parseList(text, type = 'number') {
  const parts = String(text ?? '').split(/[,\s]+/).map((p) => p.trim()).filter(Boolean);
  const values = [];
  for (const part of parts) {
    if (type === 'string') {
      values.push(part);
      continue;
    }
    if (type === 'boolean') {
      if (!['true', 'false'].includes(part.toLowerCase())) return { values, error: `"${part}" is not true/false` };
      values.push(part.toLowerCase() === 'true');
      continue;
    }
    const v = parseNumber(part);
    if (!Number.isFinite(v)) return { values, error: `"${part}" is not a number` };
    if (type === 'integer' && !Number.isInteger(v)) return { values, error: `"${part}" is not a whole number` };
    values.push(v);
  }
  return { values, error: null };
}

// ---------------------------------------------------------------- per-optimizer summary
// The summary itself (means over finished runs, winner, speed-ups, best marks, Fisher verdict) is
// computed by the server (server/summary.py, GET /jobs/{id}/summary); the page only lays it out.

/**
 * Columns of the summary table: `key` is the server row's metric key (`<key>_mean`, `_std`, `_n`
 * for stats) and the key of `summary.best`; `target` columns exist only with a target loss.
 */
export const SUMMARY_COLUMNS = [
  { key: 'final_val_loss', title: 'Final val loss', kind: 'stat' },
  { key: 'best_val_loss', title: 'Best val loss', kind: 'stat' },
  { key: 'steps_to_target', title: 'Steps to target', kind: 'stat', target: true, digits: 0 },
  { key: 'time_to_target_s', title: 'Seconds to target', kind: 'stat', target: true, digits: null },
  { key: 'speedup_steps', title: 'Speed-up vs AdamW (steps)', better: 'max', kind: 'ratio', target: true },
  { key: 'speedup_time', title: 'Speed-up vs AdamW (time)', better: 'max', kind: 'ratio', target: true },
  { key: 'step_time_ms', title: 'Step time (ms)', kind: 'stat', digits: 1 },
  { key: 'optimizer_share', title: 'Optimizer time share', kind: 'percent' },
  { key: 'peak_memory_mb', title: 'Peak memory (MB)', kind: 'stat', digits: 0 },
  { key: 'tokens_per_s', title: 'Tokens/s', better: 'max', kind: 'stat', digits: 0 },
  {
    key: 'mfu', title: 'MFU', better: 'max', kind: 'percent',
    hint: 'model FLOPs utilisation: (6N + attention) FLOPs per token × tokens/s over the GPU\'s dense peak; none on CPU',
  },
  { key: 'diverged', title: 'Runs diverged', kind: 'count' },
  // Not a property of the optimizer (no "best"): what the Fisher probes cost this run, kept out of
  // every time above so that they do not skew the comparison.
  {
    key: 'fisher_overhead', title: 'Diag. overhead', better: null, kind: 'percent',
    hint: 'Fisher diagnostics: time spent in them as a share of training time; excluded from the time columns',
  },
];

/** `{n, mean, std}` of one server summary row's metric (null values are missing ones). */
export function rowStat(row, key) {
  const n = row[`${key}_n`] || 0;
  const mean = row[`${key}_mean`];
  const std = row[`${key}_std`];
  return { n, mean: finite(mean) ? mean : NaN, std: finite(std) && n > 1 ? std : NaN };
}
