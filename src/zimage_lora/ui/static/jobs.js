// The jobs list (#/jobs) and one job (#/jobs/<name>): live status over server-sent events (polling when they are
// not available), the loss curve, the log, samples grouped by step, checkpoints, the job's actions, and its
// comparisons (compare.js).

import {
  h, put, add, enc, fmtBytes, fmtDuration, fmtTime, fmtNumber, api, post, toast, statusBadge, progressBar,
  setProgress, pageHeader, confirmByName, confirmAction, START_OVER_TEXT,
} from './lib.js';
import { runCharts } from './charts.js';
import { compareDialog, comparisonsTable } from './compare.js';
import { openSampleViewer } from './viewer.js';

// ---------------------------------------------------------------------------------------------------------------
// Jobs list
// ---------------------------------------------------------------------------------------------------------------

export async function jobsView(ctx, root) {
  const body = h('tbody');
  const empty = h(
    'p',
    { class: 'empty', hidden: true },
    'No jobs yet. ',
    h('a', { href: '#/jobs/new' }, 'Create the first one'),
    ' from a preset.',
  );
  add(root, 
    pageHeader('Jobs', h('a', { class: 'button primary', href: '#/jobs/new', 'data-testid': 'new-job' }, 'New job')),
    h(
      'div',
      { class: 'table-wrap' },
      h(
        'table',
        { class: 'table', 'data-testid': 'jobs-table' },
        h(
          'thead',
          {},
          h('tr', {}, ['Name', 'Status', 'Progress', 'Model', 'Device', 'Created', 'Actions'].map((t) => h('th', {}, t))),
        ),
        body,
      ),
    ),
    empty,
  );
  const comparisons = h('section', { class: 'card', hidden: true, 'data-testid': 'comparisons' }, h('h2', {}, 'Comparisons'));
  const comparisonsBox = h('div');
  add(comparisons, comparisonsBox);
  add(root, comparisons);

  const act = async (name, action, status) => {
    if (action === 'start' && status !== 'draft') {
      const ok = await confirmAction({ title: `Start ${name} over?`, text: START_OVER_TEXT, action: 'Start over' });
      if (!ok) return;
    }
    try {
      await post(`/api/jobs/${enc(name)}/${action}`);
      toast(`${name}: ${action} requested`);
      await refresh();
    } catch (error) {
      toast(`${name}: ${error.message}`, 'error');
    }
  };

  const row = (job) => {
    const actions = [];
    const button = (label, action, cls = '') =>
      h('button', { type: 'button', class: cls, onclick: () => act(job.name, action, job.status), 'data-testid': `job-${action}-${job.name}` }, label);
    if (['draft', 'failed', 'stopped', 'done'].includes(job.status)) {
      actions.push(button(job.status === 'draft' ? 'Start' : 'Start over', 'start', 'small'));
    }
    if (['stopped', 'failed'].includes(job.status) && job.resumable) actions.push(button('Resume', 'resume', 'small'));
    if (['running', 'queued'].includes(job.status)) actions.push(button('Stop', 'stop', 'small'));
    return h(
      'tr',
      { 'data-testid': `job-row-${job.name}` },
      h('td', {}, h('a', { href: `#/jobs/${enc(job.name)}`, 'data-testid': `job-link-${job.name}` }, job.name)),
      h('td', {}, statusBadge(job.status, `job-status-${job.name}`)),
      h(
        'td',
        { class: 'progress-cell' },
        h('span', { class: 'mono', 'data-testid': `job-step-${job.name}` }, `${job.step ?? 0} / ${job.steps ?? '?'}`),
        progressBar(job.step, job.steps, `job-progress-${job.name}`),
      ),
      h('td', {}, job.arch_label || job.arch || '–'),
      h('td', {}, job.device || '–'),
      h('td', {}, fmtTime(job.created)),
      h('td', { class: 'row-actions' }, actions),
    );
  };

  let comparisonsKey = '';
  async function refresh() {
    const [{ jobs }, found] = await Promise.all([api('/api/jobs'), api('/api/comparisons')]);
    if (!ctx.alive) return;
    put(body, ...jobs.map(row));
    empty.hidden = jobs.length > 0;
    const key = JSON.stringify(found.comparisons);
    if (key !== comparisonsKey) {
      comparisonsKey = key;
      put(comparisonsBox, comparisonsTable(found.comparisons, { showJob: true }));
      comparisons.hidden = found.comparisons.length === 0;
    }
  }

  await refresh();
  ctx.every(2000, refresh);
}

