#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages crosstalk runs on, when they are missing:
#   espeak-ng      offline speech synthesis (the only offline voice here that speaks Hindi)
#   openssl        certificates of the secured NATS profile (infra/stack/secure.py)
# and with --dev (./ct test, bench, chaos: what only the tests and the profiles use):
#   chromium       headless rendering of `crosstalk report` pages in the tests
#   redis-server   the shared state of a multi-node LiveKit (the two-node profile)
#   fonts-noto-core  Devanagari (and other scripts) for chromium's rendering of Hindi reports
# Idempotent: does nothing when every command is already on PATH. Needs root or sudo for
# apt-get; otherwise fails with one line naming the packages to install by hand.
# CROSSTALK_SKIP_SYSTEM_PACKAGES=1 skips this step (you provide them some other way).
set -euo pipefail
[ "${CROSSTALK_SKIP_SYSTEM_PACKAGES:-0}" = "1" ] && exit 0

dev=0
[ "${1:-}" = "--dev" ] && dev=1
declare -A pkg_of=([espeak-ng]=espeak-ng [openssl]=openssl)
[ $dev = 1 ] && pkg_of+=([chromium]=chromium [redis-server]=redis-server)
missing=()
for cmd in "${!pkg_of[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_of[$cmd]}")
done
# a font that covers Hindi (fontconfig's view, as chromium sees fonts)
if [ $dev = 1 ] && ! { command -v fc-list >/dev/null 2>&1 && fc-list :lang=hi 2>/dev/null | grep -q .; }; then
  missing+=(fonts-noto-core)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

die() { echo "crosstalk: $*" >&2; exit 1; }
command -v apt-get >/dev/null 2>&1 \
  || die "missing system packages: ${missing[*]} (no apt-get here: install them with your package manager, or set CROSSTALK_SKIP_SYSTEM_PACKAGES=1)"
SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 \
    || die "missing system packages: ${missing[*]}: run 'sudo apt-get install ${missing[*]}' (root is needed), then ./ct again"
  SUDO=(sudo -n)
fi
mkdir -p .tools/logs
log=.tools/logs/apt.log
echo "installing system packages: ${missing[*]} (apt-get) ..." >&2
export DEBIAN_FRONTEND=noninteractive
{ "${SUDO[@]}" apt-get update -q && "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1 \
  || die "apt-get install ${missing[*]} failed (see $log): install them by hand, then ./ct again"
