// Datasets (#/datasets) and one dataset (#/datasets/<name>): upload (picker or drag and drop), thumbnails,
// captions edited in place, deleting images and orphan captions (a .txt without its image), captioning by a model
// (captions.js), and the `dataset check` problems grouped by kind, the fatal ones first.

import {
  h, put, add, enc, fmtBytes, ApiError, api, post, toast, pageHeader, errorBox, confirmByName,
} from './lib.js';
import { captionSection } from './captions.js';

// ---------------------------------------------------------------------------------------------------------------
// Datasets
// ---------------------------------------------------------------------------------------------------------------

export async function datasetsView(ctx, root) {
  const body = h('tbody');
  const empty = h('p', { class: 'empty', hidden: true }, 'No datasets yet. Create one, then upload images and captions.');
  const nameInput = h('input', {
    id: 'new-dataset-name',
    type: 'text',
    placeholder: 'e.g. my_character',
    pattern: '[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}',
    title: 'Letters, digits, ".", "_" or "-", starting with a letter or digit',
    required: true,
    'data-testid': 'new-dataset-name',
  });
  const formError = h('p', { class: 'field-error', hidden: true, 'data-testid': 'new-dataset-error' });
  const form = h(
    'form',
    { class: 'inline-form card', 'data-testid': 'new-dataset-form' },
    h('label', { for: 'new-dataset-name' }, 'New dataset'),
    nameInput,
    h('button', { type: 'submit', class: 'primary', 'data-testid': 'create-dataset' }, 'Create dataset'),
    h('p', { class: 'help' }, 'Letters, digits, ".", "_" or "-". A dataset is a folder of images with .txt captions.'),
    formError,
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    formError.hidden = true;
    try {
      const created = await post('/api/datasets', { name: nameInput.value.trim() });
      location.hash = `#/datasets/${enc(created?.name || nameInput.value.trim())}`;
    } catch (error) {
      formError.textContent = error.message;
      formError.hidden = false;
    }
  });
  add(root, 
    pageHeader('Datasets'),
    form,
    h(
      'div',
      { class: 'table-wrap' },
      h(
        'table',
        { class: 'table', 'data-testid': 'datasets-table' },
        h('thead', {}, h('tr', {}, ['Name', 'Images', 'Captioned'].map((t) => h('th', {}, t)))),
        body,
      ),
    ),
    empty,
  );
  const refresh = async () => {
    const { datasets } = await api('/api/datasets');
    if (!ctx.alive) return;
    put(body, 
      ...datasets.map((d) =>
        h(
          'tr',
          { 'data-testid': `dataset-row-${d.name}` },
          h('td', {}, h('a', { href: `#/datasets/${enc(d.name)}`, 'data-testid': `dataset-link-${d.name}` }, d.name)),
          h('td', {}, String(d.images)),
          h('td', {}, `${d.captioned} / ${d.images}`),
        ),
      ),
    );
    empty.hidden = datasets.length > 0;
  };
  await refresh();
  ctx.every(5000, refresh);
}

