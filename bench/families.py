"""Forward benchmark per model family: actex capture vs transformers, at real models' shapes.

    python bench/families.py                      # llama3-1b, gemma2-2b, gemma3-1b, qwen3-moe
    python bench/families.py --families gemma3-1b --rows 1 --seq 2048 --reps 3
    python bench/families.py --dry-run            # tiny shapes, one rep: checks the script runs (< 60 s)

For each family, a checkpoint with random weights at a released model's shape is written
once by transformers itself (`XForCausalLM._from_config`, its normal init, float32,
`save_pretrained`; cached under the temp dir, keyed by the config). Then, in one child
process per family (so each family's peak memory is its own), on one float32 token batch:

1. actex: `load_model` + `make_capture_fn` capturing every layer's `hook_resid_post`, plus
   `attn.hook_z` and `mlp.hook_in` of the middle layer (MoE: every layer's
   `mlp.hook_router_logits` too), float32 out, blockwise attention. Compile seconds: the
   ahead-of-time `lower().compile()` (the JSON also has first call minus best call).
2. transformers: the same checkpoint, `from_pretrained(dtype=float32)` (its float32
   safetensors stay memory-mapped, so both models fit at once), its decoder (`model.model`,
   no LM head: actex computes none either) with `output_hidden_states=True` (MoE: and
   `output_router_logits=True`) under `torch.inference_mode`; sdpa attention, eager for
   Gemma 2 (soft-capping). One warm-up call.
3. tokens/s of each: the best of `--reps` rounds, each round one actex call then one
   transformers call, so on a shared machine both see the same load; and their ratio;
4. achieved GFLOP/s: useful FLOPs (every matmul of the blocks; causal attention over the
   keys each query sees, sliding windows clipped; MoE: router + the top-k experts only)
   per token, times tokens/s, over a jitted float32 matmul's GFLOP/s ([1024,2048]x[2048,8192],
   three calls at the start of every round, best round).
5. `--breakdown` (default on): actex's per-layer pieces timed alone on one layer's weights
   (attention per layer kind, the MLP or MoE sublayer; for MoE also the router alone and a
   dense gated MLP of the active experts' width, top_k x moe_intermediate_size): where a
   forward's time goes.

Prints a table and one JSON line (`{"bench": "families", ...}`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' save/load bars

# Real config.json values (transformers 5 spellings), from the published configs of
# meta-llama/Llama-3.2-1B, google/gemma-2-2b, google/gemma-3-1b-pt and Qwen/Qwen3-30B-A3B.
# Qwen3-MoE keeps its routing (128 experts, top-8, norm_topk_prob) and head shape at a
# reduced width and depth; see REDUCED.
FAMILIES: dict[str, dict] = {
    "llama3-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "gemma2-2b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, max_position_embeddings=8192,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, tie_word_embeddings=True, attention_bias=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "gemma3-1b": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, max_position_embeddings=32768,
        query_pre_attn_scalar=256, sliding_window=512, attn_logit_softcapping=None,
        final_logit_softcapping=None, tie_word_embeddings=True, attention_bias=False,
        # sliding_window_pattern 6: every 6th layer global (5, 11, 17, 23), the rest sliding.
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1000000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
    "qwen3-moe": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=512, intermediate_size=1536,
        moe_intermediate_size=192, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=1,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=40960,
        tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
}
LABELS = {"llama3-1b": "Llama-3.2-1B", "gemma2-2b": "Gemma-2-2B", "gemma3-1b": "Gemma-3-1B",
          "qwen3-moe": "Qwen3-30B-A3B routing, reduced"}
# What differs from the released model (everything else is its config.json).
REDUCED = {"qwen3-moe": "hidden 512 (2048), 4 layers (48), 8 heads / 1 kv head (32 / 4), "
                        "moe_intermediate_size 192 (768): same d / expert-width ratio, head_dim 128"}
# transformers' attention per family: Gemma 2's soft-capping needs eager.
HF_ATTENTION = {"gemma2": "eager"}

# --dry-run: each family's features at toy sizes (windows shorter than the sequence).
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
TINY_OVERRIDES = {
    "gemma2-2b": dict(sliding_window=16),
    "gemma3-1b": dict(sliding_window=16, num_key_value_heads=1,
                      layer_types=["sliding_attention", "full_attention"]),
    "qwen3-moe": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, num_key_value_heads=1),
    "llama3-1b": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=32)),
}


def hf_config(name: str, dry_run: bool = False) -> dict:
    config = dict(FAMILIES[name])
    if dry_run:
        config |= TINY | TINY_OVERRIDES.get(name, {})
    return config


# ---------------------------------------------------------------- FLOPs


def attended(lengths, window: int = 0) -> float:
    """Mean keys a query sees: causal within segments of `lengths`, clipped to `window` (0: none)."""
    total = 0
    for n in lengths:
        t = np.arange(1, n + 1)
        total += int(np.minimum(t, window).sum() if window else t.sum())
    return total / sum(lengths)


def flops_per_token(config, lengths) -> float:
    """Useful FLOPs per token of the blocks (no LM head) for segments of `lengths`:
    q/k/v/o projections, scores and weighted values over the attended keys (each layer's
    window), the MLP (MoE: router + top_k experts). For a dense model without windows this
    equals bench/forward.py's count at context = attended(lengths)."""
    d, hd = config.d_model, config.head_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    projections = d * q + 2 * d * kv + q * d
    if config.moe is None:
        mlp = 3 * d * config.d_mlp
    else:
        mlp = d * config.moe.n_experts + config.moe.top_k * 3 * d * config.moe.d_expert
    contexts = {int(w): attended(lengths, int(w)) for w in set(config.layer_windows().tolist())}
    attention = sum(2 * contexts[int(w)] * q for w in config.layer_windows())
    return 2 * (config.n_layers * (projections + mlp) + attention)


