"""simbook's decoder (StepDecoder + greedy / sample) vs Hugging Face transformers' `generate`: tokens per second on
the same tiny random GPT-2 weights, for simbook's fast path (PackedGPT, the default for a GPT) and its general path
(`StepDecoder(model, fast=False)`, the one every other model takes), and for greedy decoding `GraphedGreedy` (a
static cache and the whole step in one CUDA graph on a GPU; the same step run eagerly on a CPU).

Run:  python benchmarks/decoding.py [--device cpu|cuda] [--repeats 7] [--batches 1 16] [--threads N] [--profile]

A GPT-2 (2 layers, 4 heads, width 128, vocabulary 5000, 256 positions) with random weights is saved once into a
temporary folder with `save_pretrained` and loaded into both libraries. For every batch size (prompts of 16
tokens, 128 new tokens, no eos: both produce exactly 128 tokens per row) and mode (greedy; sampling with top-k 50
and top-p 0.9), the two are run alternately after a warm-up, and the table gives the median tokens/s of each and
the ratios simbook / transformers (> 1: simbook faster). The greedy tokens of all three must be identical.
`--profile` prints where simbook's time goes (cProfile of greedy decoding at the smallest batch).
"""
import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from simbook.decoding import StepDecoder, greedy, sample
from simbook.graph_decoding import GraphedGreedy
from simbook.models.gpt import load_hf_gpt2

PROMPT, NEW_TOKENS, VOCAB = 16, 128, 5000


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def build_models(device):
    config = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
        theirs = GPT2LMHeadModel.from_pretrained(path).to(device).eval()
        ours = load_hf_gpt2(path).to(device).eval()
    return ours, theirs


def runners(ours, theirs, ids, mode, seed, fast=True):
    decoder = StepDecoder(ours, fast=fast)
    # eos_token_id=None: no token ends a row, so both produce exactly NEW_TOKENS tokens
    hf_kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                 eos_token_id=None, pad_token_id=0, num_beams=1)
    if mode == "greedy":
        run_ours = lambda: greedy(decoder, ids, max_new_tokens=NEW_TOKENS).tokens
        run_theirs = lambda: theirs.generate(ids, do_sample=False, **hf_kw)[:, PROMPT:]
    else:
        g = torch.Generator(device=ids.device).manual_seed(seed)
        run_ours = lambda: sample(decoder, ids, max_new_tokens=NEW_TOKENS, top_k=50, top_p=0.9, generator=g).tokens
        run_theirs = lambda: theirs.generate(ids, do_sample=True, top_k=50, top_p=0.9, temperature=1.0,
                                             **hf_kw)[:, PROMPT:]
    return run_ours, run_theirs


def profile_simbook(ours, device, batch):
    ids = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
    decoder = StepDecoder(ours)
    greedy(decoder, ids, max_new_tokens=NEW_TOKENS)                       # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        greedy(decoder, ids, max_new_tokens=NEW_TOKENS)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(35)
    print(f"\ncProfile of simbook greedy, batch {batch}, 5 x {NEW_TOKENS} tokens:\n{out.getvalue()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=["greedy", "sample"], choices=["greedy", "sample"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of simbook's greedy decoding")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    transformers.logging.set_verbosity_error()
    ours, theirs = build_models(device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"transformers={transformers.__version__} prompt={PROMPT} new_tokens={NEW_TOKENS} repeats={args.repeats}")
    print(f"{'batch':>5} {'mode':>7} {'simbook tok/s':>14} {'general path':>13} {'transformers tok/s':>19} "
          f"{'ratio':>6} {'general ratio':>14} {'graphed tok/s':>14} {'graphed ratio':>14}")
    rows = []
    for batch in args.batches:
        ids = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(batch)).to(device)
        for mode in args.modes:
            run_ours, run_theirs = runners(ours, theirs, ids, mode, seed=batch)
            run_general, _ = runners(ours, theirs, ids, mode, seed=batch, fast=False)
            graphed = None
            if mode == "greedy":
                static = GraphedGreedy(ours, batch=batch, capacity=PROMPT + NEW_TOKENS)
                graphed = lambda: static.generate(ids, max_new_tokens=NEW_TOKENS).tokens
            with torch.inference_mode():
                _, a = timed(run_ours, sync)                              # warm-up, and the checks
                _, b = timed(run_theirs, sync)
                _, c = timed(run_general, sync)
                assert a.shape == b.shape == c.shape == (batch, NEW_TOKENS), (a.shape, b.shape, c.shape)
                if mode == "greedy":
                    assert torch.equal(a, b), "simbook's greedy tokens differ from transformers'"
                    assert torch.equal(a, c), "the fast and the general path give different greedy tokens"
                    _, d = timed(graphed, sync)                           # captures the graph on CUDA
                    assert torch.equal(a, d), "GraphedGreedy's tokens differ from the packed path's"
                t_ours, t_general, t_theirs, t_graphed = [], [], [], []
                runs = [(t_ours, run_ours), (t_general, run_general), (t_theirs, run_theirs)]
                if graphed is not None:
                    runs.append((t_graphed, graphed))
                for r in range(args.repeats):                             # interleaved, rotating who goes first
                    k = r % len(runs)
                    for times, fn in runs[k:] + runs[:k]:
                        times.append(timed(fn, sync)[0])
            tokens = batch * NEW_TOKENS
            ours_tps, general_tps, theirs_tps = (tokens / statistics.median(t) for t in (t_ours, t_general, t_theirs))
            graphed_tps = tokens / statistics.median(t_graphed) if t_graphed else float("nan")
            rows.append((batch, mode, ours_tps, general_tps, theirs_tps, graphed_tps))
            print(f"{batch:>5} {mode:>7} {ours_tps:>14.0f} {general_tps:>13.0f} {theirs_tps:>19.0f} "
                  f"{ours_tps / theirs_tps:>6.2f} {general_tps / theirs_tps:>14.2f} {graphed_tps:>14.0f} "
                  f"{graphed_tps / theirs_tps:>14.2f}", flush=True)
    if args.profile:
        profile_simbook(ours, device, min(args.batches))
    return rows


if __name__ == "__main__":
    main()
