"""pmod's model in lmms-eval: ``python -m lmms_eval --model pmod --model_args pretrained=DIR,...``.

One class for dense and routed models: ``pretrained`` is a pmod folder (p-MoD, MoD, gamma-MoD, FastV) or a plain
Hugging Face LLaVA folder, and ``method=`` converts a dense one on the fly (``method=fastv,fastv_keep=0.25``).
Other model args: ``dtype`` (auto, float32, bfloat16, float16), ``attn_implementation``, ``device``,
``batch_size``, ``max_new_tokens`` (used when a task sets none), ``budget`` (a share of dense's TFLOPs the model is
moved to after loading, :mod:`pmod.eval.budgets`), ``chat_template`` (a Jinja template or a file; the
processor's own, else LLaVA's Vicuna v1 prompt, as ``pmod generate``), ``cost_dir`` (where the per-request cost
lines go; default ``$PMOD_COST_DIR``, else ``pmod-costs/<folder name>``).

Requests are batched (left padding for generation, right padding for log-likelihoods) by equal generation
settings, longest first. Every request's cost is written beside the answers (:mod:`pmod.eval.cost`). Under
``accelerate launch`` lmms-eval gives each process its share of the documents; each process runs its own copy of
the model on its own device and writes its own cost file.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from pmod.core.cache import cache_kwargs
from pmod.core.convert import decoder_attention_mask
from pmod.core.deprecation import renamed_attributes
from pmod.core.errors import UserError
from pmod.eval.budgets import apply_budget
from pmod.eval.cost import (
    CostLog,
    CostModel,
    PrefillClock,
    RequestCost,
    read_costs,
    row_kv_bytes,
    summarize,
    token_counts,
)
from pmod.eval.model_args import load_for_eval, method_from_args
from pmod.io.model_folder import build_prompt

#: Generation settings of a task passed on to ``generate`` (others, e.g. LLaVA's ``image_aspect_ratio``, are not
#: generation settings of a transformers model).
GENERATE_KWARGS = ("temperature", "top_p", "top_k", "num_beams", "repetition_penalty", "length_penalty",
                   "no_repeat_ngram_size", "min_new_tokens")  # fmt: skip


class RoutedLMM(lmms):
    """A pmod or Hugging Face LLaVA model folder as an lmms-eval model (``generate_until``, ``loglikelihood``)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        chat_template: str | None = None,
        cost_dir: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it to every model; batches here have one size
        budget: float | str | None = None,
        **method_settings: Any,
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"batch_size={batch_size} is not supported; give a whole number >= 1.")
        self.accelerator = Accelerator()
        self._rank, self._world_size = _process_group(self.accelerator)
        if self._world_size > 1:  # one process per GPU, or CPU processes side by side
            device = f"cuda:{os.environ.get('LOCAL_RANK', self._rank)}" if torch.cuda.is_available() else "cpu"
        elif device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        config = method_from_args(method, method_settings)
        self.pretrained = str(pretrained)
        self.model, self.processor = load_for_eval(
            pretrained, config, dtype, attn_implementation, str(device), chat_template
        )
        if budget not in (None, ""):  # a share of dense's TFLOPs (pmod.eval.budgets), before the cost model reads it
            apply_budget(self.model, budget, pretrained)
        self.tokenizer = self.processor.tokenizer
        self.batch_size_per_device = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.costs = CostModel(self.model)
        cfg = self.model.config
        self.image_token_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
        generation = self.model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.keep_model = False  # `pmod eval` keeps the model between tasks; lmms-eval's CLI frees it at the end
        name = Path(pretrained).name + (f"-{config.method}" if config is not None else "")
        self.set_cost_dir(cost_dir or os.environ.get("PMOD_COST_DIR") or Path("pmod-costs") / name)

    # ------------------------------------------------------------------------------------------- lmms interface
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def device(self) -> torch.device:
        return self._device

    def set_cost_dir(self, folder: str | Path) -> None:
        """Write the cost lines of the requests from now on to ``folder`` (its old lines of this process go)."""
        self.cost_dir = Path(folder)
        self.cost_log = CostLog(self.cost_dir, self._rank)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult | str]:
        results: list[Any] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            if not req.metadata.get("__padding_only__"):  # lmms-eval's filler to even out processes: never scored
                key = json.dumps(req.args[1] or {}, sort_keys=True, default=str)
                groups.setdefault(key, []).append(i)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="pmod generate") as bar:
            for indices in groups.values():
                indices.sort(key=lambda i: -len(requests[i].args[0]))  # longest first: little padding per batch
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    for i, result in zip(chunk, self._generate([requests[i] for i in chunk])):
                        results[i] = result
                    bar.update(len(chunk))
        self._finish()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(negative log-likelihood of the continuation, whether greedy decoding gives it)``.

        lmms-eval's models return the loss and its multiple-choice scoring takes the smallest (``argmin``), so the
        first value is the summed negative log-likelihood. Each pair is wrapped in a :class:`GenerationResult`:
        lmms-eval 0.7.3 turns any other non-text answer into its string, which its scoring cannot unpack.
        """
        results: list[Any] = [GenerationResult((0.0, False))] * len(requests)
        order = [i for i, req in enumerate(requests) if not req.metadata.get("__padding_only__")]
        order.sort(key=lambda i: -len(requests[i].args[0]))
        with tqdm(total=len(requests), disable=self.rank != 0, desc="pmod loglikelihood") as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for i, result in zip(chunk, self._loglikelihood([requests[i] for i in chunk])):
                    results[i] = GenerationResult(result)
                bar.update(len(chunk))
        self._finish()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "pmod's lmms-eval model does not support multi-round generation (generate_until_multi_round); "
            "evaluate single-round tasks, or use lmms-eval's own model for this task."
        )

    def clean(self) -> None:
        if self.keep_model:
            gc.collect()
            return
        super().clean()

    # ------------------------------------------------------------------------------------------------ requests
    def _visuals(self, req: Instance) -> list[Image.Image]:
        args = req.args
        if len(args) < 6 or not callable(args[2]):  # e.g. unconditional log-likelihoods: (context, continuation)
            return []
        doc_to_visual, doc_id, task, split = args[2], args[3], args[4], args[5]
        found = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        flat = []
        for item in found if isinstance(found, list | tuple) else [found]:
            flat += list(item) if isinstance(item, list | tuple) else [item]
        for item in flat:
            if not isinstance(item, Image.Image):
                raise UserError(f"task {task} gives a {type(item).__name__} input (video or audio?); pmod's "
                                f"lmms-eval model takes images only.")  # fmt: skip
        return [image.convert("RGB") for image in flat]

    def _prompt(self, context: str, n_images: int) -> str:
        """The chat prompt of a request; images go before the text unless the context places them itself."""
        token = getattr(self.processor, "image_token", "<image>")
        if n_images and token in context:
            if context.count(token) != n_images:
                raise UserError(f"a request names {context.count(token)} {token} tokens but has {n_images} images; "
                                f"fix the task's doc_to_text.")  # fmt: skip
            return build_prompt(self.processor, context, 0)
        return build_prompt(self.processor, context, n_images)

    def _encode(self, texts: list[str], visuals: list[list[Image.Image]], padding_side: str) -> Any:
        self.tokenizer.padding_side = padding_side
        # One list per prompt, as pmod.io.model_folder.encode and the processors' apply_chat_template pass them.
        nested = [list(images) for images in visuals] if any(visuals) else None
        inputs = self.processor(text=texts, images=nested, return_tensors="pt", padding=True).to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _generate(self, reqs: list[Instance]) -> list[GenerationResult]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        settings = dict(reqs[0].args[1] or {})
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = int(settings.get("max_new_tokens") or self.max_new_tokens)
        gen = {k: settings[k] for k in GENERATE_KWARGS if settings.get(k) is not None}
        if float(gen.pop("temperature", 0) or 0) > 0 or settings.get("do_sample"):
            gen.update(do_sample=True, temperature=float(settings.get("temperature") or 1.0))
        else:
            gen = {k: v for k, v in gen.items() if k not in ("top_p", "top_k")} | {"do_sample": False}
        visuals = [self._visuals(r) for r in reqs]
        inputs = self._encode([self._prompt(r.args[0], len(v)) for r, v in zip(reqs, visuals)], visuals, "left")
        mask = inputs["attention_mask"]
        cache, kv = self._new_cache(), {}

        def read_cache() -> None:  # beam search keeps num_beams rows per request; the first one is reported
            beams = int(gen.get("num_beams", 1))
            decoder_mask = decoder_attention_mask(self.model, mask)  # VisionZip shortens the prompt before the decoder
            kv["rows"] = row_kv_bytes(cache, decoder_mask.repeat_interleave(beams, 0))[::beams]

        clock = PrefillClock(read_cache)
        guard = FiniteLogits(lambda bad: self._refuse_non_finite(reqs[0], "logits", bad, len(reqs)))
        clock.begin()
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, **cache_kwargs(cache), max_new_tokens=max_new,
                logits_processor=LogitsProcessorList([guard, clock]),
                stopping_criteria=StoppingCriteriaList([StopStrings(self.tokenizer, until, mask.shape[1])]),
                pad_token_id=self.tokenizer.pad_token_id, **gen,
            )  # fmt: skip
        _sync()
        decode_s = time.perf_counter() - clock.resumed
        new = out[:, inputs["input_ids"].shape[1] :]
        lengths = [self._generated_length(row) for row in new.tolist()]
        decoded = sum(max(n - 1, 0) for n in lengths)  # the first new token of each row comes from the prefill
        rate = decoded / decode_s if decoded > 0 and decode_s > 0 else None
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        batch = self.cost_log.next_batch()
        results, costs = [], []
        for req, text, n_new, (nv, nt), kv_bytes in zip(
            reqs, texts, lengths, token_counts(inputs["input_ids"], mask, self.image_token_id), kv["rows"]
        ):
            for stop in until:  # generation stops at the first stop string; the answer ends before it
                text = text.split(stop)[0]
            results.append(GenerationResult(text, TokenCounts(input_tokens=nv + nt, output_tokens=n_new)))
            costs.append(self._cost(req, "generate", nv, nt, n_new, kv_bytes, clock.prefill_ms, rate, batch, len(reqs)))
        self.cost_log.write(costs)
        return results

    def _generated_length(self, row: list[int]) -> int:
        """New tokens of a row up to and including its end-of-sequence token (the rest is padding)."""
        for i, token in enumerate(row):
            if token in self.eos_ids:
                return i + 1
        return len(row)

    def _loglikelihood(self, reqs: list[Instance]) -> list[tuple[float, bool]]:
        prompts, fulls, visuals = [], [], []
        for req in reqs:
            context, continuation = req.args[0], req.args[1]
            if callable(continuation):
                doc_id, task, split = req.args[3], req.args[4], req.args[5]
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = self._visuals(req)
            prompt = self._prompt(context, len(images))
            # As lm-evaluation-harness encodes a pair: the continuation's tokens are what the whole adds to the
            # context, with the context's trailing spaces moved to the continuation.
            spaces = len(prompt) - len(prompt.rstrip(" "))
            prompts.append(prompt[: len(prompt) - spaces])
            fulls.append(prompt + str(continuation))
            visuals.append(images)
        starts = self._encode(prompts, visuals, "right")["attention_mask"].sum(1).tolist()
        inputs = self._encode(fulls, visuals, "right")
        mask = inputs["attention_mask"]
        cache = self._new_cache()
        _sync()
        started = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(**inputs, **cache_kwargs(cache), use_cache=True).logits
        _sync()
        prefill_ms = (time.perf_counter() - started) * 1000
        kv_rows = row_kv_bytes(cache, decoder_attention_mask(self.model, mask))
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        results, costs, batch = [], [], self.cost_log.next_batch()
        counts = token_counts(inputs["input_ids"], mask, self.image_token_id)
        for row, (start, end) in enumerate(zip(starts, mask.sum(1).tolist())):
            target = inputs["input_ids"][row, start:end]
            scores = logprobs[row, start - 1 : end - 1]
            nll = -float(scores.gather(-1, target[:, None]).sum())
            results.append((nll, bool((scores.argmax(-1) == target).all())))
        bad = sum(not math.isfinite(nll) for nll, _ in results)
        if bad:  # argmin over NaN picks the first option: a silent chance-level score
            self._refuse_non_finite(reqs[0], "log-likelihoods", bad, len(reqs))
        for row, req in enumerate(reqs):
            nv, nt = counts[row]
            costs.append(self._cost(req, "loglikelihood", nv, nt, 0, kv_rows[row], prefill_ms, None, batch, len(reqs)))
        self.cost_log.write(costs)
        return results

    def _cost(self, req, kind, n_vision, n_text, n_new, kv_bytes, prefill_ms, rate, batch, rows) -> RequestCost:
        return RequestCost(
            task=str(req.task_name), doc_id=int(req.doc_id), kind=kind, n_vision=n_vision, n_text=n_text,
            n_generated=n_new, kv_bytes=int(kv_bytes), prefill_ms=round(prefill_ms, 3), decode_tokens_per_s=rate,
            batch=batch, rows=rows, **self.costs.analytic(n_vision, n_text),
        )  # fmt: skip

    def _refuse_non_finite(self, req: Instance, what: str, bad: int, total: int) -> None:
        """One line naming the model folder, the task and the cause, instead of a score computed from NaN."""
        with torch.no_grad():
            peaks = [float(torch.linalg.vector_norm(p, ord=float("inf"))) for p in self.model.parameters() if p.numel()]
        broken = sum(not math.isfinite(x) for x in peaks)
        weights = (f"{broken} of its weight tensors are non-finite" if broken
                   else f"its largest weight is {max(peaks, default=0.0):.3g}")  # fmt: skip
        raise UserError(f"{self.pretrained} gives non-finite {what} (NaN or inf) for {bad} of {total} requests of "
                        f"task {req.task_name} ({weights}); it was likely saved from a diverged "
                        f"run: evaluate an earlier checkpoint, or a float32 copy (dtype=float32) if it overflows only "
                        f"in half precision.")  # fmt: skip

    def _finish(self) -> None:
        """After each kind of request: every process has written its lines; the first sums them per task."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.rank == 0:
            summary = summarize(read_costs(self.cost_dir))
            (self.cost_dir / "summary.json").write_text(json.dumps(summary, indent=2))


