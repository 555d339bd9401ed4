"""Stage-2 training of MoD and gamma-MoD against a first step computed by hand.

``pmod train`` runs one plain SGD step (constant lr, no clipping, no weight decay) on its first batch. The test
recomputes that step without pmod's routed forward: the unconverted LLaVA computes the decoder's input (so the
gradient reaches the embeddings and the projector), the layers run over the full sequence with masks and the
reference rules of :mod:`pmod.testing.reference` (which read no constant from pmod), the loss is the LM loss plus,
for gamma-MoD, the routing loss written out here, and ``p - lr * grad`` must equal every trained weight after the
step, routers included: MoD's routers get their gradient through ``w + 1`` on the kept vision tokens only,
gamma-MoD's one shared router through ``p`` on the kept tokens and the 0.01-weighted routing loss of each layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, TrainerCallback

from pmod.data import synth
from pmod.recipes.train import parse_args
from pmod.recipes.training import train
from pmod.testing import randomize_routers, tiny_llava_folder
from pmod.testing.reference import MOD_NORM, Context, GammaMoDReference, VisionRouterReference, run_layers

LR = 0.5
#: gamma-MoD 5.2: "the coefficient for the routing loss is set to 0.01".
ROUTING_LOSS_WEIGHT = 0.01


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("first_step")
    model = tiny_llava_folder(str(root / "model"), num_layers=4, image_size=32, patch_size=8)
    train_json, _ = synth.generate(root / "data", 8, seed=0, image_size=32)
    return {"model": model, "data": str(train_json)}


class FirstStep(TrainerCallback):
    """Gives the routers random weights before training (zero-initialised routers tie every score), and records the
    weights before and after the first step and the first batch the model sees."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.batch: dict[str, torch.Tensor] | None = None
        self.handle: Any = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        randomize_routers(model, scale=3.0)
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.batch is None:
            self.batch = {k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step == 1:
            self.after = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.before}
            self.handle.remove()


def run_first_step(setup: dict[str, str], out: Path, *flags: str) -> tuple[FirstStep, dict[str, float]]:
    argv = [
        "--model", setup["model"], "--data-path", setup["data"], "--output-dir", str(out), "--max-steps", "1",
        "--per-device-train-batch-size", "4", "--optim", "sgd", "--learning-rate", str(LR),
        "--lr-scheduler-type", "constant", "--max-grad-norm", "0", "--weight-decay", "0", "--logging-steps", "1",
        "--report-to", "none", "--use-cpu", "--max-length", "256", "--save-strategy", "no", "--disable-tqdm", "true",
        *flags,
    ]  # fmt: skip
    record = FirstStep()
    trainer = train(parse_args(argv), callbacks=[record])
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    return record, log


class RecordingGammaRule(GammaMoDReference):
    """The gamma-MoD reference rule, also computing each layer's routing loss: the mean over the routable tokens
    of the cross-entropy of the router's two logits against the top-k choice (1 = kept)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[torch.Tensor] = []

    def decide(self, layer: nn.Module, idx: int, x: torch.Tensor, ctx: Context) -> Any:
        processed, scale, skip, p = super().decide(layer, idx, x, ctx)
        question = ctx.real & ~ctx.vision & (ctx.labels == -100)  # prompt text: always processed
        routable = ctx.real & ~question
        logits = self.router(layer.input_layernorm(x)).float()
        kept = processed & routable
        self.losses.append(F.cross_entropy(logits[routable], kept[routable].long()))
        return processed, scale, skip, p


def reference_loss(
    dense: LlavaForConditionalGeneration, rules: dict[int, Any], batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The LM loss of ``dense`` on ``batch`` with its decoder layers applying the reference ``rules``."""
    decoder = dense.model.language_model
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["cos_sin"] = kwargs["position_embeddings"]
        raise Stop

    handle = decoder.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:  # the merged text + projected image embeddings, with their graph to the embeddings and the projector
        dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    except Stop:
        pass
    finally:
        handle.remove()
    ids, labels = batch["input_ids"], batch["labels"]
    ctx = Context(batch["attention_mask"].bool(), ids == dense.config.image_token_id, labels=labels)
    hidden = run_layers(decoder.layers, seen["hidden"], seen["cos_sin"], ctx, rules)
    logits = dense.lm_head(decoder.norm(hidden)).float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def dense_with(setup: dict[str, str], before: dict[str, torch.Tensor]) -> LlavaForConditionalGeneration:
    dense = LlavaForConditionalGeneration.from_pretrained(setup["model"])
    dense.train()
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, value in before.items():
            if name in params:
                params[name].copy_(value)
    return dense


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    router = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        router.weight.copy_(weight)
        router.bias.copy_(bias)
    return router


