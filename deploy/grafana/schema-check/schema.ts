// The types the generated dashboard literal is checked against (`satisfies`, see generate.mjs).
//
// Everything structural comes from Grafana's published schema, @grafana/schema (version pinned
// in package.json): the dashboard, panel, row, variable, annotation, field-config, threshold and
// mapping types (the "v1" dashboard JSON model, generated from Grafana's CUE kinds) and, per panel
// plugin, its Options and FieldConfig (panelcfg) types. This file only adapts them to JSON:
//
// - Strict<T>: TypeScript enums in the schema (FieldColorModeId, ThresholdsMode, BigValueColorMode,
//   ...) become the union of their values, so a JSON string such as "thresholds" is accepted
//   and "threshold" is not. Numeric enums (graphTooltip, variable hide/refresh/sort) stay as they
//   are: a numeric literal is accepted only if it is one of the enum's values.
// - Panel options and fieldConfig.defaults.custom are checked against the plugin's own types but
//   every key is optional (DeepPartial): Grafana fills omitted options with the plugin's defaults
//   when the panel loads, so only unknown keys and wrong types are errors there.
// - A few fields that Grafana really reads but @grafana/schema does not declare are added here,
//   each with the Grafana source that reads it (LOCAL ADDITIONS below). In Grafana's CUE these
//   objects are open ("..."), which the generated TypeScript types lose.

import type {
  AnnotationQuery,
  DataQuery,
  DataSourceRef,
  Dashboard,
  FieldConfig,
  FieldConfigSource,
  Panel,
  RowPanel,
  VariableModel,
} from '@grafana/schema';
import type * as BarChart from '@grafana/schema/dist/esm/raw/composable/barchart/panelcfg/x/BarChartPanelCfg_types.gen';
import type * as BarGauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as Gauge from '@grafana/schema/dist/esm/raw/composable/gauge/panelcfg/x/GaugePanelCfg_types.gen';
import type * as Heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen';
import type * as Histogram from '@grafana/schema/dist/esm/raw/composable/histogram/panelcfg/x/HistogramPanelCfg_types.gen';
import type * as PieChart from '@grafana/schema/dist/esm/raw/composable/piechart/panelcfg/x/PieChartPanelCfg_types.gen';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as StateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as StatusHistory from '@grafana/schema/dist/esm/raw/composable/statushistory/panelcfg/x/StatusHistoryPanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as Text from '@grafana/schema/dist/esm/raw/composable/text/panelcfg/x/TextPanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

// ------------------------------------------------------------------------------------- helpers

/** Enums → their literal values, recursively; everything else unchanged. */
export type Strict<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<Strict<U>>
      : T extends object
        ? { [K in keyof T]: Strict<T[K]> }
        : T;

/** Every key optional, recursively (panel options: Grafana fills in the plugin's defaults). */
export type DeepPartial<T> = T extends ReadonlyArray<infer U>
  ? Array<DeepPartial<U>>
  : T extends object
    ? { [K in keyof T]?: DeepPartial<T[K]> }
    : T;

/** One flat object type (keeps excess-property checks simple and error messages short). */
type Flat<T> = { [K in keyof T]: T[K] } & {};

type Ref = Strict<DataSourceRef>;

// ------------------------------------------------------------------------------- LOCAL ADDITIONS

/**
 * A Prometheus query (panel target, annotation target). @grafana/schema ships no Prometheus
 * query type; this is Grafana's generated one (packages/grafana-prometheus/src/dataquery.gen.ts,
 * interface Prometheus extends common.DataQuery) plus `interval` ("Min step", PromQuery in
 * packages/grafana-prometheus/src/types.ts). DataQuery (refId, hide, queryType, datasource)
 * comes from @grafana/schema.
 */
export type PromQuery = Flat<
  Strict<Omit<DataQuery, 'datasource'>> & {
    datasource?: Ref | null;
    editorMode?: 'builder' | 'code';
    exemplar?: boolean;
    expr: string;
    format?: 'time_series' | 'table' | 'heatmap';
    instant?: boolean;
    /** @deprecated in Grafana; still accepted. */
    intervalFactor?: number;
    legendFormat?: string;
    legendUrlFormat?: string;
    range?: boolean;
    interval?: string;
  }
>;

/**
 * The object form of a Prometheus query variable's `query` (PromVariableQuery in
 * packages/grafana-prometheus/src/types.ts; qryType: 0 label names, 1 label values,
 * 2 metric names, 3 query result, 4 series query, 5 classic query).
 */
export type PromVariableQuery = Flat<
  Strict<Omit<DataQuery, 'datasource'>> & {
    query?: string;
    expr?: string;
    qryType?: 0 | 1 | 2 | 3 | 4 | 5;
    label?: string;
    metric?: string;
    varQuery?: string;
    seriesQuery?: string;
    labelFilters?: Array<{ label: string; op: string; value: string }>;
    match?: string;
    classicQuery?: string;
  }
>;

// ---------------------------------------------------------------------------- annotations

