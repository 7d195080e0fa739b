// New / edit job (#/jobs/new, #/jobs/<name>/edit): the guide's panels built from GET /api/schema, starting from a
// preset, another job or an imported AI Toolkit job file (with what the import mapped, converted or left out),
// validated as the user types, with a YAML tab that edits the same config.

import { h, put, add, enc, clone, debounce, ApiError, api, post, toast, pageHeader } from './lib.js';

// ---------------------------------------------------------------------------------------------------------------
// New / edit job: the panels of the guide, built from GET /api/schema
// ---------------------------------------------------------------------------------------------------------------


const FIELD_LABELS = {
  'job.name': 'Training name',
  'job.trigger_word': 'Trigger word',
  'job.device': 'Device (GPU ID)',
  'job.seed': 'Seed',
  'model.arch': 'Model architecture',
  'model.name_or_path': 'Name or path',
  'model.training_adapter': 'Training adapter path',
  'model.text_encoder_path': 'Text encoder path',
  'model.vae_path': 'VAE path',
  'model.low_vram': 'Low VRAM',
  'model.layer_offload': 'Layer offloading (fraction)',
  'quantization.transformer': 'Transformer',
  'quantization.text_encoder': 'Text encoder',
  'target.type': 'Target type',
  'target.rank': 'Linear rank',
  'target.alpha': 'Linear alpha',
  'target.modules': 'Target modules (regex)',
  'save.dtype': 'Data type',
  'save.every': 'Save every (steps)',
  'save.keep': 'Max step saves to keep',
  'train.batch_size': 'Batch size',
  'train.grad_accum': 'Gradient accumulation',
  'train.steps': 'Steps',
  'train.optimizer': 'Optimizer',
  'train.lr': 'Learning rate',
  'train.weight_decay': 'Weight decay',
  'train.lr_scheduler': 'LR scheduler',
  'train.warmup_steps': 'Warmup steps',
  'train.max_grad_norm': 'Max grad norm',
  'train.loss': 'Loss type',
  'train.timestep_type': 'Timestep type',
  'train.timestep_bias': 'Timestep bias',
  'train.mixed_precision': 'Mixed precision',
  'train.gradient_checkpointing': 'Gradient checkpointing',
  'train.checkpoint_fraction': 'Checkpointed share of blocks',
  'train.compile': 'torch.compile',
  'train.cache_text_embeddings': 'Cache text embeddings',
  'train.unload_text_encoder': 'Unload TE',
  'train.ema.enabled': 'EMA',
  'train.ema.decay': 'EMA decay',
  'train.ema.save_raw': 'EMA: also save raw weights',
  'train.dop.enabled': 'DOP (differential output preservation)',
  'train.dop.multiplier': 'DOP multiplier',
  'train.dop.class_word': 'DOP class word',
  'train.validation.enabled': 'Validation loss',
  'train.validation.every': 'Validate every (steps)',
  'train.validation.sigmas': 'Validation noise levels',
  'train.validation.images': 'Validation images',
  'sample.every': 'Sample every (steps)',
  'sample.width': 'Width',
  'sample.height': 'Height',
  'sample.steps': 'Sample steps',
  'sample.guidance': 'Guidance (CFG)',
  'sample.seed': 'Seed',
  'sample.prompts': 'Prompts',
  'sample.negative_prompt': 'Negative prompt',
  'advanced.differential_guidance.enabled': 'Do differential guidance',
  'advanced.differential_guidance.scale': 'Differential guidance scale',
};

const SUBSECTION_TITLES = {
  'train.ema': 'EMA (exponential moving average)',
  'train.dop': 'DOP (differential output preservation)',
  'train.validation': 'Validation loss',
  'advanced.differential_guidance': 'Differential guidance',
};

// Fields the UI fills itself: the server always puts runs in DATA/jobs.
const HIDDEN_FIELDS = new Set(['version', 'job.output_dir']);

const STANDARD_RESOLUTIONS = [512, 768, 1024];

function humanize(key) {
  const parts = key.split('.');
  if (parts.length > 1) parts.shift();
  const text = parts.join(' › ').replace(/_/g, ' ');
  return text.charAt(0).toUpperCase() + text.slice(1);
}

const fieldLabel = (field) => field.label || FIELD_LABELS[field.key] || humanize(field.key);
const fieldId = (key) => `f-${key.replace(/[^A-Za-z0-9_-]+/g, '-')}`;

function getPath(obj, key) {
  return key.split('.').reduce((node, part) => (node === null || node === undefined ? undefined : node[part]), obj);
}

function setPath(obj, key, value) {
  const parts = key.split('.');
  let node = obj;
  for (const part of parts.slice(0, -1)) {
    if (node[part] === null || typeof node[part] !== 'object') node[part] = {};
    node = node[part];
  }
  node[parts[parts.length - 1]] = value;
}

/** 'datasets.0.path' and 'datasets[0].path' name the same field; the UI uses the second spelling. */
const normKey = (key) => String(key || '').replace(/\.(\d+)(?=\.|$)/g, '[$1]');

/** A comma-separated list as the user typed it: numbers become numbers. */
function parseList(text) {
  return text
    .split(',')
    .map((item) => item.trim())
    .filter(Boolean)
    .map((item) => (/^-?\d+(\.\d+)?([eE][-+]?\d+)?$/.test(item) ? Number(item) : item));
}

function datasetNameOf(path) {
  const match = String(path || '').match(/(?:^|[\\/])datasets[\\/]([^\\/]+)[\\/]?$/);
  return match ? match[1] : null;
}

/** Plain data as YAML (for a job the server could not resolve yet); JSON strings are valid YAML scalars. */
function toYaml(value, indent = '') {
  const scalar = (v) => {
    if (v === null || v === undefined) return 'null';
    if (typeof v === 'string') {
      const plain = /^[A-Za-z0-9_./@][A-Za-z0-9_ ./@:,-]*$/.test(v) && !/^(true|false|null|yes|no|on|off|~)$/i.test(v);
      return plain && !/^[\d.+-]/.test(v) && !/: |\s$/.test(v) ? v : JSON.stringify(v);
    }
    if (typeof v === 'number') return String(v).replace(/^(-?\d+)e/, '$1.0e'); // 1e-7 -> 1.0e-7: YAML 1.1 needs the dot
    return String(v);
  };
  const isObj = (v) => v !== null && typeof v === 'object';
  if (Array.isArray(value)) {
    if (!value.length) return '[]';
    if (value.every((v) => !isObj(v) && typeof v !== 'string')) return `[${value.map(scalar).join(', ')}]`;
    return value
      .map((item) => {
        if (!isObj(item)) return `\n${indent}- ${scalar(item)}`;
        const body = toYaml(item, `${indent}  `).replace(/^\n\s*/, '');
        return `\n${indent}- ${body}`;
      })
      .join('');
  }
  if (isObj(value)) {
    const keys = Object.keys(value);
    if (!keys.length) return '{}';
    return keys
      .map((key) => {
        const v = value[key];
        const block = Array.isArray(v) ? v.some((item) => isObj(item) || typeof item === 'string') : isObj(v) && Object.keys(v).length;
        const inner = block ? toYaml(v, `${indent}  `) : ` ${toYaml(v, indent)}`;
        return `\n${indent}${key}:${inner}`;
      })
      .join('');
  }
  return scalar(value);
}

