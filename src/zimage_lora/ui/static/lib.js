// Shared pieces of the web UI: building DOM, formatting, calling the API (docs/ui-api.md), toasts, dialogs,
// and the ViewContext that each page's timers and event streams hang on.

// ---------------------------------------------------------------------------------------------------------------
// Small helpers: DOM building, formatting, the API
// ---------------------------------------------------------------------------------------------------------------

const PROPS = new Set(['value', 'checked', 'disabled', 'hidden', 'selected', 'multiple', 'indeterminate']);

/** Build an element: h('a', {href: '#/jobs', class: 'x', onclick: fn}, 'text', childNode, [more]). */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  setProps(el, props);
  addChildren(el, children);
  return el;
}

function setProps(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.setAttribute('class', value);
    else if (key === 'text') el.textContent = value;
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (PROPS.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
}

function addChildren(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replace an element's children; null, undefined and false are skipped (DOM's own calls would print "null"). */
export function put(el, ...children) {
  el.replaceChildren();
  addChildren(el, children);
}

/** Append children, skipping null, undefined and false. */
export function add(el, ...children) {
  addChildren(el, children);
}

const SVG_NS = 'http://www.w3.org/2000/svg';

export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) el.setAttribute(key, String(value));
  }
  addChildren(el, children);
  return el;
}

export const enc = encodeURIComponent;
export const clone = (value) => (value === undefined ? undefined : JSON.parse(JSON.stringify(value)));

export function debounce(fn, ms) {
  let timer = null;
  const run = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  run.cancel = () => clearTimeout(timer);
  return run;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '–';
  const s = Math.max(0, Math.round(seconds));
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  if (hours) return `${hours} h ${minutes} min`;
  if (minutes) return `${minutes} min ${rest} s`;
  return `${rest} s`;
}

export function fmtTime(value) {
  if (value === null || value === undefined || value === '') return '–';
  const date = typeof value === 'number' ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}

export function fmtNumber(value, digits = 4) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '–';
  return Math.abs(value) >= 1000 || Math.abs(value) < 1e-3 ? value.toPrecision(digits) : value.toFixed(digits);
}

export class ApiError extends Error {
  constructor(status, message, data) {
    super(message);
    this.status = status;
    this.data = data || {};
    this.field = this.data.field || null;
  }
}

