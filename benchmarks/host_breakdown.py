"""Where a patched layer call's host time goes on a real GPU, by subtraction (no profiler in the loop).

    python -m benchmarks.host_breakdown [--m 1,16] [--reps 300] [--out DIR]

One 4096×4096 NF4 (double quant) layer, r = 16, dropout 0.05, adapters fp32 under bf16 autocast (the
QLoRA recipe) and bf16 adapters, built as ``benchmarks host`` builds it: PEFT's layer and a patched
copy, on CUDA tensors, kernels run. Per call, min and median µs of ``time.perf_counter_ns`` (host
time to enqueue; the GPU is synchronized between calls, so its queue is empty at each call's start):

- ``layer``: the patched layer's training step (forward + backward, train mode) and its forward
  under no_grad in eval mode (generation), beside PEFT's, as ``benchmarks host`` calls them; the same with fastlora's launches replaced by a no-op (``Prepared.__call__``
  returns at once: what is left is fastlora's Python, its allocations and autograd); the same with
  ``torch.autograd.set_multithreading_enabled(False)`` (backward on the calling thread instead of
  the device's autograd thread: the thread hand-off's share).
- ``launch``: each of a step's Triton launches alone, called again with the arguments it had
  (``Prepared.__call__``: device and stream lookup, Triton's C launcher packing the arguments,
  ``cuLaunchKernel``), with its argument count; then the same launch with its pointer arguments
  given as ints (Triton's launcher calls ``data_ptr()`` and ``cuPointerGetAttribute`` for a tensor,
  and takes an int as the address), converted once and converted in Python on every call.
- ``parts``: single pieces of a call: ``torch.empty`` on the GPU, ``torch.cuda.current_device``,
  the stream lookup, ``is_current_stream_capturing``, the host-drawn dropout seed, the strategy
  lookup (``tuning.pick``), one ``lora_matmul`` resolve with the launch deferred, a bare
  ``torch.mm`` enqueue, and an autograd Function that does nothing (forward + backward) on the GPU
  and on the CPU.

Needs CUDA (``--dry``: the CPU, under the interpreter, to check the script). Writes
``host_breakdown.jsonl`` (one benchmark record per measurement) to --out when given.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch


def _time(fn, reps: int, sync) -> dict:
    for _ in range(min(20, reps)):
        fn()
    sync()
    samples = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            sync()
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
        sync()
    finally:
        gc.enable()
    us = [s / 1e3 for s in samples]
    return {"min": round(min(us), 2), "median": round(statistics.median(us), 2)}


class _Noop:
    """Inside: every prepared fastlora launch returns at once (kernels not run)."""

    def __enter__(self):
        from fastlora.kernels import _launch

        self._cls = _launch.Prepared
        self._orig = self._cls.__call__
        self._cls.__call__ = lambda self_, *args: None
        return self

    def __exit__(self, *exc):
        self._cls.__call__ = self._orig


class _Capture:
    """Inside: every prepared launch runs and is kept with its arguments, to be timed alone later."""

    def __enter__(self):
        from fastlora.kernels import _launch

        self.calls = []
        self._cls = _launch.Prepared
        orig = self._orig = self._cls.__call__
        calls = self.calls

        def call(self_, *args):
            calls.append((self_, args))
            return orig(self_, *args)

        self._cls.__call__ = call
        return self

    def __exit__(self, *exc):
        self._cls.__call__ = self._orig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_breakdown")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry", action="store_true",
                    help="without a GPU: every step on the CPU under Triton's interpreter, a few reps "
                         "(checks that the script runs; its timings mean nothing)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry:
        print("host_breakdown: needs CUDA (no GPU here; --dry runs it on the CPU)")
        return 2

    import fastlora
    from fastlora import ops
    from fastlora.format import from_bnb
    from fastlora.kernels import _launch, lora_matmul as lm
    from triton.runtime.driver import driver as tdriver

    from . import harness
    from .bench_host import Provider, _inputs, build_layer, quantize

    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reps = args.reps if not args.dry else 2
    records = []

    def rec(group, name, res, **cfg):
        records.append({"group": group, "name": name, **cfg, **res})
        extra = " ".join(f"{k}={v}" for k, v in cfg.items())
        print(f"{group:7s} {name:44s} {extra:32s} min {res['min']:9.2f}  median {res['median']:9.2f} µs", flush=True)

    N = K = 4096 if not args.dry else 64
    packed, qs = quantize(N, K, device)
    Ms = [int(v) for v in args.m.split(",")]

    # ---- parts ----------------------------------------------------------------------------------
    rec("parts", "torch.empty [16, 4096] bf16", _time(
        lambda: torch.empty((16, 4096), dtype=torch.bfloat16, device=device), reps, sync))
    if cuda:
        rec("parts", "torch.cuda.current_device()", _time(torch.cuda.current_device, reps, sync))
        rec("parts", "triton driver get_current_stream", _time(
            lambda: tdriver.active.get_current_stream(device.index), reps, sync))
        rec("parts", "torch.cuda.is_current_stream_capturing()", _time(
            torch.cuda.is_current_stream_capturing, reps, sync))
    rec("parts", "ops.draw_seed (host-drawn dropout seed)", _time(lambda: ops.draw_seed(device), reps, sync))
    xa = torch.randn(16, 4096, device=device, dtype=torch.bfloat16)
    wt = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    rec("parts", "torch.mm [16,4096]x[4096,4096] enqueue", _time(lambda: torch.mm(xa, wt.t()), reps, sync))

    class Nothing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    for dev in dict.fromkeys((device, torch.device("cpu"))):
        xt = torch.zeros(16, device=dev, requires_grad=True)
        g = torch.ones(16, device=dev)

        def nothing_step():
            Nothing.apply(xt).backward(g)
            xt.grad = None

        rec("parts", f"autograd Function doing nothing, fwd+bwd ({dev.type})", _time(nothing_step, reps, sync))
    with torch.autograd.set_multithreading_enabled(False):
        rec("parts", f"  the same ({device.type}), autograd multithreading off", _time(
            lambda: (Nothing.apply(torch.zeros(16, device=device, requires_grad=True)).backward(
                torch.ones(16, device=device))), reps, sync))

    # ---- the layers -------------------------------------------------------------------------------
    for adapters in ("autocast", "bf16"):
        peft_model, peft_layer = build_layer(packed, qs, device, 16, 32, 0.05, adapters)
        fl_model, fl_layer = build_layer(packed, qs, device, 16, 32, 0.05, adapters)
        report = fastlora.patch(fl_model)
        ac = adapters == "autocast"
        for M in Ms:
            x, x_ng, dy = _inputs(M, K, N, device)
            provs = {"fastlora": Provider("fastlora", fl_model, fl_layer, x, x_ng, dy, ac, report),
                     "peft": Provider("peft", peft_model, peft_layer, x, x_ng, dy, ac)}
            for mode in ("train_step", "forward"):
                for name, p in provs.items():
                    p.enter(mode)
                    fn = p.call[mode]

                    grad = torch.enable_grad if mode == "train_step" else torch.no_grad

                    def call(fn=fn, p=p, grad=grad):
                        p.reset()
                        with grad():
                            fn()

                    cfg = dict(M=M, adapters=adapters, mode=mode)
                    rec("layer", f"{name}", _time(call, reps, sync), **cfg)
                    if mode == "train_step":
                        with torch.autograd.set_multithreading_enabled(False):
                            rec("layer", f"{name}, autograd multithreading off", _time(call, reps, sync), **cfg)
                    if name == "fastlora":
                        with _Noop():
                            rec("layer", "fastlora, launches a no-op", _time(call, reps, sync), **cfg)
                        # each launch the call made, alone, with the arguments it had
                        with _Capture() as cap:
                            call()
                        sync()
                        what = "forward" if mode == "forward" else "step"
                        for i, (prep, largs) in enumerate(cap.calls):
                            kname = getattr(prep.kernel, "fn", prep.kernel).__name__
                            rec("launch", f"{what} launch {i}: {kname}",
                                _time(lambda prep=prep, largs=largs: prep(*largs), reps, sync),
                                nargs=len(largs) + len(prep.tail or ()), **cfg)
                            if cuda and prep.compiled is not None:
                                # Triton's launcher calls data_ptr() and cuPointerGetAttribute for
                                # each tensor argument, and takes an int as the address itself:
                                # the same launch with its pointers given as ints (converted once,
                                # then in Python on every call), to price that driver query
                                ptr = [j for j, v in enumerate(largs) if isinstance(v, torch.Tensor)]
                                ints = tuple(v.data_ptr() if j in ptr else v for j, v in enumerate(largs))
                                rec("launch", f"{what} launch {i}: pointers as ints",
                                    _time(lambda prep=prep, ints=ints: prep(*ints), reps, sync),
                                    pointers=len(ptr), **cfg)

                                def converted(prep=prep, largs=largs, ptr=ptr):
                                    v = list(largs)
                                    for j in ptr:
                                        v[j] = v[j].data_ptr()
                                    prep(*v)
                                rec("launch", f"{what} launch {i}: ints converted per call",
                                    _time(converted, reps, sync), pointers=len(ptr), **cfg)
            if adapters == "bf16" and M == Ms[-1]:
                A = fl_layer.lora_A["default"].weight
                h = torch.empty((M, 16), dtype=torch.bfloat16, device=device)
                x2 = x_ng.reshape(M, K)
                rec("parts", "lora_matmul resolve H, deferred (no launch)", _time(
                    lambda: lm.lora_matmul(x2, A, h, trans_w=False, compute_dtype=torch.bfloat16, adapter=True,
                                           dropout=lm.DROP_AOP, dropout_p=0.05, seed=12345, defer=True),
                    reps, sync), M=M)
                w = from_bnb(fl_layer.base_layer.weight, fl_layer.base_layer.weight.quant_state)
                rec("parts", "tuning.pick via ops._resolve (auto)", _time(
                    lambda: ops._resolve("auto", M, N, K, w, device, "forward", torch.bfloat16, True,
                                         torch.bfloat16, torch.bfloat16, 16), reps, sync), M=M)
        fastlora.unpatch(fl_model)
        del peft_model, fl_model, peft_layer, fl_layer
        if cuda:
            torch.cuda.empty_cache()

    if args.out:
        writer = harness.RecordWriter(args.out, "host_breakdown")
        for r in records:
            cfg = {k: v for k, v in r.items() if k not in ("min", "median")}
            writer.write(harness.make_record("host_breakdown", cfg, {"host_us_min": r["min"],
                                                                      "host_us_median": r["median"]},
                                             FORMULAS, device=device, smoke=args.dry))
    return 0


FORMULAS = {
    "host_us_min": "min over reps of time.perf_counter_ns() around one call (µs), the GPU synchronized "
                   "before each call",
    "host_us_median": "median over reps of the same",
}


if __name__ == "__main__":
    raise SystemExit(main())
