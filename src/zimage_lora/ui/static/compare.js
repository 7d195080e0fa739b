// Comparisons: a job trained once per value of one setting (`zimage-lora compare`, queued like a job under its
// devices). The dialog on a job's page that queues one, the comparison's page (#/comparisons/<id>: status,
// Stop/Resume, the previews of every variant side by side per checkpoint, each variant's loss curve), and the table
// of comparisons that the jobs list and a job's page show.

import { h, put, add, enc, fmtTime, fmtNumber, api, post, toast, statusBadge, progressBar, confirmByName } from './lib.js';
import { drawLossChart } from './charts.js';

// The settings offered first (any other key can be typed); the adapter comes first: the guide's A/B test.
const SETTINGS = [
  ['model.training_adapter', 'Training adapter'],
  ['target.rank', 'LoRA rank'],
  ['train.lr', 'Learning rate'],
  ['train.optimizer', 'Optimizer'],
];
const OTHER = '';
const ACTIVE = ['queued', 'running', 'stopping'];
const SCORE_NAMES = { leak: 'leak', concept: 'concept', accuracy: 'accuracy', turbo_drift: 'drift' };

function getPath(obj, key) {
  return key
    .replace(/\[(\d+)\]/g, '.$1')
    .split('.')
    .reduce((node, part) => (node === null || node === undefined ? undefined : node[part]), obj);
}

const asText = (value) => (value === null || value === undefined ? '' : typeof value === 'string' ? value : JSON.stringify(value));

/** What a value is called in a column head: a path by its file name (the whole value is in the tooltip). */
function shortLabels(values) {
  const short = values.map((v) => {
    const text = asText(v);
    return text.includes('/') ? text.split('/').pop() : text;
  });
  const unique = new Set(short).size === short.length;
  return values.map((v, i) => (unique ? short[i] : asText(v)));
}

// ---------------------------------------------------------------------------------------------------------------
// The dialog: pick a setting and two or more values, queue the comparison
// ---------------------------------------------------------------------------------------------------------------

