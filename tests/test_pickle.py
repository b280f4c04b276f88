"""A patched model survives what users do with models: ``torch.save(model)`` / ``torch.load``,
``pickle`` of one layer, ``copy.deepcopy``. After loading it is still patched (the layers' forward is
``functools.partial(fastlora.patcher._patched_forward, layer)``, which pickles by name), its report
lists the layers under ``restored``, and it gives the same outputs as before saving, through the
fused op."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import fastlora
from fastlora.patcher import _STATE_ATTR, is_patched

from helpers import DEVICE
from models import PROJECTIONS, cached_checkpoint, load_llama_4bit, lora_config, randomize_lora_B

N_LORA_LAYERS = 2 * len(PROJECTIONS)


def _patched_llama():
    from peft import get_peft_model

    torch.manual_seed(0)
    model = load_llama_4bit(cached_checkpoint(), device=DEVICE)
    torch.manual_seed(0)
    pm = get_peft_model(model, lora_config(lora_dropout=0.05))
    randomize_lora_B(pm, seed=1)
    report = fastlora.patch(pm)
    assert len(report.patched) == N_LORA_LAYERS
    return pm.train(), report


def _report_of(model):
    reports = {id(m.__dict__[_STATE_ATTR].report): m.__dict__[_STATE_ATTR].report
               for m in model.modules() if is_patched(m)}
    assert len(reports) == 1, "the layers of one patch() call share one report"
    return next(iter(reports.values()))


def _forward(model, ids):
    torch.manual_seed(3)  # the dropout seed: the same mask on both sides
    return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def llama():
    return _patched_llama()


def test_torch_save_load_stays_patched(llama):
    pm, report = llama
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    before = _forward(pm, ids)
    assert report.fused_calls == N_LORA_LAYERS and not report.fallback_calls
    buf = io.BytesIO()
    torch.save(pm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    patched = [n for n, m in loaded.named_modules() if is_patched(m)]
    assert len(patched) == N_LORA_LAYERS, f"{len(patched)} layers still patched after torch.load"
    rep = _report_of(loaded)
    assert rep is not report and sorted(rep.restored) == sorted(report.patched)
    assert rep.fused_calls == report.fused_calls  # the counts travelled with the model
    after = _forward(loaded, ids)
    assert rep.fused_calls == 2 * N_LORA_LAYERS and not rep.fallback_calls, (rep.fused_calls, dict(rep.fallback_calls))
    assert torch.equal(after, before), f"outputs differ after torch.load by {(after - before).abs().max()}"
    # the loaded model unpatches like the original; PEFT's forward then runs
    assert len(fastlora.unpatch(loaded)) == N_LORA_LAYERS
    assert not any(is_patched(m) for m in loaded.modules())
    assert "forward" not in loaded.base_model.model.model.layers[0].self_attn.q_proj.__dict__


def test_deepcopy_is_patched_and_independent(llama):
    pm, report = llama
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    twin = copy.deepcopy(pm)
    rep = _report_of(twin)
    assert rep is not report and len(rep.restored) == N_LORA_LAYERS
    calls = report.fused_calls
    a, b = _forward(pm, ids), _forward(twin, ids)
    assert torch.equal(a, b)
    assert report.fused_calls == calls + N_LORA_LAYERS and rep.fused_calls == calls + N_LORA_LAYERS
    # the copy's layers call the copy's modules, not the original's
    layer = twin.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.forward.args[0] is layer


@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_pickle_one_layer(kind):
    from test_patch import K_IN, layer_of, make_model, rand

    pm = make_model(kind)
    fastlora.patch(pm)
    layer = layer_of(pm)
    x = rand(3, K_IN, dtype=torch.bfloat16)
    y = layer(x)
    clone = pickle.loads(pickle.dumps(layer))
    assert is_patched(clone) and clone.forward.args[0] is clone
    rep = clone.__dict__[_STATE_ATTR].report
    y2 = clone(x)
    assert rep.fused_calls == 2 and not rep.fallback_calls, (rep.fused_calls, dict(rep.fallback_calls))
    assert torch.equal(y, y2)
