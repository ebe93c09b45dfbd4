#!/usr/bin/env bash
# Builds the release GPU test binary, the unit tests, the criterion benches and the report binary
# here, and packs them with a runner into .gpu/ (git-ignored). Copy that folder to an x86-64
# machine with an NVIDIA driver (no Rust, no network needed) and run:
#
#   .gpu/run.sh OUTDIR [--sanitize] [--bench] [--criterion] [--quick] [--torch]
#
# tests run with FUSEDREG_REQUIRE_GPU=1 (a missing GPU fails them); --sanitize repeats the GPU
# tests under compute-sanitizer memcheck, racecheck, initcheck and synccheck; --bench runs the
# benchmark report and the criterion benches; --torch runs benches/compare_torch.py. Logs and
# results go to OUTDIR.
#
# For an A/B of two revisions in one device call (benches/NOTES.md): GPU_KIT_SRC builds another
# checkout (e.g. a worktree of an older commit) with this checkout's toolkit, and GPU_KIT_DIR
# (default .gpu; relative to this checkout, or absolute) packs the kit elsewhere, e.g. .gpu-a.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "${GPU_KIT_SRC:-$here}" && pwd)
cd "$root"
case ${GPU_KIT_DIR:-.gpu} in
  /*) kit=$GPU_KIT_DIR ;;
  *) kit="$here/${GPU_KIT_DIR:-.gpu}" ;;
esac
export FUSEDREG_REQUIRE_KERNELS=1

"$here/scripts/install-cuda.sh" >/dev/null
# Another checkout has no .cuda/ of its own: point its build.rs at ours.
[ "$root" != "$here" ] && export NVCC=${NVCC:-$here/.cuda/nvidia/cu13/bin/nvcc}

list_executables() {  # reads cargo's JSON messages, prints "name path" of each executable
  # Every package of the workspace (the library and tools/) is listed. Two different targets that
  # would get the same kit name (e.g. a `gpu` test in both packages) fail the kit instead of one
  # silently replacing the other.
  python3 -c '
import json, sys
seen = {}
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t, kind = m["target"], m["target"]["kind"][0]
        prefix = "bench" if kind == "bench" else "test" if m["profile"]["test"] else kind
        name = prefix + "-" + t["name"]
        if seen.setdefault(name, t["src_path"]) != t["src_path"]:
            sys.exit("gpu-kit: %s names both %s and %s" % (name, seen[name], t["src_path"]))
        print(name, m["executable"])
'
}

rm -rf "$kit"
mkdir -p "$kit/bin"
{
  cargo test --workspace --release --no-run --message-format=json 2>/dev/null
  cargo bench --workspace --no-run --message-format=json 2>/dev/null
  cargo build --workspace --release --bins --examples --message-format=json 2>/dev/null
} | list_executables | sort -u -k1,1 | while read -r name path; do
  cp "$path" "$kit/bin/$name"
  strip --strip-all "$kit/bin/$name" 2>/dev/null || true
done
cp "$root/scripts/gpu-run.sh" "$kit/run.sh"
[ -f "$root/benches/compare_torch.py" ] && cp "$root/benches/compare_torch.py" "$kit/"
git -C "$root" rev-parse HEAD >"$kit/COMMIT" 2>/dev/null || echo unknown >"$kit/COMMIT"
git -C "$root" status --porcelain | grep -q . && echo "+uncommitted" >>"$kit/COMMIT" || true
chmod +x "$kit/run.sh"
ls -la "$kit/bin"
du -sh "$kit"