// ---------------------------------------------------------------------------------------------------------------
// One job: live status, loss curve, log, samples, checkpoints, actions
// ---------------------------------------------------------------------------------------------------------------

const LOG_LIMIT = 400;
// the layouts a checkpoint downloads in (GET /api/jobs/<name>/checkpoints/<file>/download?format=...)
const CHECKPOINT_FORMATS = [
  ['zimage-lora', 'zimage-lora (ours)'],
  ['diffusers', 'diffusers / peft'],
  ['comfyui', 'ComfyUI (fused qkv)'],
  ['kohya', 'kohya / musubi'],
];

export async function jobView(ctx, root, name) {
  const state = { job: null, metrics: new Map(), log: [], samplesKey: '', checkpointsKey: '' };
  const url = (suffix = '') => `/api/jobs/${enc(name)}${suffix}`;

  // --- layout ---
  const badge = h('span', { class: 'badge', 'data-testid': 'job-status' }, '…');
  const live = h('span', { class: 'live', 'data-testid': 'live-state', title: 'How this page gets updates' }, '');
  const stepText = h('strong', { class: 'mono', 'data-testid': 'job-step' }, '–');
  const speedText = h('strong', { class: 'mono', 'data-testid': 'job-speed' }, '–');
  const etaText = h('strong', { class: 'mono', 'data-testid': 'job-eta' }, '–');
  const lossText = h('strong', { class: 'mono', 'data-testid': 'job-loss' }, '–');
  const deviceText = h('strong', { class: 'mono', 'data-testid': 'job-device' }, '–');
  const bar = progressBar(0, 0);
  // A failed run: the line that says why on its own, first; how it ended and the log's last lines below, folded.
  const errorHeadline = h('p', { class: 'error-headline', 'data-testid': 'job-error-headline' });
  const errorDetails = h('pre', { class: 'error-log', 'data-testid': 'job-error-log' });
  const errorMore = h('details', { class: 'error-more' }, h('summary', {}, 'How it ended, and the last log lines'), errorDetails);
  const errorLine = h('div', { class: 'error-box', role: 'alert', hidden: true, 'data-testid': 'job-error' }, errorHeadline, errorMore);
  const chart = h('div', { class: 'chart', 'data-testid': 'loss-chart' });
  const scoresChart = h('div', { class: 'chart', 'data-testid': 'scores-chart' });
  const charts = runCharts(chart, scoresChart, name); // one step axis: hover, zoom, smoothing, log scale
  const logBox = h('pre', { class: 'log', 'data-testid': 'job-log', tabindex: 0, 'aria-label': 'Trainer log' });
  const samplesBox = h('div', { class: 'samples', 'data-testid': 'samples' }, h('p', { class: 'muted' }, 'No samples yet.'));
  const sheetBox = h('div', { class: 'contact-sheet', 'data-testid': 'contact-sheet' });
  const ckptBody = h('tbody');
  const ckptEmpty = h('p', { class: 'muted' }, 'No checkpoints yet.');
  const yamlBox = h('pre', { class: 'yaml-view', 'data-testid': 'job-config-yaml' });
  const comparisonsBox = h('div', { 'data-testid': 'job-comparisons' });

  const buttons = {};
  const action = (key, label, handler, cls = '') => {
    buttons[key] = h('button', { type: 'button', class: cls, hidden: true, 'data-testid': `btn-${key}`, onclick: handler }, label);
    return buttons[key];
  };
  const request = (what, message) => async () => {
    try {
      await post(url(`/${what}`));
      toast(message);
      await refreshJob();
    } catch (error) {
      toast(error.message, 'error');
    }
  };
  const actions = h(
    'div',
    { class: 'actions' },
    action(
      'start',
      'Start',
      async () => {
        if (state.job && state.job.status !== 'draft') {
          const text = state.job.resumable
            ? START_OVER_TEXT
            : 'Starting again discards this run’s samples and logs and trains from step 0 (nothing was saved to resume from).';
          const ok = await confirmAction({ title: `Start ${name} over?`, text, action: 'Start over' });
          if (!ok) return;
        }
        await request('start', 'Queued: it starts when its device is free')();
      },
      'primary',
    ),
    action('resume', 'Resume', request('resume', 'Queued to resume from the last saved state'), 'primary'),
    action('stop', 'Stop', request('stop', 'Stopping: the trainer saves, then stops')),
    action(
      'force',
      'Force stop',
      async () => {
        const ok = await confirmAction({
          title: `Force-stop ${name}?`,
          text: 'The trainer is killed at once. Saved checkpoints stay whole; the steps since the last one are lost (Resume continues from it).',
          action: 'Force stop',
        });
        if (!ok) return;
        try {
          await post(url('/stop'), { force: true });
          toast('Force-stopped');
          await refreshJob();
        } catch (error) {
          toast(error.message, 'error');
        }
      },
      'danger',
    ),
    action('save', 'Save now', request('save', 'Save requested: a checkpoint is written after this step')),
    action('sample', 'Sample now', request('sample', 'Samples requested: previews are rendered after this step')),
    action('edit', 'Edit', () => {
      location.hash = `#/jobs/${enc(name)}/edit`;
    }),
    action('compare', 'Compare', async () => {
      const created = await compareDialog(state.job);
      if (created) location.hash = `#/comparisons/${enc(created)}`;
    }),
    // The copy opens in the new-job form; nothing is created until its Create button (leaving the form leaves no job).
    action('clone', 'Clone', () => {
      location.hash = `#/jobs/new?from=${enc(`job:${name}`)}`;
    }),
    action(
      'delete',
      'Delete',
      async () => {
        const ok = await confirmByName({
          title: `Delete ${name}?`,
          text: 'This removes the job and its run folder: checkpoints, samples and logs.',
          name,
        });
        if (!ok) return;
        try {
          await api(`${url()}?confirm=${enc(name)}`, { method: 'DELETE' });
          toast(`Deleted ${name}`);
          location.hash = '#/jobs';
        } catch (error) {
          toast(error.message, 'error');
        }
      },
      'danger',
    ),
  );

  add(root, 
    h(
      'div',
      { class: 'page-header' },
      h('h1', {}, h('a', { href: '#/jobs', class: 'crumb' }, 'Jobs'), ' / ', h('span', { 'data-testid': 'job-name' }, name), ' ', badge, live),
      actions,
    ),
    h(
      'div',
      { class: 'stats card' },
      h('div', { class: 'stat' }, h('span', {}, 'Step'), stepText),
      h('div', { class: 'stat' }, h('span', {}, 'Speed'), speedText),
      h('div', { class: 'stat' }, h('span', {}, 'ETA'), etaText),
      h('div', { class: 'stat' }, h('span', {}, 'Loss'), lossText),
      h('div', { class: 'stat' }, h('span', {}, 'Device'), deviceText),
      h('div', { class: 'stat stat-wide' }, bar),
    ),
    errorLine,
    h(
      'div',
      { class: 'grid-2' },
      h('section', { class: 'card' }, h('h2', {}, 'Loss'), charts.controls, chart),
      h('section', { class: 'card' }, h('h2', {}, 'Preview scores'), scoresChart),
    ),
    h('section', { class: 'card' }, h('h2', {}, 'Log'), logBox),
    h('section', { class: 'card' }, h('h2', {}, 'Samples'), samplesBox, sheetBox),
    h(
      'section',
      { class: 'card' },
      h('h2', {}, 'Checkpoints'),
      h(
        'div',
        { class: 'table-wrap' },
        h(
          'table',
          { class: 'table', 'data-testid': 'checkpoints' },
          h('thead', {}, h('tr', {}, ['File', 'Step', 'Size', ''].map((t) => h('th', {}, t)))),
          ckptBody,
        ),
      ),
      ckptEmpty,
    ),
    h(
      'section',
      { class: 'card' },
      h('h2', {}, 'Comparisons'),
      h('p', { class: 'help' }, 'Compare trains this job once per value of one setting (an adapter, the rank, the learning rate) and puts the previews side by side.'),
      comparisonsBox,
    ),
    h('details', { class: 'card' }, h('summary', {}, 'Config (job.yaml)'), yamlBox),
  );

  // --- rendering ---
  function applyJob(job) {
    if (job.status === 'deleted') {
      toast(`${name} was deleted`);
      location.hash = '#/jobs';
      return;
    }
    state.job = job;
    badge.className = `badge badge-${job.status}`;
    badge.textContent = job.status;
    stepText.textContent = `${job.step ?? 0} / ${job.steps ?? '?'}`;
    speedText.textContent = job.sec_per_it ? `${job.sec_per_it.toFixed(job.sec_per_it < 1 ? 3 : 2)} s/it` : '–';
    etaText.textContent = job.status === 'running' ? fmtDuration(job.eta_s) : job.status === 'done' ? 'done' : '–';
    deviceText.textContent = job.device || '–';
    setProgress(bar, job.step, job.steps);
    errorLine.hidden = !job.error;
    const [headline, ...rest] = (job.error || '').split('\n');
    errorHeadline.textContent = headline;
    errorDetails.textContent = rest.join('\n');
    errorMore.hidden = !rest.length;
    if (job.yaml && yamlBox.textContent !== job.yaml) yamlBox.textContent = job.yaml;
    const status = job.status;
    const show = {
      start: ['draft', 'done', 'failed', 'stopped'].includes(status),
      resume: ['stopped', 'failed'].includes(status) && job.resumable, // nothing saved: Start over only
      stop: ['queued', 'running'].includes(status),
      force: status === 'stopping',
      save: status === 'running',
      sample: status === 'running',
      edit: !['queued', 'running', 'stopping'].includes(status),
      compare: true,
      clone: true,
      delete: !['queued', 'running', 'stopping'].includes(status),
    };
    for (const [key, button] of Object.entries(buttons)) button.hidden = !show[key];
    buttons.start.textContent = status === 'draft' ? 'Start' : 'Start over';
  }

  function addMetrics(rows) {
    if (!rows || !rows.length) return;
    for (const row of rows) if (row && Number.isFinite(row.step)) state.metrics.set(row.step, row);
    const last = [...state.metrics.values()].at(-1);
    if (last) lossText.textContent = fmtNumber(last.loss);
    drawSoon();
  }

  let drawPending = false;
  function drawSoon() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      const rows = [...state.metrics.values()].sort((a, b) => a.step - b.step);
      charts.update(rows);
    });
  }

  function setLog(lines) {
    state.log = lines.slice(-LOG_LIMIT);
    renderLog();
  }

  function appendLog(lines) {
    if (!lines || !lines.length) return;
    state.log = state.log.concat(lines).slice(-LOG_LIMIT);
    renderLog();
  }

  function renderLog() {
    const atBottom = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 24;
    logBox.textContent = state.log.join('\n');
    if (atBottom) logBox.scrollTop = logBox.scrollHeight;
  }

  function renderSamples(data) {
    const key = JSON.stringify(data);
    if (key === state.samplesKey) return;
    state.samplesKey = key;
    const samples = data.samples || [];
    state.samples = samples; // what the open sample viewer steps through
    const byStep = new Map();
    for (const s of samples) {
      if (!byStep.has(s.step)) byStep.set(s.step, []);
      byStep.get(s.step).push(s);
    }
    const steps = [...byStep.keys()].sort((a, b) => b - a);
    put(samplesBox, 
      ...(steps.length
        ? steps.map((step) =>
            h(
              'div',
              { class: 'sample-group', 'data-testid': `sample-group-${step}` },
              h('h3', {}, `Step ${step}`),
              h(
                'div',
                { class: 'sample-row' },
                byStep
                  .get(step)
                  .sort((a, b) => a.index - b.index)
                  .map((s) =>
                    h(
                      'a',
                      { href: s.url, target: '_blank', rel: 'noopener', 'data-testid': `sample-link-${step}-${s.index}`, onclick: (e) => openViewer(e, s) },
                      h('img', { src: s.url, alt: `Sample ${s.index + 1} at step ${step}`, loading: 'lazy', 'data-testid': 'sample-image' }),
                    ),
                  ),
              ),
            ),
          )
        : [h('p', { class: 'muted' }, 'No samples yet.')]),
    );
    if (state.viewer) state.viewer.refresh();
    if (data.contact_sheet) {
      const src = data.contact_sheet; // carries a version: a rebuilt sheet gets a new URL
      put(sheetBox, 
        h('h3', {}, 'Contact sheet'),
        h('a', { href: src, target: '_blank', rel: 'noopener' }, h('img', { src, alt: 'Contact sheet: prompts by step', 'data-testid': 'contact-sheet-image' })),
      );
    } else {
      sheetBox.replaceChildren();
    }
  }

  // A plain click (or Enter) on a preview opens the sample viewer (viewer.js); a middle or modified click opens the file.
  function openViewer(event, sample) {
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    const link = event.currentTarget;
    const testid = `sample-link-${sample.step}-${sample.index}`;
    state.viewer = openSampleViewer({
      samples: () => state.samples,
      start: sample,
      totalSteps: () => state.job?.steps ?? null,
      returnFocus: () => (link.isConnected ? link : samplesBox.querySelector(`[data-testid="${testid}"]`)),
      onClose: () => {
        state.viewer = null;
      },
    });
  }
  ctx.onCleanup(() => state.viewer?.close());

  function renderCheckpoints(list) {
    const key = JSON.stringify(list);
    if (key === state.checkpointsKey) return;
    state.checkpointsKey = key;
    ckptEmpty.hidden = list.length > 0;
    put(ckptBody, 
      ...list.map((c) =>
        h(
          'tr',
          { 'data-testid': `checkpoint-${c.file}`, 'data-step': c.step ?? '', 'data-final': String(Boolean(c.final)) },
          h('td', { class: 'mono' }, c.file),
          h('td', {}, c.final ? 'final' : c.step ?? '–'),
          h('td', {}, fmtBytes(c.bytes)),
          h('td', {}, downloadCell(c)),
        ),
      ),
    );
  }

  // A checkpoint as a download in the layout the user's tool reads (converted by the server, cached there).
  function downloadCell(c) {
    const link = h('a', { href: c.url, download: c.file, class: 'button small', 'data-testid': `download-${c.file}` }, 'Download');
    const format = h(
      'select',
      { class: 'small', 'aria-label': `Format of ${c.file}`, 'data-testid': `download-format-${c.file}` },
      CHECKPOINT_FORMATS.map(([value, label]) => h('option', { value }, label)),
    );
    format.addEventListener('change', () => {
      const ours = format.value === 'zimage-lora';
      link.href = ours ? c.url : url(`/checkpoints/${enc(c.file)}/download?format=${enc(format.value)}`);
      link.download = ours ? c.file : `${c.file.replace(/\.safetensors$/, '')}_${format.value}.safetensors`;
    });
    return h('div', { class: 'download-cell' }, format, link);
  }

  // --- data: one full load, then live events (or polling when the stream is not available) ---
  async function refreshJob() {
    const job = await api(url());
    if (ctx.alive) applyJob(job);
    return job;
  }

  async function loadAll() {
    const [job, metrics, samples, checkpoints, log] = await Promise.all([
      api(url()),
      api(url('/metrics')),
      api(url('/samples')),
      api(url('/checkpoints')),
      api(url('/log?lines=200')),
    ]);
    if (!ctx.alive) return;
    setLog(log.lines || []);
    applyJob(job);
    addMetrics(metrics.metrics);
    renderSamples(samples);
    renderCheckpoints(checkpoints.checkpoints || []);
  }

  async function poll() {
    const after = state.metrics.size ? Math.max(...state.metrics.keys()) : 0;
    const [job, metrics, samples, checkpoints, log] = await Promise.all([
      api(url()),
      api(url(`/metrics?after=${after}`)),
      api(url('/samples')),
      api(url('/checkpoints')),
      api(url('/log?lines=200')),
    ]);
    if (!ctx.alive) return;
    applyJob(job);
    addMetrics(metrics.metrics);
    renderSamples(samples);
    renderCheckpoints(checkpoints.checkpoints || []);
    setLog(log.lines || []);
  }

  let polling = false;
  function startPolling() {
    if (polling || !ctx.alive) return;
    polling = true;
    live.textContent = 'polling';
    live.className = 'live polling';
    ctx.every(2000, poll);
  }

  function connect() {
    if (!('EventSource' in window)) {
      startPolling();
      return;
    }
    const source = new EventSource(url('/events'));
    ctx.onCleanup(() => source.close());
    const on = (event, fn) =>
      source.addEventListener(event, (e) => {
        try {
          fn(JSON.parse(e.data));
        } catch (error) {
          console.warn(event, error);
        }
      });
    on('job', applyJob);
    on('metrics', (d) => {
      if (d.reset) state.metrics.clear(); // a new run in the same folder
      addMetrics(d.metrics);
      if (d.reset) drawSoon();
    });
    on('samples', renderSamples);
    on('checkpoints', (d) => renderCheckpoints(d.checkpoints || []));
    let firstLog = true; // the stream starts with the log's tail, then sends only new lines
    on('log', (d) => {
      if (firstLog || d.reset) setLog(d.lines || []);
      else appendLog(d.lines);
      firstLog = false;
    });
    source.addEventListener('open', () => {
      live.textContent = 'live';
      live.className = 'live on';
    });
    source.addEventListener('error', () => {
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        startPolling();
      } else {
        live.textContent = 'reconnecting…';
        live.className = 'live polling';
      }
    });
  }

  let comparisonsKey = '';
  async function refreshComparisons() {
    const { comparisons } = await api(`/api/comparisons?job=${enc(name)}`);
    const key = JSON.stringify(comparisons);
    if (!ctx.alive || key === comparisonsKey) return;
    comparisonsKey = key;
    put(comparisonsBox, comparisons.length ? comparisonsTable(comparisons) : h('p', { class: 'muted' }, 'No comparisons of this job yet.'));
  }

  await loadAll();
  connect();
  await refreshComparisons();
  ctx.every(3000, refreshComparisons);
}
