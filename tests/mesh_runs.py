"""Run in a subprocess with 8 host-platform devices (XLA_FLAGS): the same tiny run once per
mesh, and the attention kernels under a mesh; prints one JSON line of comparisons.

    python tests/mesh_runs.py WORKDIR [loading] [extract] [attention]

Kept out of pytest's process: the device count is fixed when jax starts.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import jax
import numpy as np

from actex.data import build_tokenizer
from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

MESHES = ("data=1,model=1", "data=8,model=1", "data=4,model=2", "data=2,model=4", "data=1,model=8")
# Every hook kind; blocks.1.hook_resid_pre is blocks.0.hook_resid_post under another name.
HOOKS = [
    "hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid",
    "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.mlp.hook_post",
    "blocks.1.hook_resid_post", "ln_final.hook_normalized",
]
LONG_PROMPT = " ".join(f"cell {i % 30} colour {i % 7};" for i in range(700))  # ~1,900 tokens


def model_dir(work: Path) -> Path:
    """8 query heads, 2 kv heads: kv heads < model axis for model=4 and model=8."""
    path = work / "model"
    if not (path / "config.json").exists():
        tokenizer = build_tokenizer(path, vocab_size=384)
        config = tiny_hf_config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
        write_random_checkpoint(path, config, seed=3)
    return path


def extract_runs(work: Path) -> dict:
    from engine_fixtures import TEXT_ROWS, committed_tensors, write_jsonl

    from actex.engine.prepare import prepare_run
    from actex.engine.worker import extract
    from actex.engine.work import StaticChunks
    from actex.store.commits import read_commits
    from actex.store.folder import open_store

    dataset = write_jsonl(work / "text.jsonl", [{"text": t} for t in [*TEXT_ROWS, LONG_PROMPT]])
    stored, report = {}, {"meshes": {}}
    for spec in MESHES:
        fields = {
            "model": str(model_dir(work)), "output": str(work / "runs"), "run_name": spec.replace(",", "_").replace("=", ""),
            "hooks": HOOKS, "dtype": "float32", "compute_dtype": "float32", "batch_tokens": 4096, "chunk_size": 5,
            "data": {"dataset": str(dataset), "format": "text", "max_seq_len": 2048}, "mesh": spec,
        }
        run = prepare_run(fields)
        extract(run, StaticChunks(run.plan.num_chunks), worker="w0")
        stored[spec] = committed_tensors(run.config.run_url)
        records = read_commits(open_store(run.config.run_url)).values()
        layers = run.model.params["layers"]
        report["meshes"][spec] = {
            "mesh": dict(run.mesh.shape),
            "wk_spec": str(layers["wk"].sharding.spec), "wq_spec": str(layers["wq"].sharding.spec),
            "slots": [r.token_slots for r in records], "tokens": [r.tokens for r in records],
        }
    reference = stored[MESHES[0]]
    widths = {hook: 128 if "mlp.hook_post" in hook else 64 for hook in HOOKS}
    for spec in MESHES[1:]:
        entry = report["meshes"][spec]
        entry["samples"] = sorted(stored[spec]) == sorted(reference)
        entry["identical"], entry["max_abs"], entry["max_rel"] = {}, {}, {}
        for hook in HOOKS:
            same, worst, worst_rel = True, 0.0, 0.0
            for sample, tensors in reference.items():
                ours = np.frombuffer(stored[spec][sample][hook], np.float32).reshape(-1, widths[hook])
                ref = np.frombuffer(tensors[hook], np.float32).reshape(-1, widths[hook])
                same &= ours.tobytes() == ref.tobytes()
                worst = max(worst, float(np.abs(ours - ref).max(initial=0.0)))
                worst_rel = max(worst_rel, float((np.abs(ours - ref).max(initial=0.0)) / (np.abs(ref).max(initial=0.0) + 1e-30)))
            entry["identical"][hook], entry["max_abs"][hook], entry["max_rel"][hook] = bool(same), worst, worst_rel
    return report


def attention_runs(work: Path) -> dict:
    """Each kernel against the blockwise one, under several meshes, on rows of packed
    segments and one long segment (Pallas kernels in interpret mode on CPU)."""
    from actex.model import load_model, make_capture_fn
    from actex.model.mesh import global_batch, make_mesh

    rows, seq = 4, 640  # 640: more than one 512-token blockwise block; 5 Pallas tiles of 128
    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, 384, (rows, seq)).astype(np.int32)
    segment_ids = np.zeros((rows, seq), np.int32)
    positions = np.zeros((rows, seq), np.int32)
    for r, cuts in enumerate([(0, 100, 350, 600), (0, 640), (0, 37, 300), (0, 520, 560)]):
        for number, (a, b) in enumerate(zip(cuts, cuts[1:]), start=1):
            segment_ids[r, a:b], positions[r, a:b] = number, np.arange(b - a)
    hooks = ["blocks.1.hook_attn_out", "blocks.1.hook_resid_post"]
    report = {}
    cases = [("xla", (4, 2)), ("splash", (1, 1)), ("splash", (2, 4)), ("pallas_gpu", (1, 1)), ("pallas_gpu", (2, 2))]
    for backend, (data, model) in cases:
        mesh = make_mesh(model, data=data)
        loaded = load_model(model_dir(work), mesh=mesh)
        inputs = global_batch((token_ids, positions, segment_ids), mesh)
        ref = make_capture_fn(loaded.config, hooks, "float32", mesh=mesh, attention="blockwise")(loaded.params, *inputs)
        out = make_capture_fn(loaded.config, hooks, "float32", mesh=mesh, attention=backend)(loaded.params, *inputs)
        real = segment_ids > 0
        report[f"{backend}@{data}x{model}"] = {
            hook: float(np.abs(np.asarray(out[hook]) - np.asarray(ref[hook]))[real].max()) for hook in hooks
        }
    report.update(windowed_softcapped_runs(segment_ids[:, :256]))
    return report


def windowed_softcapped_runs(segment_ids: np.ndarray) -> dict:
    """The kernels alone on Gemma-2-like layers (custom scale, soft-capped logits, a sliding
    window of 48 tokens or none, the window traced as in the layer scan) under meshes whose
    model axis splits the 2 kv heads (2x2) or not (2x4), against the blockwise kernel."""
    from jax.sharding import NamedSharding, PartitionSpec

    from actex.model.attention import make_attention
    from actex.model.mesh import make_mesh

    rng = np.random.default_rng(1)
    rows, seq = segment_ids.shape
    q = (2 * rng.standard_normal((rows, seq, 8, 16))).astype(np.float32)
    k = rng.standard_normal((rows, seq, 2, 16)).astype(np.float32)
    v = (rng.standard_normal((rows, seq, 2, 16)) / 4).astype(np.float32)  # outputs well below 1
    features = dict(scale=0.2, softcap=2.0, windows=(0, 48))
    reference = jax.jit(lambda q, k, v, s, w: make_attention("blockwise", **features)(q, k, v, s, window=w))
    report = {}
    for backend, (data, model) in [("splash", (2, 2)), ("splash", (2, 4)), ("xla", (2, 2))]:
        mesh = make_mesh(model, data=data)
        attend = make_attention(backend, mesh, n_heads=8, n_kv_heads=2, **features)
        run = jax.jit(lambda q, k, v, s, w: attend(q, k, v, s, window=w))
        placed = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))) for x in (q, k, v, segment_ids)]
        report[f"{backend}+window+softcap@{data}x{model}"] = {
            f"window {w}": float(np.abs(np.asarray(run(*placed, np.int32(w)))
                                        - np.asarray(reference(q, k, v, segment_ids, np.int32(w)))).max())
            for w in features["windows"]
        }
    return report


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def loading_runs(work: Path) -> dict:
    """Peak RSS of load_model on a wide tiny checkpoint (150 MB in float32), per mesh.

    The peak is reset (/proc/self/clear_refs) just before each load and read from VmHWM
    after it. On CPU the device buffers are host memory too, so the rise must stay within
    their bytes plus weights.loading_peak_bytes; reading the whole checkpoint into host
    memory first (what loading did before) doubles it.
    """
    from actex.model import load_model
    from actex.model.mesh import make_mesh, param_shardings
    from actex.model.config import ModelConfig
    from actex.model.weights import loading_peak_bytes

    path = work / "wide"
    hf = tiny_hf_config(vocab_size=4096, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=2048)
    write_random_checkpoint(path, hf, seed=0)
    config = ModelConfig.from_hf_config(hf)
    report = {"checkpoint_bytes": (path / "model.safetensors").stat().st_size}
    jax.numpy.zeros(8).block_until_ready()  # runtime up before the first measurement
    for data, model in ((1, 8), (1, 1), (4, 2)):
        mesh = make_mesh(model, data=data)
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        base = _status_kib("VmRSS") * 1024
        loaded = load_model(path, mesh=mesh)
        rise = _status_kib("VmHWM") * 1024 - base
        device = sum(s.data.nbytes for leaf in jax.tree.leaves(loaded.params) for s in leaf.addressable_shards)
        bound = loading_peak_bytes(config, param_shardings(config, mesh), np.float32, np.float32, config.n_layers)
        report[f"{data}x{model}"] = {"rise": rise, "device": device, "bound": bound}
        del loaded
    return report


FAMILY_MESHES = ((1, 1), (2, 2), (1, 4))


def family_runs(work: Path) -> dict:
    """Each family checkpoint under WORKDIR/families (written by the test with transformers)
    on data=2,model=2 and data=1,model=4 against one device: {family: {mesh: worst relative
    error}} over every layer's residual stream and the per-family hook kinds."""
    from actex.model import load_model, make_capture_fn
    from actex.model.hooks import hook_width
    from actex.model.mesh import global_batch, make_mesh

    rng = np.random.default_rng(0)
    lengths = (40, 24)
    segment_ids = np.stack([np.repeat([1, 2], lengths), np.ones(sum(lengths))]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(n) for n in lengths]), np.arange(sum(lengths))]).astype(np.int32)
    report = {}
    for path in sorted((work / "families").iterdir()):
        outputs = {}
        for data, model in FAMILY_MESHES:
            mesh = make_mesh(model, data=data, devices=jax.devices()[: data * model])
            loaded = load_model(path, dtype="float32", mesh=mesh)
            config = loaded.config
            token_ids = rng.integers(0, config.vocab_size, segment_ids.shape).astype(np.int32) if not outputs \
                else outputs["inputs"]
            kinds = ["hook_resid_post", "attn.hook_z", "mlp.hook_in", "ln1.hook_normalized", "attn.hook_rot_k",
                     "mlp.hook_post", "mlp.hook_router_logits"]
            hooks = []
            for layer in range(config.n_layers):
                for kind in kinds:
                    try:
                        hook_width(config, f"blocks.{layer}.{kind}")
                        hooks.append(f"blocks.{layer}.{kind}")
                    except ValueError:  # not this family's MLP kind
                        pass
            inputs = global_batch((token_ids, positions, segment_ids), mesh)
            out = make_capture_fn(config, hooks, "float32", mesh=mesh)(loaded.params, *inputs)
            outputs["inputs"] = token_ids
            outputs[(data, model)] = {hook: np.asarray(value) for hook, value in out.items()}
        one = outputs[(1, 1)]
        report[path.name] = {
            f"{data}x{model}": max(float(np.abs(outputs[(data, model)][h] - one[h]).max() / np.abs(one[h]).max())
                                   for h in one)
            for data, model in FAMILY_MESHES[1:]}
    return report


if __name__ == "__main__":
    work = Path(sys.argv[1])
    assert len(jax.devices()) == 8, jax.devices()
    runs = {"loading": loading_runs, "extract": extract_runs, "attention": attention_runs, "families": family_runs}
    # loading first: its peak-memory reading wants a process that has not run much yet.
    print(json.dumps({what: runs[what](work) for what in sys.argv[2:]}))
