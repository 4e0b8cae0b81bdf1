"""Tests of simbook.utils: argument checks, seeding, checkpoints without pickle."""
import json
import os
import pickle
import random
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from simbook.utils import (CONFIG_NAME, WEIGHTS_NAME, check_positive_int, check_tensor, check_text,
                           load_checkpoint, load_state_dict_strict, read_state_dict, save_checkpoint,
                           seed_everything)


# ----------------------------------------------------------------------------------------------- check_positive_int

@pytest.mark.parametrize("value", [1, 7, 10**12, np.int64(3), np.int32(1)])
def test_check_positive_int_accepts_and_returns_python_int(value):
    out = check_positive_int(value, "n")
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 3.0, "3", None, torch.tensor(3)])
def test_check_positive_int_refuses_non_ints_with_type_error(value):
    with pytest.raises(TypeError, match="widgets"):
        check_positive_int(value, "widgets")


@pytest.mark.parametrize("value,minimum", [(0, 1), (-1, 1), (4, 5), (-10, 0)])
def test_check_positive_int_refuses_too_small(value, minimum):
    with pytest.raises(ValueError, match=rf"widgets must be >= {minimum}"):
        check_positive_int(value, "widgets", minimum=minimum)


def test_check_positive_int_minimum_is_inclusive():
    assert check_positive_int(0, "n", minimum=0) == 0
    assert check_positive_int(5, "n", minimum=5) == 5


# ----------------------------------------------------------------------------------------------- check_tensor

def test_check_tensor_returns_same_object():
    x = torch.zeros(2, 3)
    assert check_tensor(x, "x", shape=(2, None), dtype="float") is x


@pytest.mark.parametrize("value", [[1.0, 2.0], np.zeros(3), 3.0, None])
def test_check_tensor_refuses_non_tensors(value):
    with pytest.raises(TypeError, match="thing"):
        check_tensor(value, "thing")


@pytest.mark.parametrize("dtype,kind,ok", [
    (torch.float16, "float", True), (torch.bfloat16, "float", True), (torch.float32, "float", True),
    (torch.float64, "float", True), (torch.int64, "float", False), (torch.bool, "float", False),
    (torch.int8, "int", True), (torch.int16, "int", True), (torch.int32, "int", True), (torch.int64, "int", True),
    (torch.uint8, "int", True), (torch.float32, "int", False), (torch.bool, "int", False),
    (torch.bool, "bool", True), (torch.uint8, "bool", False), (torch.float32, "bool", False),
    (torch.complex64, "float", False),
])
def test_check_tensor_dtype_kinds(dtype, kind, ok):
    x = torch.zeros(3, dtype=dtype)
    if ok:
        check_tensor(x, "x", dtype=kind)
    else:
        with pytest.raises(TypeError, match=r"x must have a " + kind):
            check_tensor(x, "x", dtype=kind)


def test_check_tensor_wrong_rank_is_value_error_naming_argument():
    with pytest.raises(ValueError, match=r"scores must have 3 dimensions"):
        check_tensor(torch.zeros(2, 3), "scores", shape=(None, None, None))


def test_check_tensor_exact_size_mismatch_names_axis():
    with pytest.raises(ValueError, match=r"scores has size 3 on axis 1, expected 4"):
        check_tensor(torch.zeros(2, 3), "scores", shape=(2, 4))


def test_check_tensor_symbolic_dims_within_one_call():
    check_tensor(torch.zeros(3, 3), "sq", shape=("T", "T"))
    with pytest.raises(ValueError, match="sq has size 4 on axis 1, expected 3"):
        check_tensor(torch.zeros(3, 4), "sq", shape=("T", "T"))


def test_check_tensor_symbolic_dims_shared_between_calls():
    dims = {}
    check_tensor(torch.zeros(2, 5, 7), "q", shape=("B", "T", "D"), dims=dims)
    assert dims == {"B": 2, "T": 5, "D": 7}
    check_tensor(torch.zeros(2, 9, 7), "k", shape=("B", None, "D"), dims=dims)   # None: anything goes
    with pytest.raises(ValueError, match=r"v has size 3 on axis 0, expected 2"):
        check_tensor(torch.zeros(3, 9, 7), "v", shape=("B", None, "D"), dims=dims)
    with pytest.raises(ValueError, match=r"v has size 8 on axis 2, expected 7"):
        check_tensor(torch.zeros(2, 9, 8), "v", shape=("B", None, "D"), dims=dims)


def test_check_tensor_prebound_dims():
    with pytest.raises(ValueError, match="expected 4"):
        check_tensor(torch.zeros(3), "x", shape=("N",), dims={"N": 4})
    check_tensor(torch.zeros(4), "x", shape=("N",), dims={"N": 4})


