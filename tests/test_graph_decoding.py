"""`GraphedGreedy` (chapter *Decoding on the GPU*): a static KV cache and the whole greedy step in one CUDA graph.
On the CPU the same step runs eagerly and must give `simbook.decoding.greedy`'s tokens, lengths and finished flags
for any batch, padding, capacity and `<eos>`; on CUDA the graph must give the eager step's tokens and those of
Hugging Face `generate` on the same GPT-2 weights."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from simbook.decoding import StepDecoder, greedy
from simbook.graph_decoding import GraphedGreedy
from simbook.models.gpt import GPT, config_from_hf_gpt2, hf_gpt2_state_dict_to_simbook
from simbook.models.transformer import TransformerConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(seed=0, vocab=30, positions=64):
    torch.manual_seed(seed)
    return GPT(TransformerConfig(vocab_size=vocab, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                                 max_position=positions, dropout=0.0, pre_norm=True, activation="gelu_tanh")).eval()


MODEL = tiny_gpt()


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), length=st.integers(1, 6), new=st.integers(1, 12), extra=st.integers(0, 5),
       eos=st.one_of(st.none(), st.integers(0, 29)), sync_every=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_eager_static_step_equals_greedy(batch, length, new, extra, eos, sync_every, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (batch, length), generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    valid = torch.arange(length)[None] < lengths[:, None]
    expected = greedy(StepDecoder(MODEL), ids, valid, max_new_tokens=new, eos_id=eos)
    static = GraphedGreedy(MODEL, batch=batch, capacity=length + new - 1 + extra + 1, eos_id=eos,
                           sync_every=sync_every)
    for _ in range(2):                                       # the second call reuses the dirty buffers
        got = static.generate(ids, valid, max_new_tokens=new)
        assert torch.equal(got.lengths, expected.lengths)
        assert torch.equal(got.finished, expected.finished)
        width = int(expected.lengths.max())
        assert torch.equal(got.tokens[:, :width], expected.tokens[:, :width])
        assert not got.tokens[:, width:].any()               # only padding after the longest row (pad_id 0)


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        GraphedGreedy(MODEL, batch=2, capacity=1)
    with pytest.raises(TypeError, match="batch"):
        GraphedGreedy(MODEL, batch=2.0, capacity=8)
    with pytest.raises(ValueError, match="eos_id"):
        GraphedGreedy(MODEL, batch=2, capacity=8, eos_id=30)
    with pytest.raises(TypeError, match="use_graph"):
        GraphedGreedy(MODEL, batch=2, capacity=8, use_graph="yes")
    with pytest.raises(ValueError, match="CUDA"):
        GraphedGreedy(MODEL, batch=2, capacity=8, use_graph=True)
    with pytest.raises(ValueError, match="training mode"):
        GraphedGreedy(tiny_gpt().train(), batch=2, capacity=8)
    static = GraphedGreedy(MODEL, batch=2, capacity=8)
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="capacity"):
        static.generate(ids, max_new_tokens=6)
    with pytest.raises(ValueError, match="input_ids"):
        static.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="prefix"):
        static.generate(ids, torch.tensor([[False, True, True, True], [True] * 4]), max_new_tokens=2)
    short = GraphedGreedy(tiny_gpt(positions=6), batch=2, capacity=16)
    with pytest.raises(ValueError, match="positions"):
        short.generate(ids, max_new_tokens=4)


@pytest.mark.cuda
@CUDA
def test_graph_equals_eager_and_transformers_on_cuda():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(config).eval().cuda()
    ours = GPT(config_from_hf_gpt2(config.to_dict())).eval()
    ours.load_state_dict(hf_gpt2_state_dict_to_simbook(theirs.state_dict()), strict=False)
    ours.cuda()
    ids = torch.randint(1, 300, (3, 9), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        hf = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=60,
                             min_new_tokens=60, eos_token_id=None, pad_token_id=0)[:, 9:]
    graphed = GraphedGreedy(ours, batch=3, capacity=80)
    assert graphed.use_graph
    for _ in range(2):
        assert torch.equal(graphed.generate(ids, max_new_tokens=60).tokens, hf)
    eager = GraphedGreedy(ours, batch=3, capacity=80, use_graph=False)
    assert torch.equal(eager.generate(ids, max_new_tokens=60).tokens, hf)
    # padded prompts and an <eos> some rows reach: the graph agrees with the chapter's greedy on the GPU
    valid = torch.arange(9, device="cuda")[None] < torch.tensor([9, 4, 6], device="cuda")[:, None]
    eos = int(hf[1, 5])
    expected = greedy(StepDecoder(ours), ids, valid, max_new_tokens=60, eos_id=eos)
    got = GraphedGreedy(ours, batch=3, capacity=80, eos_id=eos, sync_every=8).generate(ids, valid, max_new_tokens=60)
    assert torch.equal(got.lengths, expected.lengths) and torch.equal(got.finished, expected.finished)
    width = int(expected.lengths.max())
    assert torch.equal(got.tokens[:, :width], expected.tokens[:, :width])
