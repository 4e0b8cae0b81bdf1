"""Recurrent language models (chapter *Language models with a bounded state*) and the non-termination experiment at
the paper's scale (*Seq2seq that won't stop: the experiment*, section "At the paper's scale"): the step decoder
against the model run on whole sequences, the bound on p(eos), the Wilson interval against scipy, `unfinished_by`
against a brute-force count, and the command as a user runs it (worker processes, continuing a run)."""
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from simbook.decoding import beam_search, greedy, sample
from simbook.experiments.decoding import ScaleConfig, random_position_ids, summarize_scale, unfinished_by
from simbook.utils import wilson_interval
from simbook.recurrent import RecurrentConfig, RecurrentLM, RecurrentStepDecoder

pytestmark = pytest.mark.usefixtures("one_thread")


def model_of(cell, seed=0, vocab=20, hidden=12, layers=2):
    torch.manual_seed(seed)
    return RecurrentLM(RecurrentConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, cell=cell)).eval()


MODELS = {cell: model_of(cell) for cell in ("tanh", "lstm")}


@settings(max_examples=20, deadline=None)
@given(cell=st.sampled_from(["tanh", "lstm"]), lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       new=st.integers(1, 10), seed=st.integers(0, 10**6))
def test_greedy_steps_equal_whole_sequence_argmax(cell, lengths, new, seed):
    model = MODELS[cell]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (len(lengths), max(lengths)), generator=g)
    valid = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    out = greedy(RecurrentStepDecoder(model), ids, valid, max_new_tokens=new)
    for row, n in enumerate(lengths):
        sequence = ids[row, :n].tolist()
        for t in range(new):
            with torch.no_grad():
                expected = int(model(torch.tensor([sequence]))[0, -1].argmax())
            assert int(out.tokens[row, t]) == expected
            sequence.append(expected)


def test_beam_search_keeps_states_with_their_beams():
    # beam search reorders rows at every step: its best hypothesis' score must equal the model's own log-probability
    model = MODELS["lstm"]
    prompt = torch.tensor([[3, 4, 5]])
    out = beam_search(RecurrentStepDecoder(model), prompt, beam_width=4, max_new_tokens=6, eos_id=2,
                      early_stopping="never", length_penalty=0.0)
    tokens = out.to_lists()[0]
    with torch.no_grad():
        log_probs = model(torch.tensor([[3, 4, 5] + tokens])).log_softmax(-1)[0]
    score = sum(float(log_probs[2 + i, t]) for i, t in enumerate(tokens))
    assert abs(score - float(out.scores[0])) < 1e-4


def test_state_is_bounded_and_eos_probability_has_a_floor():
    model = model_of("tanh", hidden=8, layers=1)
    ids = torch.randint(0, 20, (32, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden, _ = model.recurrent(model.embedding(ids))
        p_eos = model(ids).softmax(-1)[..., 2]
    W, b = model.embedding.weight, model.output_bias
    h_max = 8 ** 0.5
    delta = torch.exp(-W[2].norm() * h_max - b[2].abs()) / torch.exp(W.norm(dim=1) * h_max + b.abs()).sum()
    assert hidden.abs().max() < 1 and bool((p_eos >= delta).all())


def test_self_terminating_decoding_always_ends():
    model = MODELS["tanh"]
    prompts = torch.randint(3, 20, (16, 4), generator=torch.Generator().manual_seed(2))
    out = sample(RecurrentStepDecoder(model, self_terminating=0.05), prompts, max_new_tokens=400, eos_id=2, top_k=2,
                 generator=torch.Generator().manual_seed(0))
    assert bool(out.finished.all())                 # p(survive 400 steps) <= 0.95^400 ~ 1e-9 per row


def test_save_and_load(tmp_path):
    model = MODELS["lstm"]
    model.save_pretrained(tmp_path)
    again = RecurrentLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 20, (2, 7))
    assert torch.equal(again(ids), model(ids))


def test_bad_input():
    with pytest.raises(ValueError, match="cell"):
        RecurrentConfig(vocab_size=10, cell="gru")
    with pytest.raises(ValueError, match="dropout"):
        RecurrentConfig(vocab_size=10, dropout=1.0)
    with pytest.raises(TypeError, match="RecurrentConfig"):
        RecurrentLM({"vocab_size": 10})
    with pytest.raises(TypeError, match="RecurrentLM"):
        RecurrentStepDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="epsilon"):
        RecurrentStepDecoder(MODELS["tanh"], self_terminating=1.5)
    decoder = RecurrentStepDecoder(MODELS["tanh"], self_terminating=0.1)
    with pytest.raises(ValueError, match="eos_id"):
        decoder.prefill(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        RecurrentStepDecoder(MODELS["tanh"]).prefill(torch.ones(2, 3, dtype=torch.long),
                                                     torch.tensor([[True] * 3, [False] * 3]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), data=st.data())
def test_wilson_interval_equals_scipy(n, data):
    stats = pytest.importorskip("scipy.stats")
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    reference = stats.binomtest(k, n).proportion_ci(method="wilson")
    assert abs(low - reference.low) < 1e-6 and abs(high - reference.high) < 1e-6


def test_wilson_interval_refuses_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.tuples(st.booleans(), st.integers(1, 50)), min_size=1, max_size=30),
       caps=st.lists(st.integers(1, 50), min_size=1, max_size=5))
