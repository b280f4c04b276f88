"""Measured selection (fastlora.tuning): the pick, the cache file, when tuning may run, `fastlora tune`.

On a CPU nothing can be timed, so an injected timer stands in for CUDA events: it returns the times
a test sets per candidate (and, where a test says so, runs the candidate once, so the op's real
phases run in Triton's interpreter). The GPU test at the end times real candidates.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
import warnings

import bitsandbytes.functional as bnbF
import pytest
import torch
from helpers import DEVICE, ON_GPU, assert_within_rule
from triton.runtime.errors import OutOfResources

from fastlora import ops, tuning
from fastlora import reference as ref
from fastlora.format import from_bnb
from fastlora.kernels import configs
from fastlora.kernels.configs import TileConfig
from fastlora.kernels.lora_matmul import dropout_keep_mask
from fastlora.kernels.targets import get_target

SM90 = get_target("sm_90")


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """Every test starts with no tuning state, its own cache folder and the default mode."""
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTLORA_TUNE", raising=False)
    tuning.reset()
    yield
    tuning.set_timer(None)
    tuning.reset()


def _packed(N=96, K=128, seed=0, blocksize=64, nested=True):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(torch.bfloat16).to(DEVICE)
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    return from_bnb(packed, qs)


def _problem(phase="forward", M=40, **kw):
    return tuning.Problem(phase, _packed(), M, torch.bfloat16, torch.bfloat16, torch.bfloat16, **kw)


class _NoRun:
    """A runner whose calls do nothing (the timer decides the times)."""

    def __init__(self, problem):
        pass

    def fn(self, candidate):
        return lambda: None

    def close(self):
        pass


def _timer_from(times_us, calls=None, run=False):
    """A timer answering ``times_us[candidate name]`` (µs; a name missing: 1000 µs), optionally running
    the candidate once; records the names it was asked for."""
    def timer(cand, fn, budget_s):
        if calls is not None:
            calls.append(cand.name)
        if run:
            fn()
        return times_us.get(cand.name, 1000.0) * 1e-3
    return timer


# ----------------------------------------------------------------------------------------------
# candidates and the pick
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 16, 512, 8192])
@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_candidates(M, phase):
    """dequant first, then the static table's tile exactly as configs.select narrows it (the fallback
    is always among the candidates), then distinct alternatives of the same kind."""
    N, K = 1024, 4096
    J, I = tuning.product_dims(phase, N, K)
    cands = tuning.candidates("frozen4", M, J, I, SM90)
    assert cands[0].strategy == "dequant" and cands[0].tile is None
    assert cands[1] == tuning.Candidate("fused", configs.select("frozen4", M, J, I, SM90), "table")
    tiles = [c.tile for c in cands[1:]]
    assert len(tiles) == len(set(tiles)) == 1 + tuning.MAX_ALTERNATIVES, [c.name for c in cands]
    rows = {cfg for _, cfg in configs.TABLES["sm_90"]["frozen4"]}
    for c in cands[2:]:
        assert c.strategy == "fused" and c.origin
        # narrowed like select(): no tile wider than the problem (beyond 16), BLOCK_I as the table's
        assert c.tile.block_m <= max(16, 1 << (M - 1).bit_length())
        assert c.tile.block_i in {cfg.block_i for cfg in rows}
    assert len({c.name for c in cands}) == len(cands)


def test_pick_is_the_fastest():
    p = _problem()
    names = [c.name for c in tuning.candidates(p.kind, p.M, p.N, p.K, SM90)]
    times = {n: 100.0 + 10 * i for i, n in enumerate(names)}
    times[names[3]] = 42.0                         # an alternative tile
    e = tuning.tune(p, SM90, timer=_timer_from(times), make_runner=_NoRun)
    assert e["pick"] == names[3] and e["strategy"] == "fused"
    assert e["fused_tile"] == tuning.tile_tuple(tuning.candidates(p.kind, p.M, p.N, p.K, SM90)[3].tile)
    assert e["us"] == pytest.approx({n: times[n] for n in names})
    times["dequant"] = 41.0                        # now cuBLAS wins; the best fused tile is still kept
    e = tuning.tune(p, SM90, timer=_timer_from(times), make_runner=_NoRun)
    assert e["pick"] == "dequant" and e["strategy"] == "dequant"
    assert e["fused_tile"] == tuning.tile_tuple(tuning.candidates(p.kind, p.M, p.N, p.K, SM90)[3].tile)


def test_ties_go_to_the_earlier_candidate_every_time():
    p = _problem(M=512)
    cands = tuning.candidates(p.kind, p.M, p.N, p.K, SM90)
    same = {c.name: 50.0 for c in cands}
    picks = {tuning.tune(p, SM90, timer=_timer_from(same), make_runner=_NoRun)["pick"] for _ in range(5)}
    assert picks == {"dequant"}
    later = {c.name: 50.0 for c in cands}
    later["dequant"] = 60.0
    later[cands[1].name] = 60.0                    # alternatives 2.. tie: the first of them
    assert tuning.tune(p, SM90, timer=_timer_from(later), make_runner=_NoRun)["pick"] == cands[2].name
    # fastest() itself: failed (None) and non-finite times never win; order breaks ties
    a, b, c = cands[:3]
    assert tuning.fastest([(a, None), (b, 2.0), (c, 2.0)])[0] == b
    assert tuning.fastest([(a, math.nan), (b, 3.0), (c, 1.0)])[0] == c
    with pytest.raises(ValueError):
        tuning.fastest([(a, None)])


def _out_of_shared_memory():
    return OutOfResources(300000, 232448, "shared memory")


def test_an_alternative_that_does_not_launch_is_skipped_and_the_budget_bounds_the_alternatives():
    p = _problem()
    cands = tuning.candidates(p.kind, p.M, p.N, p.K, SM90)

    def timer(cand, fn, budget_s):
        if cand.name == cands[2].name:
            raise _out_of_shared_memory()
        return 1e-3 * (5.0 if cand.name == cands[3].name else 9.0)

    e = tuning.tune(p, SM90, timer=timer, make_runner=_NoRun)
    assert e["us"][cands[2].name] is None and "shared memory" in e["errors"][cands[2].name]
    assert e["pick"] == cands[3].name and tuning.complete(e)
    # no time left: dequant and the table's tile only
    calls = []
    e = tuning.tune(p, SM90, timer=_timer_from({}, calls), make_runner=_NoRun, budget_s=0.0)
    assert calls == [cands[0].name, cands[1].name]
    assert all(e["errors"][c.name] == tuning.BUDGET for c in cands[2:]) and not tuning.complete(e)


@pytest.mark.parametrize("which,exc", [(0, RuntimeError("CUDA error: an illegal memory access was encountered")),
                                       (0, _out_of_shared_memory()),
                                       (1, _out_of_shared_memory()),
                                       (2, RuntimeError("CUDA error: unspecified launch failure")),
                                       (3, TypeError("a bug"))])
def test_other_failures_are_not_a_tile_that_does_not_launch(which, exc):
    """Only an alternative tile may fail (and only to build or load); dequant and the table's tile
    are the fallback, and a CUDA error or a bug says nothing about a tile: they propagate."""
    p = _problem()
    cands = tuning.candidates(p.kind, p.M, p.N, p.K, SM90)

    def timer(cand, fn, budget_s):
        if cand.name == cands[which].name:
            raise exc
        return 1e-3
    with pytest.raises(type(exc)):
        tuning.tune(p, SM90, timer=timer, make_runner=_NoRun)


class _CompilingRunner(_NoRun):
    """Each candidate's first call takes ``COMPILE_S`` (Triton compiling the tile), later calls nothing."""

    COMPILE_S = 0.03

    def __init__(self, problem):
        self.compiled = set()

    def fn(self, candidate):
        def call():
            if candidate.name not in self.compiled:
                self.compiled.add(candidate.name)
                time.sleep(self.COMPILE_S)
        return call


