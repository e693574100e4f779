#!/usr/bin/env node
// Validates the custom resources in YAML files, offline, the way the API server would judge them:
// KEDA's (keda.sh/v1alpha1: ScaledJob, ScaledObject, TriggerAuthentication,
// ClusterTriggerAuthentication) and the Prometheus operator's (monitoring.coreos.com/v1:
// PodMonitor, ServiceMonitor, PrometheusRule).
//
//   node tests/deploy/validate-crds.mjs deploy/k8s/*.yaml deploy/k8s/alternatives/*.yaml
//
// Two checks per object:
//  1. schema: the model's own `.validate()` from @kubernetes-models/keda and
//     @kubernetes-models/prometheus-operator (types, required fields, enums; a ScaledJob's
//     jobTargetRef is checked as a batch/v1 JobSpec, pod template included);
//  2. unknown fields: those schemas accept any extra key, so `pollingIntervall: 5` passes them,
//     while `kubectl apply` (strict field validation) refuses it, or an older client lets the
//     API server drop it without a word. The field names are read from the models' own type
//     declarations (`"pollingInterval"?: number;` in ScaledJobSpec.d.ts …), following nested
//     types through their imports.
//
// Documents of other API groups are left to kubernetes-validate (tests/service/test_k8s_manifests.py).
// Prints `ok FILE KIND/NAME` per object, then `validated N custom objects in M files`; each
// problem goes to stderr as `FILE: KIND/NAME: PATH: MESSAGE`. Exit status: 0 all valid, 1 a
// problem found, 2 a file could not be read or parsed.

import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

import { parseAllDocuments } from "yaml";
import {
  ClusterTriggerAuthentication,
  ScaledJob,
  ScaledObject,
  TriggerAuthentication,
} from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { PodMonitor, PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

// apiVersion -> the models of its kinds, and where their declarations live.
const GROUPS = {
  "keda.sh/v1alpha1": {
    module: "@kubernetes-models/keda/keda.sh/v1alpha1",
    models: { ScaledJob, ScaledObject, TriggerAuthentication, ClusterTriggerAuthentication },
  },
  "monitoring.coreos.com/v1": {
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
    models: { PodMonitor, ServiceMonitor, PrometheusRule },
  },
};

// ---------------------------------------------------------------------------------------------
// field names from the type declarations

const declarations = new Map(); // .d.ts path -> { fields, imports, alias } | null

/** The .d.ts beside the module that `specifier` names, seen from the declaration file `fromPath`. */
function declarationPath(specifier, fromPath) {
  const url = specifier.startsWith(".")
    ? new URL(specifier, `file://${fromPath}`)
    : new URL(import.meta.resolve(specifier));
  return fileURLToPath(url).replace(/\.js$/, "") + ".d.ts";
}

/** The first exported interface of a generated declaration file: its fields and their types. */
function readDeclaration(path) {
  if (declarations.has(path)) return declarations.get(path);
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    declarations.set(path, null); // no declaration to compare against: accept whatever is there
    return null;
  }
  const imports = new Map();
  for (const [, names, from] of text.matchAll(/^import \{ ([^}]+) \} from "([^"]+)";$/gm)) {
    for (const name of names.split(",")) imports.set(name.trim(), from);
  }
  const lines = text.split("\n");
  const start = lines.findIndex((line) => /^export interface \w+( extends [^{]+)? \{$/.test(line));
  if (start < 0) {
    // `export type IAuthSecretTargetRef = IComGithub…AuthTargetRef;`: follow the alias, if any
    const alias = text.match(/^export type I\w+ = (I\w+);$/m);
    const entry = alias && imports.has(alias[1]) ? { alias: declarationPath(imports.get(alias[1]), path) } : null;
    declarations.set(path, entry);
    return entry;
  }
  const fields = new Map();
  for (let i = start + 1; i < lines.length && lines[i] !== "}"; i++) {
    const field = lines[i].match(/^ {4}"([^"]+)"\??: (.*)$/);
    if (!field) continue; // doc comments
    let type = field[2];
    if (type === "{") {
      // an inline map type: `{ [key: string]: string; }` over several lines
      const body = [];
      for (i++; i < lines.length && lines[i] !== "    };"; i++) body.push(lines[i].trim());
      type = `{ ${body.join(" ")} }`;
    } else {
      type = type.replace(/;$/, "");
    }
    fields.set(field[1], type);
  }
  const entry = { fields, imports, path };
  declarations.set(path, entry);
  return entry;
}

function isPlainObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

/** Reports every key of `value` that the declared type has no field for, at any depth. */
function findUnknownFields(value, type, owner, path, problems) {
  type = type.trim();
  let match;
  if ((match = type.match(/^Array<(.+)>$/))) {
    if (Array.isArray(value)) value.forEach((item, i) => findUnknownFields(item, match[1], owner, `${path}[${i}]`, problems));
  } else if ((match = type.match(/^\{ \[key: string\]: (.+); \}$/))) {
    if (isPlainObject(value)) {
      for (const [key, item] of Object.entries(value)) findUnknownFields(item, match[1], owner, `${path}.${key}`, problems);
    }
  } else if (/^I\w+$/.test(type) && owner.imports.has(type) && isPlainObject(value)) {
    checkObject(value, declarationPath(owner.imports.get(type), owner.path), path, problems);
  }
  // string, number, boolean, literal unions, quantities…: leaves, judged by the schema check
}

function checkObject(value, declaration, path, problems) {
  let decl = readDeclaration(declaration);
  while (decl && decl.alias) decl = readDeclaration(decl.alias);
  if (!decl) return;
  for (const [key, item] of Object.entries(value)) {
    const where = path ? `${path}.${key}` : key;
    if (!decl.fields.has(key)) {
      problems.push(`${where}: unknown field "${key}" (known here: ${[...decl.fields.keys()].join(", ")})`);
    } else {
      findUnknownFields(item, decl.fields.get(key), decl, where, problems);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// the files

function schemaProblems(model) {
  try {
    model.validate();
    return [];
  } catch (error) {
    const details = Array.isArray(error.errors) && error.errors.length
      ? error.errors.map((e) => `${(e.instancePath || "/").replace(/^\//, "").replaceAll("/", ".") || "(root)"}: ${e.message}`)
      : [error.message];
    return details;
  }
}

function validateFile(file) {
  let documents;
  try {
    documents = parseAllDocuments(readFileSync(file, "utf8"));
  } catch (error) {
    return { fatal: `${file}: cannot read: ${error.message}` };
  }
  const results = [];
  for (const [index, document] of documents.entries()) {
    if (document.errors.length) return { fatal: `${file}: document ${index + 1}: ${document.errors[0].message}` };
    const object = document.toJS();
    const group = isPlainObject(object) ? GROUPS[object.apiVersion] : undefined;
    if (!group) continue;
    const name = `${object.kind}/${object.metadata?.name ?? "(no name)"}`;
    const Model = group.models[object.kind];
    if (!Model) {
      results.push({ name, problems: [`kind: no model for ${object.apiVersion} ${object.kind}`] });
      continue;
    }
    const problems = schemaProblems(new Model(object));
    checkObject(object, declarationPath(`${group.module}/${object.kind}`, ""), "", problems);
    results.push({ name, problems });
  }
  return { results };
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate-crds.mjs FILE.yaml…");
  process.exit(2);
}
let objects = 0;
let failed = false;
for (const file of files) {
  const { fatal, results } = validateFile(file);
  if (fatal) {
    console.error(fatal);
    process.exit(2);
  }
  for (const { name, problems } of results) {
    objects++;
    if (problems.length === 0) {
      console.log(`ok ${file} ${name}`);
      continue;
    }
    failed = true;
    for (const problem of problems) console.error(`${file}: ${name}: ${problem}`);
  }
}
console.log(`validated ${objects} custom objects in ${files.length} files`);
process.exit(failed ? 1 : 0);
