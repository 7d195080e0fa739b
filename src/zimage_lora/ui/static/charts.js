// Charts of a run's metrics (inline SVG, no library): the loss curve and the preview scores. The job page draws
// both on one time axis through runCharts (smoothing, log scale, zoom to a range of steps, a crosshair with the
// values under the pointer or the arrow keys); a comparison's page draws one loss curve per variant on shared axes
// (drawLossChart with a `range`).

import { h, put, svg, fmtNumber } from './lib.js';

// The preview scores of training/scores.py, on the loss chart's time axis: each in [0, 1] (Turbo drift can dip
// below 0); the tooltip gives the nearest round's values and, for the change on prompts without the trigger, each
// prompt's own value.
const SCORES = [
  ['leak', 'change on prompts without the trigger', 'score-leak'],
  ['concept', 'concept (toy world)', 'score-concept'],
  ['accuracy', 'attributes right without the trigger (toy world)', 'score-accuracy'],
  ['turbo_drift', 'Turbo drift (toy world)', 'score-drift'],
];

// ---------------------------------------------------------------------------------------------------------------
// Axes: round ticks, and the frame that maps steps and values into the view box
// ---------------------------------------------------------------------------------------------------------------

const W = 640;
const H = 240;
const PAD = { left: 60, right: 24, top: 12, bottom: 40 };
const PLOT_W = W - PAD.left - PAD.right;
const PLOT_H = H - PAD.top - PAD.bottom;

/** A chart's <svg>: focusable and described with its keys when the page lets one explore it (the job page), a plain
 * image otherwise (a comparison's small charts). */
function chartSvg(view, label, data, ...children) {
  const keys = view.interactive ? ' Left and Right arrow keys move through the steps; drag across the chart to zoom.' : '';
  const attrs = { viewBox: `0 0 ${W} ${H}`, role: view.interactive ? 'group' : 'img', 'aria-label': `${label}${keys}`, ...data };
  if (view.interactive) attrs.tabindex = 0;
  return svg('svg', attrs, ...children);
}
const MAX_SAMPLES = 2 * PLOT_W; // about 2 drawn points per pixel column of the plot
let clipIds = 0;

const clean = (v) => Number(v.toPrecision(12)); // 0.30000000000000004 -> 0.3

/** The round interval (1, 2 or 5 × 10^k) that cuts `span` into about `count` parts. */
function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  const m = raw / power;
  return clean((m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * power); // the nearest of 1, 2, 5, 10
}

function linearTicks(min, max, count) {
  const step = niceStep(max - min, count);
  const values = [];
  for (let i = Math.ceil(min / step - 1e-9); i * step <= max + step * 1e-9; i += 1) values.push(clean(i * step));
  const digits = Math.min(10, Math.max(0, -Math.floor(Math.log10(step) + 1e-9)));
  return values.map((v) => [v, v.toFixed(digits)]);
}

/** Ticks at 1, 2 and 5 × 10^k on a log axis (only the powers of ten when there are many decades). */
function logTicks(min, max) {
  let values = [];
  for (let k = Math.floor(Math.log10(min)); k <= Math.ceil(Math.log10(max)); k += 1) {
    for (const m of [1, 2, 5]) {
      const v = clean(m * 10 ** k);
      if (v >= min * (1 - 1e-9) && v <= max * (1 + 1e-9)) values.push(v);
    }
  }
  if (values.length > 8) values = values.filter((v) => Number.isInteger(clean(Math.log10(v))));
  if (values.length < 2) return linearTicks(min, max, 4).filter(([v]) => v > 0);
  const label = (v) => (v < 1e-3 || v >= 1e5 ? v.toExponential(0) : v.toFixed(Math.max(0, -Math.floor(Math.log10(v) + 1e-9))));
  return values.map((v) => [v, label(v)]);
}