// What a list field holds, for "add at least one ..." (the CLI says "needs at least 1 item, got 0").
const LIST_NOUNS = { datasets: 'dataset', 'sample.prompts': 'prompt', resolutions: 'resolution', 'target.only_if_contains': 'name' };
const BOUND_WORDS = { '>=': 'at least', '>': 'more than', '<=': 'at most', '<': 'less than' };

/** The CLI's message for a field (its key prefix already gone), said in the form's terms: what to type or choose,
 * never a schema type or a `null`. */
function formMessage(key, message) {
  const shown = (value) => (value === 'null' || value === "''" ? 'it is empty' : `you entered ${value}`);
  let m = message.match(/^expected a (whole |finite )?number, got (.*)$/);
  if (m) return `Type a ${m[1] || ''}number here (${shown(m[2])}).`;
  m = message.match(/^needs at least (\d+) items?, got \d+$/);
  if (m) {
    const noun = LIST_NOUNS[String(key).replace(/\[\d+\]/g, '').split('.').slice(-2).join('.')] || LIST_NOUNS[String(key).split('.').pop()] || 'entry';
    return m[1] === '1' ? `Add at least one ${noun}.` : `Add at least ${m[1]} ${noun}s.`;
  }
  m = message.match(/^must be (>=|>|<=|<) (\S+), got (.*)$/);
  const plain = (text) => (/^-?\d+(\.\d+)?([eE][-+]?\d+)?$/.test(text) ? String(Number(text)) : text); // 0.0 -> 0
  if (m) return `Must be ${BOUND_WORDS[m[1]]} ${plain(m[2])} (${shown(plain(m[3]))}).`;
  m = message.match(/^must be a multiple of (\d+), got (.*)$/);
  if (m) return `Must be a multiple of ${m[1]} (${shown(m[2])}).`;
  m = message.match(/^required but missing(?: \((.*)\))?$/);
  if (m) return m[1] ? `Required: ${m[1]}` : 'Required: fill this in.';
  m = message.match(/^(.*) is not one of (.*)$/);
  if (m) return `Choose one of ${m[2]} (${shown(m[1])}).`;
  m = message.match(/^expected text, got (.*)$/);
  if (m) return `Type some text here (${shown(m[1])}).`;
  return message;
}

function uniqueName(base, taken) {
  const stem = base.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 56) || 'my_lora';
  if (!taken.has(stem)) return stem;
  for (let i = 2; ; i += 1) if (!taken.has(`${stem}-${i}`)) return `${stem}-${i}`;
}

// The per-dataset options shown under "More options" (the schema gives their types, limits and help).
const MORE_DATASET_FIELDS = [
  'network_weight',
  'is_reg',
  'flip_x',
  'flip_y',
  'mask_path',
  'mask_min_value',
  'shuffle_tokens',
  'keep_tokens',
  'token_dropout',
];
const DATASET_LABELS = {
  network_weight: 'LoRA weight',
  is_reg: 'Regularisation images',
  flip_x: 'Flip X',
  flip_y: 'Flip Y',
  mask_path: 'Mask folder',
  mask_min_value: 'Mask minimum value',
  shuffle_tokens: 'Shuffle tags',
  keep_tokens: 'Keep first tags',
  token_dropout: 'Tag dropout rate',
};

export async function jobEditorView(ctx, root, { mode, name, from }) {
  const loading = h('p', { class: 'muted' }, 'Loading the schema…');
  add(root, loading);
  const [schema, presetData, datasetData, jobData, modelData, deviceData, existing] = await Promise.all([
    api('/api/schema'),
    api('/api/presets'),
    api('/api/datasets'),
    api('/api/jobs'),
    api('/api/models').catch(() => ({ models: [] })),
    api('/api/devices'),
    mode === 'edit' ? api(`/api/jobs/${enc(name)}`) : null,
  ]);
  if (!ctx.alive) return;
  loading.remove();
  const editor = new JobEditor(ctx, {
    mode,
    name,
    schema,
    presets: presetData.presets,
    datasets: datasetData.datasets,
    jobs: jobData.jobs,
    models: modelData.models || [],
    devices: deviceData.devices,
    existing,
  });
  add(root, editor.el);
  await editor.start(from);
}

class JobEditor {
  constructor(ctx, opts) {
    Object.assign(this, opts);
    this.ctx = ctx;
    this.config = null;
    this.slots = new Map(); // error key -> {err, control, wrap}
    this.widgets = []; // {key, sync()}
    this.validationSeq = 0;
    this.localErrors = new Map(); // key -> message, for what the browser alone knows (letters in a number box)
    this.lastErrors = [];
    this.lastWarnings = [];
    this.tab = 'form';
    this.scheduleValidate = debounce(() => this.validate(), 350);
    ctx.onCleanup(() => this.scheduleValidate.cancel());
    this.archs = this.schema.archs || {};
    this.el = h('div', { class: 'editor' });
  }

  // --- setup -----------------------------------------------------------------------------------------------
  async start(from) {
    const title = this.mode === 'edit' ? `Edit ${this.name}` : 'New job';
    this.status = h('span', { class: 'validation', 'data-testid': 'validation-status', 'aria-live': 'polite' }, '');
    this.summary = h('div', { class: 'error-box', 'data-testid': 'validation-errors', hidden: true });
    this.formBox = h('div', { class: 'panels', 'data-testid': 'job-form' });
    this.yamlArea = h('textarea', {
      id: 'job-yaml',
      class: 'yaml',
      spellcheck: 'false',
      rows: 32,
      'data-testid': 'job-yaml',
      oninput: () => this.scheduleYamlValidate(),
    });
    this.yamlErrors = h('ul', { class: 'error-list', 'data-testid': 'yaml-errors', hidden: true });
    this.yamlBox = h(
      'div',
      { class: 'yaml-box', hidden: true, id: 'tabpanel-yaml', role: 'tabpanel', 'aria-labelledby': 'tab-yaml' },
      h('label', { for: 'job-yaml' }, 'The same job as YAML (what `zimage-lora train` reads). Edits here go back to the form.'),
      this.yamlArea,
      this.yamlErrors,
    );
    this.scheduleYamlValidate = debounce(() => this.validateYaml(), 400);
    this.ctx.onCleanup(() => this.scheduleYamlValidate.cancel());
    this.formTab = h(
      'button',
      { type: 'button', role: 'tab', id: 'tab-form', 'aria-selected': 'true', 'data-testid': 'tab-form', onclick: () => this.switchTab('form') },
      'Panels',
    );
    this.yamlTab = h(
      'button',
      { type: 'button', role: 'tab', id: 'tab-yaml', 'aria-selected': 'false', 'data-testid': 'tab-yaml', onclick: () => this.switchTab('yaml') },
      'YAML',
    );
    const startFrom = this.mode === 'new' ? this.startFromPicker(from) : null;
    const importer = this.mode === 'new' ? this.importPicker() : null;
    const submit = h(
      'button',
      { type: 'button', class: 'primary', 'data-testid': this.mode === 'edit' ? 'save-job' : 'create-job', onclick: () => this.submit(false) },
      this.mode === 'edit' ? 'Save changes' : 'Create job',
    );
    const submitStart = h(
      'button',
      { type: 'button', 'data-testid': this.mode === 'edit' ? 'save-start-job' : 'create-start-job', onclick: () => this.submit(true) },
      this.mode === 'edit' ? 'Save and start' : 'Create and start',
    );
    this.submitButtons = [submit, submitStart];
    add(this.el, 
      pageHeader(
        title,
        this.mode === 'edit' ? h('a', { class: 'button', href: `#/jobs/${enc(this.name)}` }, 'Back to job') : null,
      ),
      startFrom,
      importer,
      h('div', { class: 'tabs', role: 'tablist', 'aria-label': 'Editor view' }, this.formTab, this.yamlTab, this.status),
      this.summary,
      h('div', { id: 'tabpanel-form', role: 'tabpanel', 'aria-labelledby': 'tab-form' }, this.formBox),
      this.yamlBox,
      h('div', { class: 'sticky-actions' }, submit, submitStart),
    );
    if (this.mode === 'edit') this.setConfig(clone(this.existing.config));
    else this.loadSource(from || this.defaultPresetName());
  }

