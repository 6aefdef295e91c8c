// Number, date and duration formatting (pure functions).

export function num(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  if (!Number.isFinite(value)) return value > 0 ? '∞' : '−∞';
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e6 || abs < 1e-3)) return value.toExponential(Math.max(0, digits - 2));
  return Number(value.toPrecision(digits)).toLocaleString('en-US', { maximumFractionDigits: 6 });
}

export function fixed(value, decimals = 3) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '–';
  return value.toFixed(decimals);
}

export function int(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '–';
  return Math.round(value).toLocaleString('en-US');
}

/** "3.412 ± 0.021"; the std is omitted for a single value. */
export function meanStd(stat, decimals = 3) {
  if (!stat || stat.n === 0 || !Number.isFinite(stat.mean)) return '–';
  const m = decimals === null ? num(stat.mean) : fixed(stat.mean, decimals);
  if (stat.n < 2 || !Number.isFinite(stat.std)) return m;
  const s = decimals === null ? num(stat.std, 2) : fixed(stat.std, decimals);
  return `${m} ± ${s}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '–';
  if (seconds < 1) return `${(seconds * 1000).toFixed(0)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds % 60);
  if (m < 60) return `${m} min ${s} s`;
  const hr = Math.floor(m / 60);
  return `${hr} h ${m % 60} min`;
}

export function parseDate(value) {
  if (!value) return null;
  // The API sends ISO 8601; a value without a zone is UTC.
  const text = /[zZ]|[+-]\d\d:?\d\d$/.test(value) ? value : `${value}Z`;
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? null : date;
}

export function dateTime(value) {
  const date = parseDate(value);
  if (!date) return '–';
  return date.toLocaleString(undefined, { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

export function relative(value, now = Date.now()) {
  const date = parseDate(value);
  if (!date) return '';
  const s = Math.round((now - date.getTime()) / 1000);
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function percent(fraction, decimals = 0) {
  if (fraction === null || fraction === undefined || !Number.isFinite(fraction)) return '–';
  return `${(fraction * 100).toFixed(decimals)}%`;
}

export function speedup(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '–';
  return `${value.toFixed(2)}×`;
}
