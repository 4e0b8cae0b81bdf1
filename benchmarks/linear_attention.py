"""Causal linear attention: simbook's op vs the quadratic reference, softmax attention (SDPA) and, when it is
importable, flash-linear-attention (fla); plus the per-token cost of decoding with the recurrent state vs a KV cache.

Run:  python benchmarks/linear_attention.py [--device cpu|cuda] [--lengths 512 1024 ...] [--batch B] [--heads H]
                                           [--dim D] [--dtype float32|bfloat16|float16] [--repeats 5] [--threads N]
                                           [--jsonl FILE]

Inputs are prepared outside the timed region: q and k are already non-negative features (elu+1), shapes
[B, H, T, D]. Columns (each a median over interleaved repeats; CUDA uses triton.testing.do_bench when available):

- simbook      `causal_linear_attention(q, k, v)`: Triton kernel on CUDA, chunked PyTorch on the CPU
- torch chunks the chunked PyTorch path forced on CUDA (`backend="torch"`; on the CPU it is the simbook column)
- quadratic    `causal_linear_attention_quadratic`, the n x n reference (skipped where it would need > --max-quadratic-gib)
- SDPA         `F.scaled_dot_product_attention(is_causal=True)`, softmax attention (flash on the GPU)
- fla          `fla.ops.linear_attn.fused_chunk_linear_attn(normalize=True, scale=1.0)`, layout [B, T, H, D], if importable
- fla chunk    `fla.ops.linear_attn.chunk_linear_attn(normalize=True, scale=1.0)`, the same, if importable

Forward and forward+backward are timed; outputs of every implementation are cross-checked against simbook's. Ratios
are "other / simbook" (> 1: simbook faster). On CUDA the HBM floor of the forward pass (reading q, k, v and writing
the output once: 4·B·H·T·D·bytes / measured copy bandwidth) is printed beside it. Decoding: the time of one
token's attention for one layer with the recurrent state (one position of `causal_linear_attention`: the fused
step kernel on CUDA, `linear_attention_step`'s arithmetic on the CPU) vs SDPA over a KV cache holding
the context.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from simbook.attention.linear import (HAS_TRITON, causal_linear_attention, causal_linear_attention_quadratic,
                                      elu_feature_map, LinearAttentionState)

try:
    from fla.ops.linear_attn import fused_chunk_linear_attn
except Exception as error:                   # not installed, or installed without a usable GPU
    fused_chunk_linear_attn, FLA_ERROR = None, f"{type(error).__name__}: {error}"
else:
    FLA_ERROR = None
try:
    from fla.ops.linear_attn import chunk_linear_attn
except Exception:
    chunk_linear_attn = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(B, H, T, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    q, k = elu_feature_map(q), elu_feature_map(k)
    return [x.to(device=device, dtype=dtype).contiguous() for x in (q, k, v)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict, device, repeats: int) -> dict:
    """Median seconds of each function; interleaved repeats after one warm-up call each."""
    if device.type == "cuda" and HAS_TRITON:
        from triton.testing import do_bench
        return {name: do_bench(fn, return_mode="median") / 1e3 for name, fn in fns.items()}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def implementations(device, T, B, H, D, max_quadratic_gib):
    impls = {"simbook": lambda q, k, v: causal_linear_attention(q, k, v, check_finite=False)}
    if device.type == "cuda":
        impls["torch chunks"] = lambda q, k, v: causal_linear_attention(q, k, v, backend="torch", check_finite=False)
    if B * H * T * T * 4 * 3 / 2**30 <= max_quadratic_gib:                  # fp32 scores, mask and product
        impls["quadratic"] = lambda q, k, v: causal_linear_attention_quadratic(q, k, v)
    impls["SDPA"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if fused_chunk_linear_attn is not None and device.type == "cuda":
        def fla(q, k, v):
            out = fused_chunk_linear_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0,
                                          normalize=True)
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)
        impls["fla"] = fla
    if chunk_linear_attn is not None and device.type == "cuda":
        def fla_chunk(q, k, v):
            out = chunk_linear_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0,
                                    normalize=True)
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)
        impls["fla chunk"] = fla_chunk
    return impls


def cross_check(outputs: dict, dtype) -> list[str]:
    reference = outputs["simbook"].float()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    problems = []
    for name, out in outputs.items():
        if name == "SDPA":                                                   # softmax attention: another function
            continue
        error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
        if error > tolerance:
            problems.append(f"{name} differs from simbook by {error:.1e} (relative, tolerance {tolerance:.0e})")
    return problems


def copy_bandwidth(device) -> float:
    x = torch.empty(2**28, dtype=torch.uint8, device=device)               # 256 MiB
    y = torch.empty_like(x)
    seconds = measure({"copy": lambda: y.copy_(x)}, device, 5)["copy"]
    return 2 * x.numel() / seconds                                          # read + write, bytes/s


def run_sweep(args, device, dtype):
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, B={args.batch}, H={args.heads}, D={args.dim}, "
          f"triton {'available' if HAS_TRITON else 'not installed'}, "
          f"fla {'available' if fused_chunk_linear_attn is not None else 'skipped (' + str(FLA_ERROR) + ')'}")
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    for mode in ("forward", "forward+backward"):
        print(f"\n{mode}: milliseconds (median), and other / simbook")
        header = None
        for T in args.lengths:
            q, k, v = make_inputs(args.batch, args.heads, T, args.dim, dtype, device)
            impls = implementations(device, T, args.batch, args.heads, args.dim, args.max_quadratic_gib)
            outputs = {name: fn(q, k, v) for name, fn in impls.items()}
            for problem in cross_check(outputs, dtype):
                print("  WARNING:", problem)
            if mode == "forward":
                fns = {name: (lambda fn=fn: fn(q, k, v)) for name, fn in impls.items()}
            else:
                leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
                grad = torch.randn_like(v)

                def step(fn):
                    for x in leaves:
                        x.grad = None
                    fn(*leaves).backward(grad)
                fns = {name: (lambda fn=fn: step(fn)) for name, fn in impls.items()}
            with torch.no_grad() if mode == "forward" else torch.enable_grad():
                seconds = measure(fns, device, args.repeats)
            names = list(impls)
            if header != names:
                header = names
                print(f"  {'T':>7s} " + " ".join(f"{n:>13s}" for n in names) + "   ratios (other / simbook)")
            row = f"  {T:7d} " + " ".join(f"{1e3 * seconds[n]:13.3f}" for n in names)
            ratios = ", ".join(f"{n} {seconds[n] / seconds['simbook']:.2f}x" for n in names if n != "simbook")
            floor, floor_s = "", None
            if bandwidth and mode == "forward":
                floor_s = 4 * args.batch * args.heads * T * args.dim * q.element_size() / bandwidth
                floor = f", HBM floor {1e3 * floor_s:.3f} ms (simbook at {seconds['simbook'] / floor_s:.1f}x)"
            print(row + "   " + ratios + floor)
            record(args, dict(benchmark="linear_attention", mode=mode, device=str(device),
                              dtype=str(dtype).replace("torch.", ""), B=args.batch, H=args.heads, T=T, D=args.dim,
                              ms={n: 1e3 * seconds[n] for n in names},
                              ratio_vs_simbook={n: seconds[n] / seconds["simbook"] for n in names if n != "simbook"},
                              hbm_floor_ms=1e3 * floor_s if floor else None))


def run_decode(args, device, dtype):
    print(f"\ndecoding one token, one layer (B=1, H={args.heads}, D={args.dim}): milliseconds (median)")
    print(f"  {'context':>8s} {'recurrent':>10s} {'KV SDPA':>10s}   KV / recurrent")
    H, D = args.heads, args.dim
    g = torch.Generator().manual_seed(0)
    q1, k1, v1 = (torch.randn(1, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    q1, k1 = elu_feature_map(q1), elu_feature_map(k1)
    state = LinearAttentionState(torch.rand(1, H, D, D, generator=g).to(device), torch.rand(1, H, D, generator=g).to(device))
    for context in args.decode_lengths:
        keys = torch.randn(1, H, context, D, generator=g).to(device=device, dtype=dtype)
        values = torch.randn(1, H, context, D, generator=g).to(device=device, dtype=dtype)
        # on CUDA one position without gradients goes to the fused step kernel (one launch); on the CPU PyTorch
        fns = {"recurrent": lambda: causal_linear_attention(q1[:, :, None], k1[:, :, None], v1[:, :, None],
                                                            initial_state=state, return_state=True,
                                                            check_finite=False),
               "kv": lambda: F.scaled_dot_product_attention(q1[:, :, None], keys, values)}
        with torch.no_grad():
            seconds = measure(fns, device, args.repeats * 4)
        print(f"  {context:8d} {1e3 * seconds['recurrent']:10.4f} {1e3 * seconds['kv']:10.4f}   "
              f"{seconds['kv'] / seconds['recurrent']:.2f}x")
        record(args, dict(benchmark="linear_attention_decode", device=str(device), dtype=str(dtype).replace("torch.", ""),
                          H=H, D=D, context=context, recurrent_ms=1e3 * seconds["recurrent"],
                          kv_sdpa_ms=1e3 * seconds["kv"]))


def record(args, row: dict) -> None:
    """Append one JSON line to --jsonl (if given)."""
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--decode-lengths", type=int, nargs="+")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--max-quadratic-gib", type=float, default=4.0)
    parser.add_argument("--jsonl", help="append one JSON line per measured row to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lengths = args.lengths or ([1024, 4096, 16384, 65536] if cuda else [512, 1024, 2048, 4096])
    args.decode_lengths = args.decode_lengths or ([1024, 4096, 16384, 65536] if cuda else [1024, 4096, 16384])
    args.batch = args.batch or (4 if cuda else 1)
    args.heads = args.heads or (16 if cuda else 4)
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    run_sweep(args, device, dtype)
    run_decode(args, device, dtype)


if __name__ == "__main__":
    main()
