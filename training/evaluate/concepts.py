"""The evaluation inputs: the concept folders and the prompt files, read and checked without loading a model.

Concept folder (``--concepts DIR``): one sub-folder per concept (its name is the concept's name) holding
its photos (.jpg, .jpeg, .png, .webp; sorted by file name) and ``concept.json``::

    {"class": "dog", "live": true}

``class`` is the class word (CLIP-T's text, the ``scratch`` baseline's starting v*); ``live`` selects the
live-subject prompts. The first photo is the single input image (the paper's setting); all photos are the
references the metrics compare with.

Prompt files, two formats (``read_prompts`` tells them apart):
* this project's (``PROJECT_PROMPTS``): ``[object]`` and ``[live]`` sections of ``category: template``
  lines, ``{}`` the concept word; ``#`` starts a comment.
* DreamBench's official ``dataset/prompts_and_classes.txt`` (google/dreambooth): a "Classes" table, then
  "Object Prompts" and "Live Subject Prompts", each a Python list of ``'a {0} {1} in the jungle'.format(
  unique_token, class_token)`` lines, ``{0}`` the identifier and ``{1}`` the class word. An encoder's
  word stands for the subject with its class, so ``{0} {1}`` becomes ``{}``; the file labels no
  category, so its prompts have the category "dreambench". The Classes table is not used: the class
  word is each folder's concept.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datencoder_core import DATEncoderError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PROJECT_PROMPTS = Path(__file__).parent / "prompts" / "dreambench_style.txt"
KINDS = ("object", "live")


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    class_word: str
    live: bool
    photos: tuple[Path, ...]  # photos[0] is the input image

    @property
    def kind(self) -> str:
        return "live" if self.live else "object"


@dataclass(frozen=True)
class Prompt:
    category: str  # recontextualization, accessorization, property change (or "dreambench")
    template: str  # one "{}" where the concept word goes

    def with_class(self, class_word: str) -> str:
        return self.template.replace("{}", class_word)


def read_concepts(folder: Path) -> list[ConceptSpec]:
    """Every concept under ``folder``, sorted by name; raises ``DATEncoderError`` on a concept folder
    without photos or without a valid concept.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DATEncoderError(f"--concepts {folder} is not a folder: expected one sub-folder per concept")
    concepts = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = tuple(sorted(p for p in sub.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES))
        if not photos:
            raise DATEncoderError(f"concept folder {sub} has no photos ({', '.join(PHOTO_SUFFIXES)}); "
                                  f"add the concept's photos or remove the folder")
        meta = sub / "concept.json"
        if not meta.is_file():
            raise DATEncoderError(f"concept folder {sub} has no concept.json; write one such as "
                                  f'{{"class": "dog", "live": true}} (class word, live subject or object)')
        try:
            data = json.loads(meta.read_text())
            class_word, live = data["class"], data["live"]
            if not isinstance(class_word, str) or not class_word.strip() or not isinstance(live, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise DATEncoderError(f"{meta}: expected {{\"class\": <class word>, \"live\": true|false}}, "
                                  f"found {meta.read_text()[:200]!r}") from None
        concepts.append(ConceptSpec(sub.name, class_word.strip(), live, photos))
    if not concepts:
        raise DATEncoderError(f"--concepts {folder} has no concept sub-folders (README: 'Evaluation')")
    return concepts


def read_prompts(path: Path) -> dict[str, list[Prompt]]:
    """{"object": [...], "live": [...]} from a prompt file of either format (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DATEncoderError(f"--prompts {path} does not exist")
    text = path.read_text()
    prompts = _read_official(path, text) if "prompt_list" in text else _read_project(path, text)
    for kind in KINDS:
        if not prompts.get(kind):
            raise DATEncoderError(f"{path}: no {kind} prompts found")
    return prompts


def _read_project(path: Path, text: str) -> dict[str, list[Prompt]]:
    prompts: dict[str, list[Prompt]] = {}
    kind = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            kind = line[1:-1]
            if kind not in KINDS:
                raise DATEncoderError(f"{path}:{number}: unknown section {line}; expected [object] or [live]")
            prompts.setdefault(kind, [])
            continue
        category, colon, template = line.partition(":")
        if kind is None or not colon:
            raise DATEncoderError(f"{path}:{number}: expected 'category: template' under [object] or [live], "
                                  f"found {line!r}")
        if template.count("{}") != 1:
            raise DATEncoderError(f"{path}:{number}: the prompt {template.strip()!r} needs the placeholder {{}} "
                                  f"exactly once (where the concept word goes)")
        prompts[kind].append(Prompt(category.strip(), template.strip()))
    return prompts


def _read_official(path: Path, text: str) -> dict[str, list[Prompt]]:
    sections = {"object": "Object Prompts", "live": "Live Subject Prompts"}
    prompts = {}
    for kind, title in sections.items():
        start = text.find(title)
        if start < 0:
            raise DATEncoderError(f"{path}: a DreamBench prompt file (it has 'prompt_list') without the "
                                  f"section {title!r}")
        body = text[start:text.find("]", start)]
        templates = re.findall(r"""['"](.*?)['"]\s*\.format\(""", body)
        for template in templates:
            if "{0} {1}" not in template:
                raise DATEncoderError(f"{path}: the prompt {template!r} lacks the placeholder '{{0}} {{1}}' "
                                      f"(unique token, class word)")
        prompts[kind] = [Prompt("dreambench", t.replace("{0} {1}", "{}")) for t in templates]
    return prompts


def load_photo(path: Path) -> Tensor:
    """(H, W, 3) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def write_tiny_concepts(folder: Path) -> None:
    """The tiny preset's concept set: two concepts cut from scikit-image's sample photos, three 128 px
    crops each (a cat, live; a coffee cup, an object)."""
    from skimage import data

    sources = {"cat": (data.chelsea(), "cat", True), "cup": (data.coffee(), "cup", False)}
    for name, (image, class_word, live) in sources.items():
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        h, w = image.shape[:2]
        side = min(h, w)
        for i, (dy, dx, scale) in enumerate(((0.5, 0.5, 1.0), (0.3, 0.4, 0.8), (0.7, 0.6, 0.7))):
            s = int(side * scale)
            y, x = int((h - s) * dy), int((w - s) * dx)
            crop = Image.fromarray(image[y:y + s, x:x + s]).resize((128, 128), Image.BICUBIC)
            crop.save(sub / f"{i:02d}.png")
        (sub / "concept.json").write_text(json.dumps({"class": class_word, "live": live}))
