"""The toy world's ``report.md``: the claims table, the ground-truth trade-off plot and the image grids."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datencoder_core.atomic import atomic_write_text
from training.toyworld.checks import CEILINGS
from training.toyworld.claims import Claim, Results, curve
from training.toyworld.truth import IDENTITY_CHANCE, METRICS

GRID_SCALE = 3  # 32 px images are drawn 3x larger
# The grids' columns where the evaluation has them: per-concept tuning for 300 steps without an encoder (the
# oracle's counterpart on the dual path), the encoder alone, the method, and scratch at the method's 12 steps.
GRID_VARIANTS = ("scratch:300", "encoder_only", "full", "scratch")


def _pm(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"


def _rounded(values: dict[str, float]) -> str:
    return json.dumps({k: round(v, 3) for k, v in values.items()})


def claims_table(claims: list[Claim]) -> str:
    rows = ["| # | claim | measure | method | comparison | difference | relative | paper | verdict |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in claims:
        base = np.mean(c.comparison_values)
        relative = f"{np.mean(c.differences) / base:+.0%}" if base else "n/a"
        rows.append(f"| {c.number} | {c.statement} | {c.measure} | {c.method}: {_pm(c.method_values)} | "
                    f"{c.comparison}: {_pm(c.comparison_values)} | {_pm(c.differences)} | {relative} | {c.paper} | "
                    f"**{c.verdict}** |")
    return "\n".join(rows)


def ceilings_table(checks: dict[str, float]) -> str:
    """Each of the world's ceilings (``checks.CEILINGS``) against its threshold."""
    rows = ["| ceiling | value | threshold | holds |", "|---|---|---|---|"]
    rows += [f"| {name} | {checks[name]:.3f} | {floor} | {'yes' if checks[name] >= floor else '**no**'} |"
             for name, floor in CEILINGS.items()]
    return "\n".join(rows)


def curve_table(results: Results, steps: tuple[int, ...]) -> str:
    """Identity (mean ± s.d. over seeds) against tuning steps, from the class word and from the encoder."""
    curves = {method: curve(results, method, steps) for method in ("scratch", "full")}
    rows = ["| tuning steps | " + " | ".join(str(n) for n in steps) + " |", "|---|" + "---|" * len(steps)]
    rows += [f"| {label} | " + " | ".join(_pm(curves[method][n]) for n in steps) + " |"
             for method, label in (("scratch", "scratch (class word, no encoder)"), ("full", "encoder start"))]
    return "\n".join(rows)