def check_step(record: FirstStep, named: dict[str, nn.Parameter]) -> None:
    """Every trained weight's step ``before - after`` equals ``LR * grad`` of the reference, within the float32
    rounding of the weights (one ulp of the largest) plus 1e-3 of the tensor's largest step."""
    assert record.after.keys() == record.before.keys() == named.keys()
    eps = torch.finfo(torch.float32).eps
    moved = 0
    for name in sorted(named, key=lambda n: "router" not in n):  # routers first: a failure names them
        param, before = named[name], record.before[name]
        want = LR * (torch.zeros_like(param) if param.grad is None else param.grad)
        atol = float(1e-3 * want.abs().max() + eps * before.abs().max())
        step = before - record.after[name]
        torch.testing.assert_close(step, want, atol=atol, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
        moved += int(bool(step.any()))
    assert moved > len(named) // 2


def test_mod_first_step_equals_hand_computed_sgd(setup: dict[str, str], tmp_path: Path) -> None:
    flags = ("--method", "mod", "--mod-layers", "1,2", "--mod-ratio", "0.25")
    record, log = run_first_step(setup, tmp_path, *flags)
    dense = dense_with(setup, record.before)
    prefix = "model.language_model.layers"
    assert {f"{prefix}.{i}.router.{p}" for i in (1, 2) for p in ("weight", "bias")} <= record.before.keys()  # trained
    routers = {i: linear(record.before[f"{prefix}.{i}.router.weight"], record.before[f"{prefix}.{i}.router.bias"])
               for i in (1, 2)}  # fmt: skip
    # MoD (p-MoD supplementary C.2): the top floor(0.25 n_vision) vision tokens by logit w, kept h + (w + 1) m.
    assert MOD_NORM == ("none", 1.0, 1.0, False)
    rules = {i: VisionRouterReference(router, 0.25, *MOD_NORM) for i, router in routers.items()}
    loss = reference_loss(dense, rules, record.batch)
    loss.backward()
    named = {n: p for n, p in dense.named_parameters() if n in record.before}
    for i, router in routers.items():
        named[f"{prefix}.{i}.router.weight"], named[f"{prefix}.{i}.router.bias"] = router.weight, router.bias
        assert float(router.weight.grad.abs().sum()) > 0
    check_step(record, named)
    assert log["loss"] == pytest.approx(float(loss.detach()), abs=1e-4)  # the Trainer logs it rounded to 4 places


def test_gamma_mod_first_step_equals_hand_computed_sgd(setup: dict[str, str], tmp_path: Path) -> None:
    flags = ("--method", "gamma_mod", "--gamma-mod-layers", "1,3", "--gamma-mod-skip-ratio", "0.25")
    record, log = run_first_step(setup, tmp_path, *flags)
    dense = dense_with(setup, record.before)
    name = "model.language_model.gamma_mod_router"
    assert {f"{name}.weight", f"{name}.bias"} <= record.before.keys()  # trained
    router = linear(record.before[f"{name}.weight"], record.before[f"{name}.bias"])
    # One router shared by layers 1 and 3, each keeping the top floor(0.75 n_routable) tokens by p: kept h + p m.
    rules = {i: RecordingGammaRule(router, 0.75) for i in (1, 3)}
    lm = reference_loss(dense, rules, record.batch)
    routing = ROUTING_LOSS_WEIGHT * sum(rule.losses[0] for rule in rules.values())
    assert all(len(rule.losses) == 1 for rule in rules.values())
    (lm + routing).backward()
    named = {n: p for n, p in dense.named_parameters() if n in record.before}
    named[f"{name}.weight"], named[f"{name}.bias"] = router.weight, router.bias
    check_step(record, named)
    assert log["pmod/routing_loss"] == pytest.approx(float(routing.detach()), rel=1e-5)
    assert log["loss"] == pytest.approx(float((lm + routing).detach()), abs=1e-4)
