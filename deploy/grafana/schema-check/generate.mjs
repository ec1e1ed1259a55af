// Turns a dashboard JSON file into a TypeScript module whose object literal is checked with
// `satisfies` against the types in schema.ts (Grafana's @grafana/schema types):
//
//   node generate.mjs <dashboard.json> <out.ts>     write out.ts and out.paths.json
//   node generate.mjs --explain <out.ts> <tsc.log>  print tsc's errors with the JSON path of each
//
// Why a generated literal and not `import dashboard from '...json'`: TypeScript widens JSON
// imports ("thresholds" becomes string, so no enum field can match) and never reports excess
// (unknown or misspelled) keys of an imported JSON value. A literal written out in a .ts file
// keeps its literal types and gets the excess-property check of `satisfies`.
//
// Every panel (also those inside collapsed rows), every Prometheus target, every annotation and
// every template variable gets its own `satisfies <Type>`, chosen from its `type` and its data
// source's type, so an unknown key is reported against the most specific type there is.

import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

// Panel plugin id -> type in schema.ts (that plugin's Options/FieldConfig from @grafana/schema).
const PANEL_TYPES = {
  barchart: 'BarChartPanel',
  bargauge: 'BarGaugePanel',
  gauge: 'GaugePanel',
  heatmap: 'HeatmapPanel',
  histogram: 'HistogramPanel',
  piechart: 'PieChartPanel',
  stat: 'StatPanel',
  'state-timeline': 'StateTimelinePanel',
  'status-history': 'StatusHistoryPanel',
  table: 'TablePanel',
  text: 'TextPanel',
  timeseries: 'TimeSeriesPanel',
};

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const list = (v) => (Array.isArray(v) ? v : []);
const dsType = (ref) => (isObject(ref) && typeof ref.type === 'string' ? ref.type : undefined);

