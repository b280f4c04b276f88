"""The chunked causal-LM loss (fastlora.loss): HF's loss and gradients without the logits.

Numerics: the loss and the hidden states' gradient against an fp64 reference, within the tolerance
rule of HF's own path (lm_head under autocast, ``ForCausalLMLoss``), over several chunks with a ragged
last one, ignored labels, ``num_items_in_batch``, pre-shifted labels and a custom ignore index. Memory:
no tensor with the vocabulary as last dimension has more rows than a chunk. The model patch: a 4-bit
PEFT Llama patched by ``fastlora.patch`` trains with the chunked loss (logits None), keeps the logits
everywhere else, and unpatch restores the forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastlora
from fastlora import loss as L

from helpers import DEVICE, assert_within_rule
from models import cached_checkpoint, load_llama_4bit, lora_config, randomize_lora_B


def _hf_loss(hidden, head, labels, **kw):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(head(hidden), labels, head.out_features, **kw)


def _case(B=2, S=37, H=96, V=1000, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g) * 2
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) / H ** 0.5)
    head = head.to(dtype).requires_grad_(False)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :5] = -100
    labels[1, 20:23] = -100
    return hidden.to(dtype), head, labels


def _three_ways(hidden, head, labels, autocast, chunk, **kw):
    """(ours, HF's in low precision, fp64 exact): each (loss, d loss / d hidden)."""
    def run(fn, h, hd):
        h = h.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, hd)
        loss.backward()
        return loss.detach(), h.grad

    ours = run(lambda h, hd: L.causal_lm_loss(h, hd, labels, chunk=chunk, **kw), hidden, head)
    lowp = run(lambda h, hd: _hf_loss(h, hd, labels, **kw), hidden, head)
    exact = run(lambda h, hd: _hf_loss(h, hd, labels, **kw), hidden.double(), copy.deepcopy(head).double())
    return ours, lowp, exact


@pytest.mark.parametrize("autocast,dtype", [(True, torch.float32), (False, torch.bfloat16), (False, torch.float32)],
                         ids=["autocast-fp32-model", "bf16-model", "fp32-model"])
@pytest.mark.parametrize("chunk", [1, 16, 1000])
def test_loss_and_gradient_within_rule(autocast, dtype, chunk):
    hidden, head, labels = _case(dtype=dtype)
    (lo, go), (ll, gl), (le, ge) = _three_ways(hidden, head, labels, autocast, chunk)
    assert go.dtype == hidden.dtype
    assert_within_rule("loss", lo, le, ll)
    assert_within_rule("d loss / d hidden", go, ge, gl)
    # the ignored positions (and the last position of each row, which predicts nothing) get no gradient
    assert go[0, :4].abs().sum() == 0 and go[:, -1].abs().sum() == 0
    assert go[0, 5:].abs().sum() > 0


@pytest.mark.parametrize("kw", [{"num_items_in_batch": torch.tensor(50)}, {"num_items_in_batch": 7},
                                {"ignore_index": 3}, {"shift": True}],
                         ids=["num_items_tensor", "num_items_int", "ignore_index", "shift_labels"])
def test_loss_options_as_hf(kw):
    hidden, head, labels = _case(seed=1)
    kw = dict(kw)
    if kw.pop("shift", False):
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        shifted[1, 0] = -100
        kw["shift_labels"] = shifted
    if "ignore_index" in kw:
        labels = labels % 5      # many labels equal the ignore index
    (lo, go), (ll, gl), (le, ge) = _three_ways(hidden, head, labels, True, 16, **kw)
    assert_within_rule("loss", lo, le, ll)
    assert_within_rule("d loss / d hidden", go, ge, gl)


def test_gradient_scales_with_the_incoming_gradient():
    hidden, head, labels = _case(seed=2)
    h = hidden.clone().requires_grad_(True)
    (3.5 * L.causal_lm_loss(h, head, labels, chunk=16)).backward()
    h2 = hidden.clone().requires_grad_(True)
    L.causal_lm_loss(h2, head, labels, chunk=16).backward()
    torch.testing.assert_close(h.grad, 3.5 * h2.grad, rtol=1e-6, atol=0)