def test_unfinished_by_counts_rows_without_eos_in_the_first_L(rows, caps):
    finished = torch.tensor([f for f, _ in rows])
    lengths = torch.tensor([n for _, n in rows])
    # a row that ended has its <eos> at position `length`; one that did not has no <eos> at all
    expected = [sum(1 for f, n in rows if not (f and n <= L)) for L in caps]
    assert unfinished_by(finished, lengths, caps) == expected


def test_summary_pools_seeds():
    runs = [{"architecture": "tanh", "variant": "vanilla", "seed": s, "perplexity": p, "contexts": 10,
             "lengths": [5, 10], "unfinished": {"greedy | real": [k + 1, k]}} for s, (p, k) in enumerate([(9.0, 2), (11.0, 4)])]
    summary = summarize_scale(runs)
    rows = summary["r_L"]["tanh | vanilla | greedy | real"]
    assert rows[1]["k"] == 6 and rows[1]["n"] == 20 and rows[1]["seeds"] == 2
    assert abs(rows[1]["mean"] - 0.3) < 1e-9 and abs(rows[1]["sd"] - 0.1414214) < 1e-5
    assert summary["perplexity"]["tanh | vanilla"] == {"mean": 10.0, "sd": 1.414, "seeds": 2}


@settings(max_examples=50, deadline=None)
@given(batch=st.integers(1, 8), length=st.integers(1, 40), spare=st.integers(0, 60), seed=st.integers(0, 99))
def test_random_position_ids_are_shifted_ranges_inside_the_table(batch, length, spare, seed):
    table = length + spare
    ids = random_position_ids((batch, length), table, torch.Generator().manual_seed(seed))
    assert ids.shape == (batch, length) and ids.dtype == torch.long
    assert bool((ids[:, :1] >= 0).all()) and bool((ids[:, -1] < table).all())
    assert torch.equal(ids - ids[:, :1], torch.arange(length).expand(batch, length))     # consecutive positions


def test_random_position_ids_reach_every_row_and_refuse_a_short_table():
    ids = random_position_ids((4000, 10), 60, torch.Generator().manual_seed(0))
    assert set(ids.flatten().tolist()) == set(range(60))             # every row of the table is trained
    assert ids[:, 0].min() == 0 and ids[:, 0].max() == 50            # offsets span [0, max_position - T]
    with pytest.raises(ValueError, match="position table"):
        random_position_ids((2, 11), 10, torch.Generator())


def test_config_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="architectures"):
        ScaleConfig(architectures=("gru",))
    with pytest.raises(ValueError, match="decoders"):
        ScaleConfig(decoders=("beam 7",))
    with pytest.raises(ValueError, match="lengths"):
        ScaleConfig(cap=100, lengths=(10, 200))
    with pytest.raises(ValueError, match="epsilon"):
        ScaleConfig(epsilons=(0.0,))
    assert len(ScaleConfig().runs()) == 36 and len(ScaleConfig.small().runs()) == 4


