"""Every kernel fastlora launches fits and does not spill on every GPU a QLoRA user has — checked
without a GPU, by compiling what the launchers launch for each target (``fastlora.inspection``).

The matrix: the Llama-3-8B projections, M ∈ {1, 16, 256, 4096}, a training step (forward + backward)
and inference, both strategies, dropout on and off, double-quant and plain absmax, bf16 and fp16, on
sm_80, sm_86, sm_89, sm_90, sm_100, sm_120 and sm_121, and fp16 on sm_75; plus two odd shapes (the
per-element decode) and a dense bf16 base. Shapes that give the same argument specialization
share one compile (all four projections do: every dimension is a multiple of 16), so the cost is one
compile per distinct specialization, spread over the CPU's cores, in one worker process (the kernels
must be decorated as compiled functions there, not as the interpreter's).

The matrix is compiled by the installed Triton and by every other Triton named in
``FASTLORA_EXTRA_TRITONS`` (folders made with ``pip install --no-deps --target DIR triton==X``,
separated by the path separator): Triton 3.6 is the version of the GPU image's PyTorch, and register
allocation, spills and instruction selection change between Triton releases (``.ci/run`` adds it;
``FASTLORA_CI_TRITON36=0`` leaves it out).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from fastlora import inspection as ins
from fastlora.kernels import _launch, configs
from fastlora.kernels.targets import TARGETS, device_target, get_target

GPU_TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "sm_121")
MODEL_TIE = 0.025


def _triton_version(path):
    """The version of the Triton installed in folder ``path`` (None: the one this process imports)."""
    if path is None:
        import triton

        return triton.__version__
    dist = sorted(glob.glob(os.path.join(path, "triton-*.dist-info")))
    if not dist:
        raise RuntimeError(f"FASTLORA_EXTRA_TRITONS: no Triton installed in {path!r}")
    return os.path.basename(dist[-1])[len("triton-"):-len(".dist-info")]


EXTRA_TRITONS = [p for p in os.environ.get("FASTLORA_EXTRA_TRITONS", "").split(os.pathsep) if p]
TOOLCHAINS = [None] + EXTRA_TRITONS


def _matrix_calls(dtypes):
    calls = []
    for dtype in dtypes:
        for nested in (True, False):
            for dropout in (0.0, 0.05):
                calls += ins.calls_for(ins.LLAMA3_8B_SHAPES, ins.DEFAULT_M, dtype=dtype, nested=nested,
                                       dropout=dropout)
        # fp32 adapters without autocast: the adapter products and the LoRA epilogue in fp32
        calls += ins.calls_for(ins.LLAMA3_8B_SHAPES, ins.DEFAULT_M, dtype=dtype, dropout=0.05, adapters="fp32")
    return calls


# shapes no projection has, which take the per-element decode (K odd, blocks straddling rows)
ODD_SHAPES = {"40x80": (40, 80), "45x131": (45, 131)}


_MATRICES: dict = {}


def _compiled_matrix(triton_path):
    """{target: [CallReport]} for the whole matrix compiled by the Triton in ``triton_path`` (None:
    the installed one); one worker process, one compile per specialization."""
    if triton_path not in _MATRICES:
        odd = ins.calls_for(ODD_SHAPES, (1, 16, 300), dtype="bf16")
        dense = ins.calls_for({"q_proj/o_proj": (4096, 4096)}, ins.DEFAULT_M, dtype="bf16", quant="dense")
        # a merged launch's segments are compiled alone only for the model, which the installed Triton's
        # matrix feeds (the strategy thresholds); another Triton's is checked for resources only
        parts = triton_path is None
        reports = ins.run(_matrix_calls(("bf16", "fp16")) + odd + dense, GPU_TARGETS, triton_path=triton_path,
                          parts=parts)
        reports += ins.run(_matrix_calls(("fp16",)), ("sm_75",), triton_path=triton_path, parts=parts)
        out = {}
        for r in reports:
            out.setdefault(r.target, []).append(r)
        # (major, minor) of the Triton that compiled it, for facts that depend on the version
        out["triton"] = tuple(int(p) for p in _triton_version(triton_path).split(".")[:2])
        _MATRICES[triton_path] = out
    return _MATRICES[triton_path]


@pytest.fixture(scope="module", params=TOOLCHAINS, ids=lambda p: f"triton-{_triton_version(p)}")
def matrix(request):
    """The matrix under each Triton checked (the resource and instruction facts)."""
    return _compiled_matrix(request.param)


@pytest.fixture(scope="module")
def model_matrix():
    """The matrix under the installed Triton (what the model's strategy thresholds are set from)."""
    return _compiled_matrix(None)


def test_gpu_images_triton_is_checked():
    """Where extra Tritons are named, one is the GPU image's (3.6), and it is what the worker imports."""
    if not EXTRA_TRITONS:
        pytest.skip("FASTLORA_EXTRA_TRITONS is not set (.ci/run sets it to a Triton 3.6 folder)")
    versions = {_triton_version(p) for p in EXTRA_TRITONS}
    assert any(v.startswith("3.6.") for v in versions), versions
    out = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], text=True,
                         capture_output=True, env=dict(os.environ, PYTHONPATH=EXTRA_TRITONS[0])).stdout
    assert out.strip() == _triton_version(EXTRA_TRITONS[0])      # the folder's Triton is what imports