  defaultPresetName() {
    const names = this.presets.map((p) => p.name);
    return names.includes('turbo-adapter-v2') ? 'turbo-adapter-v2' : names[0];
  }

  startFromPicker(from) {
    const select = h(
      'select',
      { id: 'start-from', 'data-testid': 'start-from', onchange: () => this.loadSource(select.value) },
      h(
        'optgroup',
        { label: 'Presets' },
        this.presets.map((p) => h('option', { value: p.name }, p.name)),
      ),
      this.jobs.length
        ? h(
            'optgroup',
            { label: 'Clone an existing job' },
            this.jobs.map((j) => h('option', { value: `job:${j.name}` }, `${j.name} (${j.status})`)),
          )
        : null,
    );
    select.value = from || this.defaultPresetName();
    this.startSelect = select;
    return h(
      'div',
      { class: 'start-from' },
      h('label', { for: 'start-from' }, 'Start from'),
      select,
      h('span', { class: 'help' }, 'A preset holds the guide’s baseline; cloning copies another job’s settings.'),
    );
  }

  async loadSource(source) {
    const taken = new Set(this.jobs.map((j) => j.name));
    let config;
    if (source === 'import' && this.imported) {
      config = clone(this.imported);
    } else if (source && source.startsWith('job:')) {
      const job = await api(`/api/jobs/${enc(source.slice(4))}`);
      config = clone(job.config);
      config.job.name = uniqueName(`${config.job.name}-copy`, taken);
    } else {
      const preset = this.presets.find((p) => p.name === source) || this.presets[0];
      config = clone(preset.config);
      config.job = config.job || {};
      config.job.name = uniqueName(config.job.name || 'my_lora', taken);
      // A preset's datasets point next to its YAML file; in the UI datasets live in DATA/datasets.
      const first = this.datasets[0];
      for (const entry of config.datasets || []) {
        if (!datasetNameOf(entry.path)) entry.path = first ? `datasets/${first.name}` : '';
      }
    }
    if (!this.ctx.alive) return;
    this.setConfig(config);
  }

  // --- importing an AI Toolkit job ------------------------------------------------------------------------------
  importPicker() {
    const input = h('input', {
      id: 'import-file',
      type: 'file',
      accept: '.yaml,.yml,.json',
      class: 'file-input',
      'data-testid': 'import-file',
      onchange: () => this.importFile(input),
    });
    this.findingsBox = h('section', {
      class: 'card import-findings',
      hidden: true,
      'aria-labelledby': 'import-title',
      'data-testid': 'import-findings',
    });
    return h(
      'div',
      {},
      h(
        'div',
        { class: 'import-row' },
        h('label', { for: 'import-file', class: 'button', 'data-testid': 'import-button' }, 'Import an AI Toolkit job'),
        input,
        h('span', { class: 'help' }, 'A job file (.yaml or .json) from AI Toolkit: it fills the form, and what it changed is listed here.'),
      ),
      this.findingsBox,
    );
  }

  async importFile(input) {
    const file = input.files && input.files[0];
    if (!file) return;
    input.value = ''; // choosing the same file again imports it again
    try {
      const text = await file.text();
      const result = await post('/api/jobs/import', { text, filename: file.name });
      if (!this.ctx.alive) return;
      const config = result.config;
      config.job = config.job || {};
      config.job.name = uniqueName(config.job.name || 'imported', new Set(this.jobs.map((j) => j.name)));
      this.imported = clone(config);
      let option = this.startSelect.querySelector('option[value="import"]');
      if (!option) {
        option = h('option', { value: 'import' });
        this.startSelect.prepend(option);
      }
      option.textContent = `Imported: ${file.name}`;
      this.startSelect.value = 'import';
      if (this.tab === 'yaml') await this.switchTab('form');
      this.setConfig(config);
      this.showFindings(file.name, result.findings || []);
      toast(`Imported ${file.name}: read what changed, then check the form`);
    } catch (error) {
      this.showFindings(file.name, [], error.message);
    }
  }

  /** The import's findings grouped by kind: what changed (converted, not mapped) first and open, what carried over
   * unchanged (mapped) folded. */
  showFindings(fileName, findings, error = null) {
    const groups = [
      ['converted', 'Converted', 'Mapped to a setting whose meaning differs, so a stated rule changed the value.', true],
      ['not mapped', 'Not mapped', 'Left out, with the reason.', true],
      ['mapped', 'Mapped', 'Carried over unchanged in meaning.', false],
    ];
    const close = h('button', { type: 'button', class: 'small ghost', 'aria-label': 'Close the import report', 'data-testid': 'import-close', onclick: () => { this.findingsBox.hidden = true; } }, '✕');
    put(
      this.findingsBox,
      h('h2', { id: 'import-title', class: 'import-title' }, `Imported from ${fileName}`, close),
      error ? h('p', { class: 'error-box', role: 'alert', 'data-testid': 'import-error' }, error) : null,
      groups.map(([kind, title, help, open]) => {
        const found = findings.filter((f) => f.kind === kind);
        if (!found.length && !error) {
          return h('p', { class: 'muted', 'data-testid': `import-group-${kind.replace(' ', '-')}` }, `${title}: none.`);
        }
        if (!found.length) return null;
        return h(
          'details',
          { class: `import-group import-${kind.replace(' ', '-')}`, open, 'data-testid': `import-group-${kind.replace(' ', '-')}` },
          h('summary', {}, `${title} (${found.length})`, h('span', { class: 'help' }, ` ${help}`)),
          h(
            'ul',
            {},
            found.map((f) => h('li', { 'data-testid': 'import-finding', 'data-kind': f.kind }, h('code', {}, f.path), ' ', f.detail)),
          ),
        );
      }),
    );
    this.findingsBox.hidden = false;
  }

