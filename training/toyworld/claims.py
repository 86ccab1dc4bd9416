"""The paper's four claims (Sec. 5.2, 5.4; Fig. 4, 5b) measured on the toy world's evaluations.

Input: ``{regularization: {seed: metrics.json content}}`` (``experiment.run``) and each concept's class
word. Every claim compares a method value with a comparison value per seed (each the mean over the
held-out concepts), and is reported as mean and standard deviation over the seeds of both and of their
difference. A claim ``reproduces`` when the difference has the claimed sign in every seed; ``mixed``
when only its mean does; otherwise ``no``. Nothing here is tuned to make a claim pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Results = dict[str, dict[int, dict]]


@dataclass(frozen=True)
class Claim:
    number: str
    statement: str
    measure: str
    method: str  # what the method value is
    comparison: str
    paper: str
    method_values: tuple[float, ...]  # per seed
    comparison_values: tuple[float, ...]
    note: str = ""

    @property
    def differences(self) -> np.ndarray:
        return np.asarray(self.method_values) - np.asarray(self.comparison_values)

    @property
    def verdict(self) -> str:
        d = self.differences
        if (d > 0).all():
            return "reproduces"
        return "mixed" if d.mean() > 0 else "no"


def _metric(results: Results, regularization: str, variant: str, metric: str) -> tuple[float, ...]:
    return tuple(s["variants"][variant][metric]["mean"] for _, s in sorted(results[regularization].items()))


def shape_word_share(summary: dict, class_words: dict[str, str], variant: str = "full") -> float:
    """The share of concepts whose v* (after ``variant``) has its nearest vocabulary word = the concept's shape."""
    hits = [r[variant]["token"].removesuffix("</w>") == class_words[name] for name, r in summary["concepts"].items()]
    return float(np.mean(hits))


def catch_up_steps(results: Results, scratch_steps: tuple[int, ...]) -> tuple[dict[int, float], float, int | None]:
    """Claim 4: scratch identity per step count (12 is ``scratch``), the method's, and the first count where
    scratch's mean over seeds reaches the method's (None: not within the counts run)."""
    full = float(np.mean(_metric(results, "contrastive", "full", "truth_identity")))
    curve = {12: float(np.mean(_metric(results, "contrastive", "scratch", "truth_identity")))}
    curve |= {n: float(np.mean(_metric(results, "contrastive", f"scratch:{n}", "truth_identity")))
              for n in scratch_steps}
    reached = [n for n in sorted(curve) if curve[n] >= full]
    return curve, full, reached[0] if reached else None


def measure_claims(results: Results, class_words: dict[str, str], scratch_steps: tuple[int, ...]) -> list[Claim]:
    seeds = sorted(results["contrastive"])
    curve, _, caught = catch_up_steps(results, scratch_steps)
    longest = max(curve)
    return [
        Claim("1", "Encoder + 12 tuning steps beats encoder only in identity", "truth_identity",
              "full (encoder + 12 steps)", "encoder_only (0 steps)", "~20% lower object similarity without tuning",
              _metric(results, "contrastive", "full", "truth_identity"),
              _metric(results, "contrastive", "encoder_only", "truth_identity")),
        Claim("2", "Dual path during tuning keeps editability", "truth_editability",
              "full (dual path, alpha 0.25)", "no_dual_path (alpha 1)", "~30% worse prompt alignment without it",
              _metric(results, "contrastive", "full", "truth_editability"),
              _metric(results, "contrastive", "no_dual_path", "truth_editability")),
        Claim("3a", "Contrastive regularization gives more editable concepts than none", "truth_editability",
              "full, encoder pretrained with Eq. 3", "full, encoder pretrained without", "Fig. 4: more editable",
              _metric(results, "contrastive", "full", "truth_editability"),
              _metric(results, "none", "full", "truth_editability")),
        Claim("3b", "With it, v*'s nearest word names the concept's shape more often", "share of concepts",
              "full, encoder pretrained with Eq. 3", "full, encoder pretrained without", "Fig. 4: semantic neighbours",
              tuple(shape_word_share(results["contrastive"][s], class_words) for s in seeds),
              tuple(shape_word_share(results["none"][s], class_words) for s in seeds)),
        Claim("4", "12 steps from the encoder reach an identity scratch tuning needs many more steps for",
              "truth_identity", "full (encoder + 12 steps)", f"scratch, {longest} steps (no encoder)",
              "encoder + few steps >= scratch with many",
              _metric(results, "contrastive", "full", "truth_identity"),
              _metric(results, "contrastive", f"scratch:{longest}", "truth_identity"),
              note=("scratch identity by steps (mean over seeds): "
                    + ", ".join(f"{n}: {v:.3f}" for n, v in sorted(curve.items()))
                    + (f"; scratch reaches the method at {caught} steps" if caught
                       else f"; scratch does not reach the method within {longest} steps"))),
    ]
