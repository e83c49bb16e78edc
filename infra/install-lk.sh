#!/usr/bin/env bash
# Installs lk (livekit-cli) into .tools/bin for benchmarks/lk_compare.py (`lk perf agent-load-test`).
#
#   infra/install-lk.sh                  go install github.com/livekit/livekit-cli/v2/cmd/lk@$LK_VERSION
#   LK_SRC=/path/to/livekit-cli infra/install-lk.sh
#                                        build from a livekit-cli checkout you supply (at tag $LK_VERSION)
#
# Always exits 0: when lk cannot be had it prints one line saying why, and the benchmark
# reports the comparison as unavailable. Nothing of livekit-cli is kept in this repository.
#
# Why v2.16.3: the newest release whose `lk` builds with CGO_ENABLED=0 (from v2.16.4 on, lk
# links PortAudio and WebRTC APM through cgo for `lk console`) and that has
# `perf agent-load-test`. Its go.mod needs only module versions the Go module proxy serves.
# The proxy itself refuses github.com/livekit/livekit-cli/v2 (403 "not available") for every
# version tried, so `go install` fails there; with a checkout (LK_SRC), the build works.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.tools/bin"
LOGS="$PWD/.tools/logs"
LK_VERSION="${LK_VERSION:-v2.16.3}"
mkdir -p "$BIN" "$LOGS"
log="$LOGS/lk.log"

say() { echo "install-lk: $*" >&2; }

if [ -x "$BIN/lk" ] && "$BIN/lk" --version 2>/dev/null | grep -qF "${LK_VERSION#v}"; then
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  say "lk not installed: Go is not installed (lk is built from its Go module); the lk comparison will be unavailable"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ -n "${LK_SRC:-}" ]; then
  if [ ! -f "$LK_SRC/go.mod" ] || ! grep -q '^module github.com/livekit/livekit-cli/v2' "$LK_SRC/go.mod"; then
    say "lk not installed: LK_SRC=$LK_SRC is not a livekit-cli v2 checkout (no matching go.mod)"
    exit 0
  fi
  say "building lk from $LK_SRC (a few minutes the first time) ..."
  if (cd "$LK_SRC" && CGO_ENABLED=0 go build -o "$tmp/lk" ./cmd/lk) >"$log" 2>&1; then
    mv -f "$tmp/lk" "$BIN/lk"
    say "installed $("$BIN/lk" --version) into .tools/bin"
  else
    say "lk not installed: building $LK_SRC failed (see $log; versions from v2.16.4 on need cgo: check out $LK_VERSION)"
  fi
  exit 0
fi

say "building lk $LK_VERSION with go install (a few minutes the first time) ..."
if CGO_ENABLED=0 GOBIN="$tmp" go install "github.com/livekit/livekit-cli/v2/cmd/lk@$LK_VERSION" >"$log" 2>&1; then
  mv -f "$tmp/lk" "$BIN/lk"
  say "installed $("$BIN/lk" --version) into .tools/bin"
elif grep -q "403 Forbidden\|not available" "$log"; then
  say "lk not installed: the Go module proxy refuses github.com/livekit/livekit-cli/v2@$LK_VERSION (403); set LK_SRC to a livekit-cli checkout at $LK_VERSION to build it; the lk comparison will be unavailable"
else
  say "lk not installed: go install github.com/livekit/livekit-cli/v2/cmd/lk@$LK_VERSION failed: $(tail -n 1 "$log")"
fi
exit 0
