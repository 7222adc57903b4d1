"""The trainer's CPU speed as a ratio to PyTorch on the same cores, measured against the machine's GEMM peak.

For each preset (every net a user trains here: the mnist preset (ch 32), mnist-ch64, twemoji32 (RGB 32x32),
twemoji64-small and pokemon64 (RGB 64x64)) and batch size, runs in turn, each in its own process (so that peak
RSS is per configuration):
  target/release/trainer bench ...       (the training step of `trainer fit`: the config's real data and
                                          augmentation, forward, backward, AdamW, EMA; then the sampler's model call)
  python3 benches/torch_unet.py ...       (the same network and step in PyTorch, read from the same TOML)
It measures the machine's SGEMM peak (the fastest 2048 x 2048 product through PyTorch's OpenBLAS, before and after
the nets), then prints a
Markdown table with img/s, the step's GFLOP per image (~3x the forward's, counted by torch_unet.py), the fraction of
the peak each side reaches, peak RSS and the ratios.

  cargo build --release -p trainer && python3 benches/train_speed.py [--configs mnist,twemoji32] [--batches 32,64]

Needs Debian's python3-torch and libopenblas0-pthread for the PyTorch side, and the presets' data in data/
(scripts/fetch-data.sh mnist twemoji pokemon).
"""
import argparse, json, os, platform, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


PRESETS = "mnist,mnist-ch64,twemoji32,twemoji64-small,pokemon64"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=PRESETS, help="presets (trainer/configs/NAME.toml) or paths to TOML files")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 2 warm-up)")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--trainer", default="target/release/trainer")
    ap.add_argument("--python", default="/usr/bin/python3", help="an interpreter with torch")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    gemm_peak = lambda: run([a.python, "benches/torch_unet.py", "--gemm-peak", "--threads", str(a.threads)])["sgemm_gflops"]
    peak = gemm_peak()
    print(f"SGEMM peak (2048 x 2048, {a.threads} threads): {peak:.0f} GFLOP/s", file=sys.stderr, flush=True)
    rows = []
    for name in a.configs.split(","):
        path = name if name.endswith(".toml") else f"trainer/configs/{name}.toml"
        for bs in [int(b) for b in a.batches.split(",")]:
            common = ["--config", path, "--batch-size", str(bs), "--steps", str(a.steps), "--eval-batch", str(a.eval_batch)]
            ours = run([a.trainer, "bench"] + common)
            torch = run([a.python, "benches/torch_unet.py", "--threads", str(a.threads)] + common)
            assert ours["params"] == torch["params"], f"{name}: parameter counts differ: {ours['params']} vs {torch['params']}"
            rows.append((os.path.basename(path).removesuffix(".toml"), bs, ours, torch))
            print(f"{name} batch {bs}: trainer {ours['train_img_per_s']:.1f} img/s, "
                  f"pytorch {torch['train_img_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    # measured again at the end, the best of the two: a shared host can be slow for minutes at a time
    peak = max(peak, gemm_peak())
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {rows[0][3]['impl']}, {a.threads} threads; "
          f"SGEMM peak {peak:.0f} GFLOP/s\n")
    print("| net (params) | batch | GFLOP/img (step) | trainer img/s | PyTorch img/s | ratio | of peak, trainer / PyTorch "
          "| peak RSS, trainer / PyTorch | sampler call, trainer / PyTorch img-evals/s (batch %d) |" % a.eval_batch)
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, bs, o, t in rows:
        ev = ""
        if o.get("eval_img_evals_per_s") and t.get("eval_img_evals_per_s"):
            ev = (f"{o['eval_img_evals_per_s']:.0f} / {t['eval_img_evals_per_s']:.0f} "
                  f"({o['eval_img_evals_per_s'] / t['eval_img_evals_per_s']:.2f}x)")
        gf = t["train_gflop_per_img"]
        frac = lambda r: f"{100 * gf * r['train_img_per_s'] / peak:.0f}%"
        print(f"| {name} ({o['params'] / 1e6:.2f}M) | {bs} | {gf:.2f} | {o['train_img_per_s']:.1f} "
              f"| {t['train_img_per_s']:.1f} | {o['train_img_per_s'] / t['train_img_per_s']:.2f}x | {frac(o)} / {frac(t)} "
              f"| {o['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} MiB | {ev} |")


if __name__ == "__main__":
    main()