def test_check_tensor_empty_refused_unless_allowed():
    with pytest.raises(ValueError, match=r"batch is empty"):
        check_tensor(torch.zeros(0, 3), "batch")
    with pytest.raises(ValueError, match=r"batch is empty"):
        check_tensor(torch.zeros(2, 0), "batch", shape=(None, None))
    assert check_tensor(torch.zeros(0, 3), "batch", allow_empty=True).shape == (0, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_tensor_finite(bad):
    x = torch.tensor([1.0, bad, 2.0])
    check_tensor(x, "logits")  # finite=False by default: accepted
    with pytest.raises(ValueError, match=r"logits contains NaN or inf"):
        check_tensor(x, "logits", finite=True)


def test_check_tensor_finite_accepts_ints_and_finite_floats():
    check_tensor(torch.tensor([1, 2]), "ids", finite=True)
    check_tensor(torch.tensor([1e300, -1e300], dtype=torch.float64), "x", finite=True)


# ----------------------------------------------------------------------------------------------- check_text

@pytest.mark.parametrize("text", ["a", " 中文 ", "x\ny"])
def test_check_text_accepts(text):
    assert check_text(text) is text


@pytest.mark.parametrize("text", ["", " ", "\n\t ", "\u3000"])
def test_check_text_blank_is_value_error(text):
    with pytest.raises(ValueError, match="title is empty"):
        check_text(text, "title")


@pytest.mark.parametrize("text", [None, b"abc", 3, ["a"]])
def test_check_text_non_str_is_type_error(text):
    with pytest.raises(TypeError, match="title must be a str"):
        check_text(text, "title")


# ----------------------------------------------------------------------------------------------- seed_everything

def _draw():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def test_seed_everything_makes_all_generators_repeat():
    g1 = seed_everything(1234)
    first = _draw(), torch.rand(2, generator=g1).tolist()
    g2 = seed_everything(1234)
    second = _draw(), torch.rand(2, generator=g2).tolist()
    assert first == second
    seed_everything(1235)
    assert _draw() != first[0]


def test_seed_everything_returns_generator_seeded_alike():
    g = seed_everything(7)
    assert isinstance(g, torch.Generator) and g.initial_seed() == 7
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(7)))


def test_seed_everything_accepts_seeds_beyond_32_bits():
    seed_everything(2**40 + 3)  # numpy needs seed % 2**32


def test_seed_everything_threads():
    before = torch.get_num_threads()
    try:
        seed_everything(0, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("seed", [1.0, "1", True, None])
def test_seed_everything_refuses_non_int_seed(seed):
    with pytest.raises(TypeError, match="seed"):
        seed_everything(seed)


@pytest.mark.parametrize("threads,err", [(0, ValueError), (True, TypeError), (1.5, TypeError)])
def test_seed_everything_bad_threads(threads, err):
    before = torch.get_num_threads()
    with pytest.raises(err, match="threads"):
        seed_everything(0, threads=threads)
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------------------------- checkpoints

def _state():
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g),
            "emb": torch.randn(5, 2, generator=g, dtype=torch.float64),
            "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3), "flag": torch.tensor([True, False])}


def _assert_same_state(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_checkpoint_round_trip(tmp_path):
    state = _state()
    config = {"hidden_size": 4, "name": "tiny", "nested": {"a": [1, 2]}}
    out = save_checkpoint(tmp_path / "new" / "ckpt", state, config)
    assert out == tmp_path / "new" / "ckpt"
    assert (out / WEIGHTS_NAME).is_file() and (out / CONFIG_NAME).is_file()
    assert json.loads((out / CONFIG_NAME).read_text(encoding="utf-8")) == config
    loaded, cfg = load_checkpoint(out)
    assert cfg == config
    _assert_same_state(state, loaded)
    # read_state_dict accepts the folder or the file itself
    _assert_same_state(state, read_state_dict(out))
    _assert_same_state(state, read_state_dict(str(out / WEIGHTS_NAME)))


def test_save_checkpoint_handles_non_contiguous_and_grad_tensors(tmp_path):
    w = torch.randn(3, 4, requires_grad=True)
    state = {"t": w.t(), "w": w}
    save_checkpoint(tmp_path, state, {})
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(loaded["t"], w.detach().t()) and torch.equal(loaded["w"], w.detach())


def test_module_round_trip_through_checkpoint(tmp_path):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    save_checkpoint(tmp_path, a.state_dict(), {"in": 3})
    state, _ = load_checkpoint(tmp_path)
    load_state_dict_strict(b, state)
    x = torch.randn(2, 3)
    assert torch.equal(a(x), b(x))


def _header_starts_with_0x80(state):
    return safetensors_bytes(state)[:1] == b"\x80"


def test_header_length_cases_include_a_0x80_first_byte():
    # the round trip below is only meaningful if one of its files starts like a pickle
    assert any(_header_starts_with_0x80({"w" * n: torch.zeros(1)}) for n in range(42, 90, 8))


@pytest.mark.parametrize("name_length", range(42, 90, 8))
def test_safetensors_round_trip_whatever_the_header_length(tmp_path, name_length):
    # A safetensors file begins with its header length as a little-endian u64; for some lengths the first byte is
    # 0x80, the same as a pickle's first byte. A valid safetensors file must still load.
    state = {"w" * name_length: torch.zeros(1)}
    save_checkpoint(tmp_path, state, {})
    loaded, _ = load_checkpoint(tmp_path)
    _assert_same_state(state, loaded)


def test_torch_save_file_refused_then_accepted_with_weights_only(tmp_path):
    state = _state()
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="pickled"):
        read_state_dict(path)
    _assert_same_state(state, read_state_dict(path, allow_torch_weights_only=True))


