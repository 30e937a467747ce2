"""Streamed quantization (algorithms/streamed.py) and synthetic models (io/synthetic.py): the streamed result equals
the in-memory one bit for bit, from shards and from the generator alike; no more than one decoder layer is ever
materialized; a kill in any phase (or running out of memory) resumes bit-identically; bad checkpoints are refused
before any work, naming the file."""

from __future__ import annotations

import gc
import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
import lowbit.streaming
from conftest import SIGKILL_AT_SAVE, fails_on_call
from lowbit.algorithms import sequential, streamed
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.sequential import CalibConfig
from lowbit.cli import main
from lowbit.errors import BadFileError, DestinationError, LowbitError
from lowbit.io import stream_writer
from lowbit.io.sources import CheckpointSource, SyntheticSource, WeightSource
from lowbit.io.synthetic import random_tokens, synthetic_config, synthetic_tensor, write_synthetic
from lowbit.recipe import Recipe
from test_gptq_checkpoint import Killed, instrument


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    """The tiny synthetic Llama (4 layers) as an HF checkpoint in 3 shards (a layer's tensors span two of them)."""
    d = tmp_path_factory.mktemp("synth") / "tiny"
    write_synthetic("tiny", d, shard_bytes=150_000, progress=False)
    return d


def recipe(spec: str, text_file: str) -> Recipe:
    return Recipe.parse(spec, calib=CalibConfig(nsamples=4, seqlen=16, text_path=text_file))


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])] == []
    ia, ib = (json.loads((p / "lowbit.json").read_text()) for p in (a, b))
    assert (ia["formats"], ia["rotations"], ia["linear_bpw"], ia["total_bytes"]) == \
        (ib["formats"], ib["rotations"], ib["linear_bpw"], ib["total_bytes"])


# --------------------------------------------------------------------------------------------- the synthetic source


def test_synthetic_shapes_are_the_real_ones():
    from lowbit.io.synthetic import tensor_shapes

    params = {s: sum(torch.Size(v).numel() for v in tensor_shapes(synthetic_config(s)).values()) / 1e9
              for s in ("llama-2-7b", "llama-2-13b", "llama-3-8b", "llama-3-70b")}
    assert {s: round(p, 2) for s, p in params.items()} == {"llama-2-7b": 6.74, "llama-2-13b": 13.02,
                                                          "llama-3-8b": 8.03, "llama-3-70b": 70.55}
    cfg = synthetic_config("llama-3-8b")
    assert (cfg.num_key_value_heads, cfg.vocab_size) == (8, 128256)


def test_synthetic_weights_are_deterministic_and_written_as_generated(synth_dir):
    src = CheckpointSource(synth_dir)
    gen = SyntheticSource("tiny")
    assert src.keys() == gen.keys() and len(set(json.loads(
        (synth_dir / "model.safetensors.index.json").read_text())["weight_map"].values())) == 3
    for key in src.keys():
        assert torch.equal(src.read([key])[key], gen.read([key])[key]), key
    key = "model.layers.1.mlp.down_proj.weight"
    w = gen.read([key])[key]
    assert torch.equal(gen.read_rows(key, 5), w[:5]) and torch.equal(src.read_rows(key, 5), w[:5])
    assert torch.equal(SyntheticSource("tiny", num_layers=2).read([key])[key], w)  # fewer layers, same first ones
    assert not torch.equal(SyntheticSource("tiny", seed=1).read([key])[key], w)
    big = synthetic_tensor("llama-2-7b", 0, "model.layers.0.mlp.down_proj.weight", (4096, 11008), rows=3)
    assert big.shape == (3, 11008) and 0.015 < big.float().std() < 0.04  # std 0.02, a few columns x4
    norm = gen.read(["model.layers.0.input_layernorm.weight"])["model.layers.0.input_layernorm.weight"]
    assert norm.max() > 5  # outlier channels


