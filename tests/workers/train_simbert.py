"""A tiny SimBERT trained with simbook.experiments.simbert.train_simbert (simbook.training.fit): run by
tests/test_simbert_torchrun.py in one process and under `torchrun --nproc_per_node 2` (gloo), to compare their
per-step joint losses.

usage: python train_simbert.py OUT.json plain|hard
"""
import json
import sys

import torch

from simbook.experiments.simbert import SimBertTrainConfig, new_simbert, train_simbert
from simbook.text import CharTokenizer
from simbook.training import is_main_process, world_size

out, hard = sys.argv[1], sys.argv[2] == "hard"
torch.set_num_threads(1)
groups = [[f"第{i}号房间很干净", f"第{i}号房间非常干净", f"{i}号房间挺干净呀"] for i in range(12)]
tokenizer = CharTokenizer.build([s for g in groups for s in g] + ["很脏"])
model = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16, seed=0)
negatives = {s: [s.replace("干净", "脏")] for g in groups[::2] for s in g} if hard else None
config = SimBertTrainConfig(steps=4, batch_pairs=4, lr=1e-3)
history = train_simbert(model, groups, config, negatives=negatives, device="cpu", seed=0, progress=False)
if is_main_process():
    with open(out, "w") as f:
        json.dump({"loss": history["loss"], "world_size": world_size()}, f)