  setConfig(config) {
    this.config = config;
    for (const key of ['job', 'model', 'quantization', 'target', 'save', 'train', 'sample', 'advanced']) {
      if (!this.config[key] || typeof this.config[key] !== 'object') this.config[key] = {};
    }
    if (!Array.isArray(this.config.datasets) || !this.config.datasets.length) this.config.datasets = [this.newDataset()];
    if (!Array.isArray(this.config.sample.prompts)) this.config.sample.prompts = [];
    this.renderForm();
    this.validate();
  }

  newDataset() {
    const first = this.datasets[0];
    return {
      path: first ? `datasets/${first.name}` : '',
      caption_dropout: this.config?.train?.cache_text_embeddings ? 0 : 0.05,
      cache_latents: true,
      resolutions: [...STANDARD_RESOLUTIONS],
    };
  }

  // --- the panels ----------------------------------------------------------------------------------------------
  renderForm() {
    this.slots.clear();
    this.widgets = [];
    const panels = this.schema.panels.map((panel) => {
      const grid = h('div', { class: 'fields' });
      let group = null;
      for (const field of panel.fields) {
        if (HIDDEN_FIELDS.has(field.key)) continue;
        // Nested settings (train.ema.*, train.dop.*, ...) get a small heading of their own.
        const parts = field.key.split('.');
        const inner = parts.length > 2 ? parts.slice(0, -1).join('.') : null;
        if (inner !== group && inner) {
          add(grid, h('h3', { class: 'subsection' }, SUBSECTION_TITLES[inner] || humanize(inner)));
        }
        group = inner;
        add(grid, this.renderField(field));
      }
      const panelError = h('p', { class: 'field-error', hidden: true, 'data-testid': `error-${panel.section}` });
      this.slots.set(panel.section, { err: panelError, control: null, wrap: null });
      return h(
        'section',
        { class: 'panel card', id: `panel-${panel.id}`, 'data-testid': `panel-${panel.id}`, 'aria-labelledby': `panel-title-${panel.id}` },
        h(
          'h2',
          { id: `panel-title-${panel.id}` },
          h('span', { class: 'panel-id' }, panel.id),
          panel.title && panel.title.toUpperCase() !== panel.id ? h('span', { class: 'panel-title' }, panel.title) : null,
        ),
        panelError,
        grid,
      );
    });
    put(this.formBox, ...panels);
    this.applyArchVisibility();
  }

  changed() {
    this.scheduleValidate();
  }

  renderField(field) {
    const key = field.key;
    if (field.type === 'datasets' || key === 'datasets') return this.datasetsWidget(field);
    if (field.type === 'prompts' || key === 'sample.prompts') return this.promptsWidget(field);
    if (key === 'model.training_adapter') return this.adapterWidget(field);
    if (key === 'job.device') return this.deviceWidget(field);

    const id = fieldId(key);
    const nullable = field.nullable ?? field.default === null;
    let control;
    let sync;
    const testid = `field-${key}`;
    const set = (value) => {
      setPath(this.config, key, value);
      this.changed();
    };
    if (field.type === 'boolean') {
      control = h('input', { id, type: 'checkbox', 'data-testid': testid, onchange: () => set(control.checked) });
      sync = () => {
        control.checked = Boolean(getPath(this.config, key));
      };
    } else if (field.type === 'enum') {
      const labels = key === 'model.arch' ? (v) => this.archs[v]?.label || v : (v) => String(v);
      control = h(
        'select',
        { id, 'data-testid': testid },
        nullable ? h('option', { value: '' }, '(default)') : null,
        (field.enum || []).map((v) => h('option', { value: String(v) }, labels(v))),
      );
      control.addEventListener('change', () => {
        const value = control.value === '' && nullable ? null : control.value;
        if (key === 'model.arch') this.changeArch(value);
        else set(value);
      });
      sync = () => {
        const value = getPath(this.config, key);
        control.value = value === null || value === undefined ? '' : String(value);
      };
    } else if (field.type === 'integer' || field.type === 'number') {
      control = h('input', {
        id,
        type: 'number',
        step: field.type === 'integer' ? 1 : 'any',
        min: field.min ?? undefined,
        max: field.max ?? undefined,
        inputmode: field.type === 'integer' ? 'numeric' : 'decimal',
        'data-testid': testid,
      });
      control.addEventListener('input', () => {
        // Letters in a number box: the browser reports no value at all (badInput); say so here, keep the last number.
        if (control.validity.badInput) {
          this.localErrors.set(key, 'Type a number here: digits, a point, or a form like 1e-4.');
          this.showErrors(this.lastErrors, this.lastWarnings);
          return;
        }
        this.localErrors.delete(key);
        const text = control.value.trim();
        if (text === '') set(null);
        else set(Number.isFinite(Number(text)) ? Number(text) : text);
      });
      sync = () => {
        const value = getPath(this.config, key);
        control.value = value === null || value === undefined ? '' : String(value);
        if (nullable) control.placeholder = this.placeholderFor(key);
      };
    } else if (field.type === 'list') {
      control = h('input', { id, type: 'text', placeholder: 'comma-separated', 'data-testid': testid });
      control.addEventListener('input', () => set(parseList(control.value)));
      sync = () => {
        const value = getPath(this.config, key);
        control.value = Array.isArray(value) ? value.join(', ') : '';
      };
    } else {
      const long = key === 'sample.negative_prompt' || key === 'target.modules';
      control = h(long ? 'textarea' : 'input', {
        id,
        type: long ? undefined : 'text',
        rows: long ? 2 : undefined,
        spellcheck: 'false',
        autocomplete: 'off',
        list: key === 'model.name_or_path' ? 'model-choices' : undefined,
        'data-testid': testid,
      });
      control.addEventListener('input', () => {
        const value = control.value;
        set(value === '' && nullable ? null : value);
      });
      sync = () => {
        const value = getPath(this.config, key);
        control.value = value === null || value === undefined ? '' : String(value);
        if (nullable) control.placeholder = this.placeholderFor(key);
      };
    }
    if (this.mode === 'edit' && key === 'job.name') {
      control.disabled = true;
    }
    sync();
    const wrap = this.fieldShell(field, id, control);
    if (key === 'model.name_or_path') {
      add(wrap, 
        h(
          'datalist',
          { id: 'model-choices' },
          this.models.map((m) => h('option', { value: m.path }, m.name)),
          [...new Set(Object.values(this.archs).map((a) => a.default_model).filter(Boolean))].map((m) =>
            h('option', { value: m }),
          ),
        ),
      );
    }
    this.widgets.push({ key, sync });
    return wrap;
  }

