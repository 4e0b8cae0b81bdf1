"""`simbook mgs-compare`: MLE, MGS, REINFORCE and MRT fine-tuning at equal sequence passes, over seeds."""
import json
import math

import pytest
import torch

import simbook.experiments.mgs as mgs
from simbook.experiments.mgs import (COMPARE_METHODS, CompareConfig, finetune_member, pretrain_start,
                                     sequence_log_probs, sequence_repetition, summarize_compare)

TINY = ["--pretrain-steps", "2", "--finetune-steps", "2", "--width", "16", "--layers", "1", "--max-chars", "24",
        "--num-prompts", "4", "--cap", "8", "--batch-size", "4", "--samples", "2", "--no-progress", "--device", "cpu"]


def tiny_config(**changes) -> CompareConfig:
    return CompareConfig(**{**dict(pretrain_steps=2, finetune_steps=2, width=16, layers=1, max_chars=24, num_prompts=4,
                                   cap=8, batch_size=4, samples=2, seeds=(0, 1)), **changes})


@pytest.fixture(scope="module")
def corpus():
    from simbook.experiments.decoding import paragraph_corpus

    c = tiny_config()
    return paragraph_corpus(prompt_chars=c.prompt_chars, max_chars=c.max_chars, vocab=c.vocab, min_test=c.num_prompts)


# --- the command as a user drives it ------------------------------------------------------------------------------------

