# crosstalk recipes. `./ct <recipe>` sets everything up first (.venv, pinned tools)
# and then runs `just <recipe>`; `./ct` alone lists them.
#
# Ports, dirs and external servers come from the environment (infra/stack/config.py; the
# defaults the services share come from shared/config.py and shared/metrics.py):
#   CROSSTALK_RUN_DIR (./run)  CROSSTALK_DATA_DIR (./data)  CROSSTALK_HOST (127.0.0.1)
#   CROSSTALK_NATS_PORT (4222) CROSSTALK_NATS_MONITOR_PORT (8222)
#   CROSSTALK_LIVEKIT_PORT (7880) CROSSTALK_LIVEKIT_TCP_PORT (7881)
#   CROSSTALK_LIVEKIT_UDP_PORTS (50000-50200) CROSSTALK_LIVEKIT_METRICS_PORT (6789)
#   CROSSTALK_MODEL_PORT (8088) CROSSTALK_SPEECH_PORT (8090) CROSSTALK_<NAME>_METRICS_PORT (dispatcher 9101,
#   allocator 9102, sink 9103, model 9104, worker 9105, speech 9106, webhook 9120) CROSSTALK_PROMETHEUS_PORT (9090) CROSSTALK_GRAFANA_PORT (3000)
#   CROSSTALK_WEBHOOK_PORT (8089: livekit-server's webhooks -> services/webhook; `up` renders run/livekit.yaml)
#   CROSSTALK_SERVICES (comma list: start only these; e.g. worker on a second machine)
#   NATS_URL / LIVEKIT_URL set: use that server and start none.

set shell := ["bash", "-euo", "pipefail", "-c"]

root := justfile_directory()
export PATH := root / ".venv/bin" + ":" + root / ".tools/bin" + ":" + env_var("PATH")
python := quote(root / ".venv/bin/python")
stack := python + " -m infra.stack"

# list the recipes
default:
    @just --list --unsorted

# start nats, livekit, every crosstalk process (and Prometheus/Grafana if installed) under supervisord; wait until healthy
[no-exit-message]
up:
    @{{ stack }} up

# stop everything `just up` started, and nothing else
[no-exit-message]
down:
    @{{ stack }} down

# what runs where, and whether it is healthy
[no-exit-message]
status:
    @{{ stack }} status

# tail the logs: `just logs` (all) or `just logs worker`; add --no-follow / -n 200
[no-exit-message, positional-arguments]
logs *args:
    @{{ stack }} logs "$@"

# prove the running stack healthy: JetStream round-trip, LiveKit room create/list
[no-exit-message]
check:
    @{{ stack }} check

# publish batch.start with the crosstalk CLI: `just batch 10 5` (conversations, concurrency), `just batch 20 10 scenario=hi-account-help --follow`
[no-exit-message, positional-arguments]
batch *args:
    @{{ stack }} batch "$@"

# bring the stack up, prove it healthy, and run a batch on the embedded defaults
[no-exit-message]
demo:
    @{{ stack }} demo

# the whole test suite (arguments go to pytest: `just test tests/unit -x`)
[no-exit-message, positional-arguments]
test *args:
    @{{ python }} -m pytest -q "$@"

# benchmarks: every benchmarks/bench_*.py in turn (arguments go to each)
[no-exit-message, positional-arguments]
bench *args:
    #!/usr/bin/env bash
    set -euo pipefail
    # the project and tests/ (the `support` helpers, the e2e stack), as pytest's pythonpath
    export PYTHONPATH={{ quote(root) }}:{{ quote(root / "tests") }}
    shopt -s nullglob
    files=(benchmarks/bench_*.py)
    [ ${#files[@]} -gt 0 ] || { echo "crosstalk: no benchmarks/bench_*.py yet" >&2; exit 1; }
    for f in "${files[@]}"; do echo "== $f"; {{ python }} "$f" "$@"; done

# ruff on everything, mypy on shared/
[no-exit-message]
lint:
    #!/usr/bin/env bash
    rc=0
    ruff check . || rc=1
    mypy shared || rc=1
    exit $rc

# promtool: the Prometheus config, alert rules and their unit tests
[no-exit-message]
promcheck:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v promtool >/dev/null || { echo "crosstalk: promtool not found: ./ct tools builds it into .tools/bin" >&2; exit 1; }
    cd infra/prometheus
    promtool check config prometheus.yml
    if [ -f rules_test.yml ]; then promtool test rules rules_test.yml; fi

# build the pinned Go tools into .tools/bin (livekit-server, nats, prometheus, promtool); `./ct` does this for you
[no-exit-message]
tools:
    @infra/install-tools.sh
