"""Nearest-neighbour search at 1M and 10M vectors: simbook's blocked matmul against FAISS and sentence-transformers.

The vectors are synthetic: unit vectors drawn from a mixture of Gaussians (`--clusters` centres on the sphere, each
point a centre plus isotropic noise of norm about `--spread`, normalised), so that neighbourhoods have structure as
sentence vectors do; the queries are fresh draws from the same mixture. Dimension 128 is the hidden size of the
shipped SimBERT. Contenders, all asked for the top 10 by inner product (= cosine):

* matmul      `simbook.search.VectorIndex`, backend "exact": blocked matrix products and a running top-k in torch
* st          `sentence_transformers.util.semantic_search` with `dot_score` (its chunked matmul + top-k)
* faiss-flat  FAISS `IndexFlatIP` (exact)
* faiss-ivf   FAISS `IndexIVFFlat`, `--nlist` k-means cells trained on 64 points per cell, `nprobe` cells scanned
* faiss-hnsw  FAISS `IndexHNSWFlat` (M=32, efConstruction 40), only up to `--hnsw-max` vectors and
              `--hnsw-max-dim` dimensions (its build is slow on few cores)

Reported per contender: ms/query at batch 1 (`--single` queries, one at a time; mean) and at batch 100 (`--batches`
batches of 100; mean per query), recall@10 against the exact top 10 (matmul's, on all the timed queries), the
memory of the index (the bytes of its arrays: vectors, and for FAISS the IVF lists' ids and centroids or the HNSW
graph) and the largest growth of the process while searching the batches of 100 (sampled every 5 ms). The summary's
speed-ups are matmul's time / the contender's.

    python benchmarks/faiss_search.py [--sizes 1000000 10000000] [--dims 128] [--threads 2] [--device cpu|cuda]
"""
import argparse
import gc
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from simbook.search import VectorIndex, build_faiss_index


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Largest growth of the resident set over the block, sampled every 5 ms in a thread."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.base


def mixture(n: int, dim: int, clusters: int, spread: float, seed: int, chunk: int = 1_000_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=torch.Generator().manual_seed(12345)), dim=1)
    out = torch.empty(n, dim)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = torch.randint(clusters, (m,), generator=g)
        block = torch.randn(m, dim, generator=g).mul_(spread / dim ** 0.5).add_(centres[which])
        out[start:start + m] = F.normalize(block, dim=1)
    return out


def faiss_bytes(idx, kind: str) -> int:
    """What a FAISS index holds: the stored vectors, plus the lists' ids and the centroids (IVF) or the graph (HNSW)."""
    import faiss

    if kind == "flat":
        return idx.ntotal * idx.d * 4
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(idx)
        sizes = sum(ivf.invlists.list_size(i) for i in range(ivf.nlist))
        return sizes * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4
    h = idx.hnsw
    return idx.ntotal * idx.d * 4 + h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())) / exact.numel()


def timed(search, queries: torch.Tensor, single: int, batches: int, sync) -> dict:
    search(queries[:1])                                             # warm-up
    sync()
    t0 = time.perf_counter()
    for i in range(single):
        search(queries[i:i + 1])
    sync()
    one = (time.perf_counter() - t0) / single
    found = []
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        for b in range(batches):
            found.append(search(queries[100 * b:100 * (b + 1)]))
        sync()
        hundred = (time.perf_counter() - t0) / (100 * batches)
    return {"b1": 1000 * one, "b100": 1000 * hundred, "ids": torch.cat(found).cpu(), "search_mb": peak.growth / 2 ** 20}


