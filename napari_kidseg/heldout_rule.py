"""The held-out rule of one fine-tune stage (:mod:`finetuning`): train in steps, score the held-out
slabs and the guard phantoms every ``EVAL_EVERY`` steps, keep the best step, quarter the learning
rate from the best step at each plateau (``PATIENCE`` checks without a gain of ``MIN_GAIN``), stop
after ``LR_DROPS`` drops, at the step budget or once the time budget of training steps is spent
(:class:`StepClock`). A step losing more than ``FORGET_TOLERANCE`` Dice on the guard phantoms is
never the best, and neither is one whose whole cascade calls more false kidney than the parent's
beyond :func:`false_kidney_limit` (``false_kidney``: on kidney-free real scans and on the corrected
cases farther than ``FALSE_KIDNEY_MM`` from their kidneys, :mod:`finetuning`): on the real proxy a
child that gained 0.18 held-out Dice on its corrected case called 142 mL of another scan kidney.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from .errors import KidsegError

EVAL_EVERY = 10  # steps between held-out scores
PATIENCE = 3  # held-out scores without a gain before the learning rate drops
LR_DROPS = 2  # drops (each to a quarter, from the best step) before the rule stops
MIN_GAIN = 0.002  # a held-out Dice gain smaller than this is no gain
FORGET_TOLERANCE = 0.02  # a step losing more held-out phantom Dice than this is never the best
FALSE_KIDNEY_MM = 10.0  # kidney called farther than this from a corrected case's kidneys is false
FALSE_KIDNEY_ML = 2.0  # a child may add this much false kidney (mL) to its parent's ...
FALSE_KIDNEY_SHARE = 0.25  # ... or this share of the parent's, whichever is more


def false_kidney_limit(parent_ml: float) -> float:
    """The most false kidney (mL, all the guard's scans together) a child may call, its parent
    having called ``parent_ml``."""
    return parent_ml + max(FALSE_KIDNEY_ML, FALSE_KIDNEY_SHARE * parent_ml)


class StepClock:
    """A fine-tune stage's training time, counted from its steps alone: the time budget and the
    time left (CLI and widget show the same text) come from here, so scoring the held-out slabs
    and guard phantoms, loading and the parents' runs never spend the budget (under load they
    once spent all of it before the first step) and never pose as slow steps."""

    def __init__(self, max_minutes=None, clock=time.perf_counter):
        self.budget_s = max_minutes * 60 if max_minutes else None
        self.steps: list[float] = []
        self._clock = clock
        self._mark = clock()

    def resume(self):
        """After scoring: the time from now on is a step's again."""
        self._mark = self._clock()

    def step(self):
        now = self._clock()
        self.steps.append(now - self._mark)
        self._mark = now

    @property
    def trained_s(self) -> float:
        return float(sum(self.steps))

    def spent(self) -> bool:
        return self.budget_s is not None and self.trained_s >= self.budget_s

    def seconds_left(self, done: int, total: int) -> float | None:
        """Training seconds until ``total`` steps at the median pace (the first step, which starts
        the data loader, left out) or until the budget is spent; None before two steps."""
        if len(self.steps) < 2:
            return None
        left = float(np.median(self.steps[1:])) * max(total - done, 0)
        return min(left, max(self.budget_s - self.trained_s, 0.0)) if self.budget_s is not None else left

    def says(self, done: int, total: int) -> str:
        left = self.seconds_left(done, total)
        return "timing the steps" if left is None else f"about {left / 60:.1f} min of training left"


def _heldout_model(parent, cfg, s, device):
    """The parent loaded to train: BatchNorm at ``bn_momentum``, the parameters the optimiser moves."""
    import torch

    from .models import load_checkpoint
    from .training import TrainSettings, _trainable

    model, _ = load_checkpoint(parent, stage=cfg.stage, device=device)
    model.train()
    if s.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = s.bn_momentum
    return model, _trainable(model, TrainSettings(freeze_encoder=s.freeze_encoder))


def _heldout_loader(train_cases, replay, cfg, s):
    """Batches of the trained slabs with their lessons, half of each batch replayed phantoms."""
    import torch
    from torch.utils.data import DataLoader, WeightedRandomSampler

    from .training import Augment, SegmentationSamples

    train_set = SegmentationSamples(train_cases + replay, cfg, Augment(), seed=0, lessons=True)
    corrected = np.array([ci < len(train_cases) for ci, *_ in train_set.items])
    weights = train_set.weights.copy()
    if corrected.any() and (~corrected).any():  # half of every batch the corrections, half replay
        weights[corrected] *= 0.5 / weights[corrected].sum()
        weights[~corrected] *= 0.5 / weights[~corrected].sum()
    sampler = WeightedRandomSampler(weights, s.max_steps * s.batch_size, generator=torch.Generator().manual_seed(7919))
    return DataLoader(train_set, batch_size=s.batch_size, sampler=sampler, num_workers=0, drop_last=True)