def test_synthetic_blocks_drawn_in_parallel_are_the_same_values():
    """Row blocks are generated on several threads, each from its own seeded generator: the values do not depend on
    the thread count, and a prefix of rows is a prefix of the tensor."""
    key, size = "model.layers.1.mlp.up_proj.weight", (2500, 64)  # three blocks, the last one partial
    one = synthetic_tensor("tiny", 0, key, size)
    torch.set_num_threads(3)
    assert torch.equal(synthetic_tensor("tiny", 0, key, size), one)
    assert torch.equal(synthetic_tensor("tiny", 0, key, size, rows=1500), one[:1500])


# --------------------------------------------------------------------------------------------- streamed == in memory


@pytest.mark.parametrize("spec", ["gptq_act:int3_g32_asym", "rtn+rht:int4_g32_asym", "imatrix+rht:q4_0"])
def test_streamed_equals_in_memory_bit_for_bit(spec, synth_dir, text_file, tmp_path):
    r = recipe(spec, text_file)
    lowbit.convert(synth_dir, r, tmp_path / "memory", device="cpu", progress=False, stream=False)
    lowbit.convert(synth_dir, r, tmp_path / "shards", device="cpu", progress=False, stream=True)
    lowbit.convert("synthetic:tiny", r, tmp_path / "generated", device="cpu", progress=False)  # no files at all
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "shards")
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "generated")
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # checkpoints retired
    model, _ = lowbit.load(tmp_path / "shards", device="cpu")  # an ordinary lowbit checkpoint
    info = json.loads((tmp_path / "shards" / "lowbit.json").read_text())
    assert info["source"] == str(synth_dir) and info["recipe"] == spec


