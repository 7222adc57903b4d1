"""The trainer's CPU speed as a ratio to PyTorch on the same cores, from one invocation.

For each network (the README's `--ch 32` net and the `mnist` preset) and batch size, runs in turn, each in its
own process (so that peak RSS is per configuration):
  target/release/trainer bench ...       (the training step of `trainer fit`: real MNIST batches, forward,
                                          backward, AdamW, EMA; then the sampler's model call)
  python3 benches/torch_unet.py ...       (the same network and step in PyTorch)
and prints a Markdown table with img/s, peak RSS and the ratios.

  cargo build --release -p trainer && python3 benches/train_speed.py [--batches 32,64] [--steps 8]

Needs Debian's python3-torch and libopenblas0-pthread for the PyTorch side, and real MNIST in data/mnist
(scripts/fetch-data.sh mnist).
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="trainer/configs/mnist-ch64.toml")
    ap.add_argument("--nets", default="32,64", help="model.ch values to compare")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 2 warm-up)")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--trainer", default="target/release/trainer")
    ap.add_argument("--python", default="/usr/bin/python3", help="an interpreter with torch")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    rows = []
    for ch in [int(c) for c in a.nets.split(",")]:
        for bs in [int(b) for b in a.batches.split(",")]:
            common = ["--config", a.config, "--ch", str(ch), "--batch-size", str(bs), "--steps", str(a.steps),
                      "--eval-batch", str(a.eval_batch)]
            ours = run([a.trainer, "bench"] + common)
            torch = run([a.python, "benches/torch_unet.py", "--threads", str(a.threads)] + common)
            assert ours["params"] == torch["params"], f"parameter counts differ: {ours['params']} vs {torch['params']}"
            rows.append((ch, bs, ours, torch))
            print(f"ch {ch} batch {bs}: trainer {ours['train_img_per_s']:.1f} img/s, "
                  f"pytorch {torch['train_img_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {rows[0][3]['impl']}, {a.threads} threads\n")
    print("| net (params) | batch | trainer img/s | PyTorch img/s | ratio | trainer peak RSS | PyTorch peak RSS "
          "| sampler call, trainer / PyTorch img-evals/s (batch %d) |" % a.eval_batch)
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for ch, bs, o, t in rows:
        ev = ""
        if o.get("eval_img_evals_per_s") and t.get("eval_img_evals_per_s"):
            ev = (f"{o['eval_img_evals_per_s']:.0f} / {t['eval_img_evals_per_s']:.0f} "
                  f"({o['eval_img_evals_per_s'] / t['eval_img_evals_per_s']:.2f}x)")
        print(f"| ch {ch} ({o['params'] / 1e6:.2f}M) | {bs} | {o['train_img_per_s']:.1f} | {t['train_img_per_s']:.1f} "
              f"| {o['train_img_per_s'] / t['train_img_per_s']:.2f}x | {o['peak_rss_mib']:.0f} MiB "
              f"| {t['peak_rss_mib']:.0f} MiB | {ev} |")


if __name__ == "__main__":
    main()
