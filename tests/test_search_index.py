"""simbook.search as users run it: the exact blocked search against one matrix product, the FAISS backends against
it, a saved index read back, the refusal of a model that did not build the index, and `simbook simbert index` /
`simbook simbert search --index` driven through the console script and `main`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from simbook.cli import main
from simbook.search import SentenceIndex, VectorIndex, build_faiss_index, model_fingerprint
from simbook.simbert import SimBert, simbert_checkpoint_path
from simbook.text import peoples_daily

from simbert_common import QUIET, SENTENCES, model, tokenizer  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

SIMBOOK = shutil.which("simbook") or str(Path(sys.executable).parent / "simbook")


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def recall(found, exact):
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())) / exact.numel()


# ------------------------------------------------------------------------------------------- exact, blocked

@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), q=st.integers(1, 20), topn=st.integers(1, 12), block=st.integers(1, 9),
       corpus_block=st.integers(1, 90), seed=st.integers(0, 1000))
def test_blocked_search_equals_one_matrix_product(n, q, topn, block, corpus_block, seed):
    vectors, queries = unit(n, 16, seed=seed), unit(q, 16, seed=seed + 1)
    scores, ids = VectorIndex(vectors).search(queries, topn, block=block, corpus_block=corpus_block)
    k = min(topn, n)
    full = queries @ vectors.T                                       # the independent reference
    reference = full.topk(k, dim=1)
    assert ids.shape == (q, k) and scores.shape == (q, k)
    assert torch.allclose(scores, reference.values, atol=1e-6)
    assert torch.allclose(full.gather(1, ids), scores, atol=1e-6)    # each score is its row's cosine
    assert all(len(set(row)) == k for row in ids.tolist())          # no row twice
    assert torch.all(scores[:, :-1] >= scores[:, 1:])                # best first


def test_vector_index_refuses_bad_input():
    with pytest.raises(ValueError, match="vectors is empty"):
        VectorIndex(torch.empty(0, 4))
    with pytest.raises(ValueError, match="unknown backend 'annoy'"):
        VectorIndex(unit(5, 4), backend="annoy")
    with pytest.raises(TypeError, match="exact backend takes no options"):
        VectorIndex(unit(5, 4), nprobe=3)
    with pytest.raises(ValueError, match="queries has size 5 on axis 1"):
        VectorIndex(unit(5, 4)).search(unit(1, 5))
    with pytest.raises(ValueError, match="block must be >= 1"):
        VectorIndex(unit(5, 4)).search(unit(1, 4), block=0)


# ------------------------------------------------------------------------------------------------- FAISS

def test_faiss_flat_equals_exact_matmul():
    pytest.importorskip("faiss")
    vectors, queries = unit(4000, 48), unit(150, 48, seed=1)
    exact_scores, exact_ids = VectorIndex(vectors).search(queries, 10, block=64)
    flat_scores, flat_ids = VectorIndex(vectors, backend="faiss").search(queries, 10)
    assert torch.equal(flat_ids, exact_ids)
    assert torch.allclose(flat_scores, exact_scores, atol=1e-5)


def test_approximate_backends_reach_exact_recall_when_searched_wide():
    pytest.importorskip("faiss")
    vectors, queries = unit(3000, 32), unit(60, 32, seed=1)
    exact = VectorIndex(vectors).search(queries, 10)[1]
    full_ivf = VectorIndex(vectors, backend="faiss-ivf", nlist=16, nprobe=16).search(queries, 10)[1]
    assert recall(full_ivf, exact) == 1.0                            # every cell scanned: exhaustive
    narrow = VectorIndex(vectors, backend="faiss-ivf", nlist=16, nprobe=1).search(queries, 10)[1]
    assert recall(narrow, exact) < 1.0                               # one cell of 16: it does approximate
    hnsw = VectorIndex(vectors, backend="faiss-hnsw", m=16, ef_search=400).search(queries, 10)[1]
    assert recall(hnsw, exact) > 0.97


def test_faiss_options_are_checked():
    pytest.importorskip("faiss")
    with pytest.raises(ValueError, match="unknown FAISS index kind 'pq'"):
        build_faiss_index(unit(10, 4), "pq")
    with pytest.raises(ValueError, match="nlist=50 cells need at least as many vectors"):
        build_faiss_index(unit(10, 4), "ivf", nlist=50)
    with pytest.raises(ValueError, match="ef_search must be >= 1"):
        build_faiss_index(unit(10, 4), "hnsw", ef_search=0)


def test_missing_faiss_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)                  # `import faiss` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'simbook\[search\]'"):
        VectorIndex(unit(10, 4), backend="faiss")
    assert len(VectorIndex(unit(10, 4))) == 10                       # the exact backend needs nothing


# ----------------------------------------------------------------------------------- save, load, refuse

@QUIET
@pytest.mark.parametrize("backend, options", [("exact", {}), ("faiss", {}), ("faiss-hnsw", {"m": 8})])
def test_save_and_load_round_trip(model, tmp_path, backend, options):  # noqa: F811
    if backend != "exact":
        pytest.importorskip("faiss")
    index = SentenceIndex(model, SENTENCES, backend=backend, **options)
    folder = index.save(tmp_path / "idx", model_name="tiny")
    meta = json.loads((folder / "index.json").read_text())
    assert meta["count"] == len(SENTENCES) and meta["dim"] == 32 and meta["metric"] == "cosine"
    assert meta["model_fingerprint"] == model_fingerprint(model) and meta["model_name"] == "tiny"
    assert (folder / "faiss.index").exists() == (backend != "exact")
    loaded = SentenceIndex.load(folder, model)
    assert loaded.texts == SENTENCES and torch.equal(loaded.vectors, index.vectors)
    assert loaded.backend == backend and loaded.backend_options == options
    for text in SENTENCES[:3] + ["明天天气怎么样"]:
        assert loaded.most_similar(text, 4) == index.most_similar(text, 4)
    exact = SentenceIndex.load(folder, model, backend="exact")       # another backend, built from the vectors
    assert exact.backend == "exact" and exact.most_similar(SENTENCES[1], 1)[0][0] == SENTENCES[1]
    if backend != "exact":                                           # saving an exact index drops a stale FAISS file
        exact.save(folder)
        assert not (folder / "faiss.index").exists()


@QUIET
def test_float16_storage_halves_the_vectors(model, tmp_path):  # noqa: F811
    index = SentenceIndex(model, SENTENCES)
    full, half = index.save(tmp_path / "f32"), index.save(tmp_path / "f16", dtype="float16")
    assert (half / "vectors.safetensors").stat().st_size < 0.6 * (full / "vectors.safetensors").stat().st_size
    loaded = SentenceIndex.load(half, model)
    assert loaded.vectors.dtype == torch.float32
    assert (loaded.vectors - index.vectors).abs().max() < 1e-3
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float16'"):
        index.save(tmp_path / "bf", dtype="bfloat16")


@QUIET
def test_load_refuses_an_index_built_by_another_model(model, tokenizer, tmp_path):  # noqa: F811
    from simbook.experiments.simbert import new_simbert

    folder = SentenceIndex(model, SENTENCES).save(tmp_path / "idx", model_name="tiny")
    other = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16, seed=7).eval()
    with pytest.raises(ValueError, match="was built by another model .*tiny.*this model's fingerprint"):
        SentenceIndex.load(folder, other)
    nudged = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16).eval()
    nudged.load_state_dict(model.state_dict())
    assert model_fingerprint(nudged) == model_fingerprint(model)     # same weights: accepted
    SentenceIndex.load(folder, nudged)
    with torch.no_grad():
        next(nudged.parameters()).view(-1)[0] += 1e-3                # one weight changed: refused
    with pytest.raises(ValueError, match="built by another model"):
        SentenceIndex.load(folder, nudged)
    with pytest.raises(TypeError, match="model must be a SimBert"):
        model_fingerprint(torch.nn.Linear(2, 2))


def test_the_shipped_models_share_a_vocabulary_not_a_fingerprint():
    a = SimBert.from_pretrained(simbert_checkpoint_path())
    b = SimBert.from_pretrained(simbert_checkpoint_path(hard_negatives=True))
    assert a.config.vocab_fingerprint == b.config.vocab_fingerprint
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a.double()) == model_fingerprint(SimBert.from_pretrained(simbert_checkpoint_path()))


@QUIET
def test_load_refuses_damaged_folders(model, tmp_path):  # noqa: F811
    folder = SentenceIndex(model, SENTENCES).save(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="not a saved sentence index"):
        SentenceIndex.load(tmp_path, model)
    lines = (folder / "texts.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "texts.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(ValueError, match="7 texts and vectors of shape \\(8, 32\\), index.json says 8 x 32"):
        SentenceIndex.load(folder, model)
    meta = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps(dict(meta, metric="l2")))
    with pytest.raises(ValueError, match="metric 'l2'"):
        SentenceIndex.load(folder, model)
    (folder / "index.json").write_text(json.dumps(dict(meta, version=99)))
    with pytest.raises(ValueError, match="not a version-1 simbook-sentence-index"):
        SentenceIndex.load(folder, model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        SentenceIndex(model, SENTENCES).save(tmp_path / "file")


# -------------------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    sentences = list(dict.fromkeys(peoples_daily(min_chars=8, max_chars=30)))[:400]
    path = tmp_path_factory.mktemp("corpus") / "news.txt"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return path, sentences


def simbook(*args):
    env = dict(os.environ, COLUMNS="100")
    return subprocess.run([SIMBOOK, *args], capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)


def hits(stdout: str) -> list[list[str]]:
    """The sentences of each query's hit list in `simbook simbert search`'s output."""
    groups = []
    for line in stdout.splitlines():
        if line.startswith("  "):
            groups[-1].append(line.split(None, 1)[1])
        elif "ms, encoding included" in line:
            groups.append([])
    return groups


def test_index_then_search_as_a_user_runs_them(corpus_file, tmp_path):
    path, sentences = corpus_file
    folder = tmp_path / "news-index"
    built = simbook("simbert", "index", "--corpus", str(path), "--save", str(folder), "--no-progress", "--threads", "1")
    assert built.returncode == 0, built.stderr
    assert f"indexed {len(sentences)} sentences" in built.stdout and str(folder) in built.stdout
    assert {p.name for p in folder.iterdir()} == {"index.json", "texts.jsonl", "vectors.safetensors"}
    queries = [sentences[5], sentences[123], "经济工作会议在北京召开"]
    found = simbook("simbert", "search", *queries, "--index", str(folder), "--topn", "3", "--threads", "1")
    assert found.returncode == 0, found.stderr
    assert f"loaded {len(sentences)} sentences from {folder}" in found.stdout
    assert "indexed" not in found.stdout                             # nothing was encoded but the queries
    groups = hits(found.stdout)
    assert [g[0] for g in groups[:2]] == queries[:2]                 # an indexed sentence finds itself first
    assert "1.000  " + queries[0] in found.stdout
    library = SentenceIndex.load(folder, SimBert.from_pretrained(simbert_checkpoint_path()))
    assert groups[2] == [t for t, _ in library.most_similar(queries[2], 3)]   # the CLI answers as the library


def test_search_index_refuses_another_model_and_bad_options(corpus_file, tmp_path):
    path, sentences = corpus_file
    folder = tmp_path / "idx"
    assert main(["simbert", "index", "--corpus", str(path), "--limit", "50", "--save", str(folder),
                 "--no-progress", "--threads", "1"]) == 0
    refused = simbook("simbert", "search", "今天", "--index", str(folder), "--checkpoint", "hard")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "was built by another model" in refused.stderr and "shipped" in refused.stderr
    for args, message in ((["--corpus", str(path)], "with --index the sentences are the index's"),
                          (["--limit", "5"], "with --index the sentences are the index's")):
        with pytest.raises(SystemExit) as stop:
            main(["simbert", "search", "今天", "--index", str(folder), *args])
        assert stop.value.code == 2
    missing = simbook("simbert", "search", "今天", "--index", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not a saved sentence index" in missing.stderr


def test_cli_index_remembers_its_model_and_backend(corpus_file, tmp_path, capsys):
    pytest.importorskip("faiss")
    path, sentences = corpus_file
    folder = tmp_path / "hnsw"
    assert main(["simbert", "index", "--corpus", str(path), "--limit", "120", "--checkpoint", "hard",
                 "--backend", "faiss-hnsw", "--m", "8", "--save", str(folder), "--no-progress", "--threads", "1"]) == 0
    meta = json.loads((folder / "index.json").read_text())
    assert meta["model_name"] == "hard" and meta["backend"] == "faiss-hnsw" and meta["backend_options"] == {"m": 8}
    capsys.readouterr()
    # no --checkpoint: the model the index names ("hard")
    assert main(["simbert", "search", sentences[7], "--index", str(folder), "--topn", "2"]) == 0
    saved = capsys.readouterr().out
    assert "(backend faiss-hnsw)" in saved and hits(saved)[0][0] == sentences[7]
    assert main(["simbert", "search", sentences[7], "--index", str(folder), "--topn", "2", "--backend", "exact"]) == 0
    exact = capsys.readouterr().out
    assert "(backend exact)" in exact and hits(exact) == hits(saved)


def test_cli_without_faiss_says_what_to_install(corpus_file, tmp_path):
    path, _ = corpus_file
    code = ("import sys; sys.modules['faiss'] = None; from simbook.cli import main; "
            f"sys.exit(main(['simbert', 'index', '--corpus', {str(path)!r}, '--limit', '20', '--backend', 'faiss', "
            f"'--save', {str(tmp_path / 'x')!r}, '--no-progress']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pip install 'simbook[search]'" in result.stderr
