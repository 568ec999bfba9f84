"""Every bad adapter directory is refused with a lorakit error naming the file (and tensor), and a
refused load leaves the model exactly as it was: no adapter added, the same logits."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterError, FormatError, LoraConfig, LorakitError
from tests.helpers import logits, perturb, tiny_llama, token_batch

CONFIG = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
BASE_NAME = "some-org/tiny-llama"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
UP_A = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"


def named_llama() -> torch.nn.Module:
    model = tiny_llama()
    model.config._name_or_path = BASE_NAME
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A perturbed adapter saved once, and the logits it gives."""
    model = named_llama()
    lorakit.attach(model, CONFIG, "trained")
    perturb(model, "trained", seed=3)
    directory = tmp_path_factory.mktemp("good") / "adapter"
    lorakit.save_adapter(model, directory)
    return directory, logits(model, token_batch())


@pytest.fixture
def adapter(saved, tmp_path) -> Path:
    """A private copy of the good adapter, for a test to break."""
    source, _ = saved
    directory = tmp_path / "adapter"
    directory.mkdir()
    for file in source.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


@pytest.fixture(params=["fresh", "holding-an-adapter"])
def model(request) -> torch.nn.Module:
    """The model to load into: a fresh base, or one that already holds an active adapter."""
    model = named_llama()
    if request.param == "holding-an-adapter":
        lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "o_proj")), "existing")
        perturb(model, "existing", seed=9)
    return model


def read_config(directory: Path) -> dict:
    return json.loads((directory / CONFIG_FILE).read_text())


def write_config(directory: Path, config) -> None:
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def edit_config(directory: Path, **changes) -> None:
    config = read_config(directory)
    config.update(changes)
    write_config(directory, config)


def edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(str(directory / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS_FILE))


def refused(model, directory, *fragments: str, error: type[Exception] = FormatError, **kwargs) -> str:
    """Load ``directory`` into ``model``, expect ``error`` whose message holds every fragment, and check
    that the model is unchanged. Returns the message."""
    names = lorakit.adapter_names(model)
    trainable = sorted(lorakit.trainable_parameters(model))
    modules = [type(m).__name__ for _, m in model.named_modules()]
    ids = token_batch()
    before = logits(model, ids)
    with pytest.raises(error) as caught:
        lorakit.load_adapter(model, directory, "loaded", **kwargs)
    message = str(caught.value)
    assert isinstance(caught.value, LorakitError)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert lorakit.adapter_names(model) == names
    assert sorted(lorakit.trainable_parameters(model)) == trainable
    assert [type(m).__name__ for _, m in model.named_modules()] == modules
    assert torch.equal(logits(model, ids), before)
    return message


def test_the_good_adapter_loads(saved, adapter, model):
    """The baseline the other tests break: the untouched copy loads and reproduces the logits."""
    _, expected = saved
    names = lorakit.adapter_names(model)
    assert lorakit.load_adapter(model, adapter, "loaded") == "loaded"
    assert lorakit.adapter_names(model) == [*names, "loaded"]
    torch.testing.assert_close(logits(model, token_batch()), expected, rtol=0, atol=1e-6)


# --- the directory and the config file -------------------------------------------------------------

def test_missing_directory(model, tmp_path):
    missing = tmp_path / "nowhere"
    refused(model, missing, str(missing))


def test_a_file_instead_of_a_directory(model, adapter):
    refused(model, adapter / WEIGHTS_FILE, str(adapter / WEIGHTS_FILE))


def test_missing_config(model, adapter):
    (adapter / CONFIG_FILE).unlink()
    refused(model, adapter, str(adapter / CONFIG_FILE))


@pytest.mark.parametrize("text", ["{", "", "{'r': 4}", "\xff\xfe"],
                         ids=["truncated", "empty", "python-repr", "bad-utf8"])
def test_invalid_json(model, adapter, text):
    path = adapter / CONFIG_FILE
    path.write_bytes(text.encode("latin-1"))
    refused(model, adapter, str(path), "JSON")


