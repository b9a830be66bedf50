"""Benchmark `lingjax convert` at real scale (not a test).

Synthesizes an HF checkpoint with the real Ling-2.6-flash shapes (d=4096, 32 heads of 128, MLA with
q_lora 1536 / kv_lora 512, dense MLP 9216, 256 experts of width 1024 + 1 shared, vocab 157184) and two
layers, one of each kind: layer 0 = linear attention + dense MLP, layer 1 = MLA + MoE (~9.5 GB in
bf16, in 4 GiB shards + index). Then, side by side in one run:

  cat SRC/*.safetensors > /dev/null     cold (pages evicted with posix_fadvise DONTNEED) and warm
  cat SRC/*.safetensors > one file      cold: the read+write copy ceiling of this disk
  lingjax convert SRC DST               in a child process, cold and warm source; its peak RSS from
                                        wait4() rusage, against the largest layer's bytes

Prints a table and writes JSON (default bench_convert.json). The synthetic checkpoint and the outputs
are deleted at the end unless --keep.

    python scripts/bench_convert.py [--workdir DIR] [--keep] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from lingjax.config import BailingConfig
from lingjax.weights import HFStreamWriter, rules_for

GB = 1e9


def flash_config() -> BailingConfig:
    cfg = BailingConfig(vocab_size=157184, hidden_size=4096, intermediate_size=9216, num_hidden_layers=2,
                        num_attention_heads=32, num_key_value_heads=32, head_dim=128, num_experts=256,
                        num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=1024,
                        num_shared_experts=1, layer_group_size=2, group_norm_size=4, kv_lora_rank=512,
                        q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        first_k_dense_replace=1, num_nextn_predict_layers=0, routed_scaling_factor=2.5,
                        rope_theta=6e6, max_position_embeddings=131072)
    cfg.validate()
    assert cfg.layer_kinds == ("linear", "mla") and not cfg.is_moe(0) and cfg.is_moe(1)
    return cfg


def synthesize(cfg, path, shard_bytes=4 << 30):
    """Random finite bf16 bits (exponent's top bit cleared), expert_bias float32; tensor by tensor."""
    import ml_dtypes
    os.makedirs(path, exist_ok=True)
    rules = rules_for(cfg, mtp=False)
    plan = [(n, s, np.dtype(np.float32) if r.float32 else np.dtype(ml_dtypes.bfloat16))
            for r in rules for n, s in zip(r.hf, r.hf_shapes)]
    pool = (np.random.default_rng(0).integers(0, 1 << 16, 1 << 27, dtype=np.uint16) & 0xBFFF)  # 256 MiB
    w = HFStreamWriter(path, plan, shard_bytes)
    off = 0
    for name, shape, dt in plan:
        n = int(np.prod(shape))
        if dt == np.float32:
            t = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        else:
            if off + n > pool.size:
                off = 0
            bits = pool[off:off + n] if n <= pool.size else np.resize(pool[off:], n)   # (embedding, lm_head)
            t = bits.view(ml_dtypes.bfloat16).reshape(shape)
            off += n // 3 + 7                    # overlapping, shifted windows: no two tensors alike
        w.write(name, t)
    w.finish()
    w.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    return plan


def files_of(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def evict(paths):
    """Drop these files' pages from the page cache (no root needed: fsync, then FADV_DONTNEED)."""
    for root in paths:
        walk = [(root, [], [""])] if os.path.isfile(root) else os.walk(root)
        for d, _, fs in walk:
            for f in fs:
                p = os.path.join(d, f) if f else d
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def timed_child(argv, stdout=subprocess.DEVNULL):
    """(seconds, peak RSS bytes, exit status) of a child process, from wait4()."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=stdout)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, ru.ru_maxrss * 1024, p.returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lingjax_bench_convert"),
                    help="where the synthetic checkpoint and the outputs go (~20 GB free needed)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the outputs")
    ap.add_argument("--json", default="bench_convert.json")
    args = ap.parse_args()
    work = os.path.abspath(args.workdir)
    src, dst, copy = os.path.join(work, "flash-2l"), os.path.join(work, "flash-2l-lj"), os.path.join(work, "copy.bin")
    cfg = flash_config()
    rules = rules_for(cfg, mtp=False)
    per_layer = {}
    for r in rules:
        key = r.params[0][:2] if r.params[0][0] == "layers" else r.params[0][:1]
        per_layer[key] = per_layer.get(key, 0) + sum(int(np.prod(s)) * (4 if r.float32 else 2) for s in r.hf_shapes)
    largest_key = max(per_layer, key=per_layer.get)
    largest = per_layer[largest_key]
    largest_param = max(int(np.prod(r.hf_shapes[0])) * len(r.hf) * 2 for r in rules)

    os.makedirs(work, exist_ok=True)
    try:
        if not os.path.isfile(os.path.join(src, "config.json")):
            t = time.perf_counter()
            synthesize(cfg, src)
            print(f"synthesized {src} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        files = files_of(src)
        total = sum(os.path.getsize(f) for f in files)
        rows = []

        def row(what, seconds, rss=None, note=""):
            rows.append({"what": what, "seconds": round(seconds, 3), "gb_per_s": round(total / seconds / GB, 3),
                         "peak_rss_gb": None if rss is None else round(rss / GB, 3), "note": note})

        evict([src])
        s, _, rc = timed_child(["cat", *files])
        row("cat SRC > /dev/null (cold)", s)
        s, _, rc = timed_child(["cat", *files])
        row("cat SRC > /dev/null (warm)", s)
        evict([src])
        with open(copy, "wb") as out:
            t = time.perf_counter()
            subprocess.run(["cat", *files], stdout=out, check=True)
            os.fsync(out.fileno())
            row("cat SRC > file + fsync (cold)", time.perf_counter() - t, note="read+write ceiling")
        os.unlink(copy)

        lj = [sys.executable, "-m", "lingjax.cli", "convert", src, dst, "--no-progress", "--overwrite"]
        for label in ("cold", "warm"):
            if label == "cold":
                evict([src])
            s, rss, rc = timed_child(lj)
            if rc != 0:
                raise SystemExit(f"convert failed with status {rc}")
            inner = json.load(open(os.path.join(dst, "lingjax_checkpoint.json")))["summary"]["seconds"]
            row(f"lingjax convert ({label})", s, rss, note=f"{inner:.1f} s inside convert(), rest is start-up")
            evict([dst])      # the written pages are not the next run's business
        out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    cat_cold = rows[0]["seconds"]
    conv_cold = next(r for r in rows if r["what"] == "lingjax convert (cold)")
    conv_warm = next(r for r in rows if r["what"] == "lingjax convert (warm)")
    peak = max(conv_cold["peak_rss_gb"], conv_warm["peak_rss_gb"]) * GB
    print(f"\nsource: {total / GB:.2f} GB in {len(files)} shards (Ling-2.6-flash shapes, L=2: linear+dense, MLA+MoE); "
          f"output {out_bytes / GB:.2f} GB")
    print(f"largest layer: {'.'.join(map(str, largest_key))} = {largest / GB:.2f} GB; largest param (one expert "
          f"stack) = {largest_param / GB:.2f} GB\n")
    print(f"{'':34s} {'seconds':>8s} {'GB/s':>7s} {'peak RSS GB':>12s}  note")
    for r in rows:
        rss = "" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.2f}"
        print(f"{r['what']:34s} {r['seconds']:8.2f} {r['gb_per_s']:7.2f} {rss:>12s}  {r['note']}")
    ratio_rss = peak / largest
    ratio_t = conv_cold["seconds"] / cat_cold
    print(f"\npeak RSS / largest layer = {ratio_rss:.2f} (target < 1.5)")
    print(f"convert (cold) time / cat (cold) time = {ratio_t:.2f} (target <= 2); "
          f"warm/warm = {conv_warm['seconds'] / rows[1]['seconds']:.2f}")
    result = {"source_bytes": total, "output_bytes": out_bytes, "largest_layer": ".".join(map(str, largest_key)),
              "largest_layer_bytes": largest, "largest_param_bytes": largest_param, "rows": rows,
              "peak_rss_over_largest_layer": round(ratio_rss, 3), "convert_over_cat_cold": round(ratio_t, 3)}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