def variant_table(results: Results) -> str:
    rows = ["| encoder | variant | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for regularization, by_seed in results.items():
        for variant in next(iter(by_seed.values()))["variants"]:
            cells = [_pm([s["variants"][variant][m]["mean"] for s in by_seed.values()]) for m in METRICS]
            rows.append(f"| {regularization} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_tradeoff(results: Results, path: Path) -> None:
    """truth_identity against truth_editability per variant (mean and s.d. over seeds): the paper's Fig. 5
    with ground truth instead of CLIP/DINO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for regularization, by_seed in results.items():
        for variant in next(iter(by_seed.values()))["variants"]:
            x = [s["variants"][variant]["truth_identity"]["mean"] for s in by_seed.values()]
            y = [s["variants"][variant]["truth_editability"]["mean"] for s in by_seed.values()]
            ax.errorbar(np.mean(x), np.mean(y), xerr=np.std(x), yerr=np.std(y), fmt="o", capsize=3,
                        label=variant if regularization == "contrastive" else f"{variant} ({regularization} reg.)")
    ax.set_xlabel("identity (truth_identity: appearance probability)")
    ax.set_ylabel("editability (truth_editability: prompt context probability)")
    ax.set_title("toy world: identity vs editability (mean, s.d. over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def concept_grid(concept: Path, evaluation: Path, variants: list[str], path: Path) -> None:
    """One picture per concept: its input photo, then each variant's generations (a row per prompt)."""
    photo = Image.open(sorted(concept.glob("*.png"))[0]).convert("RGB")
    panels = [("input", photo)] + [(v, Image.open(evaluation / "grids" / concept.name / f"{v}.png").convert("RGB"))
                                   for v in variants]
    panels = [(label, im.resize((im.width * GRID_SCALE, im.height * GRID_SCALE), Image.NEAREST)) for label, im in panels]
    width = sum(im.width for _, im in panels) + 8 * len(panels)
    canvas = Image.new("RGB", (width, max(im.height for _, im in panels) + 16), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for label, im in panels:
        draw.text((x, 2), label, fill="black")
        canvas.paste(im, (x, 16))
        x += im.width + 8
    canvas.save(path)


def write_report(output: Path, world: Path, claims: list[Claim], results: Results, seconds: dict[str, float],
                 plan_text: str, curve_steps: tuple[int, ...]) -> Path:
    """``output/report.md`` with everything the module docstring lists; returns its path."""
    plot_tradeoff(results, output / "tradeoff_truth.png")
    evaluation = output / "evaluate" / f"contrastive-seed{min(results['contrastive'])}"
    variants = [v for v in GRID_VARIANTS if v in next(iter(results["contrastive"].values()))["variants"]]
    (output / "grids").mkdir(exist_ok=True)
    grids = []
    for concept in sorted(p for p in (world / "concepts").iterdir() if p.is_dir()):
        concept_grid(concept, evaluation, variants, output / "grids" / f"{concept.name}.png")
        grids.append(f"![{concept.name}](grids/{concept.name}.png)")
    build = json.loads((world / "build.json").read_text())
    notes = [f"- Claim {c.number}: {c.note}" for c in claims if c.note]
    text = f"""# The toy world: the paper's claims on a CPU

Written by `python -m training.toyworld` (README, "The toy world"). World: `{world}`.

## Ceilings: what the world lets any method reach (`checks.py`, from the world's build)

{ceilings_table(build['checks'])}

prompt_identity / named_*: the base model told the held-out appearance in words; oracle_*: per-concept tuning
from the class word without an encoder (sampled at alpha 1 for identity, on the dual path for editability);
v_star_alone_identity: textual inversion, the same tuning at its own learning rate with dW held at 0
(`checks.TEXTUAL_INVERSION`).

## Claims (mean ± s.d. over evaluation seeds {sorted(results['contrastive'])}; each seed's value is the mean over
{len(grids)} held-out concepts x 4 context prompts)

{claims_table(claims)}

{chr(10).join(notes)}

Identity against tuning steps (lr and alpha as `full`):

{curve_table(results, curve_steps)}

Verdict: **reproduces** = the difference has the claimed sign in every seed; **mixed** = only its mean does;
**no** = its mean has the other sign (or is zero). Seeds and thresholds were fixed before any result was seen.

## Every variant (ground-truth metrics, mean ± s.d. over seeds)

{variant_table(results)}

truth_identity: the ground-truth classifier's mean probability of the concept's body colour and stripe
colour (chance {IDENTITY_CHANCE:.3f}); truth_editability: its probability of the prompt's context (chance 0.25);
truth_shape: of the concept's shape (chance 0.17). CLIP/DINO in each `evaluate/*/metrics.json` come from
random tiny metric models (no real weights exist here) and carry no meaning.

Held-out accuracy per attribute of the ground-truth classifier on fresh degraded renders:
{_rounded(build['truth_accuracy'])}; of the world's vision tower (a linear head each on its pooled tokens,
`models.train_vision_tower`): {_rounded(build['vision_accuracy'])}.

What the world's own models do, before any encoder (`checks.py`): {_rounded(build['checks'])}. The
identity of the concept photos and of their VAE reconstructions; the probability of the prompted shape
and context on the base UNet's generations of "a photo of a {{shape}} {{context}}"; the identity of its
generations of each concept described in words, which no caption ever did ("a photo of a red circle with a
blue stripe {{context}}").

![trade-off](tradeoff_truth.png)

## Grids (seed {min(results['contrastive'])}: input photo, then {", ".join(variants)}, each with a row per prompt: snow, grass, beach, night)

{chr(10).join(grids)}

## Run

{plan_text}

Seconds: world build {json.dumps({k: round(v) for k, v in build['seconds'].items()})} (when it was built);
this run {json.dumps({k: round(v) for k, v in seconds.items()})}, on {platform.machine()} with
{os.cpu_count()} CPU cores (shared with other work while measured, so slower than idle).
"""
    atomic_write_text(output / "report.md", text)
    return output / "report.md"
