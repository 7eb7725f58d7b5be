#!/bin/bash
# MTP head training on a multi-host Cloud TPU VM slice (see docs/cluster.md). Run it on every
# worker at once, from your workstation:
#
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#       --command='cd ~/gptk-jax && CONFIG=configs/lstm_llama3_2_1b_wmt14.py \
#                  WORKDIR=/mnt/shared/runs/lstm bash docs/cluster/tpu_vm.sh'
#
# Extra arguments go to `python -m gptk_jax.train` (config overrides). Every worker needs the
# repository (with .venv, the converted trunk of the config and ../shared/data) at the same path,
# and WORKDIR must be one shared file system mounted on every worker (Filestore NFS, or a GCS
# bucket through gcsfuse): checkpoints are written by all workers together.
#
# Multi-host: --distributed=auto makes gptk_jax/train.py call jax.distributed.initialize() with
# no arguments, which reads the slice's metadata itself (coordinator, process count and index).
# Single-slice; multislice adds JAX's MEGASCALE_* settings.
set -euo pipefail

CONFIG=${CONFIG:-configs/lstm_llama3_2_1b_wmt14.py}
WORKDIR=${WORKDIR:?set WORKDIR to a folder on a file system shared by every worker}
PY=${PY:-.venv/bin/python}

echo "worker $(hostname), config $CONFIG"

# JAX_PLATFORMS=tpu: fail at once rather than fall back to CPU when the TPU is busy.
# The feature cache: each worker builds its share and reads every share, so it lives on the
# shared file system too (node-local disk works, but then every worker builds all of it).
FEATURE_CACHE=${FEATURE_CACHE:-$WORKDIR/feature_cache}
exec env JAX_PLATFORMS=tpu "$PY" -m gptk_jax.train --config "$CONFIG" --workdir "$WORKDIR" \
  --distributed=auto --noprogress --config.features.cache_dir="$FEATURE_CACHE" "$@"