  /** What an empty nullable field means, spelled out (the arch's values where the arch decides). */
  placeholderFor(key) {
    const arch = this.archs[this.config?.model?.arch] || {};
    if (key === 'model.name_or_path') return arch.default_model ? `${arch.default_model} (the architecture’s default)` : 'the architecture’s default';
    if (key === 'sample.steps' && arch.sample_steps !== undefined) return `${arch.sample_steps} (the architecture’s default)`;
    if (key === 'sample.guidance' && arch.sample_guidance !== undefined) return `${arch.sample_guidance} (the architecture’s default)`;
    if (key === 'target.alpha') return 'same as rank';
    if (key === 'target.modules') return 'every linear of the main blocks';
    return 'not set';
  }

  /** Label, control, help text and an error line, tied together for screen readers. */
  fieldShell(field, id, control, extra = null) {
    const help = field.description ? h('p', { class: 'help', id: `${id}-help` }, field.description) : null;
    const err = h('p', { class: 'field-error', id: `${id}-error`, hidden: true, 'data-testid': `error-${field.key}` });
    control.setAttribute('aria-describedby', [help ? `${id}-help` : null, `${id}-error`].filter(Boolean).join(' '));
    const label = h('label', { for: id }, fieldLabel(field));
    const wrap = h(
      'div',
      { class: `field field-${field.type}`, 'data-key': field.key },
      field.type === 'boolean' ? h('div', { class: 'check' }, control, label) : [label, control],
      extra,
      help,
      err,
    );
    this.slots.set(field.key, { err, control, wrap });
    return wrap;
  }

  // --- architecture and training adapter ------------------------------------------------------------------
  adaptersOf(arch) {
    const adapters = this.archs[arch]?.adapters;
    return adapters && Object.keys(adapters).length ? adapters : null;
  }

  changeArch(arch) {
    const previous = this.config.model.arch;
    const info = this.archs[arch] || {};
    const before = this.archs[previous] || {};
    this.config.model.arch = arch;
    const adapters = this.adaptersOf(arch);
    if (adapters) {
      if (!this.config.model.training_adapter) this.config.model.training_adapter = Object.values(adapters)[0]; // newest first
    } else {
      this.config.model.training_adapter = null;
    }
    const model = this.config.model.name_or_path;
    if (!model || model === before.default_model) this.config.model.name_or_path = info.default_model ?? null;
    if (info.sample_steps !== undefined) this.config.sample.steps = info.sample_steps;
    if (info.sample_guidance !== undefined) this.config.sample.guidance = info.sample_guidance;
    for (const widget of this.widgets) widget.sync();
    this.applyArchVisibility();
    this.changed();
  }

  applyArchVisibility() {
    const shown = Boolean(this.adaptersOf(this.config.model.arch));
    const slot = this.slots.get('model.training_adapter');
    if (slot && slot.wrap) slot.wrap.hidden = !shown;
  }

  adapterWidget(field) {
    const key = field.key;
    const id = fieldId(key);
    const choice = h('select', { id: `${id}-version`, 'data-testid': 'adapter-version' });
    const input = h('input', { id, type: 'text', spellcheck: 'false', autocomplete: 'off', 'data-testid': `field-${key}` });
    const fillChoices = () => {
      const adapters = this.adaptersOf(this.config.model.arch) || {};
      const notes = this.archs[this.config.model.arch]?.adapter_notes || {};
      const options = Object.entries(adapters) // the registry's order: newest first
        .map(([version, file]) => h('option', { value: file, title: notes[version] || '' }, notes[version] ? `${version}: ${notes[version]}` : version));
      put(choice, ...options, h('option', { value: '' }, 'Another file (local path or hub file)'));
    };
    const sync = () => {
      fillChoices();
      const value = this.config.model.training_adapter || '';
      input.value = value;
      const known = [...choice.options].some((o) => o.value && o.value === value);
      choice.value = known ? value : '';
    };
    input.placeholder = 'models/my_adapter.safetensors, or owner/repo/file.safetensors on the hub';
    choice.addEventListener('change', () => {
      if (choice.value) {
        this.config.model.training_adapter = choice.value;
        input.value = choice.value;
      } else {
        // Another file: the published adapter's path leaves the field, so what is typed there is what is used.
        const published = [...choice.options].some((o) => o.value && o.value === input.value);
        if (published) {
          input.value = '';
          this.config.model.training_adapter = null;
        }
        input.focus();
      }
      this.changed();
    });
    input.addEventListener('input', () => {
      this.config.model.training_adapter = input.value || null;
      const known = [...choice.options].some((o) => o.value && o.value === input.value);
      choice.value = known ? input.value : '';
      this.changed();
    });
    sync();
    this.widgets.push({ key, sync });
    const version = h(
      'div',
      { class: 'subfield' },
      h('label', { for: `${id}-version` }, 'Adapter version'),
      choice,
    );
    const wrap = this.fieldShell(field, id, input);
    wrap.insertBefore(version, wrap.firstChild);
    return wrap;
  }

  // --- JOB panel: the device picker ------------------------------------------------------------------------
  /** auto, cpu, or this machine's GPUs (GET /api/devices), one checkbox each: one GPU saves `cuda:N`, several a
   * list, none falls back to auto. A device of the loaded job that the machine lacks stays listed and is marked. */
  deviceWidget(field) {
    const key = field.key;
    const id = fieldId(key);
    const machine = this.devices;
    const names = (value) =>
      (Array.isArray(value) ? value : [value ?? 'auto']).map((d) => {
        const name = String(d).trim().toLowerCase();
        return name === 'cuda' ? 'cuda:0' : name;
      });
    const lacking = (name) => name !== 'auto' && !machine.includes(name);
    const gpuIndex = (name) => Number(name.split(':')[1]);
    const gpus = [...new Set([...machine, ...names(getPath(this.config, key))])]
      .filter((name) => name.startsWith('cuda:'))
      .sort((a, b) => gpuIndex(a) - gpuIndex(b));
    const set = (picked) => {
      setPath(this.config, key, picked.length === 1 ? picked[0] : picked);
      sync();
      this.changed();
    };
    const choice = (name, type) => {
      const input = h('input', {
        type,
        id: `${id}-${name.replace(':', '-')}`,
        name: type === 'radio' ? `${id}-mode` : undefined,
        'data-testid': `device-${name}`,
      });
      input.addEventListener('change', () => {
        const ticked = choices.filter((c) => c.type === 'checkbox' && c.input.checked).map((c) => c.name);
        set(type === 'radio' ? [name] : ticked.length ? ticked : ['auto']);
      });
      const mark = lacking(name) ? { class: 'check missing', title: 'not on this machine' } : { class: 'check' };
      return { name, type, input, el: h('span', mark, input, h('label', { for: input.id }, name)) };
    };
    const choices = [choice('auto', 'radio'), choice('cpu', 'radio'), ...gpus.map((name) => choice(name, 'checkbox'))];
    const group = h(
      'div',
      { id, class: 'device-picker', role: 'group', 'aria-label': fieldLabel(field), 'data-testid': `field-${key}` },
      choices.map((c) => c.el),
    );
    const missing = h('p', { class: 'field-warning', hidden: true, 'data-testid': 'device-missing' });
    const sync = () => {
      const picked = names(getPath(this.config, key));
      for (const c of choices) c.input.checked = picked.includes(c.name);
      const absent = picked.filter(lacking);
      missing.hidden = !absent.length;
      missing.textContent = absent.length
        ? `${absent.join(', ')} ${absent.length === 1 ? 'is' : 'are'} not on this machine (it has ${machine.join(', ')})`
        : '';
    };
    sync();
    this.widgets.push({ key, sync });
    return this.fieldShell(field, id, group, missing);
  }

