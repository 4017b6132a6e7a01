#!/usr/bin/env bash
# Builds the Helm CLI from the helm.sh/helm/v3 Go module at the version required in ./go.mod, into
# ${XDG_CACHE_HOME:-$HOME/.cache}/tally/helm/<version>/bin/helm. Skips the build when that binary is already there.
# Fails (non-zero exit) when anything goes wrong; it never skips silently.
#
# ./go.mod names the CLI as a `tool` and ./go.sum pins every dependency, so the build is reproducible and offline once
# the module cache is warm. The version stamps (`helm version`, and the Kubernetes version `helm lint` and
# `helm template` assume) are set with -ldflags exactly as Helm's own Makefile sets them.
#
# Usage: e2e/helm/build.sh            build if needed, print the path of the helm binary
#        e2e/helm/build.sh --force    rebuild even when the binary exists
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

version="$(sed -n -E 's#^[[:space:]]*(require[[:space:]]+)?helm\.sh/helm/v3[[:space:]]+(v3\.[0-9]+\.[0-9]+)([[:space:]].*)?$#\2#p' go.mod)"
if [[ ! "$version" =~ ^v3\.[0-9]+\.[0-9]+$ ]]; then
  echo "build.sh: $here/go.mod must require helm.sh/helm/v3 at a release like v3.22.0, found '$version'" >&2
  exit 1
fi

bin_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tally/helm/$version/bin"
force=false
[[ "${1:-}" == "--force" ]] && force=true

if ! $force && [[ -x "$bin_dir/helm" ]]; then
  echo "build.sh: helm $version already in $bin_dir" >&2
  echo "$bin_dir/helm"
  exit 0
fi

# go.sum is checked in: refuse to change it during a build (run `go mod tidy` here to move to another release).
export GOFLAGS=-mod=readonly
# A static binary, like Helm's release builds.
export CGO_ENABLED=0

# The Kubernetes version Helm assumes when it renders .Capabilities and lints, derived from the client-go it is built
# with (Helm's Makefile: major = 0 + 1, minor as is).
if ! client_go="$(go list -m -f '{{.Version}}' k8s.io/client-go)"; then
  echo "build.sh: cannot resolve k8s.io/client-go from $here/go.mod (see the error above)" >&2
  exit 1
fi
if [[ ! "$client_go" =~ ^v0\.([0-9]+)\.[0-9]+ ]]; then
  echo "build.sh: unexpected k8s.io/client-go version '$client_go' in $here/go.mod" >&2
  exit 1
fi
k8s_minor="${BASH_REMATCH[1]}"

ldflags="-s -w"
ldflags+=" -X helm.sh/helm/v3/internal/version.version=$version"
ldflags+=" -X helm.sh/helm/v3/internal/version.metadata="
ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done

mkdir -p "$bin_dir"
tmp_dir="$(mktemp -d "$bin_dir/.build.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT

echo "build.sh: building helm $version into $bin_dir (a cold build takes a few minutes)" >&2
start=$SECONDS
if ! go build -trimpath -ldflags "$ldflags" -o "$tmp_dir/helm" helm.sh/helm/v3/cmd/helm; then
  echo "build.sh: go build of helm $version FAILED (see the errors above)" >&2
  exit 1
fi
if ! reported="$("$tmp_dir/helm" version --template '{{.Version}}')" || [[ "$reported" != "$version" ]]; then
  echo "build.sh: the built helm reports version '${reported:-?}', expected $version" >&2
  exit 1
fi
# rename(2) within one directory is atomic: a concurrent reader sees the old binary or the new one, never half.
mv -f "$tmp_dir/helm" "$bin_dir/helm"
echo "build.sh: built helm $version in $((SECONDS - start))s" >&2
echo "$bin_dir/helm"
