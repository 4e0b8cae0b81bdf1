"""Every Triton kernel of simbook, compiled on the CPU for Ampere (sm_80) and Hopper (sm_90), for the configurations
the dispatcher can launch: it compiles, uses at most 255 registers per thread, spills nothing (stack + local bytes
0), and its shared memory fits the target's per-block limit. No GPU is needed.

`make test` runs the largest configuration of each dtype (head size 128, the largest chunk the dispatcher allows
there) for both targets; the full sweep (every dtype x padded head size 16/32/64/128 x chunk 16/32/64 x target) is
marked `kernels_full` and runs with `make kernels`, or `pytest -m kernels_full tests/test_kernels_compile.py`.
Head sizes that are not powers of 2 are padded to the next one (`head_block`), so they compile as those sizes.

`python tests/test_kernels_compile.py [--full] [--out FILE]` prints (and writes) the table of resources.
"""
import argparse
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
from simbook.attention import kernels as K  # noqa: E402

TARGETS = (80, 90)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKS = (16, 32, 64, 128)


def dispatchable():
    """Every (dtype, padded head size, chunk) the dispatcher may launch."""
    return [(dtype, block, chunk) for dtype in DTYPES for block in BLOCKS for chunk in K.CHUNK_SIZES
            if K.launch_problem(dtype, block, block, chunk) is None]


def worst_cases():
    """Per dtype: the largest head size, at the largest chunk the dispatcher allows there."""
    return [(dtype, 128, K.default_chunk(dtype, 128, 128)) for dtype in DTYPES]


def problems(row) -> list[str]:
    out = []
    if row["registers"] > 255:
        out.append(f"{row['registers']} registers")
    if row["spill_bytes"]:
        out.append(f"spills {row['spill_bytes']} bytes")
    if row["shared"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared']} > {row['shared_limit']}")
    return out


def _name(config):
    dtype, block, chunk = config
    return f"{str(dtype).replace('torch.', '')}-D{block}-chunk{chunk}"


def _check(config):
    dtype, block, chunk = config
    rows = K.kernel_resources([(dtype, block, chunk, arch) for arch in TARGETS])
    assert {r["kernel"] for r in rows} == {"state", "output", "state_grad", "chunk_grad", "step"}
    bad = [f"{r['kernel']} sm_{r['arch'][3:]}: {', '.join(problems(r))}" for r in rows if problems(r)]
    assert not bad, bad


@pytest.mark.parametrize("config", worst_cases(), ids=_name)
def test_largest_config_of_each_dtype_compiles_clean(config):
    _check(config)


@pytest.mark.kernels_full
@pytest.mark.parametrize("config", dispatchable(), ids=_name)
def test_every_dispatchable_config_compiles_clean(config):
    _check(config)


def test_dispatcher_refuses_what_was_not_compiled():
    assert K.launch_problem(torch.float64, 16, 16, 64) is not None
    assert "head sizes up to 128" in K.launch_problem(torch.float32, 130, 16, 64)
    assert "chunk_size in (16, 32, 64)" in K.launch_problem(torch.float32, 16, 16, 128)
    assert K.head_block(20, 5) == 32 and K.head_block(1, 1) == 16 and K.head_block(96, 128) == 128
    for dtype in DTYPES:
        for D in (16, 48, 100, 128):
            chunk = K.default_chunk(dtype, D, D)
            assert K.launch_problem(dtype, D, D, chunk) is None


def table(rows) -> str:
    lines = [f"{'arch':6s} {'dtype':9s} {'D':>4s} {'chunk':>5s} {'kernel':10s} {'warps':>5s} {'regs':>5s} "
             f"{'spill B':>8s} {'shared B':>9s}  verdict"]
    order = {"state": 0, "output": 1, "state_grad": 2, "chunk_grad": 3, "step": 4}
    for r in sorted(rows, key=lambda r: (r["arch"], r["dtype"], r["block"], r["chunk"], order[r["kernel"]])):
        lines.append(f"{r['arch']:6s} {r['dtype']:9s} {r['block']:4d} {r['chunk']:5d} {r['kernel']:10s} "
                     f"{r['num_warps']:5d} {r['registers']:5d} {r['spill_bytes']:8d} {r['shared']:9d}  "
                     f"{' '.join(problems(r)) or 'ok'}")
    bad = sum(bool(problems(r)) for r in rows)
    lines.append(f"\n{bad} of {len(rows)} compiled kernels fail (spill, registers or shared memory over the limit).")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="compile simbook's Triton kernels for sm_80/sm_90, print resources")
    parser.add_argument("--full", action="store_true", help="every dispatchable config (default: the largest)")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    configs = dispatchable() if args.full else worst_cases()
    rows = []
    for dtype, block, chunk in configs:                  # one config at a time: progress shows, memory stays low
        rows += K.kernel_resources([(dtype, block, chunk, arch) for arch in TARGETS])
        print(f"compiled {_name((dtype, block, chunk))}", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out:
        header = ("Causal linear attention Triton kernels (simbook.attention.kernels), compiled on the CPU with "
                  f"triton {__import__('triton').__version__}\nfor sm_80 and sm_90 by tests/test_kernels_compile.py "
                  "(every flag on; launch options from launch_config). registers and spill\n(stack + local) bytes "
                  "from cuobjdump -res-usage; shared = dynamic + static bytes per block. Limits: sm_80 166,912 B,\n"
                  "sm_90 232,448 B.\n\n")
        with open(args.out, "w") as f:
            f.write(header + text + "\n")
    return 1 if any(problems(r) for r in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
