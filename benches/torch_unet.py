"""PyTorch reference of the trainer's U-Net and training step, for a same-machine speed ratio.

Reads one of our TOML presets (trainer/configs/*.toml), builds the same network (same parameter count as
`trainer fit` prints), and times what one `trainer fit` step does: a batch of real MNIST images, t ~ U{0..T-1},
eps ~ N(0, I), x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, label dropout, forward, MSE, backward, gradient-norm
clipping, AdamW, EMA update. Then the inference forward (no grad, the sampler's cost per image-evaluation).
Prints one JSON line. Peak RSS is the process's (ru_maxrss), so run one configuration per process, as
benches/train_speed.py does.

  python3 benches/torch_unet.py --config trainer/configs/mnist-ch64.toml --ch 32 --batch-size 32 --steps 8

Needs Debian's python3-torch and libopenblas0-pthread (without OpenBLAS PyTorch's GEMM is a slow reference).
"""
import argparse, gzip, json, math, os, resource, struct, sys, time, tomllib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim):
    # DDPM's get_timestep_embedding, as trainer/src/unet.rs: w_i = 10000^(-i/(half-1)), [sin, cos]
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(a), torch.cos(a)], 1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb, m):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(m["norm_groups"], cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.ss = m["use_scale_shift_norm"]
        self.t = nn.Linear(temb, 2 * cout if self.ss else cout)
        self.n2, self.c2 = nn.GroupNorm(m["norm_groups"], cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(m["dropout"])
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x)))
        e = self.t(F.silu(emb))[:, :, None, None]
        if self.ss:
            s, b = e.chunk(2, 1)
            h = self.n2(h) * (1 + s) + b
        else:
            h = self.n2(h + e)
        return self.skip(x) + self.c2(self.drop(F.silu(h)))


class Attention(nn.Module):
    def __init__(self, c, m):
        super().__init__()
        self.n, self.heads = nn.GroupNorm(m["norm_groups"], c), m["num_heads"]
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.n(x)).reshape(b, 3, self.heads, d, hh * ww).unbind(1)
        w = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q, k) / math.sqrt(d), -1)
        return x + self.proj(torch.einsum("bhnm,bhdm->bhdn", w, v).reshape(b, c, hh, ww))


class UNet(nn.Module):
    """trainer/src/unet.rs, layer for layer."""

    def __init__(self, m):
        super().__init__()
        ch, temb, res = m["ch"], 4 * m["ch"], m["image_size"]
        self.ch, self.attn = ch, set(m["attention_resolutions"])
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.label = nn.Embedding(m["num_classes"] + 1, temb) if m["num_classes"] else None
        self.conv_in = nn.Conv2d(m["channels"], ch, 3, padding=1)
        self.down, chans, cur = nn.ModuleList(), [ch], ch
        levels = len(m["ch_mult"])
        for i, mult in enumerate(m["ch_mult"]):
            for _ in range(m["num_res_blocks"]):
                blk = nn.ModuleList([ResBlock(cur, ch * mult, temb, m)])
                cur = ch * mult
                if res in self.attn:
                    blk.append(Attention(cur, m))
                self.down.append(blk)
                chans.append(cur)
            if i != levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                chans.append(cur)
                res //= 2
        self.mid1, self.mida, self.mid2 = ResBlock(cur, cur, temb, m), Attention(cur, m), ResBlock(cur, cur, temb, m)
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(m["ch_mult"]))):
            for _ in range(m["num_res_blocks"] + 1):
                blk = nn.ModuleList([ResBlock(cur + chans.pop(), ch * mult, temb, m)])
                cur = ch * mult
                if res in self.attn:
                    blk.append(Attention(cur, m))
                self.up.append(blk)
            if i != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(m["norm_groups"], cur), nn.SiLU(), nn.Conv2d(cur, m["channels"], 3, padding=1))

    def forward(self, x, t, y):
        emb = self.temb(timestep_embedding(t, self.ch))
        if self.label is not None:
            emb = emb + self.label(y)
        h = self.conv_in(x)
        hs = [h]
        for blk in self.down:
            if isinstance(blk[0], ResBlock):
                h = blk[0](h, emb)
                for a in blk[1:]:
                    h = a(h)
            else:
                h = blk[0](h)
            hs.append(h)
        h = self.mid2(self.mida(self.mid1(h, emb)), emb)
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h = blk[0](torch.cat([h, hs.pop()], 1), emb)
                for a in blk[1:]:
                    h = a(h)
            else:
                h = blk[1](blk[0](h))
        return self.out(h)


def read_idx(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        dims = [struct.unpack(">I", f.read(4))[0] for _ in range(magic & 0xFF)]
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)


def load_mnist(path):
    names = os.listdir(path)
    pick = lambda stem: os.path.join(path, next(n for n in names if n.startswith(stem)))
    x = torch.from_numpy(read_idx(pick("train-images")).astype(np.float32) / 127.5 - 1).unsqueeze(1)
    return x, torch.from_numpy(read_idx(pick("train-labels")).astype(np.int64))


def median(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="trainer/configs/mnist-ch64.toml")
    ap.add_argument("--ch", type=int, help="override model.ch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps (after 2 warm-up steps)")
    ap.add_argument("--eval-batch", type=int, default=64, help="batch of the timed inference forward (0: skip)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--data", default="data/mnist")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with open(a.config, "rb") as f:
        cfg = tomllib.load(f)
    m = dict(channels=1, image_size=28, ch=64, ch_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[14],
             num_heads=4, dropout=0.1, use_scale_shift_norm=True, num_classes=10, norm_groups=32)
    m.update(cfg.get("model", {}))
    if a.ch:
        m["ch"] = a.ch
    tr = cfg.get("train", {})
    T = cfg.get("diffusion", {}).get("timesteps", 1000)
    x_all, y_all = load_mnist(a.data)
    model, ema = UNet(m), UNet(m)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tr.get("lr", 2e-4), weight_decay=tr.get("weight_decay", 0.0))
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    bs, null = a.batch_size, m["num_classes"]

    def step():
        idx = torch.randint(0, x_all.shape[0], (bs,))
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(bs) < tr.get("p_uncond", 0.1)] = null
        t = torch.randint(0, T, (bs,))
        eps = torch.randn_like(x0)
        ab = abar[t][:, None, None, None]
        loss = F.mse_loss(model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, y), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), tr.get("grad_clip", 1.0))
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(list(ema.parameters()), 0.999)
            torch._foreach_add_(list(ema.parameters()), list(model.parameters()), alpha=0.001)
        return loss.item()

    model.train()
    times = []
    for i in range(a.steps + 2):
        s = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - s)
    train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "impl": f"pytorch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "batch": bs,
        "train_s_per_step": median(times),
        "train_img_per_s": bs / median(times),
        "peak_rss_mib": train_rss,
    }
    if a.eval_batch:
        eb = a.eval_batch
        xe, te, ye = torch.randn(eb, 1, m["image_size"], m["image_size"]), torch.randint(0, T, (eb,)), torch.randint(0, null + 1, (eb,))
        ema.eval()
        with torch.no_grad():
            ts = []
            for i in range(max(3, a.steps // 2) + 1):
                s = time.perf_counter()
                ema(xe, te, ye)
                if i:
                    ts.append(time.perf_counter() - s)
        out["eval_batch"] = eb
        out["eval_img_evals_per_s"] = eb / median(ts)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
