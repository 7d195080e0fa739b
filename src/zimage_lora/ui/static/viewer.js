// The sample viewer: one preview large with the settings its PNG holds (each sample's `meta` in GET
// /api/jobs/<name>/samples, read from the PNG's text chunks by the server), Left/Right through the checkpoints of
// its prompt, Up/Down through the prompts at its step, and a second checkpoint of the same prompt beside it.
// The job page opens it (jobs.js) and calls refresh() when its samples list changes; every move reads that list
// afresh, so previews rendered while the viewer is open are reachable at once.

import { h, put } from './lib.js';

const FIELDS = [
  // [meta key, label, data-testid]
  ['seed', 'Seed', 'viewer-seed'],
  ['steps', 'Steps', 'viewer-steps'],
  ['guidance', 'Guidance', 'viewer-guidance'],
  ['lora_scale', 'LoRA weight', 'viewer-lora-scale'],
  ['shift', 'Shift', 'viewer-shift'],
];
const PIXELATED_BELOW = 512; // px: smaller previews are enlarged with hard pixel edges, not blurred

function fmtValue(value) {
  if (value === null || value === undefined || value === '') return '–';
  if (typeof value === 'number' && !Number.isInteger(value)) return String(Number(value.toPrecision(6)));
  return String(value);
}

const uniqueSorted = (values) => [...new Set(values)].sort((a, b) => a - b);

/**
 * Open the viewer on `start` ({step, index}). `samples()` gives the job page's current list, `totalSteps()` the
 * job's step count (null when unknown), `returnFocus()` the element that gets the focus back on close.
 * Returns {refresh, close}.
 */
