// Proves the check can fail: writes deliberately broken copies of the dashboard (one mistake
// each) under generated/selftest/, type-checks them all in one tsc run, and requires at least one
// error in every broken copy and none in an unmodified copy. The copies are temporary files
// (generated/ is git-ignored); the dashboard itself is not touched.
//
//   node selftest.mjs <dashboard.json>      (check.sh --self-test runs it after npm ci)

import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { generate } from './generate.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DIR = path.join(HERE, 'generated', 'selftest');

const panels = (d) => d.panels.flatMap((p) => [p, ...(p.panels ?? [])]);
const firstPanel = (d, type) => {
  const p = panels(d).find((q) => q.type === type);
  if (!p) throw new Error(`the dashboard has no ${type} panel to break`);
  return p;
};
const promAnnotation = (d) => d.annotations.list.find((a) => a.datasource?.type === 'prometheus');
const promVariable = (d) => d.templating.list.find((v) => v.type === 'query' && typeof v.query === 'object');

// name -> mutation (each introduces exactly one mistake)
const MUTATIONS = {
  'gridpos-h-is-a-string': (d) => { firstPanel(d, 'stat').gridPos.h = '8'; },
  'panel-key-misspelled': (d) => { const p = firstPanel(d, 'timeseries'); p.descripton = p.description; delete p.description; },
  'panel-type-missing': (d) => { delete firstPanel(d, 'table').type; },
  'row-collapsed-missing': (d) => { delete d.panels.find((p) => p.type === 'row').collapsed; },
  'target-legendformat-misspelled': (d) => { const t = firstPanel(d, 'timeseries').targets[0]; t.legendFormt = t.legendFormat; delete t.legendFormat; },
  'target-format-unknown': (d) => { firstPanel(d, 'stat').targets[0].format = 'timeseries'; },
  'target-expr-not-string': (d) => { firstPanel(d, 'stat').targets[0].expr = 42; },
  'color-mode-unknown': (d) => { firstPanel(d, 'stat').fieldConfig.defaults.color.mode = 'threshold'; },
  'threshold-value-string': (d) => { firstPanel(d, 'stat').fieldConfig.defaults.thresholds.steps[1].value = '1'; },
  'thresholds-mode-unknown': (d) => { firstPanel(d, 'stat').fieldConfig.defaults.thresholds.mode = 'absolut'; },
  'mapping-type-unknown': (d) => { firstPanel(d, 'state-timeline').fieldConfig.defaults.mappings[0].type = 'values'; },
  'stat-option-misspelled': (d) => { const o = firstPanel(d, 'stat').options; o.colourMode = o.colorMode; delete o.colorMode; },
  'stat-option-bad-enum': (d) => { firstPanel(d, 'stat').options.graphMode = 'sparkline'; },
  'stat-custom-fieldconfig': (d) => { firstPanel(d, 'stat').fieldConfig.defaults.custom = { lineWidth: 1 }; },
  'timeseries-custom-misspelled': (d) => { const c = firstPanel(d, 'timeseries').fieldConfig.defaults.custom; c.lineWdth = c.lineWidth; delete c.lineWidth; },
  'timeseries-legend-placement': (d) => { firstPanel(d, 'timeseries').options.legend.placement = 'left'; },
  'heatmap-option-misplaced': (d) => { firstPanel(d, 'heatmap').options.yBuckets = { mode: 'size' }; },
  'table-cellheight-unknown': (d) => { firstPanel(d, 'table').options.cellHeight = 'small'; },
  'transformation-options-missing': (d) => { delete firstPanel(d, 'table').transformations[0].options; },
  'graphtooltip-out-of-range': (d) => { d.graphTooltip = 7; },
  'dashboard-key-misspelled': (d) => { d.titel = d.title; delete d.title; },
  'schemaversion-missing': (d) => { delete d.schemaVersion; },
  'time-from-not-string': (d) => { d.time.from = 6; },
  'variable-hide-out-of-range': (d) => { d.templating.list[0].hide = 5; },
  'variable-type-unknown': (d) => { d.templating.list.find((v) => v.type === 'custom').type = 'list'; },
  'variable-query-misspelled': (d) => { const q = promVariable(d).query; q.qryTyp = q.qryType; delete q.qryType; },
  'annotation-key-misspelled': (d) => { const a = promAnnotation(d); a.iconColour = a.iconColor; delete a.iconColor; },
  'annotation-legacy-expr': (d) => { const a = promAnnotation(d); a.expr = a.target.expr; delete a.target; },
  'collapsed-row-panel-bad': (d) => {
    const row = d.panels.find((p) => p.type === 'row');
    const inner = structuredClone(firstPanel(d, 'stat'));
    inner.id = 9999;
    inner.gridPos.w = 'wide';
    row.collapsed = true;
    row.panels = [inner];
  },
};

const source = process.argv[2];
if (!source) {
  console.error('usage: node selftest.mjs <dashboard.json>');
  process.exit(2);
}
const original = JSON.parse(readFileSync(source, 'utf8'));
rmSync(DIR, { recursive: true, force: true });
mkdirSync(DIR, { recursive: true });

const cases = { unmodified: () => {}, ...MUTATIONS };
for (const [name, mutate] of Object.entries(cases)) {
  const copy = structuredClone(original);
  mutate(copy);
  writeFileSync(path.join(DIR, `${name}.json`), JSON.stringify(copy, null, 2));
  generate(path.join(DIR, `${name}.json`), path.join(DIR, `${name}.ts`), { quiet: true });
}
writeFileSync(
  path.join(DIR, 'tsconfig.json'),
  JSON.stringify({ extends: '../../tsconfig.json', include: ['../../schema.ts', './*.ts'] }, null, 2),
);

let log = '';
try {
  execFileSync(path.join(HERE, 'node_modules', '.bin', 'tsc'), ['--noEmit', '-p', DIR, '--pretty', 'false'], { encoding: 'utf8' });
} catch (e) {
  log = `${e.stdout ?? ''}${e.stderr ?? ''}`;
}
const errors = {};
for (const line of log.split('\n')) {
  const m = /([\w-]+)\.ts\(\d+,\d+\): error (TS\d+): (.*)$/.exec(line);
  if (m) (errors[m[1]] ??= []).push(`${m[2]}: ${m[3]}`);
}

let failed = 0;
for (const name of Object.keys(cases)) {
  const got = errors[name] ?? [];
  const ok = name === 'unmodified' ? got.length === 0 : got.length > 0;
  if (!ok) failed += 1;
  const first = got[0] ? `  ${got[0].slice(0, 150)}${got[0].length > 150 ? '...' : ''}` : '';
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name.padEnd(32)} ${String(got.length).padStart(2)} error(s)${first}`);
}
const total = Object.keys(cases).length;
console.log(
  failed
    ? `self-test FAILED: ${failed} of ${total} cases wrong (a broken copy passed, or the unmodified copy failed)`
    : `self-test passed: tsc rejected all ${total - 1} broken copies and accepted the unmodified one`,
);
process.exit(failed ? 1 : 0);