export async function datasetView(ctx, root, name) {
  const url = (suffix = '') => `/api/datasets/${enc(name)}${suffix}`;
  const grid = h('div', { class: 'thumb-grid', 'data-testid': 'image-grid' });
  const orphanList = h('ul', { class: 'orphan-list' });
  const orphanCount = h('span', { class: 'muted' });
  const orphans = h(
    'div',
    { class: 'orphans', hidden: true, 'data-testid': 'orphan-captions' },
    h('h3', {}, 'Orphan captions ', orphanCount),
    h('p', { class: 'help' }, 'These .txt files have no image of the same name, so training never reads them: upload the image (same name), or delete the caption.'),
    orphanList,
  );
  const count = h('span', { class: 'muted', 'data-testid': 'dataset-count' }, '');
  const fileInput = h('input', {
    id: 'upload-input',
    type: 'file',
    multiple: true,
    class: 'file-input',
    'data-testid': 'upload-input',
  });
  const uploadResult = h('div', { class: 'upload-result', 'data-testid': 'upload-result', 'aria-live': 'polite' });
  const drop = h(
    'div',
    { class: 'drop-zone', 'data-testid': 'drop-zone' },
    h('p', {}, h('strong', {}, 'Drop images and .txt captions here'), ' or '),
    h('label', { for: 'upload-input', class: 'button' }, 'Choose files…'),
    fileInput,
    h('p', { class: 'help' }, 'PNG, JPEG, WebP or BMP; a .txt with the same name is that image’s caption.'),
  );

  async function upload(files) {
    if (!files.length) return;
    const form = new FormData();
    for (const file of files) form.append('files', file, file.name);
    put(uploadResult, h('p', { class: 'muted' }, `Uploading ${files.length} file${files.length === 1 ? '' : 's'}…`));
    const show = (result) => {
      const saved = result.saved || [];
      const rejected = result.rejected || [];
      const lonely = result.orphan_captions || []; // captions saved without an image of their name
      const files = `${saved.length} file${saved.length === 1 ? '' : 's'}`;
      put(
        uploadResult,
        h('p', { class: saved.length ? 'ok' : 'muted' }, lonely.length ? `Saved ${files}, but ${lonely.length === 1 ? 'a caption has' : `${lonely.length} captions have`} no image:` : `Saved ${files}.`),
        lonely.length
          ? h('ul', { class: 'warning-list', 'data-testid': 'upload-orphans' }, lonely.map((o) => h('li', {}, o.message)))
          : null,
        rejected.length
          ? h('ul', { class: 'error-list', 'data-testid': 'upload-rejected' }, rejected.map((r) => h('li', {}, `${r.file}: ${r.error}`)))
          : null,
      );
    };
    try {
      show(await api(url('/upload'), { method: 'POST', form }));
      await refresh();
    } catch (error) {
      if (error instanceof ApiError && Array.isArray(error.data.rejected)) show(error.data);
      else put(uploadResult, errorBox(error.message, 'upload-error'));
    } finally {
      fileInput.value = '';
    }
  }

  fileInput.addEventListener('change', () => upload([...fileInput.files]));
  for (const type of ['dragenter', 'dragover']) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add('dragging');
    });
  }
  drop.addEventListener('dragleave', () => drop.classList.remove('dragging'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('dragging');
    upload([...(event.dataTransfer?.files || [])]);
  });

  // --- dataset check ---
  const resInput = h('input', { id: 'check-resolutions', type: 'text', value: '512,768,1024', 'data-testid': 'check-resolutions' });
  const triggerInput = h('input', { id: 'check-trigger', type: 'text', placeholder: 'optional', 'data-testid': 'check-trigger' });
  const report = h('div', { class: 'check-report', 'aria-live': 'polite', 'data-testid': 'check-result' });
  const checkForm = h(
    'form',
    { class: 'inline-form' },
    h('label', { for: 'check-resolutions' }, 'Resolutions'),
    resInput,
    h('label', { for: 'check-trigger' }, 'Trigger word'),
    triggerInput,
    h('button', { type: 'submit', 'data-testid': 'check-dataset' }, 'Check dataset'),
  );
  checkForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    put(report, h('p', { class: 'muted' }, 'Checking…'));
    try {
      const params = new URLSearchParams({ resolutions: resInput.value.replace(/\s+/g, '') });
      if (triggerInput.value.trim()) params.set('trigger', triggerInput.value.trim());
      const result = await api(url(`/check?${params}`));
      if (ctx.alive) put(report, ...checkResult(result));
    } catch (error) {
      put(report, errorBox(error.message, 'check-error'));
    }
  });

  const deleteDataset = h(
    'button',
    {
      type: 'button',
      class: 'danger',
      'data-testid': 'delete-dataset',
      onclick: async () => {
        const ok = await confirmByName({
          title: `Delete dataset ${name}?`,
          text: 'This deletes the folder with all its images, captions and caches.',
          name,
        });
        if (!ok) return;
        try {
          await api(`${url()}?confirm=${enc(name)}`, { method: 'DELETE' });
          toast(`Deleted ${name}`);
          location.hash = '#/datasets';
        } catch (error) {
          toast(error.message, 'error');
        }
      },
    },
    'Delete dataset',
  );

  const captioning = h('div', { 'data-testid': 'cap-slot' });
  captionSection(ctx, name, { onAccepted: () => refresh() })
    .then((section) => ctx.alive && captioning.replaceWith(section))
    .catch((error) => put(captioning, errorBox(`Captioning is not available: ${error.message}`, 'cap-unavailable')));

  add(root, 
    h(
      'div',
      { class: 'page-header' },
      h('h1', {}, h('a', { href: '#/datasets', class: 'crumb' }, 'Datasets'), ' / ', h('span', { 'data-testid': 'dataset-name' }, name), ' ', count),
      h('div', { class: 'actions' }, deleteDataset),
    ),
    h('section', { class: 'card' }, h('h2', {}, 'Upload'), drop, uploadResult),
    h('section', { class: 'card' }, h('h2', {}, 'Images and captions'), grid, orphans),
    captioning,
    h('section', { class: 'card' }, h('h2', {}, 'Check'), h('p', { class: 'help' }, 'Runs `zimage-lora dataset check`: sizes, captions, duplicates, buckets.'), checkForm, report),
  );

  const cards = new Map(); // file -> card element, so a refresh keeps captions being edited
  const captions = new Map(); // file -> the caption saved on disk
  const showCount = () => {
    const total = captions.size;
    const captioned = [...captions.values()].filter((c) => c.trim()).length;
    count.textContent = `${total} image${total === 1 ? '' : 's'}, ${captioned} captioned`;
  };
  function imageCard(image, index) {
    const id = `caption-${index}`;
    const caption = h('textarea', {
      id,
      rows: 3,
      value: image.caption || '',
      'data-testid': `caption-${image.file}`,
    });
    caption.value = image.caption || '';
    const status = h('span', { class: 'save-state', 'data-testid': `caption-status-${image.file}`, 'aria-live': 'polite' }, image.caption ? 'saved' : 'no caption');
    let saved = image.caption || '';
    let saving = null;
    const save = async () => {
      const text = caption.value;
      if (text === saved) return;
      status.textContent = 'saving…';
      status.className = 'save-state busy';
      saving = api(url(`/captions/${enc(image.file)}`), { method: 'PUT', body: { caption: text } });
      try {
        await saving;
        saved = text;
        captions.set(image.file, text);
        showCount();
        status.textContent = '✓ saved';
        status.className = 'save-state ok';
      } catch (error) {
        status.textContent = `not saved: ${error.message}`;
        status.className = 'save-state bad';
      }
    };
    caption.addEventListener('input', () => {
      status.textContent = caption.value === saved ? 'saved' : 'unsaved';
      status.className = `save-state ${caption.value === saved ? '' : 'dirty'}`;
    });
    caption.addEventListener('blur', save);
    caption.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey) {
        event.preventDefault();
        save();
      }
    });
    const remove = deleteFileButton(image.file, `delete-image-${image.file}`, url(`/images/${enc(image.file)}`));
    const size = image.width ? `${image.width}×${image.height} · ` : '';
    const card = h(
      'figure',
      { class: 'thumb-card', 'data-testid': `image-card-${image.file}` },
      h('a', { href: image.url, target: '_blank', rel: 'noopener', class: 'thumb' }, h('img', { src: image.thumb || image.url, alt: image.file, loading: 'lazy' })),
      h(
        'figcaption',
        {},
        h('span', { class: 'mono file-name', title: image.file }, image.file),
        h('div', { class: 'file-meta' }, h('span', { class: 'muted small' }, `${size}${fmtBytes(image.bytes)}`), remove),
        h('label', { for: id, class: 'sr-only' }, `Caption for ${image.file}`),
        caption,
        status,
      ),
    );
    card.isEditing = () => document.activeElement === caption || caption.value !== saved;
    return card;
  }

  /** A Delete button for `file` that asks for a second click (for 4 s), then deletes `target` and refreshes. */
  function deleteFileButton(file, testid, target) {
    let armed = null;
    const button = h('button', { type: 'button', class: 'small ghost delete-button', 'data-testid': testid, 'aria-label': `Delete ${file}` }, 'Delete');
    const disarm = () => {
      armed = null;
      button.textContent = 'Delete';
      button.setAttribute('aria-label', `Delete ${file}`);
      button.classList.remove('danger');
    };
    button.addEventListener('click', async () => {
      if (!armed) {
        button.textContent = 'Click again to delete';
        button.setAttribute('aria-label', `Click again to delete ${file}`);
        button.classList.add('danger');
        armed = setTimeout(disarm, 4000);
        return;
      }
      clearTimeout(armed);
      disarm();
      try {
        await api(target, { method: 'DELETE' });
        toast(`Deleted ${file}`);
        await refresh();
      } catch (error) {
        toast(error.message, 'error');
      }
    });
    return button;
  }

  function orphanRow(orphan) {
    return h(
      'li',
      { class: 'orphan', 'data-testid': `orphan-caption-${orphan.file}` },
      h('span', { class: 'mono file-name', title: orphan.message }, orphan.file),
      h('span', { class: 'muted small orphan-text', title: orphan.caption }, orphan.caption || '(empty)'),
      deleteFileButton(orphan.file, `delete-orphan-${orphan.file}`, url(`/captions/${enc(orphan.file)}`)),
    );
  }

  async function refresh() {
    const data = await api(url());
    if (!ctx.alive) return;
    fileInput.accept = (data.upload_exts || []).join(','); // the server's list: images and .txt captions
    const images = data.images || [];
    captions.clear();
    for (const image of images) captions.set(image.file, image.caption || '');
    showCount();
    const seen = new Set();
    const nodes = images.map((image, index) => {
      seen.add(image.file);
      const old = cards.get(image.file);
      const key = JSON.stringify(image);
      if (old && (old.key === key || old.isEditing())) return old;
      const card = imageCard(image, index);
      card.key = key;
      cards.set(image.file, card);
      return card;
    });
    for (const file of [...cards.keys()]) if (!seen.has(file)) cards.delete(file);
    put(grid, ...(nodes.length ? nodes : [h('p', { class: 'muted' }, 'No images yet: upload some above.')]));
    const lonely = data.orphan_captions || [];
    orphanCount.textContent = `(${lonely.length})`;
    put(orphanList, ...lonely.map(orphanRow));
    orphans.hidden = !lonely.length;
  }

  await refresh();
}

