#!/usr/bin/env bash
# Builds CoreDNS, the real node's cluster DNS, from the github.com/coredns/coredns Go module at the version required
# in ./go.mod, with only the plugins ./main.go links, into ${XDG_CACHE_HOME:-$HOME/.cache}/tally/coredns/<version>/bin.
# Skips the build when that binary is already there. Fails (non-zero exit) when anything goes wrong; it never skips
# silently.
#
# Usage: e2e/coredns/build.sh            build if needed, print the path of the coredns binary
#        e2e/coredns/build.sh --force    rebuild even when the binary exists
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

version="$(sed -n -E 's#^[[:space:]]*(require[[:space:]]+)?github\.com/coredns/coredns[[:space:]]+(v1\.[0-9]+\.[0-9]+)([[:space:]].*)?$#\2#p' go.mod)"
if [[ ! "$version" =~ ^v1\.[0-9]+\.[0-9]+$ ]]; then
  echo "build.sh: $here/go.mod must require github.com/coredns/coredns at a release like v1.15.0, found '$version'" >&2
  exit 1
fi

bin_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tally/coredns/$version/bin"
force=false
[[ "${1:-}" == "--force" ]] && force=true
if ! $force && [[ -x "$bin_dir/coredns" ]]; then
  echo "build.sh: coredns $version already in $bin_dir" >&2
  echo "$bin_dir/coredns"
  exit 0
fi

# go.sum is checked in: refuse to change it during a build (run `go mod tidy` here to move to another release).
export GOFLAGS=-mod=readonly
export CGO_ENABLED=0

mkdir -p "$bin_dir"
tmp_dir="$(mktemp -d "$bin_dir/.build.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT

echo "build.sh: building coredns $version into $bin_dir (a cold build takes a few minutes)" >&2
start=$SECONDS
if ! go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$version" -o "$tmp_dir/coredns" .; then
  echo "build.sh: go build of coredns $version FAILED (see the errors above)" >&2
  exit 1
fi
"$tmp_dir/coredns" -plugins | grep -qw 'kubernetes' || {
  echo "build.sh: the built coredns lacks the kubernetes plugin" >&2
  exit 1
}
mv -f "$tmp_dir/coredns" "$bin_dir/coredns"
echo "build.sh: built coredns $version in $((SECONDS - start))s" >&2
echo "$bin_dir/coredns"
