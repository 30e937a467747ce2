"""The decode step's rotary table and two-reduction argmax (lowbit.models.step_tables) against what they replace."""

from __future__ import annotations

import pytest
import torch

from lowbit.models import step_tables
from test_fast_decode import PROMPT, reference_greedy, tiny_llama


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 32000])
def test_first_argmax_is_torch_argmax(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g).half().float()  # fp16 values: ties happen
    x[1] = torch.randint(0, 3, (n,), generator=g).float()  # many ties: the first index of the largest wins
    x[2, n // 2:] = float("-inf")
    assert torch.equal(step_tables.first_argmax(x), torch.argmax(x, dim=-1))
    x[2, n // 3] = float("nan")  # NaN counts as the largest, as in torch.argmax
    x[2, -1] = float("nan")
    assert torch.equal(step_tables.first_argmax(x), torch.argmax(x, dim=-1))
    assert torch.equal(step_tables.first_argmax(torch.full((2, n), float("-inf"))), torch.zeros(2, dtype=torch.long))


def test_rotary_table_gives_the_modules_cos_and_sin():
    model = tiny_llama()
    rotary = model.model.rotary_emb
    table = step_tables.install(model, 40, torch.device("cpu"))
    assert model.model.rotary_emb is table and step_tables.install(model, 20, torch.device("cpu")) is table
    x = torch.zeros(2, 1, 64)
    pos = torch.tensor([[3], [39]])
    want = rotary(x, pos)
    assert all(torch.equal(a, b) for a, b in zip(table(x, pos), want, strict=True))  # off: the module itself
    with step_tables.lookups(table):
        got = table(x, pos)
    assert not table.on
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert step_tables.install(model, 80, torch.device("cpu")).cos.shape[0] == 80  # more positions: rebuilt


def test_rotary_table_serves_only_the_thread_that_turned_it_on():
    """A server's ordinary loop runs beside a decoder's eager steps: its positions may pass the table's, and its
    own thread computes them while another thread has the lookups on."""
    import threading

    model = tiny_llama()
    rotary = model.model.rotary_emb
    table = step_tables.install(model, 8, torch.device("cpu"))
    x, far = torch.zeros(1, 1, 64), torch.tensor([[50]])
    out = []
    with step_tables.lookups(table):
        t = threading.Thread(target=lambda: out.append(table(x, far)))
        t.start()
        t.join()
        with pytest.raises(IndexError):
            table(x, far)  # this thread looks up, from the table only
    assert all(torch.equal(a, b) for a, b in zip(out[0], rotary(x, far), strict=True))


def test_decoder_with_tables_gives_the_reference_tokens(monkeypatch):
    from lowbit.serve.fast_decode import StaticDecoder

    model = tiny_llama(vocab=1000)
    want = reference_greedy(model, PROMPT, 12)
    calls = []
    argmax = step_tables.first_argmax
    monkeypatch.setattr(step_tables, "first_argmax", lambda x: calls.append(x.shape) or argmax(x))
    dec = StaticDecoder(model, max_cache_len=32, cuda_graph=False)
    table = model.model.rotary_emb
    assert isinstance(table, step_tables.RotaryTable)
    computed = []
    table.inner.register_forward_hook(lambda *a: computed.append(1))
    assert dec.generate_greedy(PROMPT, 12).tolist() == want
    assert len(calls) == 11 and len(computed) == 1  # the prompt's cos/sin computed, the 11 steps' looked up