def test_tied_float32_model_streamed_equals_in_memory(tiny_tokenizer, text_file, tmp_path):
    """A saved transformers model (one safetensors file, float32, LM head tied to the embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    d = tmp_path / "tied"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    r = recipe("gptq:int4_g32_asym", text_file)
    lowbit.convert(d, r, tmp_path / "memory", device="cpu", progress=False, stream=False)
    lowbit.convert(d, r, tmp_path / "streamed", device="cpu", progress=False, stream=True)
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert "lm_head.weight" not in tensors(tmp_path / "streamed")  # stored once, as save() does


def test_host_offload_is_bit_identical(text_file, tmp_path):
    src = SyntheticSource("tiny", num_layers=2)
    plan = uniform_plan(src.skeleton(), "int3_g32_asym")
    samples = random_tokens(src.config.vocab_size, 4, 16)
    reports = {}
    for offload in ("device", "host"):
        reports[offload] = streamed.quantize_streamed(src, plan, tmp_path / offload, rounding="gptq_act",
                                                      device="cpu", samples=samples, offload=offload, progress=False)
    assert reports["host"].offload == "host" and reports["device"].complete
    for a, b in zip(reports["device"].layer_files, reports["host"].layer_files, strict=True):
        ta, tb = load_file(str(a)), load_file(str(b))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# --------------------------------------------------------------------------------------------- memory


def test_at_most_one_decoder_layer_is_ever_materialized(synth_dir, text_file, tmp_path):
    """At every decoder layer's forward (and every read from the source), a gc scan finds at most one decoder layer
    module holding real tensors, at most two live storages of tensors shaped like a down_proj weight (the layer
    being computed and the next one, read ahead on a thread), and no embedding matrix."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = synthetic_config("tiny")
    down, embed = (cfg.hidden_size, cfg.intermediate_size), (cfg.vocab_size, cfg.hidden_size)
    seen = []

    def objects():
        with warnings.catch_warnings():  # isinstance on some modules' deprecated aliases warns
            warnings.simplefilter("ignore")
            return [o for o in gc.get_objects() if isinstance(o, (LlamaDecoderLayer, torch.Tensor))]

    # what earlier tests left alive (a model cached by a fixture, say) is not this conversion's
    gc.collect()
    before = {id(o): weakref.ref(o) for o in objects()}  # by identity: a tensor's == is elementwise

    def scan(where):
        gc.collect()  # count what is referenced, not garbage the cyclic collector has not reached yet
        objs = [o for o in objects() if id(o) not in before or before[id(o)]() is not o]
        layers = [o for o in objs if isinstance(o, LlamaDecoderLayer)
                  and any(not t.is_meta for t in [*o.parameters(), *o.buffers()])]
        live = [o for o in objs if isinstance(o, torch.Tensor) and not o.is_meta and o.dim() == 2]
        def storages(shape):  # distinct memory: a detached alias of a weight is not a second copy
            return len({t.untyped_storage().data_ptr() for t in live if tuple(t.shape) == shape})

        seen.append((where, len(layers), storages(down), storages(embed)))

    class Watched(WeightSource):
        def __init__(self, inner):
            self.inner, self.config, self.name = inner, inner.config, inner.name

        def shapes(self):
            return self.inner.shapes()

        def read(self, keys):
            keys = list(keys)
            scan(f"read {keys[0]}")
            return self.inner.read(keys)

        def read_rows(self, key, rows):
            return self.inner.read_rows(key, rows)

        def tokenizer(self):
            return self.inner.tokenizer()

    me = threading.get_ident()

    def hook(module, args):  # global hook: count this thread's forwards only (a server thread of another test may
        if isinstance(module, LlamaDecoderLayer) and threading.get_ident() == me:  # still be running a model)
            scan("forward")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        # one sample: every scan walks all of the process's objects (seconds each late in the suite)
        r = Recipe.parse("gptq:int4_g32_asym", calib=CalibConfig(nsamples=1, seqlen=16, text_path=text_file))
        lowbit.convert_streamed(Watched(CheckpointSource(synth_dir)), r, tmp_path / "out", device="cpu",
                                progress=False)
    finally:
        handle.remove()
    forwards = [s for s in seen if s[0] == "forward" and s[1]]  # not the capture's, which stops at layer 0
    assert len(forwards) == 4 * 1 * 2  # layers x samples x (Hessian pass, propagation)
    assert max(s[1] for s in seen) == 1, seen
    assert max(s[2] for s in seen if s[0] == "forward") <= 2, seen
    # reads run on the prefetch thread, at any point of the main thread's work (a layer's conversion to float32 or
    # its rounding's temporaries included), so only the modules are counted there: none but that layer's
    assert all(s[1] <= 1 for s in seen if s[0].startswith("read")), seen
    assert all(s[3] == 0 for s in forwards), seen  # embeddings released after the capture


def test_prefetch_reads_one_layer_ahead():
    from lowbit.algorithms.streamed import _Prefetch

    reads = []

    class Source:
        def read(self, keys):
            reads.append(keys)
            return {k: torch.full((2,), float(len(reads))) for k in keys}

    prefetch = _Prefetch(Source(), {3: ["a"], 4: ["b"], 5: ["c"]})
    try:
        assert list(prefetch.take(3)) == ["a"]
        prefetch._ahead[4].result()
        assert reads == [["a"], ["b"]]  # layer 4 was read while layer 3 was handed out
        assert list(prefetch.take(4)) == ["b"] and list(prefetch.take(5)) == ["c"]
        assert reads == [["a"], ["b"], ["c"]]  # each layer read once, none past the last
    finally:
        prefetch.close()


# --------------------------------------------------------------------------------------------- kills and resume


def _counting(monkeypatch):
    calls = []
    real = streamed._quantize_layer

    def counted(layer, names, plan, prefix, index, *a, **kw):
        calls.append(index)
        return real(layer, names, plan, prefix, index, *a, **kw)

    monkeypatch.setattr(streamed, "_quantize_layer", counted)
    return calls