def test_json_array_instead_of_object(model, adapter):
    write_config(adapter, [read_config(adapter)])
    refused(model, adapter, str(adapter / CONFIG_FILE), "list", "object")


def test_json_integer_too_long_to_parse(model, adapter):
    """Python refuses integers of more than 4300 digits with a ValueError of its own."""
    (adapter / CONFIG_FILE).write_text('{"r": ' + "9" * 5000 + "}")
    refused(model, adapter, str(adapter / CONFIG_FILE))


def test_json_nested_too_deeply(model, adapter):
    """A pathologically nested file must not escape as a RecursionError."""
    (adapter / CONFIG_FILE).write_text("[" * 200_000 + "]" * 200_000)
    refused(model, adapter, str(adapter / CONFIG_FILE))


def test_prefix_tuning(model, adapter):
    edit_config(adapter, peft_type="PREFIX_TUNING")
    refused(model, adapter, str(adapter / CONFIG_FILE), "PREFIX_TUNING", "LORA")


def test_missing_peft_type(model, adapter):
    config = read_config(adapter)
    del config["peft_type"]
    write_config(adapter, config)
    refused(model, adapter, str(adapter / CONFIG_FILE), "peft_type")


def test_dora(model, adapter):
    edit_config(adapter, use_dora=True)
    refused(model, adapter, str(adapter / CONFIG_FILE), "DoRA", "use_dora")


@pytest.mark.parametrize("field,value", [("lora_bias", True), ("modules_to_save", ["lm_head"]),
                                         ("layers_to_transform", [0]), ("bias", "all")])
def test_other_unsupported_features(model, adapter, field, value):
    edit_config(adapter, **{field: value})
    refused(model, adapter, str(adapter / CONFIG_FILE), field)


@pytest.mark.parametrize("rank", [0, -4, "8", 4.0, None, True, [4]])
def test_bad_rank(model, adapter, rank):
    edit_config(adapter, r=rank)
    refused(model, adapter, str(adapter / CONFIG_FILE), "'r'")


@pytest.mark.parametrize("alpha", [0, -1, "16", float("nan"), float("inf"), 10**400],
                         ids=["zero", "negative", "string", "nan", "inf", "huge-int"])
def test_bad_alpha(model, adapter, alpha):
    """``10**400`` is a valid JSON number that no float can hold."""
    config = read_config(adapter)
    config["lora_alpha"] = alpha
    (adapter / CONFIG_FILE).write_text(json.dumps(config))  # json writes NaN/Infinity, Python reads them
    refused(model, adapter, str(adapter / CONFIG_FILE), "'lora_alpha'")


@pytest.mark.parametrize("field", ["r", "lora_alpha", "target_modules"])
def test_missing_required_field(model, adapter, field):
    config = read_config(adapter)
    del config[field]
    write_config(adapter, config)
    refused(model, adapter, str(adapter / CONFIG_FILE), repr(field))


@pytest.mark.parametrize("targets", [None, [], 5, ["q_proj", 3], "("],
                         ids=["null", "empty", "int", "non-str", "bad-regex"])
def test_bad_target_modules(model, adapter, targets):
    edit_config(adapter, target_modules=targets)
    refused(model, adapter, str(adapter / CONFIG_FILE), "'target_modules'")


def test_target_modules_matching_nothing(model, adapter):
    """A config whose targets name no module of this model: the error says which file asked for them."""
    edit_config(adapter, target_modules=["wq", "wv"])
    refused(model, adapter, str(adapter / CONFIG_FILE), "wq", "k_proj")


@pytest.mark.parametrize("field,value", [("lora_dropout", 1.5), ("lora_dropout", float("inf")),
                                         ("alpha_pattern", {"q_proj": float("inf")}),
                                         ("alpha_pattern", {"q_proj": 10**400}), ("lora_dropout", "0.1"),
                                         ("rank_pattern", {"q_proj": 0}),
                                         ("rank_pattern", ["q_proj"]), ("alpha_pattern", {"(": 2}),
                                         ("exclude_modules", "all-linear"), ("use_rslora", "false")])
def test_other_bad_fields(model, adapter, field, value):
    edit_config(adapter, **{field: value})
    refused(model, adapter, str(adapter / CONFIG_FILE), repr(field))


