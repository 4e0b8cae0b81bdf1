"""Tests of simbook.dialogue: the DialoGPT and CDial-GPT layouts (properties and a brute-force loss identity), the
segment-aware step decoder against a brute-force loop, the LCCC reader, the chat session's history rules, checkpoints,
and the `simbook dialogpt-train` / `simbook chat` commands driven through a pipe and a pseudo-terminal."""
import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simbook.decoding import language_model_loss
from simbook.dialogue import (ChatSession, DialogueDecoder, banned_ids, chat_loop, collate, encode_conversations,
                              generate_replies, mean_nll, pack_cdial, pack_dialogue, prompt_example, reply_example,
                              reply_pairs, training_example)
from simbook.experiments.dialogpt import (DialoGPTConfig, new_dialogue_model, read_lccc, reply_statistics,
                                          split_conversations, train_dialogue_model)
from simbook.models.gpt import GPT
from simbook.models.transformer import TransformerConfig
from simbook.text import ByteBPETokenizer, CharTokenizer, save_tokenizer

SIMBOOK = shutil.which("simbook") or str(Path(sys.executable).parent / "simbook")
PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLS, SEP, SPK = 2, 3, (5, 6)

CONVERSATIONS = [
    ["hi! how are you doing today?", "good thanks, and you?", "great, i just got back from a run",
     "nice, how far did you go?", "about five miles", "wow that is a lot"],
    ["what do you like to do for fun?", "i like to read and hike", "me too! what are you reading?",
     "a book about the ocean"],
    ["do you have any pets?", "yes, a dog named max", "cute! how old is he?", "he is three"],
    ["hello", "hey there, what's up?", "not much, just studying for a test", "good luck with it!"],
] * 6


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    return ByteBPETokenizer.train([u for c in CONVERSATIONS for u in c], vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def trained(tokenizer):
    ids = encode_conversations(tokenizer, CONVERSATIONS)
    model = new_dialogue_model(tokenizer.vocab_size, width=32, layers=1, heads=2, max_length=64, seed=0)
    train_dialogue_model(model, tokenizer, ids, steps=40, batch_size=8, lr=5e-3, seed=0, device="cpu")
    return model, ids


@pytest.fixture(scope="module")
def checkpoint(tokenizer, trained, tmp_path_factory):
    folder = trained[0].save_pretrained(tmp_path_factory.mktemp("chatbot"))
    save_tokenizer(tokenizer, folder)
    return folder


def _tiny_gpt(vocab=40, max_position=48, seed=0):
    torch.manual_seed(seed)
    return GPT(TransformerConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                 max_position=max_position, dropout=0.0, pre_norm=True, activation="gelu_tanh"),
               segments=True).eval()


turns_strategy = st.lists(st.lists(st.integers(7, 39), min_size=0, max_size=12), min_size=1, max_size=8)


# ------------------------------------------------------------------------------------------------ layouts

@PROPERTY
@given(turns=turns_strategy, max_length=st.integers(3, 60))
def test_latest_truncation_keeps_a_suffix_that_fits(turns, max_length):
    packed = pack_dialogue(turns, cls_id=CLS, sep_id=SEP, max_length=max_length, keep="latest")
    ids, segs = packed.input_ids, packed.segment_ids
    assert len(ids) <= max_length and ids[0] == CLS and ids[-1] == SEP and len(segs) == len(ids)
    full = [t for turn in turns for t in turn + [SEP]]
    assert ids[1:] == full[len(full) - (len(ids) - 1):]                           # a suffix of the stream
    if 1 + len(turns[-1]) + 1 <= max_length:                                     # the newest turn is whole
        expected = sum(1 for k in range(1, len(turns) + 1)
                       if 1 + sum(len(t) + 1 for t in turns[-k:]) <= max_length)
        assert packed.turns == expected
    # segments: 0 on [CLS], then alternate per kept turn, starting at 0
    seps = [0] + [i for i, t in enumerate(ids) if t == SEP]
    for r, (a, b) in enumerate(zip(seps, seps[1:])):
        assert set(segs[a + 1:b + 1]) == {r % 2}


