"""torch.compile on a patched model: the fused op is one opaque custom-op node, and the patcher's
per-call decision traces into guards instead of breaking the graph.

A tiny one-layer 4-bit Llama (one decoder layer keeps inductor's C++ compile short; NF4, double quant, bf16 compute, r = 16, alpha = 32, the seven projections, B
randomized so the LoRA term is not zero) is compiled patched and unpatched. Graph breaks are counted
with ``torch._dynamo.explain``: the patched model may not break more often than PEFT's own. Compiled
outputs and LoRA gradients are compared with the same patched model run eagerly.

Tolerance: the compiled and the eager run execute the same fastlora kernels on the same inputs; what
differs is how the backend computes everything around them (inductor fuses RMSNorm, RoPE, softmax
into its own C++ kernels and rounds in other places). That noise is measured on the unpatched model
(compiled vs eager, PEFT's forward) and the patched gap must be within twice it plus a small atol:
the tolerance rule of tests/helpers.py with PEFT-compiled-vs-eager as the "low precision" error.
"""

from __future__ import annotations

import pytest
import torch

import fastlora

from helpers import DEVICE
from models import PROJECTIONS, cached_checkpoint, load_llama_4bit, lora_config, randomize_lora_B

N_LORA_LAYERS = len(PROJECTIONS)  # one decoder layer
OP = torch.ops.fastlora.lora_linear.default


def _model():
    from peft import get_peft_model

    torch.manual_seed(0)
    model = load_llama_4bit(cached_checkpoint(num_hidden_layers=1), device=DEVICE)
    model.config.use_cache = False
    torch.manual_seed(0)
    pm = get_peft_model(model, lora_config())
    randomize_lora_B(pm, seed=1)
    # training mode, as compiled training runs: in eval mode on the CPU, bitsandbytes' first forward
    # repacks the weights for its CPU inference kernel, and the patched layers then fall back
    # (packed_for_cpu) by design
    return pm.train()


def _ids():
    return torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(2)).to(DEVICE)


