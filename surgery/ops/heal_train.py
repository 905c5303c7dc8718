"""The training behind `heal`: an edited model (the student) trained toward the model it came from (the
teacher) on text, by KL divergence between their next-token distributions or by the plain LM loss.
Dropout stays off (the model trains in eval mode), so a run is a function of its seed.

Teacher and student are never in memory together: the teacher runs first over every window and keeps
its top-k log-probabilities per token (and the log-probability of the rest of the vocabulary, so the
loss is the exact KL between the two distributions coarsened to k + 1 outcomes; the full KL when k
reaches the vocabulary), then it is freed and the student loads. AdamW, linear warm-up then cosine to
0, gradients clipped to norm 1. A checkpoint (trained tensors and AdamW's moments, safetensors) is kept
every `checkpoint_every` steps, so an interrupted run continues from it with --resume, to the same
numbers an uninterrupted run gives.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import Interrupted, SurgeryError
from surgery.ops.fit_memo import save_fit_tensors

TEACHER_FILE = "teacher.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclass(frozen=True)
class Schedule:
    """How the student trains: AdamW at `lr` (warm-up, then cosine to 0), `steps` batches of `batch_size`
    windows of `window` tokens, the loss, the teacher's kept top-k, the seed."""

    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float
    batch_size: int
    window: int
    loss: str
    top_k: int
    seed: int
    checkpoint_every: int
    eval_every: int
    gradient_checkpointing: bool

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay = self.steps - self.warmup_steps
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / max(decay, 1)))