@PROPERTY
@given(turns=turns_strategy, max_length=st.integers(3, 60))
def test_earliest_truncation_keeps_a_prefix(turns, max_length):
    packed = pack_dialogue(turns, cls_id=CLS, sep_id=SEP, max_length=max_length, keep="earliest")
    full = [t for turn in turns for t in turn + [SEP]]
    assert len(packed.input_ids) <= max_length and packed.input_ids[-1] == SEP
    if 1 + len(turns[0]) + 1 <= max_length:
        assert packed.input_ids[1:] == full[:len(packed.input_ids) - 1]


@PROPERTY
@given(turns=st.lists(st.lists(st.integers(7, 39), min_size=1, max_size=10), min_size=2, max_size=8),
       max_length=st.integers(6, 60))
def test_cdial_layout(turns, max_length):
    history, reply = turns[:-1], turns[-1]
    packed = pack_cdial(history, reply, cls_id=CLS, sep_id=SEP, speaker_ids=SPK, max_length=max_length)
    ids, sup = packed.input_ids, packed.supervised
    assert len(ids) <= max_length and ids[0] == CLS and ids[-1] == SEP
    kept_reply = reply[:max_length - 3]
    assert sum(sup) == len(kept_reply) + 1 and ids[-len(kept_reply) - 1:-1] == kept_reply
    speakers = [t for t in ids if t in SPK]
    assert len(speakers) == packed.turns and all(s == SPK[i % 2] for i, s in enumerate(speakers))
    assert packed.turns - 1 <= 15


def test_whole_stream_loss_is_the_sum_of_per_turn_losses():
    model = _tiny_gpt()
    g = torch.Generator().manual_seed(1)
    turns = [torch.randint(7, 40, (n,), generator=g).tolist() for n in (4, 6, 3, 5)]

    def summed(example):
        batch = collate([example], 0)
        with torch.no_grad():
            logits = model(batch["input_ids"], segment_ids=batch["segment_ids"])
        return language_model_loss(logits, batch["input_ids"], batch["supervised"]).item() * sum(example.supervised)

    whole = summed(pack_dialogue(turns, cls_id=CLS, sep_id=SEP))
    tok = CharTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(0x4e00 + i) for i in range(35)])
    parts = [summed(pack_dialogue(turns[:1], cls_id=CLS, sep_id=SEP))]
    parts += [summed(reply_example(turns[:r], turns[r], tok, max_length=48)) for r in range(1, len(turns))]
    assert whole == pytest.approx(sum(parts), rel=1e-5)


def test_training_examples_follow_their_rule(tokenizer):
    ids = encode_conversations(tokenizer, CONVERSATIONS)[0]
    g = torch.Generator().manual_seed(0)
    earliest = training_example(ids, tokenizer, max_length=24, truncation="earliest")
    assert earliest == pack_dialogue(ids, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, max_length=24,
                                     keep="earliest")
    ends = set()
    for _ in range(200):
        e = training_example(ids, tokenizer, max_length=24, generator=g)
        assert len(e.input_ids) <= 24
        ends.add(tuple(e.input_ids[-4:]))
    assert len(ends) > 2                                                         # windows end at different turns
    cdial = training_example(ids, tokenizer, max_length=24, fmt="cdial", generator=g)
    assert 0 < sum(cdial.supervised) < len(cdial.input_ids) - 1


# ------------------------------------------------------------------------------------------------ decoding

def test_dialogue_decoder_matches_brute_force_on_a_padded_batch():
    model = _tiny_gpt()
    prompts = [pack_dialogue(t, cls_id=CLS, sep_id=SEP) for t in
               ([[8, 9, 10], [11, 12]], [[13, 14, 15, 16, 17, 18]], [[19], [20, 21], [22]])]
    batch = collate(prompts, 0)
    banned = [0, 1, 2, 4]
    from simbook.decoding import greedy
    out = greedy(DialogueDecoder(model, batch["segment_ids"], banned_ids=banned), batch["input_ids"], batch["valid"],
                 max_new_tokens=8, eos_id=SEP).to_lists()
    for prompt, got in zip(prompts, out):
        ids, segs = list(prompt.input_ids), list(prompt.segment_ids)
        flipped, want = 1 - segs[-1], []
        for _ in range(8):
            with torch.no_grad():
                logits = model(torch.tensor([ids]), segment_ids=torch.tensor([segs]))[0, -1]
            logits[banned] = float("-inf")
            token = int(logits.argmax())
            want.append(token)
            if token == SEP:
                break
            ids.append(token)
            segs.append(flipped)
        assert got == want