def test_command_runs_workers_and_continues(tmp_path):
    save = tmp_path / "run"
    command = [sys.executable, "-m", "simbook.cli", "non-termination-scale", "--device", "cpu", "--save", str(save),
               "--architectures", "tanh", "--epsilons", "0.01", "--seeds", "2", "--steps", "5", "--width", "8",
               "--cap", "12", "--contexts", "4", "--lengths", "6", "12", "--decoders", "greedy", "consistent top-k 4",
               "--max-chars", "24", "--threads", "1", "--no-progress"]
    done = subprocess.run(command + ["--jobs", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads((save / "record.json").read_text())
    assert record["status"] == "finished" and record["final"]["models_done"] == 4
    results = sorted((save / "results").glob("*.json"))
    assert len(results) == 4 and not list((save / "results").glob("*.claim"))      # every claim released
    before = {p.name: p.read_text() for p in results}
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)     # finished models are reused
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_text() for p in sorted((save / "results").glob("*.json"))} == before
    assert "4 of 4 models" in again.stdout
    bad = subprocess.run(command + ["--decoders", "beam 9"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "beam 9" in bad.stderr


def test_workers_skip_models_another_worker_claimed(tmp_path):
    """A worker of `--jobs` runs only models nobody has claimed, so the workers never run one model twice."""
    from simbook.experiments.decoding import _result_path, run_non_termination_scale
    config = ScaleConfig(architectures=("tanh",), epsilons=(0.01,), seeds=1, steps=2, width=8, cap=6, contexts=2,
                         lengths=(6,), decoders=("greedy",), max_chars=24)
    claimed = _result_path(tmp_path, "tanh", "vanilla", 0)
    claimed.parent.mkdir(parents=True)
    claimed.with_suffix(".claim").touch()                          # another worker is running the vanilla model
    ran = run_non_termination_scale(config, device="cpu", save_dir=tmp_path, shard=(0, 2))
    assert [r["variant"] for r in ran] == ["ST 0.01"] and not claimed.exists()
    assert not _result_path(tmp_path, "tanh", "ST 0.01", 0).with_suffix(".claim").exists()


def test_workers_get_the_threads_and_minutes_of_the_command(tmp_path, monkeypatch):
    """`--jobs` passes `--threads` and `--minutes` on to every worker (two workers of default threads on two cores
    would each run torch's default thread count: oversubscribed)."""
    from types import SimpleNamespace

    import simbook.experiments.decoding as decoding
    from simbook.cli import main
    launched = []

    class Worker:
        def __init__(self, command):
            launched.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr(decoding, "subprocess", SimpleNamespace(Popen=Worker))     # only the module's own name
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tanh-vanilla-seed0.claim").touch()          # stale, from an interrupted run
    assert main(["non-termination-scale", "--device", "cpu", "--save", str(tmp_path), "--architectures", "tanh",
                 "--jobs", "2", "--threads", "1", "--minutes", "5", "--no-progress"]) == 0
    assert len(launched) == 2 and not list((tmp_path / "results").glob("*.claim"))
    for i, command in enumerate(launched):
        assert command[command.index("--threads") + 1] == "1" and float(command[command.index("--minutes") + 1]) == 5
        assert command[command.index("--shard") + 1] == f"{i}/2"


def test_a_model_finished_while_being_claimed_is_not_run_again(tmp_path, monkeypatch):
    """A worker that claims a model another worker has just finished (result written, claim let go, between this
    worker's check and its claim) lets it go: no model runs twice."""
    import simbook.experiments.decoding as decoding
    config = ScaleConfig(architectures=("tanh",), epsilons=(0.01,), seeds=1, steps=2, width=8, cap=6, contexts=2,
                         lengths=(6,), decoders=("greedy",), max_chars=24)
    claim = decoding._claim

    def claim_after_the_other_worker_finished(path):
        if "vanilla" in path.name:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"by": "the other worker"}')
        return claim(path)

    monkeypatch.setattr(decoding, "_claim", claim_after_the_other_worker_finished)
    ran = decoding.run_non_termination_scale(config, device="cpu", save_dir=tmp_path, shard=(1, 2))
    vanilla = decoding._result_path(tmp_path, "tanh", "vanilla", 0)
    assert [r["variant"] for r in ran] == ["ST 0.01"]
    assert vanilla.read_text() == '{"by": "the other worker"}' and not list(tmp_path.glob("results/*.claim"))
