"""lorakit's X-LoRA computes the same logits as the real ``peft`` X-LoRA (mixtures.md §1, issue 4 item 7).

Both sides get the same three experts (PEFT-format directories written by ``lorakit.save_adapter``)
and the same classifier weights (lorakit's ``classifier.layers`` is laid out like PEFT's
``internal_xlora_classifier.layers``, so the state dict moves across unchanged). PEFT quirks this
file works around:

* PEFT registers the experts internally as ``"0".."N-1"`` but activates them by the user's dict keys,
  so any other keys silently switch every expert off (§1.7): the PEFT side uses keys "0", "1", "2".
  The lorakit side uses its own names; the column order is the expert order on both sides.
* ``peft.XLoraModel`` refuses a model whose ``config.use_cache`` is True.
* PEFT numbers its X-LoRA layers by ``model.modules()`` order over every LoRA layer of any expert,
  i.e. the union of the experts' targets; lorakit numbers the modules holding any expert in
  ``named_modules()`` order. ``test_layer_numbering_matches_peft`` checks that these agree, also for
  experts whose targets are disjoint (a layer then holds only some experts).
* PEFT's scaling pass injects its dummy scalings through the same code path as the real ones, so the
  layers apply ``top_k_lora`` (ties broken by ``torch.topk``: the first k experts), the optional top-k
  softmax, and ``global_scaling_weight`` to them; lorakit does the same so that classifiers trained in
  PEFT behave identically (``scaling_pass_value != 0`` cases of the grid check it).
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.model import XLoraModel
from tests.helpers import VOCAB, perturb, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 2e-4  # fp32 sums in another order: one logit in 3,456 differs by 1.2e-4 on some CPUs
NAMES = ("alpha", "beta", "gamma")  # lorakit's names; PEFT's are "0", "1", "2"
EXPERT_SETS = {
    "mixed": ("all-linear", ("q_proj", "v_proj"), ("down_proj",)),
    "disjoint": (("q_proj", "v_proj"), ("down_proj",), ("gate_proj", "up_proj", "o_proj")),
}
TOP_K = {"dense": (None, False), "top2": (2, False), "top2-softmax": (2, True)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine they make runs crawl."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """For each expert set, three experts with random non-zero A and B, saved as PEFT dirs "0".."2"."""
    sets = {}
    for set_name, targets in EXPERT_SETS.items():
        root = tmp_path_factory.mktemp(set_name)
        dirs = {}
        for index, target in enumerate(targets):
            model = tiny_llama()
            lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=target), str(index))
            perturb(model, str(index), seed=10 + index, std=0.3)
            dirs[str(index)] = lorakit.save_adapter(model, root / str(index), str(index))
        sets[set_name] = dirs
    return sets


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (3 rows of 9) and a mask that left-pads the first row by 3 tokens."""
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def build_pair(dirs: dict[str, Path], *, layerwise: bool = True, softmax: bool = True, top_k: int | None = None,
               softmax_topk: bool = False, depth: int = 1, pass_value: float = 0.0, weight: float = 1.0):
    """lorakit's and PEFT's X-LoRA over the same experts, the same classifier weights, both in eval mode."""
    ours = tiny_llama()
    for name, path in zip(NAMES, dirs.values(), strict=True):
        lorakit.load_adapter(ours, path, name, activate=False)
    xmodel = XLoraModel(ours, list(NAMES), XLoraConfig(
        layerwise_scalings=layerwise, enable_softmax=softmax, top_k=top_k, enable_softmax_topk=softmax_topk,
        depth=depth, size=32, dropout=0.2, scaling_pass_value=pass_value, global_scaling_weight=weight))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # decisive, token-dependent routing instead of near-uniform default init
        for parameter in xmodel.classifier.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    xmodel.eval()

    base = tiny_llama()
    base.config.use_cache = False  # peft.XLoraModel refuses use_cache=True
    config = peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=64, adapters={key: str(path) for key, path in dirs.items()},
        layerwise_scalings=layerwise, enable_softmax=softmax, top_k_lora=top_k, enable_softmax_topk=softmax_topk,
        xlora_depth=depth, xlora_size=32, xlora_dropout_p=0.2, scaling_pass_value=pass_value,
        global_scaling_weight=weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, config)
    classifier = theirs.base_model.internal_xlora_classifier  # PeftModelForCausalLM -> XLoraModel -> classifier
    classifier.layers.load_state_dict(xmodel.classifier.layers.state_dict())
    return xmodel, theirs.eval()


