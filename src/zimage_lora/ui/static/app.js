// zimage-lora web UI: a single-page app in plain JavaScript (no framework, no build step, nothing from outside).
//
// Each hash route (#/jobs, #/jobs/new, #/jobs/<name>, #/jobs/<name>/edit, #/comparisons/<id>, #/datasets,
// #/datasets/<name>, #/playground) renders one view into <main>. A view registers its timers and event streams on its ViewContext,
// so leaving the page stops them. The JSON API it talks to is described in docs/ui-api.md. login.html loads this
// file too and gets only the sign-in behaviour.

import { h, put, add, api, post, toast, errorBox, ViewContext } from './lib.js';
import { jobsView, jobView } from './jobs.js';
import { jobEditorView } from './editor.js';
import { comparisonView } from './compare.js';
import { datasetsView, datasetView } from './datasets.js';
import { playgroundView } from './playground.js';

const ROUTES = [
  [/^\/jobs\/?$/, 'jobs', () => jobsView],
  [/^\/jobs\/new$/, 'jobs', (m, q) => (ctx, root) => jobEditorView(ctx, root, { mode: 'new', from: q.get('from') })],
  [/^\/jobs\/([^/]+)\/edit$/, 'jobs', (m) => (ctx, root) => jobEditorView(ctx, root, { mode: 'edit', name: m[1] })],
  [/^\/jobs\/([^/]+)$/, 'jobs', (m) => (ctx, root) => jobView(ctx, root, m[1])],
  [/^\/comparisons\/([^/]+)$/, 'jobs', (m) => (ctx, root) => comparisonView(ctx, root, m[1])],
  [/^\/datasets\/?$/, 'datasets', () => datasetsView],
  [/^\/datasets\/([^/]+)$/, 'datasets', (m) => (ctx, root) => datasetView(ctx, root, m[1])],
  [/^\/playground\/?$/, 'playground', () => playgroundView],
];

let current = null;

async function route() {
  const hash = location.hash.replace(/^#/, '') || '/jobs';
  const [path, query = ''] = hash.split('?');
  let found = null;
  for (const [pattern, nav, make] of ROUTES) {
    const match = path.match(pattern);
    if (match) {
      const decoded = match.map((part) => (part === undefined ? part : decodeURIComponent(part)));
      found = { nav, view: make(decoded, new URLSearchParams(query)) };
      break;
    }
  }
  if (!found) {
    location.replace('#/jobs');
    return;
  }
  if (current) current.close();
  const ctx = new ViewContext();
  current = ctx;
  for (const link of document.querySelectorAll('[data-nav]')) {
    if (link.dataset.nav === found.nav) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const main = document.getElementById('main');
  const root = h('div', { class: 'view', 'data-testid': `view-${found.nav}` });
  put(main, root);
  try {
    await found.view(ctx, root);
  } catch (error) {
    if (!ctx.alive) return;
    console.error(error);
    add(root, errorBox(error.message || String(error)));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Sign-in page (login.html loads this file too)
// ---------------------------------------------------------------------------------------------------------------

function initLogin() {
  const form = document.querySelector('[data-testid="login-form"]');
  const error = document.getElementById('login-error');
  const params = new URLSearchParams(location.search);
  if (params.has('error')) {
    error.textContent = 'Wrong token.';
    error.hidden = false;
  }
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.hidden = true;
    const token = form.elements.token.value;
    try {
      const response = await fetch('/api/login', {
        method: 'POST',
        credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify({ token }),
      });
      if (!response.ok) {
        let message = 'Wrong token.';
        try {
          message = (await response.json()).error || message;
        } catch {
          // not JSON: keep the plain message
        }
        throw new Error(message);
      }
      const next = params.get('next') || '/';
      location.href = next.startsWith('/') && !next.startsWith('//') ? next : '/';
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
      form.elements.token.select();
    }
  });
}

// Sign out, offered when this browser signed in with the server's token: the server forgets the session, so the
// cookie is no use to anyone after.
async function initSignOut() {
  const button = document.querySelector('[data-testid="sign-out"]');
  if (!button) return;
  try {
    const session = await api('/api/session');
    button.hidden = !session.signed_in;
  } catch {
    return; // an older server, or none: nothing to offer
  }
  button.addEventListener('click', async () => {
    button.disabled = true;
    try {
      await post('/api/logout');
      location.href = '/login';
    } catch (error) {
      button.disabled = false;
      toast(`Sign out failed: ${error.message}`, 'error');
    }
  });
}

if (document.body.dataset.page === 'login') {
  initLogin();
} else {
  window.addEventListener('hashchange', route);
  route();
  initSignOut();
}
