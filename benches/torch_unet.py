"""PyTorch reference of the trainer's U-Net and training step, for a same-machine speed ratio.

Reads one of our TOML presets (trainer/configs/*.toml, `extends` resolved as the trainer does: tables merged key by
key, other values replaced whole), builds the same network from every [model] key (same parameter count as
`trainer fit` prints; the trainer's defaults for keys a file leaves out), and times what one `trainer fit` step
does on the config's real data (MNIST-style IDX files, or a folder of images composited on data.background):
the config's augmentation (flip, rotation and zoom in one affine resampling, colour jitter), t ~ U{0..T-1} on
the config's schedule, eps ~ N(0, I), x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, label dropout, forward, the
eps or v target with Min-SNR weights, backward, gradient-norm clipping, AdamW, EMA update. Then the inference
forward (no grad, the sampler's cost per image-evaluation). Also counts the forward's multiply-adds (convs,
linears, attention's two batched products) by hooks: a training step costs ~3x the forward (the backward
computes an input and a weight gradient per layer). Prints one JSON line. Peak RSS is the process's
(ru_maxrss), so run one configuration per process, as benches/train_speed.py does.

  python3 benches/torch_unet.py --config trainer/configs/twemoji32.toml --batch-size 32 --steps 8
  python3 benches/torch_unet.py --gemm-peak     # the machine's SGEMM GFLOP/s through PyTorch's BLAS

Needs Debian's python3-torch and libopenblas0-pthread (without OpenBLAS PyTorch's GEMM is a slow reference),
and python3-pil (pulled in by python3-torch's recommends) for folder data.
"""
import argparse, gzip, json, math, os, resource, struct, sys, time, tomllib

FLOPS = [0]  # multiply-adds x 2 of the forward being counted

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
        FLOPS[0] += 2 * 2 * b * c * (hh * ww) ** 2  # q^T k and w v: each b x heads x n x n x d
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
        out_ch = m["channels"] * (2 if m.get("learn_sigma") else 1)
        self.out = nn.Sequential(nn.GroupNorm(m["norm_groups"], cur), nn.SiLU(), nn.Conv2d(cur, out_ch, 3, padding=1))

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


def load_idx(path):
    names = os.listdir(path)
    pick = lambda stem: os.path.join(path, next(n for n in names if n.startswith(stem)))
    x = torch.from_numpy(read_idx(pick("train-images")).astype(np.float32) / 127.5 - 1).unsqueeze(1)
    return x, torch.from_numpy(read_idx(pick("train-labels")).astype(np.int64))