def compare(xmodel, theirs, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    with torch.no_grad():
        ours = xmodel(ids, attention_mask=mask)
        expected = theirs(input_ids=ids, attention_mask=mask).logits
    keep = (mask if mask is not None else torch.ones_like(ids)).bool()  # padded positions are not compared
    torch.testing.assert_close(ours.logits[keep], expected[keep], atol=ATOL, rtol=0)
    their_scalings = theirs.base_model.get_latest_scalings()
    torch.testing.assert_close(ours.scalings[keep], their_scalings[keep], atol=ATOL, rtol=0)


GRID = [
    pytest.param(layerwise, softmax, top_k, depth, pass_value, weight,
                 id=f"{'layerwise' if layerwise else 'shared'}-{'softmax' if softmax else 'raw'}-{top_k}"
                    f"-depth{depth}-pass{pass_value}-g{weight}")
    for layerwise, softmax, top_k, depth, pass_value, weight in itertools.product(
        (False, True), (False, True), TOP_K, (1, 2), (0.0, 0.5), (1.0, 0.5))
]


@pytest.mark.parametrize(("layerwise", "softmax", "top_k", "depth", "pass_value", "weight"), GRID)
def test_logits_equal_peft_xlora(expert_dirs, layerwise, softmax, top_k, depth, pass_value, weight):
    k, softmax_topk = TOP_K[top_k]
    xmodel, theirs = build_pair(expert_dirs["mixed"], layerwise=layerwise, softmax=softmax, top_k=k,
                                softmax_topk=softmax_topk, depth=depth, pass_value=pass_value, weight=weight)
    ids, mask = batch()
    with torch.no_grad():
        with lorakit.disabled(xmodel.base):
            base_logits = xmodel.base(ids).logits
        out = xmodel(ids)
    assert not torch.allclose(out.logits, base_logits, atol=1e-2), "X-LoRA must change the output"
    if k is not None:  # the routing must really vary: different tokens and layers keep different experts
        kept = out.scalings.topk(k, dim=-1).indices.sort(dim=-1).values.reshape(-1, k)
        assert len(torch.unique(kept, dim=0)) > 1
    compare(xmodel, theirs, ids, None)
    compare(xmodel, theirs, ids, mask)


@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_logits_equal_peft_xlora_with_disjoint_experts(expert_dirs, layerwise, top_k):
    """Experts on disjoint module sets: every layer holds only some experts, and L is their union."""
    k, softmax_topk = TOP_K[top_k]
    xmodel, theirs = build_pair(expert_dirs["disjoint"], layerwise=layerwise, top_k=k, softmax_topk=softmax_topk,
                                weight=0.5)
    ids, mask = batch()
    compare(xmodel, theirs, ids, None)
    compare(xmodel, theirs, ids, mask)


@pytest.mark.parametrize("expert_set", EXPERT_SETS)
def test_layer_numbering_matches_peft(expert_dirs, expert_set):
    """Slot l of lorakit's scalings is the module PEFT gives layer_number l (``model.modules()`` order)."""
    xmodel, theirs = build_pair(expert_dirs[expert_set])
    peft_order = {}
    for name, module in theirs.base_model.lora_model.model.named_modules():  # the wrapped HF model
        bound = getattr(module.forward, "__self__", None)
        if hasattr(bound, "layer_number"):  # peft swaps each LoRA layer's forward for an XLora*Layer's
            peft_order[bound.layer_number] = name
    assert [peft_order[slot] for slot in sorted(peft_order)] == xmodel.layer_names
    assert theirs.base_model.internal_xlora_classifier.n_layers == xmodel.n_layers
    if expert_set == "disjoint":
        assert xmodel.n_layers == 2 * 6  # 2 blocks x (q, v, down, gate, up, o): the union of the targets