def _where(r, L):
    c = r.call
    return (f"{r.target} {c.shape_name} M={c.M} {c.strategy} {c.mode} {c.dtype} "
            f"{'nested' if c.nested else 'plain'} p={c.dropout} {L.label} {L.config}")


@pytest.mark.parametrize("target", GPU_TARGETS + ("sm_75",))
def test_every_launch_compiles_fits_and_does_not_spill(matrix, target):
    reports = matrix[target]
    dtypes = {r.call.dtype for r in reports}
    assert dtypes == ({"fp16"} if target == "sm_75" else {"bf16", "fp16"})
    assert {r.call.M for r in reports} >= set(ins.DEFAULT_M)
    limit = TARGETS[target].smem_per_block
    from fastlora.ops import fp32_products_exact

    # fp32 adapter products where this Triton would run them in TF32 never launch (fastlora.patch
    # falls back, lora_linear refuses: the fp32_products rule, checked in test_tile_products_...)
    never = not fp32_products_exact(get_target(target), matrix["triton"])
    bad = []
    n = 0
    for r in reports:
        if never and r.call.adapters == "fp32":
            continue
        for L in r.launches:
            n += 1
            f = L.facts
            if not f.compiled:
                bad.append(f"{_where(r, L)}: does not compile: {f.error}")
            elif f.shared > limit:
                bad.append(f"{_where(r, L)}: {f.shared:,} B shared > {limit:,}")
            elif f.stack or f.local:
                bad.append(f"{_where(r, L)}: spills ({f.stack} B stack, {f.local} B local, {f.registers} regs)")
    assert n > 0
    assert not bad, f"{len(bad)} of {n} launches on {target} fail:\n" + "\n".join(sorted(set(bad))[:40])


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_tile_products_use_tensor_cores(matrix, target):
    """Where a kernel multiplies bf16/fp16 tiles of 16×16 or more, its main loop holds tensor-core
    instructions (HMMA, or HGMMA on sm_90): the frozen product's (the one with the 4-bit decode; the
    GEMV that runs X·Wᵀ at M = 1 none, its 1-row tile is FMA work), and
    the adapter products H, G, dA, dB under autocast (PEFT runs them in the autocast dtype). With fp32
    adapters and no autocast they run in fp32 with IEEE precision, which tensor cores do not compute:
    FMA work by design, and none of those loops may hold a tensor-core instruction."""
    from fastlora.ops import fp32_products_exact

    bad = []
    n_adapter = {"autocast": 0, "fp32": 0}
    # Triton 3.6 / 3.7 compile fp32 tl.dot to tcgen05.mma kind::tf32 on sm_100: there fp32 adapter
    # products never launch (fastlora.patch falls back to PEFT, lora_linear refuses; test_patch.py),
    # and what this checks is that those Tritons really do it, so the rule is not stale
    fp32_exact = fp32_products_exact(get_target(target), matrix["triton"])
    for r in matrix[target]:
        for M_ in r.launches:
            # a merged launch: the kernel that runs holds tensor-core instructions where a segment
            # multiplies 16-bit tiles, and each segment compiled alone shows which
            if M_.parts and r.call.adapters == "autocast" and M_.facts.mma == 0:
                bad.append(f"{_where(r, M_)}: merged launch without tensor cores")
            for L in M_.parts or [M_]:
                _check_tensor_cores(r, L, fp32_exact, n_adapter, bad)
    assert n_adapter["autocast"] and n_adapter["fp32"], n_adapter
    # X·Wᵀ at M = 1 runs the GEMV in every family but sm_75's
    assert bool(n_adapter.get("gemv")) == (target != "sm_75"), n_adapter
    if not fp32_exact:
        assert n_adapter.get("fp32_on_tensor_cores"), ("the fp32_products rule says this Triton puts fp32 "
                                                       "adapter products on tensor cores here; it does not")
    assert not bad, "\n".join(sorted(set(bad))[:20])