/** Ask for a comparison of ``job`` (its detail from GET /api/jobs/<name>); resolves to the new id, or null. */
export async function compareDialog(job) {
  if (!job) return null;
  const [schema, modelData] = await Promise.all([api('/api/schema'), api('/api/models/files').catch(() => ({ files: [] }))]);
  const fields = new Map(schema.panels.flatMap((p) => p.fields).map((f) => [f.key, f]));
  const arch = schema.archs?.[job.config.model.arch] || {};
  const adapters = Object.entries(arch.adapters || {}).reverse(); // the registry lists the newest first: v1, v2
  const adapterFiles = (modelData.files || []).map((f) => f.path);

  return new Promise((resolve) => {
    const setting = h(
      'select',
      { id: 'cmp-setting', 'data-testid': 'cmp-setting' },
      SETTINGS.map(([key, label]) => h('option', { value: key }, `${label} (${key})`)),
      h('option', { value: OTHER }, 'Another setting: type its key'),
    );
    if (!adapters.length && !job.config.model.training_adapter) setting.value = 'target.rank';
    const key = h('input', {
      id: 'cmp-key',
      type: 'text',
      placeholder: 'e.g. train.batch_size or datasets[0].resolutions',
      spellcheck: 'false',
      autocomplete: 'off',
      'data-testid': 'cmp-key',
    });
    const keyRow = h('div', { class: 'subfield', hidden: true }, h('label', { for: 'cmp-key' }, 'Setting key'), key);
    const help = h('p', { class: 'help', 'data-testid': 'cmp-help' });
    const suggestions = h('datalist', { id: 'cmp-suggestions' });
    const list = h('div', { class: 'cmp-values', 'data-testid': 'cmp-values' });
    const error = h('p', { class: 'error-box', role: 'alert', hidden: true, 'data-testid': 'cmp-error' });
    const values = [];

    const currentKey = () => (setting.value === OTHER ? key.value.trim() : setting.value);
    const renderValues = () => {
      put(
        list,
        values.map((value, i) => {
          const input = h('input', {
            type: 'text',
            value,
            list: 'cmp-suggestions',
            spellcheck: 'false',
            autocomplete: 'off',
            'aria-label': `Value ${i + 1}`,
            'data-testid': `cmp-value-${i}`,
            oninput: () => {
              values[i] = input.value;
            },
          });
          const remove = h(
            'button',
            {
              type: 'button',
              class: 'small ghost',
              disabled: values.length <= 2,
              'aria-label': `Remove value ${i + 1}`,
              'data-testid': `cmp-remove-value-${i}`,
              onclick: () => {
                values.splice(i, 1);
                renderValues();
              },
            },
            '✕',
          );
          return h('div', { class: 'cmp-value-row' }, h('span', { class: 'muted mono' }, `v${i}`), input, remove);
        }),
      );
    };
    const prefill = () => {
      const chosen = currentKey();
      const field = fields.get(chosen);
      const current = chosen ? getPath(job.config, chosen) : undefined;
      let offered = [];
      let start = [asText(current), ''];
      if (chosen === 'model.training_adapter') {
        offered = [...adapters.map(([, ref]) => ref), ...adapterFiles];
        start = adapters.length ? adapters.map(([, ref]) => ref) : [asText(current), adapterFiles[0] || ''];
      } else if (chosen === 'target.rank' && Number.isFinite(current)) {
        start = [String(current), String(current * 2)];
      } else if (chosen === 'train.lr' && Number.isFinite(current)) {
        start = [String(current), String(current / 2)];
      }
      if (field?.enum) offered = field.enum.map(String);
      put(suggestions, offered.map((v) => h('option', { value: v })));
      values.splice(0, values.length, ...start);
      while (values.length < 2) values.push('');
      const described = field ? field.description : '';
      help.textContent = chosen
        ? `${described ? `${described} ` : ''}This job has ${chosen} = ${asText(current) || '(empty)'}.`
        : 'Any setting of the job file, as in `zimage-lora train --set KEY=VALUE`.';
      renderValues();
    };
    setting.addEventListener('change', () => {
      keyRow.hidden = setting.value !== OTHER;
      prefill();
      if (setting.value === OTHER) key.focus();
    });
    key.addEventListener('change', prefill);

    const ok = h('button', { type: 'submit', class: 'primary', 'data-testid': 'cmp-submit' }, 'Queue the comparison');
    const cancel = h('button', { type: 'button', 'data-testid': 'cmp-cancel' }, 'Cancel');
    const addValue = h(
      'button',
      {
        type: 'button',
        class: 'small',
        'data-testid': 'cmp-add-value',
        onclick: () => {
          values.push('');
          renderValues();
          list.querySelector(`[data-testid="cmp-value-${values.length - 1}"]`)?.focus();
        },
      },
      '+ Add a value',
    );
    const form = h(
      'form',
      { method: 'dialog' },
      h('h2', { id: 'cmp-title' }, `Compare ${job.name}`),
      h(
        'p',
        { class: 'help' },
        'The job is trained once per value, with the same data, seeds and every other setting; its previews are then shown side by side at each checkpoint.',
      ),
      h('div', { class: 'subfield' }, h('label', { for: 'cmp-setting' }, 'Setting'), setting),
      keyRow,
      help,
      h('span', { class: 'label' }, 'Values'),
      list,
      suggestions,
      addValue,
      error,
      h('div', { class: 'actions' }, cancel, ok),
    );
    const dialog = h('dialog', { class: 'dialog dialog-wide', 'aria-labelledby': 'cmp-title', 'data-testid': 'cmp-dialog' }, form);
    let result = null;
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      error.hidden = true;
      ok.disabled = true;
      try {
        const created = await post(`/api/jobs/${enc(job.name)}/compare`, { setting: currentKey(), values: values.map((v) => v.trim()) });
        result = created.id;
        toast('Comparison queued: it starts when its devices are free');
        dialog.close();
      } catch (failure) {
        error.textContent = failure.message;
        error.hidden = false;
      } finally {
        ok.disabled = false;
      }
    });
    cancel.addEventListener('click', () => dialog.close());
    dialog.addEventListener('close', () => {
      dialog.remove();
      resolve(result);
    });
    prefill();
    add(document.body, dialog);
    dialog.showModal();
    setting.focus();
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The table of comparisons (jobs list, a job's page)
// ---------------------------------------------------------------------------------------------------------------

export function comparisonsTable(comparisons, { showJob = false } = {}) {
  const heads = ['Setting', ...(showJob ? ['Job'] : []), 'Values', 'Status', 'Created'];
  return h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      { class: 'table', 'data-testid': 'comparisons-table' },
      h('thead', {}, h('tr', {}, heads.map((t) => h('th', {}, t)))),
      h(
        'tbody',
        {},
        comparisons.map((c) =>
          h(
            'tr',
            { 'data-testid': `cmp-row-${c.id}` },
            h('td', {}, h('a', { href: `#/comparisons/${enc(c.id)}`, class: 'mono', 'data-testid': `cmp-link-${c.id}` }, c.setting)),
            showJob ? h('td', {}, h('a', { href: `#/jobs/${enc(c.job)}` }, c.job)) : null,
            h('td', { class: 'mono small' }, shortLabels(c.values).join(' | ')),
            h(
              'td',
              {},
              statusBadge(c.status, `cmp-status-${c.id}`),
              c.variant !== null && c.variant !== undefined ? h('span', { class: 'muted small' }, ` v${c.variant}`) : null,
            ),
            h('td', {}, fmtTime(c.created)),
          ),
        ),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------------------------
// One comparison: status, actions, previews side by side per checkpoint, loss curves
// ---------------------------------------------------------------------------------------------------------------

export async function comparisonView(ctx, root, id) {
  const url = `/api/comparisons/${enc(id)}`;
  const state = { data: null, step: null, chosen: false, key: '' };

  const badge = statusBadge('…', 'cmp-status');
  const jobLink = h('a', { class: 'crumb', 'data-testid': 'cmp-job' }, '…');
  const title = h('span', { class: 'mono', 'data-testid': 'cmp-setting-name' }, '');
  const progressText = h('p', { class: 'muted', 'data-testid': 'cmp-progress' }, '');
  const errorLine = h('p', { class: 'error-box', role: 'alert', hidden: true, 'data-testid': 'cmp-error' });
  const variantsBody = h('tbody');
  const stepSelect = h('select', { id: 'cmp-step', 'data-testid': 'cmp-step' });
  const gridBox = h('div', { class: 'cmp-grid-wrap', 'data-testid': 'cmp-grid-box' }, h('p', { class: 'muted' }, 'The previews appear with the first checkpoint.'));
  const imagesBox = h('p', { class: 'small' });
  const summaryBox = h('div', { 'data-testid': 'cmp-summary-box' });
  const chartsBox = h('div', { class: 'cmp-charts', 'data-testid': 'cmp-losses' });
  const logBox = h('pre', { class: 'log', 'data-testid': 'cmp-log', tabindex: 0, 'aria-label': 'The comparison’s log' });

  const buttons = {};
  const action = (key, label, handler, cls = '') => {
    buttons[key] = h('button', { type: 'button', class: cls, hidden: true, 'data-testid': `cmp-${key}`, onclick: handler }, label);
    return buttons[key];
  };
  const request = (what, message) => async () => {
    try {
      await post(`${url}/${what}`);
      toast(message);
      await refresh();
    } catch (error) {
      toast(error.message, 'error');
    }
  };

  add(
    root,
    h(
      'div',
      { class: 'page-header' },
      h('h1', {}, h('a', { href: '#/jobs', class: 'crumb' }, 'Jobs'), ' / ', jobLink, ' / ', 'Compare ', title, ' ', badge),
      h(
        'div',
        { class: 'actions' },
        action('stop', 'Stop', request('stop', 'Stopping: the variant in training saves, then the comparison stops')),
        action('resume', 'Resume', request('resume', 'Queued to resume: finished variants are kept'), 'primary'),
        action(
          'delete',
          'Delete',
          async () => {
            const ok = await confirmByName({ title: 'Delete this comparison?', text: 'This removes its runs, previews and grids.', name: id });
            if (!ok) return;
            try {
              await api(`${url}?confirm=${enc(id)}`, { method: 'DELETE' });
              toast('Comparison deleted');
              location.hash = state.data ? `#/jobs/${enc(state.data.job)}` : '#/jobs';
            } catch (error) {
              toast(error.message, 'error');
            }
          },
          'danger',
        ),
      ),
    ),
    progressText,
    errorLine,
    h(
      'section',
      { class: 'card' },
      h('h2', {}, 'Variants'),
      h(
        'div',
        { class: 'table-wrap' },
        h(
          'table',
          { class: 'table', 'data-testid': 'cmp-variants' },
          h('thead', {}, h('tr', {}, ['Variant', 'Value', 'Status', 'Progress', 'Last loss'].map((t) => h('th', {}, t)))),
          variantsBody,
        ),
      ),
    ),
    h(
      'section',
      { class: 'card' },
      h('div', { class: 'cmp-grid-head' }, h('h2', {}, 'Previews side by side'), h('label', { for: 'cmp-step' }, 'Checkpoint'), stepSelect),
      gridBox,
      imagesBox,
      summaryBox,
    ),
    h('section', { class: 'card' }, h('h2', {}, 'Loss'), chartsBox),
    h('details', { class: 'card' }, h('summary', {}, 'Log'), logBox),
  );

  stepSelect.addEventListener('change', () => {
    state.step = stepSelect.value;
    state.chosen = true;
    renderGrid();
  });

  function steps() {
    const found = new Set();
    for (const v of state.data?.progress?.variants || []) for (const step of Object.keys(v.samples || {})) found.add(Number(step));
    return [...found].sort((a, b) => a - b);
  }

  function apply(data) {
    state.data = data;
    badge.className = `badge badge-${data.status}`;
    badge.textContent = data.status;
    jobLink.textContent = data.job;
    jobLink.href = `#/jobs/${enc(data.job)}`;
    title.textContent = data.setting;
    const progress = data.progress;
    const count = data.values.length;
    if (data.status === 'queued') progressText.textContent = `Queued: waiting for ${data.device || 'its devices'}.`;
    else if (data.status === 'running' && progress && progress.variant !== null && progress.variant !== undefined)
      progressText.textContent = `Training variant ${progress.variant + 1} of ${count} on ${data.device}.`;
    else if (data.status === 'running') progressText.textContent = `Starting on ${data.device}…`;
    else if (data.status === 'stopped') progressText.textContent = 'Stopped. Resume goes on from the saved step; finished variants are kept.';
    else if (data.status === 'done') progressText.textContent = `Done: ${count} variants trained.`;
    else progressText.textContent = '';
    errorLine.hidden = !data.error;
    errorLine.textContent = data.error || '';
    buttons.stop.hidden = !['queued', 'running'].includes(data.status);
    buttons.resume.hidden = !['stopped', 'failed'].includes(data.status);
    buttons.delete.hidden = ACTIVE.includes(data.status);
    const lines = (data.log_tail || []).join('\n');
    if (logBox.textContent !== lines) logBox.textContent = lines;

    const key = JSON.stringify([progress, data.values]);
    if (key === state.key) return;
    state.key = key;
    renderVariants();
    const all = steps();
    if (!state.chosen || !all.includes(Number(state.step))) state.step = all.length ? String(all.at(-1)) : null;
    put(stepSelect, all.map((s) => h('option', { value: String(s) }, `step ${s}`)));
    stepSelect.disabled = !all.length;
    if (state.step !== null) stepSelect.value = state.step;
    renderGrid();
    renderCharts();
  }

  function renderVariants() {
    const labels = shortLabels(state.data.values);
    const variants = state.data.progress?.variants || [];
    put(
      variantsBody,
      state.data.values.map((value, i) => {
        const v = variants[i] || { status: 'waiting', step: 0, steps: null, losses: [] };
        const last = v.losses?.length ? v.losses.at(-1)[1] : null;
        return h(
          'tr',
          { 'data-testid': `cmp-variant-${i}` },
          h('td', { class: 'mono' }, `v${i}`),
          h('td', { class: 'mono', title: asText(value) }, labels[i]),
          h('td', {}, statusBadge(v.status, `cmp-variant-status-${i}`)),
          h(
            'td',
            { class: 'progress-cell' },
            h('span', { class: 'mono', 'data-testid': `cmp-variant-step-${i}` }, `${v.step ?? 0} / ${v.steps ?? '?'}`),
            progressBar(v.step, v.steps, `cmp-variant-progress-${i}`),
          ),
          h('td', { class: 'mono' }, fmtNumber(last)),
        );
      }),
    );
  }

  function renderGrid() {
    const data = state.data;
    const progress = data?.progress;
    if (!progress || state.step === null) return;
    const labels = shortLabels(data.values);
    const step = state.step;
    const head = h(
      'tr',
      {},
      h('th', {}, 'Prompt'),
      data.values.map((value, i) => {
        const scores = progress.variants[i]?.scores?.[step] || {};
        const text = Object.entries(scores)
          .filter(([, v]) => Number.isFinite(v))
          .map(([k, v]) => `${SCORE_NAMES[k] || k} ${fmtNumber(v, 3)}`)
          .join(', ');
        return h(
          'th',
          { title: asText(value), 'data-testid': `cmp-column-${i}` },
          h('span', { class: 'cmp-label' }, labels[i]),
          text ? h('span', { class: 'cmp-scores', 'data-testid': `cmp-scores-${i}` }, text) : null,
        );
      }),
    );
    const rows = progress.prompts.map((prompt, row) =>
      h(
        'tr',
        {},
        h('th', { scope: 'row', class: 'cmp-prompt' }, prompt),
        data.values.map((_, col) => {
          const src = progress.variants[col]?.samples?.[step]?.[row];
          return h(
            'td',
            { 'data-testid': `cmp-cell-${row}-${col}` },
            src
              ? h('a', { href: src, target: '_blank', rel: 'noopener' }, h('img', { src, alt: `${labels[col]}: ${prompt} at step ${step}`, 'data-testid': 'cmp-image', 'data-variant': col }))
              : h('span', { class: 'muted small' }, progress.variants[col]?.status === 'waiting' ? 'waiting' : '–'),
          );
        }),
      ),
    );
    put(gridBox, h('table', { class: 'cmp-grid', 'data-testid': 'cmp-grid', 'data-step': step }, h('thead', {}, head), h('tbody', {}, rows)));
    const grid = progress.grids.find((g) => String(g.step) === step);
    put(
      imagesBox,
      grid ? h('a', { href: grid.url, target: '_blank', rel: 'noopener', 'data-testid': 'cmp-grid-image' }, `The grid at step ${step} as one image`) : null,
    );
    put(
      summaryBox,
      progress.summary
        ? [h('h3', {}, 'Summary: the final previews'), h('a', { href: progress.summary, target: '_blank', rel: 'noopener' }, h('img', { src: progress.summary, alt: 'Summary: each variant’s final previews', class: 'cmp-summary', 'data-testid': 'cmp-summary' }))]
        : null,
    );
  }

  function renderCharts() {
    const variants = state.data.progress?.variants || [];
    const all = variants.flatMap((v) => v.losses || []);
    if (!all.length) {
      put(chartsBox, h('p', { class: 'muted' }, 'The curves appear with the first steps.'));
      return;
    }
    const losses = all.map(([, loss]) => loss).filter(Number.isFinite);
    const range = {
      xMin: Math.min(...all.map(([step]) => step)),
      xMax: Math.max(...all.map(([step]) => step)),
      yMin: Math.min(...losses),
      yMax: Math.max(...losses),
    };
    const labels = shortLabels(state.data.values);
    put(
      chartsBox,
      variants.map((v, i) => {
        const box = h('div', { class: 'chart', 'data-testid': `cmp-loss-${i}` });
        drawLossChart(box, (v.losses || []).map(([step, loss]) => ({ step, loss })), range);
        return h('div', {}, h('h3', { class: 'mono', title: asText(state.data.values[i]) }, `v${i}: ${labels[i]}`), box);
      }),
    );
  }

  async function refresh() {
    const data = await api(url);
    if (ctx.alive) apply(data);
  }

  await refresh();
  ctx.every(1500, refresh);
}
