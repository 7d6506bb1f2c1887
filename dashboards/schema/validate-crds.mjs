// Validate prometheus-operator resources with @kubernetes-models/prometheus-operator's JSON-schema
// validators (generated from prometheus-operator's API types). Input on stdin: a JSON array of
// {"source": "file.yaml", "resource": {...}}. One line per resource; exit status 1 if any is invalid.
// Unknown fields are not this validator's job (its schemas allow them): dashboards/kubernetes_schema.py
// type-checks the same resources against the package's exact TypeScript interfaces for that.
import { readFileSync } from "node:fs";
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = { "monitoring.coreos.com/v1": v1 };
let failed = 0;
for (const { source, resource } of JSON.parse(readFileSync(0, "utf8"))) {
  const name = `${resource.kind}/${resource.metadata?.name}`;
  const Model = models[resource.apiVersion]?.[resource.kind];
  if (Model === undefined) {
    console.log(`${source}: ${name}: no model for ${resource.apiVersion} ${resource.kind}`);
    failed += 1;
    continue;
  }
  try {
    new Model(resource).validate();
    console.log(`${source}: ${name}: valid`);
  } catch (error) {
    console.log(`${source}: ${name}: ${error.message.replaceAll("\n", "; ")}`);
    failed += 1;
  }
}
process.exitCode = failed ? 1 : 0;