def test_legacy_torch_save_file_refused_then_accepted(tmp_path):
    state = _state()
    path = tmp_path / "legacy.bin"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="pickled"):
        read_state_dict(path)
    _assert_same_state(state, read_state_dict(path, allow_torch_weights_only=True))


def test_folder_with_pickled_model_safetensors_refused(tmp_path):
    torch.save(_state(), tmp_path / WEIGHTS_NAME)          # a pickle dressed up with the safetensors name
    (tmp_path / CONFIG_NAME).write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="pickled"):
        load_checkpoint(tmp_path)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + str(_Boom.marker),))


def test_raw_pickle_refused_and_never_executed(tmp_path):
    _Boom.marker = tmp_path / "PWNED"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"w": _Boom()}))
    with pytest.raises(ValueError, match="pickled"):
        read_state_dict(path)
    assert not _Boom.marker.exists()
    # even when allowed, torch's weights-only unpickler refuses the call rather than running it
    with pytest.raises(Exception):
        read_state_dict(path, allow_torch_weights_only=True)
    assert not _Boom.marker.exists()


def test_torch_saved_code_not_executed_when_allowed(tmp_path):
    _Boom.marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"w": _Boom()}, path)
    with pytest.raises(Exception):
        read_state_dict(path, allow_torch_weights_only=True)
    assert not _Boom.marker.exists()


def test_raw_pickle_of_tensors_refused(tmp_path):
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"w": torch.ones(2)}))
    with pytest.raises(ValueError, match="pickled"):
        read_state_dict(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_allowed_raw_pickle_is_value_error(tmp_path):
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"w": torch.ones(2)}))
    with pytest.raises(ValueError):
        read_state_dict(path, allow_torch_weights_only=True)


@pytest.mark.parametrize("obj", [[torch.ones(1)], {"a": {"b": torch.ones(1)}}, {"a": 1}])
def test_allowed_pickle_must_be_flat_dict_of_tensors(tmp_path, obj):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match="flat dict of tensors"):
        read_state_dict(path, allow_torch_weights_only=True)


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, b"not a safetensors file at all",
                                     struct.pack("<Q", 10) + b"{not json}", struct.pack("<Q", 10**9) + b"{}"])
def test_corrupt_safetensors_is_value_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_state_dict(path)


def test_truncated_safetensors_is_value_error(tmp_path):
    save_file({"w": torch.randn(100)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-50])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_state_dict(tmp_path / "cut.safetensors")


def test_missing_files_are_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path)                       # a folder without model.safetensors
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_checkpoint(tmp_path)                       # a folder without config.json
    (tmp_path / CONFIG_NAME).write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)                       # config but no weights


# ----------------------------------------------------------------------------------------------- load_state_dict_strict

def _module():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_load_state_dict_strict_lists_every_problem_in_one_message():
    m = _module()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = dict(m.state_dict())
    del state["0.bias"], state["1.weight"]                # two missing
    state["extra.weight"] = torch.zeros(1)                # two unexpected
    state["another"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(5, 3)                 # one mismatch
    with pytest.raises(ValueError) as info:
        load_state_dict_strict(m, state)
    msg = str(info.value)
    assert "missing keys (2): 0.bias, 1.weight" in msg
    assert "unexpected keys (2): another, extra.weight" in msg
    assert "shape mismatches (1): 0.weight: checkpoint (5, 3) vs model (4, 3)" in msg
    # nothing was loaded
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("problem", ["missing", "unexpected", "mismatch"])
def test_load_state_dict_strict_each_problem_alone(problem):
    m = _module()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    if problem == "missing":
        del state["1.bias"]
        want = "missing keys (1): 1.bias"
    elif problem == "unexpected":
        state["2.bias"] = torch.zeros(2)
        want = "unexpected keys (1): 2.bias"
    else:
        state["1.bias"] = torch.zeros(3)
        want = "shape mismatches (1): 1.bias: checkpoint (3,) vs model (2,)"
    with pytest.raises(ValueError) as info:
        load_state_dict_strict(m, state)
    msg = str(info.value)
    assert want in msg
    for other in {"missing keys", "unexpected keys", "shape mismatches"} - {want.split(" (")[0]}:
        assert other not in msg


def test_load_state_dict_strict_loads_matching_state():
    m, src = _module(), torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    load_state_dict_strict(m, src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