  // --- DATASETS panel ---------------------------------------------------------------------------------------
  datasetsWidget(field) {
    this.datasetHelp = Object.fromEntries((field.item_fields || []).map((f) => [f.key, f.description]));
    this.datasetFields = Object.fromEntries((field.item_fields || []).map((f) => [f.key, f]));
    const list = h('div', { class: 'dataset-entries' });
    const wrap = h('div', { class: 'field field-wide', 'data-key': 'datasets' });
    const err = h('p', { class: 'field-error', hidden: true, 'data-testid': 'error-datasets' });
    const addButton = h(
      'button',
      {
        type: 'button',
        class: 'small',
        'data-testid': 'add-dataset',
        onclick: () => {
          this.config.datasets.push(this.newDataset());
          render();
          this.changed();
        },
      },
      'Add dataset',
    );
    const render = () => {
      for (const key of [...this.slots.keys()]) if (key.startsWith('datasets[')) this.slots.delete(key);
      put(list, ...this.config.datasets.map((entry, index) => this.datasetEntry(entry, index, render)));
    };
    render();
    this.slots.set('datasets', { err, control: null, wrap });
    this.widgets.push({ key: 'datasets', sync: render });
    const none = this.datasets.length
      ? null
      : h('p', { class: 'help' }, 'No datasets yet: ', h('a', { href: '#/datasets' }, 'create one and upload images'), ' first.');
    add(wrap, none, list, addButton, err);
    return wrap;
  }

  datasetEntry(entry, index, rerender) {
    const base = `datasets[${index}]`;
    const help = (name) => this.datasetHelp?.[name] || '';
    const id = (name) => `ds-${index}-${name}`;
    const slot = (name, control) => {
      const err = h('p', { class: 'field-error', id: `${id(name)}-error`, hidden: true, 'data-testid': `error-${base}.${name}` });
      if (control) control.setAttribute('aria-describedby', `${id(name)}-error`);
      this.slots.set(`${base}.${name}`, { err, control, wrap: null });
      return err;
    };

    // Which dataset: one of DATA/datasets, or whatever path the config already had.
    const select = h('select', { id: id('path'), 'data-testid': `dataset-select-${index}` });
    const current = datasetNameOf(entry.path);
    const options = this.datasets.map((d) =>
      h('option', { value: d.name }, `${d.name} (${d.images} images, ${d.captioned} captioned)`),
    );
    if (!this.datasets.length || !entry.path) options.unshift(h('option', { value: '' }, '(choose a dataset)'));
    if (entry.path && !this.datasets.some((d) => d.name === current)) {
      options.push(h('option', { value: `path:${entry.path}` }, entry.path));
    }
    put(select, ...options);
    select.value = this.datasets.some((d) => d.name === current) ? current : entry.path ? `path:${entry.path}` : '';
    select.addEventListener('change', () => {
      entry.path = select.value.startsWith('path:') ? select.value.slice(5) : select.value ? `datasets/${select.value}` : '';
      this.changed();
    });

    const dropout = h('input', {
      id: id('caption_dropout'),
      type: 'number',
      min: 0,
      max: 1,
      step: 0.01,
      value: String(entry.caption_dropout ?? 0.05),
      'data-testid': `dataset-dropout-${index}`,
    });
    dropout.addEventListener('input', () => {
      entry.caption_dropout = dropout.value === '' ? null : Number(dropout.value);
      this.changed();
    });

    const cache = h('input', {
      id: id('cache_latents'),
      type: 'checkbox',
      checked: entry.cache_latents !== false,
      'data-testid': `dataset-cache-${index}`,
    });
    cache.addEventListener('change', () => {
      entry.cache_latents = cache.checked;
      this.changed();
    });

    // Resolutions: the guide's three as checkboxes, anything else as free values.
    const resolutions = () => (Array.isArray(entry.resolutions) ? entry.resolutions : []);
    const boxes = STANDARD_RESOLUTIONS.map((res) => {
      const box = h('input', {
        id: id(`res-${res}`),
        type: 'checkbox',
        checked: resolutions().includes(res),
        'data-testid': `dataset-res-${index}-${res}`,
      });
      box.addEventListener('change', () => updateResolutions());
      return { res, box };
    });
    const extra = h('input', {
      id: id('res-extra'),
      type: 'text',
      placeholder: 'e.g. 256, 640',
      value: resolutions()
        .filter((r) => !STANDARD_RESOLUTIONS.includes(r))
        .join(', '),
      'data-testid': `dataset-res-extra-${index}`,
    });
    extra.addEventListener('input', () => updateResolutions());
    const updateResolutions = () => {
      const chosen = boxes.filter((b) => b.box.checked).map((b) => b.res);
      const others = parseList(extra.value);
      entry.resolutions = [...others, ...chosen].sort((a, b) => (typeof a === 'number' && typeof b === 'number' ? a - b : 0));
      this.changed();
    };

    const caption = h('input', {
      id: id('default_caption'),
      type: 'text',
      value: entry.default_caption || '',
      'data-testid': `dataset-default-caption-${index}`,
    });
    caption.addEventListener('input', () => {
      entry.default_caption = caption.value;
      this.changed();
    });
    const repeats = h('input', {
      id: id('repeats'),
      type: 'number',
      min: 1,
      step: 1,
      value: String(entry.repeats ?? 1),
      'data-testid': `dataset-repeats-${index}`,
    });
    repeats.addEventListener('input', () => {
      entry.repeats = repeats.value === '' ? null : Number(repeats.value);
      this.changed();
    });

    const remove =
      this.config.datasets.length > 1
        ? h(
            'button',
            {
              type: 'button',
              class: 'small ghost',
              'data-testid': `remove-dataset-${index}`,
              onclick: () => {
                this.config.datasets.splice(index, 1);
                rerender();
                this.changed();
              },
            },
            'Remove',
          )
        : null;

    const rowErr = h('p', { class: 'field-error', hidden: true, 'data-testid': `error-${base}` });
    this.slots.set(base, { err: rowErr, control: null, wrap: null });
    const resBox = h(
      'fieldset',
      { class: 'resolutions' },
      h('legend', {}, 'Resolutions'),
      h('p', { class: 'help full' }, help('resolutions')),
      boxes.map(({ res, box }) => h('span', { class: 'check' }, box, h('label', { for: box.id }, String(res)))),
      h('label', { for: extra.id, class: 'inline-label' }, 'Other sizes'),
      extra,
      slot('resolutions', extra),
    );
    return h(
      'div',
      { class: 'dataset-entry', 'data-testid': `dataset-entry-${index}` },
      h(
        'div',
        { class: 'entry-head' },
        h('strong', {}, `Dataset ${index + 1}`),
        this.datasets.some((d) => d.name === current)
          ? h('a', { href: `#/datasets/${enc(current)}`, class: 'small-link' }, 'open')
          : null,
        remove,
      ),
      rowErr,
      h(
        'div',
        { class: 'fields' },
        h('div', { class: 'field' }, h('label', { for: select.id }, 'Dataset'), select, slot('path', select)),
        h(
          'div',
          { class: 'field' },
          h('label', { for: dropout.id }, 'Caption dropout rate'),
          dropout,
          h('p', { class: 'help' }, `${help('caption_dropout')} The guide: 0.05, or 0 with cached text embeddings.`),
          slot('caption_dropout', dropout),
        ),
        h(
          'div',
          { class: 'field field-boolean' },
          h('div', { class: 'check' }, cache, h('label', { for: cache.id }, 'Cache latents')),
          h('p', { class: 'help' }, help('cache_latents')),
          slot('cache_latents', cache),
        ),
        h(
          'div',
          { class: 'field' },
          h('label', { for: caption.id }, 'Default caption'),
          caption,
          h('p', { class: 'help' }, help('default_caption')),
          slot('default_caption', caption),
        ),
        h(
          'div',
          { class: 'field' },
          h('label', { for: repeats.id }, 'Repeats'),
          repeats,
          h('p', { class: 'help' }, help('repeats')),
          slot('repeats', repeats),
        ),
        h('div', { class: 'field field-wide' }, resBox),
      ),
      this.moreDatasetOptions(entry, index, slot),
    );
  }