# ---------------------------------------------------------------- checkpoints


def checkpoint(name: str, dry_run: bool) -> Path:
    """The family's random checkpoint written by transformers, cached by its config."""
    config = hf_config(name, dry_run)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"actex-bench-{name}-{'tiny-' if dry_run else ''}{key}"
    if (path / "config.json").exists():
        return path
    import torch
    import transformers

    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf = transformers.AutoConfig.for_model(config["model_type"], **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    del model
    partial.rename(path)  # config.json last: a killed run leaves only a .partial dir
    return path


# ---------------------------------------------------------------- timing


from forward import timed  # noqa: E402  (bench/ is on sys.path when run as a script)


def matmul(n: int = 1024, k: int = 2048, m: int = 8192):
    """A jitted float32 matmul [n,k]x[k,m] (warm) and its FLOPs: the machine's practical peak."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, m), np.float32))
    f = jax.jit(lambda a, b: a @ b)
    run = lambda: f(a, b).block_until_ready()  # noqa: E731
    run()
    return run, 2 * n * k * m


def major_faults() -> int:
    """Page faults that read from disk (mmapped weights evicted and read again)."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[9])


def batch(vocab: int, rows: int, seq: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    positions = np.tile(np.arange(seq, dtype=np.int32), (rows, 1))
    return ids, positions, np.ones((rows, seq), np.int32)


def capture_hooks(config) -> list[str]:
    mid = config.n_layers // 2
    hooks = [f"blocks.{l}.hook_resid_post" for l in range(config.n_layers)]
    hooks += [f"blocks.{mid}.attn.hook_z", f"blocks.{mid}.mlp.hook_in"]
    if config.moe is not None:
        hooks += [f"blocks.{l}.mlp.hook_router_logits" for l in range(config.n_layers)]
    return hooks


def prepare_actex(path: Path, rows: int, seq: int) -> dict:
    """Load, compile ahead of time (timed), and make the first call (timed)."""
    import jax

    from actex.model import load_model, make_capture_fn

    start = time.perf_counter()
    loaded = load_model(path, dtype="float32")
    load_s = time.perf_counter() - start
    hooks = capture_hooks(loaded.config)
    arrays = batch(loaded.config.vocab_size, rows, seq)
    capture = make_capture_fn(loaded.config, hooks, "float32")
    start = time.perf_counter()
    compiled = capture.lower(loaded.params, *arrays).compile()
    compile_s = time.perf_counter() - start
    run = lambda: jax.block_until_ready(compiled(loaded.params, *arrays))  # noqa: E731
    start = time.perf_counter()
    run()
    return {"loaded": loaded, "run": run, "compile_s": compile_s, "first_call_s": time.perf_counter() - start,
            "load_s": load_s, "hooks": len(hooks)}


def prepare_transformers(path: Path, model_type: str, rows: int, seq: int) -> dict:
    """Load (float32 safetensors stay memory-mapped) and make one warm-up call."""
    import torch
    import transformers

    attention = HF_ATTENTION.get(model_type, "sdpa")
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation=attention).eval()
    load_s = time.perf_counter() - start
    decoder = model.model  # no LM head (actex computes none)
    ids = torch.as_tensor(batch(model.config.vocab_size, rows, seq)[0], dtype=torch.long)
    moe = hasattr(model.config, "num_experts")
    extra = {"output_router_logits": True} if moe else {}

    def run():
        with torch.inference_mode():
            out = decoder(input_ids=ids, output_hidden_states=True, **extra)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1

    start = time.perf_counter()
    run()
    result = {"model": model, "run": run, "attention": attention, "load_s": load_s,
              "first_call_s": time.perf_counter() - start, "torch_threads": torch.get_num_threads()}
    if moe:
        result["experts"] = getattr(model.config, "_experts_implementation", None)
    return result


def interleaved(runs: dict, reps: int) -> dict:
    """Best seconds of each run over `reps` rounds, the runs alternating within a round
    (on a shared machine all see the same load)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def breakdown(loaded, rows: int, seq: int, reps: int) -> dict:
    """Seconds per call of one layer's pieces on [rows, seq] inputs, each jitted alone."""
    import jax
    import jax.numpy as jnp

    from actex.model.blocks import LayerInputs, attention, mlp
    from actex.model.capture import attention_for
    from actex.model.decoder import rope_tables
    from actex.model.moe import route
    from actex.model.ops import activation, dense, matmul_precision

    config, params = loaded.config, loaded.params
    p = jax.tree.map(lambda w: w[0], params["layers"])
    positions = jnp.asarray(batch(config.vocab_size, rows, seq)[1])
    segments = jnp.ones((rows, seq), jnp.int32)
    h = jax.random.normal(jax.random.key(1), (rows, seq, config.d_model), jnp.float32)
    cos, sin = rope_tables(config, positions)
    kernel = attention_for(config)
    windows, tables = config.layer_windows(), config.layer_rope_index()

    def time_jit(fn, *args) -> float:
        with jax.default_matmul_precision(matmul_precision(jnp.float32)):
            f = jax.jit(fn)
            jax.block_until_ready(f(*args))
            return timed(lambda: jax.block_until_ready(f(*args)), reps)

    pieces = {}
    for window in sorted(set(windows.tolist())):
        layer = int(np.argmax(windows == window))
        table = int(tables[layer])
        global_only = config.windows() == (0,)

        def attn(p, h, w, table=table, global_only=global_only):
            inputs = LayerInputs(cos[table], sin[table], 0 if global_only else w)
            return attention(p, h, config, inputs, lambda q, k, v, w: kernel(q, k, v, segments, window=w))[0]

        label = f"attention (window {window})" if window else "attention (full)"
        pieces[label] = {"seconds": time_jit(attn, p, h, jnp.int32(window)),
                         "layers": int((windows == window).sum())}
    pieces["mlp" if config.moe is None else "moe mlp"] = {
        "seconds": time_jit(lambda p, h: mlp(p, h, config)[0], p, h), "layers": config.n_layers}
    if config.moe is not None:
        x = h.reshape(-1, config.d_model)
        pieces["  of which router + top-k"] = {
            "seconds": time_jit(lambda p, x: route(p, x, config)[1:], p, x), "layers": config.n_layers}
        width = config.moe.top_k * config.moe.d_expert
        keys = jax.random.split(jax.random.key(2), 3)
        wg, wu = (0.02 * jax.random.normal(k, (config.d_model, width)) for k in keys[:2])
        wd = 0.02 * jax.random.normal(keys[2], (width, config.d_model))
        pieces[f"  dense gated MLP of width {width} (same active FLOPs)"] = {
            "seconds": time_jit(lambda h, wg, wu, wd: dense(activation(config.activation, dense(h, wg))
                                                            * dense(h, wu), wd), h, wg, wu, wd),
            "layers": config.n_layers, "reference": True}
    return pieces


def run_family(name: str, args) -> dict:
    """One family, start to end (in a child process unless --in-process)."""
    import gc

    from actex.model.config import ModelConfig

    path = checkpoint(name, args.dry_run)
    config = ModelConfig.from_hf_config(hf_config(name, args.dry_run))
    flops = flops_per_token(config, [args.seq] * args.rows)
    tokens = args.rows * args.seq
    run_matmul, matmul_flops = matmul(*((256, 512, 1024) if args.dry_run else (1024, 2048, 8192)))
    ours = prepare_actex(path, args.rows, args.seq)
    theirs = (None if args.skip_transformers
              else prepare_transformers(path, config.model_type, args.rows, args.seq))
    # Each round: 3 matmuls, actex, transformers. Best of each: the machine's best moment
    # for all three, so the fractions of peak compare like with like on a shared machine.
    runs = {"matmul": lambda: [run_matmul() for _ in range(3)], "actex": ours["run"]}
    runs |= {"transformers": theirs["run"]} if theirs else {}
    faults = major_faults()
    best = interleaved(runs, args.reps)
    faults = major_faults() - faults
    peak = 3 * matmul_flops / best["matmul"] / 1e9

    def summary(side: dict, seconds: float) -> dict:
        kept = {k: v for k, v in side.items() if k not in ("loaded", "run", "model")}
        return kept | {"seconds": seconds, "tokens_per_s": tokens / seconds, "gflops": tokens / seconds * flops / 1e9,
                       "of_peak": tokens / seconds * flops / 1e9 / peak}

    actex = summary(ours, best["actex"]) | {"first_minus_best_s": ours["first_call_s"] - best["actex"]}
    hf = summary(theirs, best["transformers"]) | {"major_faults_in_rounds": faults} if theirs else None
    del theirs, runs
    gc.collect()
    loaded = ours.pop("loaded")
    pieces = breakdown(loaded, args.rows, args.seq, args.reps) if args.breakdown else {}
    del loaded, ours
    gc.collect()
    active = config.moe and config.moe.top_k * 3 * config.d_model * config.moe.d_expert * config.n_layers
    return {
        "family": name, "model": LABELS[name], "model_type": config.model_type, "dry_run": args.dry_run,
        "batch": [args.rows, args.seq], "reduced": REDUCED.get(name) if not args.dry_run else "tiny",
        "params_blocks_m": round(sum(np.prod(s) for s, _ in _layer_shapes(config).values())
                                 * config.n_layers / 1e6, 1),
        "active_expert_params_m": round(active / 1e6, 1) if active else None,
        "gflop_per_token": flops / 1e9, "matmul_gflops": peak,
        "actex": actex, "transformers": hf, "ratio": hf and actex["tokens_per_s"] / hf["tokens_per_s"],
        "breakdown": pieces, "peak_rss_gib": _peak_rss_gib(), "load_average": os.getloadavg(),
    }


def _layer_shapes(config):
    from actex.model.params import layer_param_axes

    return layer_param_axes(config)


def _peak_rss_gib() -> float | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return None


def print_table(results: list[dict]) -> None:
    print(f"\n{'family':11s} {'GFLOP/tok':>9s} {'actex tok/s':>11s} {'transformers tok/s':>18s} "
          f"{'ratio':>6s} {'compile s':>9s} {'actex % peak':>12s} {'hf % peak':>9s} {'matmul GF/s':>11s}")
    for r in results:
        a, t = r["actex"], r["transformers"]
        hf = f"{t['tokens_per_s']:8,.0f} ({t['attention']})" if t else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        hf_peak = f"{t['of_peak']:.0%}" if t else "-"
        print(f"{r['family']:11s} {r['gflop_per_token']:9.2f} {a['tokens_per_s']:11,.1f} {hf:>18s} "
              f"{ratio:>6s} {a['compile_s']:9.1f} {a['of_peak']:12.0%} {hf_peak:>9s} {r['matmul_gflops']:11.0f}")
    for r in results:
        if not r["breakdown"]:
            continue
        pieces = r["breakdown"]
        counted = lambda label: not pieces[label].get("reference") and not label.startswith("  of which")  # noqa: E731
        covered = sum(p["seconds"] * p["layers"] for label, p in pieces.items() if counted(label))
        print(f"\n{r['family']}: per layer, each piece jitted alone on one layer's weights "
              f"(sum {covered:.2f} s; the whole forward took {r['actex']['seconds']:.2f} s):")
        for label, piece in pieces.items():
            sum_s = piece["seconds"] * piece["layers"]
            print(f"  {label:50s} {piece['seconds'] * 1e3:8.1f} ms x {piece['layers']:2d} layers = "
                  f"{sum_s:6.2f} s ({sum_s / covered:4.0%} of the pieces)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="run the families in this process (default: one child each, own peak memory)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 1 x 64 tokens, one rep")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        args.rows, args.seq, args.reps, args.in_process = 1, 64, 1, True
    if args.child:
        print("RESULT " + json.dumps(run_family(args.child, args), default=float))
        return
    import jax

    started = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs); float32, "
          f"batch {args.rows} x {args.seq}, best of {args.reps}; load average {os.getloadavg()[0]:.1f}")
    results = []
    for name in args.families.split(","):
        if name not in FAMILIES:
            parser.error(f"--families: {name!r} unknown; expected some of {','.join(FAMILIES)}")
        if args.in_process:
            result = run_family(name, args)
        else:
            argv = [sys.executable, __file__, f"--child={name}", f"--rows={args.rows}", f"--seq={args.seq}",
                    f"--reps={args.reps}"] + ["--no-breakdown"] * (not args.breakdown) \
                + ["--skip-transformers"] * args.skip_transformers
            child = subprocess.run(argv, capture_output=True, text=True)
            lines = [l for l in child.stdout.splitlines() if l.startswith("RESULT ")]
            if child.returncode or not lines:
                print(child.stdout[-2000:], child.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name}: child exited {child.returncode}")
            result = json.loads(lines[-1].removeprefix("RESULT "))
        a, t = result["actex"], result["transformers"]
        hf = f", transformers {t['tokens_per_s']:.1f} tokens/s" if t else ""
        print(f"{name}: actex {a['tokens_per_s']:.1f} tokens/s (compile {a['compile_s']:.1f} s){hf}; "
              f"peak RSS {result['peak_rss_gib']:.1f} GiB; load average {os.getloadavg()[0]:.1f}", flush=True)
        results.append(result)
    print_table(results)
    print(json.dumps({"bench": "families", "batch": [args.rows, args.seq], "reps": args.reps,
                      "seconds": round(time.perf_counter() - started, 1), "load_average": os.getloadavg(),
                      "results": results}, default=float))


if __name__ == "__main__":
    main()