def _scorer(model, cfg, cases, cap, device, kidney_only=False):
    """A function scoring ``model`` on ``cases`` (at most ``cap`` samples), or None when there is
    nothing to score (no cases, or refine patches of slabs that hold no kidney)."""
    from torch.utils.data import DataLoader, Subset

    from .training import DiceCounter, SegmentationSamples, evaluate_samples, validation_indices

    try:
        samples = SegmentationSamples(cases, cfg, None) if cases else None
    except KidsegError:
        return None
    if samples is None:
        return None
    # the inputs are cut and resized once: a score comes every EVAL_EVERY steps on the same samples,
    # and remaking them each time was a third of a check's time
    batches = list(DataLoader(Subset(samples, validation_indices(len(samples), cap)), batch_size=16))

    def score():
        counter = DiceCounter()
        s = evaluate_samples(model, batches, device, cfg.classes, counter)  # organ answers are not kidney
        # no tumor in the reference: kidney+tumor alone (a tumor Dice of 0 or 1 would swamp it); the
        # guard phantoms' sampled tumor Dice swings by 0.05 between two steps, their kidney+tumor hardly
        return s["mean_dice"] if counter.n[1][2] and not kidney_only else s["kidney_tumor_dice"]

    return score


def train_until_heldout_stops(
    cfg, parent, train_cases, heldout_cases, replay, guard, out, s, *, progress, cancel, log, false_kidney=None
):
    """The held-out rule (module docstring) on ``train_cases`` as settings ``s`` say: train in
    steps, score the held-out slabs (the trained ones where nothing is held out) and the guard
    phantoms every ``EVAL_EVERY`` steps, keep the best step, quarter the learning rate from the
    best step at each plateau, stop after ``LR_DROPS`` drops or at a budget (of training steps:
    :class:`StepClock`). ``false_kidney``: a function of the model in training giving the mL of
    false kidney its cascade calls on the guard's scans; a step that would be the best is measured
    and refused above :func:`false_kidney_limit` (and an unchecked run's last step falls back to
    the parent). Writes the best step's weights to ``out`` (the parent's own when no step beat
    it); nothing on Cancel."""
    import torch

    from .errors import Cancelled
    from .models import pick_device, save_checkpoint
    from .training import dice_ce_loss

    device = pick_device(s.device)
    torch.manual_seed(0)
    model, params = _heldout_model(parent, cfg, s, device)
    loader = _heldout_loader(train_cases, replay, cfg, s)
    t_start = time.time()
    held_score, on_trained = _scorer(model, cfg, heldout_cases, 128, device), False
    if held_score is None:  # one reviewed slice: nothing to hold out, its own fit decides (with the guard)
        held_score = _scorer(model, cfg, train_cases, 128, device)
        on_trained = held_score is not None
    guard_score = _scorer(model, cfg, guard, 48, device, kidney_only=True)
    snapshot = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
    parent_guard = guard_score() if guard_score else None
    parent_fk = false_kidney(model) if false_kidney else None
    best = {"score": held_score() if held_score else float("nan"), "step": 0, "lr": s.lr, "phantoms": parent_guard}
    best["false_kidney_ml"], refused = parent_fk, []
    parent_score, best_state = best["score"], snapshot()
    history = [{"step": 0, "heldout": best["score"], "phantoms": parent_guard, "lr": s.lr}]
    history[0]["false_kidney_ml"] = parent_fk
    opt = torch.optim.Adam(params, lr=s.lr)
    cur_lr, drops, stale, step, reason = s.lr, 0, 0, 0, None
    batches, clock = iter(loader), StepClock(s.max_minutes)
    while reason is None:
        if step >= s.max_steps:
            reason = "steps"
        elif clock.spent():
            reason = "minutes"
        elif cancel is not None and cancel():
            raise Cancelled("fine-tune cancelled; the parent models are kept")
        if reason:
            break
        try:
            x, y, lesson = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        x, y, lesson = x.to(device), y.to(device), lesson.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext():
            logits = model(x)
        loss = dice_ce_loss(logits.float(), y, cfg.classes, voxel_weight=1.0 + s.lesson_weight * lesson)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock.step()
        step += 1
        if progress:
            progress(step, s.max_steps, f"step {step}/{s.max_steps}, {clock.says(step, s.max_steps)}")
        if held_score is None or step % EVAL_EVERY:
            continue
        h, g = held_score(), guard_score() if guard_score else None
        clock.resume()
        forgot = g is not None and g < parent_guard - FORGET_TOLERANCE
        history.append({"step": step, "heldout": h, "phantoms": g, "lr": cur_lr})
        fk = None
        if h > best["score"] + MIN_GAIN and not forgot and false_kidney:  # measured only where it matters
            fk = history[-1]["false_kidney_ml"] = false_kidney(model)
            clock.resume()
            if fk > false_kidney_limit(parent_fk):
                refused.append(step)
                log(f"step {step}: held-out Dice {h:.3f}, but false kidney {parent_fk:.1f} -> {fk:.1f} mL: not kept")
        if h > best["score"] + MIN_GAIN and not forgot and step not in refused:
            best = {"score": h, "step": step, "lr": cur_lr, "phantoms": g, "false_kidney_ml": fk}
            best_state, stale = snapshot(), 0
        else:
            stale += 1
        if stale >= PATIENCE:
            if drops >= LR_DROPS:
                reason = "plateau"
                break
            model.load_state_dict(best_state)
            cur_lr, drops, stale = cur_lr / 4, drops + 1, 0
            opt = torch.optim.Adam(params, lr=cur_lr)
            log(
                f"held-out Dice {best['score']:.3f} not beaten in {PATIENCE} checks: "
                f"back to step {best['step']}, lr {cur_lr:g}"
            )
    if held_score is None and step:  # unchecked: the last step is the child, unless it adds false kidney
        fk = false_kidney(model) if false_kidney else None
        if fk is not None and fk > false_kidney_limit(parent_fk):
            refused.append(step)
        else:
            best_state, best["false_kidney_ml"] = snapshot(), fk
    model.load_state_dict(best_state)
    save_checkpoint(out, model.cpu(), cfg)
    stopped = _stopped(reason, s, step, best, history, parent_score, parent_guard, held_score is not None, on_trained)
    stopped.update(_false_kidney_words(stopped, parent_fk, best, refused, held_score is not None))
    return {"seconds": time.time() - t_start, "training_seconds": clock.trained_s, "stopped": stopped}