def test_kill_in_every_phase_resumes_bit_identical(text_file, tmp_path, monkeypatch):
    src = SyntheticSource("tiny", num_layers=2)
    r = recipe("gptq_act:int3_g32_asym", text_file)
    clean = tmp_path / "clean"
    lowbit.convert_streamed(src, r, clean, device="cpu", progress=False)

    def rerun(out, **kw):
        calls = []
        with monkeypatch.context() as mp:
            calls = _counting(mp)
            lowbit.convert_streamed(src, r, out, device="cpu", progress=False, **kw)
        assert_same_checkpoint(clean, out)
        assert not Path(f"{out}.partial").exists()
        return calls

    # capture: killed while the embeddings are read, before any layer
    out = tmp_path / "capture"
    with monkeypatch.context() as mp, pytest.raises(Killed):
        mp.setattr(SyntheticSource, "read", lambda self, keys: (_ for _ in ()).throw(Killed("capture")))
        lowbit.convert_streamed(src, r, out, device="cpu", progress=False)
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert rerun(out) == [0, 1]

    # layers: every write point of both layer steps, torn and after it
    calls = []
    with monkeypatch.context() as mp:
        instrument(mp, calls)
        lowbit.convert_streamed(src, r, tmp_path / "counted", device="cpu", progress=False)
    steps = [c for c in calls if "step-" in c]
    assert len(steps) == 8
    for torn in (True, False):
        for k in range(1, len(steps) + 1):
            out = tmp_path / f"layers-{torn}-{k}"
            with monkeypatch.context() as mp, pytest.raises(Killed):
                instrument(mp, [], kill_at=k, torn=torn)
                lowbit.convert_streamed(src, r, out, device="cpu", progress=False)
            done = steps[: k if not torn else k - 1]
            committed = sum(c.startswith("os.replace step-") for c in done)
            assert not out.exists()
            assert rerun(out) == [0, 1][committed:], (k, torn)

    # assembly: killed halfway through model.safetensors; nothing is recomputed on the rerun
    out = tmp_path / "assembly"
    real_write = stream_writer.write_safetensors

    def torn_write(path, pending, metadata=None):
        real_write(path, pending[: len(pending) // 2], metadata)
        raise Killed("assembly")

    with monkeypatch.context() as mp, pytest.raises(Killed):
        mp.setattr(stream_writer, "write_safetensors", torn_write)
        lowbit.convert_streamed(src, r, out, device="cpu", progress=False)
    assert not out.exists() and sorted(p.name for p in Path(f"{out}.partial").iterdir()) == ["step-0", "step-1"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".assembly.tmp")]  # atomic_dir cleaned up
    assert rerun(out) == []

    # after the output's commit, before the checkpoint is retired: the output is whole; --overwrite reassembles
    out = tmp_path / "retire"
    with monkeypatch.context() as mp, pytest.raises(Killed):
        mp.setattr(lowbit.streaming, "discard_work", lambda work: (_ for _ in ()).throw(Killed("retire")))
        lowbit.convert_streamed(src, r, out, device="cpu", progress=False)
    assert_same_checkpoint(clean, out)
    with pytest.raises(DestinationError, match="already exists"):
        lowbit.convert_streamed(src, r, out, device="cpu", progress=False)
    assert rerun(out, overwrite=True) == []


def test_out_of_memory_leaves_a_resumable_checkpoint(text_file, tmp_path, monkeypatch):
    src = SyntheticSource("tiny")
    r = recipe("gptq:int4_g32_asym", text_file)
    lowbit.convert_streamed(src, r, tmp_path / "clean", device="cpu", progress=False)
    real = SyntheticSource.read

    def oom_at_layer_2(self, keys):
        keys = list(keys)
        if keys[0].startswith("model.layers.2."):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, keys)

    out = tmp_path / "out"
    with monkeypatch.context() as mp, pytest.raises(LowbitError, match=r"decoder layer 2: layers 0\.\.1 are saved"):
        mp.setattr(SyntheticSource, "read", oom_at_layer_2)
        lowbit.convert_streamed(src, r, out, device="cpu", progress=False)
    assert sorted(p.name for p in Path(f"{out}.partial").iterdir()) == ["step-0", "step-1"]
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        lowbit.convert_streamed(src, r, out, device="cpu", progress=False, offload="host")  # placement may change
    assert calls == [2, 3]
    assert_same_checkpoint(tmp_path / "clean", out)


