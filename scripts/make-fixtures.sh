#!/usr/bin/env bash
# Regenerates the ONNX fixtures the runtime tests use: a tiny class-conditional MNIST U-Net trained for a few
# steps on real MNIST, exported as f32 and f16. Deterministic for a given seed and machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/fetch-data.sh mnist
cargo build --release -p trainer
RUN=$(mktemp -d)/tiny-mnist
target/release/trainer fit --config fixtures/tiny-mnist.toml --out "$RUN" -q
target/release/trainer export --run "$RUN" --dtype f32 --out fixtures/tiny-mnist-f32.onnx --force
target/release/trainer export --run "$RUN" --dtype f16 --out fixtures/tiny-mnist-f16.onnx --force
cp "$RUN/loss.png" fixtures/tiny-mnist-loss.png
rm -rf "$(dirname "$RUN")"
ls -la fixtures/