def _step(fn, pm, ids):
    """Logits and the LoRA gradients of one forward/backward through ``fn``."""
    pm.zero_grad(set_to_none=True)
    logits = fn(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return logits.detach().float(), grads


def _gap(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def pm():
    return _model()


def test_graph_breaks_not_more_than_unpatched(pm):
    torch._dynamo.reset()
    ids = _ids()
    ref = torch._dynamo.explain(lambda i: pm(input_ids=i).logits)(ids)
    report = fastlora.patch(pm)
    try:
        torch._dynamo.reset()
        ex = torch._dynamo.explain(lambda i: pm(input_ids=i).logits)(ids)
    finally:
        fastlora.unpatch(pm)
    reasons = [b.reason for b in ex.break_reasons]
    assert ex.graph_break_count <= ref.graph_break_count, (
        f"patched model breaks the graph {ex.graph_break_count} times, unpatched {ref.graph_break_count}: {reasons}")
    ops = [n for g in ex.graphs for n in g.graph.nodes if n.op == "call_function" and n.target in (OP, OP.overloadpacket)]
    assert len(ops) == N_LORA_LAYERS, f"{len(ops)} fastlora::lora_linear nodes in the graphs, expected {N_LORA_LAYERS}"
    assert not report.fallback_calls, dict(report.fallback_calls)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager(pm, backend):
    ids = _ids()
    torch._dynamo.reset()
    fullgraph = torch._dynamo.explain(lambda i: pm(input_ids=i).logits)(ids).graph_break_count == 0
    torch._dynamo.reset()
    # PEFT's own forward, eager and compiled: the backend's noise floor
    peft_eager = _step(pm, pm, ids)
    peft_compiled = _step(torch.compile(pm, backend=backend, fullgraph=fullgraph), pm, ids)
    report = fastlora.patch(pm)
    try:
        torch._dynamo.reset()
        eager = _step(pm, pm, ids)
        assert report.fused_calls == N_LORA_LAYERS, report.fused_calls
        compiled_fn = torch.compile(pm, backend=backend, fullgraph=fullgraph)
        compiled = _step(compiled_fn, pm, ids)
        again = _step(compiled_fn, pm, ids)  # a second call runs the cached graph (guards hold)
    finally:
        fastlora.unpatch(pm)
        torch._dynamo.reset()
    # the eager call is counted; calls from the compiled graph are not (a traced count would recompile)
    assert report.fused_calls == N_LORA_LAYERS and not report.fallback_calls, (
        report.fused_calls, dict(report.fallback_calls))
    assert torch.equal(compiled[0], again[0])
    pairs = [("logits", compiled[0], eager[0], peft_compiled[0], peft_eager[0])]
    pairs += [(n, compiled[1][n], eager[1][n], peft_compiled[1][n], peft_eager[1][n]) for n in sorted(eager[1])]
    for name, c, e, pc, pe in pairs:
        noise = _gap(pc, pe)
        scale = max(1.0, e.abs().max().item())
        gap = _gap(c, e)
        assert gap <= 2 * noise + 1e-5 * scale, (
            f"{backend}: {name} compiled vs eager differs by {gap:.3e}; PEFT's compiled vs eager by {noise:.3e}")
    # the patched forward is the fused op, not PEFT's: its outputs differ from PEFT's (rounding) but
    # only within the rule test_patch.py checks layer by layer
    assert _gap(eager[0], peft_eager[0]) <= 0.05 * max(1.0, peft_eager[0].abs().max().item())


def test_compiled_decision_follows_module_state(pm):
    """The per-call decision is traced into guards: a compiled patched model that meets another module
    state (adapters disabled, another scaling) recompiles and computes what the eager patched model
    computes in that state, falling back or running fused as it would."""
    ids = _ids()
    report = fastlora.patch(pm)
    from peft.tuners.lora.layer import LoraLayer

    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == N_LORA_LAYERS
    try:
        torch._dynamo.reset()
        fn = torch.compile(pm, backend="aot_eager")
        on = fn(input_ids=ids).logits.detach()
        with pm.disable_adapter():
            off = fn(input_ids=ids).logits.detach()
            off_eager = pm(input_ids=ids).logits.detach()
        # eager calls only: off_eager fell back in every layer
        assert report.fused_calls == 0, report.fused_calls
        assert report.fallback_calls == {"adapters_disabled": N_LORA_LAYERS}, dict(report.fallback_calls)
        for m in layers:
            m.scaling["default"] *= 3.0
        tripled = fn(input_ids=ids).logits.detach()
        tripled_eager = pm(input_ids=ids).logits.detach()
        assert report.fused_calls == N_LORA_LAYERS, report.fused_calls
    finally:
        for m in layers:
            m.scaling["default"] /= 3.0
        fastlora.unpatch(pm)
        torch._dynamo.reset()
    assert torch.equal(off, off_eager), f"disabled adapters: compiled differs from eager by {_gap(off, off_eager):.3e}"
    assert torch.equal(tripled, tripled_eager), f"scaling x3: compiled differs from eager by {_gap(tripled, tripled_eager):.3e}"
    assert _gap(on, off) > 1e-3 and _gap(tripled, on) > 1e-3, "the adapters change nothing: the checks above are empty"


def test_one_graph_over_many_compiled_training_calls(pm):
    """Ten compiled training steps compile as many graphs as the unpatched model's ten (one, when it
    has no graph break), with fullgraph where the unpatched model allows it: nothing the patched
    forward does per call (its bookkeeping included) may be a value Dynamo guards on."""
    from torch._dynamo.testing import CompileCounterWithBackend

    ids = _ids()
    torch._dynamo.reset()
    fullgraph = torch._dynamo.explain(lambda i: pm(input_ids=i).logits)(ids).graph_break_count == 0

    def frames():
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        fn = torch.compile(pm, backend=counter, fullgraph=fullgraph)
        for _ in range(10):
            _step(fn, pm, ids)
        return counter.frame_count

    unpatched = frames()
    report = fastlora.patch(pm)
    try:
        patched = frames()
        pm(input_ids=ids)  # one eager call: the fused op is what the patched layers run
    finally:
        fastlora.unpatch(pm)
        torch._dynamo.reset()
    assert report.fused_calls == N_LORA_LAYERS and not report.fallback_calls, (
        report.fused_calls, dict(report.fallback_calls))
    assert patched == unpatched, f"10 compiled steps: {patched} graphs patched, {unpatched} unpatched"
    if fullgraph:
        assert patched == 1, f"{patched} graphs for a model without graph breaks"
