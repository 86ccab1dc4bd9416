"""Evaluation results: per-unit records in, ``metrics.json``, ``metrics.csv`` and ``tradeoff.png`` out.

A unit record (one concept x one variant) is a dict: ``concept``, ``kind``, ``variant``,
``personalization_s``, ``generation_s``, ``peak_gpu_bytes`` (None off CUDA), ``token`` and ``prompts``,
a list of {``template``, ``category``, ``text``, and one value per metric in ``METRICS``}.
Variant means come with 95% bootstrap confidence intervals over concepts (each resample draws concepts
with replacement and averages their per-concept means).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from datencoder_core.atomic import atomic_write, atomic_write_text

METRICS = ("dino", "clip_i_b32", "clip_t_b32", "clip_i_b16", "clip_t_b16")
TIMINGS = ("personalization_s", "generation_s", "peak_gpu_bytes")
BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 1000, 0
# DreamBench results as published (CLIP-I, CLIP-T, DINO), as collected by BLIP-Diffusion's Table 1, which
# follows DreamBooth's protocol with CLIP ViT-B-32; drawn on that backbone's panel.
PUBLISHED_BACKBONE = "b32"
PUBLISHED = {"DreamBooth (SD)": (0.803, 0.305, 0.668), "Textual Inversion": (0.780, 0.255, 0.569),
             "ELITE": (0.771, 0.293, 0.621), "BLIP-Diffusion (zero-shot)": (0.779, 0.300, 0.594),
             "IP-Adapter (SD1.5)": (0.813, 0.289, 0.667)}


def bootstrap_ci(values: list[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> list[float]:
    """The 2.5 and 97.5 percentiles of the mean of ``values`` resampled with replacement."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(samples, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def metric_names(records: list[dict]) -> tuple[str, ...]:
    """``METRICS`` plus any extra metric every prompt result has (a toy world's ``truth_*``)."""
    extra = set.intersection(*(set(p) for r in records for p in r["prompts"])) if records else set()
    return METRICS + tuple(sorted(k for k in extra if k.startswith("truth_")))


def concept_means(record: dict) -> dict[str, float]:
    return {m: float(np.mean([p[m] for p in record["prompts"]])) for m in metric_names([record])}


def summarize(records: list[dict], variants: list[str], settings: dict) -> dict:
    """The content of metrics.json: settings, per-variant means with CIs, per-concept results, published points."""
    by_variant: dict[str, dict] = {}
    concepts: dict[str, dict] = {}
    metrics = metric_names(records)
    for record in records:
        concepts.setdefault(record["concept"], {})[record["variant"]] = {
            **concept_means(record), **{t: record[t] for t in TIMINGS}, "kind": record["kind"],
            "token": record["token"], "prompts": record["prompts"]}
    for variant in variants:
        rows = [c[variant] for c in concepts.values() if variant in c]
        summary = {"concepts": len(rows)}
        for metric in metrics:
            values = [row[metric] for row in rows]
            summary[metric] = {"mean": float(np.mean(values)), "ci95": bootstrap_ci(values)}
        for timing in ("personalization_s", "generation_s"):
            summary[timing] = float(np.mean([row[timing] for row in rows]))
        peaks = [row["peak_gpu_bytes"] for row in rows if row["peak_gpu_bytes"] is not None]
        summary["peak_gpu_bytes"] = max(peaks) if peaks else None
        by_variant[variant] = summary
    published = {name: {f"clip_i_{PUBLISHED_BACKBONE}": i, f"clip_t_{PUBLISHED_BACKBONE}": t, "dino": d}
                 for name, (i, t, d) in PUBLISHED.items()}
    return {"settings": settings, "variants": by_variant, "concepts": concepts, "published": published}


def write_csv(summary: dict, path: Path) -> None:
    """One row per prompt, per concept and per variant (``level`` says which), every metric and timing."""
    metrics = tuple(m for m in next(iter(summary["variants"].values())) if m in METRICS or m.startswith("truth_"))
    header = ["level", "variant", "concept", "kind", "category", "template", *metrics, *TIMINGS]
    rows = []
    for variant, s in summary["variants"].items():
        rows.append({"level": "variant", "variant": variant, **{m: s[m]["mean"] for m in metrics},
                     **{t: s[t] for t in TIMINGS}})
    for concept, results in summary["concepts"].items():
        for variant, r in results.items():
            base = {"variant": variant, "concept": concept, "kind": r["kind"]}
            rows.append({"level": "concept", **base, **{k: r[k] for k in (*metrics, *TIMINGS)}})
            rows += [{"level": "prompt", **base, "category": p["category"], "template": p["template"],
                      **{m: p[m] for m in metrics}} for p in r["prompts"]]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(rows)


def write_metrics(summary: dict, folder: Path) -> None:
    atomic_write_text(folder / "metrics.json", json.dumps(summary, indent=2))
    write_csv(summary, folder / "metrics.csv")


def plot_tradeoff(summary: dict, path: Path) -> None:
    """CLIP-T against CLIP-I per variant (with 95% CIs), one panel per CLIP backbone, as in the paper's
    Fig. 5; the published points on the panel of their backbone, labelled with it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, backbone in zip(axes, ("b32", "b16")):
        i_key, t_key = f"clip_i_{backbone}", f"clip_t_{backbone}"
        for variant, s in summary["variants"].items():
            x, y = s[i_key]["mean"], s[t_key]["mean"]
            xerr = [[x - s[i_key]["ci95"][0]], [s[i_key]["ci95"][1] - x]]
            yerr = [[y - s[t_key]["ci95"][0]], [s[t_key]["ci95"][1] - y]]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=variant)
        if backbone == PUBLISHED_BACKBONE:
            for name, point in summary["published"].items():
                ax.scatter(point[i_key], point[t_key], marker="x", color="gray")
                ax.annotate(f"{name} (published, ViT-B-32)", (point[i_key], point[t_key]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3), color="gray")
        ax.set_xlabel(f"CLIP-I (ViT-B-{backbone[1:]})")
        ax.set_ylabel(f"CLIP-T (ViT-B-{backbone[1:]})")
        ax.set_title(f"identity vs prompt similarity, ViT-B-{backbone[1:]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