class FiniteLogits:
    """Calls ``refuse(rows)`` when the prefill's next-token scores hold NaN or +inf in ``rows`` rows (a model whose
    forward overflows), before a token is chosen from them; -inf is left alone (processors such as
    ``min_new_tokens`` set it). Only the first call checks: one device sync per request batch."""

    def __init__(self, refuse: Any) -> None:
        self.refuse, self.checked = refuse, False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.checked:
            self.checked = True
            bad = int((torch.isnan(scores) | torch.isposinf(scores)).any(-1).sum())
            if bad:
                self.refuse(bad)
        return scores


class StopStrings:
    """Stops each row once its decoded answer contains a stop string. transformers' own ``stop_strings`` needs a
    tokenizer whose vocabulary it can take apart (word-level tokenizers fail); decoding works with any."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stops:
            texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
            done[:] = torch.tensor([any(stop in text for stop in self.stops) for text in texts])
        return done


def _process_group(accelerator: Accelerator) -> tuple[int, int]:
    """(rank, world size). Under ``accelerate launch`` on CPUs the Accelerator reports one process although the
    launcher started several (lmms-eval reads them from torch.distributed and the environment): so does this."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank = int(os.environ.get("RANK", accelerator.process_index))
    return rank, int(os.environ.get("WORLD_SIZE", accelerator.num_processes))


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


#: pmod 0.2's name of :class:`RoutedLMM`, kept for one release (it warns).
__getattr__ = renamed_attributes(__name__, {"PModLMM": "RoutedLMM"})