def test_compiling_a_candidate_is_not_measuring_time():
    """A candidate's first call compiles it; a budget smaller than one compile still measures every
    candidate, since only the timed calls count."""
    p = _problem()
    cands = tuning.candidates(p.kind, p.M, p.N, p.K, SM90)

    def timer(cand, fn, budget_s):
        fn()                                        # the timer's calls, as cuda_timer's
        return 1e-3
    t0 = time.perf_counter()
    e = tuning.tune(p, SM90, timer=timer, make_runner=_CompilingRunner, budget_s=_CompilingRunner.COMPILE_S / 2)
    assert time.perf_counter() - t0 >= len(cands) * _CompilingRunner.COMPILE_S      # every one compiled
    assert e["errors"] == {} and tuning.complete(e), e["errors"]


def _runner_capture(runners):
    def make(problem):
        runners.append(tuning.PhaseRunner(problem))
        return runners[-1]
    return make


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_the_timed_calls_run_the_op(phase):
    """The runner's calls are the op's phase with the candidate's strategy: run each once (the
    interpreter's tiles, no target) and hold what they return to the project's tolerance rule
    against an fp64 reference on the runner's own inputs."""
    p = _problem(phase, M=5, dropout_p=0.1, rank=4)
    ran, runners = {}, []

    def timer(cand, fn, budget_s):
        ran[cand.name] = fn()
        return 1e-3
    e = tuning.tune(p, None, timer=timer, make_runner=_runner_capture(runners))
    assert e["pick"] == "dequant"                  # equal times: the first candidate
    assert list(ran) == [c.name for c in tuning.candidates(p.kind, p.M, p.N, p.K, None)]
    assert list(ran) == ["dequant", "fused 16x64x64 w4 s1 k1"]
    r = runners[0]
    assert (r.x.dtype, r.A.shape, r.B.shape) == (p.x_dtype, (4, 128), (96, 4))
    keep = dropout_keep_mask(5, 128, p.dropout_p, 1234, r.x.device)   # the runner's seed
    w_lowp = ref.dequantize_4bit(p.w, p.compute_dtype)
    w = w_lowp.double()
    x, A, B, dy = r.x, r.A, r.B, r.dy
    # PyTorch in the runner's precision: the base in x's dtype, the adapter path in lora_dtype
    xl, Al, Bl = (t.clone().requires_grad_() for t in (x, A, B))
    y_lp = ref.lora_linear(xl, w_lowp, Al.to(p.lora_dtype), Bl.to(p.lora_dtype), 2.0, None, keep, p.dropout_p)
    for name, out in ran.items():
        if phase == "forward":
            assert out.shape == (5, 96)
            assert_within_rule(f"Y {name}", out, ref.lora_linear(x.double(), w, A.double(), B.double(), 2.0, None,
                                                                 keep, p.dropout_p), y_lp)
        else:   # (dX, dA, dB)
            grads_lp = torch.autograd.grad(y_lp, (xl, Al, Bl), dy, retain_graph=True)
            exact = ref.lora_linear_backward(dy.double(), x.double(), w, A.double(), B.double(), 2.0, keep,
                                             p.dropout_p)
            for g_name, g, ex, lp in zip(("dX", "dA", "dB"), out, exact, grads_lp):
                assert_within_rule(f"{g_name} {name}", g, ex, lp)