@dataclass
class Student:
    """The edited model as a module, what trains in it by name, and the adapters merged at the end:
    stored weight name -> (its frozen weight, wherever a memory cap keeps it; B, A, scale), weight + scale
    B A in its stored layout."""

    model: Any
    trainable: dict[str, Any]
    adapters: dict[str, tuple[Any, Any, Any, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Windows:
    """Token windows to train on and the held-out ones scored beside them (never trained on)."""

    train: Any  # (N, window) int64
    held_out: Any  # (M, window) int64


def cut_windows(token_lists: list[list[int]], window: int, held_out: float, names: list[str]) -> Windows:
    """Each text's tokens cut into windows; the last `held_out` share of each text's windows (at least one)
    is held out, so held-out text never overlaps what trains."""
    import torch

    train, held = [], []
    for ids, name in zip(token_lists, names):
        count = len(ids) // window
        if count < 2:
            raise SurgeryError(f"heal: {name} has {len(ids)} tokens, fewer than two windows of {window} (one to train "
                               "on, one held out); give more text or a smaller window")
        rows = torch.tensor(ids[: count * window]).view(count, window)
        kept = max(1, round(count * held_out))
        if kept >= count:
            raise SurgeryError(f"heal: held_out {held_out} holds out all {count} windows of {name}, leaving none to "
                               "train on; give a smaller held_out or more text")
        train.append(rows[: count - kept])
        held.append(rows[count - kept:])
    return Windows(torch.cat(train), torch.cat(held))


def teacher_targets(model: Any, windows: Any, top_k: int, batch_size: int, device: str) -> dict[str, Any]:
    """Per window and position: the teacher's top-k log-probabilities and their token ids, the log-probability
    of every other token together (-inf when k covers the vocabulary), and each window's summed NLL."""
    import torch

    tops, ids, rests, nlls = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
            k = min(top_k, logp.shape[-1])
            top, index = logp.topk(k, dim=-1)
            tops.append(top.cpu())
            ids.append(index.to(torch.int32).cpu())
            rests.append(_rest(logp, index).cpu())
            nlls.append(-logp.gather(-1, batch[:, 1:, None]).squeeze(-1).sum(-1).cpu())
    return {"top": torch.cat(tops), "index": torch.cat(ids), "rest": torch.cat(rests), "nll": torch.cat(nlls)}


def _rest(logp: Any, index: Any) -> Any:
    """log of the probability of every token outside `index` (exactly -inf when there is none)."""
    import torch

    if index.shape[-1] == logp.shape[-1]:
        return torch.full(logp.shape[:-1], -math.inf, dtype=logp.dtype, device=logp.device)
    return logp.scatter(-1, index, -math.inf).logsumexp(-1)


def distillation_kl(logits: Any, targets: dict[str, Any]) -> Any:
    """Per position: KL(teacher || student) over the teacher's top-k tokens and the rest of the vocabulary."""
    import torch

    logq = torch.log_softmax(logits.float(), dim=-1)
    index = targets["index"].long()
    p_top, p_rest = targets["top"].exp(), targets["rest"].exp()
    kl = (p_top * (targets["top"] - logq.gather(-1, index))).sum(-1)
    if index.shape[-1] < logq.shape[-1]:
        kl = kl + torch.special.xlogy(p_rest, p_rest) - p_rest * _rest(logq, index)
    return kl


def language_model_nll(logits: Any, batch: Any) -> Any:
    """Per position: -log q(next token)."""
    import torch

    logq = torch.log_softmax(logits.float(), dim=-1)
    return -logq.gather(-1, batch[:, 1:, None]).squeeze(-1)


def held_out_scores(model: Any, windows: Any, targets: dict[str, Any], batch_size: int, device: str) -> dict[str, float]:
    """The student's mean KL to the teacher and perplexity on the held-out windows."""
    import torch

    kl_sum, nll_sum, count = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            part = {k: v[start:start + batch_size].to(device) for k, v in targets.items() if k != "nll"}
            kl_sum += float(distillation_kl(logits, part).sum())
            nll_sum += float(language_model_nll(logits, batch).sum())
            count += batch[:, 1:].numel()
    return {"kl": kl_sum / count, "perplexity": math.exp(nll_sum / count)}


def batch_order(train_windows: int, schedule: Schedule) -> Any:
    """The windows of every step, fixed by the seed before training: shuffled epochs, one after another."""
    import torch

    generator = torch.Generator().manual_seed(schedule.seed)
    needed = schedule.steps * schedule.batch_size
    epochs = [torch.randperm(train_windows, generator=generator) for _ in range(math.ceil(needed / train_windows))]
    return torch.cat(epochs)[:needed].view(schedule.steps, schedule.batch_size)


def train(student: Student, windows: Windows, targets: dict[str, Any], held_targets: dict[str, Any],
          schedule: Schedule, device: str, folder: Path, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Train the student's trainable tensors in place; returns the history (held-out scores before, during
    and after, the loss at each log point) for surgery.json."""
    import torch

    model = student.model
    params = list(student.trainable.values())
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    order = batch_order(len(windows.train), schedule)
    checkpoint = folder / CHECKPOINT_FILE
    history: dict[str, Any] = {"loss": [], "held_out": []}
    first = 0
    if checkpoint.is_file() and resume:
        first, history = _load_checkpoint(checkpoint, student, optimizer)
        log(f"heal: continuing from the checkpoint of step {first} ({checkpoint})")
    elif checkpoint.is_file():
        log(f"heal: a checkpoint of an interrupted run was in {folder}; starting over without it (--resume would "
            "have continued it)")
        checkpoint.unlink()
    checkpointing = schedule.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    if checkpointing:
        checkpoint_layers(model)
    if first == 0:
        scores = held_out_scores(model, windows.held_out, held_targets, schedule.batch_size, device)
        history["held_out"].append({"step": 0, **scores})
        log(f"heal: before training, held-out KL {scores['kl']:.4f}, perplexity {scores['perplexity']:.2f}")
    done = saved = first
    started = time.perf_counter()
    try:
        for step in range(first, schedule.steps):
            batch_index = order[step]
            batch = windows.train[batch_index].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            if schedule.loss == "kl":
                loss = distillation_kl(logits, {k: v[batch_index].to(device) for k, v in targets.items()
                                                if k != "nll"}).mean()
            else:
                loss = language_model_nll(logits, batch).mean()
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            done = step + 1
            if done % schedule.eval_every == 0 or done == schedule.steps:
                history["loss"].append({"step": done, "loss": loss.item()})
                scores = held_out_scores(model, windows.held_out, held_targets, schedule.batch_size, device)
                history["held_out"].append({"step": done, **scores})
                rate = (done - first) * batch.numel() / (time.perf_counter() - started)
                log(f"heal: step {done}/{schedule.steps} {schedule.loss} loss {loss.item():.4f}, held-out KL "
                    f"{scores['kl']:.4f}, perplexity {scores['perplexity']:.2f} ({rate:,.0f} tokens/s)")
            if done % schedule.checkpoint_every == 0 and done < schedule.steps:
                _save_checkpoint(checkpoint, done, history, student, optimizer)
                saved = done
    except KeyboardInterrupt:
        where = f"the checkpoint of step {saved} is kept in {folder}" if saved else "no checkpoint was reached yet"
        raise Interrupted(f"heal: interrupted at step {done} of {schedule.steps}; {where}: run the same command with "
                          "--resume to continue") from None
    if checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.eval()
    return history


def checkpoint_layers(model: Any) -> None:
    """transformers' gradient checkpointing with dropout still off: the model stays in eval mode (so the
    training is deterministic and the student matches the teacher as it will run), and only the layers
    that checkpoint are flagged training, which is what their checkpointing asks (not their submodules)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def _save_checkpoint(path: Path, step: int, history: dict[str, Any], student: Student, optimizer: Any) -> None:
    """The trained tensors and AdamW's moments at `step`, written whole then renamed (never half a checkpoint)."""
    tensors = {}
    for name, param in student.trainable.items():
        state = optimizer.state.get(param, {})
        tensors[f"param/{name}"] = param.detach().cpu().contiguous()
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                tensors[f"{moment}/{name}"] = state[moment].detach().cpu().contiguous()
    save_fit_tensors(path, tensors, {"step": str(step), "history": json.dumps(history)},
                     "heal: cannot write its checkpoint", "the trained tensors")


def _load_checkpoint(path: Path, student: Student, optimizer: Any) -> tuple[int, dict[str, Any]]:
    import torch
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            step, history = int(f.metadata()["step"]), json.loads(f.metadata()["history"])
            with torch.no_grad():
                for name, param in student.trainable.items():
                    param.copy_(f.get_tensor(f"param/{name}"))
                    if f"exp_avg/{name}" in f.keys():
                        optimizer.state[param] = {
                            "step": torch.tensor(float(step)),
                            "exp_avg": f.get_tensor(f"exp_avg/{name}").to(param.device),
                            "exp_avg_sq": f.get_tensor(f"exp_avg_sq/{name}").to(param.device)}
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise SurgeryError(f"heal: the checkpoint {path} cannot be read ({e}); delete it to start over") from None
    return step, history
