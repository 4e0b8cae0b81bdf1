"""simbook.attribution vs captum 0.9.0: integrated gradients on the same models and inputs, 50 Gauss-Legendre steps.

Run:  python benchmarks/integrated_gradients.py [--device auto|cpu|cuda] [--repeats 9] [--threads N] [--cpu-time]

Models (random weights, eval mode):
  mlp   784-256-256-10 with ReLU, batch 32, zero baseline, target 1;
  cnn   two conv (16, 32 channels) + max-pool + linear on 1x28x28, batch 16, zero baseline, target 1;
  text  token + position embedding, 2-layer Transformer (width 128, 4 heads, FFN 512), mean pooling, 2 classes;
        vocabulary 5000, length 64, batch 8; attributed at the token embedding with a [PAD] (id 0) baseline.

For each model the contestants are run alternately after a warm-up (paired, interleaved repeats) and the table
gives the median time of each and the ratio captum / simbook (> 1: simbook faster):
  captum default      captum's `attribute` with its defaults (all steps in one batch);
  captum best ibs     captum with the best `internal_batch_size` among 1, 2, 5, 10, 25 steps per pass;
  simbook             simbook with its automatic step chunk (no tuning).
The attributions of simbook and captum must agree to 1e-4 (relative to the largest attribution) before timing.
`--cpu-time` measures process CPU time instead of wall time (steadier on a shared machine).
"""
import argparse
import statistics
import time

import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients
from torch import nn

from simbook.attribution import integrated_gradients, layer_integrated_gradients
from simbook.models.transformer import TransformerConfig, TransformerStack
from simbook.training import resolve_device

N_STEPS = 50
CAPTUM_STEP_CHUNKS = (1, 2, 5, 10, 25)


class TextModel(nn.Module):
    def __init__(self, vocab=5000, width=128, length=64):
        super().__init__()
        config = TransformerConfig(vocab_size=vocab, hidden_size=width, num_layers=2, num_heads=4,
                                   intermediate_size=4 * width, max_position=length, dropout=0.0)
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(length, width)
        self.encoder, self.head = TransformerStack(config), nn.Linear(width, 2)

    def forward(self, ids):
        h = self.token_embedding(ids) + self.position_embedding.weight[:ids.shape[1]]
        return self.head(self.encoder(h).mean(1))


def build_cases(device):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(32 * 7 * 7, 10))
    text = TextModel()
    mlp, cnn, text = (m.to(device).eval() for m in (mlp, cnn, text))
    x_mlp = torch.rand(32, 784, device=device)
    x_cnn = torch.rand(16, 1, 28, 28, device=device)
    ids = torch.randint(1, 5000, (8, 64), device=device)
    cases = {}
    cases["mlp 784-256-256-10, batch 32"] = dict(
        ours=lambda ibs=None: integrated_gradients(mlp, x_mlp, target=1, n_steps=N_STEPS, internal_batch_size=ibs),
        theirs=lambda ibs=None: IntegratedGradients(mlp).attribute(x_mlp, target=1, n_steps=N_STEPS,
                                                                   internal_batch_size=ibs),
        batch=32)
    cases["cnn 1x28x28, batch 16"] = dict(
        ours=lambda ibs=None: integrated_gradients(cnn, x_cnn, target=1, n_steps=N_STEPS, internal_batch_size=ibs),
        theirs=lambda ibs=None: IntegratedGradients(cnn).attribute(x_cnn, target=1, n_steps=N_STEPS,
                                                                   internal_batch_size=ibs),
        batch=16)
    cases["text: embedding + 2-layer Transformer, batch 8"] = dict(
        ours=lambda ibs=None: layer_integrated_gradients(text, text.token_embedding, ids, 0, target=1,
                                                         n_steps=N_STEPS, internal_batch_size=ibs),
        theirs=lambda ibs=None: LayerIntegratedGradients(text, text.token_embedding).attribute(
            ids, torch.zeros_like(ids), target=1, n_steps=N_STEPS, internal_batch_size=ibs),
        batch=8)
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-time", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.cpu_time else time.perf_counter

    def timed(fn):
        sync()
        start = clock()
        fn()
        sync()
        return clock() - start

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, n_steps {N_STEPS}, "
          f"{args.repeats} paired repeats, {'CPU' if args.cpu_time else 'wall'} time")
    print(f"{'model':<48} {'captum default':>14} {'captum best ibs':>16} {'simbook':>9} "
          f"{'vs default':>10} {'vs best':>8}")
    for name, case in build_cases(device).items():
        ours, theirs, batch = case["ours"], case["theirs"], case["batch"]
        a, b = ours(), theirs()
        scale = b.abs().max().item()
        if not torch.allclose(a, b, atol=1e-4 * scale, rtol=1e-3):
            raise SystemExit(f"{name}: attributions differ by {(a - b).abs().max().item():.2e} (scale {scale:.2e})")
        # captum's best internal batch size, chosen on a short run, then timed with the rest
        best_ibs = min((statistics.median(timed(lambda: theirs(k * batch)) for _ in range(3)), k * batch)
                       for k in CAPTUM_STEP_CHUNKS)[1]
        runs = {"default": lambda: theirs(), "best": lambda: theirs(best_ibs), "ours": lambda: ours()}
        times = {key: [] for key in runs}
        for _ in range(args.repeats):                       # interleaved: every repeat runs each contestant once
            for key, fn in runs.items():
                times[key].append(timed(fn))
        med = {key: statistics.median(v) for key, v in times.items()}
        print(f"{name:<48} {med['default'] * 1e3:>11.1f} ms {med['best'] * 1e3:>10.1f} ms "
              f"({best_ibs // batch:>2}) {med['ours'] * 1e3:>6.1f} ms {med['default'] / med['ours']:>9.2f}x "
              f"{med['best'] / med['ours']:>7.2f}x")


if __name__ == "__main__":
    main()
