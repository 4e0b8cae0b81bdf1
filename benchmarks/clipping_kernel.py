"""A clipped AdamW step in one pass of our own: does it beat clip_grad_norm_ + torch's fused AdamW by 1.2x on CPU?

Counting passes over memory (float32 streams per parameter): `clip_grad_norm_` + fused AdamW makes 10 (read g for
the norm, read and write g to scale it, then the step reads p, g, m, v and writes p, m, v); folding the clip into the
fused kernel's `grad_scale` makes 9 (that kernel writes the gradient, divided by grad_scale, back), so it is capped
at 1.11x. A kernel that multiplies each gradient by the clip factor as it reads it, and writes only p, m and v,
makes 8: at most 1.25x.
This script builds such a kernel three ways and times each, side by side in one run, against the torch baseline on
the 20.2M float32 parameters of `clipping.py` (84 tensors; the clip bites, gamma half the norm):

* C        a plain C loop (GCC -O3, AVX2+FMA, no OpenMP: one thread) compiled into a shared library and called
           through ctypes with one pointer per tensor; needs only a C compiler
* compile  `torch.compile` (inductor, CPU C++ codegen) of the same update written in torch over the 84 tensors
* inline   `torch.utils.cpp_extension.load_inline` of the same loop as a torch extension (needs ninja)

For each it prints the build time, cold (empty cache) and cached (a second build in a fresh process), and for each
step the median time over interleaved pairs, the median ratio of the baseline's time to it, and the largest relative
difference of the parameters after one step from the baseline and from an fp64 reference.

    python benchmarks/clipping_kernel.py [--repeats 21] [--variants C compile inline] [--cache DIR] [--build-only]

Run it twice with the same --cache DIR (the first --build-only) to see the cold and the cached build times.
`ClippedOptimizer(..., fold="kernel")` uses the C variant; `benchmarks/clipping.py --only fused` times it there.
"""
import argparse
import ctypes
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clipping import paired, shapes  # noqa: E402

from simbook.optim.clipping import ClippedOptimizer, global_norm  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* One pass of AdamW over n tensors with the clip factor folded in: reads p, g, m, v; writes p, m, v. */
void clipped_adamw(int64_t n, float *const *p, const float *const *g, float *const *m, float *const *v,
                   const int64_t *sizes, float clip, float decay, float one_minus_beta1, float beta2,
                   float one_minus_beta2, float eps, float step_size, float bias_correction2_sqrt)
{
    for (int64_t t = 0; t < n; ++t) {
        float *restrict P = p[t], *restrict M = m[t], *restrict V = v[t];
        const float *restrict G = g[t];
        const int64_t size = sizes[t];
        for (int64_t i = 0; i < size; ++i) {
            const float grad = G[i] * clip;
            const float mi = M[i] + one_minus_beta1 * (grad - M[i]);
            const float vi = beta2 * V[i] + one_minus_beta2 * grad * grad;
            const float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
            M[i] = mi;
            V[i] = vi;
            P[i] = P[i] * decay - step_size * mi / denom;
        }
    }
}
"""

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <cmath>

void clipped_adamw(std::vector<torch::Tensor> p, std::vector<torch::Tensor> g, std::vector<torch::Tensor> m,
                   std::vector<torch::Tensor> v, double clip, double lr, double beta1, double beta2, double eps,
                   double weight_decay, double step_size, double bias_correction2_sqrt) {
    const float c = clip, decay = 1.0 - lr * weight_decay, b1 = 1.0 - beta1, b2 = beta2, ob2 = 1.0 - beta2;
    const float e = eps, s = step_size, bc2 = bias_correction2_sqrt;
    for (size_t t = 0; t < p.size(); ++t) {
        float *__restrict__ P = p[t].data_ptr<float>(), *__restrict__ M = m[t].data_ptr<float>();
        float *__restrict__ V = v[t].data_ptr<float>();
        const float *__restrict__ G = g[t].data_ptr<float>();
        const int64_t size = p[t].numel();
        for (int64_t i = 0; i < size; ++i) {
            const float grad = G[i] * c;
            const float mi = M[i] + b1 * (grad - M[i]);
            const float vi = b2 * V[i] + ob2 * grad * grad;
            const float denom = std::sqrt(vi) / bc2 + e;
            M[i] = mi;
            V[i] = vi;
            P[i] = P[i] * decay - s * mi / denom;
        }
    }
}
"""


def build_c(directory: Path):
    """Compile C_SOURCE into a shared library in `directory`; returns the ctypes function."""
    source, library = directory / "clipped_adamw.c", directory / "clipped_adamw.so"
    source.write_text(C_SOURCE)
    subprocess.run(["cc", "-O3", "-mavx2", "-mfma", "-fno-math-errno", "-fPIC", "-shared", str(source), "-o",
                    str(library)], check=True)
    fn = ctypes.CDLL(str(library)).clipped_adamw
    fn.restype = None
    pointers = ctypes.POINTER(ctypes.c_void_p)
    fn.argtypes = [ctypes.c_int64, pointers, pointers, pointers, pointers, ctypes.POINTER(ctypes.c_int64)] + \
        [ctypes.c_float] * 8     # clip, then 1 - lr*weight_decay, 1 - beta1, beta2, 1 - beta2, eps, step_size, bc2
    return fn


