"""Sorts the Twemoji images into one folder per emoji category, the labels of the class-conditional set.

  python3 scripts/emoji_categories.py data/twemoji data/twemoji-categories [--expect N]

Reads SRC/emoji.json (from the emoji-datasource-twitter package, beside its images): each entry's `image` and
the `image` of each of its `skin_variations` get the entry's `category`. Every PNG of SRC is hard-linked (copied
where links fail) into DST/<category slug>/, e.g. "Animals & Nature" -> animals-nature. "Component" (the skin-tone
swatches) is left out. Fails when an image has no category or the count differs from --expect.
"""
import argparse, collections, json, os, re, shutil, sys


def slug(category):
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--expect", type=int, help="the number of images sorted (fail otherwise)")
    a = ap.parse_args()
    with open(os.path.join(a.src, "emoji.json"), encoding="utf-8") as f:
        entries = json.load(f)
    category = {}
    for e in entries:
        category.setdefault(e["image"], e["category"])
        for v in (e.get("skin_variations") or {}).values():
            category.setdefault(v["image"], e["category"])
    pngs = sorted(p for p in os.listdir(a.src) if p.endswith(".png"))
    missing = [p for p in pngs if p not in category]
    if missing:
        sys.exit(f"{len(missing)} images have no category in emoji.json, e.g. {missing[:3]}")
    counts = collections.Counter()
    for p in pngs:
        if category[p] == "Component":
            continue
        d = os.path.join(a.dst, slug(category[p]))
        os.makedirs(d, exist_ok=True)
        try:
            os.link(os.path.join(a.src, p), os.path.join(d, p))
        except OSError:
            shutil.copyfile(os.path.join(a.src, p), os.path.join(d, p))
        counts[slug(category[p])] += 1
    total = sum(counts.values())
    print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; {total} images", file=sys.stderr)
    if a.expect is not None and total != a.expect:
        sys.exit(f"expected {a.expect} images, sorted {total}")


if __name__ == "__main__":
    main()