def _check_tensor_cores(r, L, fp32_exact, n_adapter, bad):
    """One product (a launch, or a segment of a merged one) of test_tile_products_use_tensor_cores."""
    if L.label in ("Y", "dX") and "gemv" in L.kernel:
        # the GEMV (a tile of fewer than 16 rows: X·Wᵀ at M = 1): its main loop is FMA work by design
        n_adapter["gemv"] = n_adapter.get("gemv", 0) + 1
        assert L.label == "Y" and r.call.M == 1 and L.config["BLOCK_M"] < 16, (r.call, L.label, L.config)
        if L.facts.mma_in_loop:
            bad.append(f"{_where(r, L)}: tensor-core instructions in the GEMV's main loop")
    elif L.label in ("Y", "dX"):
        assert L.config["BLOCK_J"] >= 16 and L.config["BLOCK_I"] >= 16
        if L.facts.mma_in_loop == 0:
            bad.append(f"{_where(r, L)}: no tensor-core instruction in the main loop ({L.facts.loop_found})")
    elif L.label in ("H", "G", "dA", "dB"):
        # (the whole kernel: at M = 1, dA's and dB's reduction over M is one step, no loop)
        n_adapter[r.call.adapters] += 1
        if r.call.adapters == "autocast" and L.facts.mma == 0:
            bad.append(f"{_where(r, L)}: 16-bit adapter product without tensor cores")
        if r.call.adapters == "fp32" and fp32_exact and L.facts.mma != 0:
            bad.append(f"{_where(r, L)}: fp32 adapter product on tensor cores (not IEEE fp32)")
        if r.call.adapters == "fp32" and not fp32_exact and L.label == "H" and r.call.M >= 64:
            n_adapter["fp32_on_tensor_cores"] = n_adapter.get("fp32_on_tensor_cores", 0) + (L.facts.mma > 0)


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_4bit_decode_has_no_fp_contraction(matrix, target):
    """bitsandbytes decodes a double-quantized absmax as code2[q]·absmax2 + offset with two roundings
    (a multiply, then an add); an FMA rounds once and changes the last bit of some absmax, and so of
    whole blocks of W. The 4-bit kernels are compiled with fp fusion off: their PTX holds no fp32 FMA
    (where the adapters run in 16 bits; fp32 adapters without autocast do their IEEE products on FMA).
    The interpreter never contracts, so only the compiled code can show this."""
    n = 0
    bad = []
    for r in matrix[target]:
        c = r.call
        if not c.is_4bit or not c.nested or c.adapters != "autocast":
            continue
        for L in r.launches:
            # a merged launch that dequantizes W: its own PTX (the kernel that runs)
            if any(U.label in ("Y", "dX", "dequant W") for U in L.parts or [L]):
                n += 1
                if L.facts.ptx_fma:
                    bad.append(f"{_where(r, L)}: {L.facts.ptx_fma} fp32 FMA in the PTX")
    assert n > 0
    assert not bad, "\n".join(sorted(set(bad))[:20])