def test_cli_tiny_run_writes_the_record_and_reuses_its_members(capsys, tmp_path, monkeypatch):
    from simbook.cli import main

    save = tmp_path / "run"
    assert main(["mgs-compare", *TINY, "--seeds", "0", "1", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    for word in ("8 of 8 members", "repeat-4", "perplexity", "difference from MLE", *COMPARE_METHODS):
        assert word in out
    record = json.loads((save / "record.json").read_text())
    final = record["final"]
    assert record["status"] == "finished" and record["name"] == "mgs-compare" and record["config"]["width"] == 16
    assert final["complete"] and final["members"] == final["planned"] == 8
    assert final["passes_per_step"] == (4 + 1) * 4
    summary = final["summary"]
    assert summary["seeds"] == [0, 1] and summary["methods"] == list(COMPARE_METHODS)
    for name in ("pretrained", *COMPARE_METHODS):
        for metric in ("repeat_4", "perplexity"):
            s = summary["scores"][name][metric]
            assert s["n"] == 2 and s["low"] <= s["mean"] <= s["high"]
    assert set(summary["differences"]) == {"MGS", "REINFORCE", "MRT"}
    assert len(list((save / "members").glob("*.json"))) == 8 and len(final["results"]) == 8

    # run again: every member is read back, nothing is trained
    def refuse(*args, **kwargs):
        raise AssertionError("a finished member was trained again")

    monkeypatch.setattr(mgs, "finetune_member", refuse)
    monkeypatch.setattr(mgs, "pretrain_start", refuse)
    assert main(["mgs-compare", *TINY, "--seeds", "0", "1", "--save", str(save), "--resume"]) == 0
    again = json.loads((save / "record.json").read_text())["final"]
    assert again["summary"] == summary


def test_cli_deadline_stops_between_members_and_another_config_is_refused(capsys, tmp_path):
    from simbook.cli import main

    save = tmp_path / "run"
    assert main(["mgs-compare", *TINY, "--seeds", "0", "--methods", "MLE", "MGS", "--minutes", "1e-9",
                 "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "0 of 2 members" in out and "run the same command again" in out
    assert json.loads((save / "record.json").read_text())["final"]["complete"] is False
    assert main(["mgs-compare", *TINY, "--seeds", "0", "--methods", "MLE", "--save", str(save)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["mgs-compare", *TINY, "--seeds", "0", "--methods", "MLE", "--width", "8", "--save", str(save)])
    assert e.value.code == 2 and "another configuration" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--samples", "1"], "samples must be >= 2"),
    (["--methods", "PPO"], "unknown methods"),
    (["--seeds", "-1"], "seeds must be integers >= 0"),
    (["--seeds", "0", "0"], "must not repeat"),
    (["--samples", "3"], "multiple of 2 * samples"),
    (["--temperature", "0"], "temperature"),
    (["--mrt-alpha", "-1"], "mrt_alpha"),
    (["--finetune-steps", "0"], "finetune_steps must be >= 1"),
    (["--minutes", "-1"], "--minutes must be a number >= 0"),
    (["--device", "tpu"], "device"),
])
def test_cli_refuses_bad_values_in_one_line(capsys, tmp_path, options, message):
    from simbook.cli import main

    with pytest.raises(SystemExit) as e:
        main(["mgs-compare", *TINY, *options, "--save", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "members").exists()


def test_the_cli_defaults_are_the_config_defaults():
    from simbook.cli import build_parser
    from simbook.training import config_from_args

    assert config_from_args(CompareConfig, build_parser().parse_args(["mgs-compare"])) == CompareConfig()
    assert "%" not in build_parser()._subparsers._group_actions[0].choices["mgs-compare"].format_help().replace(
        "%%", "")


def test_config_refuses_bad_values():
    with pytest.raises(TypeError):
        finetune_member("MLE", None, None, object(), seed=0)
    with pytest.raises(ValueError, match="unknown method"):
        finetune_member("SGD", None, None, tiny_config(), seed=0)
    with pytest.raises(ValueError, match="at least one seed"):
        tiny_config(seeds=())
    with pytest.raises(ValueError, match="alpha"):
        tiny_config(alpha=0.0)
    assert tiny_config().prompts_per_step * tiny_config().samples * 2 == 4 * 4


# --- equal evaluations ------------------------------------------------------------------------------------------------

def test_every_method_spends_the_same_sequence_passes(corpus, monkeypatch):
    """The member's own counts against counts taken independently: rows through the model's forward with gradients
    on (the teacher-forced passes) and rows handed to the decoders (greedy for MGS, sampling for REINFORCE / MRT)."""
    from simbook.models.gpt import GPT

    c = tiny_config(finetune_steps=3)
    start, _ = pretrain_start(c, corpus, seed=0, device="cpu")
    B, K, P, n = c.batch_size, c.num_candidates, c.prompts_per_step, c.samples
    seen = {"teacher_forced": 0, "decoded": 0}
    forward = GPT.forward

    def counting_forward(self, input_ids, *args, **kwargs):
        if torch.is_grad_enabled():
            seen["teacher_forced"] += input_ids.shape[0]
        return forward(self, input_ids, *args, **kwargs)

    def counting(decoder):
        def run(dec, prompts, *args, **kwargs):
            seen["decoded"] += prompts.shape[0]
            return decoder(dec, prompts, *args, **kwargs)
        return run

    monkeypatch.setattr(GPT, "forward", counting_forward)
    monkeypatch.setattr(mgs, "greedy", counting(mgs.greedy))
    monkeypatch.setattr(mgs, "sample", counting(mgs.sample))
    expected_decoded = {"MLE": 0, "MGS": K * B, "REINFORCE": P * n, "MRT": P * n}
    for method in COMPARE_METHODS:
        seen.update(teacher_forced=0, decoded=0)
        member = finetune_member(method, start, corpus, c, seed=0, device="cpu")
        passes = member["passes"]
        assert passes["total"] == c.finetune_steps * c.passes_per_step == c.finetune_steps * (K + 1) * B, method
        assert passes["decoded"] == c.finetune_steps * expected_decoded[method], method
        # the held-out measurement decodes the test prompts once after training: not part of the budget
        assert seen["decoded"] - c.num_prompts == passes["decoded"], method
        assert seen["teacher_forced"] == passes["teacher_forced"], method


# --- the pieces -------------------------------------------------------------------------------------------------------

def test_sequence_log_probs_matches_a_forward_per_prefix(corpus):
    from simbook.decoding import StepDecoder, sample

    c = tiny_config()
    model, _ = pretrain_start(c, corpus, seed=0, device="cpu")
    prompts = corpus.prompts(corpus.train[:3]).repeat_interleave(2, 0)
    with torch.no_grad():
        out = sample(StepDecoder(model), prompts, max_new_tokens=6, eos_id=corpus.tokenizer.sep_id,
                     generator=torch.Generator().manual_seed(1), temperature=0.7)
        fast = sequence_log_probs(model, prompts, out, temperature=0.7)
        for i, row in enumerate(out.to_lists()):
            ids, total = prompts[i].tolist(), 0.0
            for token in row:                                  # one full forward per prefix, no cache, no mask
                logits = model(torch.tensor([ids]))[0, -1]
                total += float((logits / 0.7).log_softmax(-1)[token])
                ids.append(token)
            assert math.isclose(float(fast[i]), total, rel_tol=1e-4, abs_tol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        sequence_log_probs(model, prompts, out, temperature=0.0)
    with pytest.raises(ValueError, match="continuations"):
        sequence_log_probs(model, prompts[:2], out)


def test_sequence_repetition_counts_repeated_4grams_of_each_sequence():
    assert sequence_repetition([[1, 2, 3, 4, 1, 2, 3, 4], [1, 2, 3], [5, 5, 5, 5, 5]]) == [1 / 5, 0.0, 1 / 2]


def test_summary_pairs_the_seeds_and_uses_the_t_interval():
    def member(method, seed, repeat, ppl):
        return {"method": method, "seed": seed, "metrics": {"repeat_4": repeat, "perplexity": ppl,
                                                            "non_termination": 0.0, "mean_length": 10.0},
                "pretrained": {"repeat_4": 0.5, "perplexity": 100.0 + seed, "non_termination": 0.0,
                               "mean_length": 12.0},
                "passes": {"total": 20}, "config": {"finetune_steps": 2}}

    members = [member("MLE", s, 0.3 + 0.1 * s, 90.0) for s in range(3)]
    members += [member("MGS", s, 0.3 + 0.1 * s - d, 95.0) for s, d in zip(range(3), (0.1, 0.2, 0.3))]
    summary = summarize_compare(members)
    diff = summary["differences"]["MGS"]["repeat_4"]
    half = 4.302653 * 0.1 / math.sqrt(3)                      # t_{0.975, 2} sd / sqrt(n), sd of (-0.1, -0.2, -0.3)
    assert math.isclose(diff["mean"], -0.2) and math.isclose(diff["sd"], 0.1)
    assert math.isclose(diff["low"], -0.2 - half, abs_tol=1e-4) and math.isclose(diff["high"], -0.2 + half, abs_tol=1e-4)
    assert summary["differences"]["MGS"]["perplexity"]["sd"] == 0.0
    assert summary["scores"]["pretrained"]["perplexity"]["mean"] == 101.0
    assert summary["passes_per_step"] == {"MLE": [10.0], "MGS": [10.0]}
    one = summarize_compare(members[:1])
    assert one["scores"]["MLE"]["repeat_4"]["n"] == 1 and one["scores"]["MLE"]["repeat_4"]["low"] is None