export function generate(jsonPath, outPath, { quiet = false } = {}) {
  const dashboard = JSON.parse(readFileSync(jsonPath, 'utf8'));
  const types = new Map(); // object in the parsed JSON -> the type its literal must satisfy
  const notes = [];
  const counts = {};
  const tag = (obj, type) => {
    types.set(obj, type);
    counts[type] = (counts[type] ?? 0) + 1;
  };

  if (!isObject(dashboard)) throw new Error(`${jsonPath}: not a JSON object`);
  tag(dashboard, 'CheckedDashboard');

  const tagPanel = (panel, where) => {
    if (!isObject(panel)) return; // the dashboard-level check reports it
    if (panel.type === 'row') {
      tag(panel, 'Row');
      list(panel.panels).forEach((p, i) => tagPanel(p, `${where}.panels[${i}]`));
      return;
    }
    const type = Object.hasOwn(PANEL_TYPES, panel.type) ? PANEL_TYPES[panel.type] : undefined;
    if (!type) notes.push(`${where}: panel type ${JSON.stringify(panel.type)} has no typed options here; checked as GenericPanel`);
    tag(panel, type ?? 'GenericPanel');
    list(panel.targets).forEach((target, i) => {
      if (!isObject(target)) return;
      const ds = dsType(target.datasource) ?? dsType(panel.datasource);
      if (ds === 'prometheus') tag(target, 'PromQuery');
      else notes.push(`${where}.targets[${i}]: data source type ${JSON.stringify(ds)}; query fields not checked`);
    });
  };
  list(dashboard.panels).forEach((p, i) => tagPanel(p, `$.panels[${i}]`));

  list(dashboard.annotations?.list).forEach((a) => {
    if (isObject(a)) tag(a, dsType(a.datasource) === 'prometheus' ? 'PrometheusAnnotation' : 'GenericAnnotation');
  });
  list(dashboard.templating?.list).forEach((v) => {
    if (!isObject(v)) return;
    const prom = v.type === 'query' && dsType(v.datasource) === 'prometheus';
    tag(v, prom ? 'PrometheusQueryVariable' : 'GenericVariable');
    if (prom && isObject(v.query)) tag(v.query, 'PromVariableQuery');
  });

  // Emit one JSON member per line and remember each line's JSON path for --explain.
  const lines = [];
  const paths = [];
  const emit = (value, where, indent, head, tail) => {
    const type = isObject(value) ? types.get(value) : undefined;
    const [open, close] = type ? ['(', ` satisfies ${type})`] : ['', ''];
    if (value === null || typeof value !== 'object') {
      lines.push(`${indent}${head}${open}${JSON.stringify(value)}${close}${tail}`);
      paths.push(where);
      return;
    }
    const array = Array.isArray(value);
    const entries = array ? value.map((v, i) => [i, v]) : Object.entries(value);
    const [lb, rb] = array ? ['[', ']'] : ['{', '}'];
    if (entries.length === 0) {
      lines.push(`${indent}${head}${open}${lb}${rb}${close}${tail}`);
      paths.push(where);
      return;
    }
    if (type) lines.push(`${indent}// ${where}${describe(value)}`), paths.push(where);
    lines.push(`${indent}${head}${open}${lb}`);
    paths.push(where);
    for (const [key, v] of entries) {
      if (key === '__proto__') throw new Error(`${where}: a "__proto__" key cannot be checked`);
      const child = array ? `${where}[${key}]` : `${where}${/^[A-Za-z_$][\w$]*$/.test(key) ? `.${key}` : `[${JSON.stringify(key)}]`}`;
      emit(v, child, `${indent}  `, array ? '' : `${JSON.stringify(key)}: `, ',');
    }
    lines.push(`${indent}${rb}${close}${tail}`);
    paths.push(where);
  };
  const describe = (v) =>
    [v.type !== undefined && ` type=${JSON.stringify(v.type)}`, v.id !== undefined && ` id=${v.id}`,
     typeof v.title === 'string' && ` "${v.title.replace(/\s+/g, ' ').slice(0, 60)}"`,
     typeof v.name === 'string' && ` name=${JSON.stringify(v.name)}`]
      .filter(Boolean)
      .join('');

  const outDir = path.dirname(path.resolve(outPath));
  const rel = path.relative(outDir, path.resolve(jsonPath));
  let schema = path.relative(outDir, path.join(HERE, 'schema.js')).split(path.sep).join('/');
  if (!schema.startsWith('.')) schema = `./${schema}`;
  const imported = [...new Set(types.values())].sort();
  const header = [
    `// GENERATED by generate.mjs from ${rel}; do not edit (check.sh rewrites it).`,
    `import type { ${imported.join(', ')} } from '${schema}';`,
    '',
  ];
  emit(dashboard, '$', '', 'export const dashboard = ', ';');
  mkdirSync(path.dirname(outPath), { recursive: true });
  writeFileSync(outPath, [...header, ...lines, ''].join('\n'));
  writeFileSync(outPath.replace(/\.ts$/, '.paths.json'), JSON.stringify([...header.map(() => null), ...paths]));

  if (quiet) return;
  const summary = Object.entries(counts).map(([t, n]) => `${n} ${t}`).join(', ');
  console.log(`generated ${path.relative(process.cwd(), outPath)} (${lines.length} lines): ${summary}`);
  for (const note of notes) console.log(`note: ${note}`);
}

export function explain(outPath, logPath) {
  const paths = JSON.parse(readFileSync(outPath.replace(/\.ts$/, '.paths.json'), 'utf8'));
  const base = path.basename(outPath);
  for (const line of readFileSync(logPath, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    console.log(line);
    const m = /^(.*)\((\d+),(\d+)\): error TS\d+/.exec(line);
    if (m && path.basename(m[1]) === base && paths[Number(m[2]) - 1]) {
      console.log(`    at JSON path ${paths[Number(m[2]) - 1]}`);
    }
  }
}

const HERE = path.dirname(fileURLToPath(import.meta.url));

const args = process.argv.slice(2);
if (process.argv[1] && path.resolve(process.argv[1]) !== fileURLToPath(import.meta.url)) {
  // imported (selftest.mjs): no command line
} else if (args[0] === '--explain' && args.length === 3) explain(args[1], args[2]);
else if (args.length === 2 && !args[0].startsWith('-')) generate(args[0], args[1]);
else {
  console.error('usage: node generate.mjs <dashboard.json> <out.ts> | --explain <out.ts> <tsc.log>');
  process.exit(2);
}
