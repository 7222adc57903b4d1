#!/usr/bin/env python3
"""Score every checkpoint of a run against its training time: how long to train.

Each checkpoint's EMA weights are exported (f32) and scored by `trainer eval` through ONNX Runtime (classifier
score and FID in the classifier's features, N samples, DPM-Solver++ with the given steps and guidance). The
run's own eval.json is restored afterwards. Prints a Markdown table (step, minutes of `trainer fit`, score,
worst class, FID, floor) and writes the same rows to RUN/checkpoint_scores.csv.

    python3 scripts/checkpoint_scores.py runs/fashion-mnist [--n 200] [--steps 20] [--guidance 2] [--every 1]
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=200, help="samples per checkpoint (classes cycle)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--sampler", default="dpm++")
    ap.add_argument("--every", type=int, default=1, help="score every k-th checkpoint (the last always)")
    ap.add_argument("--trainer", default=os.path.join(ROOT, "target/release/trainer"))
    a = ap.parse_args()

    ck_root = os.path.join(a.run, "checkpoints")
    steps = sorted(int(d[5:]) for d in os.listdir(ck_root) if d.startswith("step-") and d[5:].isdigit())
    if not steps:
        sys.exit(f"{ck_root}: no checkpoints")
    chosen = [s for i, s in enumerate(steps) if i % a.every == a.every - 1 or s == steps[-1]]
    out_dir = os.path.join(a.run, "ck")
    os.makedirs(out_dir, exist_ok=True)
    report = os.path.join(a.run, "eval.json")
    kept = report + ".kept"
    if os.path.exists(report):
        shutil.copyfile(report, kept)
    rows = []
    try:
        for step in chosen:
            with open(os.path.join(ck_root, f"step-{step:08d}", "state.json")) as f:
                minutes = json.load(f)["elapsed_s"] / 60
            model = os.path.join(out_dir, f"step-{step}.onnx")
            subprocess.run([a.trainer, "export", "--run", a.run, "--checkpoint", str(step), "--out", model,
                            "--force"], check=True, stderr=subprocess.DEVNULL)
            res = subprocess.run([a.trainer, "eval", "--run", a.run, "--checkpoint", str(step), "--model", model,
                                  "--n", str(a.n), "--batch", "100", "--sampler", a.sampler, "--steps", str(a.steps),
                                  "--guidance", str(a.guidance), "--features", "classifier", "-q"],
                                 check=True, capture_output=True, text=True)
            r = json.loads(res.stdout)
            with open(os.path.join(out_dir, f"eval-{step}.json"), "w") as f:
                f.write(res.stdout)
            worst = min(r["classifier_score_per_class"], key=lambda c: c["score"])
            rows.append({"step": step, "minutes": round(minutes, 1), "score": r["classifier_score"],
                         "worst_class": worst["class"], "worst_score": worst["score"],
                         "fid_classifier": r["fid_classifier_features"], "floor": r["fid_floor_train_vs_test"]})
            print(f"step {step}: {100 * r['classifier_score']:.1f}% after {minutes:.1f} min", file=sys.stderr)
    finally:
        if os.path.exists(kept):
            os.replace(kept, report)
    with open(os.path.join(a.run, "checkpoint_scores.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"| step | minutes | classifier score | worst class | FID, classifier features (n = {a.n}) "
          f"| floor (n = {a.n}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['minutes']} | {100 * r['score']:.1f}% | {r['worst_class']}: "
              f"{100 * r['worst_score']:.0f}% | {r['fid_classifier']:.1f} | {r['floor']:.1f} |")


if __name__ == "__main__":
    main()
