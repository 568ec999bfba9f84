"""Fuzzing the adapter loader: whatever is on disk, ``load_adapter`` either loads a sane adapter or
raises a :class:`lorakit.LorakitError`, and a refused load leaves the model unchanged. As the README
promises, a refusal names the file, and, when the weights file is readable and the config valid (so what
is wrong is a tensor), the tensor.

The valid adapter is built once per test (module fixture); each example only rewrites one file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as read_safetensors

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.io.adapters import adapter_tensors
from tests.helpers import logits, perturb, tiny_llama, token_batch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_NAME = "some-org/tiny-llama"
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Valid:
    """A valid saved adapter, as bytes, and what loading it must give."""

    def __init__(self, root: Path) -> None:
        model = tiny_llama()
        model.config._name_or_path = BASE_NAME
        lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")), "trained")
        perturb(model, "trained", seed=5)
        lorakit.save_adapter(model, root / "valid")
        self.config_text = (root / "valid" / CONFIG_FILE).read_text()
        self.config = json.loads(self.config_text)
        self.weights = (root / "valid" / WEIGHTS_FILE).read_bytes()
        self.shapes = {key: tuple(t.shape) for key, t in adapter_tensors(model, "trained").items()}


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    return Valid(tmp_path_factory.mktemp("fuzz"))


class Loader:
    """One target model and one scratch adapter directory per test; ``attempt`` checks one example."""

    def __init__(self, valid: Valid, directory: Path) -> None:
        self.valid = valid
        self.model = tiny_llama()
        self.model.config._name_or_path = BASE_NAME
        self.ids = token_batch(rows=1, length=4)
        self.base_logits = logits(self.model, self.ids)
        self.directory = directory
        self.loaded = 0
        self.refused = 0
        self.tensor_names: set[str] | None = None  # the tensors of a readable weights file beside a valid config

    def write(self, *, config: str | bytes | None = None, weights: bytes | None = None) -> None:
        self.tensor_names = None
        if config is None and weights is not None:
            try:
                self.tensor_names = set(read_safetensors(weights)) | set(self.valid.shapes)
            except Exception:  # unreadable: the refusal is about the file, not one tensor
                self.tensor_names = None
        elif config is None:
            self.tensor_names = set(self.valid.shapes)
        config = self.valid.config_text if config is None else config
        weights = self.valid.weights if weights is None else weights
        (self.directory / CONFIG_FILE).write_bytes(config.encode() if isinstance(config, str) else config)
        (self.directory / WEIGHTS_FILE).write_bytes(weights)

    def attempt(self) -> bool:
        """Load the scratch directory; True if it loaded (and was sane), False if refused (model unchanged)."""
        try:
            lorakit.load_adapter(self.model, self.directory, "fuzz")
        except LorakitError as err:
            self.check_refusal(str(err))
            assert lorakit.adapter_names(self.model) == []
            assert not hasattr(self.model, "lorakit_state")
            assert torch.equal(logits(self.model, self.ids), self.base_logits)
            self.refused += 1
            return False
        try:
            tensors = adapter_tensors(self.model, "fuzz")
            assert {k: tuple(t.shape) for k, t in tensors.items()} == self.valid.shapes
            for key, tensor in tensors.items():
                assert torch.isfinite(tensor).all(), key
                assert tensor.dtype == torch.float32, key
        finally:
            lorakit.delete_adapter(self.model, "fuzz")
        assert torch.equal(logits(self.model, self.ids), self.base_logits)
        self.loaded += 1
        return True


    def check_refusal(self, message: str) -> None:
        """The README's promise: the refusal names the file, and the tensor when a tensor is what is wrong."""
        files = [str(self.directory / CONFIG_FILE), str(self.directory / WEIGHTS_FILE)]
        assert any(file in message for file in files), f"the refusal names no file: {message!r}"
        if self.tensor_names is not None:
            assert any(repr(name) in message for name in self.tensor_names), f"the refusal names no tensor: {message!r}"


@pytest.fixture(scope="module")
def loader(valid, tmp_path_factory) -> Loader:
    """Shared by the examples of every test: a fresh tiny Llama per example would be slow, and each
    attempt leaves the model as it found it (which ``attempt`` asserts)."""
    return Loader(valid, tmp_path_factory.mktemp("scratch"))