  /** AI Toolkit's per-dataset options (LoRA weight, regularisation, flips, masks, caption tags), one control per
   * schema field, folded away until opened (open when the dataset already sets one). */
  moreDatasetOptions(entry, index, slot) {
    const fields = MORE_DATASET_FIELDS.map((key) => this.datasetFields?.[key]).filter(Boolean);
    const controls = fields.map((f) => {
      const controlId = `ds-${index}-${f.key}`;
      const testid = `dataset-${f.key}-${index}`;
      let control;
      if (f.type === 'boolean') {
        control = h('input', { id: controlId, type: 'checkbox', checked: Boolean(entry[f.key] ?? f.default), 'data-testid': testid });
        control.addEventListener('change', () => {
          entry[f.key] = control.checked;
          this.changed();
        });
      } else if (f.type === 'number' || f.type === 'integer') {
        control = h('input', {
          id: controlId,
          type: 'number',
          min: f.min ?? undefined,
          max: f.max ?? undefined,
          step: f.type === 'integer' ? 1 : 'any',
          value: String(entry[f.key] ?? f.default ?? ''),
          'data-testid': testid,
        });
        control.addEventListener('input', () => {
          entry[f.key] = control.value === '' ? null : Number(control.value);
          this.changed();
        });
      } else {
        control = h('input', { id: controlId, type: 'text', value: entry[f.key] ?? '', spellcheck: 'false', 'data-testid': testid });
        control.addEventListener('input', () => {
          entry[f.key] = control.value.trim() === '' && f.nullable ? null : control.value;
          this.changed();
        });
      }
      const label = h('label', { for: controlId }, DATASET_LABELS[f.key] || f.key);
      const help = h('p', { class: 'help' }, f.description || '');
      return f.type === 'boolean'
        ? h('div', { class: 'field field-boolean' }, h('div', { class: 'check' }, control, label), help, slot(f.key, control))
        : h('div', { class: 'field' }, label, control, help, slot(f.key, control));
    });
    const set = fields.some((f) => entry[f.key] !== undefined && entry[f.key] !== f.default);
    return h(
      'details',
      { class: 'more-options', open: set || undefined, 'data-testid': `dataset-more-${index}` },
      h('summary', {}, 'More options: LoRA weight, regularisation, flips, masks, caption tags'),
      h('div', { class: 'fields' }, controls),
    );
  }

  // --- SAMPLE panel: prompts ----------------------------------------------------------------------------------
  promptsWidget(field) {
    const list = h('ol', { class: 'prompt-list', 'data-testid': 'prompt-list' });
    const err = h('p', { class: 'field-error', hidden: true, 'data-testid': 'error-sample.prompts' });
    const render = () => {
      for (const key of [...this.slots.keys()]) if (key.startsWith('sample.prompts[')) this.slots.delete(key);
      const prompts = this.config.sample.prompts;
      put(list, 
        ...prompts.map((item, index) => {
          const text = typeof item === 'string' ? item : item?.prompt || '';
          const input = h('input', {
            id: `prompt-${index}`,
            type: 'text',
            value: text,
            'aria-label': `Prompt ${index + 1}`,
            'data-testid': `prompt-${index}`,
          });
          input.addEventListener('input', () => {
            if (typeof prompts[index] === 'object' && prompts[index] !== null) prompts[index].prompt = input.value;
            else prompts[index] = input.value;
            this.changed();
          });
          const extras =
            typeof item === 'object' && item !== null
              ? Object.entries(item)
                  .filter(([k, v]) => k !== 'prompt' && v !== null && v !== undefined)
                  .map(([k, v]) => `${k} ${v}`)
                  .join(', ')
              : '';
          const rowErr = h('p', { class: 'field-error', hidden: true, 'data-testid': `error-sample.prompts[${index}]` });
          this.slots.set(`sample.prompts[${index}]`, { err: rowErr, control: input, wrap: null });
          return h(
            'li',
            { class: 'prompt-row' },
            input,
            extras ? h('span', { class: 'help' }, extras) : null,
            h(
              'button',
              {
                type: 'button',
                class: 'small ghost',
                'data-testid': `remove-prompt-${index}`,
                onclick: () => {
                  prompts.splice(index, 1);
                  render();
                  this.changed();
                },
              },
              'Remove',
            ),
            rowErr,
          );
        }),
      );
    };
    const addButton = h(
      'button',
      {
        type: 'button',
        class: 'small',
        'data-testid': 'add-prompt',
        onclick: () => {
          this.config.sample.prompts.push('');
          render();
          list.querySelector(`#prompt-${this.config.sample.prompts.length - 1}`)?.focus();
          this.changed();
        },
      },
      'Add prompt',
    );
    render();
    this.slots.set('sample.prompts', { err, control: null, wrap: null });
    this.widgets.push({ key: 'sample.prompts', sync: render });
    return h(
      'div',
      { class: 'field field-wide', 'data-key': 'sample.prompts' },
      h('span', { class: 'label' }, fieldLabel(field)),
      field.description ? h('p', { class: 'help' }, field.description) : null,
      h(
        'p',
        { class: 'help' },
        'Use 5-10 prompts like the ones you will run; keep a few without the trigger word to see leakage.',
      ),
      list,
      addButton,
      err,
    );
  }