/** Call the JSON API. A 401 sends the browser to the sign-in page; any other error throws ApiError. */
export async function api(path, { method = 'GET', body, form } = {}) {
  const options = { method, headers: { Accept: 'application/json' }, credentials: 'same-origin' };
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  } else if (form) {
    options.body = form;
  }
  const response = await fetch(path, options);
  if (response.status === 401) {
    location.href = `/login?next=${enc(location.pathname + location.hash)}`;
    throw new ApiError(401, 'Sign in first.');
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = (data && data.error) || text || `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message, data);
  }
  return data;
}

export const post = (path, body) => api(path, { method: 'POST', body: body === undefined ? {} : body });

export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  if (!box) return;
  // Above a sticky action bar (the job form's Create/Save buttons), never over it.
  const bar = document.querySelector('.sticky-actions');
  const top = bar ? bar.getBoundingClientRect().top : window.innerHeight;
  box.style.bottom = `${top > 0 && top < window.innerHeight ? window.innerHeight - top + 12 : 16}px`;
  const item = h('div', { class: `toast toast-${kind}`, 'data-testid': 'toast' }, message);
  add(box, item);
  setTimeout(() => item.remove(), kind === 'error' ? 8000 : 4000);
}

export function statusBadge(status, testid = 'job-status') {
  return h('span', { class: `badge badge-${status || 'unknown'}`, 'data-testid': testid }, status || 'unknown');
}

export function progressBar(step, total, testid = 'job-progress') {
  const fraction = total ? Math.min(1, Math.max(0, (step || 0) / total)) : 0;
  const bar = h('div', {
    class: 'progress',
    role: 'progressbar',
    'aria-valuemin': 0,
    'aria-valuemax': total || 0,
    'aria-valuenow': step || 0,
    'aria-label': 'Training progress',
    'data-testid': testid,
  });
  const fill = h('div', { class: 'progress-fill' });
  fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  add(bar, fill);
  return bar;
}

export function setProgress(bar, step, total) {
  const fraction = total ? Math.min(1, Math.max(0, (step || 0) / total)) : 0;
  bar.setAttribute('aria-valuenow', step || 0);
  bar.setAttribute('aria-valuemax', total || 0);
  bar.firstChild.style.width = `${(fraction * 100).toFixed(1)}%`;
}

export function pageHeader(title, ...actions) {
  return h('div', { class: 'page-header' }, h('h1', {}, title), h('div', { class: 'actions' }, actions));
}

export function errorBox(message, testid = 'page-error') {
  return h('p', { class: 'error-box', role: 'alert', 'data-testid': testid }, message);
}

/** A modal that asks for the object's name before a destructive action; resolves to true when confirmed. */
export function confirmByName({ title, text, name, action = 'Delete' }) {
  return new Promise((resolve) => {
    const input = h('input', {
      id: 'confirm-name',
      type: 'text',
      autocomplete: 'off',
      spellcheck: 'false',
      'data-testid': 'confirm-name',
    });
    const ok = h('button', { type: 'submit', class: 'danger', disabled: true, 'data-testid': 'confirm-ok' }, action);
    const cancel = h('button', { type: 'button', 'data-testid': 'confirm-cancel' }, 'Cancel');
    const echo = h('p', { class: 'muted echo', 'data-testid': 'confirm-echo' }, `Type ${name} to confirm.`);
    const dialog = h(
      'dialog',
      { class: 'dialog', 'aria-labelledby': 'confirm-title', 'data-testid': 'confirm-dialog' },
      h(
        'form',
        { method: 'dialog' },
        h('h2', { id: 'confirm-title' }, title),
        h('p', {}, text),
        h('label', { for: 'confirm-name' }, `Type the name (${name}) to confirm`),
        input,
        echo,
        h('div', { class: 'actions' }, cancel, ok),
      ),
    );
    input.addEventListener('input', () => {
      const typed = input.value;
      ok.disabled = typed !== name;
      echo.textContent = typed === name ? `"${typed}" matches: ${action.toLowerCase()} it.` : `Type ${name} to confirm.`;
    });
    let result = false;
    ok.addEventListener('click', () => {
      result = input.value === name;
    });
    cancel.addEventListener('click', () => dialog.close());
    dialog.addEventListener('close', () => {
      dialog.remove();
      resolve(result);
    });
    add(document.body, dialog);
    dialog.showModal();
    input.focus();
  });
}

/** A yes/no modal; resolves to true when the action is confirmed. */
export function confirmAction({ title, text, action }) {
  return new Promise((resolve) => {
    const ok = h('button', { type: 'submit', class: 'danger', 'data-testid': 'confirm-ok' }, action);
    const cancel = h('button', { type: 'button', 'data-testid': 'confirm-cancel' }, 'Cancel');
    const dialog = h(
      'dialog',
      { class: 'dialog', 'aria-labelledby': 'confirm-title', 'data-testid': 'confirm-dialog' },
      h('form', { method: 'dialog' }, h('h2', { id: 'confirm-title' }, title), h('p', {}, text), h('div', { class: 'actions' }, cancel, ok)),
    );
    let result = false;
    ok.addEventListener('click', () => {
      result = true;
    });
    cancel.addEventListener('click', () => dialog.close());
    dialog.addEventListener('close', () => {
      dialog.remove();
      resolve(result);
    });
    add(document.body, dialog);
    dialog.showModal();
    cancel.focus();
  });
}

export const START_OVER_TEXT =
  'Starting again discards this run’s checkpoints, samples and logs and trains from step 0. Resume continues instead.';

/** What a view registers so that leaving its page stops its timers and streams. */
export class ViewContext {
  constructor() {
    this.alive = true;
    this.cleanups = [];
  }

  onCleanup(fn) {
    this.cleanups.push(fn);
  }

  /** Run fn every ms while the view is shown, never two at once. */
  every(ms, fn) {
    let busy = false;
    const id = setInterval(async () => {
      if (busy || !this.alive) return;
      busy = true;
      try {
        await fn();
      } catch (error) {
        console.warn(error);
      } finally {
        busy = false;
      }
    }, ms);
    this.onCleanup(() => clearInterval(id));
    return id;
  }

  close() {
    this.alive = false;
    for (const fn of this.cleanups.splice(0)) {
      try {
        fn();
      } catch (error) {
        console.warn(error);
      }
    }
  }
}