def test_generated_tokens_get_the_other_speakers_segment():
    model = _tiny_gpt()
    prompt = pack_dialogue([[8, 9], [10, 11, 12]], cls_id=CLS, sep_id=SEP)          # last token has segment 1
    steps = DialogueDecoder(model, torch.tensor([prompt.segment_ids]))
    steps.prefill(torch.tensor([prompt.input_ids]))
    assert steps.reply_segment.tolist() == [0]
    next_lp = steps.step(torch.tensor([13]))
    with torch.no_grad():
        full = model(torch.tensor([prompt.input_ids + [13]]),
                     segment_ids=torch.tensor([prompt.segment_ids + [0]]))[0, -1].log_softmax(-1)
    assert torch.allclose(next_lp[0], full, atol=1e-5)


def test_replies_never_contain_banned_tokens(tokenizer, trained):
    model, ids = trained
    histories = [h for h, _ in reply_pairs(ids, seed=0)]
    for name in ("greedy", "top-k 5", "nucleus 0.9, T 0.7"):
        replies, finished = generate_replies(model, tokenizer, histories, decoder=name, max_new_tokens=10)
        assert len(replies) == len(histories) == len(finished)
        assert not {t for r in replies for t in r} & set(banned_ids(tokenizer))
        assert all(len(r) >= 1 for r in replies)
    stats = reply_statistics(tokenizer, replies)
    assert 0 < stats["dist_1"] <= 1 and 0 <= stats["dist_2"] <= 1 and stats["mean_length"] > 0


def test_byte_bpe_round_trips_any_text(tokenizer, tmp_path):
    for text in ["i'm fine, don't worry", "naïve café 😀", "天气不错", "tabs\tand  two spaces"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text.lower()
    tokenizer.save(tmp_path / "tokenizer.json")
    again = ByteBPETokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode("hello there") == tokenizer.encode("hello there")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers JSON file"):
        ByteBPETokenizer.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        ByteBPETokenizer.load(tmp_path / "missing.json")


def test_reply_statistics_by_hand(tokenizer):
    enc = [tokenizer.encode(t) for t in ["i like it", "i like it", "you like me"]]
    stats = reply_statistics(tokenizer, enc)
    assert stats["dist_1"] == pytest.approx(5 / 9) and stats["dist_2"] == pytest.approx(4 / 6)
    assert stats["mean_length"] == 3


def test_perplexity_is_lower_after_training(tokenizer, trained):
    model, ids = trained
    fresh = new_dialogue_model(tokenizer.vocab_size, width=32, layers=1, heads=2, max_length=64, seed=0)
    examples = [reply_example(h, r, tokenizer, max_length=64) for h, r in reply_pairs(ids, seed=0)]
    assert mean_nll(model, examples, tokenizer.pad_id) < mean_nll(fresh, examples, tokenizer.pad_id)


# ------------------------------------------------------------------------------------------------ data

def test_read_lccc_layouts(tmp_path):
    dialogues = [["你 好 ， 吃 了 吗", "吃 了 NBA 2K 好玩"], ["在 吗", "在"], ["只有 一句"]]
    (tmp_path / "a.json").write_text(json.dumps(dialogues, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"train": dialogues, "test": []}, ensure_ascii=False), "utf-8")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in dialogues) + "\n", "utf-8")
    (tmp_path / "d.jsonl").write_text("\n\n".join(json.dumps({"dialog": d}, ensure_ascii=False) for d in dialogues),
                                      "utf-8")
    expected = [["你好，吃了吗", "吃了NBA 2K好玩"], ["在吗", "在"]]
    for name in ("a.json", "b.json", "c.jsonl", "d.jsonl"):
        assert read_lccc(tmp_path / name, split="train") == expected, name


