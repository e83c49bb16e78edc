#!/usr/bin/env bash
# CI gate: run crosstalk's simulated callers against your agent and fail the job on a failed
# scenario. Exit codes: 0 passed, 1 a scenario failed or regressed, 2 bad input, 3 crosstalk or
# the stack could not run it.
#
#   examples/ci/crosstalk-test.sh                  # against examples/target_agent
#   AGENT_CMD="python my_agent.py start" AGENT_NAME=my-agent SCENARIOS=my.yaml examples/ci/crosstalk-test.sh
#
# Needs the crosstalk stack (./ct up, or `crosstalk test` starts the local one) and, for the
# example agent, an OpenAI-compatible model (OPENAI_API_KEY, or OPENAI_BASE_URL).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
crosstalk=${CROSSTALK:-$root/.venv/bin/crosstalk}
out=${OUT_DIR:-$root/data/ci}
mkdir -p "$out"

exec "$crosstalk" test \
  --agent-name "${AGENT_NAME:-acme-support}" \
  --scenarios "${SCENARIOS:-$here/scenarios.yaml}" \
  -k "${TRIALS:-2}" \
  --agent-cmd "${AGENT_CMD:-$root/.venv/bin/python $root/examples/target_agent/agent.py start}" \
  --min-pass-rate "${MIN_PASS_RATE:-1.0}" \
  ${BASELINE:+--baseline "$BASELINE"} \
  --junit "$out/junit.xml" "$@"