def _false_kidney_words(stopped, parent_fk, best, refused, checked) -> dict:
    """The false-kidney guard's part of ``report["stopped"]``: its figures, and its verdict in ``why``."""
    if parent_fk is None:
        return {"false_kidney_parent_ml": None, "false_kidney_best_ml": None, "false_kidney_refused": []}
    why = stopped["why"]
    if refused and not checked:
        why += f"; the trained step called more false kidney than {false_kidney_limit(parent_fk):.1f} mL: parent kept"
    elif refused:
        why += (
            f"; {len(refused)} step(s) that beat it called more false kidney than "
            f"{false_kidney_limit(parent_fk):.1f} mL (parent {parent_fk:.1f}): not kept (first: step {refused[0]})"
        )
    if best["false_kidney_ml"] is not None and best["step"]:
        why += f", false kidney {parent_fk:.1f} -> {best['false_kidney_ml']:.1f} mL"
    return {
        "why": why,
        **({"best_step": 0} if refused and not checked else {}),
        "false_kidney_parent_ml": parent_fk,
        "false_kidney_best_ml": best["false_kidney_ml"] if best["step"] else parent_fk,
        "false_kidney_refused": refused,
    }


def _stopped(reason, s, step, best, history, parent_score, parent_guard, checked, on_trained) -> dict:
    """``report["stopped"]`` of one stage: where the held-out rule stopped and why, in words."""
    why = {
        "plateau": f"held-out Dice stopped improving ({LR_DROPS} learning-rate drops gained nothing more)",
        "steps": f"the step budget ({s.max_steps}) ran out",
        "minutes": f"the time budget ({s.max_minutes or 0:g} min of training steps) ran out",
    }[reason]
    if not checked:
        why = (
            f"nothing could be scored (no kidney in the trained slices?): trained {step} steps at lr {s.lr:g} unchecked"
        )
        best["step"] = step
    elif best["step"] == 0:
        why += f"; no step beat the parent's held-out Dice {parent_score:.3f}: the child keeps the parent's weights"
    else:
        why += f"; kept step {best['step']} of {step} (lr {best['lr']:g}): held-out Dice "
        why += f"{parent_score:.3f} -> {best['score']:.3f}"
    if on_trained:
        why = why.replace("held-out Dice", "Dice of the trained slices")
        why += " (nothing could be held out, one reviewed slice?: scored on training data)"
    if parent_guard is not None:
        why += f", held-out phantoms {parent_guard:.3f} -> {best['phantoms']:.3f}"
    return {
        "why": why,
        "reason": reason if checked else "unchecked",
        "checked_on": "trained slices" if on_trained else "held-out slabs and cases",
        "best_step": best["step"],
        "steps": step,
        "lr_start": s.lr,
        "lr_at_best": best["lr"],
        "heldout_parent": parent_score,
        "heldout_best": best["score"],
        "phantoms_parent": parent_guard,
        "phantoms_at_best": best["phantoms"],
        "history": history,
    }