def test_the_valid_adapter_loads(loader):
    """The baseline: unfuzzed files load (so the fuzz tests below are not refusing everything)."""
    loader.write()
    assert loader.attempt()


# --- the weights file ------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XYZ", ""]


@st.composite
def safetensors_like(draw) -> bytes:
    """Bytes shaped like a safetensors file (length prefix, JSON header, data) with random content."""
    keys = st.sampled_from(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "__metadata__", "x"])
    entry = st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES),
                                   "shape": st.lists(st.integers(-2, 70), max_size=3),
                                   "data_offsets": st.lists(st.integers(-1, 300), min_size=0, max_size=3)})
    header = json.dumps(draw(st.dictionaries(keys, entry | st.integers() | st.text(max_size=5), max_size=3))).encode()
    header += b" " * draw(st.integers(0, 8))
    length = draw(st.sampled_from([len(header), len(header) + 1, max(len(header) - 1, 0), 2**63, 2**64 - 1]))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=300))


@FUZZ
@given(data=st.binary(max_size=600) | safetensors_like())
def test_random_weights_bytes_are_refused(loader, data):
    loader.write(weights=data)
    loader.attempt()  # a random file may even load (e.g. a valid header), but never raises anything else


@FUZZ
@given(st.data())
def test_truncated_weights_are_refused(loader, data):
    cut = data.draw(st.integers(0, len(loader.valid.weights) - 1), label="cut")
    loader.write(weights=loader.valid.weights[:cut])
    assert not loader.attempt(), f"a file truncated to {cut} of {len(loader.valid.weights)} bytes loaded"


@FUZZ
@given(st.data())
def test_mutated_weights_load_sanely_or_are_refused(loader, data):
    size = len(loader.valid.weights)
    header_end = 8 + struct.unpack("<Q", loader.valid.weights[:8])[0]
    # Half the time, aim at the length prefix and the header, where a change is most likely to matter.
    region = data.draw(st.sampled_from([(0, header_end), (0, size)]), label="region")
    positions = data.draw(st.lists(st.integers(*region).map(lambda i: min(i, size - 1)), min_size=1, max_size=8),
                          label="positions")
    mutated = bytearray(loader.valid.weights)
    for position in positions:
        mutated[position] = data.draw(st.integers(0, 255), label=f"byte at {position}")
    assume(bytes(mutated) != loader.valid.weights)
    loader.write(weights=bytes(mutated))
    loader.attempt()


def data_offset(weights: bytes, key: str) -> int:
    """Where the data of tensor ``key`` begins in a safetensors file."""
    header_size = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8:8 + header_size])
    return 8 + header_size + header[key]["data_offsets"][0]


def test_a_changed_mantissa_byte_loads_and_a_nan_is_refused(loader):
    """The two outcomes the mutation fuzzer allows, each made to happen on purpose."""
    key = sorted(loader.valid.shapes)[0]
    start = data_offset(loader.valid.weights, key)
    close = bytearray(loader.valid.weights)
    close[start] ^= 0x01  # lowest mantissa bit of the first float: a nearby finite value
    loader.write(weights=bytes(close))
    assert loader.attempt()
    nan = bytearray(loader.valid.weights)
    nan[start + 2:start + 4] = b"\xff\xff"  # exponent all ones, mantissa non-zero: NaN
    loader.write(weights=bytes(nan))
    with pytest.raises(lorakit.FormatError, match=key):
        lorakit.load_adapter(loader.model, loader.directory, "probe")
    assert loader.attempt() is False


# --- the config file -------------------------------------------------------------------------------

SPECIAL_VALUES = st.sampled_from([0, -1, 4, 8, 4.0, True, False, None, 10**400, -(10**400), 2**63, 1e308,
                                  float("inf"), float("nan"), "LORA", "q_proj", "v_proj", "all-linear", ".*", "(", "",
                                  "some-org/other-model", BASE_NAME, [], {}, ["q_proj"], {"q_proj": 8},
                                  {"q_proj": 10**400}, {"q_proj": float("inf")}, {".*": 2}])
JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | SPECIAL_VALUES
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# The fields the loader reads: mutations aim at these most of the time.
READ_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
               "use_rslora", "base_model_name_or_path", "bias", "use_dora", "lora_bias", "modules_to_save",
               "layers_to_transform", "init_lora_weights", "fan_in_fan_out", "task_type"]


@FUZZ
@given(value=JSON_VALUES)
def test_random_json_configs_are_refused(loader, value):
    loader.write(config=json.dumps(value))
    assert not loader.attempt()


@FUZZ
@given(st.data())
def test_mutated_configs_load_sanely_or_are_refused(loader, data):
    config = dict(loader.valid.config)
    keys = st.sampled_from(READ_FIELDS) | st.sampled_from(sorted(loader.valid.config)) | st.text(max_size=8)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        key = data.draw(keys, label="key")
        if data.draw(st.integers(0, 3), label="drop") == 0:
            config.pop(key, None)
        else:
            config[key] = data.draw(SPECIAL_VALUES | JSON_VALUES, label=f"value of {key!r}")
    loader.write(config=json.dumps(config))
    if loader.attempt():
        # What loaded must be what the file says, and a config this model cannot take is never loaded.
        assert config.get("peft_type") == "LORA"
        assert not config.get("use_dora")


@pytest.mark.parametrize("field", READ_FIELDS)
@settings(max_examples=25, deadline=None)
@given(value=SPECIAL_VALUES | JSON_VALUES)
def test_each_read_field_set_to_any_json_value(loader, field, value):
    """Every field the loader reads, set to anything: a sane load or a LorakitError naming the file."""
    loader.write(config=json.dumps({**loader.valid.config, field: value}))
    try:
        lorakit.load_adapter(loader.model, loader.directory, "probe")
    except LorakitError as err:
        assert str(loader.directory / CONFIG_FILE) in str(err) or str(loader.directory / WEIGHTS_FILE) in str(err)
        assert lorakit.adapter_names(loader.model) == []
    else:
        lorakit.delete_adapter(loader.model, "probe")
        loader.attempt()  # the same file again, through the full sanity checks


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_random_config_text_is_refused(loader, text):
    loader.write(config=text)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    assume(not (isinstance(value, dict) and value.get("peft_type") == "LORA"))
    assert not loader.attempt()


def test_numbers_are_finite_in_the_valid_adapter(valid):
    """The fixture itself is sane: shapes as configured, finite weights (guards the fuzzers' baseline)."""
    assert valid.config["r"] == 4 and valid.config["peft_type"] == "LORA"
    assert all(math.prod(shape) > 0 for shape in valid.shapes.values())


# --- lorakit.json, read by lorakit.load ------------------------------------------------------------

METADATA_FIELDS = st.fixed_dictionaries({}, optional={"format": SPECIAL_VALUES | JSON_VALUES,
                                                      "kind": st.sampled_from(["adapter", "xlora", "model", "foo"])
                                                      | JSON_VALUES, "origin": JSON_VALUES})


@FUZZ
@given(metadata=METADATA_FIELDS | JSON_VALUES)
def test_random_lorakit_json_loads_the_adapter_or_is_refused_naming_it(loader, metadata):
    """``lorakit.load`` over a valid adapter with any ``lorakit.json``: the adapter, or a refusal naming the file
    (or, for another kind it names, that kind's missing file), and the model unchanged."""
    loader.write()
    (loader.directory / "lorakit.json").write_text(json.dumps(metadata))
    try:
        try:
            loaded = lorakit.load(loader.directory, loader.model)
        except LorakitError as err:
            assert str(loader.directory) in str(err), str(err)
            assert lorakit.adapter_names(loader.model) == []
            assert torch.equal(logits(loader.model, loader.ids), loader.base_logits)
            return
        assert (loaded.kind, loaded.adapters) == ("adapter", ("default",))
        assert metadata.get("kind") == "adapter" and metadata.get("format") == 1
        lorakit.delete_adapter(loader.model, "default")
    finally:
        (loader.directory / "lorakit.json").unlink()
