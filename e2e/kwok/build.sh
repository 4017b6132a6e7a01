#!/usr/bin/env bash
# Builds kwok (sigs.k8s.io/kwok/cmd/kwok) at the version in ./VERSION into
# ${XDG_CACHE_HOME:-$HOME/.cache}/tally/kwok/<version>/bin/, and writes next to it stages.yaml: the "fast" node and
# pod Stages of that release (kwok does nothing without stages). kwok plays the kubelet of fake nodes: it marks the
# nodes it manages Ready and the pods bound to them Running and Ready, so tests see Ready pods without containers.
# Skips the build when both files for that version are already there. Fails (non-zero exit) when anything goes wrong;
# it never skips silently.
#
# kwok v0.8.0 is built against the k8s.io v0.36 libraries; client-go is supported one minor version either side of
# the API server, so it works with the v1.37 control plane of ../k8s.
#
# Usage: e2e/kwok/build.sh            build if needed, print the bin directory
#        e2e/kwok/build.sh --force    rebuild even when the binary exists
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

version="$(tr -d '[:space:]' < VERSION)"
if [[ ! "$version" =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "kwok/build.sh: VERSION must look like v0.8.0, got '$version'" >&2
  exit 1
fi

bin_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tally/kwok/$version/bin"
force=false
[[ "${1:-}" == "--force" ]] && force=true
stages="$bin_dir/../stages.yaml"
if ! $force && [[ -x "$bin_dir/kwok" && -s "$stages" ]]; then
  echo "kwok/build.sh: kwok $version already in $bin_dir" >&2
  echo "$bin_dir"
  exit 0
fi

export GOFLAGS=-mod=mod
export CGO_ENABLED=0

if ! grep -qx "require sigs.k8s.io/kwok $version" go.mod; then
  echo "kwok/build.sh: go.mod does not require sigs.k8s.io/kwok $version; update go.mod with VERSION" >&2
  exit 1
fi

mkdir -p "$bin_dir"
tmp_dir="$(mktemp -d "$bin_dir/.build.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT

echo "kwok/build.sh: building kwok $version into $bin_dir" >&2
start=$SECONDS
if ! go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$version" \
    -o "$tmp_dir/kwok" sigs.k8s.io/kwok/cmd/kwok; then
  echo "kwok/build.sh: go build of kwok $version FAILED (see the errors above)" >&2
  exit 1
fi
"$tmp_dir/kwok" --version >&2

# The release's own stage manifests, from the module source go just downloaded.
if ! module_dir="$(go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)" || [[ ! -d "$module_dir/kustomize/stage" ]]; then
  echo "kwok/build.sh: cannot find the kustomize/stage directory of sigs.k8s.io/kwok $version" >&2
  exit 1
fi
stage_files=("$module_dir"/kustomize/stage/node/fast/node-initialize.yaml
             "$module_dir"/kustomize/stage/pod/fast/pod-ready.yaml
             "$module_dir"/kustomize/stage/pod/fast/pod-complete.yaml
             "$module_dir"/kustomize/stage/pod/fast/pod-delete.yaml)
for f in "${stage_files[@]}"; do
  [[ -f "$f" ]] || { echo "kwok/build.sh: $f is missing; the stage layout of kwok changed, update this script" >&2; exit 1; }
  echo "---"
  cat "$f"
done > "$tmp_dir/stages.yaml"

mv -f "$tmp_dir/stages.yaml" "$stages"
mv -f "$tmp_dir/kwok" "$bin_dir/kwok"
echo "kwok/build.sh: built in $((SECONDS - start))s" >&2
echo "$bin_dir"
