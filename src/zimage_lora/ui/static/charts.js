// Charts of a run's metrics (inline SVG, no library): the loss curve and the preview scores. The job page draws
// both; a comparison's page draws one loss curve per variant on shared axes.

import { h, put, svg, fmtNumber } from './lib.js';

// The preview scores of training/scores.py, on the loss chart's time axis: each in [0, 1] (Turbo drift can dip
// below 0); a point's tooltip gives the step, the value and, for the change on prompts without the trigger, each
// prompt's own value.
const SCORES = [
  ['leak', 'change on prompts without the trigger', 'score-leak'],
  ['concept', 'concept (toy world)', 'score-concept'],
  ['accuracy', 'attributes right without the trigger (toy world)', 'score-accuracy'],
  ['turbo_drift', 'Turbo drift (toy world)', 'score-drift'],
];

export function drawScoresChart(box, rows) {
  const W = 640;
  const H = 240;
  const pad = { left: 52, right: 12, top: 12, bottom: 28 };
  const scored = rows.filter((r) => SCORES.some(([key]) => Number.isFinite(r[key])));
  if (!scored.length) {
    const note = rows.find((r) => r.leak_note)?.leak_note;
    put(box, h('p', { class: 'muted' }, note ? `Change on prompts without the trigger: n/a (${note}).` : 'The scores appear with the first preview round after step 0.'));
    return;
  }
  const xMin = rows.length ? rows[0].step : scored[0].step;
  const xMax = Math.max(rows.length ? rows[rows.length - 1].step : scored.at(-1).step, xMin + 1);
  const yMin = Math.min(0, ...scored.map((r) => (Number.isFinite(r.turbo_drift) ? r.turbo_drift : 0)));
  const x = (step) => pad.left + ((step - xMin) / (xMax - xMin)) * (W - pad.left - pad.right);
  const y = (v) => pad.top + (1 - (v - yMin) / (1 - yMin)) * (H - pad.top - pad.bottom);
  const grid = [yMin, 0.25, 0.5, 0.75, 1].filter((v, i, all) => all.indexOf(v) === i).map((v) =>
    svg('g', {},
      svg('line', { x1: pad.left, x2: W - pad.right, y1: y(v), y2: y(v), class: 'grid' }),
      svg('text', { x: pad.left - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, fmtNumber(v, 2))),
  );
  const series = [];
  for (const [key, label, cls] of SCORES) {
    const pts = scored.filter((r) => Number.isFinite(r[key]));
    if (!pts.length) continue;
    const d = pts.map((r, i) => `${i ? 'L' : 'M'}${x(r.step).toFixed(1)},${y(r[key]).toFixed(1)}`).join('');
    series.push(svg('path', { d, class: `score-line ${cls}` }));
    for (const r of pts) {
      const perPrompt = key === 'leak' && r.leak_prompts
        ? ` (${Object.entries(r.leak_prompts).map(([i, v]) => `prompt ${i}: ${fmtNumber(v, 3)}`).join(', ')})`
        : '';
      series.push(svg('circle', { cx: x(r.step), cy: y(r[key]), r: 4, class: `score-dot ${cls}`, 'data-score': key, 'data-step': r.step },
        svg('title', {}, `step ${r.step}: ${label} ${fmtNumber(r[key], 3)}${perPrompt}`)));
    }
  }
  const chart = svg(
    'svg',
    { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `Preview scores at ${scored.length} rounds`, 'data-points': scored.length },
    grid,
    svg('text', { x: pad.left, y: H - 8, class: 'tick' }, `step ${xMin}`),
    svg('text', { x: W - pad.right, y: H - 8, 'text-anchor': 'end', class: 'tick' }, `step ${xMax}`),
    series,
  );
  const shown = SCORES.filter(([key]) => scored.some((r) => Number.isFinite(r[key])));
  put(box, chart, h('p', { class: 'legend' }, shown.map(([, label, cls]) => h('span', { class: `key ${cls}` }, label))));
}

/** The loss curve: raw losses faint, an exponential moving average on top, validation loss as dots. ``range``
 * ({xMin, xMax, yMin, yMax}) puts several curves on the same axes (a comparison's variants). */
export function drawLossChart(box, rows, range = null) {
  const W = 640;
  const H = 240;
  const pad = { left: 52, right: 12, top: 12, bottom: 28 };
  const points = rows.filter((r) => Number.isFinite(r.loss));
  if (!points.length) {
    put(box, h('p', { class: 'muted' }, 'The curve appears with the first steps.'));
    return;
  }
  const vals = points.filter((r) => Number.isFinite(r.val_loss));
  const ys = points.map((r) => r.loss).concat(vals.map((r) => r.val_loss));
  let yMin = range ? range.yMin : Math.min(...ys);
  let yMax = range ? range.yMax : Math.max(...ys);
  if (yMax - yMin < 1e-9) {
    yMax += 0.5;
    yMin -= 0.5;
  }
  const xMin = range ? range.xMin : points[0].step;
  const xMax = Math.max(range ? range.xMax : points[points.length - 1].step, xMin + 1);
  const x = (step) => pad.left + ((step - xMin) / (xMax - xMin)) * (W - pad.left - pad.right);
  const y = (v) => pad.top + (1 - (v - yMin) / (yMax - yMin)) * (H - pad.top - pad.bottom);
  const path = (pts) => pts.map(([a, b], i) => `${i ? 'L' : 'M'}${a.toFixed(1)},${b.toFixed(1)}`).join('');
  let ema = points[0].loss;
  const alpha = Math.min(0.5, 10 / points.length + 0.02);
  const smooth = points.map((r) => {
    ema = alpha * r.loss + (1 - alpha) * ema;
    return [x(r.step), y(ema)];
  });
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => yMin + f * (yMax - yMin));
  const grid = ticks.map((v) =>
    svg(
      'g',
      {},
      svg('line', { x1: pad.left, x2: W - pad.right, y1: y(v), y2: y(v), class: 'grid' }),
      svg('text', { x: pad.left - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, fmtNumber(v, 3)),
    ),
  );
  const last = points[points.length - 1];
  const chart = svg(
    'svg',
    { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `Loss over ${points.length} steps; last ${fmtNumber(last.loss)}`, 'data-points': points.length },
    grid,
    svg('text', { x: pad.left, y: H - 8, class: 'tick' }, `step ${xMin}`),
    svg('text', { x: W - pad.right, y: H - 8, 'text-anchor': 'end', class: 'tick' }, `step ${xMax}`),
    svg('path', { d: path(points.map((r) => [x(r.step), y(r.loss)])), class: 'raw' }),
    svg('path', { d: path(smooth), class: 'smooth' }),
    vals.map((r) => svg('circle', { cx: x(r.step), cy: y(r.val_loss), r: 3, class: 'val' })),
  );
  put(box, 
    chart,
    h(
      'p',
      { class: 'legend' },
      h('span', { class: 'key raw' }, 'loss'),
      h('span', { class: 'key smooth' }, 'smoothed'),
      vals.length ? h('span', { class: 'key val' }, 'validation') : null,
    ),
  );
}
