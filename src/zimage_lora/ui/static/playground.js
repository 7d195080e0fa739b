// Playground (#/playground): generate with a base model and LoRAs (each with its weight); shows the queue state
// (a generation waits while a job trains on the same device) and the images. LoRAs come from the jobs, from uploads
// (DATA/loras) and from the read-only --lora-dir folders; each chosen LoRA shows what `lora inspect` reads of it
// for the chosen base model (format, modules, ranks, trigger word) and what will not apply. Past generations
// (GET /api/generations) are listed under the form, newest first; those still queued or running are followed.
// Generate stays disabled until the generation it queued has ended; an empty base model is the architecture's
// default (the placeholder shows which); the server's refusals are said once, beside the button, in the form's
// words (its field labels, not the API's keys).

import { h, put, add, enc, api, post, debounce, fmtTime, pageHeader, errorBox, ApiError } from './lib.js';

// ---------------------------------------------------------------------------------------------------------------
// Playground: generate with a base model and LoRAs
// ---------------------------------------------------------------------------------------------------------------

const PLAYGROUND_KEY = 'zimage-lora.playground';
const PENDING_KEY = 'zimage-lora.playground.pending'; // the generation this tab's Generate waits for (a reload keeps it)
const HISTORY_PAGE = 12; // past generations shown at first, and added by each "Show more"
const POLL_MS = 1000;

// The form's labels of the request's fields (the API's `field`), so that an error names what the user sees.
const LABELS = {
  model: 'Base model',
  arch: 'Architecture',
  prompt: 'Prompt',
  negative_prompt: 'Negative prompt',
  width: 'Width',
  height: 'Height',
  steps: 'Steps',
  guidance: 'Guidance',
  seed: 'Seed',
  count: 'Images',
  device: 'Device',
  quantize: 'Quantize weights',
  compile: 'torch.compile',
  fuse: 'Fuse LoRAs',
};

function fieldLabel(field) {
  const lora = /^loras\.(\d+)\.(path|weight)$/.exec(field || '');
  if (lora) return `LoRA ${Number(lora[1]) + 1}${lora[2] === 'weight' ? ' weight' : ''}`;
  return LABELS[field] || null;
}

/** An API sentence that starts with the request's field name ("model: ...", "width: ..."), with the form's label. */
function inFieldTerms(message, field) {
  const label = fieldLabel(field);
  if (!label || !message || !message.startsWith(field)) return message;
  return label + message.slice(field.length);
}

