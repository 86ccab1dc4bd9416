"""The main job: run an example workflow's API twin headlessly in the real ComfyUI.

    python -m training.demo                          # the demo model set (random weights, made once)
    python -m training.demo --models ~/ComfyUI/models [--image my_dog.jpg]

With ``--models``, on your files, under the names the workflows use: with only
``checkpoints/v1-5-pruned-emaonly.safetensors`` it runs ``workflows/api/personalize_without_encoder.json``
(Personalize Concept (no encoder), 200 tuning steps); with also
``clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors`` and ``datencoder/datencoder_sd15.safetensors``,
``workflows/api/personalize_and_generate.json`` (the encoder, then 12 steps). Without ``--models``, on the
demo model set (``training/headless/demo_models.py``): ``personalize_and_generate.json``, then the
encoder-free workflow (12 tuning steps instead of 200: the weights are random), both in the report. The
photo defaults to scikit-image's Chelsea the cat.

Writes to ``--output`` (default ``output/demo/``, replaced on each run; a folder that is neither empty nor
a previous demo output is refused, never deleted): the images, ``report.json`` (the workflow run, its
nearest word, personalization seconds, tuning losses, peak memory; on the demo set the encoder-free run
under ``without_encoder``), and ``comfyui/``, the ComfyUI
base directory of the run (its log in ``comfyui/comfyui.log``, the saved concept in
``comfyui/models/datencoder_concepts/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from PIL import Image

from training.headless import demo_models
from training.headless.comfyui import REPO, ComfyUIServer, WorkflowError

WORKFLOW = REPO / "workflows" / "api" / "personalize_and_generate.json"
WORKFLOW_WITHOUT_ENCODER = REPO / "workflows" / "api" / "personalize_without_encoder.json"
PERSONALIZE_NODES = ("DATEncoderPersonalize", "DATEncoderPersonalizeFromWord")
# (node type, input) -> (model folder or None, the demo set's value)
DEMO_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"): ("checkpoints", demo_models.CHECKPOINT),
               ("CLIPVisionLoader", "clip_name"): ("clip_vision", demo_models.CLIP_VISION),
               ("DATEncoderLoader", "encoder_name"): ("datencoder", demo_models.ENCODER),
               ("KSampler", "steps"): (None, 4),
               ("DATEncoderPersonalizeFromWord", "steps"): (None, 12)}
PHOTO = "concept_photo.png"  # the LoadImage input of the workflow
MARKER = ".datencoder-demo"  # written first into every demo output: only folders holding it are replaced
logger = logging.getLogger("datencoder.demo")


def model_files(prompt: dict) -> dict[str, str]:
    """The model file each loader of the workflow names, by ComfyUI folder."""
    return {folder: node["inputs"][name] for node in prompt.values()
            for (class_type, name), (folder, _) in DEMO_INPUTS.items()
            if node["class_type"] == class_type and folder is not None}


def use_demo_models(prompt: dict) -> None:
    """Point the workflow's loaders at the demo set, and sample 4 steps instead of 25: its images are
    noise anyway. Personalize Concept keeps the workflow's settings; Personalize Concept (no encoder)
    tunes 12 steps instead of 200, which show the pipeline and its cost per step."""
    for node in prompt.values():
        for (class_type, name), (_, value) in DEMO_INPUTS.items():
            if node["class_type"] == class_type:
                node["inputs"][name] = value


def choose_workflow(models: Path) -> tuple[Path, list[str]]:
    """The workflow your ``models`` folder can run, and the files it lacks for the encoder workflow:
    ``WORKFLOW`` when it has all three files, ``WORKFLOW_WITHOUT_ENCODER`` when it has the checkpoint.
    Without the checkpoint, ``SystemExit`` naming every file. Reads nothing but file names."""
    def missing(workflow: Path) -> list[str]:
        return [str(models / folder / name) for folder, name in model_files(json.loads(workflow.read_text())).items()
                if not (models / folder / name).is_file()]

    lacking = missing(WORKFLOW)
    if not lacking:
        return WORKFLOW, []
    if not missing(WORKFLOW_WITHOUT_ENCODER):
        return WORKFLOW_WITHOUT_ENCODER, lacking
    raise SystemExit("missing model files:\n  " + "\n  ".join(lacking) + "\nthe checkpoint alone runs "
                     f"{WORKFLOW_WITHOUT_ENCODER.name} (no encoder); all three run {WORKFLOW.name}")


def check_output(output: Path) -> None:
    """Refuse (``SystemExit``) an ``--output`` the demo may not replace: a file, or a folder that is
    neither empty nor a previous demo output (one holding ``MARKER``). So a mistyped ``--output``
    (``.``, a home folder) never loses a file. Runs before anything slow."""
    if output.exists() and not output.is_dir():
        raise SystemExit(f"--output {output}: is a file; pass a folder (default output/demo/)")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise SystemExit(f"--output {output}: the folder is not empty and is not a previous demo output (it has "
                         f"no {MARKER} file); the demo replaces its output folder, so pass a new or empty folder "
                         f"(default output/demo/)")


def replace_output(output: Path) -> None:
    """Make ``output`` (checked by ``check_output``) an empty folder holding only ``MARKER``."""
    check_output(output)
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    (output / MARKER).write_text("made by python -m training.demo; the next run replaces this folder\n")


def write_photo(path: Path, source: str | None) -> None:
    """The concept photo as a PNG that Load Image reads; default: scikit-image's cat."""
    if source is None:
        from skimage import data

        Image.fromarray(data.chelsea()).save(path)
        return
    try:
        with Image.open(source) as image:
            (image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")).save(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--image {source}: not a readable image ({error})") from None