/** Whole steps at round intervals: about 7 labels across the plot. */
function stepTicks(min, max) {
  const step = Math.max(1, niceStep(max - min, 7));
  const out = [];
  for (let s = Math.ceil(min / step) * step; s <= max; s += step) out.push(s);
  return out;
}

function frame(xMin, xMax, yMin, yMax, log) {
  const ty = log ? Math.log10 : (v) => v;
  const [a, b] = [ty(yMin), ty(yMax)];
  return {
    xMin,
    xMax,
    x: (step) => PAD.left + ((step - xMin) / (xMax - xMin)) * PLOT_W,
    y: (v) => PAD.top + (1 - (ty(v) - a) / (b - a)) * PLOT_H,
    stepAt: (px) => xMin + ((px - PAD.left) / PLOT_W) * (xMax - xMin),
  };
}

/** A value range with a little air above and below (in log space on a log axis). */
function padded(lo, hi, log) {
  if (log) {
    const [a, b] = [Math.log10(lo), Math.log10(hi)];
    const air = b - a < 1e-9 ? 0.5 : (b - a) * 0.05;
    return [10 ** (a - air), 10 ** (b + air)];
  }
  const air = hi - lo < 1e-9 ? Math.max(0.5, Math.abs(hi) * 0.1) : (hi - lo) * 0.05;
  return [lo - air, hi + air];
}

function axes(f, yTicks, yTitle, clipId) {
  const bottom = H - PAD.bottom;
  return [
    svg('defs', {}, svg('clipPath', { id: clipId }, svg('rect', { x: PAD.left, y: PAD.top - 4, width: PLOT_W, height: PLOT_H + 8 }))),
    svg('rect', { x: PAD.left, y: PAD.top, width: PLOT_W, height: PLOT_H, class: 'plot-bg' }),
    yTicks.map(([v, label]) =>
      svg('g', {},
        svg('line', { x1: PAD.left, x2: W - PAD.right, y1: f.y(v), y2: f.y(v), class: 'grid' }),
        svg('text', { x: PAD.left - 6, y: f.y(v) + 4, 'text-anchor': 'end', class: 'tick y-tick' }, label)),
    ),
    svg('line', { x1: PAD.left, x2: W - PAD.right, y1: bottom, y2: bottom, class: 'axis' }),
    stepTicks(f.xMin, f.xMax).map((s) =>
      svg('g', {},
        svg('line', { x1: f.x(s), x2: f.x(s), y1: bottom, y2: bottom + 4, class: 'axis' }),
        svg('text', { x: f.x(s), y: bottom + 16, 'text-anchor': 'middle', class: 'tick x-tick', 'data-step': s }, s)),
    ),
    svg('text', { x: PAD.left + PLOT_W / 2, y: H - 4, 'text-anchor': 'middle', class: 'axis-title' }, 'step'),
    svg('text', { x: 12, y: PAD.top + PLOT_H / 2, 'text-anchor': 'middle', class: 'axis-title', transform: `rotate(-90 12 ${PAD.top + PLOT_H / 2})` }, yTitle),
  ];
}

// ---------------------------------------------------------------------------------------------------------------
// Paths: only what is in view, thinned to ~2 points per pixel column (the tooltip reads the exact values)
// ---------------------------------------------------------------------------------------------------------------

/** Index range [i0, i1] of the sorted `steps` inside [xMin, xMax], widened by one on each side so that the lines
 * run on to the plot's edges (the clip path cuts them there). */
function inView(steps, xMin, xMax) {
  const i0 = lowerBound(steps, xMin);
  const i1 = lowerBound(steps, xMax + 1e-9) - 1;
  return [Math.max(0, i0 - 1), Math.min(steps.length - 1, i1 + 1)];
}