@pytest.mark.parametrize("content, kwargs, message", [
    (b"\xff\xfe not utf8", {}, "not UTF-8"),
    (b'[["a", "b"]]\n{oops', {}, "line 2: not JSON"),
    (b'{"train": [["a", "b"]]}', {}, "choose one with split="),
    (b'{"train": [["a", "b"]]}', {"split": "dev"}, "has no split 'dev'"),
    (b'[["a", 3]]', {}, "not a list of utterance strings"),
    (b'[["only one"]]', {}, "no dialogue of at least 2"),
    (b'"text"', {}, "does not hold a list of dialogues"),
])
def test_read_lccc_rejects_bad_files(tmp_path, content, kwargs, message):
    (tmp_path / "x.json").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_lccc(tmp_path / "x.json", **kwargs)


def test_read_lccc_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LCCC file"):
        read_lccc(tmp_path / "missing.json")


def test_split_holds_out_whole_conversations():
    convs = [[f"c{i} a", f"c{i} b"] for i in range(30)]
    train, test = split_conversations(convs, 5, seed=3)
    assert len(train) == 25 and len(test) == 5 and sorted(map(tuple, train + test)) == sorted(map(tuple, convs))
    assert split_conversations(convs, 5, seed=3) == (train, test)
    with pytest.raises(ValueError, match="cannot hold out"):
        split_conversations(convs, 30)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call, error, message", [
    (lambda: pack_dialogue([], cls_id=CLS, sep_id=SEP), ValueError, "non-empty list"),
    (lambda: pack_dialogue(["hello"], cls_id=CLS, sep_id=SEP), TypeError, "list of token ids"),
    (lambda: pack_dialogue([[1.5]], cls_id=CLS, sep_id=SEP), TypeError, "int token ids"),
    (lambda: pack_dialogue([[8]], cls_id=CLS, sep_id=SEP, keep="middle"), ValueError, "keep must be"),
    (lambda: pack_dialogue([[8]], cls_id=CLS, sep_id=SEP, max_length=2), ValueError, "max_length must be >= 3"),
    (lambda: pack_cdial([[8]], [9], cls_id=CLS, sep_id=SEP, speaker_ids=SPK, max_length=3), ValueError, ">= 4"),
    (lambda: pack_cdial([[8]], [9], cls_id=CLS, sep_id=SEP, speaker_ids=SPK, max_history=0), ValueError, ">= 1"),
    (lambda: collate([], 0), ValueError, "no examples"),
    (lambda: ByteBPETokenizer.train([]), ValueError, "non-empty list"),
    (lambda: ByteBPETokenizer.train("just a string"), ValueError, "non-empty list"),
    (lambda: ByteBPETokenizer.train(["a b"], vocab_size=100), ValueError, "vocab_size must be >= 264"),
    (lambda: ByteBPETokenizer("not a backend"), TypeError, "tokenizers.Tokenizer"),
    (lambda: reply_pairs([[[8]]]), ValueError, "no conversation has a reply"),
    (lambda: DialoGPTConfig(lr=0.0), ValueError, "lr must be"),
    (lambda: DialoGPTConfig(corpus="reddit"), ValueError, "corpus must be one of"),
    (lambda: DialogueDecoder(_tiny_gpt(), torch.zeros(1, 3)), TypeError, "int dtype"),
    (lambda: DialogueDecoder(_tiny_gpt(), torch.zeros(1, 3, dtype=torch.long), banned_ids=[99]), ValueError,
     "inside the vocabulary"),
])
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bad_arguments_needing_a_model(tokenizer, trained):
    model, ids = trained
    with pytest.raises(ValueError, match="fmt must be"):
        training_example(ids[0], tokenizer, max_length=32, fmt="seq2seq")
    with pytest.raises(ValueError, match="truncation must be"):
        training_example(ids[0], tokenizer, max_length=32, truncation="middle")
    with pytest.raises(ValueError, match="decoder must be one of"):
        generate_replies(model, tokenizer, [ids[0][:1]], decoder="beam")
    with pytest.raises(ValueError, match="leaves no room"):
        prompt_example(ids[0], tokenizer, max_length=10, max_new_tokens=8)
    with pytest.raises(ValueError, match="unit must be"):
        reply_statistics(tokenizer, [[8]], unit="char")
    with pytest.raises(ValueError, match="no replies"):
        reply_statistics(tokenizer, [])
    with pytest.raises(TypeError, match="segment embeddings"):
        train_dialogue_model(GPT(model.config), tokenizer, ids, steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_dialogue_model(model, tokenizer, ids, steps=0)
    for kwargs, message in [({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                            ({"top_k": 0}, "top_k must be >= 1"), ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
                            ({"max_reply_tokens": 62}, "leaves no room")]:
        with pytest.raises(ValueError, match=message):
            ChatSession(model, tokenizer, **kwargs)
    session = ChatSession(model, tokenizer)
    for text, error, message in [("", ValueError, "empty"), ("   ", ValueError, "empty"), (None, TypeError, "str")]:
        with pytest.raises(error, match=message):
            session.respond(text)
    assert session.history == []


# ------------------------------------------------------------------------------------------------ chat session

def test_chat_history_rules(tokenizer, trained):
    model, _ = trained
    session = ChatSession(model, tokenizer, max_reply_tokens=16, seed=0)
    assert session.budget == 64 - 16 + 1
    speakers = []
    for message in ["hi! how are you doing today?", "what do you like to do for fun?", "do you have any pets?",
                    "nice, how far did you go?", "about five miles"]:
        pieces = list(session.respond(message))
        assert "".join(pieces) == session.history[-1][1] and session.history[-2][1] == message
        assert session.history_tokens <= session.budget
        speakers = [s for s, _, _ in session.history]
        assert speakers[-1] == "bot" and all(a != b for a, b in zip(speakers, speakers[1:]))
    assert session.dropped_turns > 0                                              # 10 turns cannot fit 49 positions
    # the prompt is [CLS] + the kept turns, newest last
    kept = [ids for _, _, ids in session.history]
    assert pack_dialogue(kept, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id).turns == len(kept)
    long = " ".join(["how far did you go"] * 60)
    list(session.respond(long))
    assert session.user_tokens_cut > 0 and session.history_tokens <= session.budget
    session.reset()
    assert session.history == [] and session.dropped_turns == 0


def test_same_seed_same_replies(tokenizer, trained):
    model, _ = trained
    replies = []
    for _ in range(2):
        session = ChatSession(model, tokenizer, seed=7)
        replies.append(["".join(session.respond(m)) for m in ("hello", "do you have any pets?")])
    assert replies[0] == replies[1]


def test_checkpoint_round_trip(tokenizer, trained, checkpoint, tmp_path):
    model, _ = trained
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    session = ChatSession.from_pretrained(checkpoint, max_reply_tokens=8, seed=3)
    loaded, tok = session.model, session.tokenizer
    assert session.max_reply_tokens == 8 and tok.vocab_size == tokenizer.vocab_size
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == \
        [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    chars = CharTokenizer.build(["你好", "再见"])
    char_model = new_dialogue_model(chars.vocab_size, width=16, layers=1, heads=2, max_length=16)
    save_tokenizer(chars, char_model.save_pretrained(tmp_path / "zh"))
    zh = ChatSession.from_pretrained(tmp_path / "zh", max_reply_tokens=4)
    assert isinstance(zh.tokenizer, CharTokenizer) and zh.tokenizer.encode("你好") == chars.encode("你好")
    with pytest.raises(FileNotFoundError, match="no dialogue checkpoint"):
        ChatSession.from_pretrained(tmp_path / "nothing")


def test_loading_refuses_pickles_and_mismatches(tokenizer, trained, checkpoint, tmp_path):
    model, _ = trained
    pickled = tmp_path / "pickled"
    shutil.copytree(checkpoint, pickled)
    torch.save(model.state_dict(), pickled / "model.safetensors")
    with pytest.raises(ValueError, match="pickled checkpoint"):
        ChatSession.from_pretrained(pickled)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(checkpoint, mismatched)
    save_tokenizer(CharTokenizer.build(["abc"]), mismatched)                          # vocab.json beside it
    (mismatched / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="were not saved together"):
        ChatSession.from_pretrained(mismatched)
    plain = tmp_path / "plain"
    save_tokenizer(tokenizer, GPT(model.config).save_pretrained(plain))               # a GPT without segments
    with pytest.raises(ValueError, match="no speaker segments"):
        ChatSession.from_pretrained(plain)
    no_tokenizer = tmp_path / "no-tokenizer"
    model.save_pretrained(no_tokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        ChatSession.from_pretrained(no_tokenizer)


def test_resumed_training_equals_uninterrupted(tokenizer, tmp_path):
    ids = encode_conversations(tokenizer, CONVERSATIONS)

    def run(folder, *, stop_at=None, resume=False):
        model = new_dialogue_model(tokenizer.vocab_size, width=16, layers=1, heads=2, max_length=48, seed=0)
        calls = []

        def evaluate(m):
            calls.append(1)
            if stop_at is not None and len(calls) == stop_at:
                raise KeyboardInterrupt                                              # killed after a checkpoint
            return 1.0

        log = train_dialogue_model(model, tokenizer, ids, steps=6, batch_size=4, lr=5e-3, seed=1, device="cpu",
                                   evaluate=evaluate, eval_every=1, checkpoint_dir=folder, checkpoint_every=3,
                                   resume=resume)
        return model, log

    whole, whole_log = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=4)
    resumed, resumed_log = run(tmp_path / "b", resume=True)
    assert resumed_log.losses == whole_log.losses[3:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))


def test_chat_loop_in_process(tokenizer, trained):
    model, _ = trained
    typed = b"hello\n\n   \n\xc3\x28 bad\n" + b"a" * 5000 + b"\n/history\n/reset\n/history\n/help\nbye\n"
    out = io.StringIO()
    assert chat_loop(ChatSession(model, tokenizer, seed=0), io.BytesIO(typed), out, max_chars=4000) == 0
    text = out.getvalue()
    assert text.count("bot> ") == 3 and text.count("(empty message") == 2 and "not valid UTF-8" in text
    assert "only its last 4000 characters" in text and "(history cleared)" in text
    assert "(history: 0 turns" in text and "Traceback" not in text


# ------------------------------------------------------------------------------------------------ the commands

def _env():
    return dict(os.environ, COLUMNS="100", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _run(*args, stdin=None, timeout=240):
    return subprocess.run([SIMBOOK, *args], input=stdin, capture_output=True, timeout=timeout, env=_env())


def test_dialogpt_train_command_saves_a_chat_checkpoint(tmp_path):
    out = tmp_path / "bot"
    result = _run("dialogpt-train", "--conversations", "60", "--held-out", "10", "--steps", "4", "--width", "32",
                  "--layers", "1", "--max-length", "48", "--vocab-size", "400", "--save", str(out), "--no-progress")
    stdout = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "held-out reply perplexity" in stdout and "top-k 5" in stdout and f"saved to {out}" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "config.json", "model.safetensors", "record.json",
                                                     "tokenizer.json"]
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "finished" and record["command"].startswith("simbook dialogpt-train --conversations 60")
    assert record["config"]["steps"] == 4 and record["final"]["reply_perplexity"] > 1 and "greedy" in record["decoders"]
    chat = _run("chat", "--checkpoint", str(out), stdin=b"hello\n")
    assert chat.returncode == 0 and "bot> " in chat.stdout.decode()


@pytest.mark.parametrize("args, message", [
    (["dialogpt-train", "--steps", "0", "--conversations", "20", "--held-out", "5"], "steps must be >= 1"),
    (["dialogpt-train", "--device", "tpu"], "device"),
    (["dialogpt-train", "--corpus", "lccc"], "needs the path of an LCCC JSON file"),
    (["dialogpt-train", "--corpus", "lccc", "--path", "/nonexistent/lccc.json"], "no LCCC file"),
    (["chat", "--checkpoint", "/nonexistent/bot"], "no dialogue checkpoint at /nonexistent/bot"),
    (["chat"], "the following arguments are required: --checkpoint"),
])
def test_commands_reject_bad_arguments_in_one_line(args, message):
    result = _run(*args)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and message in stderr and "Traceback" not in stderr


def test_chat_command_through_a_pipe(checkpoint):
    typed = (b"hi! how are you doing today?\n\n\xff\xfe\n" + "天气".encode() * 3000 + b"\n/history\n"
             b"do you have any pets?\n/history\n/reset\n/history\n")
    runs = [_run("chat", "--checkpoint", str(checkpoint), "--seed", "3", "--top-p", "0.9", "--temperature", "0.8",
                 "--max-reply-tokens", "8", stdin=typed) for _ in range(2)]
    text = runs[0].stdout.decode()
    assert runs[0].returncode == 0 and "Traceback" not in runs[0].stderr.decode()
    assert text == runs[1].stdout.decode()                                        # --seed makes it reproducible
    assert text.count("bot> ") == 3
    assert "(empty message" in text and "not valid UTF-8" in text and "long message" in text
    histories = [line for line in text.splitlines() if "(history:" in line]
    assert len(histories) == 3 and "(history: 0 turns" in histories[-1]
    assert "you: do you have any pets?" in text


def _read_until(fd, marker, timeout=60.0):
    data, end = b"", time.time() + timeout
    while marker not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.time()))
        if not ready:
            raise AssertionError(f"timed out waiting for {marker!r}; got {data[-500:]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:                                                          # the child closed the terminal
            break
        if not chunk:
            break
        data += chunk
    return data


def test_chat_command_in_a_pseudo_terminal(checkpoint):
    leader, follower = pty.openpty()
    process = subprocess.Popen([SIMBOOK, "chat", "--checkpoint", str(checkpoint), "--seed", "0"], stdin=follower,
                               stdout=follower, stderr=follower, env=_env(), close_fds=True)
    os.close(follower)
    try:
        _read_until(leader, b"you> ")
        os.write(leader, b"hello there\n")
        first = _read_until(leader, b"you> ")
        assert b"hello there" in first                                            # the terminal echoes the input
        reply = first.split(b"bot> ", 1)[1].split(b"\r\n", 1)[0]
        assert reply.strip()                                                      # a reply appeared
        os.write(leader, b"/history\n")
        history = _read_until(leader, b"you> ")
        assert b"(history: 2 turns" in history and b"you: hello there" in history
        os.write(leader, b"/reset\n")
        assert b"(history cleared)" in _read_until(leader, b"you> ")
        os.write(leader, b"\x04")                                                 # Ctrl-D: end of input
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)


def test_dialogpt_train_two_processes_under_torchrun_equal_one(tmp_path):
    """`simbook dialogpt-train` under `torchrun --nproc_per_node 2` (gloo) and in one process: the same training losses
    and held-out reply losses (each shard weighs its supervised tokens), one record and one model, written by rank 0."""
    common = ["dialogpt-train", "--conversations", "40", "--held-out", "8", "--steps", "4", "--batch-size", "8",
              "--eval-every", "2", "--width", "16", "--layers", "1", "--heads", "2", "--max-length", "48",
              "--vocab-size", "300", "--device", "cpu", "--no-progress", "--threads", "1"]
    one = _run(*common, "--save", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "simbook.cli", *common, "--save", str(tmp_path / "two")],
                         capture_output=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert two.returncode == 0, two.stderr.decode()[-2000:]
    assert two.stdout.decode().count("held-out reply perplexity") == 1                      # rank 0 prints
    a, b = (json.loads((tmp_path / name / "record.json").read_text()) for name in ("one", "two"))
    assert a["world_size"] == 1 and b["world_size"] == 2 and b["status"] == "finished"
    for x, y in zip(a["evaluations"], b["evaluations"], strict=True):
        assert x["step"] == y["step"] and x["reply_loss"] == pytest.approx(y["reply_loss"], rel=1e-5)
    assert [step for step, _ in a["losses"]] == [step for step, _ in b["losses"]]
    assert all(x == pytest.approx(y, rel=1e-5) for (_, x), (_, y) in zip(a["losses"], b["losses"]))
    assert ChatSession.from_pretrained(tmp_path / "two").tokenizer.vocab_size == a["final"]["vocabulary"]