class _VocabRows(TorchDispatchMode):
    """Largest row count of any tensor an op returns with the vocabulary as last dimension."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_no_tensor_holds_more_than_a_chunk_of_logits():
    hidden, head, labels = _case(S=64)
    V = head.out_features
    for fn, expect in ((lambda h: L.causal_lm_loss(h, head, labels, chunk=8), 8),
                       (lambda h: _hf_loss(h, head, labels), 2 * 64)):
        h = hidden.clone().requires_grad_(True)
        probe = _VocabRows(V)
        with probe, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h)
        with probe:
            loss.backward()
        # the weight itself is [V, H]: a "row count" of H; only the logits can reach the token count
        assert probe.rows == max(expect, head.in_features), (probe.rows, expect)


def test_chunk_from_the_byte_budget():
    assert L.chunk_tokens(128256) == (256 << 20) // (4 * 128256)
    assert L.chunk_tokens(10 ** 12) == 1


def test_trainable_head_and_bad_labels_are_refused():
    hidden, head, labels = _case()
    with pytest.raises(ValueError, match="labels"):
        L.causal_lm_loss(hidden, head, labels[:, :-3])
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        L.causal_lm_loss(hidden, head, labels)
    assert "trainable" in L.support_reason(_tiny_model_with(head))


def _tiny_model_with(head):
    from transformers import LlamaForCausalLM

    from models import tiny_llama_config

    m = LlamaForCausalLM(tiny_llama_config(hidden_size=head.in_features, vocab_size=head.out_features,
                                           num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1))
    m.lm_head = head
    return m


def test_unsupported_models_keep_their_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    assert L.patch_loss(gpt2) == (None, "architecture: GPT2LMHeadModel (the chunked loss covers "
                                        + ", ".join(L.SUPPORTED) + ")")
    assert "forward" not in gpt2.__dict__
    from models import tiny_llama_config
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM(tiny_llama_config())
    m.forward = lambda *a, **k: None
    assert L.patch_loss(m)[1].startswith("instance_forward")


# ----------------------------------------------------------------------------------------------
# on a 4-bit PEFT model through fastlora.patch
# ----------------------------------------------------------------------------------------------


def _peft_llama():
    from peft import get_peft_model

    model = load_llama_4bit(cached_checkpoint())
    pm = get_peft_model(model, lora_config())
    randomize_lora_B(pm)
    return pm


def _step(pm, ids, labels):
    pm.train()
    pm.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in pm.named_parameters() if p.grad is not None}
    return out, grads


def test_patched_model_trains_with_the_chunked_loss():
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 23), device=DEVICE)
    labels = ids.clone()
    labels[0, :4] = -100
    pm = _peft_llama()
    twin = copy.deepcopy(pm)
    before = {k: v.clone() for k, v in pm.state_dict().items()}

    rep = fastlora.patch(pm)
    assert rep.loss == "LlamaForCausalLM" and rep.loss_skipped is None
    assert "chunked cross-entropy" in rep.summary()
    ref_rep = fastlora.patch(twin, chunked_loss=False)
    assert ref_rep.loss is None and "forward" not in twin.get_base_model().__dict__

    out, grads = _step(pm, ids, labels)
    ref, ref_grads = _step(twin, ids, labels)
    assert out.logits is None and ref.logits is not None
    assert L.loss_calls(pm) == 1
    # the same LoRA kernels on both sides: only the loss's summation order differs
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for n in grads:
        err = (grads[n] - ref_grads[n]).abs().max().item()
        scale = ref_grads[n].abs().max().item()
        assert scale > 0 and err <= 1e-2 * scale, (n, err, scale)

    # every other call returns the logits, as the model's own forward does
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert pm(input_ids=ids, labels=labels).logits is not None          # no grad
        pm.eval()
        assert pm(input_ids=ids, labels=labels).logits is not None          # eval mode
    pm.train()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert pm(input_ids=ids).logits.shape == (2, 23, 128)               # no labels
    assert L.loss_calls(pm) == 1
    pm.eval()
    gen = pm.generate(input_ids=ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 8)

    fastlora.unpatch(pm)
    lm = pm.get_base_model()
    assert "forward" not in lm.__dict__ and L._LOSS_ATTR not in lm.__dict__
    after = pm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_patch_rejects_a_non_bool_chunked_loss():
    pm = _peft_llama()
    with pytest.raises(TypeError, match="chunked_loss"):
        fastlora.patch(pm, chunked_loss="yes")


def test_compiled_training_call_with_labels():
    """torch.compile over a patched model's training call with labels: the chunked loss traces with no
    graph break, gives the eager loss, and compiles once for repeated calls."""
    from torch._dynamo.testing import CompileCounterWithBackend

    pm = _peft_llama()
    fastlora.patch(pm)
    pm.train()
    ids = torch.randint(3, 128, (2, 23), device=DEVICE)

    def loss_of(fn):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return fn(input_ids=ids, labels=ids).loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_of)(pm)
    assert explained.graph_break_count == 0, explained.break_reasons
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(pm, backend=cnt)
    losses = []
    for _ in range(3):
        loss = loss_of(compiled)
        loss.backward()
        losses.append(loss.item())
    eager = loss_of(pm).item()
    assert losses == [eager] * 3
    assert cnt.frame_count == 1
