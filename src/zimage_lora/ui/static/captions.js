// Captioning on a dataset's page (#/datasets/<name>): the form that queues a captioning run (`zimage-lora caption
// --dry-run`, in the same queue as training, holding its device), the run's progress, and its proposals beside each
// image's thumbnail and its caption now: accept (as proposed or edited), reject, or accept the selected ones at once.
// Accepting writes the image's .txt; nothing else ever writes to the dataset.

import { h, put, enc, fmtTime, api, post, toast, statusBadge, progressBar, setProgress, errorBox } from './lib.js';

const ACTIVE = ['queued', 'running', 'stopping'];

/** The "Caption" card of dataset ``name``; ``onAccepted`` runs after captions were written (the page refreshes). */
export async function captionSection(ctx, name, { onAccepted }) {
  const [facts, modelData, deviceData, runData] = await Promise.all([
    api('/api/captioning'),
    api('/api/models').catch(() => ({ models: [] })),
    api('/api/devices'),
    api(`/api/datasets/${enc(name)}/captions`),
  ]);

  // --- the form ---
  const model = h('input', {
    id: 'cap-model',
    type: 'text',
    list: 'cap-models',
    placeholder: facts.default_model,
    spellcheck: 'false',
    autocomplete: 'off',
    'data-testid': 'cap-model',
  });
  const models = h(
    'datalist',
    { id: 'cap-models' },
    modelData.models.map((m) => h('option', { value: m.path }, 'in the data folder')),
    facts.models.map((m) => h('option', { value: m.hub_id }, m.about)),
  );
  const mode = h(
    'select',
    { id: 'cap-mode', 'data-testid': 'cap-mode' },
    facts.modes.map((m) => h('option', { value: m, selected: m === facts.default_mode }, m)),
  );
  const trigger = h('input', { id: 'cap-trigger', type: 'text', placeholder: 'optional, e.g. zfox', 'data-testid': 'cap-trigger' });
  const triggerStyle = h(
    'select',
    { id: 'cap-trigger-style', 'data-testid': 'cap-trigger-style' },
    facts.trigger_styles.map((s) => h('option', { value: s, selected: s === facts.default_trigger_style }, s)),
  );
  const maxWords = h('input', { id: 'cap-max-words', type: 'number', min: 1, step: 1, placeholder: 'no limit', 'data-testid': 'cap-max-words' });
  const overwrite = h('input', { id: 'cap-overwrite', type: 'checkbox', 'data-testid': 'cap-overwrite' });
  const device = h(
    'select',
    { id: 'cap-device', 'data-testid': 'cap-device' },
    ['auto', ...deviceData.devices].map((d) => h('option', { value: d }, d)),
  );
  const formError = h('p', { class: 'field-error', role: 'alert', hidden: true, 'data-testid': 'cap-error' });
  const submit = h('button', { type: 'submit', class: 'primary', 'data-testid': 'cap-submit' }, 'Caption');
  const field = (id, label, input) => h('div', { class: 'field' }, h('label', { for: id }, label), input);
  const form = h(
    'form',
    { 'data-testid': 'cap-form' },
    h(
      'div',
      { class: 'fields' },
      field('cap-model', 'Model (models/<name> or a hub id)', model),
      field('cap-mode', 'Mode', mode),
      field('cap-trigger', 'Trigger word', trigger),
      field('cap-trigger-style', 'Trigger style', triggerStyle),
      field('cap-max-words', 'Words at most', maxWords),
      field('cap-device', 'Device', device),
      h('div', { class: 'field check' }, overwrite, h('label', { for: 'cap-overwrite' }, 'Propose for images that have a caption too')),
    ),
    models,
    formError,
    h('div', { class: 'actions' }, submit),
  );

  const runBox = h('div', { class: 'caption-run', 'data-testid': 'cap-run', 'aria-live': 'polite' });
  const history = h('div', { class: 'caption-history', 'data-testid': 'cap-history' });
  let shown = null; // the id of the run shown
  let view = null; // what showRun built for it

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    formError.hidden = true;
    submit.disabled = true;
    try {
      const created = await post(`/api/datasets/${enc(name)}/caption`, {
        model: model.value.trim() || null,
        mode: mode.value,
        trigger: trigger.value.trim() || null,
        trigger_style: triggerStyle.value,
        max_words: maxWords.value ? Number(maxWords.value) : null,
        overwrite: overwrite.checked,
        device: device.value,
      });
      toast('Captioning queued: it starts when its device is free');
      await show(created.id);
      await listRuns();
    } catch (error) {
      formError.textContent = error.message;
      formError.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });

  // --- the runs of this dataset ---
  async function listRuns(data) {
    const { captions } = data || (await api(`/api/datasets/${enc(name)}/captions`));
    if (!ctx.alive) return;
    put(
      history,
      captions.length > 1
        ? h(
            'p',
            { class: 'help' },
            'Earlier runs: ',
            captions
              .slice()
              .reverse()
              .map((run) =>
                h(
                  'button',
                  {
                    type: 'button',
                    class: `small ${run.id === shown ? 'primary' : 'ghost'}`,
                    'data-testid': `cap-history-${run.id}`,
                    onclick: () => show(run.id),
                  },
                  `${fmtTime(run.created)} · ${run.status}`,
                ),
              ),
          )
        : null,
    );
  }

  async function show(id) {
    shown = id;
    view = null;
    await poll();
  }

  async function poll() {
    if (!shown) return;
    const run = await api(`/api/captions/${enc(shown)}`);
    if (!ctx.alive || run.id !== shown) return;
    if (!view || view.status !== run.status) {
      view = showRun(run);
      view.status = run.status;
      put(runBox, view.node);
      listRuns().catch(() => {});
    } else {
      view.update(run);
    }
  }

  // --- one run: its state, then its proposals ---
  function showRun(run) {
    const o = run.options;
    const what = [
      o.model || facts.default_model,
      o.mode || facts.default_mode,
      o.trigger ? `trigger ${o.trigger} (${o.trigger_style || facts.default_trigger_style})` : null,
      o.max_words ? `≤ ${o.max_words} words` : null,
      `on ${run.device || o.device}`,
    ];
    const stop = h(
      'button',
      {
        type: 'button',
        class: 'small',
        'data-testid': 'cap-stop',
        onclick: async () => {
          try {
            await post(`/api/captions/${enc(run.id)}/stop`);
            await poll();
          } catch (error) {
            toast(error.message, 'error');
          }
        },
      },
      run.status === 'queued' ? 'Leave the queue' : 'Stop',
    );
    const head = h(
      'div',
      { class: 'caption-run-head' },
      statusBadge(run.status, 'cap-status'),
      h('span', { class: 'muted small' }, what.filter(Boolean).join(' · ')),
      ACTIVE.includes(run.status) && run.status !== 'stopping' ? stop : null,
    );
    const bar = progressBar(run.progress.done, run.progress.total, 'cap-progress');
    bar.setAttribute('aria-label', 'Captioning progress');
    const counts = h('span', { class: 'muted small', 'data-testid': 'cap-count' });
    const showCounts = (p) => {
      setProgress(bar, p.done, p.total);
      const rate = p.per_s ? ` · ${p.per_s.toFixed(2)} images/s` : '';
      counts.textContent = `${p.done} / ${p.total} images${rate}`;
    };
    showCounts(run.progress);
    if (ACTIVE.includes(run.status)) {
      return { node: h('div', {}, head, bar, counts), update: (next) => showCounts(next.progress) };
    }
    if (run.status !== 'done') {
      return {
        node: h('div', {}, head, run.error ? h('pre', { class: 'log', 'data-testid': 'cap-run-error' }, run.error) : null),
        update: () => {},
      };
    }
    return { node: h('div', {}, head, counts, proposalList(run)), update: () => {} };
  }

  function proposalList(run) {
    const rows = [];
    const result = h('div', { 'data-testid': 'cap-accept-result', 'aria-live': 'polite' });
    const accept = async (chosen) => {
      if (!chosen.length) {
        toast('Select the proposals to accept first', 'error');
        return;
      }
      try {
        const done = await post(`/api/captions/${enc(run.id)}/accept`, { items: chosen.map((row) => row.item()) });
        for (const written of done.written) rows.find((row) => row.file === written.file)?.mark('written', written.caption);
        for (const kept of done.kept) rows.find((row) => row.file === kept.file)?.mark('kept', kept.caption);
        put(
          result,
          h(
            'p',
            { class: 'ok' },
            `Wrote ${done.written.length} caption${done.written.length === 1 ? '' : 's'}`,
            done.kept.length ? `; kept ${done.kept.length} existing (tick “replace” to change them)` : '',
            '.',
          ),
        );
        await onAccepted();
      } catch (error) {
        put(result, errorBox(error.message, 'cap-accept-error'));
      }
    };
    for (const [index, proposal] of run.proposals.entries()) rows.push(proposalRow(proposal, index, run, accept));
    const acceptSelected = h(
      'button',
      {
        type: 'button',
        class: 'primary',
        'data-testid': 'cap-accept-selected',
        onclick: () => accept(rows.filter((row) => row.selected())),
      },
      'Accept selected',
    );
    return h(
      'div',
      {},
      h('p', { class: 'help' }, 'Nothing is written until you accept: edit a proposal in place, reject the ones you do not want. A caption an image has already is kept unless you tick “replace”.'),
      h('div', { class: 'proposals', 'data-testid': 'cap-proposals' }, rows.map((row) => row.node)),
      h('div', { class: 'actions' }, acceptSelected),
      result,
    );
  }

  function proposalRow(proposal, index, run, accept) {
    const file = proposal.file;
    const id = `cap-text-${index}`;
    const text = h('textarea', { id, rows: 3, 'data-testid': `cap-text-${file}` });
    text.value = proposal.caption || '';
    const has = Boolean(proposal.existing);
    const select = h('input', {
      type: 'checkbox',
      id: `cap-select-${index}`,
      checked: Boolean(proposal.caption) && (!has || run.options.overwrite),
      'data-testid': `cap-select-${file}`,
    });
    const replace = h('input', { type: 'checkbox', id: `cap-replace-${index}`, checked: run.options.overwrite, 'data-testid': `cap-replace-${file}` });
    const why = proposal.problem || (has ? 'not captioned: it has a caption (queue with “Propose for images that have a caption too” for one)' : 'no proposal');
    const state = h('span', { class: 'save-state', 'data-testid': `cap-state-${file}` }, proposal.caption && !proposal.problem ? '' : why);
    const existing = h('p', { class: 'muted small', 'data-testid': `cap-existing-${file}` }, has ? `Now: ${proposal.existing}` : 'No caption yet');
    const node = h(
      'figure',
      { class: 'proposal', 'data-testid': `cap-proposal-${file}` },
      proposal.thumb ? h('img', { src: proposal.thumb, alt: file, loading: 'lazy', class: 'proposal-thumb' }) : h('div', { class: 'proposal-thumb' }),
      h(
        'figcaption',
        {},
        h('div', { class: 'file-line' }, select, h('label', { for: `cap-select-${index}`, class: 'mono file' }, file)),
        existing,
        h('label', { for: id, class: 'sr-only' }, `Proposed caption for ${file}`),
        text,
        h(
          'div',
          { class: 'actions' },
          has ? h('span', { class: 'check small' }, replace, h('label', { for: `cap-replace-${index}` }, 'replace')) : null,
          h('button', { type: 'button', class: 'small', 'data-testid': `cap-accept-${file}`, onclick: () => accept([row]) }, 'Accept'),
          h(
            'button',
            {
              type: 'button',
              class: 'small ghost',
              'data-testid': `cap-reject-${file}`,
              onclick: () => {
                select.checked = false;
                node.classList.add('rejected');
                state.textContent = 'rejected';
              },
            },
            'Reject',
          ),
          state,
        ),
      ),
    );
    text.addEventListener('input', () => {
      node.classList.remove('rejected');
      if (text.value.trim()) select.checked = true;
      state.textContent = text.value === (proposal.caption || '') ? '' : 'edited';
    });
    select.addEventListener('change', () => {
      if (select.checked) node.classList.remove('rejected');
    });
    const row = {
      file,
      node,
      selected: () => select.checked,
      item: () => ({ file, caption: text.value, overwrite: replace.checked }),
      mark: (how, caption) => {
        select.checked = false;
        node.classList.remove('rejected');
        node.classList.add(how);
        existing.textContent = `Now: ${caption}`;
        state.textContent = how === 'written' ? '✓ written' : 'kept the caption it had';
        state.className = `save-state ${how === 'written' ? 'ok' : 'dirty'}`;
      },
    };
    return row;
  }

  const section = h(
    'section',
    { class: 'card', 'data-testid': 'cap-section' },
    h('h2', {}, 'Caption'),
    h(
      'p',
      { class: 'help' },
      'Runs `zimage-lora caption --dry-run` in the queue, holding its device like a job: a captioning model proposes a caption per image, and you accept, edit or reject each one here.',
    ),
    form,
    runBox,
    history,
  );
  const runs = runData.captions;
  if (runs.length) await show(runs[runs.length - 1].id);
  await listRuns(runData);
  ctx.every(1000, async () => {
    if (view && ACTIVE.includes(view.status)) await poll();
  });
  return section;
}