function lowerBound(sorted, value) {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The index in sorted `steps` nearest to `step`, or -1 when empty. */
function nearest(steps, step) {
  if (!steps.length) return -1;
  const i = lowerBound(steps, step);
  if (i <= 0) return 0;
  if (i >= steps.length) return steps.length - 1;
  return step - steps[i - 1] <= steps[i] - step ? i - 1 : i;
}

/** Keep the lowest and the highest point of each pixel column, in drawing order: spikes survive, the path stays
 * short on runs of many thousand steps. */
function thin(pts) {
  if (pts.length <= MAX_SAMPLES) return pts;
  const out = [];
  let column = null;
  let lo = null;
  let hi = null;
  const flush = () => {
    if (!lo) return;
    if (lo === hi) out.push(lo);
    else out.push(...(lo[0] <= hi[0] ? [lo, hi] : [hi, lo]));
  };
  for (const p of pts) {
    const c = Math.floor(p[0]);
    if (c !== column) {
      flush();
      column = c;
      lo = p;
      hi = p;
    } else {
      if (p[1] > lo[1]) lo = p; // larger y = lower on screen
      if (p[1] < hi[1]) hi = p;
    }
  }
  flush();
  return out;
}

const pathOf = (pts) => thin(pts).map(([a, b], i) => `${i ? 'L' : 'M'}${a.toFixed(1)},${b.toFixed(1)}`).join('');

/** The loss curve's numbers: points with a finite loss, and their exponential moving average with weight `weight`
 * on the past (TensorBoard's smoothing slider; 0 = raw), taken over the whole run so that zooming does not change
 * it. */
function lossModel(rows, weight) {
  const points = rows.filter((r) => Number.isFinite(r.loss));
  let ema = points.length ? points[0].loss : 0;
  const smooth = points.map((r) => {
    ema = weight * ema + (1 - weight) * r.loss;
    return ema;
  });
  return { points, steps: points.map((r) => r.step), smooth, vals: points.filter((r) => Number.isFinite(r.val_loss)) };
}

/** The smoothing a run gets until someone moves the slider: more points, smoother. */
const autoWeight = (count) => clean(Math.round((1 - Math.min(0.5, 10 / Math.max(1, count) + 0.02)) * 100) / 100);

// ---------------------------------------------------------------------------------------------------------------
// The two charts. Each returns a handle {svg, frame, steps, setHover(step), setSelection(a, b)} (null when there is
// nothing to draw yet); runCharts ties them together.
// ---------------------------------------------------------------------------------------------------------------

function crosshair() {
  return svg('line', { x1: 0, x2: 0, y1: PAD.top, y2: H - PAD.bottom, class: 'crosshair', visibility: 'hidden' });
}

function selection() {
  return svg('rect', { x: 0, y: PAD.top, width: 0, height: PLOT_H, class: 'zoom-select', visibility: 'hidden' });
}

function moveCrosshair(line, f, step) {
  const shown = step !== null && step >= f.xMin && step <= f.xMax;
  line.setAttribute('visibility', shown ? 'visible' : 'hidden');
  if (shown) {
    line.setAttribute('x1', f.x(step));
    line.setAttribute('x2', f.x(step));
  }
  return shown;
}

function moveSelection(rect, f, a, b) {
  if (a === null) {
    rect.setAttribute('visibility', 'hidden');
    return;
  }
  const [x1, x2] = [f.x(Math.min(a, b)), f.x(Math.max(a, b))].map((v) => Math.max(PAD.left, Math.min(W - PAD.right, v)));
  rect.setAttribute('x', x1);
  rect.setAttribute('width', x2 - x1);
  rect.setAttribute('visibility', 'visible');
}

/** The tooltip beside the crosshair: on its right where it fits, else on its left, else against the chart's right
 * edge (it never widens the page). */
function placeTip(tip, f, step) {
  tip.hidden = false;
  const width = tip.parentElement.clientWidth;
  const at = (f.x(step) / W) * width;
  const size = tip.offsetWidth;
  const gap = 12;
  const left = at + gap + size <= width ? at + gap : at - gap - size >= 0 ? at - gap - size : Math.max(0, width - size);
  tip.style.left = `${left.toFixed(1)}px`;
}

const tipLine = (label, value, cls = '', key = '') =>
  h('div', { class: 'tip-line', 'data-key': key || null }, h('span', { class: `tip-label ${cls}` }, label), h('span', { class: 'mono' }, value));

/** The loss chart. `view`: {xMin, xMax, yMin, yMax} (a comparison's shared axes; any of them may be missing),
 * `log`, `interactive` (a focusable chart with a tooltip). */
function renderLoss(box, model, view) {
  const { points, steps, smooth, vals } = model;
  if (!points.length) {
    put(box, h('p', { class: 'muted' }, 'The curve appears with the first steps.'));
    return null;
  }
  const log = Boolean(view.log);
  const xMin = view.xMin ?? steps[0];
  const xMax = Math.max(view.xMax ?? steps.at(-1), xMin + 1);
  const [i0, i1] = inView(steps, xMin, xMax);
  const ok = (v) => Number.isFinite(v) && (!log || v > 0); // a log axis skips losses <= 0
  const shown = [];
  for (let i = i0; i <= i1; i += 1) if (steps[i] >= xMin && steps[i] <= xMax) shown.push(i);
  const seen = shown.flatMap((i) => [points[i].loss, smooth[i], points[i].val_loss]).filter(ok);
  if (!seen.length) {
    put(box, h('p', { class: 'muted', 'data-testid': 'loss-empty' }, log
      ? 'No loss above 0 in these steps to draw on a log scale: untick Log scale or widen the zoom.'
      : 'No loss logged in these steps: widen the zoom or reset it.'));
    return null;
  }
  let [yMin, yMax] = padded(Math.min(...seen), Math.max(...seen), log);
  if (!log && Number.isFinite(view.yMin) && Number.isFinite(view.yMax)) [yMin, yMax] = padded(view.yMin, view.yMax, false);
  const f = frame(xMin, xMax, yMin, yMax, log);
  const clipId = `chart-clip-${(clipIds += 1)}`;
  const line = (values) => {
    const pts = [];
    for (let i = i0; i <= i1; i += 1) if (ok(values(i))) pts.push([f.x(steps[i]), f.y(values(i))]);
    return pathOf(pts);
  };
  const valsShown = vals.filter((r) => r.step >= xMin && r.step <= xMax && ok(r.val_loss));
  const cross = crosshair();
  const select = selection();
  const dotRaw = svg('circle', { r: 3, class: 'hover-dot raw-dot', visibility: 'hidden' });
  const dotSmooth = svg('circle', { r: 4, class: 'hover-dot smooth-dot', visibility: 'hidden' });
  const last = points.at(-1);
  const chart = chartSvg(
    view,
    `Loss over ${points.length} steps; last ${fmtNumber(last.loss)}.`,
    { 'data-points': points.length, 'data-shown': shown.length, 'data-x-min': xMin, 'data-x-max': xMax, 'data-log': String(log) },
    axes(f, log ? logTicks(yMin, yMax) : linearTicks(yMin, yMax, 5), log ? 'loss (log)' : 'loss', clipId),
    svg('g', { 'clip-path': `url(#${clipId})` },
      svg('path', { d: line((i) => points[i].loss), class: 'raw' }),
      svg('path', { d: line((i) => smooth[i]), class: 'smooth' }),
      valsShown.map((r) => svg('circle', { cx: f.x(r.step), cy: f.y(r.val_loss), r: 3, class: 'val', 'data-step': r.step })),
      select,
      cross,
      dotRaw,
      dotSmooth),
  );
  const tip = h('div', { class: 'chart-tip', hidden: true, 'data-testid': 'loss-tooltip', 'aria-live': 'polite' });
  put(box,
    h('div', { class: 'chart-area' }, chart, view.interactive ? tip : null),
    h('p', { class: 'legend' },
      h('span', { class: 'key raw' }, 'loss'),
      h('span', { class: 'key smooth' }, 'smoothed'),
      vals.length ? h('span', { class: 'key val' }, 'validation') : null),
  );
  const placeDot = (dot, v, step) => {
    dot.setAttribute('visibility', ok(v) ? 'visible' : 'hidden');
    if (ok(v)) {
      dot.setAttribute('cx', f.x(step));
      dot.setAttribute('cy', f.y(v));
    }
  };
  return {
    svg: chart,
    frame: f,
    steps: shown.map((i) => steps[i]),
    setSelection: (a, b) => moveSelection(select, f, a, b),
    setHover(step) {
      const i = step === null ? -1 : lowerBound(steps, step);
      const row = i >= 0 && steps[i] === step ? points[i] : null;
      if (!moveCrosshair(cross, f, row ? step : null)) {
        for (const dot of [dotRaw, dotSmooth]) dot.setAttribute('visibility', 'hidden');
        tip.hidden = true;
        return;
      }
      placeDot(dotRaw, row.loss, step);
      placeDot(dotSmooth, smooth[i], step);
      put(tip,
        h('div', { class: 'tip-title', 'data-key': 'step' }, `step ${step}`),
        tipLine('loss', fmtNumber(row.loss), 'raw', 'loss'),
        tipLine('smoothed', fmtNumber(smooth[i]), 'smooth', 'smoothed'),
        Number.isFinite(row.val_loss) ? tipLine('validation', fmtNumber(row.val_loss), 'val', 'val_loss') : null,
        Number.isFinite(row.lr) ? tipLine('lr', row.lr.toExponential(2), '', 'lr') : null);
      placeTip(tip, f, step);
    },
  };
}

/** The preview scores chart on the given step range (`view.xMin`/`xMax`; the rows' steps without them). */
function renderScores(box, rows, view) {
  const scored = rows.filter((r) => SCORES.some(([key]) => Number.isFinite(r[key])));
  if (!scored.length) {
    const note = rows.find((r) => r.leak_note)?.leak_note;
    put(box, h('p', { class: 'muted' }, note ? `Change on prompts without the trigger: n/a (${note}).` : 'The scores appear with the first preview round after step 0.'));
    return null;
  }
  const xMin = view.xMin ?? (rows.length ? rows[0].step : scored[0].step);
  const xMax = Math.max(view.xMax ?? (rows.length ? rows.at(-1).step : scored.at(-1).step), xMin + 1);
  const lowest = Math.min(0, ...scored.map((r) => (Number.isFinite(r.turbo_drift) ? r.turbo_drift : 0)));
  const yMin = lowest < 0 ? Math.floor(lowest * 10) / 10 : 0;
  const f = frame(xMin, xMax, yMin, 1, false);
  const clipId = `chart-clip-${(clipIds += 1)}`;
  const steps = scored.map((r) => r.step);
  const [i0, i1] = inView(steps, xMin, xMax);
  const near = scored.slice(i0, i1 + 1);
  const series = [];
  for (const [key, label, cls] of SCORES) {
    const pts = near.filter((r) => Number.isFinite(r[key]));
    if (!pts.length) continue;
    series.push(svg('path', { d: pathOf(pts.map((r) => [f.x(r.step), f.y(r[key])])), class: `score-line ${cls}` }));
    for (const r of pts) {
      series.push(svg('circle', { cx: f.x(r.step), cy: f.y(r[key]), r: 4, class: `score-dot ${cls}`, 'data-score': key, 'data-step': r.step },
        svg('title', {}, `step ${r.step}: ${label} ${fmtNumber(r[key], 3)}${perPrompt(key, r)}`)));
    }
  }
  const cross = crosshair();
  const select = selection();
  const chart = chartSvg(
    view,
    `Preview scores at ${scored.length} rounds.`,
    { 'data-points': scored.length, 'data-x-min': xMin, 'data-x-max': xMax },
    axes(f, linearTicks(yMin, 1, 5), 'score', clipId),
    svg('g', { 'clip-path': `url(#${clipId})` }, series, select, cross),
  );
  const tip = h('div', { class: 'chart-tip', hidden: true, 'data-testid': 'scores-tooltip', 'aria-live': 'polite' });
  const shown = SCORES.filter(([key]) => scored.some((r) => Number.isFinite(r[key])));
  put(box,
    h('div', { class: 'chart-area' }, chart, view.interactive ? tip : null),
    h('p', { class: 'legend' }, shown.map(([, label, cls]) => h('span', { class: `key ${cls}` }, label))));
  const rounds = steps.filter((s) => s >= xMin && s <= xMax);
  return {
    svg: chart,
    frame: f,
    steps: rounds,
    setSelection: (a, b) => moveSelection(select, f, a, b),
    setHover(step) {
      const at = step === null ? -1 : nearest(rounds, step);
      if (!moveCrosshair(cross, f, at < 0 ? null : step)) {
        tip.hidden = true;
        return;
      }
      const r = scored[lowerBound(steps, rounds[at])];
      put(tip,
        h('div', { class: 'tip-title', 'data-key': 'step' }, `preview round at step ${r.step}`),
        SCORES.filter(([key]) => Number.isFinite(r[key])).map(([key, label, cls]) =>
          tipLine(label, `${fmtNumber(r[key], 3)}${perPrompt(key, r)}`, `key ${cls}`, key)));
      placeTip(tip, f, step);
    },
  };
}

const perPrompt = (key, r) =>
  key === 'leak' && r.leak_prompts
    ? ` (${Object.entries(r.leak_prompts).map(([i, v]) => `prompt ${i}: ${fmtNumber(v, 3)}`).join(', ')})`
    : '';

/** The loss curve: raw losses faint, an exponential moving average on top, validation loss as dots. ``range``
 * ({xMin, xMax, yMin, yMax}) puts several curves on the same axes (a comparison's variants). */
export function drawLossChart(box, rows, range = null) {
  const points = rows.filter((r) => Number.isFinite(r.loss));
  renderLoss(box, lossModel(rows, autoWeight(points.length)), { ...(range || {}) });
}

// ---------------------------------------------------------------------------------------------------------------
// The job page: both charts on one step axis, with smoothing, log scale and zoom remembered per job
// ---------------------------------------------------------------------------------------------------------------

/** Ties the job page's loss chart (`lossBox`) and scores chart (`scoresBox`) together: one hover step, one zoom.
 * Returns {controls, update(rows)}: put `controls` above the loss chart, call `update` with the rows sorted by step
 * whenever they change; the choices survive the redraws and are remembered per job in localStorage. */
export function runCharts(lossBox, scoresBox, name) {
  const storeKey = `zimage-lora:chart:${name}`;
  const saved = load(storeKey);
  const state = {
    smoothing: Number.isFinite(saved.smoothing) ? Math.min(0.99, Math.max(0, saved.smoothing)) : null, // null: from the number of points
    log: saved.log === true,
    zoom: validZoom(saved.zoom), // [first, last]; either may be null: the run's own end
    hover: null,
    round: null, // the preview round the scores chart's arrow keys are on
    rows: [],
    drag: null, // {chart, from, px} while a zoom is being dragged out
    pending: false, // a redraw held back while dragging
  };
  let loss = null;
  let scores = null;
  let runRange = null;

  // --- controls ---
  const slider = h('input', { id: `smoothing-${name}`, type: 'range', min: 0, max: 0.99, step: 0.01, value: 0.5, 'data-testid': 'loss-smoothing' });
  const sliderText = h('output', { for: slider.id, class: 'mono' });
  const logBox = h('input', { id: `log-${name}`, type: 'checkbox', checked: state.log, 'data-testid': 'loss-log' });
  const zoomFrom = h('input', { id: `zoom-from-${name}`, type: 'number', min: 0, step: 1, class: 'small', 'data-testid': 'loss-zoom-from' });
  const zoomTo = h('input', { id: `zoom-to-${name}`, type: 'number', min: 0, step: 1, class: 'small', 'data-testid': 'loss-zoom-to' });
  const reset = h('button', { type: 'button', class: 'small', 'data-testid': 'loss-zoom-reset' }, 'Reset zoom');
  const zoomError = h('p', { class: 'field-error', role: 'alert', hidden: true, 'data-testid': 'loss-zoom-error' });
  const controls = h(
    'div',
    { class: 'chart-controls', 'data-testid': 'loss-controls' },
    h('div', { class: 'chart-control' }, h('label', { for: slider.id }, 'Smoothing'), slider, sliderText),
    h('div', { class: 'chart-control' }, logBox, h('label', { for: logBox.id }, 'Log scale')),
    h('div', { class: 'chart-control', role: 'group', 'aria-label': 'Zoom to steps' },
      h('label', { for: zoomFrom.id }, 'Steps'), zoomFrom, h('label', { for: zoomTo.id }, 'to'), zoomTo, reset),
    zoomError,
  );

  slider.addEventListener('input', () => {
    state.smoothing = Number(slider.value);
    changed();
  });
  logBox.addEventListener('change', () => {
    state.log = logBox.checked;
    changed();
  });
  // An empty end is the run's first or last step (an open end follows a live run's new steps).
  const typedZoom = () => {
    const [a, b] = [zoomFrom, zoomTo].map((input) => (input.value === '' ? null : Number(input.value)));
    if (a !== null && b !== null && !(a < b)) {
      zoomError.textContent = `Zoom: the first step (${a}) must be below the last (${b}); change one of them.`;
      zoomError.hidden = false;
      return;
    }
    setZoom(a === null && b === null ? null : [a, b], false); // the inputs already say it
  };
  zoomFrom.addEventListener('change', typedZoom);
  zoomTo.addEventListener('change', typedZoom);
  reset.addEventListener('click', () => setZoom(null));

  function setZoom(range, show = true) {
    state.zoom = range;
    zoomError.hidden = true;
    if (show) showZoom();
    changed();
  }

  function showZoom() { // not on every redraw: that would overwrite what someone is typing
    zoomFrom.value = state.zoom?.[0] ?? '';
    zoomTo.value = state.zoom?.[1] ?? '';
  }
  showZoom();

  function changed() {
    save(storeKey, { smoothing: state.smoothing, log: state.log, zoom: state.zoom });
    draw();
  }

  // --- drawing ---
  function draw() {
    if (state.drag) {
      state.pending = true;
      return;
    }
    const rows = state.rows;
    const kept = state.hover;
    const focused = [loss, scores].findIndex((chart) => chart && chart.svg === document.activeElement);
    const count = rows.filter((r) => Number.isFinite(r.loss)).length;
    const weight = state.smoothing ?? autoWeight(count);
    slider.value = weight;
    sliderText.textContent = state.smoothing === null ? `${weight.toFixed(2)} (auto)` : weight.toFixed(2);
    const model = lossModel(rows, weight);
    runRange = model.steps.length ? [model.steps[0], model.steps.at(-1)] : rows.length ? [rows[0].step, rows.at(-1).step] : null;
    const [xMin, xMax] = [0, 1].map((end) => state.zoom?.[end] ?? runRange?.[end] ?? end);
    zoomFrom.placeholder = runRange ? String(runRange[0]) : '';
    zoomTo.placeholder = runRange ? String(runRange[1]) : '';
    reset.disabled = !state.zoom;
    loss = renderLoss(lossBox, model, { xMin, xMax, log: state.log, interactive: true });
    scores = renderScores(scoresBox, rows, { xMin, xMax, interactive: true });
    for (const chart of [loss, scores]) if (chart) wire(chart);
    if (focused >= 0) [loss, scores][focused]?.svg.focus({ preventScroll: true }); // live steps keep the keyboard's place
    hover(kept);
  }

  // --- one hover step and one zoom for both charts ---
  const hoverSteps = () => (loss ? loss.steps : scores ? scores.steps : []);

  function hover(step) {
    const steps = hoverSteps();
    state.hover = step !== null && steps.includes(step) ? step : null;
    state.round = null;
    for (const chart of [loss, scores]) chart?.setHover(state.hover);
  }

  function wire(chart) {
    const el = chart.svg;
    const px = (event) => {
      const box = el.getBoundingClientRect();
      return ((event.clientX - box.left) / box.width) * W;
    };
    const snap = (x) => {
      const steps = hoverSteps();
      const i = nearest(steps, chart.frame.stepAt(x));
      return i < 0 ? null : steps[i];
    };
    el.addEventListener('pointerdown', (event) => {
      if (event.button !== 0) return;
      const x = px(event);
      state.drag = { chart, px: x, from: chart.frame.stepAt(x) };
      el.setPointerCapture(event.pointerId);
    });
    el.addEventListener('pointermove', (event) => {
      const x = px(event);
      if (state.drag?.chart === chart) {
        chart.setSelection(state.drag.from, chart.frame.stepAt(x));
        return;
      }
      hover(x >= PAD.left - 8 && x <= W - PAD.right + 8 ? snap(x) : null);
    });
    el.addEventListener('pointerleave', () => {
      if (!state.drag) hover(null);
    });
    const endDrag = (event, apply) => {
      const drag = state.drag;
      if (drag?.chart !== chart) return;
      state.drag = null;
      chart.setSelection(null);
      const x = px(event);
      if (apply && Math.abs(x - drag.px) > 6) {
        const [a, b] = [drag.from, chart.frame.stepAt(x)].sort((p, q) => p - q);
        const from = Math.max(Math.floor(chart.frame.xMin), Math.round(a));
        const to = Math.min(Math.ceil(chart.frame.xMax), Math.round(b));
        if (from < to) {
          setZoom([from, to]);
          return;
        }
      }
      if (state.pending) {
        state.pending = false;
        draw();
      }
    };
    el.addEventListener('pointerup', (event) => endDrag(event, true));
    el.addEventListener('pointercancel', (event) => endDrag(event, false));
    el.addEventListener('keydown', (event) => {
      const steps = chart.steps; // the loss chart's logged steps; the scores chart's preview rounds
      if (!steps.length) return;
      const current = chart === scores ? state.round ?? state.hover : state.hover;
      const at = current === null ? -1 : lowerBound(steps, current);
      let i = null;
      if (event.key === 'ArrowRight') i = at < 0 ? 0 : Math.min(steps.length - 1, steps[at] > current ? at : at + 1);
      else if (event.key === 'ArrowLeft') i = at < 0 ? steps.length - 1 : Math.max(0, at - 1);
      else if (event.key === 'Home') i = 0;
      else if (event.key === 'End') i = steps.length - 1;
      else if (event.key === 'Escape') {
        hover(null);
        return;
      } else return;
      event.preventDefault();
      const target = steps[i];
      // a preview round's step may have no loss row: show the loss chart's nearest step then
      const own = hoverSteps();
      hover(own.includes(target) ? target : own[nearest(own, target)] ?? null);
      if (chart === scores) {
        state.round = target;
        scores.setHover(target);
      }
    });
    el.addEventListener('blur', () => {
      if (!state.drag) hover(null);
    });
  }

  return {
    controls,
    update(rows) {
      state.rows = rows;
      draw();
    },
  };
}

function validZoom(zoom) {
  const ok = Array.isArray(zoom) && zoom.length === 2 && zoom.every((v) => v === null || Number.isFinite(v));
  return ok && zoom.some((v) => v !== null) ? zoom : null;
}

function load(key) {
  try {
    const value = JSON.parse(localStorage.getItem(key) || '{}');
    return value && typeof value === 'object' ? value : {};
  } catch {
    return {};
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage full or off (a private window): the choices last as long as the page
  }
}