// ---------------------------------------------------------------------------------------------------------------
// The dataset check, as the page shows it
// ---------------------------------------------------------------------------------------------------------------

const FILES_SHOWN = 6; // a group lists this many files until "Show all" is pressed

/** The check's answer: a summary line, one block per kind of problem (fatal ones first, as errors), and the
 * printed report folded away. */
function checkResult(result) {
  const groups = result.groups || [];
  const images = `${result.trainable} of ${result.images} image${result.images === 1 ? '' : 's'} can train at one of the resolutions`;
  return [
    h('p', { class: 'check-summary', 'data-testid': 'check-summary' }, groups.length ? `${images}. Problems by kind:` : `${images}.`),
    groups.length
      ? h('div', { class: 'check-groups', 'data-testid': 'check-problems' }, groups.map(problemGroup))
      : h('p', { class: 'ok', 'data-testid': 'check-problems' }, 'No problems found.'),
    h(
      'details',
      { class: 'check-full', 'data-testid': 'check-full-report' },
      h('summary', {}, 'Full report (as zimage-lora dataset check prints it)'),
      h('pre', { class: 'log', 'data-testid': 'check-report' }, result.report || ''),
    ),
  ];
}

function problemGroup(group, index) {
  const headingId = `check-group-${index}`;
  const filesId = `check-files-${index}`;
  const items = group.items || [];
  const files = h('p', { class: 'check-files', id: filesId, 'data-testid': `check-files-${group.key}` });
  const show = (all) => {
    const shown = all ? items : items.slice(0, FILES_SHOWN);
    put(files, ...shown.flatMap((item, i) => [i ? ', ' : '', h('span', { class: 'mono', title: item.detail || '' }, item.label)]), shown.length < items.length ? ` … and ${items.length - shown.length} more` : '');
  };
  show(false);
  let more = null;
  if (items.length > FILES_SHOWN) {
    more = h('button', { type: 'button', class: 'small ghost', 'aria-expanded': 'false', 'aria-controls': filesId, 'data-testid': `check-more-${group.key}` }, `Show all ${items.length}`);
    more.addEventListener('click', () => {
      const all = more.getAttribute('aria-expanded') !== 'true';
      show(all);
      more.setAttribute('aria-expanded', String(all));
      more.textContent = all ? 'Show fewer' : `Show all ${items.length}`;
    });
  }
  return h(
    'section',
    {
      class: `check-group ${group.fatal ? 'check-fatal' : 'check-warning'}`,
      role: group.fatal ? 'alert' : null,
      'aria-labelledby': headingId,
      'data-testid': `check-group-${group.key}`,
      'data-kind': group.kind,
    },
    h(
      'h3',
      { id: headingId },
      h('span', { class: 'check-level' }, group.fatal ? 'Error' : 'Warning'),
      ' ',
      group.title,
      items.length ? h('span', { class: 'check-count' }, ` (${items.length})`) : null,
    ),
    h('p', { class: 'check-hint' }, group.hint),
    items.length ? files : null,
    more,
  );
}
