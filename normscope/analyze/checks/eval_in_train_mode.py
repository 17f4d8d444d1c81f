"""eval-in-train-mode: evaluation forwards with Dropout/BatchNorm in train mode, and the reverse
(training steps with the model left in eval mode).

Reads the collector's mode audit (meta.json ``modes``, :mod:`normscope.collect.modes`): every
root forward is classified as *training* (grad enabled, not inference mode, and a backward reached
its output before the step ended) or *evaluation* (anything else), with the train/eval flags of
the model's Dropout (p > 0) and running-statistics BatchNorm layers at that moment."""

from __future__ import annotations

from normscope.analyze.context import Context
from normscope.analyze.finding import Finding
from normscope.analyze.registry import SkipCheck, Thresholds, register

ID = "eval-in-train-mode"

_HOW = {
    "no_grad": "under torch.no_grad()",
    "inference_mode": "under torch.inference_mode()",
    "no_backward": "with grad enabled, but their outputs never reached a backward (an evaluation without no_grad?)",
}


def _steps(e: dict) -> str:
    st = e.get("steps") or []
    more = " …" if e.get("last_step") not in st else ""
    return ", ".join(str(s) for s in st[:8]) + (" …" if len(st) > 8 else more)


def _layers(bn: int, drop: int) -> str:
    parts = []
    if drop:
        parts.append(f"{drop} Dropout layer(s) still dropped units")
    if bn:
        parts.append(f"{bn} BatchNorm layer(s) normalised with the batch's statistics and updated their running "
                     f"statistics on the evaluation data")  # fmt: skip
    return " and ".join(parts)


@register(
    id=ID, severity="warning",
    summary="Evaluation forwards (no_grad, inference mode, or never backpropagated) with Dropout/BatchNorm in train mode; and training steps with the model left in eval mode.",
    needs=("modes",),
    thresholds={"error_ratio": 1.0},
)  # fmt: skip
def check(ctx: Context, t: Thresholds) -> list[Finding]:
    modes = ctx.meta["modes"]
    if not modes.get("batchnorm") and not modes.get("dropout"):
        raise SkipCheck(
            "the model has no Dropout (p > 0) and no BatchNorm with running statistics: its mode changes nothing"
        )
    events = modes.get("events") or {}
    totals = modes.get("forwards") or {}
    out = []
    evals = {k.split(":", 1)[1]: e for k, e in events.items() if k.startswith(ID + ":")}
    if evals:
        n = sum(e["forwards"] for e in evals.values())
        train_n = int(totals.get("train", 0))
        fed = list(modes.get("metrics_fed") or [])
        loud = bool(fed) or n > t.error_ratio * train_n
        bn = max(e["bn_train"] for e in evals.values())
        drop = max(e["dropout_train"] for e in evals.values())
        first = min(e["first_step"] for e in evals.values())
        last = max(e["last_step"] for e in evals.values())
        how = "; ".join(f"{e['forwards']} {_HOW.get(k, k)} (steps {_steps(e)})" for k, e in evals.items())
        msg = f"{n} evaluation forward(s) ran with the model in train mode — {how}: its {_layers(bn, drop)}."
        if fed:
            msg += f" The reported eval metric(s) {', '.join(repr(m) for m in fed)} came from these forwards, so they are noisy and biased."
        elif n > t.error_ratio * train_n:
            msg += f" They outnumber the {train_n} training forward(s)."
        out.append(Finding(
            ID, "error" if loud else "warning", None, (first, last), msg,
            {"cause": "eval-in-train-mode", "forwards": n, "training_forwards": train_n, "metrics_fed": fed,
             "by_kind": {k: dict(e) for k, e in evals.items()}, "batchnorm_in_train": bn, "dropout_in_train": drop,
             "score": float(n)},
            "Call model.eval() before evaluating and model.train() after it (e.g. `model.eval(); with "
            "torch.inference_mode(): ...; model.train()`): at test time BatchNorm must use its population (running) "
            "statistics and must not update them (Ioffe & Szegedy 2015, §3.1), and dropout must be off "
            "(Srivastava et al. 2014). torch.no_grad() alone changes neither.",
        ))  # fmt: skip
    rev = events.get("train-in-eval-mode")
    if rev:
        bn, drop = rev["bn_eval"], rev["dropout_eval"]
        parts = []
        if bn:
            parts.append(f"its {bn} BatchNorm layer(s) normalised with their running statistics and never updated them")
        if drop:
            parts.append(f"its {drop} Dropout layer(s) were off")
        out.append(Finding(
            ID, "warning", None, (rev["first_step"], rev["last_step"]),
            f"{rev['forwards']} training forward(s) (their outputs reached a backward) ran with the model in eval "
            f"mode (steps {_steps(rev)}): {' and '.join(parts)} — a model.eval() that was never undone.",
            {"cause": "train-in-eval-mode", "forwards": rev["forwards"], "training_forwards": int(totals.get("train", 0)),
             "batchnorm_in_eval": bn, "dropout_in_eval": drop, "steps": rev.get("steps"), "score": float(rev["forwards"])},
            "Call model.train() before training again after every evaluation (at the start of each epoch or step). "
            "To freeze BatchNorm on purpose while the rest trains, switch only those layers to eval after "
            "model.train() (see frozen-bn-drift).",
        ))  # fmt: skip
    return out