export async function playgroundView(ctx, root) {
  const [schema, modelData, loraData, deviceData, historyData] = await Promise.all([
    api('/api/schema'),
    api('/api/models'),
    api('/api/loras'),
    api('/api/devices'),
    api(`/api/generations?limit=${HISTORY_PAGE}`),
  ]);
  if (!ctx.alive) return;
  // the archs LoRAs are used with (a LoRA trained with the training adapter runs on plain Turbo)
  const archs = Object.fromEntries(Object.entries(schema.archs || {}).filter(([, a]) => a.inference));
  const models = modelData.models || [];
  let loras = loraData.loras || [];
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(PLAYGROUND_KEY) || '{}');
  } catch {
    saved = {};
  }

  const field = (id, label, control, help) =>
    h('div', { class: 'field' }, h('label', { for: id }, label), control, help ? h('p', { class: 'help' }, help) : null);
  const input = (id, props) => h('input', { id, 'data-testid': id, ...props });

  const model = input('pg-model', { type: 'text', list: 'pg-models', spellcheck: 'false', 'aria-describedby': 'pg-model-help' });
  const modelList = h(
    'datalist',
    { id: 'pg-models' },
    models.map((m) => h('option', { value: m.path }, m.name)),
    [...new Set(Object.values(archs).map((a) => a.default_model).filter(Boolean))].map((m) => h('option', { value: m })),
  );
  const arch = h(
    'select',
    { id: 'pg-arch', 'data-testid': 'pg-arch' },
    Object.keys(archs).map((a) => h('option', { value: a }, archs[a].label || a)),
  );
  const prompt = h('textarea', { id: 'pg-prompt', rows: 3, 'data-testid': 'pg-prompt', placeholder: 'my_trigger, portrait in a garden' });
  const negative = h('textarea', { id: 'pg-negative', rows: 2, 'data-testid': 'pg-negative', placeholder: 'only used with guidance > 1' });
  const width = input('pg-width', { type: 'number', min: 64, max: 4096, step: 16, value: '1024' });
  const height = input('pg-height', { type: 'number', min: 64, max: 4096, step: 16, value: '1024' });
  const steps = input('pg-steps', { type: 'number', min: 1, step: 1, value: '8' });
  const guidance = input('pg-guidance', { type: 'number', min: 0, step: 0.1, value: '1' });
  const seed = input('pg-seed', { type: 'number', min: 0, step: 1, value: '42' });
  const count = input('pg-count', { type: 'number', min: 1, max: 16, step: 1, value: '1' });
  const device = h(
    'select',
    { id: 'pg-device', 'data-testid': 'pg-device' },
    ['auto', ...deviceData.devices].map((d) => h('option', { value: d }, d)), // the machine's devices
  );
  const quantize = h(
    'select',
    { id: 'pg-quantize', 'data-testid': 'pg-quantize' },
    [
      ['none', 'none (bf16)'],
      ['float8', 'float8 (half the memory)'],
      ['int8', 'int8 (half the memory)'],
      ['nf4', 'nf4 (a quarter, lower quality)'],
    ].map(([v, label]) => h('option', { value: v }, label)),
  );
  const compile = h('input', { type: 'checkbox', id: 'pg-compile', 'data-testid': 'pg-compile' });
  const fuse = h('input', { type: 'checkbox', id: 'pg-fuse', 'data-testid': 'pg-fuse', checked: true });
  // empty = the arch's default model, which the server takes from the same registry (/api/schema's archs)
  const defaultModel = () => archs[arch.value]?.default_model || '';
  const archDefaults = () => {
    const info = archs[arch.value] || {};
    if (info.sample_steps !== undefined) steps.value = String(info.sample_steps);
    if (info.sample_guidance !== undefined) guidance.value = String(info.sample_guidance);
    model.placeholder = defaultModel();
  };
  arch.addEventListener('change', () => {
    // a typed default model follows the architecture; an empty field stays empty (its placeholder follows)
    if (Object.values(archs).some((a) => a.default_model === model.value)) model.value = archs[arch.value]?.default_model || model.value;
    archDefaults();
  });

  // --- LoRAs, each with its weight and what inspect reads of it ---
  const loraRows = h('div', { class: 'lora-rows', 'data-testid': 'pg-loras' });
  const chosen = []; // {path, weight}
  const loraLabel = (l) => (l.job ? `${l.job} · ${l.final ? 'final' : `step ${l.step}`} · ${l.file}` : l.file);
  const loraGroup = (l) => (l.source === 'upload' ? 'Uploaded' : l.source === 'folder' ? `Folder ${l.folder}` : 'Trained here');
  function loraOptions() {
    const groups = new Map();
    for (const l of loras) {
      const group = loraGroup(l);
      if (!groups.has(group)) groups.set(group, []);
      groups.get(group).push(h('option', { value: l.path }, loraLabel(l)));
    }
    return [...groups].map(([label, options]) => h('optgroup', { label }, options));
  }
  function useLora(entry, index) {
    const lora = loras.find((l) => l.path === entry.path);
    if (lora && !model.value && lora.base_model) model.value = lora.base_model;
    if (lora && lora.arch && archs[lora.arch] && index === 0 && arch.value !== lora.arch) {
      arch.value = lora.arch;
      archDefaults();
    }
  }

  // inspect's report per LoRA and base model (GET /api/loras/inspect): a promise of {report} or {error}
  const reports = new Map();
  const baseModel = () => model.value.trim();
  function inspect(path) {
    const key = `${path}|${baseModel()}`;
    if (!reports.has(key)) {
      const query = `path=${enc(path)}${baseModel() ? `&model=${enc(baseModel())}` : ''}`;
      reports.set(
        key,
        api(`/api/loras/inspect?${query}`).then(
          (report) => ({ report }),
          (error) => ({ error: error.message }),
        ),
      );
    }
    return reports.get(key);
  }
  async function showInfo(box, entry, index) {
    const path = entry.path;
    if (!path) {
      put(box);
      return;
    }
    put(box, h('p', { class: 'help' }, 'Reading the file…'));
    const { report, error } = await inspect(path);
    if (entry.path !== path || !box.isConnected) return; // changed meanwhile
    if (error) {
      put(box, h('p', { class: 'field-error', 'data-testid': `pg-lora-error-${index}` }, error));
      return;
    }
    put(
      box,
      h('p', { class: 'help', 'data-testid': `pg-lora-summary-${index}` }, report.summary),
      report.warnings.length
        ? h('ul', { class: 'lora-warnings', 'data-testid': `pg-lora-warnings-${index}` }, report.warnings.map((w) => h('li', {}, w)))
        : null,
    );
  }

  function renderLoras() {
    put(loraRows, 
      ...chosen.map((entry, index) => {
        const select = h(
          'select',
          { id: `pg-lora-${index}`, 'data-testid': `pg-lora-${index}` },
          h('option', { value: '' }, '(choose a LoRA)'),
          loraOptions(),
          entry.path && !loras.some((l) => l.path === entry.path) ? h('option', { value: entry.path }, entry.path) : null,
        );
        select.value = entry.path || '';
        const info = h('div', { class: 'lora-info', 'aria-live': 'polite', 'data-testid': `pg-lora-info-${index}` });
        select.addEventListener('change', () => {
          entry.path = select.value;
          useLora(entry, index);
          showInfo(info, entry, index);
        });
        showInfo(info, entry, index);
        const weight = h('input', {
          id: `pg-lora-weight-${index}`,
          type: 'range',
          min: 0,
          max: 1.5,
          step: 0.05,
          value: String(entry.weight),
          'data-testid': `pg-lora-weight-${index}`,
        });
        const shown = h('output', { for: weight.id, class: 'mono', 'data-testid': `pg-lora-weight-value-${index}` }, entry.weight.toFixed(2));
        weight.addEventListener('input', () => {
          entry.weight = Number(weight.value);
          shown.textContent = entry.weight.toFixed(2);
        });
        return h(
          'div',
          { class: 'lora-entry' },
          h(
            'div',
            { class: 'lora-row' },
            h('div', { class: 'field' }, h('label', { for: select.id }, `LoRA ${index + 1}`), select),
            h('div', { class: 'field weight' }, h('label', { for: weight.id }, 'Weight'), h('div', { class: 'range' }, weight, shown)),
            h(
              'button',
              {
                type: 'button',
                class: 'small ghost',
                'data-testid': `pg-remove-lora-${index}`,
                onclick: () => {
                  chosen.splice(index, 1);
                  renderLoras();
                },
              },
              'Remove',
            ),
          ),
          info,
        );
      }),
    );
  }
  model.addEventListener('input', debounce(renderLoras, 500)); // inspect again for the new base model
  const addLora = h(
    'button',
    {
      type: 'button',
      class: 'small',
      'data-testid': 'pg-add-lora',
      onclick: () => {
        chosen.push({ path: '', weight: 0.8 });
        renderLoras();
      },
    },
    'Add LoRA',
  );

  // --- uploading a LoRA from another trainer into DATA/loras (checked against the base model first) ---
  const uploadInput = h('input', {
    id: 'pg-lora-upload',
    type: 'file',
    accept: '.safetensors',
    multiple: true,
    class: 'file-input',
    'data-testid': 'pg-lora-upload',
  });
  const uploadResult = h('div', { class: 'upload-result', 'aria-live': 'polite', 'data-testid': 'pg-upload-result' });
  async function uploadLoras(files) {
    if (!files.length) return;
    const form = new FormData();
    for (const file of files) form.append('files', file, file.name);
    const base = baseModel();
    put(uploadResult, h('p', { class: 'muted' }, `Uploading ${files.length === 1 ? files[0].name : `${files.length} files`}…`));
    const rejectedList = (rejected) =>
      rejected.length
        ? h('ul', { class: 'error-list', 'data-testid': 'pg-upload-rejected' }, rejected.map((r) => h('li', {}, `${r.file}: ${r.error}`)))
        : null;
    try {
      const result = await api(`/api/loras/upload${base ? `?model=${enc(base)}` : ''}`, { method: 'POST', form });
      loras = (await api('/api/loras')).loras || [];
      for (const saved of result.saved) {
        reports.set(`${saved.path}|${base}`, Promise.resolve({ report: saved.inspect }));
        const entry = chosen.find((c) => !c.path) || { path: '', weight: 0.8 };
        if (!chosen.includes(entry)) chosen.push(entry);
        entry.path = saved.path;
        useLora(entry, chosen.indexOf(entry));
      }
      renderLoras();
      put(
        uploadResult,
        h('p', { class: 'ok' }, `Saved ${result.saved.map((s) => s.path).join(', ')}.`),
        rejectedList(result.rejected || []),
      );
    } catch (error) {
      if (error instanceof ApiError && Array.isArray(error.data.rejected)) put(uploadResult, rejectedList(error.data.rejected));
      else put(uploadResult, errorBox(error.message, 'pg-upload-error'));
    } finally {
      uploadInput.value = '';
    }
  }
  uploadInput.addEventListener('change', () => uploadLoras([...uploadInput.files]));
  const loraActions = h(
    'div',
    { class: 'lora-actions' },
    addLora,
    h('label', { for: 'pg-lora-upload', class: 'button small', 'data-testid': 'pg-upload-button' }, 'Upload a LoRA…'),
    uploadInput,
    h('span', { class: 'help' }, 'A .safetensors LoRA from any Z-Image trainer (AI Toolkit, kohya/musubi, diffusers, ComfyUI, DiffSynth): saved in the data folder, checked against the base model above.'),
  );

  // Restore the last settings (this browser only).
  arch.value = saved.arch && archs[saved.arch] ? saved.arch : Object.keys(archs)[0];
  archDefaults();
  model.value = saved.model || '';
  for (const [el, key] of [
    [prompt, 'prompt'],
    [negative, 'negative_prompt'],
    [width, 'width'],
    [height, 'height'],
    [steps, 'steps'],
    [guidance, 'guidance'],
    [seed, 'seed'],
    [count, 'count'],
    [device, 'device'],
    [quantize, 'quantize'],
  ]) {
    if (saved[key] !== undefined && saved[key] !== null) el.value = String(saved[key]);
  }
  if (!device.value) device.value = 'auto'; // a remembered device this machine lacks
  compile.checked = saved.compile === true;
  fuse.checked = saved.fuse !== false;
  for (const l of saved.loras || []) if (l && l.path) chosen.push({ path: l.path, weight: Number(l.weight) || 0.8 });
  renderLoras();

  const generate = h('button', { type: 'submit', class: 'primary', 'data-testid': 'pg-generate' }, 'Generate');
  const formError = h('p', { class: 'field-error pg-error', role: 'alert', hidden: true, 'data-testid': 'pg-error' });
  const results = h('div', { class: 'results', 'data-testid': 'pg-results' });
  const noResults = h('p', { class: 'muted', 'data-testid': 'pg-no-results' }, 'No generations yet: they are listed here, newest first.');
  const more = h('button', { type: 'button', class: 'small', hidden: true, 'data-testid': 'pg-more' }, 'Show more');
  const moreError = h('div', { 'aria-live': 'polite' });
  const num = (el) => (el.value === '' ? null : Number(el.value));
  const form = h(
    'form',
    { class: 'card playground-form' },
    h(
      'div',
      { class: 'fields' },
      h(
        'div',
        { class: 'field' },
        h('label', { for: 'pg-model' }, 'Base model'),
        model,
        h('p', { class: 'help', id: 'pg-model-help' }, 'A folder under DATA/models, a local path or a hub id; empty: the architecture’s default (shown greyed).'),
      ),
      modelList,
      field('pg-arch', 'Architecture', arch, 'Sets the default steps, guidance and base model.'),
    ),
    h('h2', {}, 'LoRAs'),
    loraRows,
    loraActions,
    uploadResult,
    h(
      'div',
      { class: 'fields' },
      h('div', { class: 'field field-wide' }, h('label', { for: 'pg-prompt' }, 'Prompt'), prompt),
      h('div', { class: 'field field-wide' }, h('label', { for: 'pg-negative' }, 'Negative prompt'), negative),
      field('pg-width', 'Width', width),
      field('pg-height', 'Height', height),
      field('pg-steps', 'Steps', steps),
      field('pg-guidance', 'Guidance (CFG, ≤ 1 = none)', guidance),
      field('pg-seed', 'Seed', seed),
      field('pg-count', 'Images', count),
      field('pg-device', 'Device', device),
      field('pg-quantize', 'Quantize weights', quantize, 'Transformer and text encoder; for small cards.'),
      field('pg-compile', 'torch.compile', compile, 'Slow first image, faster after: for batches.'),
      field('pg-fuse', 'Fuse LoRAs', fuse, 'Into the weights: no cost per step. Off: branches, as the previews run them.'),
    ),
    h('div', { class: 'actions' }, formError, generate),
  );
  const controls = {
    model,
    arch,
    prompt,
    negative_prompt: negative,
    width,
    height,
    steps,
    guidance,
    seed,
    count,
    device,
    quantize,
    compile,
    fuse,
  };

  // --- the error beside the button (once; the field it is about marked) ---
  let invalid = null;
  function showError(error) {
    const message = error instanceof ApiError ? inFieldTerms(error.message, error.field) : error.message || String(error);
    formError.textContent = message;
    formError.hidden = false;
    invalid = controls[error instanceof ApiError ? error.field : ''] || null;
    if (invalid) {
      invalid.setAttribute('aria-invalid', 'true');
      invalid.addEventListener('input', clearError, { once: true });
    }
    formError.scrollIntoView({ block: 'nearest' });
  }
  function clearError() {
    formError.hidden = true;
    formError.textContent = '';
    if (invalid) invalid.removeAttribute('aria-invalid');
    invalid = null;
  }

  // --- Generate: disabled from the click until the generation it queued has ended, across a reload ---
  let pending = null; // the id Generate waits for
  function busy(on) {
    generate.disabled = on;
    generate.setAttribute('aria-busy', on ? 'true' : 'false');
    generate.textContent = on ? 'Generating…' : 'Generate';
  }
  function wait(id) {
    pending = id;
    try {
      if (id) sessionStorage.setItem(PENDING_KEY, id);
      else sessionStorage.removeItem(PENDING_KEY);
    } catch {
      // private mode: a reload forgets it
    }
  }
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (generate.disabled) return; // Enter in a field while a generation runs
    clearError();
    busy(true);
    const request = {
      model: model.value.trim() || null, // null: the architecture's default (the placeholder)
      arch: arch.value,
      loras: chosen.filter((l) => l.path).map((l) => ({ path: l.path, weight: l.weight })),
      prompt: prompt.value,
      negative_prompt: negative.value,
      width: num(width),
      height: num(height),
      steps: num(steps),
      guidance: num(guidance),
      seed: num(seed),
      count: num(count),
      device: device.value,
      quantize: quantize.value,
      compile: compile.checked,
      fuse: fuse.checked,
    };
    try {
      localStorage.setItem(PLAYGROUND_KEY, JSON.stringify({ ...request, loras: chosen }));
    } catch {
      // private mode: settings are just not remembered
    }
    try {
      const generation = await post('/api/generate', request);
      if (!ctx.alive) return;
      wait(generation.id);
      if (!shown.has(generation.id)) total += 1; // else the same request was queued already: its card is followed
      const card = show(generation, 'new');
      showMore();
      card.scrollIntoView({ block: 'nearest' });
      if (generation.status === 'done' || generation.status === 'failed') ended(generation);
    } catch (error) {
      busy(false);
      showError(error);
    }
  });
  function ended(generation) {
    if (generation.id !== pending) return;
    wait(null);
    busy(false);
    if (generation.status === 'failed') shown.get(generation.id)?.card.scrollIntoView({ block: 'nearest' });
  }

  // --- the generations: new ones on top, the history below, those queued or running followed ---
  const shown = new Map(); // id -> {card, status, update}
  let total = historyData.total || 0; // every generation there is; those beyond the shown ones are older
  const settings = (r) =>
    [
      `${r.width}×${r.height}`,
      r.steps === null || r.steps === undefined ? 'default steps' : `${r.steps} step${r.steps === 1 ? '' : 's'}`,
      r.guidance === null || r.guidance === undefined ? 'default guidance' : `guidance ${r.guidance}`,
      `seed ${r.seed}`,
      r.count > 1 ? `${r.count} images` : null,
      r.loras && r.loras.length ? r.loras.map((l) => `${l.path.split('/').pop()} @ ${l.weight}`).join(', ') : 'no LoRA',
      r.quantize && r.quantize !== 'none' ? `${r.quantize} weights` : null,
      r.compile ? 'compiled' : null,
    ]
      .filter(Boolean)
      .join(', ');
  const NOTES = { queued: 'waiting for the device…', running: 'generating…' };

  function show(g, where) {
    if (shown.has(g.id)) {
      shown.get(g.id).update(g);
      return shown.get(g.id).card;
    }
    const request = g.request || {};
    const status = h('span', { class: 'badge', 'data-testid': 'gen-status' });
    const note = h('span', { class: 'muted' });
    const images = h('div', { class: 'gen-images' });
    const problem = h('div', {});
    const card = h(
      'article',
      { class: 'card gen', 'data-testid': `gen-${g.id}`, 'aria-label': `Generation: ${request.prompt || 'empty prompt'}` },
      h('div', { class: 'gen-head' }, status, note, h('time', { class: 'muted small gen-time', datetime: g.created }, fmtTime(g.created))),
      h('p', { class: 'gen-prompt', 'data-testid': 'gen-prompt' }, request.prompt || h('em', {}, '(empty prompt)')),
      h('p', { class: 'muted small', 'data-testid': 'gen-settings' }, settings(request)),
      h('p', { class: 'muted small mono gen-model' }, [request.model || 'default model', request.arch].filter(Boolean).join(' · ')),
      problem,
      images,
    );
    let last = null;
    const entry = { card, status: g.status };
    entry.update = (next) => {
      entry.status = next.status;
      if (last === next.status) return;
      last = next.status;
      status.textContent = next.status;
      status.className = `badge badge-${next.status}`;
      note.textContent = NOTES[next.status] || '';
      put(
        images,
        ...(next.images || []).map((src, i) =>
          h('a', { href: src, target: '_blank', rel: 'noopener' }, h('img', { src, alt: `Generated image ${i + 1}: ${request.prompt || ''}`, 'data-testid': 'gen-image' })),
        ),
      );
      put(
        problem,
        next.status === 'failed'
          ? errorBox(inFieldTerms(next.error || 'The generation failed.', next.field), 'gen-error')
          : null,
        next.status === 'failed' && next.log
          ? h('p', { class: 'small' }, h('a', { href: next.log, target: '_blank', rel: 'noopener', 'data-testid': 'gen-log' }, 'Its log'))
          : null,
      );
    };
    entry.update(g);
    shown.set(g.id, entry);
    noResults.hidden = true;
    if (where === 'new') results.prepend(card);
    else add(results, card);
    return card;
  }

  // one poll for every generation still queued or running
  ctx.every(POLL_MS, async () => {
    for (const [id, entry] of shown) {
      if (entry.status !== 'queued' && entry.status !== 'running') continue;
      try {
        const g = await api(`/api/generate/${enc(id)}`);
        entry.status = g.status;
        entry.update(g);
        if (g.status === 'done' || g.status === 'failed') ended(g);
      } catch (error) {
        console.warn(error);
      }
    }
  });

  for (const g of historyData.generations || []) show(g, 'end');
  function showMore() {
    more.hidden = shown.size >= total;
    more.textContent = `Show more (${Math.max(0, total - shown.size)} older)`;
  }
  more.addEventListener('click', async () => {
    more.disabled = true;
    put(moreError);
    try {
      const page = await api(`/api/generations?limit=${HISTORY_PAGE}&offset=${shown.size}`);
      total = page.total;
      for (const g of page.generations) show(g, 'end');
    } catch (error) {
      put(moreError, errorBox(`Could not load older generations: ${error.message}`, 'pg-more-error'));
    } finally {
      more.disabled = false;
      showMore();
    }
  });
  showMore();
  noResults.hidden = shown.size > 0;
  let waited = null;
  try {
    waited = sessionStorage.getItem(PENDING_KEY);
  } catch {
    waited = null;
  }
  if (waited && ['queued', 'running'].includes(shown.get(waited)?.status)) {
    wait(waited);
    busy(true);
  } else if (waited) {
    wait(null);
  }

  add(
    root,
    pageHeader('Playground'),
    form,
    h('section', { class: 'pg-history', 'aria-labelledby': 'pg-history-title' }, h('h2', { id: 'pg-history-title' }, 'Generations'), noResults, results, h('div', { class: 'actions' }, more), moreError),
  );
}