def build_inline(directory: Path):
    from torch.utils.cpp_extension import load_inline
    module = load_inline("simbook_clipped_adamw", cpp_sources=CPP_SOURCE, functions=["clipped_adamw"],
                         extra_cflags=["-O3", "-mavx2", "-mfma", "-fno-math-errno"], build_directory=str(directory),
                         verbose=False)
    return module.clipped_adamw


def torch_update(ps, gs, ms, vs, clip, step_size, bias_correction2_sqrt):
    """The clipped AdamW update in torch ops, for torch.compile; clip, step_size and bias_correction2_sqrt are 0-d
    tensors (they change from step to step: as Python floats they would force a recompile)."""
    beta1, beta2 = BETAS
    for p, g, m, v in zip(ps, gs, ms, vs):
        grad = g * clip
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = v.sqrt() / bias_correction2_sqrt + EPS
        p.mul_(1 - LR * WEIGHT_DECAY).sub_(step_size * m / denom)


def coefficients(step: int) -> tuple[float, float]:
    """(step_size, sqrt of the second bias correction) as torch's AdamW computes them, in float64."""
    beta1, beta2 = BETAS
    return LR / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)


def c_hyperparameters(step_size: float, bias_correction2_sqrt: float) -> list[float]:
    """The C kernel's scalars, each worked out in float64 (1 - beta2 taken in float32 from 0.999f is off by 1e-5)."""
    return [1 - LR * WEIGHT_DECAY, 1 - BETAS[0], BETAS[1], 1 - BETAS[1], EPS, step_size, bias_correction2_sqrt]


class KernelStep:
    """global_norm of the flat gradient buffer, then one kernel call: the clipped AdamW step of `params`."""

    def __init__(self, variant: str, kernel, params: list[torch.Tensor], gamma: float):
        self.variant, self.kernel, self.params, self.gamma = variant, kernel, params, gamma
        self.buffer = torch.zeros(sum(p.numel() for p in params))          # the gradients, as ClippedOptimizer
        self.grads = [b.view_as(p) for b, p in zip(self.buffer.split([p.numel() for p in params]), params)]
        for p, g in zip(params, self.grads):
            p.grad = g
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.step_count = 0
        arrays = lambda ts: (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])  # noqa: E731
        self.pointers = [arrays(ts) for ts in (params, self.grads, self.exp_avg, self.exp_avg_sq)]
        self.sizes = (ctypes.c_int64 * len(params))(*[p.numel() for p in params])

    def reset(self):
        self.step_count = 0
        for t in self.exp_avg + self.exp_avg_sq:
            t.zero_()

    def step(self):
        norm = global_norm(self.buffer)
        clip = min(1.0, self.gamma / (norm + 1e-6))                            # as clip_grad_norm_
        self.step_count += 1
        step_size, bc2 = coefficients(self.step_count)
        beta1, beta2 = BETAS
        if self.variant == "C":
            self.kernel(len(self.params), *self.pointers, self.sizes, clip, *c_hyperparameters(step_size, bc2))
        elif self.variant == "inline":
            self.kernel(self.params, self.grads, self.exp_avg, self.exp_avg_sq, clip, LR, beta1, beta2, EPS,
                        WEIGHT_DECAY, step_size, bc2)
        else:
            with torch.no_grad():
                self.kernel(self.params, self.grads, self.exp_avg, self.exp_avg_sq, torch.tensor(clip),
                            torch.tensor(step_size), torch.tensor(bc2))


