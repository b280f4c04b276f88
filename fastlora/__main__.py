"""The ``fastlora`` command.

    fastlora bench {layer,train,report,all} [options]     the benchmarks of a source checkout
    fastlora inspect [options]                           compile the kernels for GPU targets (no GPU
                                                         needed) and report resources and a model
    fastlora check [--model M] [--m ...] [--json] [--out DIR]
                                                         numerics against PEFT + bitsandbytes and fp64,
                                                         speed against PEFT on this GPU, one verdict
    fastlora tune [--model M | --shapes NxK,...] [--m ...]
                                                         time the candidates of every projection shape
                                                         on this GPU, keep the fastest in the cache

The benchmarks live in the checkout's ``benchmarks/`` folder, not in the installed package: the
command looks for them in ``$FASTLORA_REPO``, the current directory, then next to this package (an
editable install), and runs ``python -m benchmarks`` there in a fresh interpreter, so that
``TRITON_INTERPRET=1`` can be set before Triton compiles anything when there is no GPU.
``check`` runs in a fresh interpreter for the same reason (the numerics run in Triton's interpreter on
a CPU), ``inspect`` and ``tune`` in one without it (compiled kernels; ``tune`` exits 1 without a GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

USAGE = ("usage: fastlora bench {layer,train,report,all} [options]   (fastlora bench -h for the options)\n"
         "       fastlora inspect [options]                          (fastlora inspect -h for the options)\n"
         "       fastlora check [options]                            (fastlora check -h for the options)\n"
         "       fastlora tune [options]                             (fastlora tune -h for the options)")


def _checkout() -> Optional[Path]:
    for cand in (os.environ.get("FASTLORA_REPO"), os.getcwd(), Path(__file__).resolve().parent.parent):
        if cand and (Path(cand) / "benchmarks" / "harness.py").is_file():
            return Path(cand).resolve()
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("inspect", "tune"):
        # the kernels must be decorated as compiled functions, not the interpreter's: a process of
        # its own, without TRITON_INTERPRET
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        module = "fastlora.inspection" if argv[0] == "inspect" else "fastlora.tuning"
        return subprocess.call([sys.executable, "-m", module, *argv[1:]], env=env)
    if argv[0] == "check":
        import torch

        # compiled kernels on a GPU; Triton's interpreter on a CPU, set before triton is imported there
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
        return subprocess.call([sys.executable, "-m", "fastlora.check", *argv[1:]], env=env)
    if argv[0] != "bench":
        print(f"fastlora: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    root = _checkout()
    if root is None:
        print("fastlora bench: no fastlora checkout found (benchmarks/ is not installed with the package); "
              "run it from the repository root or set FASTLORA_REPO", file=sys.stderr)
        return 2
    import torch

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    return subprocess.call([sys.executable, "-m", "benchmarks", *argv[1:]], env=env)


if __name__ == "__main__":
    sys.exit(main())
