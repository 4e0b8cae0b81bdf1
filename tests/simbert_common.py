"""What the SimBERT test files share: hypothesis settings, the sentences, and tiny models built on them."""
import pytest
import torch
from hypothesis import HealthCheck, settings

from simbook.experiments.simbert import new_simbert
from simbook.text import CharTokenizer

QUIET = pytest.mark.filterwarnings("ignore:.*longer than maxlen")   # texts truncated on purpose
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
MANY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SENTENCES = ["今天天气不错，我们去公园散步吧。", "这家酒店的服务人员态度很好，房间也很干净。", "人民日报发表社论。",
             "我非常喜欢这个城市的风景。", "白切鸡很好吃，价格也便宜。", "明天可能会下雨，记得带伞。",
             "他每天早上六点起床跑步。", "这本书的内容很有意思。"]


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.build(SENTENCES)


@pytest.fixture(scope="module")
def model(tokenizer):
    return new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16).eval()


@pytest.fixture(scope="module")
def sharp_model(tokenizer):
    """A float64 model whose random logits are spread out, so that greedy argmax ties cannot happen and different
    prompts give different outputs."""
    m = new_simbert(tokenizer, hidden_size=32, num_layers=1, num_heads=2, maxlen=16, seed=1).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        m.lm.lm_head.bias.add_(torch.randn(m.lm.lm_head.bias.shape, generator=g, dtype=torch.float64))
    return m


def _chars(tokenizer):
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size) if i not in tokenizer.special_ids]
