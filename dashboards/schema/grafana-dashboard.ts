// The dashboard JSON as Grafana's own TypeScript types describe it (@grafana/schema, one version per
// check: dashboards/grafana_types.py maps `@grafana/schema` and `grafana-panel/*` onto it).
//
// Grafana's `Dashboard` types panel options and `fieldConfig.defaults.custom` as
// Record<string, unknown>; each panel plugin publishes its own `Options`/`FieldConfig`. So a panel is
// typed here by its `type`, with that plugin's types, and an unknown `type` is an error. The checked
// file is a generated object literal, so TypeScript's excess-property check rejects every key that
// the types do not declare, at any depth.
import type { Dashboard, FieldConfig, FieldConfigSource, Panel, RowPanel } from '@grafana/schema';
import type * as stat from 'grafana-panel/stat';
import type * as timeseries from 'grafana-panel/timeseries';

type IsAny<T> = 0 extends 1 & T ? true : false;

// JSON carries a TypeScript string enum's value ("absolute"), never the enum member: map each enum
// type to the union of its values. Everything else keeps its type (numeric enums accept their numbers).
export type Wire<T> =
  IsAny<T> extends true
    ? T
    : T extends string
      ? `${T}`
      : T extends readonly (infer U)[]
        ? Wire<U>[]
        : T extends object
          ? { [K in keyof T]: Wire<T[K]> }
          : T;

type Fields<Custom> = Omit<FieldConfigSource, 'defaults'> & {
  defaults: Omit<FieldConfig, 'custom'> & { custom?: Custom };
};

type PluginPanel<Type extends string, Options, Custom> = Omit<Panel, 'type' | 'options' | 'fieldConfig'> & {
  type: Type;
  options: Options;
  fieldConfig: Fields<Custom>;
};

// The panel plugins the generator uses; a new one must be added here with its types.
export type DashboardPanel =
  | PluginPanel<'timeseries', timeseries.Options, timeseries.FieldConfig>
  | PluginPanel<'stat', stat.Options, never> // the stat panel has no custom field config
  | RowPanel;

export type GrafanaDashboard = Wire<Omit<Dashboard, 'panels'> & { panels: DashboardPanel[] }>;