export function openSampleViewer({ samples, start, totalSteps = () => null, returnFocus = () => null, onClose }) {
  const current = { step: start.step, index: start.index };
  let compareStep = null;

  const list = () => samples() || [];
  const find = (step, index) => list().find((s) => s.step === step && s.index === index) || null;
  const stepsOf = (index) => uniqueSorted(list().filter((s) => s.index === index).map((s) => s.step));
  const promptsAt = (step) => uniqueSorted(list().filter((s) => s.step === step).map((s) => s.index));

  // --- layout ---
  const title = h('h2', { id: 'viewer-title', 'data-testid': 'viewer-title' });
  const closeButton = h('button', { type: 'button', class: 'small', 'data-testid': 'viewer-close' }, 'Close');
  const mainImage = h('img', { alt: '', 'data-testid': 'viewer-image' });
  const mainCaption = h('figcaption', { 'data-testid': 'viewer-image-caption' });
  const compareImage = h('img', { alt: '', 'data-testid': 'viewer-compare-image' });
  const compareCaption = h('figcaption', { 'data-testid': 'viewer-compare-caption' });
  const compareMissing = h('p', { class: 'muted', hidden: true, 'data-testid': 'viewer-compare-missing' });
  const compareFigure = h('figure', { class: 'viewer-figure', hidden: true, 'data-testid': 'viewer-compare' }, compareImage, compareMissing, compareCaption);
  const gone = h('p', { class: 'muted', hidden: true, role: 'status', 'data-testid': 'viewer-gone' });
  const stage = h(
    'div',
    { class: 'viewer-stage', tabindex: -1, 'data-testid': 'viewer-stage' },
    h('figure', { class: 'viewer-figure', 'data-testid': 'viewer-main' }, mainImage, mainCaption),
    compareFigure,
    gone,
  );

  const prompt = h('dd', { class: 'viewer-prompt', 'data-testid': 'viewer-prompt' });
  const negativeTerm = h('dt', { class: 'viewer-wide' }, 'Negative prompt');
  const negative = h('dd', { class: 'viewer-prompt', 'data-testid': 'viewer-negative-prompt' });
  const stepValue = h('dd', { 'data-testid': 'viewer-step' });
  const sizeValue = h('dd', { 'data-testid': 'viewer-size' });
  const values = Object.fromEntries(FIELDS.map(([key, , testid]) => [key, h('dd', { 'data-testid': testid })]));
  const meta = h(
    'dl',
    { class: 'viewer-meta' },
    h('dt', { class: 'viewer-wide' }, 'Prompt'),
    prompt,
    negativeTerm,
    negative,
    h('dt', {}, 'Training step'),
    stepValue,
    FIELDS.map(([key, label]) => [h('dt', {}, label), values[key]]),
    h('dt', {}, 'Size'),
    sizeValue,
  );

  const navButton = (label, aria, key, testid, onclick) =>
    h('button', { type: 'button', class: 'small', 'aria-label': aria, 'aria-keyshortcuts': key, 'data-testid': testid, onclick }, label);
  const prevStep = navButton('← Earlier', 'Earlier checkpoint', 'ArrowLeft', 'viewer-prev-step', () => moveStep(-1));
  const nextStep = navButton('Later →', 'Later checkpoint', 'ArrowRight', 'viewer-next-step', () => moveStep(1));
  const prevPrompt = navButton('↑ Previous prompt', 'Previous prompt', 'ArrowUp', 'viewer-prev-prompt', () => movePrompt(-1));
  const nextPrompt = navButton('↓ Next prompt', 'Next prompt', 'ArrowDown', 'viewer-next-prompt', () => movePrompt(1));

  const compareSelect = h('select', { id: 'viewer-compare-step', 'data-testid': 'viewer-compare-step' });
  compareSelect.addEventListener('change', () => {
    compareStep = compareSelect.value === '' ? null : Number(compareSelect.value);
    render();
  });
  const fileLink = h('a', { target: '_blank', rel: 'noopener', 'data-testid': 'viewer-open-file' }, 'Open the PNG');

  const dialog = h(
    'dialog',
    { class: 'dialog viewer', role: 'dialog', 'aria-modal': 'true', 'aria-labelledby': 'viewer-title', 'data-testid': 'sample-viewer' },
    h(
      'div',
      { class: 'viewer-inner' },
      stage,
      h(
        'div',
        { class: 'viewer-side' },
        h('div', { class: 'viewer-head' }, title, closeButton),
        meta,
        h('div', { class: 'viewer-nav', role: 'group', 'aria-label': 'Step through the samples' }, prevStep, nextStep, prevPrompt, nextPrompt),
        h('div', { class: 'viewer-compare-row' }, h('label', { for: 'viewer-compare-step' }, 'Compare with'), compareSelect),
        h('p', { class: 'viewer-keys' }, '← → checkpoints of this prompt · ↑ ↓ prompts at this step · Esc closes'),
        fileLink,
      ),
    ),
  );

  // --- rendering: everything from the current list ---
  function showImage(img, sample, caption) {
    const url = sample.url;
    if (img.getAttribute('src') !== url) img.src = url;
    const text = sample.meta?.prompt;
    img.alt = `Sample ${sample.index + 1} at step ${sample.step}${text ? `: ${text}` : ''}`;
    const width = sample.meta?.width || 0;
    img.classList.toggle('viewer-pixelated', width > 0 && width < PIXELATED_BELOW);
    if (sample.meta?.width && sample.meta?.height) img.style.aspectRatio = `${sample.meta.width} / ${sample.meta.height}`;
    caption.textContent = `Step ${sample.step}`;
  }

  function render() {
    const sample = find(current.step, current.index);
    const steps = stepsOf(current.index);
    const prompts = promptsAt(current.step);
    const total = totalSteps();
    const stepAt = steps.indexOf(current.step);
    const promptAt = prompts.indexOf(current.index);
    title.textContent = `Prompt ${current.index + 1} · step ${current.step}`;
    dialog.dataset.step = String(current.step);
    dialog.dataset.index = String(current.index);

    stage.querySelector('[data-testid="viewer-main"]').hidden = !sample;
    gone.hidden = Boolean(sample);
    gone.textContent = sample ? '' : `The preview of prompt ${current.index + 1} at step ${current.step} is gone (the job started over): close the viewer and pick another.`;
    if (sample) showImage(mainImage, sample, mainCaption);
    const m = sample?.meta || {};
    prompt.textContent = m.prompt ?? (sample ? 'This PNG carries no prompt.' : '–');
    negativeTerm.hidden = negative.hidden = !m.negative_prompt;
    negative.textContent = m.negative_prompt || '';
    stepValue.textContent = total ? `${current.step} of ${total}` : String(current.step);
    for (const [key] of FIELDS) values[key].textContent = fmtValue(m[key]);
    sizeValue.textContent = m.width && m.height ? `${m.width} × ${m.height}` : '–';
    fileLink.hidden = !sample;
    if (sample) fileLink.href = sample.url;

    prevStep.disabled = stepAt <= 0;
    nextStep.disabled = stepAt < 0 || stepAt >= steps.length - 1;
    prevPrompt.disabled = promptAt <= 0;
    nextPrompt.disabled = promptAt < 0 || promptAt >= prompts.length - 1;

    const options = [['', 'Nothing'], ...steps.map((s) => [String(s), `Step ${s}`])];
    if (compareStep !== null && !steps.includes(compareStep)) options.push([String(compareStep), `Step ${compareStep}`]);
    const optionsKey = options.map(([v]) => v).join(',');
    if (compareSelect.dataset.options !== optionsKey) {
      put(compareSelect, options.map(([value, label]) => h('option', { value }, label)));
      compareSelect.dataset.options = optionsKey;
    }
    compareSelect.value = compareStep === null ? '' : String(compareStep);

    compareFigure.hidden = compareStep === null;
    stage.classList.toggle('viewer-two', compareStep !== null);
    if (compareStep !== null) {
      const other = find(compareStep, current.index);
      compareImage.hidden = !other;
      compareMissing.hidden = Boolean(other);
      compareMissing.textContent = other ? '' : `No preview of prompt ${current.index + 1} at step ${compareStep}.`;
      if (other) showImage(compareImage, other, compareCaption);
      else compareCaption.textContent = `Step ${compareStep}`;
    }

    // a button that just became disabled drops the focus: keep it in the dialog, where the arrow keys work
    const focused = document.activeElement;
    if (!dialog.contains(focused) || focused.disabled) stage.focus();
  }

  function moveStep(delta) {
    const steps = stepsOf(current.index);
    const next = steps[steps.indexOf(current.step) + delta];
    if (next === undefined || steps.indexOf(current.step) < 0) return;
    current.step = next;
    render();
  }

  function movePrompt(delta) {
    const prompts = promptsAt(current.step);
    const next = prompts[prompts.indexOf(current.index) + delta];
    if (next === undefined || prompts.indexOf(current.index) < 0) return;
    current.index = next;
    render();
  }

  // --- keyboard, focus, closing ---
  const ARROWS = { ArrowLeft: () => moveStep(-1), ArrowRight: () => moveStep(1), ArrowUp: () => movePrompt(-1), ArrowDown: () => movePrompt(1) };
  function onKey(event) {
    if (event.key === 'Tab') {
      trapTab(event);
      return;
    }
    const action = ARROWS[event.key];
    if (!action || event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
    if (event.target instanceof HTMLSelectElement) return; // the select steps through its own options
    event.preventDefault();
    action();
  }

  function trapTab(event) {
    const focusable = [...dialog.querySelectorAll('button, select, a[href]')].filter((el) => !el.disabled && !el.hidden && el.offsetParent !== null);
    if (!focusable.length) return;
    const first = focusable[0];
    const last = focusable.at(-1);
    const inside = dialog.contains(document.activeElement);
    if (event.shiftKey && (document.activeElement === first || !inside)) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && (document.activeElement === last || !inside)) {
      event.preventDefault();
      first.focus();
    }
  }

  let open = true;
  function close() {
    if (open && dialog.open) dialog.close();
  }

  closeButton.addEventListener('click', close);
  dialog.addEventListener('click', (event) => {
    if (event.target !== dialog) return; // only the backdrop (the dialog box itself is covered by its content)
    const box = dialog.getBoundingClientRect();
    const outside = event.clientX < box.left || event.clientX > box.right || event.clientY < box.top || event.clientY > box.bottom;
    if (outside) close();
  });
  dialog.addEventListener('close', () => {
    open = false;
    document.removeEventListener('keydown', onKey, true);
    dialog.remove();
    const target = returnFocus();
    if (target && target.isConnected) target.focus();
    if (onClose) onClose();
  });
  document.addEventListener('keydown', onKey, true); // on the document: arrows work wherever the focus is in it

  document.body.append(dialog);
  dialog.showModal(); // modal: the page behind is inert, Esc closes
  render();
  closeButton.focus();

  return {
    refresh: () => open && render(),
    close,
  };
}
