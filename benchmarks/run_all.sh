#!/usr/bin/env bash
# Every benchmark of the repo, one after the other (hours on two cores; never part of CI).
# Results land in benchmarks/results/ (Markdown) and bench-out/ (raw files). Run from the repo
# root with the project's venv active; the namespace-host runs need root.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -m bench -q                            # heavy tests (full provision + up)
python benchmarks/kernel_gflops.py                      # kernel GFLOP/s vs numpy matmul, SGDClassifier
python benchmarks/algorithms.py                         # the paper's Table 1 on one machine
python benchmarks/algorithms.py --data digits           # real data: digits (about 3 min)
python benchmarks/algorithms.py --data fashion-mnist    # real data: Fashion-MNIST (about 15 min)
python benchmarks/train_dask.py                         # Dask vs in-process, 1 vs N workers, memory
python benchmarks/train_profile.py                      # per-phase table, 192k x 512 x 200 classes
python benchmarks/train_memory.py                       # store 4x the workers' limits, restarts
rpicluster bench paper -o bench-out/paper               # the paper's shape (~8 GiB disk)
python benchmarks/ingest_memory.py --gb 8               # streaming ingest stays under 1 GB RSS
rpicluster bench scaling --local 2 --rows 48000 -o bench-out/scaling-local
if [ "$(id -u)" = 0 ]; then python benchmarks/scaling_netns.py -o bench-out/scaling-netns; fi
rpicluster ingest fashion-mnist:train bench-out/fmnist.zarr --block-rows 7500 --overwrite
rpicluster ingest fashion-mnist:test bench-out/fmnist-test.zarr --block-rows 10000 --overwrite
rpicluster bench scaling --local 2 --job mlp --data bench-out/fmnist.zarr \
  --test bench-out/fmnist-test.zarr --hidden 128 --epochs 4 --local-epochs 2 -o bench-out/mlp-scaling
python benchmarks/federated_noniid.py --train bench-out/fmnist.zarr --test bench-out/fmnist-test.zarr
