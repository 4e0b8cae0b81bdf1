"""Gradient clipping: simbook's flat-buffer clipping vs torch.nn.utils.clip_grad_norm_ on ~20M float32 parameters.

The parameters have the shapes of a GPT-2-style model (vocabulary 8192, width 512, 5 layers: 20.2M values in 67
tensors). torch clips the gradients where they lie, tensor by tensor (foreach kernels where it has them);
`ClippedOptimizer` keeps every gradient as a view into one flat buffer and clips that. Three timings, each paired
and interleaved (the two contenders alternate, repeat after repeat), reported as the median ratio of torch's time
to simbook's, for 1 and 2 threads (CPU) or on CUDA when present:

* norm      torch.nn.utils.get_total_norm(grads)  vs  simbook.optim.clipping.global_norm(flat buffer)
* clip, γ > ‖g‖   clip_grad_norm_ when clipping does not bite  vs  ClippedOptimizer.clip()
* clip, γ < ‖g‖   the same when it bites (the gradients are restored, untimed, before every call)
* fused step      clip_grad_norm_ + a fused AdamW (or plain SGD) step  vs  ClippedOptimizer around the same fused
                  optimizer, which folds the clip into the step (AdamW: the optimizer's `grad_scale`; plain SGD: that
                  step's learning rate): the clip costs only the norm; for AdamW also `fold="kernel"`, simbook's own
                  one-pass C kernel (CPU only; compiled on first use, the build time is printed)

It also prints each norm's relative error against an fp64 reference, and for the fused steps the largest relative
difference between the parameters after one step of each (from the same parameters, gradients and state).

    python benchmarks/clipping.py [--repeats 31] [--threads 1 2] [--device cpu|cuda] [--only fused]
"""
import argparse
import statistics
import time

import torch

from simbook.models.gpt import GPT
from simbook.models.transformer import TransformerConfig
from simbook.optim.clipping import ClippedOptimizer, global_norm


def shapes() -> list[torch.Size]:
    config = TransformerConfig(vocab_size=8192, hidden_size=512, num_layers=5, num_heads=8, intermediate_size=2048,
                               max_position=512, dropout=0.0, pre_norm=True)
    with torch.device("meta"):                          # shapes only, no memory
        return [p.shape for p in GPT(config).parameters()]


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def paired(a, b, repeats: int, sync, before=lambda: None) -> tuple[float, float, float]:
    """Median time of a, of b, and median of the per-repeat ratios time(a)/time(b); a and b alternate."""
    ta, tb = [], []
    for i in range(repeats):
        order = [(a, ta), (b, tb)] if i % 2 == 0 else [(b, tb), (a, ta)]
        for fn, out in order:
            before()
            out.append(timed(fn, sync))
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=["clip", "fused"], default=None, help="run one group of rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    generator = torch.Generator().manual_seed(0)
    sizes = shapes()
    grads = [torch.randn(s, generator=generator).to(device) for s in sizes]
    total = sum(g.numel() for g in grads)
    torch_params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in sizes]
    ours_params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in sizes]
    for p, g in zip(torch_params, grads):
        p.grad = g.clone()
    for p, g in zip(ours_params, grads):
        p.grad = g.clone()
    reference = torch.cat([g.reshape(-1).double() for g in grads]).norm().item()
    print(f"{total / 1e6:.1f}M float32 parameters in {len(sizes)} tensors on {device}; fp64 norm {reference:.6f}")

    def restore():
        with torch.no_grad():
            for p, g in zip(torch_params, grads):
                p.grad.copy_(g)
            for p, g in zip(ours_params, grads):
                p.grad.copy_(g)

    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    for n in threads:
        torch.set_num_threads(n)
        print(f"\n{n} thread(s)" if device.type == "cpu" else "\nCUDA")
        clipped = ClippedOptimizer(torch.optim.SGD(ours_params, lr=0.1), 1.0)   # gradients move into one buffer
        restore()
        flat = clipped.buffers

        def ours_clip(gamma):
            clipped.clipper.max_norm = gamma
            return clipped.clip()

        theirs_norm = torch.nn.utils.get_total_norm([p.grad for p in torch_params]).item()
        ours_norm = global_norm(flat)
        print(f"  norm relative error vs fp64: torch {abs(theirs_norm - reference) / reference:.1e}, "
              f"simbook {abs(ours_norm - reference) / reference:.1e}")
        rows = [
            ("norm", lambda: torch.nn.utils.get_total_norm([p.grad for p in torch_params]).item(),
             lambda: global_norm(flat), lambda: None),
            ("clip, gamma > |g|", lambda: torch.nn.utils.clip_grad_norm_(torch_params, 2 * reference).item(),
             lambda: ours_clip(2 * reference), lambda: None),
            ("clip, gamma < |g|", lambda: torch.nn.utils.clip_grad_norm_(torch_params, 0.5 * reference).item(),
             lambda: ours_clip(0.5 * reference), restore),
        ]
        if args.only == "fused":
            rows = []
        for name, theirs, ours, before in rows:
            for _ in range(3):                                     # warm-up
                before(), theirs(), before(), ours()
            t_theirs, t_ours, ratio = paired(theirs, ours, args.repeats, sync, before)
            print(f"  {name:<18} torch {t_theirs * 1e3:7.2f} ms   simbook {t_ours * 1e3:7.2f} ms   "
                  f"ratio (torch / simbook, median of pairs) {ratio:.2f}x")


        if args.only != "clip":
            fused_steps(sizes, grads, reference, args.repeats, sync, device)