# --- the weights file ------------------------------------------------------------------------------

def test_missing_weights(model, adapter):
    (adapter / WEIGHTS_FILE).unlink()
    refused(model, adapter, str(adapter / WEIGHTS_FILE))


def test_missing_tensor(model, adapter):
    edit_tensors(adapter, lambda t: t.pop(V_B))
    refused(model, adapter, str(adapter / WEIGHTS_FILE), V_B)


def test_extra_tensor_for_an_untargeted_module(model, adapter):
    edit_tensors(adapter, lambda t: t.update({UP_A: torch.zeros(4, 64)}))
    refused(model, adapter, str(adapter / WEIGHTS_FILE), UP_A)


def test_wrong_shape(model, adapter):
    edit_tensors(adapter, lambda t: t.update({Q_A: torch.zeros(4, 32)}))
    refused(model, adapter, str(adapter / WEIGHTS_FILE), Q_A, "(4, 32)", "(4, 64)")


def test_rank_in_config_disagrees_with_tensors(model, adapter):
    edit_config(adapter, r=8)
    refused(model, adapter, str(adapter / WEIGHTS_FILE), "(4, 64)", "(8, 64)")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_dtype(model, adapter, dtype):
    edit_tensors(adapter, lambda t: t.update({Q_A: t[Q_A].to(dtype)}))
    refused(model, adapter, str(adapter / WEIGHTS_FILE), Q_A, "dtype")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor(model, adapter, bad):
    def poison(tensors):
        tensors[V_B] = tensors[V_B].clone()
        tensors[V_B][3, 1] = bad
    edit_tensors(adapter, poison)
    refused(model, adapter, str(adapter / WEIGHTS_FILE), V_B, "NaN")


def test_garbage_weights(model, adapter):
    (adapter / WEIGHTS_FILE).write_bytes(b"not a safetensors file at all")
    refused(model, adapter, str(adapter / WEIGHTS_FILE), "safetensors")


def test_a_second_load_under_a_taken_name(model, adapter):
    lorakit.load_adapter(model, adapter, "loaded")
    names = lorakit.adapter_names(model)
    with pytest.raises(AdapterError, match="loaded"):
        lorakit.load_adapter(model, adapter, "loaded")
    assert lorakit.adapter_names(model) == names


@pytest.mark.parametrize("name", ["", "a.b", "a b", "x/y"])
def test_invalid_adapter_name(model, adapter, name):
    names = lorakit.adapter_names(model)
    with pytest.raises(AdapterError):
        lorakit.load_adapter(model, adapter, name)
    assert lorakit.adapter_names(model) == names


# --- pickles ---------------------------------------------------------------------------------------

def to_pickle(directory: Path, obj=None) -> Path:
    """Replace the safetensors file of ``directory`` by ``adapter_model.bin`` (its state dict, or ``obj``)."""
    tensors = load_file(str(directory / WEIGHTS_FILE))
    (directory / WEIGHTS_FILE).unlink()
    torch.save(tensors if obj is None else obj, directory / PICKLE_FILE)
    return directory / PICKLE_FILE


def test_pickle_refused_by_default(model, adapter):
    path = to_pickle(adapter)
    refused(model, adapter, str(path), "allow_pickle")


def test_pickle_accepted_when_allowed_gives_the_same_logits(saved, adapter, tmp_path):
    _, expected = saved
    from_safetensors = named_llama()
    lorakit.load_adapter(from_safetensors, adapter)
    to_pickle(adapter)
    from_pickle = named_llama()
    lorakit.load_adapter(from_pickle, adapter, allow_pickle=True)
    ids = token_batch()
    assert torch.equal(logits(from_pickle, ids), logits(from_safetensors, ids))
    torch.testing.assert_close(logits(from_pickle, ids), expected, rtol=0, atol=1e-6)


