"""The docs point at what exists. In README.md and docs/*.md: every relative link resolves to a file (and, when
it names one, to a heading of that page); every ``python -m X`` (or ``accelerate launch ... -m X``) shown in code
names a module that answers ``--help`` with exit 0; every ``make TARGET`` shown in code is a target of the
Makefile. The last test runs the same checkers on a made-up page, to show that each kind of fault is reported."""

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
# The module must end the word: ``python -m training.<name>`` is a placeholder, not a module.
PYTHON_M = re.compile(r"\b(?:python3?|accelerate\s+launch)\b[^;&|]*?\s-m\s+([A-Za-z_][\w.]*\w)(?=\s|$)")
MAKE = re.compile(r"(?:^|[\s(;&|])make\s+(.+)")
TARGET = re.compile(r"^([A-Za-z0-9_.][\w.-]*(?:[ \t]+[A-Za-z0-9_.][\w.-]*)*)[ \t]*:(?!=)", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


# --- reading a page ---------------------------------------------------------------------------------------------

def prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans (links and headings live outside them)."""
    return SPAN.sub(" ", FENCE.sub("", text))


def code_lines(text: str) -> list[str]:
    """The code of ``text`` as logical lines: each line of a fenced block (``\\``-continued lines joined) and each
    code span (its line breaks made spaces)."""
    lines = []
    for block in FENCE.finditer(text):
        lines += block.group(2).replace("\\\n", " ").splitlines()
    lines += [" ".join(span.group(2).split()) for span in SPAN.finditer(FENCE.sub("", text))]
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


# --- the checkers -----------------------------------------------------------------------------------------------

def dead_links(page: Path, text: str) -> list[str]:
    """Every relative link of ``page`` (whose content is ``text``) that names no file, or no heading of it."""
    dead = []
    for target in LINK.findall(prose(text)):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(f"{page.name}: {target} (no file {file})")
        elif anchor and file.suffix == ".md":
            headings = anchors(text if file == page else file.read_text())
            if anchor not in headings:
                dead.append(f"{page.name}: {target} (no heading #{anchor} in {file.name})")
    return dead


def python_modules(text: str) -> list[str]:
    """The modules ``python -m X`` and ``accelerate launch ... -m X`` name in the code of ``text``, in order."""
    return [m for line in code_lines(text) for m in PYTHON_M.findall(line)]


def missing_modules(modules: list[str]) -> list[str]:
    missing = []
    for name in modules:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package that does not exist
            found = False
        if not found:
            missing.append(f"python -m {name}: no such module")
    return missing


def help_failures(modules: list[str]) -> list[str]:
    """``python -m X --help`` for each module, run from the repository root; those that do not exit 0."""
    def run(name):
        result = subprocess.run([sys.executable, "-m", name, "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=300, env=os.environ.copy())
        last = (result.stderr.strip().splitlines() or [""])[-1]
        return None if result.returncode == 0 else f"python -m {name} --help: exit {result.returncode}: {last}"

    with ThreadPoolExecutor(max_workers=3) as pool:
        return [failure for failure in pool.map(run, modules) if failure]


def make_targets(text: str) -> list[str]:
    """The targets ``make ...`` names in the code of ``text``: the first word after make that is neither a
    ``VAR=value`` nor an option."""
    targets = []
    for line in code_lines(text):
        for match in MAKE.finditer(line):
            rest = match.group(1).split("#")[0]
            try:
                words = shlex.split(rest)
            except ValueError:  # an unclosed quote: words are enough to find the target
                words = rest.split()
            target = next((w for w in words if "=" not in w and not w.startswith("-")), None)
            if target:
                targets.append(target.rstrip(".,:;)"))
    return targets


def makefile_targets(makefile: str) -> set[str]:
    return {name for names in TARGET.findall(makefile) for name in names.split()}


def missing_targets(targets: list[str], makefile: str) -> list[str]:
    known = makefile_targets(makefile)
    return [f"make {t}: no such target in the Makefile" for t in targets if t not in known]


# --- the docs ---------------------------------------------------------------------------------------------------

def _texts() -> dict[Path, str]:
    return {page: page.read_text() for page in PAGES}


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    linked = {(REPO / target.partition("#")[0]).resolve() for target in LINK.findall(prose(readme))}
    assert len(PAGES) > 1, "no docs/*.md"
    assert [p.name for p in PAGES[1:] if p not in linked] == []


def test_relative_links_resolve():
    dead = [d for page, text in _texts().items() for d in dead_links(page, text)]
    assert dead == [], "\n".join(dead)


def test_python_m_commands_name_modules_that_answer_help():
    modules = list(dict.fromkeys(m for text in _texts().values() for m in python_modules(text)))
    assert "training.pretrain" in modules and "training.evaluate" in modules  # the extraction sees the commands
    missing = missing_modules(modules)
    assert missing == [], "\n".join(missing)
    failures = help_failures(modules)
    assert failures == [], "\n".join(failures)


def test_make_targets_exist_in_the_makefile():
    targets = list(dict.fromkeys(t for text in _texts().values() for t in make_targets(text)))
    assert {"demo", "test"} <= set(targets)
    missing = missing_targets(targets, (REPO / "Makefile").read_text())
    assert missing == [], "\n".join(missing)


# --- the control: the checkers report what is wrong -------------------------------------------------------------

CONTROL = """# Control

## A heading

See [the other page](other.md), [its part](other.md#a-part), [here](#a-heading) and [the web](https://example.com/x).
Broken: [a dead link](nowhere.md), [a dead anchor](other.md#no-such-part), [a dead local anchor](#nope).

```bash
python -m training.nope --flag
accelerate launch --num_processes 8 -m training.export a b
make nope
make demo MODELS=/x IMAGE=/y
COMFYUI_RELEASES=/a:/b make test
```

Placeholders are not modules: `python -m training.<name> --help`; prose "make nope2" is not code.
"""


def test_the_checkers_report_a_dead_link_a_missing_module_and_a_missing_target(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(CONTROL)
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n")

    assert dead_links(page, CONTROL) == [
        f"page.md: nowhere.md (no file {tmp_path / 'nowhere.md'})",
        "page.md: other.md#no-such-part (no heading #no-such-part in other.md)",
        "page.md: #nope (no heading #nope in page.md)"]

    modules = python_modules(CONTROL)
    assert modules == ["training.nope", "training.export"]
    assert missing_modules(modules) == ["python -m training.nope: no such module"]
    assert missing_modules(["nope.sub"]) == ["python -m nope.sub: no such module"]
    [failure] = help_failures(["training.nope"])  # what a module that fails --help looks like
    assert failure.startswith("python -m training.nope --help: exit 1:") and "training.nope" in failure

    targets = make_targets(CONTROL)
    assert targets == ["nope", "demo", "test"]
    makefile = "VENV := .venv\n.PHONY: demo test\ndemo: setup\n\tcmd\ntest: setup\n\tcmd\n"
    assert missing_targets(targets, makefile) == ["make nope: no such target in the Makefile"]
