#!/usr/bin/env bash
# Keeps a sweep's record in the repository: copies what `trainer sweep` reads to continue (each run's config.toml,
# eval.json and metrics.csv, the sweep's sweep.json) and what it wrote (the CSVs and figures) from a run folder
# (git-ignored, checkpoints included) to a tracked folder, without checkpoints or samples. Copying the record back
# lets the sweep go on from the runs it finished, on another machine:
#
#   scripts/keep-sweep.sh runs/study-004/sweep benches/study-004      # keep (after each session's runs)
#   scripts/keep-sweep.sh benches/study-004 runs/study-004/sweep      # bring back, then the same `trainer sweep`
#
# Only finished runs (those with an eval.json) are copied; a cut run trains again from its start.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 FROM TO" >&2; exit 2; }
from=$1 to=$2
[ -f "$from/sweep.json" ] || { echo "error: $from/sweep.json not found: $from is not a sweep folder" >&2; exit 1; }
mkdir -p "$to"
cp "$from/sweep.json" "$to/"
for f in "$from"/*.csv "$from"/*.png; do [ -f "$f" ] && cp "$f" "$to/"; done
kept=0
while IFS= read -r eval; do
  run=$(dirname "$eval")
  rel=${run#"$from"/}
  mkdir -p "$to/$rel"
  for f in config.toml eval.json metrics.csv; do [ -f "$run/$f" ] && cp "$run/$f" "$to/$rel/"; done
  kept=$((kept + 1))
done < <(find "$from" -mindepth 3 -maxdepth 3 -name eval.json | sort)
echo "kept $kept finished run(s) of $from in $to"
