#!/usr/bin/env bash
# Builds promtool from the github.com/prometheus/prometheus Go module at the version ./go.mod requires, into
# ${XDG_CACHE_HOME:-$HOME/.cache}/tally/promtool/<version>/bin/promtool, for `promtool check rules` and
# `promtool test rules` on the chart's alerts. Skips the build when that binary exists; fails (non-zero exit) on any
# error, never skips silently. ./go.sum pins every dependency.
#
# Usage: e2e/promtool/build.sh            build if needed, print the path of the promtool binary
#        e2e/promtool/build.sh --force    rebuild even when the binary exists
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

version="$(sed -n -E 's#^[[:space:]]*(require[[:space:]]+)?github\.com/prometheus/prometheus[[:space:]]+(v0\.[0-9]+\.[0-9]+)([[:space:]].*)?$#\2#p' go.mod)"
if [[ ! "$version" =~ ^v0\.[0-9]+\.[0-9]+$ ]]; then
  echo "build.sh: $here/go.mod must require github.com/prometheus/prometheus at a release like v0.316.0, found '$version'" >&2
  exit 1
fi

bin_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tally/promtool/$version/bin"
if [[ "${1:-}" != "--force" && -x "$bin_dir/promtool" ]]; then
  echo "build.sh: promtool $version already in $bin_dir" >&2
  echo "$bin_dir/promtool"
  exit 0
fi

export GOFLAGS=-mod=readonly
export CGO_ENABLED=0
mkdir -p "$bin_dir"
tmp_dir="$(mktemp -d "$bin_dir/.build.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT

echo "build.sh: building promtool ($version) into $bin_dir (a cold build takes a few minutes)" >&2
start=$SECONDS
if ! go build -trimpath -ldflags "-s -w" -o "$tmp_dir/promtool" github.com/prometheus/prometheus/cmd/promtool; then
  echo "build.sh: go build of promtool $version FAILED (see the errors above)" >&2
  exit 1
fi
if ! "$tmp_dir/promtool" --help > /dev/null 2>&1; then
  echo "build.sh: the built promtool does not run" >&2
  exit 1
fi
mv -f "$tmp_dir/promtool" "$bin_dir/promtool"
echo "build.sh: built promtool $version in $((SECONDS - start))s" >&2
echo "$bin_dir/promtool"