def test_sm75_frozen_product_goes_to_cublas(matrix):
    """On a T4 Triton lowers tl.dot to FMA: the automatic strategy sends the frozen product to cuBLAS
    (dequant + addmm), at every M."""
    from fastlora.ops import choose_strategy

    for M in (1, 16, 256, 4096):
        assert choose_strategy(M, torch.device("cpu"), target=get_target("sm_75")) == "dequant"
    # and what the fused kernels would compile to there really has no tensor-core instruction
    fused = [L for r in matrix["sm_75"] for L in r.launches if L.label in ("Y", "dX")]
    assert fused and all(L.facts.mma == 0 for L in fused)


def test_strategy_thresholds_per_family():
    """The automatic strategy follows each family's threshold (set from the model, configs.py): fused
    below it, dequant from it on; always dequant on sm_75."""
    from fastlora.ops import choose_strategy

    for name in GPU_TARGETS + ("sm_75",):
        t = get_target(name)
        m0 = configs.DEQUANT_MIN_TOKENS[configs.family(t)]
        for M in (1, 16, 256, 4096, 16384, 32768):
            want = "fused" if M < m0 else "dequant"
            assert choose_strategy(M, None, target=t) == want, (name, M, m0)
    assert configs.DEQUANT_MIN_TOKENS["sm_75"] == 0
    # the measured families keep their measured threshold (configs.py: the H200's crossover)
    assert set(configs.MEASURED_THRESHOLDS) == {"sm_90"} and configs.DEQUANT_MIN_TOKENS["sm_90"] == 512


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_strategy_pick_is_the_faster_by_the_model(model_matrix, target):
    """At every M of the matrix, the strategy ``choose_strategy`` picks is the one whose modelled
    training step (the four projections summed; bf16, double quant, dropout 0.05, adapters under
    autocast) is the shorter: the thresholds agree with the kernels as they are now. A family whose
    threshold was measured on its GPU (``configs.MEASURED_THRESHOLDS``) follows the measurement instead:
    there the rule may pick dequant where the model says fused (what the measurement found), and
    nothing else."""
    from fastlora.ops import choose_strategy

    t = get_target(target)
    measured = configs.family(t) in configs.MEASURED_THRESHOLDS
    for M in ins.DEFAULT_M:
        total = {}
        for r in model_matrix[target]:
            c = r.call
            if (c.M, c.mode, c.dtype, c.nested, c.dropout, c.adapters, c.quant) == (
                    M, "train", "bf16", True, 0.05, "autocast", "nf4"):
                total[c.strategy] = total.get(c.strategy, 0.0) + r.model_us
        assert set(total) == {"fused", "dequant"}, total
        pick = choose_strategy(M, None, target=t)
        faster = min(total, key=total.get)
        if measured:
            assert pick == faster or (pick, faster) == ("dequant", "fused"), (target, M, pick, total)
            continue
        # two figures within MODEL_TIE of each other are a tie: the model leaves out latencies, caches
        # and cuBLAS's own tiles, and cannot order them (sm_120 from M = 1024: 0.1-2.4% apart)
        assert pick == faster or total[pick] <= total[faster] * (1 + MODEL_TIE), (
            f"{target} M={M}: picks {pick}, the model says {faster} ({total})")


def test_model_labelled_and_floor_sane(model_matrix):
    for r in model_matrix["sm_90"]:
        assert r.floor_us > 0 and r.model_us >= r.floor_us * 0.999, (r.call, r.model_us, r.floor_us)
        for L in r.launches:
            assert L.model_us >= L.floor_us * 0.999 - 1e-9, (L.label, L.model_us, L.floor_us)


# ----------------------------------------------------------------------------------------------
# what is compiled is what a launch compiles
# ----------------------------------------------------------------------------------------------