class _FakeCuda:
    """Just enough of torch.cuda for cuda_timer on a CPU: a device guard that sets the current device,
    streams per device, and events that read a clock each call advances by ``CALL_MS``."""

    CALL_MS = 2.0

    def __init__(self, monkeypatch, current="cuda:0"):
        self.current, self.clock, self.log = [current], [0.0], []
        fake = self

        class Guard:
            def __init__(self, device):
                self.device = str(torch.device(device))

            def __enter__(self):
                fake.current.append(self.device)

            def __exit__(self, *exc):
                fake.current.pop()

        class Stream:
            def __init__(self, device):
                self.device = device

            def synchronize(self):
                pass

        class Event:
            def __init__(self, enable_timing=False):
                self.t = self.stream = None

            def record(self, stream=None):
                self.t, self.stream = fake.clock[0], stream
                fake.log.append(("record", stream.device if stream is not None else None))

            def synchronize(self):
                pass

            def query(self):
                return False    # the GPU has not reached it: the call was queued in time

            def elapsed_time(self, end):
                return end.t - self.t

        monkeypatch.setattr(torch.cuda, "device", Guard)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(fake.current[-1]))
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(tuning, "_flush_l2", lambda device: fake.log.append(("flush", fake.current[-1])))
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: fake.log.append(("sleep", fake.current[-1])))
        monkeypatch.setattr(tuning, "_CYCLES_PER_MS", {})

    def call(self):
        self.log.append(("call", self.current[-1]))
        self.clock[0] += self.CALL_MS


def test_cuda_timer_times_on_the_weights_device(monkeypatch):
    """With another GPU current, the calls, the flushes and the events all run on the device the
    timer was given, the events on its current stream."""
    cuda = _FakeCuda(monkeypatch, current="cuda:0")
    ms = tuning.cuda_timer(None, cuda.call, 0.0, torch.device("cuda", 1))
    assert ms == cuda.CALL_MS
    assert {dev for _, dev in cuda.log} == {"cuda:1"}, cuda.log
    assert sum(what == "call" for what, _ in cuda.log) == 2 + tuning.MIN_REPS       # warm-up, sizing, timed
    # each timed call queued behind a sleep (one more: the clock's calibration, once per device)
    assert sum(what == "sleep" for what, _ in cuda.log) == tuning.MIN_REPS + 1
    assert cuda.current == ["cuda:0"]                                              # the guard is left
    cuda.log.clear()
    tuning.cuda_timer(None, cuda.call, 0.0, torch.device("cuda", 1), warmup=False)
    assert sum(what == "call" for what, _ in cuda.log) == 1 + tuning.MIN_REPS


def test_cuda_timer_queues_each_timed_call_behind_a_sleep(monkeypatch):
    """Each timed call: L2 flush, a GPU sleep, start event, the call, end event (the GPU then runs the
    call's launches back to back); a call the GPU reached early doubles the sleep after it; with
    queued=False no sleep at all (the host's pace)."""
    cuda = _FakeCuda(monkeypatch)
    cycles = []
    monkeypatch.setattr(torch.cuda, "_sleep", lambda c: (cycles.append(c), cuda.log.append(("sleep", "x"))))
    tuning._CYCLES_PER_MS[0] = 1000.0
    tuning.cuda_timer(None, cuda.call, 0.0, torch.device("cuda", 0), warmup=False)
    timed = [w for w, _ in cuda.log][4:]           # after the sizing call's flush, record, call, record
    assert timed == ["flush", "sleep", "record", "call", "record"] * tuning.MIN_REPS, timed
    assert len(set(cycles)) == 1 and cycles[0] >= 20     # at least 0.02 ms at 1000 cycles per ms
    # the GPU reached the start event before the call was queued: the next sleep is twice as long
    cycles.clear()
    import itertools
    early = itertools.cycle([True])
    monkeypatch.setattr(tuning, "_CYCLES_PER_MS", {0: 1000.0})
    orig_event = torch.cuda.Event

    class EarlyEvent(orig_event):
        def query(self):
            return next(early)

    monkeypatch.setattr(torch.cuda, "Event", EarlyEvent)
    tuning.cuda_timer(None, cuda.call, 0.0, torch.device("cuda", 0), warmup=False)
    assert all(abs(b - 2 * a) <= 1 for a, b in zip(cycles, cycles[1:])), cycles
    cuda.log.clear()
    tuning.cuda_timer(None, cuda.call, 0.0, torch.device("cuda", 0), warmup=False, queued=False)
    assert not any(w == "sleep" for w, _ in cuda.log)


def test_the_l2_flush_buffer_is_freed_after_tuning():
    tuning._L2[0] = torch.empty(8, dtype=torch.int8)     # what a flush on GPU 0 leaves behind
    tuning.tune(_problem(), SM90, timer=_timer_from({}), make_runner=_NoRun)
    assert tuning._L2 == {}


# ----------------------------------------------------------------------------------------------
# the cache file
# ----------------------------------------------------------------------------------------------


def _key(**changes):
    key = {"device": "NVIDIA H100 80GB HBM3", "cc": "9.0", "sms": 132, "driver": "13.0", "cuda": "13.0",
           "torch": "2.11.0", "triton": "3.6.0", "fastlora": "0.1.0", "fastlora_kernels_sha256": "ab" * 32}
    key.update(changes)
    return key


ENTRY = {"strategy": "fused", "pick": "fused 16x128x128 w4 s1 k32", "fused_tile": [16, 128, 128, 4, 1, 32],
         "us": {"dequant": 80.0, "fused 16x128x128 w4 s1 k32": 41.5}}