def prepare_base_directory(base: Path, models: Path, photo: str | None) -> None:
    """ComfyUI's base directory for the run: this pack in ``custom_nodes/``, the photo in ``input/``, and
    ``models`` added through an extra_model_paths.yaml (saved concepts stay in ``base/models/``)."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-datencoder").symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    write_photo(base / "input" / PHOTO, photo)
    folders = "\n".join(f"  {folder}: {folder}/" for folder in ("checkpoints", "clip_vision", "datencoder"))
    (base / "extra_model_paths.yaml").write_text(f"models:\n  base_path: {models.resolve()}\n{folders}\n")


def run_workflow(server: ComfyUIServer, workflow: Path, prompt: dict, output: Path) -> dict:
    """Run ``prompt`` (``workflow``'s twin) on ``server``; what the report says about it."""
    personalize_node = next(k for k, v in prompt.items() if v["class_type"] in PERSONALIZE_NODES)
    logger.info(f"running {workflow.relative_to(REPO)} in ComfyUI (log: {server.log_path})")
    try:
        run = server.run(prompt, on_text=lambda node, text: logger.info(f"  {text}"))
    except WorkflowError as error:
        raise SystemExit(f"the workflow failed: {error}\nend of {server.log_path}:\n{server.log_tail()}")
    outputs = run.history["outputs"]
    nearest, losses = personalization_result(outputs, personalize_node)
    return {"workflow": workflow.stem, "nearest_word": nearest,
            "personalization_seconds": round(run.node_seconds(personalize_node), 2), "tuning_losses": losses,
            "workflow_seconds": round(run.finished, 2),
            "images": [str(output / image["subfolder"] / image["filename"])
                       for node in outputs.values() for image in node.get("images", [])]}


def personalization_result(outputs: dict, node: str) -> tuple[str, list[float]]:
    """The nearest word and the tuning losses of Personalize Concept ``node``, from the structured record
    of its ``ui`` output in /history (``outputs[node]["datencoder"]``), never from its text, which is
    for people."""
    [record] = outputs[node]["datencoder"]
    return record["token"], [float(loss) for loss in record["losses"]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="your ComfyUI models folder (see above); default: the demo set")
    parser.add_argument("--image", help="the concept photo (default: scikit-image's cat)")
    parser.add_argument("--output", type=Path, default=Path("output/demo"))
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("DATENCODER_CACHE",
                                                                          "~/.cache/datencoder")).expanduser(),
                        help="where the demo model set is made once")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON",
                        help="override a workflow input, e.g. --set 5.steps=4 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_output(args.output)

    if args.models is None:
        workflows = [WORKFLOW, WORKFLOW_WITHOUT_ENCODER]  # the main one first: the report's top level
    else:
        workflow, lacking = choose_workflow(args.models)
        workflows = [workflow]
        if lacking:
            logger.info(f"no {' nor '.join(lacking)}: running the encoder-free workflow {workflow.name} "
                        f"(Personalize Concept (no encoder))")
    prompts = [json.loads(workflow.read_text()) for workflow in workflows]
    if args.models is None:
        logger.info(f"no --models: using the demo model set (random weights) in {args.cache}")
        models = demo_models.ensure_demo_models(args.cache)
        for prompt in prompts:
            use_demo_models(prompt)
    else:
        models = args.models
    for override in args.set:  # the examples share node ids (5: Personalize, 9: the latent, 10: KSampler)
        target, _, value = override.partition("=")
        node, _, name = target.partition(".")
        having = [prompt for prompt in prompts if node in prompt and name in prompt[node]["inputs"]]
        if not having:
            parser.error(f"--set {override}: the workflow has no input {name!r} on node {node!r}")
        for prompt in having:
            prompt[node]["inputs"][name] = json.loads(value)

    replace_output(args.output)
    base = args.output / "comfyui"
    prepare_base_directory(base, models, args.image)
    with ComfyUIServer(base, "--output-directory", str(args.output.resolve()),
                       "--extra-model-paths-config", str((base / "extra_model_paths.yaml").resolve())) as server:
        runs = [run_workflow(server, workflow, prompt, args.output) for workflow, prompt in zip(workflows, prompts)]
        peak_rss = server.peak_rss_bytes()
        device = server.get("/system_stats")["devices"][0]["name"]

    main_run, *more = runs
    report = {
        "models": "demo set (random weights)" if args.models is None else str(args.models),
        "image": args.image or "scikit-image chelsea (cat)", "device": device, **main_run,
        "peak_memory_mib": round(peak_rss / 2**20, 1), "peak_memory_kind": "ComfyUI process peak RSS",
    }
    if more:
        [report["without_encoder"]] = more
    (args.output / "report.json").write_text(json.dumps(report, indent=2))
    for run in runs:
        logger.info(f"{run['workflow']}: nearest word {run['nearest_word']!r}; personalization "
                    f"{run['personalization_seconds']} s; workflow {run['workflow_seconds']} s")
    logger.info(f"peak RSS {report['peak_memory_mib']:.0f} MiB on {device}")
    logger.info("wrote " + ", ".join([image for run in runs for image in run["images"]]
                                     + [str(args.output / "report.json")]))
    return report


if __name__ == "__main__":
    main()
