"""The SimBERT loss ablation and the paraphrase well-formedness measure (chapter *SimBERT, the experiments*)."""
import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simbook.experiments.simbert import (ABLATION_SCORES, CharBigramLM, SimBertAblationConfig, out_of_vocabulary,
                                         summarize_ablation, word_vocabulary)

HAN = st.text(alphabet="今天气很好我们去公园散步吧不热", min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(st.lists(HAN, min_size=1, max_size=6), st.sampled_from(["<s>", "今", "好", "未见"]),
       st.floats(0.05, 0.95))
def test_bigram_probabilities_sum_to_one_over_known_symbols_and_the_unseen_class(sentences, previous, discount):
    lm = CharBigramLM(sentences, discount=discount)
    unseen = "龘"                                      # never in the alphabet: stands for every unseen character
    total = sum(lm.probability(previous, c) for c in lm.preceders) + lm.probability(previous, unseen)
    assert math.isclose(total, 1.0, abs_tol=1e-12)


def test_bigram_lm_prefers_its_own_text_and_refuses_bad_input():
    lm = CharBigramLM(["今天天气很好", "我们去公园散步吧"])
    assert lm.log_perplexity("今天天气很好") < lm.log_perplexity("好很气天天今")
    with pytest.raises(ValueError, match="discount"):
        CharBigramLM(["今天"], discount=1.0)
    with pytest.raises(ValueError, match="at least one"):
        CharBigramLM([])


def test_out_of_vocabulary_flags_a_corrupted_word():
    vocabulary = word_vocabulary(["我们去公园散步吧"])
    assert out_of_vocabulary("我们去公园散步吧", vocabulary) == []
    assert out_of_vocabulary("我们去公人散步吧", vocabulary)
    with pytest.raises(TypeError, match="set"):
        out_of_vocabulary("我们", list(vocabulary))


def test_summary_pairs_seeds_and_skips_missing_scores():
    members = [{"variant": v, "seed": s, "scores": {k: base + 0.1 * s for k in ABLATION_SCORES}}
               for s in (0, 1, 2) for v, base in (("both", 1.0), ("generation", 0.4))]
    members.append({"variant": "similarity", "seed": 0, "scores": {k: None for k in ABLATION_SCORES}})
    summary = summarize_ablation(members)
    d = summary["differences"]["generation"]["top1"]
    assert math.isclose(d["mean"], -0.6) and d["sd"] < 1e-12 and d["n"] == 3
    assert summary["scores"]["similarity"]["kept"]["n"] == 0 and summary["scores"]["similarity"]["kept"]["mean"] is None


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="unknown variants"):
        SimBertAblationConfig(variants=("both", "neither"))
    with pytest.raises(ValueError, match="keep"):
        SimBertAblationConfig(samples=2, keep=3)
    assert [v for v, s in SimBertAblationConfig().runs()[:4]] == ["generation", "similarity", "both", "both+hard"]


def test_cli_runs_resumes_and_refuses_another_configuration(tmp_path):
    def run(*options):
        command = [sys.executable, "-m", "simbook.cli", "simbert", "ablation", "--batch-pairs", "4", "--seeds", "0",
                   "--sources", "2", "--samples", "2", "--keep", "1", "--save", str(tmp_path), "--no-progress",
                   "--threads", "1", *options]
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    stopped = run("--steps", "2", "--variants", "generation", "--minutes", "0")
    assert stopped.returncode == 0 and "0 of 1 models done" in stopped.stdout, stopped.stderr
    first = run("--steps", "2", "--variants", "generation")
    assert first.returncode == 0, first.stderr
    member = tmp_path / "members" / "generation-seed0.json"
    written = member.stat().st_mtime_ns
    second = run("--steps", "2", "--variants", "generation", "both")     # the finished model is read back
    assert second.returncode == 0, second.stderr
    record = json.loads((tmp_path / "record.json").read_text(encoding="utf-8"))
    assert record["final"]["complete"] and record["final"]["members"] == 2 and member.stat().st_mtime_ns == written
    other = run("--steps", "3", "--variants", "generation")
    assert other.returncode == 2 and "another configuration" in other.stderr