def load_folder(path, size, background):
    """The images of a folder (one sub-folder per class, or none) on `background`, resized so the shorter side
    is `size` and center-cropped, as trainer/src/data/folder.rs."""
    from PIL import Image

    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    files = [(os.path.join(path, c, f), i) for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(path, c)))]
    files = files or [(os.path.join(path, f), 0) for f in sorted(os.listdir(path))]
    xs, ys = [], []
    for f, y in files:
        try:
            img = Image.open(f).convert("RGBA")
        except OSError:
            continue
        bg = Image.new("RGBA", img.size, tuple(background) + (255,))
        img = Image.alpha_composite(bg, img).convert("RGB")
        w, h = img.size
        k = size / min(w, h)
        img = img.resize((max(size, round(w * k)), max(size, round(h * k))), Image.BICUBIC)
        w, h = img.size
        img = img.crop(((w - size) // 2, (h - size) // 2, (w - size) // 2 + size, (h - size) // 2 + size))
        xs.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def augment(x, a):
    """data.augment on a batch: flip, rotation and zoom as one affine resampling, then colour jitter."""
    b = x.shape[0]
    if a.get("hflip"):
        flip = torch.rand(b) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    deg, zoom = a.get("rotate_degrees", 0.0), a.get("crop_min_scale", 0.0)
    if deg or 0 < zoom < 1:
        th = (torch.rand(b) * 2 - 1) * math.radians(deg)
        sc = 1 - torch.rand(b) * (1 - zoom) if 0 < zoom < 1 else torch.ones(b)
        sh = (1 - sc) * (torch.rand(b, 2) * 2 - 1).T
        m = torch.stack([torch.stack([sc * th.cos(), -sc * th.sin(), sh[0]], 1),
                         torch.stack([sc * th.sin(), sc * th.cos(), sh[1]], 1)], 1)
        grid = F.affine_grid(m, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    u = lambda k: 1 + (torch.rand(b, 1, 1, 1) * 2 - 1) * a.get(k, 0.0)
    if a.get("brightness"):
        x = (x + 1) * u("brightness") - 1
    if a.get("contrast"):
        x = (x - x.mean((1, 2, 3), keepdim=True)) * u("contrast") + x.mean((1, 2, 3), keepdim=True)
    if a.get("saturation") and x.shape[1] == 3:
        g = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x)
        x = g + (x - g) * u("saturation")
    return x.clamp(-1, 1)


def alpha_bars(d):
    """The schedule of [diffusion]: linear (Ho et al. 2020, scaled by 1000 / T) or cosine (Nichol & Dhariwal 2021)."""
    T = d.get("timesteps", 1000)
    if d.get("schedule", "linear") == "cosine":
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
    else:
        k = 1000 / T
        betas = torch.linspace(k * 1e-4, k * 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def load_config(path):
    """A preset with its `extends` chain resolved (tables merged key by key, other values replaced whole)."""
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    base = cfg.pop("extends", None)
    if base is None:
        return cfg

    def merge(b, t):
        for k, v in t.items():
            if isinstance(v, dict) and isinstance(b.get(k), dict):
                merge(b[k], v)
            else:
                b[k] = v
        return b

    return merge(load_config(os.path.join(os.path.dirname(path), base)), cfg)


def model_keys(cfg):
    """[model] over the trainer's UNetConfig defaults (the DDPM CIFAR-10 model), plus what [diffusion] implies."""
    m = dict(channels=3, image_size=32, ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attention_resolutions=[16],
             num_heads=1, dropout=0.1, use_scale_shift_norm=False, num_classes=0, norm_groups=32)
    m.update(cfg.get("model", {}))
    m["learn_sigma"] = cfg.get("diffusion", {}).get("variance", "fixed_small") == "learned_range"
    return m


def count_forward_flops(model, x, t, y):
    """FLOPs (2 x multiply-adds) of one forward: convs and linears by hooks, attention's products in its forward."""
    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            FLOPS[0] += 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            FLOPS[0] += 2 * out.numel() * mod.in_features
    hs = [mod.register_forward_hook(hook) for mod in model.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    FLOPS[0] = 0
    with torch.no_grad():
        model(x, t, y)
    for h in hs:
        h.remove()
    return FLOPS[0] / x.shape[0]


def gemm_peak(threads, n=2048, reps=20):
    """The machine's SGEMM GFLOP/s through PyTorch's BLAS (OpenBLAS here): the fastest of `reps` n x n products
    (a peak is a best case; on a shared host a median can fall to a quarter of it)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - s)
    return 2 * n**3 / min(ts) / 1e9


def median(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="trainer/configs/mnist-ch64.toml")
    ap.add_argument("--ch", type=int, help="override model.ch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps (after 2 warm-up steps)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--eval-batch", type=int, default=64, help="batch of the timed inference forward (0: skip)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gemm-peak", action="store_true", help="only measure SGEMM GFLOP/s (2048 x 2048) and exit")
    a = ap.parse_args()
    if a.gemm_peak:
        print(json.dumps({"impl": f"pytorch {torch.__version__}", "threads": a.threads, "sgemm_gflops": gemm_peak(a.threads)}))
        return
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = load_config(a.config)
    m = model_keys(cfg)
    if a.ch:
        m["ch"] = a.ch
    tr, dc, data = cfg.get("train", {}), cfg.get("diffusion", {}), cfg.get("data", {})
    T = dc.get("timesteps", 1000)
    if data.get("kind", "mnist") == "folder":
        x_all, y_all = load_folder(data["path"], m["image_size"], data.get("background", [0, 0, 0]))
    else:
        x_all, y_all = load_idx(data.get("path", "data/mnist"))
    assert x_all.shape[1:] == (m["channels"], m["image_size"], m["image_size"]), f"data {tuple(x_all.shape[1:])} vs model"
    model, ema = UNet(m), UNet(m)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tr.get("lr", 2e-4), weight_decay=tr.get("weight_decay", 0.0))
    abar = alpha_bars(dc)
    bs, null, gamma = a.batch_size, m["num_classes"], tr.get("min_snr_gamma", 0.0)
    v_pred, c = dc.get("prediction", "epsilon") == "v", m["channels"]

    def step():
        idx = torch.randint(0, x_all.shape[0], (bs,))
        x0, y = augment(x_all[idx], data.get("augment", {})), y_all[idx].clone()
        y[torch.rand(bs) < tr.get("p_uncond", 0.1)] = null
        t = torch.randint(0, T, (bs,))
        eps = torch.randn_like(x0)
        ab = abar[t][:, None, None, None]
        target = ab.sqrt() * eps - (1 - ab).sqrt() * x0 if v_pred else eps
        snr = ab / (1 - ab)
        w = (snr.clamp(max=gamma) / (snr + 1 if v_pred else snr)) if gamma > 0 else torch.ones_like(ab)
        out = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, y if null else None)[:, :c]
        loss = (w * (out - target) ** 2).mean()
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
    for i in range(a.steps + a.warmup):
        s = time.perf_counter()
        step()
        if i >= a.warmup:
            times.append(time.perf_counter() - s)
    train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = m["image_size"]
    fwd = count_forward_flops(ema, torch.randn(2, c, s, s), torch.zeros(2, dtype=torch.long),
                              torch.zeros(2, dtype=torch.long) if null else None)
    out = {
        "impl": f"pytorch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "batch": bs,
        "train_s_per_step": median(times),
        "train_img_per_s": bs / median(times),
        "peak_rss_mib": train_rss,
        "forward_gflop_per_img": fwd / 1e9,
        "train_gflop_per_img": 3 * fwd / 1e9,
    }
    if a.eval_batch:
        eb = a.eval_batch
        xe, te = torch.randn(eb, c, s, s), torch.randint(0, T, (eb,))
        ye = torch.randint(0, null + 1, (eb,)) if null else None
        ema.eval()
        with torch.no_grad():
            ts = []
            for i in range(max(3, a.steps // 2) + 1):
                st = time.perf_counter()
                ema(xe, te, ye)
                if i:
                    ts.append(time.perf_counter() - st)
        out["eval_batch"] = eb
        out["eval_img_evals_per_s"] = eb / median(ts)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