def build(variant: str, directory: Path):
    """The kernel of `variant`, and the seconds it took to build (and, for compile, to compile on first call)."""
    t0 = time.perf_counter()
    if variant == "C":
        kernel = build_c(directory)
    elif variant == "inline":
        kernel = build_inline(directory)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
        kernel = torch.compile(torch_update, fullgraph=True)
        params = [torch.zeros(s) for s in shapes()]
        zero = torch.tensor(1.0)
        with torch.no_grad():
            kernel(params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                   [torch.zeros_like(p) for p in params], zero, zero, zero)
    return kernel, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--variants", nargs="+", choices=["C", "compile", "inline"], default=["C", "compile"])
    parser.add_argument("--cache", default=None, help="build directory to reuse (default: a fresh temporary one)")
    parser.add_argument("--build-only", action="store_true", help="build the kernels, print the times, stop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = Path(args.cache or tempfile.mkdtemp(prefix="clipped_adamw_"))
    directory.mkdir(parents=True, exist_ok=True)

    kernels = {}
    for variant in args.variants:
        (directory / variant).mkdir(exist_ok=True)
        kernels[variant], seconds = build(variant, directory / variant)
        print(f"build {variant:<8} {seconds:6.1f} s   ({directory / variant})", flush=True)
    if args.build_only:
        return

    sizes = shapes()
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=generator) for s in sizes]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sizes)]
    reference = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    gamma = 0.5 * reference
    print(f"{sum(g.numel() for g in grads) / 1e6:.1f}M float32 parameters in {len(sizes)} tensors, 1 thread; "
          f"clip at half the norm ({reference:.2f})")

    # fp64 reference of one clipped AdamW step from `start`, zero state
    clip64 = gamma / reference
    step_size, bc2 = coefficients(1)
    expected = []
    for x, g in zip(start, grads):
        x, g = x.double(), g.double() * clip64
        m, v = (1 - BETAS[0]) * g, (1 - BETAS[1]) * g * g
        expected.append(x * (1 - LR * WEIGHT_DECAY) - step_size * m / (v.sqrt() / bc2 + EPS))

    def worst(ps, qs):
        return max(((p.double() - q.double()).norm() / q.double().norm()).item() for p, q in zip(ps, qs))

    make = lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)  # noqa: E731
    theirs_params = [torch.nn.Parameter(x.clone()) for x in start]
    theirs_opt = make(theirs_params)
    for p, g in zip(theirs_params, grads):
        p.grad = g.clone()

    def theirs():
        torch.nn.utils.clip_grad_norm_(theirs_params, gamma)
        theirs_opt.step()

    def restore_theirs():
        with torch.no_grad():
            for p, g in zip(theirs_params, grads):
                p.grad.copy_(g)

    def reset_theirs():
        with torch.no_grad():
            for p, x in zip(theirs_params, start):
                p.copy_(x)
        theirs_opt.state.clear()
        restore_theirs()

    reset_theirs()
    theirs()
    print(f"  clip_grad_norm_ + fused AdamW: parameters after one step vs fp64 {worst(theirs_params, expected):.1e}")
    after_theirs = [p.detach().clone() for p in theirs_params]

    contenders = {}
    folded_params = [torch.nn.Parameter(x.clone()) for x in start]
    folded = ClippedOptimizer(make(folded_params), gamma)
    for p, g in zip(folded_params, grads):
        p.grad.copy_(g)

    def restore_folded():
        with torch.no_grad():
            for p, g in zip(folded_params, grads):
                p.grad.copy_(g)

    assert folded.fold == "grad_scale"
    folded.step()
    contenders["fold grad_scale"] = (folded.step, restore_folded, folded_params, 9)
    for variant, kernel in kernels.items():
        params = [torch.nn.Parameter(x.clone()) for x in start]
        ours = KernelStep(variant, kernel, params, gamma)

        def restore(ours=ours):
            with torch.no_grad():
                for g_ours, g in zip(ours.grads, grads):
                    g_ours.copy_(g)

        restore()
        ours.step()
        contenders[f"kernel {variant}"] = (ours.step, restore, params, 8)

    for name, (step, restore, params, passes) in contenders.items():
        print(f"  {name:<16} after one step: vs clip_grad_norm_ + fused AdamW {worst(params, after_theirs):.1e}, "
              f"vs fp64 {worst(params, expected):.1e} (relative)", flush=True)
    if "C" in kernels:                                                 # the update alone, without norm or clip
        ours = KernelStep("C", kernels["C"], [torch.nn.Parameter(x.clone()) for x in start], gamma)
        step_size, bc2 = coefficients(1)
        alone = lambda: ours.kernel(len(ours.params), *ours.pointers, ours.sizes, 1.0,  # noqa: E731
                                    *c_hyperparameters(step_size, bc2))
        for _ in range(3):
            theirs_opt.step(), alone()
        t_theirs, t_ours, ratio = paired(theirs_opt.step, alone, args.repeats, lambda: None)
        print(f"  the update alone (7 passes each): fused AdamW {t_theirs * 1e3:6.2f} ms   kernel C {t_ours * 1e3:6.2f} ms"
              f"   ratio {ratio:.2f}x", flush=True)
    for name, (step, restore, params, passes) in contenders.items():
        for _ in range(3):                                             # warm-up
            restore_theirs(), theirs(), restore(), step()

        def before(restore=restore):
            restore_theirs(), restore()

        t_theirs, t_ours, ratio = paired(theirs, step, args.repeats, lambda: None, before)
        print(f"  {name:<16} clip_grad_norm_ + fused AdamW {t_theirs * 1e3:6.2f} ms   {name} {t_ours * 1e3:6.2f} ms"
              f"   ratio {ratio:.2f}x   (passes 10 vs {passes}: at most {10 / passes:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
