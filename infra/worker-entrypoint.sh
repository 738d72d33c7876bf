#!/usr/bin/env bash
# Start a Prefect worker for the shrinkfleet work pool, after making sure that
#   - the Prefect API answers (the server may still be starting),
#   - the work pool exists (process type: a flow run is a subprocess of this worker),
#   - the `gpu` tag concurrency limit equals the GPU slots (training tasks carry the tag, so
#     no more of them run at once than there are GPUs).
# Settings, all from the environment:
#   PREFECT_API_URL       the Prefect server's API (required)
#   SHRINKFLEET_POOL      work pool name (default: shrinkfleet)
#   GPU_SLOTS             training tasks at once across the pool (default: GPUs visible here,
#                         1 when there is none); set it to the total over all GPU workers
set -euo pipefail

: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server API, e.g. http://prefect-server:4200/api}"
pool="${SHRINKFLEET_POOL:-shrinkfleet}"

for _ in $(seq 1 60); do
    curl -fsS "${PREFECT_API_URL%/}/health" >/dev/null 2>&1 && break
    echo "waiting for the Prefect API at ${PREFECT_API_URL} ..."
    sleep 2
done
curl -fsS "${PREFECT_API_URL%/}/health" >/dev/null

if [[ -z "${GPU_SLOTS:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        GPU_SLOTS="$(nvidia-smi -L | grep -c '^GPU' || true)"
    fi
    GPU_SLOTS="${GPU_SLOTS:-1}"
    [[ "${GPU_SLOTS}" -ge 1 ]] || GPU_SLOTS=1
fi

prefect work-pool inspect "${pool}" >/dev/null 2>&1 || prefect work-pool create "${pool}" --type process
# Tag limits are global to the server: with several GPU workers, GPU_SLOTS is their total.
prefect --no-prompt concurrency-limit delete gpu >/dev/null 2>&1 || true
prefect concurrency-limit create gpu "${GPU_SLOTS}"
echo "pool ${pool}: at most ${GPU_SLOTS} training task(s) at once (tag gpu)"

exec prefect worker start --pool "${pool}" --type process "$@"