def test_safetensors_preferred_over_a_pickle_beside_it(saved, adapter):
    """A stray ``.bin`` next to the safetensors file is never read, so it needs no allow_pickle."""
    _, expected = saved
    torch.save({"junk": torch.zeros(1)}, adapter / PICKLE_FILE)
    model = named_llama()
    lorakit.load_adapter(model, adapter)
    torch.testing.assert_close(logits(model, token_batch()), expected, rtol=0, atol=1e-6)


class Payload:
    """A class a full unpickler would import and instantiate."""

    def __reduce__(self):
        return (print, ("pickle code ran",))


@pytest.mark.parametrize("kind", ["extra-int", "list", "code", "tensor", "int-key"])
def test_pickle_of_non_tensors_refused_even_when_allowed(model, adapter, kind, capsys):
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    obj = {"extra-int": {**tensors, "step": 3}, "list": list(tensors.values()), "code": {**tensors, "x": Payload()},
           "tensor": tensors[Q_A], "int-key": {**tensors, 7: tensors[Q_A]}}[kind]
    path = to_pickle(adapter, obj)
    refused(model, adapter, str(path), allow_pickle=True)
    assert "pickle code ran" not in capsys.readouterr().out


def test_pickle_that_is_not_a_pickle(model, adapter):
    path = to_pickle(adapter)
    path.write_bytes(pickle.dumps([1, 2], protocol=2)[:5])
    refused(model, adapter, str(path), allow_pickle=True)


@pytest.mark.parametrize("damage", ["missing", "shape", "nan"])
def test_errors_in_a_pickle_name_the_pickle(model, adapter, damage):
    """Key, shape and value errors in ``adapter_model.bin`` name that file, not the absent safetensors one."""
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    if damage == "missing":
        del tensors[Q_A]
    elif damage == "shape":
        tensors[Q_A] = torch.zeros(4, 32)
    else:
        tensors[Q_A][0, 0] = float("nan")
    path = to_pickle(adapter, tensors)
    message = refused(model, adapter, str(path), Q_A, allow_pickle=True)
    assert WEIGHTS_FILE not in message


# --- the base model --------------------------------------------------------------------------------

def test_config_records_the_base_model(adapter):
    assert read_config(adapter)["base_model_name_or_path"] == BASE_NAME


def test_other_base_model_refused(model, adapter):
    edit_config(adapter, base_model_name_or_path="some-org/other-model")
    refused(model, adapter, str(adapter / CONFIG_FILE), "some-org/other-model", BASE_NAME, "check_base")


def test_other_base_model_accepted_with_check_base_false(saved, adapter):
    _, expected = saved
    edit_config(adapter, base_model_name_or_path="some-org/other-model")
    model = named_llama()
    lorakit.load_adapter(model, adapter, check_base=False)
    torch.testing.assert_close(logits(model, token_batch()), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("recorded", ["/home/me/models/tiny-llama/", "Some-Org/Tiny-Llama", None, ""])
def test_same_base_under_another_path_accepted(saved, adapter, recorded):
    _, expected = saved
    edit_config(adapter, base_model_name_or_path=recorded)
    model = named_llama()
    lorakit.load_adapter(model, adapter)
    torch.testing.assert_close(logits(model, token_batch()), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("recorded", [5, ["some-org/tiny-llama"], {"name": "x"}, True])
def test_base_model_field_of_the_wrong_type(model, adapter, recorded):
    edit_config(adapter, base_model_name_or_path=recorded)
    refused(model, adapter, str(adapter / CONFIG_FILE), "base_model_name_or_path")


@pytest.mark.parametrize("module", ["", "model", "model.layers.0.self_attn", "model.layers.7.self_attn.q_proj",
                                    "model.layers.0.self_attn.q_proj"])
def test_base_weight_copy_that_does_not_fit_is_refused(model, adapter, module):
    """PEFT may store ``<module>.base_layer.weight`` beside an adapter; one for a module without a weight,
    for no module, or with values other than the model's own is refused, naming the tensor."""
    key = f"base_model.model.{module}.base_layer.weight" if module else "base_model.model.base_layer.weight"
    edit_tensors(adapter, lambda t: t.update({key: torch.ones(64, 64)}))
    refused(model, adapter, str(adapter / WEIGHTS_FILE), key)