  // --- validation -------------------------------------------------------------------------------------------
  async validate() {
    const seq = ++this.validationSeq;
    this.status.textContent = 'Checking…';
    this.status.className = 'validation checking';
    try {
      const result = await post('/api/config/validate', { config: this.config });
      if (seq !== this.validationSeq || !this.ctx.alive) return;
      this.showErrors(result.errors || [], result.warnings || []);
    } catch (error) {
      if (seq !== this.validationSeq || !this.ctx.alive) return;
      this.showErrors([{ key: null, message: error.message }]);
    }
  }

  findSlot(key) {
    let k = normKey(key);
    while (k) {
      if (this.slots.has(k)) return this.slots.get(k);
      const match = k.match(/^(.*)(\.[^.[\]]+|\[\d+\])$/);
      if (!match) break;
      k = match[1];
    }
    return null;
  }

  showErrors(errors, warnings = []) {
    this.lastErrors = errors;
    this.lastWarnings = warnings;
    const local = [...this.localErrors].map(([key, message]) => ({ key, message }));
    errors = [...local, ...errors.filter((e) => !this.localErrors.has(normKey(e.key)))];
    for (const slot of this.slots.values()) {
      slot.err.hidden = true;
      slot.err.textContent = '';
      if (slot.warn) slot.warn.hidden = true;
      if (slot.control) slot.control.removeAttribute('aria-invalid');
      if (slot.wrap) slot.wrap.classList.remove('invalid');
    }
    // Warnings (allowed, but the guide advises against it) sit under their field; they never block saving.
    for (const warning of warnings) {
      const slot = warning.key ? this.findSlot(normKey(warning.key)) : null;
      if (!slot) continue;
      if (!slot.warn) {
        slot.warn = h('p', { class: 'field-warning', 'data-testid': `warning-${normKey(warning.key)}` });
        slot.err.after(slot.warn);
      }
      const prefix = `${warning.key}: `;
      slot.warn.textContent = warning.message.startsWith(prefix) ? warning.message.slice(prefix.length) : warning.message;
      slot.warn.hidden = false;
    }
    const general = [];
    for (const error of errors) {
      const key = normKey(error.key);
      const slot = key ? this.findSlot(key) : null;
      const prefix = `${error.key}: `;
      const bare = error.message?.startsWith(prefix) ? error.message.slice(prefix.length) : error.message;
      const message = formMessage(key, bare);
      if (!slot) {
        general.push({ key: error.key, message: error.key ? `${error.key}: ${message}` : message });
        continue;
      }
      slot.err.hidden = false;
      slot.err.textContent = slot.err.textContent ? `${slot.err.textContent} ${message}` : message;
      if (slot.control) slot.control.setAttribute('aria-invalid', 'true');
      if (slot.wrap) slot.wrap.classList.add('invalid');
    }
    put(this.summary, 
      ...general.map((e) => h('p', {}, e.key && !String(e.message).startsWith(e.key) ? `${e.key}: ${e.message}` : e.message)),
    );
    this.summary.hidden = general.length === 0;
    const count = errors.length;
    this.status.textContent = count ? `${count} problem${count === 1 ? '' : 's'}` : '✓ Valid';
    this.status.className = `validation ${count ? 'bad' : 'ok'}`;
  }

  // --- YAML tab ---------------------------------------------------------------------------------------------
  async switchTab(tab) {
    if (tab === this.tab) return;
    if (tab === 'yaml') {
      const result = await post('/api/config/validate', { config: this.config });
      // A valid job comes back fully resolved; an invalid one is shown as typed, to be fixed here or in the form.
      this.yamlArea.value = result.yaml || `${toYaml(this.config).replace(/^\n/, '')}\n`;
      this.showYamlErrors(result.errors || []);
    } else {
      const config = await this.configFromYaml();
      if (!config) return; // stay on the YAML tab until it parses
      this.setConfig(config);
    }
    this.tab = tab;
    const yaml = tab === 'yaml';
    this.formTab.setAttribute('aria-selected', String(!yaml));
    this.yamlTab.setAttribute('aria-selected', String(yaml));
    this.formBox.parentElement.hidden = yaml;
    this.yamlBox.hidden = !yaml;
    if (yaml) {
      this.yamlArea.setSelectionRange(0, 0);
      this.yamlArea.focus();
      this.yamlArea.scrollTop = 0;
    }
  }

  async configFromYaml() {
    this.scheduleYamlValidate.cancel();
    const result = await post('/api/config/validate', { yaml: this.yamlArea.value });
    this.showYamlErrors(result.errors || []);
    if (!result.config) {
      const first = (result.errors || [])[0];
      toast(`Fix the YAML first${first ? `: ${first.message}` : ''}`, 'error');
      return null;
    }
    return result.config;
  }

  async validateYaml() {
    const seq = ++this.validationSeq;
    this.status.textContent = 'Checking…';
    this.status.className = 'validation checking';
    try {
      const result = await post('/api/config/validate', { yaml: this.yamlArea.value });
      if (seq !== this.validationSeq || !this.ctx.alive) return;
      this.showYamlErrors(result.errors || []);
    } catch (error) {
      if (seq === this.validationSeq) this.showYamlErrors([{ key: null, message: error.message }]);
    }
  }

  showYamlErrors(errors) {
    put(this.yamlErrors, 
      ...errors.map((e) => h('li', {}, e.key && !String(e.message).startsWith(e.key) ? `${e.key}: ${e.message}` : e.message)),
    );
    this.yamlErrors.hidden = errors.length === 0;
    this.showErrors(errors);
  }

  // --- create / save ----------------------------------------------------------------------------------------
  async submit(andStart) {
    for (const button of this.submitButtons) button.disabled = true;
    try {
      let config = this.config;
      if (this.tab === 'yaml') {
        config = await this.configFromYaml();
        if (!config) return;
        this.config = config;
      }
      let name;
      if (this.mode === 'edit') {
        await api(`/api/jobs/${enc(this.name)}`, { method: 'PUT', body: { config } });
        name = this.name;
        toast(`Saved ${name}`);
      } else {
        const created = await post('/api/jobs', { config });
        name = created.name;
        toast(`Created ${name}`);
      }
      if (andStart) await post(`/api/jobs/${enc(name)}/start`);
      location.hash = `#/jobs/${enc(name)}`;
    } catch (error) {
      if (error instanceof ApiError && Array.isArray(error.data.errors) && error.data.errors.length) {
        this.showErrors(error.data.errors);
      } else if (error instanceof ApiError && error.field) {
        this.showErrors([{ key: error.field, message: error.message }]);
      } else {
        this.showErrors([{ key: null, message: error.message }]);
      }
      toast(error.message, 'error');
    } finally {
      for (const button of this.submitButtons) button.disabled = false;
    }
  }
}