def run_size(n: int, dim: int, args, sync) -> list[dict]:
    from sentence_transformers.util import dot_score, semantic_search

    device = torch.device(args.device)
    t0 = time.perf_counter()
    x = mixture(n, dim, args.clusters, args.spread, seed=0)
    queries = mixture(100 * args.batches, dim, args.clusters, args.spread, seed=1)
    print(f"\n== {n:,} vectors x {dim} (float32, {x.nbytes / 2**30:.2f} GiB), generated in "
          f"{time.perf_counter() - t0:.1f} s; {args.single} queries at batch 1, {args.batches} x 100 at batch 100",
          flush=True)
    rows = []

    def add(name, res, memory_mb, build_s, exact):
        res.update(name=name, recall=recall(res["ids"], exact) if exact is not None else 1.0, memory_mb=memory_mb,
                   build_s=build_s, n=n, dim=dim)
        rows.append(res)
        print(f"  {name:<22} b1 {res['b1']:9.2f} ms  b100 {res['b100']:9.3f} ms/query  recall@10 {res['recall']:.4f}"
              f"  index {memory_mb:7.0f} MB  search +{res['search_mb']:5.0f} MB  build {build_s:6.1f} s", flush=True)

    xd, qd = x.to(device), queries.to(device)
    index = VectorIndex(xd)
    res = timed(lambda q: index.search(q, 10)[1], qd, args.single, args.batches, sync)
    exact = res["ids"]
    add("simbook matmul", res, xd.nbytes / 2 ** 20, 0.0, None)

    def st(q):
        hits = semantic_search(q, xd, top_k=10, score_function=dot_score)
        return torch.tensor([[h["corpus_id"] for h in row] for row in hits])

    if n <= args.st_max:
        add("sentence-transformers", timed(st, qd, args.single, args.batches, sync), xd.nbytes / 2 ** 20, 0.0, exact)
    del xd, index
    gc.collect()

    def faiss_search(idx):
        return lambda q: torch.from_numpy(idx.search(q.cpu().numpy(), 10)[1])

    approximate = [("faiss-flat", "flat", {})]
    approximate += [("faiss-ivf", "ivf", {"nlist": args.nlist, "nprobe": p}) for p in args.nprobe[:1]]
    if n <= args.hnsw_max and dim <= args.hnsw_max_dim:
        approximate.append(("faiss-hnsw", "hnsw", {"m": 32, "ef_construction": 40, "ef_search": args.ef_search[0]}))
    for name, kind, options in approximate:
        t0 = time.perf_counter()
        idx = build_faiss_index(x, kind, **options)
        build = time.perf_counter() - t0
        memory = faiss_bytes(idx, kind) / 2 ** 20
        label = name + "".join(f" {k}={v}" for k, v in options.items() if k in ("nprobe", "ef_search"))
        add(label, timed(faiss_search(idx), queries, args.single, args.batches, lambda: None), memory, build, exact)
        extra = args.nprobe[1:] if kind == "ivf" else args.ef_search[1:] if kind == "hnsw" else []
        for value in extra:                                          # the same index, searched wider
            if kind == "ivf":
                idx.nprobe = value
            else:
                idx.hnsw.efSearch = value
            key = "nprobe" if kind == "ivf" else "ef_search"
            add(f"{name} {key}={value}", timed(faiss_search(idx), queries, args.single, args.batches, lambda: None),
                memory, 0.0, exact)
        del idx
        gc.collect()
    del x
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128])
    parser.add_argument("--dim768-max", type=int, default=1_000_000, help="run 768 dimensions only up to this size")
    parser.add_argument("--single", type=int, default=20, help="queries timed one at a time (default: 20)")
    parser.add_argument("--batches", type=int, default=3, help="batches of 100 queries timed (default: 3)")
    parser.add_argument("--single-10m", type=int, default=5, help="--single above 2M vectors (default: 5)")
    parser.add_argument("--batches-10m", type=int, default=1, help="--batches above 2M vectors (default: 1)")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--hnsw-max", type=int, default=1_000_000, help="build HNSW only up to this size")
    parser.add_argument("--hnsw-max-dim", type=int, default=128, help="build HNSW only up to this dimension")
    parser.add_argument("--st-max", type=int, default=10_000_000, help="run sentence-transformers up to this size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="device of the matmul and sentence-transformers "
                                                        "(FAISS runs on the CPU: faiss-cpu)")
    args = parser.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    print(f"device {args.device}, {args.threads} threads, torch {torch.__version__}, faiss {faiss.__version__}; "
          f"mixture of {args.clusters} clusters, spread {args.spread}", flush=True)
    start = time.perf_counter()
    rows = []
    for dim in args.dims:
        for n in args.sizes:
            if dim != 128 and n > args.dim768_max:
                continue
            a = argparse.Namespace(**vars(args))
            if n > 2_000_000:
                a.single, a.batches = args.single_10m, args.batches_10m
            rows += run_size(n, dim, a, sync)
    print(f"\nsummary (ratios: matmul's time / the contender's, > 1 = faster than simbook's matmul; "
          f"total {time.perf_counter() - start:.0f} s)")
    print(f"| vectors | dim | method | ms/query, batch 1 | ms/query, batch 100 | speed-up b1 | speed-up b100 "
          f"| recall@10 | index MB | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["n"] == r["n"] and b["dim"] == r["dim"] and b["name"] == "simbook matmul")
        print(f"| {r['n']:,} | {r['dim']} | {r['name']} | {r['b1']:.2f} | {r['b100']:.3f} | {base['b1'] / r['b1']:.2f} "
              f"| {base['b100'] / r['b100']:.2f} | {r['recall']:.3f} | {r['memory_mb']:.0f} | {r['build_s']:.1f} |")


if __name__ == "__main__":
    main()
