#!/usr/bin/env python
"""Retrain only the MTP (NextN) layer of the shipped tiny model so that its drafts are mostly accepted.

    .venv/bin/python scripts/train_tiny_mtp.py --model checkpoints/ling-tiny --out checkpoints/ling-tiny

The main model is frozen (its final-norm hidden states are computed without gradients); only the
parameters under `mtp` train, on the data of scripts/train_tiny.py (addition, sorting, key-value
recall), with the MTP loss (token t+2 from the hidden state at t and the embedding of token t+1) on
the answer tokens, which is where the engine drafts. The checkpoint is rewritten in the HF layout with
the same dtype; every tensor outside `model.layers.{L}` (the MTP layer) is bit-identical (checked
before the file replaces the old one). README.md and training_log.json are kept and a section is
appended to the README. Deterministic for --seed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import train_tiny as tt  # noqa: E402
from lingjax.checkpoint import load_model  # noqa: E402


def mtp_loss(model, tok, tgt, chain_weight):
    """MTP loss on the answer tokens: token t+2 from the main hidden state at t and token t+1 (the
    first draft), plus `chain_weight` times the loss of the layer re-applied on its own output, as the
    engine drafts for k > 1: at position s the hidden input is the MTP output at s-1 (the engine's
    draft 2 at s comes from the MTP output at s-1 and draft 1 = token s+1). In training every
    position of that second pass takes MTP outputs (in the engine the earlier positions' cache holds
    first-pass entries): an approximation. -> (loss, first-draft accuracy)."""
    h = jax.lax.stop_gradient(model.hidden(tok))
    pos = jnp.broadcast_to(jnp.arange(tok.shape[-1]), tok.shape)
    nxt = jnp.concatenate([tok[:, 1:], jnp.zeros_like(tok[:, :1])], axis=-1)
    e = model.embed(nxt)
    o1 = model.mtp[0](e, h, pos)
    l1, acc = tt.masked_ce(model.logits(o1)[:, :-2], tok[:, 2:], tgt[:, 2:])
    if not chain_weight:
        return l1, acc
    hid2 = jnp.concatenate([o1[:, :1], o1[:, :-1]], axis=1)
    o2 = model.mtp[0](e, hid2, pos)
    m2 = tgt[:, 2:] * (jnp.arange(tok.shape[-1] - 2) >= 1)
    l2, _ = tt.masked_ce(model.logits(o2)[:, :-2], tok[:, 2:], m2)
    return l1 + chain_weight * l2, acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "checkpoints", "ling-tiny"))
    ap.add_argument("--out", default=os.path.join(REPO, "checkpoints", "ling-tiny"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-add", type=int, default=64)
    ap.add_argument("--n-sort", type=int, default=32)
    ap.add_argument("--n-recall", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=86)
    ap.add_argument("--chain-weight", type=float, default=0.5,
                    help="weight of the re-applied (draft 2+) MTP loss; 0: first draft only")
    ap.add_argument("--time-limit", type=float, default=9.0, help="stop after this many minutes")
    args = ap.parse_args(argv)

    cfg, model = load_model(args.model, "float32", mtp=True)
    is_mtp = nnx.All(nnx.Param, nnx.PathContains("mtp"))
    graphdef, mtp_params, rest = nnx.split(model, is_mtp, ...)
    warm = min(20, args.steps // 2)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, warm, max(args.steps, warm + 1), args.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=0.0))
    opt_state = tx.init(mtp_params)

    @jax.jit
    def step(p, opt_state, rest, short, recall):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            ls, acc_s = mtp_loss(m, *short, args.chain_weight)
            lr_, acc_r = mtp_loss(m, *recall, args.chain_weight)
            return ls + lr_, (ls, lr_, acc_s, acc_r)
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        upd, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, upd), opt_state, loss, aux

    rng = np.random.default_rng([args.seed, 11])
    t0, hist = time.perf_counter(), []
    for i in range(args.steps):
        short = tt.short_batch(rng, args.n_add, args.n_sort)
        recall = tt.recall_batch(rng, args.n_recall, args.pairs, 16)
        mtp_params, opt_state, loss, aux = step(mtp_params, opt_state, rest, short, recall)
        if i % 25 == 0 or i == args.steps - 1:
            ls, lr_, acc_s, acc_r = (float(a) for a in aux)
            hist.append(dict(step=i, short_mtp=ls, recall_mtp=lr_, short_mtp_acc=acc_s, recall_mtp_acc=acc_r))
            print(f"step {i:4d}  mtp loss short {ls:.3f} (acc {acc_s:.3f})  recall {lr_:.3f} (acc {acc_r:.3f})  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        if time.perf_counter() - t0 > 60 * args.time_limit:
            print(f"time limit reached at step {i}", flush=True)
            break
    minutes = (time.perf_counter() - t0) / 60
    model = nnx.merge(graphdef, mtp_params, rest)

    # Write next to the target, check that only the MTP layer changed, then swap in.
    from safetensors.numpy import load_file
    dtype = json.load(open(os.path.join(args.model, "config.json"))).get("torch_dtype", "bfloat16")
    tmp = args.out.rstrip("/") + ".mtp-tmp"
    tt.export(cfg, model, tmp, "float32" if dtype == "float32" else "bfloat16")
    old = {k: v for f in os.listdir(args.model) if f.endswith(".safetensors")
           for k, v in load_file(os.path.join(args.model, f)).items()}
    new = {k: v for f in os.listdir(tmp) if f.endswith(".safetensors") for k, v in load_file(os.path.join(tmp, f)).items()}
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    assert set(old) == set(new), sorted(set(old) ^ set(new))
    changed = [k for k in old if not np.array_equal(old[k].view(np.uint8), new[k].view(np.uint8))]
    bad = [k for k in changed if not k.startswith(prefix)]
    if bad:
        shutil.rmtree(tmp)
        raise SystemExit(f"refusing to write: tensors outside the MTP layer changed: {bad[:5]}")
    for f in ("README.md", "training_log.json"):
        if os.path.exists(os.path.join(args.model, f)):
            shutil.copy(os.path.join(args.model, f), os.path.join(tmp, f))
    with open(os.path.join(tmp, "README.md"), "a") as f:
        f.write(f"\n## MTP layer retrained for speculative decoding\n\n"
                f"`scripts/train_tiny_mtp.py --steps {args.steps} --seed {args.seed} --chain-weight {args.chain_weight}`: only `{prefix}*` "
                f"({len(changed)} tensors) changed, the main model is bit-identical; {i + 1} steps, {minutes:.1f} min "
                f"on CPU. Final MTP teacher-forced accuracy on answer tokens: addition/sorting "
                f"{hist[-1]['short_mtp_acc']:.3f}, recall {hist[-1]['recall_mtp_acc']:.3f}. Acceptance measured by "
                f"`scripts/spec_tiny.py` (scripts/results/spec_tiny.json).\n")
    with open(os.path.join(tmp, "training_log_mtp.json"), "w") as f:
        json.dump(dict(args=vars(args), minutes=minutes, changed=len(changed), history=hist), f, indent=1)
    if os.path.abspath(args.out) == os.path.abspath(args.model) or os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(changed)} MTP tensors changed in {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
