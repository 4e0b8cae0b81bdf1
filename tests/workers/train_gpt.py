"""A tiny GPT language model trained with simbook.training.fit: run by tests/test_training.py in one process and
under `torchrun --nproc_per_node 2` (gloo), to compare their per-step losses.

usage: python train_gpt.py OUT.json --steps N [--checkpoint DIR] [--resume] [--accumulate A] [--batch B]
"""
import argparse
import json

import torch

from simbook.attention.masks import causal_mask
from simbook.models.gpt import GPT
from simbook.models.transformer import TransformerConfig
from simbook.training import fit, is_main_process, world_size

VOCAB, LENGTH = 50, 12


def make_model() -> GPT:
    torch.manual_seed(0)
    return GPT(TransformerConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                 max_position=32, dropout=0.0, pre_norm=True, activation="gelu_tanh"))


def batch_fn(step: int, generator: torch.Generator, rows: int) -> dict:
    ids = torch.randint(4, VOCAB, (rows, LENGTH), generator=generator)
    lengths = torch.randint(3, LENGTH + 1, (rows,), generator=generator)   # ragged: token counts differ by row
    valid = torch.arange(LENGTH)[None, :] < lengths[:, None]
    return {"ids": ids.masked_fill(~valid, 0), "valid": valid}


def loss_fn(model: GPT, batch: dict) -> torch.Tensor:
    ids, valid = batch["ids"], batch["valid"]
    logits = model(ids, mask=causal_mask(valid))
    targets = valid[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return nll[targets].mean()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--checkpoint")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = fit(make_model(), loss_fn, lambda step, g: batch_fn(step, g, args.batch), steps=args.steps, lr=3e-3,
                 schedule="constant", device="cpu", weight_fn=lambda b: b["valid"][:, 1:].sum(),
                 accumulate=args.accumulate, checkpoint_dir=args.checkpoint, checkpoint_every=2,
                 resume=args.resume, config={"model": "tiny-gpt", "batch": args.batch}, progress=False)
    if is_main_process():
        weights = {k: v.double().sum().item() for k, v in result.model.state_dict().items()}
        with open(args.out, "w") as f:
            json.dump({"losses": result.losses, "world_size": world_size(), "weights": weights}, f)


if __name__ == "__main__":
    main()