# passes over memory per parameter (float32 streams), for the chapter's table
PASSES = {"AdamW": {"fused step": 7, "clip_grad_norm_ + step": 10, "folded": 9, "kernel": 8},
          "SGD": {"fused step": 3, "clip_grad_norm_ + step": 6, "folded": 4}}


def fused_steps(sizes, grads, reference, repeats, sync, device) -> None:
    """clip_grad_norm_ + fused step vs the folded ClippedOptimizer step, for AdamW and plain SGD, with a clip that
    bites (gamma = half the norm)."""
    gamma = 0.5 * reference
    makers = {"AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
              "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-3, fused=True)}
    rows = [(name, make, "auto") for name, make in makers.items()]
    if device.type == "cpu":
        rows.insert(1, ("AdamW", makers["AdamW"], "kernel"))
    for name, make, fold in rows:
        start = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(device) for i, s in enumerate(sizes)]
        theirs_params = [torch.nn.Parameter(x.clone()) for x in start]
        ours_params = [torch.nn.Parameter(x.clone()) for x in start]
        theirs_opt = make(theirs_params)
        t0 = time.perf_counter()
        ours_opt = ClippedOptimizer(make(ours_params), gamma, fold=fold)
        built = time.perf_counter() - t0
        assert ours_opt.fold

        def restore():
            with torch.no_grad():
                for p, g in zip(theirs_params, grads):
                    if p.grad is None:
                        p.grad = g.clone()
                    p.grad.copy_(g)
                for p, g in zip(ours_params, grads):
                    p.grad.copy_(g)

        def theirs():
            torch.nn.utils.clip_grad_norm_(theirs_params, gamma)
            theirs_opt.step()

        restore()
        theirs(), ours_opt.step()                               # one step each from the same point: same result?
        sync()
        worst = max(((p - q).norm() / q.norm()).item() for p, q in zip(ours_params, theirs_params))
        for _ in range(3):                                      # warm-up
            restore(), theirs(), restore(), ours_opt.step()
        t_theirs, t_ours, ratio = paired(theirs, ours_opt.step, repeats, sync, restore)
        passes = PASSES[name]
        folded = passes["kernel" if fold == "kernel" else "folded"]
        label = f"fused {name:<6}" if fold != "kernel" else f"kernel {name}"
        print(f"  {label:<12} clip bites: clip_grad_norm_ + step {t_theirs * 1e3:7.2f} ms   folded "
              f"{t_ours * 1e3:7.2f} ms   ratio {ratio:.2f}x   (passes over memory {passes['clip_grad_norm_ + step']} "
              f"vs {folded}: at most {passes['clip_grad_norm_ + step'] / folded:.2f}x)   "
              f"parameters after one step differ by {worst:.1e} (relative)"
              + (f"   (fold={ours_opt.fold!r}, built or loaded in {built:.2f} s)" if fold == "kernel" else ""))


if __name__ == "__main__":
    main()