def test_cache_round_trip(tmp_path):
    path = tuning.cache_path(_key(), tmp_path)
    assert path.name.startswith("nvidia-h100-80gb-hbm3-sm90-") and path.suffix == ".json"
    c = tuning.Cache(path, _key())
    assert c.get("k") is None
    assert c.put("k", ENTRY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # reading our own file warns about nothing
        again = tuning.Cache(path, _key())
    assert again.get("k") == ENTRY
    data = json.loads(path.read_text())
    assert data["key"] == _key() and data["format"] == "fastlora-tuning" and data["entries"] == {"k": ENTRY}
    # nothing but the file and its lock in the folder (the temporary file was renamed over it)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".lock"]


VERSION_CHANGES = [dict(torch="2.12.0"), dict(triton="3.7.0"), dict(fastlora="0.2.0"), dict(driver="13.1"),
                   dict(sms=114), dict(fastlora_kernels_sha256="cd" * 32)]


@pytest.mark.parametrize("change", VERSION_CHANGES)
def test_two_environments_on_one_machine_keep_a_file_each(tmp_path, change):
    """Another torch (or triton, driver, ...) on the same GPU writes another file: neither run wipes
    what the other measured."""
    mine, theirs = tuning.cache_path(_key(), tmp_path), tuning.cache_path(_key(**change), tmp_path)
    assert mine != theirs and mine.parent == theirs.parent
    assert theirs.name.startswith("nvidia-h100-80gb-hbm3-sm90-")
    tuning.Cache(mine, _key()).put("k", ENTRY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuning.Cache(theirs, _key(**change)).put("k2", dict(ENTRY, strategy="dequant", pick="dequant"))
        assert tuning.Cache(mine, _key()).get("k") == ENTRY
    assert tuning.cache_path(_key(), tmp_path) == mine          # the same environment finds its file again


@pytest.mark.parametrize("change", VERSION_CHANGES)
def test_a_version_change_invalidates(tmp_path, change):
    """A file whose key is not this environment's (copied, or renamed by hand) is ignored."""
    path = tuning.cache_path(_key(), tmp_path)
    tuning.Cache(path, _key()).put("k", ENTRY)
    with pytest.warns(RuntimeWarning, match="foreign") as rec:
        new = tuning.Cache(path, _key(**change))
    assert len(rec) == 1 and list(change)[0] in str(rec[0].message)
    assert new.get("k") is None
    new.put("k2", dict(ENTRY, strategy="dequant", pick="dequant"))
    data = json.loads(path.read_text())
    assert data["key"] == _key(**change) and list(data["entries"]) == ["k2"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": "fastlora-tuning", "entries": 3}', ""])
def test_a_corrupt_file_warns_once_is_ignored_then_rewritten(tmp_path, content):
    path = tuning.cache_path(_key(), tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        c = tuning.Cache(path, _key())
        c.load()
        tuning.Cache(path, _key())
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "corrupt" in msgs[0], msgs
    assert c.entries == {}
    assert c.put("k", ENTRY)
    assert tuning.Cache(path, _key()).get("k") == ENTRY


def test_a_malformed_entry_is_dropped(tmp_path):
    path = tuning.cache_path(_key(), tmp_path)
    tuning.Cache(path, _key()).put("good", ENTRY)
    data = json.loads(path.read_text())
    data["entries"]["bad"] = {"strategy": "sometimes", "fused_tile": [1, 2]}
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="malformed"):
        c = tuning.Cache(path, _key())
    assert set(c.entries) == {"good"}


def _writer(path, key, tag, n, barrier):
    c = tuning.Cache(path, key)
    barrier.wait()
    for i in range(n):
        c.put(f"{tag}-{i}", dict(ENTRY, m=i))


def test_two_processes_writing_at_once_leave_a_valid_file(tmp_path):
    """Each writer merges with what is on disk under the lock: every entry of both survives."""
    path = tuning.cache_path(_key(), tmp_path)
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    barrier = ctx.Barrier(2)
    n = 25
    procs = [ctx.Process(target=_writer, args=(path, _key(), tag, n, barrier)) for tag in ("a", "b")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # fork of a process with threads
        for p in procs:
            p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(path.read_text())
    assert data["key"] == _key()
    assert sorted(data["entries"]) == sorted(f"{t}-{i}" for t in "ab" for i in range(n))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".lock"]


def test_threads_writing_at_once(tmp_path):
    import threading

    path = tuning.cache_path(_key(), tmp_path)
    c = tuning.Cache(path, _key())
    threads = [threading.Thread(target=lambda t=t: [c.put(f"{t}-{i}", ENTRY) for i in range(20)]) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads(path.read_text())["entries"]) == 80


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == tmp_path / "xdg" / "fastlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.cache_dir() == tuning.Path.home() / ".cache" / "fastlora"
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path / "mine"))
    assert tuning.cache_dir() == tmp_path / "mine"


# ----------------------------------------------------------------------------------------------
# when tuning runs
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_tunable(monkeypatch):
    """Let the CPU stand in for a CUDA device, and the interpreter not count, so the op's whole path
    runs here (every other gate stays in force)."""
    monkeypatch.setattr(tuning, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(tuning, "_interpreter_active", lambda: False)


def _static(M, device):
    return "fused"


CALL = dict(phase="forward", compute_dtype=torch.bfloat16, dropout=False, x_dtype=torch.bfloat16,
            lora_dtype=torch.bfloat16, rank=16)


def _pick(w, M=40, static=_static, **kw):
    return tuning.pick(M, w.N, w.K, w, torch.device(DEVICE), static, **{**CALL, **kw})


def test_the_first_call_tunes_then_one_lookup(cpu_tunable):
    """The call that meets a new entry tunes its phase, writes the cache and picks the fastest; the
    next call with the same shape, and a call at another M of the same bucket after a restart, read
    what was found; the other phase is its own entry, tuned at its first call."""
    w = _packed()
    calls = []
    tuning.set_timer(_timer_from({"dequant": 10.0}, calls))
    assert _pick(w) == "dequant"                   # the static rule says fused
    assert calls.count("dequant") == 1
    n = len(calls)
    assert _pick(w) == "dequant" and len(calls) == n
    tuning.reset()                                 # a new process: the file answers
    tuning.set_timer(_timer_from({"dequant": 10.0}, calls))
    assert _pick(w, M=33) == "dequant" and len(calls) == n
    entries = json.loads(tuning.cache_for(torch.device(DEVICE)).path.read_text())["entries"]
    assert [k.split("|")[0] for k in entries] == ["forward"] and all("M<=64" in k for k in entries)
    assert _pick(w, phase="backward") == "dequant" and calls.count("dequant") == 2
    # another bucket is another entry
    assert _pick(w, M=65) == "dequant" and calls.count("dequant") == 3
    with pytest.raises(TypeError):
        tuning.pick(40, w.N, w.K, w, torch.device(DEVICE), _static)       # a call always says what it runs


def test_a_new_m_in_a_known_bucket_is_one_lookup(cpu_tunable, monkeypatch):
    """The memo is keyed by M's bucket: once a bucket is known, no M of it reaches the slow path."""
    w = _packed()
    tuning.set_timer(_timer_from({"dequant": 10.0}))
    assert _pick(w, M=40) == "dequant"
    keys = set(tuning._PICKS)

    def slow(*args, **kw):
        raise AssertionError("the slow path for an M of a known bucket")
    monkeypatch.setattr(tuning, "_pick_slow", slow)
    assert all(_pick(w, M=M) == "dequant" for M in (33, 41, 63, 64))
    assert set(tuning._PICKS) == keys


def test_the_static_rule_still_sees_the_calls_m(monkeypatch):
    """A bucket answered by the tables (here FASTLORA_TUNE=0) asks them with each call's own M: their
    thresholds need not fall on a bucket's edge."""
    monkeypatch.setenv("FASTLORA_TUNE", "0")
    tuning.reset()
    w = _packed()

    def threshold(M, device):
        return "dequant" if M >= 1000 else "fused"
    assert [_pick(w, M=M, static=threshold) for M in (600, 999, 1000, 1024)] == ["fused", "fused", "dequant",
                                                                                  "dequant"]
    assert len(tuning._PICKS) == 1                 # one bucket, one key


def test_the_memo_is_bounded(cpu_tunable, monkeypatch):
    monkeypatch.setattr(tuning, "_PICKS_MAX", 3)
    w = _packed()
    tuning.set_timer(_timer_from({"dequant": 10.0}))
    for M in (1, 2, 4, 8, 16, 32, 64):
        assert _pick(w, M=M) == "dequant"
        assert len(tuning._PICKS) <= 3


def test_the_entry_is_measured_with_the_calls_own_settings(cpu_tunable, monkeypatch):
    """What the key claims (dtypes, rank, dropout, the weight's blocksize and double quantization) is
    what was measured, and weights or ranks that differ there get entries of their own."""
    measured = []
    real_tune = tuning.tune

    def spy(problem, *args, **kw):
        measured.append(problem)
        return real_tune(problem, *args, **kw)
    monkeypatch.setattr(tuning, "tune", spy)
    tuning.set_timer(_timer_from({"dequant": 10.0}))
    w = _packed()
    call = dict(phase="backward", compute_dtype=torch.float16, dropout=True, x_dtype=torch.float16,
                lora_dtype=torch.float32, rank=8)
    _pick(w, **call)
    (p,) = measured
    assert (p.phase, p.compute_dtype, p.x_dtype, p.lora_dtype, p.rank) == ("backward", torch.float16, torch.float16,
                                                                          torch.float32, 8)
    assert p.dropout_p == tuning.DEFAULT_DROPOUT_P and p.w is w and p.M == 40
    assert "|bs=64,nested|float16/float16/float32|r=8|dropout=on" in p.key
    # each of these differs from the entry above in one thing the key holds: tuned anew
    for other_w, change in ((_packed(blocksize=128), {}), (_packed(nested=False), {}), (w, dict(rank=16)),
                            (w, dict(lora_dtype=torch.float16)), (w, dict(x_dtype=torch.bfloat16))):
        n = len(measured)
        _pick(other_w, **{**call, **change})
        assert len(measured) == n + 1 and measured[-1].key not in {q.key for q in measured[:-1]}, change
    assert "|bs=128,nested|" in measured[1].key and "|bs=64|" in measured[2].key


def test_the_op_passes_its_own_dtypes_and_rank(monkeypatch):
    """ops' forward and backward ask for the strategy with x's dtype, lora_dtype and the rank."""
    asked = []

    def spy(strategy, M, N, K, w, device, phase, compute_dtype, dropout, x_dtype, lora_dtype, rank):
        asked.append((phase, compute_dtype, dropout, x_dtype, lora_dtype, rank))
        return "fused" if strategy == "auto" else strategy
    monkeypatch.setattr(ops, "_resolve", spy)
    w = _packed(N=48, K=64)
    x = torch.randn(3, 64, device=DEVICE).to(torch.float16).requires_grad_()
    A = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    B = torch.randn(48, 4, device=DEVICE, requires_grad=True)
    ops.lora_linear(x, w, A, B, 2.0, dropout_p=0.1, compute_dtype=torch.float16, lora_dtype=torch.float32,
                    seed=3).sum().backward()
    assert asked == [(phase, torch.float16, True, torch.float16, torch.float32, 4) for phase in ("forward", "backward")]


def test_phase_given_picks_per_phase(cpu_tunable):
    w = _packed()
    fwd_tile = tuning.candidates("frozen4", 40, 96, 128, ops.launch_target(w.device))[1].name
    # the timer cannot tell phases apart by name; the second time dequant is asked for, it is slow
    seen = []

    def timer(cand, fn, budget_s):
        seen.append(cand.name)
        if cand.name == "dequant":
            return 1e-3 * (10.0 if seen.count("dequant") == 1 else 90.0)
        return 50e-3
    tuning.set_timer(timer)
    assert _pick(w, phase="forward") == "dequant"
    assert _pick(w, phase="backward") == "fused"
    assert fwd_tile in seen


def test_an_entry_cut_short_by_the_budget_is_not_saved(cpu_tunable, monkeypatch):
    """Used in this process, measured again in full by the next."""
    monkeypatch.setattr(tuning, "_target", lambda device: SM90)     # an H100's alternatives
    w = _packed()
    calls = []
    tuning.set_timer(_timer_from({"dequant": 10.0}, calls))
    monkeypatch.setattr(tuning, "PER_SHAPE_S", 0.0)
    assert _pick(w) == "dequant" and calls == ["dequant", calls[1]]     # the alternatives skipped
    assert _pick(w, M=50) == "dequant" and len(calls) == 2
    path = tuning.cache_for(torch.device(DEVICE)).path
    assert not path.exists() or json.loads(path.read_text())["entries"] == {}
    # a complete entry written later does not carry the cut one along
    assert _pick(w, phase="backward", M=300) == "dequant"
    monkeypatch.setattr(tuning, "PER_SHAPE_S", 10.0)
    tuning.reset()
    tuning.set_timer(_timer_from({"dequant": 10.0}, calls))
    calls.clear()
    assert _pick(w) == "dequant" and len(calls) == 2 + tuning.MAX_ALTERNATIVES
    assert [k.split("|")[0] for k in json.loads(path.read_text())["entries"]] == ["forward"]


def test_fastlora_tune_0_uses_the_tables(cpu_tunable, monkeypatch):
    monkeypatch.setenv("FASTLORA_TUNE", "0")
    tuning.reset()
    w = _packed()
    calls = []
    tuning.set_timer(_timer_from({"dequant": 1.0}, calls))
    assert _pick(w) == "fused" and calls == []
    assert tuning.static_reason(DEVICE) == "FASTLORA_TUNE=0"
    assert not (tuning.cache_dir()).exists()
    # the same call with tuning on measures and picks otherwise (so the 0 above is what decided)
    monkeypatch.setenv("FASTLORA_TUNE", "1")
    tuning.reset()
    tuning.set_timer(_timer_from({"dequant": 1.0}, calls))
    assert _pick(w) == "dequant" and calls


def test_force_retunes_once_per_process(cpu_tunable, monkeypatch):
    w = _packed()
    calls = []
    tuning.set_timer(_timer_from({"dequant": 1.0}, calls))
    assert _pick(w) == "dequant"
    monkeypatch.setenv("FASTLORA_TUNE", "force")
    tuning.reset()
    calls.clear()
    tuning.set_timer(_timer_from({"dequant": 2000.0}, calls))
    assert _pick(w) == "fused" and calls.count("dequant") == 1
    calls.clear()
    assert _pick(w, M=50) == "fused" and calls == []       # re-tuned once, then read


def test_mode_is_read_once(cpu_tunable, monkeypatch):
    assert tuning.mode() == "1"
    monkeypatch.setenv("FASTLORA_TUNE", "0")
    assert tuning.mode() == "1"                    # per-call code never reads the environment
    tuning.reset()
    assert tuning.mode() == "0"
    monkeypatch.setenv("FASTLORA_TUNE", "sometimes")
    tuning.reset()
    with pytest.warns(RuntimeWarning, match="FASTLORA_TUNE"):
        assert tuning.mode() == "1"


def test_never_under_the_interpreter(monkeypatch):
    """Tests run the kernels in Triton's interpreter: even with the CPU allowed, nothing is timed."""
    monkeypatch.setattr(tuning, "_DEVICE_TYPES", ("cuda", "cpu"))
    if ON_GPU:
        pytest.skip("the kernels are compiled here")
    calls = []
    tuning.set_timer(_timer_from({"dequant": 1.0}, calls))
    assert tuning.static_reason(DEVICE) == "Triton's CPU interpreter"
    assert _pick(_packed()) == "fused" and calls == []
    assert not tuning.cache_dir().exists()


def test_not_on_a_cpu_device():
    assert tuning.static_reason("cpu") == "not a CUDA device"


def test_never_inside_a_compile_trace_but_at_the_next_eager_call(cpu_tunable, monkeypatch):
    w = _packed()
    calls = []
    tuning.set_timer(_timer_from({"dequant": 1.0}, calls))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuning.static_reason(DEVICE) == "inside a torch.compile trace"
    assert _pick(w) == "fused" and calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert _pick(w) == "dequant" and calls       # not remembered from the trace: tuned now


def test_the_op_resolves_its_strategy_outside_any_trace(monkeypatch):
    """Under torch.compile the op is one opaque node: its strategy is resolved (and on a GPU tuned)
    when the compiled graph runs it, never while Dynamo traces."""
    seen = []

    def spying(fn):
        def spy(*args, **kw):
            seen.append(torch.compiler.is_compiling())
            return fn(*args, **kw)
        return spy
    # the static rule (a CPU's answer) and the measured pick (a GPU's; ops binds it at its first call)
    monkeypatch.setattr(ops, "choose_strategy", spying(ops.choose_strategy))
    monkeypatch.setattr(ops, "_tuning_pick", spying(tuning.pick), raising=False)
    w = _packed(N=48, K=64)
    A = torch.randn(4, 64, device=DEVICE)
    B = torch.randn(48, 4, device=DEVICE)

    def f(x):
        return ops.lora_linear(x, w, A, B, 2.0, strategy="auto").sum()

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(torch.randn(3, 64, device=DEVICE).to(torch.bfloat16))
    assert torch.isfinite(out)
    assert seen and not any(seen), seen


def test_during_cuda_graph_capture(cpu_tunable, monkeypatch):
    """A call inside a capture neither tunes (it would synchronize) nor remembers the static answer:
    the next eager call tunes."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuning.static_reason(torch.device("cuda", 0)) == "during CUDA graph capture"
    monkeypatch.setattr(tuning, "_capturing", lambda device: True)     # the CPU stands in for the GPU
    w = _packed()
    calls = []
    tuning.set_timer(_timer_from({"dequant": 1.0}, calls))
    assert tuning.static_reason(DEVICE) == "during CUDA graph capture"
    assert _pick(w) == "fused" and calls == [] and tuning._PICKS == {}
    assert not tuning.cache_dir().exists()
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    assert _pick(w) == "dequant" and calls


def test_process_budget(cpu_tunable, monkeypatch):
    w = _packed()
    calls = []
    tuning.set_timer(_timer_from({"dequant": 1.0}, calls))
    monkeypatch.setattr(tuning, "PER_PROCESS_S", 0.0)
    assert tuning.static_reason(DEVICE) == "the process's tuning budget is spent"
    assert _pick(w) == "fused" and calls == []


@pytest.mark.parametrize("failing", ["dequant", "table"])
def test_a_failed_tuning_keeps_the_tables(cpu_tunable, caplog, failing):
    """dequant or the table's tile failing (here a CUDA error) is not a measurement: one warning, the
    static rule for that shape for the rest of the process, nothing cached; the next run tries again."""
    calls = []

    def timer(cand, fn, budget_s):
        calls.append(cand.name)
        if (cand.name == "dequant") == (failing == "dequant"):
            raise RuntimeError("CUDA error: unspecified launch failure")
        return 1e-3
    tuning.set_timer(timer)
    w = _packed()
    with caplog.at_level("WARNING", logger="fastlora.tuning"):
        assert _pick(w) == "fused"
    assert "static tables stay in use" in caplog.text and "CUDA error" in caplog.text
    n = len(calls)
    assert _pick(w, M=50) == "fused" and len(calls) == n          # not retried in this process
    assert not tuning.cache_for(torch.device(DEVICE)).path.exists()
    tuning.reset()
    tuning.set_timer(_timer_from({"dequant": 1.0}, calls))
    assert _pick(w) == "dequant" and len(calls) > n


def test_the_op_asks_the_tuned_pick_on_cuda():
    """ops._resolve on a CUDA device returns tuning's pick (here a remembered one, since nothing can
    be tuned without a GPU), elsewhere the static rule; an explicit strategy is never replaced."""
    w = _packed()
    dev = torch.device("cuda", 0)
    bf16 = torch.bfloat16
    tuning._PICKS[(0, 64, w.N, w.K, w.blocksize, True, "forward", bf16, True, bf16, bf16, 8)] = "dequant"
    call = ("forward", bf16, True, bf16, bf16, 8)
    assert ops.choose_strategy(40, torch.device("cpu")) == "fused"
    assert ops._resolve("auto", 40, w.N, w.K, w, dev, *call) == "dequant"
    assert ops._resolve("fused", 40, w.N, w.K, w, dev, *call) == "fused"
    assert ops._resolve("auto", 40, w.N, w.K, w, torch.device("cpu"), *call) == "fused"


def test_the_tuned_tile_is_installed(cpu_tunable, monkeypatch):
    """On a GPU an entry's best fused tile is put in force for its product (configs.select)."""
    w = _packed()
    p = tuning.Problem("backward", w, 40, torch.bfloat16, torch.bfloat16, torch.bfloat16)
    J, I = tuning.product_dims("backward", w.N, w.K)
    table = tuning.candidates("frozen4", 40, J, I, SM90)[1].tile
    tile = TileConfig(16, 64, 64, 4, 1, 1)
    tuning._install(p, {"strategy": "fused", "fused_tile": tuning.tile_tuple(tile)}, SM90)
    assert configs.select("frozen4", 40, J, I, SM90, trans_w=True) == tile
    assert configs.select("frozen4", 40, J, I, SM90) == table            # a caller that does not say: the table
    assert configs.select("frozen4", 40, I, J, SM90, trans_w=False) != tile                      # forward untouched
    tuning.reset()
    assert configs.select("frozen4", 40, J, I, SM90, trans_w=True) == table


def test_a_square_weight_keeps_a_tile_per_phase(cpu_tunable):
    """N == K (q_proj, o_proj): forward and backward products have the same [J, I], and each phase's
    measured tile stays in force for that phase alone."""
    w = _packed(N=128, K=128)
    fwd, bwd = TileConfig(16, 64, 64, 4, 1, 1), TileConfig(16, 128, 64, 8, 2, 4)
    for phase, tile in (("forward", fwd), ("backward", bwd)):
        p = tuning.Problem(phase, w, 40, torch.bfloat16, torch.bfloat16, torch.bfloat16)
        assert tuning.product_dims(phase, w.N, w.K) == (128, 128)
        tuning._install(p, {"strategy": "fused", "fused_tile": tuning.tile_tuple(tile)}, SM90)
    assert configs.select("frozen4", 40, 128, 128, SM90, trans_w=False) == fwd
    assert configs.select("frozen4", 40, 128, 128, SM90, trans_w=True) == bwd
    tuning.reset()
    assert configs.select("frozen4", 40, 128, 128, SM90, trans_w=False) == configs.select("frozen4", 40, 128, 128, SM90)


# ----------------------------------------------------------------------------------------------
# `fastlora tune`
# ----------------------------------------------------------------------------------------------


def test_projection_shapes(tmp_path):
    assert tuning.projection_shapes("llama3-8b") == [("q_proj,o_proj", 4096, 4096), ("k_proj,v_proj", 1024, 4096),
                                                     ("gate_proj,up_proj", 14336, 4096), ("down_proj", 4096, 14336)]
    cfg = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 200, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shapes = tuning.projection_shapes(str(tmp_path))
    assert shapes == [("q_proj", 128, 96), ("k_proj,v_proj", 64, 96), ("o_proj", 96, 128),
                      ("gate_proj,up_proj", 200, 96), ("down_proj", 96, 200)]
    with pytest.raises(ValueError, match="downloads nothing"):
        tuning.projection_shapes("meta-llama/Meta-Llama-3-8B")


def test_tune_command_without_a_gpu():
    if ON_GPU:
        pytest.skip("a GPU is here")
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "fastlora", "tune", "--shapes", "64x64"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 1 and "tuning needs a CUDA GPU" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "fastlora", "tune", "--dry-run", "--model", "llama3-8b", "--m", "16,4096"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    shapes = tuning.projection_shapes("llama3-8b")
    Ms, phases = (16, 4096), tuning.PHASES
    assert sum("down_proj 4096x14336" in ln for ln in lines) == len(Ms) * len(phases)
    small_row = next(row for row in configs.TABLES["sm_90"]["frozen4"] if row[0] >= 16)   # the row M = 16 gets
    assert f"dequant, {tuning.Candidate('fused', small_row[1]).name}" in r.stdout
    # every projection of a Llama has room for all the alternatives
    total = len(shapes) * len(Ms) * len(phases) * (2 + tuning.MAX_ALTERNATIVES)
    assert f"{total} candidates in all" in r.stdout


def test_tune_rows_with_injected_timer(cpu_tunable):
    """tune_shapes on a CPU with an injected timer: one row per (shape, M, phase), the speedups from
    the measured µs; and the table format."""
    calls = []
    times = {"dequant": 30.0, "peft": 60.0}
    tuning.set_timer(_timer_from(times, calls))
    rows = tuning.tune_shapes([("q_proj", 48, 64)], [5], DEVICE, r=4)
    assert [r["phase"] for r in rows] == ["forward", "backward"]
    for r in rows:
        assert r["pick"] == "dequant" and r["vs_dequant"] == 1.0 and r["vs_peft"] == 2.0 and r["peft_us"] == 60.0
    text = tuning.format_rows(rows)
    assert "q_proj 48x64" in text and "-> dequant, 1.00x, 2.00x" in text


def test_tune_verify_measures_every_candidate_again_and_rates_the_pick(cpu_tunable):
    """--verify: after an entry is tuned, each of its measured candidates is timed again, and the row
    says how far the pick is from the best of that second measurement (here dequant won the first
    and is 10% behind every fused tile in the second); the summary line counts the entries within 5%."""
    seen = {}

    def timer(cand, fn, budget_s):
        n = seen[cand.name] = seen.get(cand.name, 0) + 1
        if cand.name == "peft":
            return 60.0e-3
        first = cand.name == "dequant" and 30.0 or 50.0
        again = cand.name == "dequant" and 33.0 or 30.0
        return (first if n == 1 else again) * 1e-3

    tuning.set_timer(timer)
    rows = tuning.tune_shapes([("q_proj", 48, 64)], [5], DEVICE, r=4, phases=("forward",), verify_s=0.5)
    (row,) = rows
    assert row["pick"] == "dequant" and row["us"]["dequant"] == 30.0
    measured = [n for n, us in row["us"].items() if us is not None]
    assert len(measured) >= 2 and sorted(row["verify_us"]) == sorted(measured)
    assert all(seen[n] == 2 for n in measured), seen             # each measured once more, no more
    assert row["verify_us"]["dequant"] == 33.0 and row["pick_vs_best"] == 1.1
    assert "-> the pick at 1.10x the best" in tuning.format_rows(rows)
    line = tuning.verify_summary(rows)
    assert line.startswith("verify: the pick within 5% of the best measured again at 0 of 1 entries; worst 1.10x")
    assert tuning.verify_summary(tuning.tune_shapes([("q_proj", 48, 64)], [5], DEVICE, r=4,
                                                    phases=("forward",))) == "verify: no entry measured again"


# ----------------------------------------------------------------------------------------------
# on a GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("M,phase", [(16, "forward"), (2048, "backward")])
def test_gpu_pick_is_within_5_percent_of_the_best_measured_again(M, phase):
    import bitsandbytes as bnb

    w16 = (torch.randn(4096, 4096, device="cuda") / 64).to(torch.bfloat16)
    p4 = bnb.nn.Params4bit(w16, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cuda")
    w = from_bnb(p4, p4.quant_state)
    prob = tuning.Problem(phase, w, M, torch.bfloat16, torch.bfloat16, torch.bfloat16, 0.05)
    target = ops.launch_target(w.device)
    e = tuning.tune(prob, target)
    v = tuning.verify(prob, e, budget_s=3.0)          # every measured candidate, measured again
    assert v["pick_vs_best"] is not None and v["pick_vs_best"] <= 1.05, (e["pick"], v["us"])


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_first_call_tunes_and_writes_the_cache():
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    w = _packed(N=512, K=1024)
    A = torch.randn(16, 1024, device="cuda") / 32
    B = torch.randn(512, 16, device="cuda") / 4
    y = ops.lora_linear(x, w, A, B, 2.0)
    assert torch.isfinite(y).all()
    entries = tuning.cache_for(x.device).entries
    # fp32 adapters without autocast: PEFT runs the adapter path in fp32, a product of its own kind
    kind = tuning.product_kind(w, torch.bfloat16, torch.float32)
    assert kind == "frozen4_lora32"
    assert any(k.startswith(f"forward|{kind}|N=512|K=1024|M<=64|") for k in entries), list(entries)