def _record(device, target="sm_89", M=16, N=256, K=512, strategy="fused", lora_dtype=torch.bfloat16):
    """The launches of one training step with real tensors on ``device`` (recorded, not run)."""
    g = torch.Generator().manual_seed(0)
    from fastlora.kernels.quant4 import Packed4bit

    n = N * K
    blocks = n // 64
    q = Packed4bit(packed=torch.randint(0, 255, (n // 2,), generator=g, dtype=torch.uint8).to(device),
                   N=N, K=K, blocksize=64, code=torch.randn(16, generator=g).to(device),
                   absmax=torch.randint(0, 255, (blocks,), generator=g, dtype=torch.uint8).to(device),
                   absmax2=torch.rand(-(-blocks // 256), generator=g).to(device),
                   code2=torch.randn(256, generator=g).to(device), offset=torch.zeros(1).to(device))
    x = torch.randn(M, K, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_()
    A = (torch.randn(16, K, generator=g) * 0.1).to(device).requires_grad_()
    B = (torch.randn(N, 16, generator=g) * 0.1).to(device).requires_grad_()
    import fastlora

    with _launch.recording(target) as launches:
        y = fastlora.lora_linear(x, q, A, B, 2.0, dropout_p=0.05, compute_dtype=torch.bfloat16,
                                 lora_dtype=lora_dtype, strategy=strategy, seed=3)
        y.backward(torch.ones_like(y))
    return launches


@pytest.mark.parametrize("adapters", ["autocast", "fp32"])
@pytest.mark.parametrize("strategy", ["fused", "dequant"])
def test_meta_tensors_specialize_like_real_tensors(strategy, adapters):
    """inspect records on meta tensors (no data); Triton's specialization of those launches (types,
    16-byte divisibility of pointers and integers, integers equal to 1, constexprs) is the one it
    computes for the same call on real tensors (fp32 adapters under bf16 autocast, and without)."""
    real = _record("cpu", strategy=strategy,
                   lora_dtype=torch.bfloat16 if adapters == "autocast" else torch.float32)
    c = ins.Call(256, 512, 16, dropout=0.05, strategy=strategy, mode="train", adapters=adapters)
    meta = ins.record_call(c, "sm_89")
    assert [L.name for L in real] == [L.name for L in meta]
    for r, m in zip(real, meta):
        sr, sm = _launch.specialization(r, "sm_89"), _launch.specialization(m, "sm_89")
        assert sr == sm, {k: (sr[k], sm[k]) for k in sr if sr[k] != sm[k]}
        assert r.grid == m.grid
        assert {k: str(v) for k, v in r.kwargs.items()} == {k: str(v) for k, v in m.kwargs.items()}


def test_specialization_sees_alignment_and_ones():
    """The specialization is Triton's own: an integer that is a multiple of 16 is marked divisible,
    one equal to 1 becomes a constant, a pointer at an odd offset loses its alignment attribute."""
    real = _record("cpu", M=1)
    spec = _launch.specialization(real[0], "sm_89")
    assert spec["M"] == ("constexpr", 1)
    assert spec["I"] == ("i32", "D")                       # K = 512
    assert spec["a_ptr"] == ("*bf16", "D")
    L = real[0]
    args = list(L.args)
    i = L.kernel.arg_names.index("a_ptr")
    big = torch.zeros(args[i].numel() + 1, dtype=args[i].dtype)
    args[i] = big[1:].view(args[i].shape)                  # 2-byte offset: not 16-byte aligned
    odd = _launch.specialization(_launch.Launch(L.kernel, L.grid, tuple(args), L.kwargs), "sm_89")
    assert odd["a_ptr"] == ("*bf16", "")                  # no "D"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares with a real launch on this machine's GPU")
def test_compiled_for_own_target_equals_real_launch():
    """On a GPU: what compile_launch builds for the device's own target is the kernel a real launch
    built (same Triton hash)."""
    from triton import knobs

    seen = []

    def hook(*a, **kw):
        seen.append(kw["compile"]["key"])
        return False

    target = device_target(torch.device("cuda"))
    recorded = _record("cuda", target=target)
    old = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = hook
    try:
        import fastlora  # noqa: F401
        for L in recorded:
            L.kernel[L.grid](*L.args, **L.kwargs)
    finally:
        knobs.runtime.jit_post_compile_hook = old
    torch.cuda.synchronize()
    own = {_launch.compile_launch(L, target).hash for L in recorded}
    real = set()
    for L in recorded:
        for caches in L.kernel.device_caches.values():
            real |= {k.hash for k in caches[0].values()}
    assert own <= real


# ----------------------------------------------------------------------------------------------
# the configuration tables and the targets
# ----------------------------------------------------------------------------------------------


def test_every_family_has_every_kind_and_an_unbounded_row():
    for fam, table in configs.TABLES.items():
        assert set(table) == set(configs.KINDS), fam
        for kind, rows in table.items():
            assert rows[-1][0] >= 1 << 40, (fam, kind)
            assert [m for m, _ in rows] == sorted(m for m, _ in rows), (fam, kind)


def test_family_follows_capability_and_shared_memory():
    assert configs.family(TARGETS["sm_75"]) == "sm_75"
    assert configs.family(TARGETS["sm_80"]) == "sm_80"
    assert configs.family(TARGETS["sm_86"]) == configs.family(TARGETS["sm_89"]) == "sm_8x"
    assert configs.family(TARGETS["sm_90"]) == "sm_90"
    assert configs.family(TARGETS["sm_100"]) == "sm_100"
    assert configs.family(TARGETS["sm_120"]) == configs.family(TARGETS["sm_121"]) == "sm_12x"
    # a part with Hopper's capability but a consumer's 99 KB per block gets a small-shared-memory table
    assert configs.family(replace(TARGETS["sm_90"], cc=90, smem_per_block=101376)) == "sm_8x"
    # an A100-class part that reports less shared memory
    assert configs.family(replace(TARGETS["sm_80"], smem_per_block=101376)) == "sm_8x"
    # every family's strategy threshold exists
    assert set(configs.DEQUANT_MIN_TOKENS) == set(configs.TABLES)


def test_select_narrows_to_the_problem():
    t = TARGETS["sm_90"]
    c = configs.select("lora", 4096, 16, 4096, t)
    assert c.block_j == 16
    c = configs.select("frozen4", 1, 4096, 4096, t, trans_w=True)
    assert c.block_m == 16                         # a tensor-core tile: never below 16 rows
    assert configs.select("frozen4", 1, 4096, 4096, t).block_m == 1     # the GEMV row (X·Wᵀ, M = 1)
    assert configs.select("frozen4", 2, 4096, 4096, t).block_m == 16
    assert configs.select("frozen4", 4096, 4096, 4096, t).block_m > 16
    with pytest.raises(ValueError, match="unknown kind"):
        configs.select("nope", 1, 1, 1, t)


def test_get_target_names():
    assert get_target("89") is TARGETS["sm_89"] and get_target(90) is TARGETS["sm_90"]
    assert get_target("SM_80") is TARGETS["sm_80"]
    with pytest.raises(ValueError, match="unknown GPU target 'sm_99'"):
        get_target("sm_99")


class _Props:
    def __init__(self, major, minor, sms, smem, name):
        self.major, self.minor, self.multi_processor_count = major, minor, sms
        self.shared_memory_per_block_optin, self.name = smem, name
        self.shared_memory_per_multiprocessor = smem + 1024


def test_device_target_picks_the_family(monkeypatch):
    """A device's own capability and shared memory decide its table (its figures: tests/test_targets.py)."""
    for props, fam in ((_Props(8, 9, 76, 101376, "NVIDIA GeForce RTX 4080"), "sm_8x"),
                       (_Props(12, 0, 170, 101376, "NVIDIA GeForce RTX 5090"), "sm_12x"),
                       (_Props(12, 1, 48, 101376, "NVIDIA GB10"), "sm_12x"),
                       (_Props(10, 0, 148, 232448, "NVIDIA B200"), "sm_100"),
                       (_Props(9, 0, 114, 232448, "NVIDIA H100 PCIe"), "sm_90"),
                       (_Props(8, 0, 108, 166912, "NVIDIA A100-SXM4-40GB"), "sm_80")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, p=props: p)
        t = device_target("cuda:0")
        assert (t.cc, configs.family(t)) == (props.major * 10 + props.minor, fam), props.name
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: _Props(7, 5, 40, 65536, "Tesla T4"))
    assert not device_target("cuda:0").has_bf16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        device_target("cpu")


# ----------------------------------------------------------------------------------------------
# the SASS reader and the model's formulas
# ----------------------------------------------------------------------------------------------

_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.U8 R8, desc[UR4][R2.64] ;
        /*0030*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   FFMA R3, R4, R5, R3 ;
        /*0060*/                   FFMA R3, R4, R5, R3 ;
        /*0070*/                   FFMA R3, R4, R5, R3 ;
        /*0080*/              @!P1 BRA 0x50 ;
        /*0090*/                   EXIT ;
"""


def test_sass_reader_finds_the_mma_loop():
    s = ins.Sass.parse(_SASS)
    assert len(s.instructions) == 10
    assert sorted(s.loops()) == [(0x20, 0x40), (0x50, 0x80)]
    assert s.count(ins.is_mma) == 1
    assert ins._load_width("LDG.E.128") == 128 and ins._load_width("LDG.E.U8") == 8
    assert ins._load_width("LDG.E") == 32 and ins._load_width("LDG.E.64.CONSTANT") == 64


def test_dequant_model_by_hand():
    """The dequant kernel on sm_90 for a 4096×4096 NF4 double-quant weight, bf16 out: bytes are
    N·K/2 (packed) + N·K/64 (uint8 absmax) + 4·N·K/64/256 (fp32 second level) + 2·N·K (out)."""
    c = ins.Call(4096, 4096, 4096, strategy="dequant", mode="infer")
    launches = ins.record_call(c, "sm_90")
    # W's dequantization runs in the launch of H (a segment of a merged launch)
    deq = [P for L in launches for P in L.parts if P.label == "dequant W"]
    assert len(deq) == 1
    flops, byts, decoded, _, _ = ins._launch_work(deq[0], c)
    nk = 4096 * 4096
    assert byts == nk // 2 + nk // 64 + 4 * (nk // 64 // 256) + 2 * nk
    assert decoded == nk and flops == 0
    f = ins.KernelFacts(compiled=True, num_warps=4, sass_instructions=100, registers=32)
    t = TARGETS["sm_90"]
    rep = ins.model_launch(deq[0], c, t, f)
    assert rep.dram_us == pytest.approx(byts / (t.dram_gbs * 1e9) * 1e6)
    assert rep.floor_us == pytest.approx(rep.dram_us)
    # issue: N·K / 4096 elements per program = 4096 programs / 132 SMs -> 32 per SM; 4 warps x 100
    # instructions each, 4 schedulers
    assert deq[0].programs == 4096
    assert t.sms == 132
    assert rep.issue_us == pytest.approx(32 * 4 * 100 / (4 * t.clock_ghz * 1e9) * 1e6)


def test_step_floor_by_hand():
    c = ins.Call(4096, 4096, 16, mode="train")
    f = ins.KernelFacts(compiled=True, num_warps=4, sass_instructions=1, registers=32)
    t = TARGETS["sm_89"]
    r = ins._call_report(c, t, [], [])
    nk = 4096 * 4096
    w = nk / 2 + nk / 64
    act = (16 * 4096 + 16 * 4096) * 2
    assert r.memory_floor_us == pytest.approx(2 * (w + act) / (t.dram_gbs * 1e9) * 1e6)
    assert r.compute_floor_us == pytest.approx(4 * 16 * nk / (t.tensor_tflops_bf16 * 1e12) * 1e6)
    del f


def test_inspect_command_text_and_json(tmp_path):
    out = tmp_path / "inspect.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastlora", "inspect", "--shapes", "256,512", "--m", "16",
                           "--arch", "sm_89", "--mode", "infer", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "== sm_89" in text and "STEP (model)" in text and "not a measurement" in text
    for line in text.splitlines():
        if "µs" in line:
            assert "model" in line or "floor µs" in line, line
    data = json.loads(out.read_text())
    assert data["targets"]["sm_89"]["smem_per_block"] == 101376
    rep = data["reports"][0]
    assert "not measurements" in rep["note"]
    labels = {r["call"]["strategy"]: [L["label"] for L in r["launches"]] for r in data["reports"]}
    # inference at M = 16 on a 4090: H split over K (one 16x16 tile alone would leave 127 SMs idle),
    # then Y split over K likewise; each tile's last program adds the splits up, in the same launch
    assert labels["fused"] == ["H", "Y"], labels
    assert labels["dequant"] == ["H + dequant W", "Y epilogue"], labels
    fused = next(r for r in data["reports"] if r["call"]["strategy"] == "fused")
    assert all(L["grid"][1] > 1 for L in fused["launches"]), [L["grid"] for L in fused["launches"]]
    for L in rep["launches"]:
        assert {"shared", "registers", "stack", "mma", "ldg_widths", "loop_found"} <= set(L["facts"])


def test_inspect_takes_boards_and_the_new_targets():
    """``--arch`` takes boards as well as archs: each board is inspected with its own figures (an L4
    is an sm_89 with 58 SMs and 300 GB/s, not an RTX 4090), and the Blackwell archs are known."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastlora", "inspect", "--shapes", "256,512", "--m", "16",
                           "--arch", "L4,RTX 4090,sm_100,sm_120,sm_121", "--mode", "infer", "--strategy",
                           "fused", "--summary"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "== L4 (L4: 58 SMs" in text and "300 GB/s" in text, text[:2000]
    assert "== sm_89 (GeForce RTX 4090: 128 SMs" in text
    for arch, board in (("sm_100", "B200"), ("sm_120", "GeForce RTX 5090"), ("sm_121", "GB10")):
        assert f"== {arch} ({board}" in text, arch
    assert "model" in text and "floor" in text


def test_inspect_rejects_bad_arguments():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for args, msg in ((["--arch", "sm_99"], "unknown GPU target"), (["--shapes", "12"], "N,K pairs"),
                      (["--m", "0"], "positive")):
        proc = subprocess.run([sys.executable, "-m", "fastlora", "inspect", *args], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode != 0 and msg in proc.stderr, (args, proc.stderr[-500:])


def test_split_k_moves_the_fewest_bytes():
    """``configs.splits``'s byte model for 132 SMs (an H100's count) and a 16 x 256 x 128 tile (the
    sm_80 / sm_8x M ≤ 16 4-bit row; sm_90 has a 128-wide row of its own). A step reads 16·128 bf16 of
    X and 128·256 4-bit weights = 20,480 B; an extra program writes and re-reads a 16 x 256 fp32
    partial = 32,768 B. Worked by hand:
    - k_proj (N = 1024: 4 tiles, K = 4096: 32 steps): 32 splits, 128 programs of one step each
      (2.7 MB of wave-rounded reads + 4.2 MB of partials, against 86.5 MB-equivalent unsplit: 4
      programs leave 128 SMs idle for 32 steps);
    - q_proj (16 tiles): 8 splits, 128 programs of 4 steps (10.8 + 4.2 MB; 16 splits: 10.8 + 8.4);
    - gate_proj (56 tiles): 2 splits, 112 programs in one wave of 16 steps (43.3 + 3.7 MB; 7 splits:
      3 full waves of 5 steps, 40.6 + 12.8; 8 splits: 4 waves of 4 steps, 43.3 + 14.7);
    - a grid that fills the GPU is not split."""
    t = TARGETS["sm_90"]
    cfg = configs.TileConfig(16, 256, 128, 8, 2, 32)
    pick = lambda tiles: configs.splits(cfg, tiles, 4096, t, 20480, 32768)  # noqa: E731
    assert [pick(4), pick(16), pick(56), pick(512)] == [32, 8, 2, 1]
    # never more splits than steps or than the row allows; no target (the interpreter): the row's
    # split as given, at most one per step
    assert configs.splits(cfg, 1, 256, t, 20480, 32768) == 2
    assert configs.splits(configs.TileConfig(16, 256, 128, 8, 2, 4), 4, 4096, t, 20480, 32768) == 4
    assert configs.splits(cfg, 4, 4096, None, 20480, 32768) == 32
    assert configs.splits(cfg, 4, 256, None, 20480, 32768) == 2