_KILLED_CHILD = SIGKILL_AT_SAVE + """
import lowbit
from lowbit.io.sources import SyntheticSource
recipe = lowbit.Recipe.parse("gptq:int4_g32_asym", calib=lowbit.CalibConfig(4, 16, args["text"]))
lowbit.convert_streamed(SyntheticSource("tiny"), recipe, args["out"], device="cpu", progress=False)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_resume_replays_from_the_newest_snapshot(text_file, tmp_path, monkeypatch):
    """Snapshots only when due (here: at layer 1 alone): a kill during layer 3 resumes from layer 1's snapshot,
    replays the committed layer 2 on it and quantizes layer 3 only, to the same bytes as a clean run; the snapshot
    is the only activation file left."""
    r = recipe("gptq_act:int3_g32_asym", text_file)
    lowbit.convert_streamed(SyntheticSource("tiny"), r, tmp_path / "clean", device="cpu", progress=False)
    monkeypatch.setattr(sequential, "SNAPSHOT_SECONDS", float("inf"))
    real_save = sequential._Checkpoint.save
    monkeypatch.setattr(sequential._Checkpoint, "save",
                        lambda self, i, *a, snapshot=False: real_save(self, i, *a, snapshot=snapshot or i == 1))
    real_layer = streamed._quantize_layer

    def killed_at_3(layer, names, plan, prefix, index, *a, **kw):
        if index == 3:
            raise Killed("layer 3")
        return real_layer(layer, names, plan, prefix, index, *a, **kw)

    out = tmp_path / "out"
    with monkeypatch.context() as mp, pytest.raises(Killed):
        mp.setattr(streamed, "_quantize_layer", killed_at_3)
        lowbit.convert_streamed(SyntheticSource("tiny"), r, out, device="cpu", progress=False)
    work = Path(f"{out}.partial")
    assert sorted(p.name for p in work.glob("step-*/inputs*")) == ["inputs.safetensors"]
    assert (work / "step-1" / "inputs.safetensors").exists()
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        lowbit.convert_streamed(SyntheticSource("tiny"), r, out, device="cpu", progress=False)
    assert calls == [3]
    assert_same_checkpoint(tmp_path / "clean", out)


def test_sigkill_mid_layer_resumes_bit_identical(text_file, tmp_path, monkeypatch):
    r = recipe("gptq:int4_g32_asym", text_file)
    lowbit.convert_streamed(SyntheticSource("tiny"), r, tmp_path / "clean", device="cpu", progress=False)
    out = tmp_path / "out"
    args = {"text": text_file, "out": str(out), "kill_at": 6}  # 6: layer 2's inputs
    run = subprocess.run([sys.executable, "-c", _KILLED_CHILD, json.dumps(args)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert sorted(p.name for p in Path(f"{out}.partial").iterdir()) == ["step-0", "step-1", "step-2.tmp"]
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        lowbit.convert_streamed(SyntheticSource("tiny"), r, out, device="cpu", progress=False)
    assert calls == [2, 3]
    assert_same_checkpoint(tmp_path / "clean", out)


# --------------------------------------------------------------------------------------------- bad input


def _damaged(synth_dir: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    d = tmp_path / how
    shutil.copytree(synth_dir, d)
    index = d / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    key = "model.layers.1.mlp.down_proj.weight"
    shard = d / weight_map[key]
    if how == "missing-shard":
        shard.unlink()
        return d, f"{shard} is missing"
    if how == "truncated-shard":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)
        return d, f"{shard} is truncated"
    if how == "index-names-missing-file":
        weight_map[key] = "model-00009-of-00003.safetensors"
        index.write_text(json.dumps({"weight_map": weight_map}))
        return d, f"{d / 'model-00009-of-00003.safetensors'} is missing"
    if how == "dtype-mismatch":
        config = json.loads((d / "config.json").read_text())
        config["dtype"] = "bfloat16"
        (d / "config.json").write_text(json.dumps(config))
        return d, "model-00001-of-00003.safetensors: tensor model.embed_tokens.weight is F16, but .*declares dtype " \
                  "bfloat16"
    if how == "tensor-absent":
        kept = {k: v for k, v in load_file(str(shard)).items() if k != key}
        save_file(kept, str(shard), metadata={"format": "pt"})
        del weight_map[key]
        index.write_text(json.dumps({"weight_map": weight_map}))
        return d, f"model.safetensors.index.json: no tensor {key}"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["missing-shard", "truncated-shard", "index-names-missing-file", "dtype-mismatch",
                                 "tensor-absent"])
def test_bad_checkpoints_are_refused_before_any_work(how, synth_dir, text_file, tmp_path, monkeypatch):
    d, message = _damaged(synth_dir, tmp_path, how)
    monkeypatch.setattr(lowbit.streaming, "quantize_streamed", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "out"
    with pytest.raises(BadFileError, match=message):
        lowbit.convert(d, recipe("gptq:q4_0", text_file), out, device="cpu", progress=False, stream=True)
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_recipes_needing_the_whole_model_are_refused(text_file, tmp_path):
    for spec, why in [("gptq+fused:q4_0", "fused"), ("rtn:nz2_ch/int4_g128_sym@2.5bpw", "mixed-precision")]:
        with pytest.raises(LowbitError, match=f"cannot be streamed: .*{why}"):
            lowbit.convert("synthetic:tiny", spec, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- CLI


def test_cli_synth_then_streamed_quantize(tmp_path, text_file, capsys):
    d, out = tmp_path / "synth", tmp_path / "q"
    assert main(["synth", "--shape", "tiny", "--layers", "2", "--out", str(d), "--shard-gb", "0.0001",
                 "--no-progress"]) == 0
    assert len(list(d.glob("model-*.safetensors"))) > 1
    assert main(["quantize", str(d), "-f", "q4_0", "--method", "gptq", "-o", str(out), "--stream", "--nsamples",
                 "2", "--calib-seqlen", "16", "--calib-text", text_file, "--no-progress"]) == 0
    assert "saved" in capsys.readouterr().out
    model, _ = lowbit.load(out, device="cpu")
    assert json.loads((out / "lowbit.json").read_text())["streamed"]["offload"] == "device"
    assert main(["synth", "--shape", "llama-9", "--out", str(tmp_path / "x")]) == 2
    assert "unknown synthetic shape" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- +ft, streamed


def test_streamed_ft_tunes_each_layer_lowers_kl_and_resumes_bit_identically(text_file, tmp_path, monkeypatch):
    """+ft with --stream tunes every layer right after its rounding (the quantized model's hidden states in, the
    float model's out): each layer's loss falls, the whole model's KL to the float model falls below GPTQ's alone,
    and a kill after the first layer resumes to the same bytes."""
    from lowbit.algorithms.finetune import FinetuneConfig, kl_per_token

    src = SyntheticSource("tiny", num_layers=2)
    calib = CalibConfig(nsamples=4, seqlen=16, text_path=text_file)
    tuned = Recipe.parse("gptq_act+ft:int3_g32_asym", calib=calib, finetune=FinetuneConfig(epochs=8, batch_size=2))
    plain = Recipe.parse("gptq_act:int3_g32_asym", calib=calib)
    res = lowbit.convert_streamed(src, tuned, tmp_path / "ft", device="cpu", progress=False)
    lowbit.convert_streamed(src, plain, tmp_path / "gptq", device="cpu", progress=False)
    losses = res.finetune.block_losses
    assert res.finetune.mode == "stream" and len(losses) == 2 and all(last < first for first, last in losses)
    info = json.loads((tmp_path / "ft" / "lowbit.json").read_text())
    assert info["finetune"]["mode"] == "stream" and info["recipe"] == "gptq_act+ft:int3_g32_asym"

    teacher = src.skeleton()
    from lowbit.io.sources import load_tensors
    load_tensors(teacher, src.keys(), src, "cpu")
    ids = random_tokens(teacher.config.vocab_size, 4, 32, seed=1)
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits
        kl = {name: kl_per_token(ref, lowbit.load(tmp_path / name, device="cpu")[0].float()(input_ids=ids).logits)
              .mean().item() for name in ("ft", "gptq")}
    assert kl["ft"] < 0.9 * kl["gptq"], kl  # measured: 0.00126 vs 0.00149

    out = tmp_path / "resumed"
    with monkeypatch.context() as mp, pytest.raises(Killed):
        mp.setattr(streamed, "_tuned_layer", fails_on_call(streamed._tuned_layer, 2, Killed("layer 1")))
        lowbit.convert_streamed(src, tuned, out, device="cpu", progress=False)
    # (the tail stage, the last 4 layers by default, retunes both: it kept layer 0's inputs)
    assert sorted(p.name for p in Path(f"{out}.partial").iterdir()) == ["step-0", "tail-inputs.safetensors"]
    lowbit.convert_streamed(src, tuned, out, device="cpu", progress=False)
    assert_same_checkpoint(tmp_path / "ft", out)


def test_streamed_ft_warns_when_the_guard_keeps_untuned_values(text_file, tmp_path):
    """A step far too large for this tiny model's logit KL (~3e-5 untuned) raises it: the stage keeps the untuned
    values, the report counts it and the user is told."""
    from lowbit.algorithms.finetune import FinetuneConfig

    src = SyntheticSource("tiny", num_layers=2)
    calib = CalibConfig(nsamples=4, seqlen=16, text_path=text_file)
    tuned = Recipe.parse("gptq_act+ft:int3_g32_asym", calib=calib, finetune=FinetuneConfig(epochs=8, lr=0.3,
                                                                                         batch_size=2))
    with pytest.warns(UserWarning, match="kept the untuned scales"):
        res = lowbit.convert_streamed(src, tuned, tmp_path / "ft", device="cpu", progress=False)
    assert res.finetune.reverted_blocks >= 1


def test_streamed_ft_ends_with_the_final_norm_tuned_on_logits(text_file, tmp_path, monkeypatch):
    """After the last layer, +ft tunes the last layers again with the final norm, by KL through the LM head (the
    tail stage, the one step that sees the logits; its effect is measured on the bundled model by
    benchmarks/finetune_blocks.py): the output carries the tuned norm and layers, and kills during that stage,
    between its files, or after it resume to the same bytes."""
    from lowbit.algorithms.finetune import FinetuneConfig

    src = SyntheticSource("tiny", num_layers=2)
    calib = CalibConfig(nsamples=4, seqlen=16, text_path=text_file)
    # lr 3e-4: a step small for this tiny model's logit KL (3e-5), so that the tail stage's tuning is kept
    ft = FinetuneConfig(epochs=8, lr=3e-4, batch_size=2)
    tuned = Recipe.parse("gptq_act+ft:int3_g32_asym", calib=calib, finetune=ft)
    res = lowbit.convert_streamed(src, tuned, tmp_path / "ft", device="cpu", progress=False)
    # the layers alone leave the report's KL at NaN; tuned tensors: pairs of (scales, norms) per layer + the final norm
    assert math.isfinite(res.finetune.kl_first) and math.isfinite(res.finetune.kl_last)
    assert res.finetune.tuned_tensors % 2 == 1
    norm = tensors(tmp_path / "ft")["model.norm.weight"]
    source_norm = src.read(["model.norm.weight"])["model.norm.weight"]
    assert norm.dtype == torch.float16 and not torch.equal(norm, source_norm)

    for where in ("tune", "write", "save"):  # killed while tuning, between the stage's files, after its commit
        out = tmp_path / f"killed-{where}"
        with monkeypatch.context() as mp, pytest.raises(Killed):
            if where == "write":  # the second tail layer's file: the first is written, the norm (the commit) not
                mp.setattr(streamed, "layer_state", fails_on_call(streamed.layer_state, 2, Killed(where)))
            else:
                mp.setattr(streamed, "tune_tail" if where == "tune" else "save_quantized_streamed", _killer(where))
            lowbit.convert_streamed(src, tuned, out, device="cpu", progress=False)
        work = sorted(p.name for p in Path(f"{out}.partial").iterdir())
        assert ("final-norm.safetensors" in work) == (where == "save")
        assert ("tail-0.safetensors" in work) == (where != "tune")
        lowbit.convert_streamed(src, tuned, out, device="cpu", progress=False)
        assert_same_checkpoint(tmp_path / "ft", out)


def test_streamed_tail_stage_retunes_the_last_layers(text_file, tmp_path):
    """tail_layers=1 of 2 against 0 (the final norm alone): layer 0 is the same bytes, layer 1's scales moved and
    the KL to the float model on the tuning windows is lower."""
    from lowbit.algorithms.finetune import FinetuneConfig, kl_per_token
    from lowbit.io.sources import load_tensors

    src = SyntheticSource("tiny", num_layers=2)
    calib = CalibConfig(nsamples=4, seqlen=16, text_path=text_file)
    for tail in (0, 1):
        cfg = FinetuneConfig(epochs=8, batch_size=2, tail_layers=tail)
        recipe_ = Recipe.parse("gptq_act+ft:int3_g32_asym", calib=calib, finetune=cfg)
        lowbit.convert_streamed(src, recipe_, tmp_path / f"tail{tail}", device="cpu", progress=False)
    a, b = tensors(tmp_path / "tail0"), tensors(tmp_path / "tail1")
    assert all(torch.equal(v, b[k]) for k, v in a.items() if k.startswith("model.layers.0."))
    scales = [k for k in a if k.startswith("model.layers.1.") and k.endswith(".scale")]
    assert scales and all(not torch.equal(a[k], b[k]) for k in scales)

    teacher = src.skeleton()
    load_tensors(teacher, src.keys(), src, "cpu")
    ids = sequential.calibration_set(teacher, src.tokenizer(), calib)
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits
        kl = [kl_per_token(ref, lowbit.load(tmp_path / f"tail{t}", device="cpu")[0].float()(input_ids=ids).logits)
              .item() for t in (0, 1)]
    assert kl[1] < 0.97 * kl[0], kl


def _killer(where: str):  # noqa: ANN202
    def kill(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise Killed(where)

    return kill


def test_float_head_of_a_tied_model_is_its_embeddings(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.io.sources import open_source

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).half()
    model.save_pretrained(tmp_path / "tied")
    tiny_tokenizer.save_pretrained(tmp_path / "tied")
    src = open_source(tmp_path / "tied")
    head = streamed._float_head(src.skeleton(), src)
    assert head.weight.dtype == torch.float32 and not head.weight.requires_grad
    assert torch.equal(head.weight, model.model.embed_tokens.weight.float())


def test_streamed_ft_refusals(text_file, tmp_path):
    from lowbit.algorithms.finetune import FinetuneConfig

    calib = CalibConfig(nsamples=4, seqlen=16, text_path=text_file)
    for spec, mode, why in [("rtn+ft:q4_0", "auto", "GPTQ/imatrix"), ("gptq+ft:q4_0", "model", "model mode")]:
        r = Recipe.parse(spec, calib=calib, finetune=FinetuneConfig(mode=mode))
        with pytest.raises(LowbitError, match=f"cannot be streamed: .*{why}"):
            lowbit.convert("synthetic:tiny", r, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