type AnnotationBase = Omit<Strict<AnnotationQuery>, 'target' | 'datasource'> & { datasource?: Ref | null };

/** An annotation of any other data source: the schema's fields; its target is the data
 * source's own query, loosely typed as in the schema's CUE ("datasource will stick their raw
 * DataQuery here"). */
export type GenericAnnotation = Flat<AnnotationBase & { target?: Record<string, unknown> }>;

/**
 * A Prometheus annotation. Its query lives in `target` (Grafana moves legacy top-level
 * `expr`/`step` there: prepareAnnotation in packages/grafana-prometheus/src/annotations.ts);
 * titleFormat, textFormat, tagKeys and useValueForTime stay top-level (processEvents there and
 * the annotation editor read them from the annotation itself).
 */
export type PrometheusAnnotation = Flat<
  AnnotationBase & {
    target?: PromQuery;
    titleFormat?: string;
    textFormat?: string;
    tagKeys?: string;
    useValueForTime?: boolean;
  }
>;

// ------------------------------------------------------------------------------ variables

type VariableBase = Omit<Strict<VariableModel>, 'datasource' | 'query'> & { datasource?: Ref | null };

/** Any template variable: the schema's VariableModel; `query` is a string or any object. */
export type GenericVariable = Flat<VariableBase & { query?: string | Record<string, unknown> }>;

/**
 * A Prometheus query variable. `definition` is the query text Grafana shows in the variable
 * list and saves with every query variable (QueryVariableModel in grafana-data's
 * templateVars.ts); the schema does not declare it.
 */
export type PrometheusQueryVariable = Flat<
  VariableBase & { type: 'query'; query?: string | PromVariableQuery; definition?: string }
>;

// --------------------------------------------------------------------------------- panels

type StrictFieldConfig<Custom> = Flat<
  Omit<Strict<FieldConfig>, 'custom'> & { custom?: DeepPartial<Strict<Custom>> }
>;
type StrictFieldConfigSource<Custom> = Flat<
  Omit<Strict<FieldConfigSource>, 'defaults'> & { defaults: StrictFieldConfig<Custom> }
>;

type PanelCommon = Omit<Strict<Panel>, 'type' | 'options' | 'fieldConfig' | 'targets' | 'datasource'> & {
  datasource?: Ref | null;
  /** Each Prometheus target is also checked on its own against PromQuery. */
  targets?: Array<Record<string, unknown>>;
};

/** A panel of plugin `Type`, options and custom field config typed by that plugin's schema. */
export type TypedPanel<Type extends string, Options, Custom> = Flat<
  PanelCommon & {
    type: Type;
    options?: DeepPartial<Strict<Options>>;
    fieldConfig?: StrictFieldConfigSource<Custom>;
  }
>;

/** A plugin without custom field config: any key under fieldConfig.defaults.custom is an error. */
type NoCustom = Record<string, never>;

export type BarChartPanel = TypedPanel<'barchart', BarChart.Options, BarChart.FieldConfig>;
export type BarGaugePanel = TypedPanel<'bargauge', BarGauge.Options, NoCustom>;
export type GaugePanel = TypedPanel<'gauge', Gauge.Options, NoCustom>;
export type HeatmapPanel = TypedPanel<'heatmap', Heatmap.Options, Heatmap.FieldConfig>;
export type HistogramPanel = TypedPanel<'histogram', Histogram.Options, Histogram.FieldConfig>;
export type PieChartPanel = TypedPanel<'piechart', PieChart.Options, PieChart.FieldConfig>;
export type StatPanel = TypedPanel<'stat', Stat.Options, NoCustom>;
export type StateTimelinePanel = TypedPanel<'state-timeline', StateTimeline.Options, StateTimeline.FieldConfig>;
export type StatusHistoryPanel = TypedPanel<'status-history', StatusHistory.Options, StatusHistory.FieldConfig>;
export type TablePanel = TypedPanel<'table', Table.Options, Table.FieldConfig>;
export type TextPanel = TypedPanel<'text', Text.Options, NoCustom>;
export type TimeSeriesPanel = TypedPanel<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>;

/** A panel of a plugin not listed above: options and custom field config loosely typed. */
export type GenericPanel = TypedPanel<string, Record<string, unknown>, Record<string, unknown>>;

/** A row. Its `panels` (filled only while collapsed) are each checked as panels themselves. */
export type Row = Flat<
  Omit<Strict<RowPanel>, 'panels' | 'datasource'> & { datasource?: Ref | null; panels: Array<GenericPanel> }
>;

// ------------------------------------------------------------------------------ dashboard

/**
 * The dashboard. Panels, variables and annotations are each checked against their specific
 * type where they appear in the generated literal; here they are checked again as the generic
 * schema types.
 */
export type CheckedDashboard = Flat<
  Omit<Strict<Dashboard>, 'panels' | 'annotations' | 'templating'> & {
    panels?: Array<GenericPanel | Row>;
    annotations?: { list?: Array<GenericAnnotation | PrometheusAnnotation> };
    templating?: { list?: Array<GenericVariable | PrometheusQueryVariable> };
  }
>;
