"""The editor, in a real browser: Debian's Chromium driven by Playwright against ComfyUI serving this pack
as `make comfyui` does (the pack in custom_nodes/, the demo model set under the names the example
workflows use), on each release the tests run. One server and one browser per release for all cases.

What a new user does: open each example workflow (no missing-node or missing-model dialog), press Run
(small step counts), see the images and the nearest word, press Run again unchanged (images again,
nothing fails), then queue a prompt without the placeholder (refused at once, before personalization)
and cancel what still runs. A screenshot of each state goes to output/test-editor/<release>/ (CI keeps it
on failure). `make test` installs Chromium and Playwright (`make browser`); nothing is downloaded here.
"""

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from training.demo import PHOTO, write_photo
from training.headless import demo_models
from training.headless.comfyui import REPO, ComfyUIServer, comfyui_version

CHROMIUM = Path("/usr/bin/chromium")
# The network is closed: without these, Chromium stalls on first-run, sync and update requests.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WORKFLOW_MODELS = {  # the example workflows' file names -> the demo set's files
    "checkpoints": ("v1-5-pruned-emaonly.safetensors", demo_models.CHECKPOINT),
    "clip_vision": ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", demo_models.CLIP_VISION),
    "datencoder": ("datencoder_sd15.safetensors", demo_models.ENCODER),
}
# Test cost on CPU: 2 tuning steps of 1 timestep, 2 sampling steps, 128 px.
QUICK = {"DATEncoderPersonalize": {"steps": 2, "timesteps_per_step": 1},
         "DATEncoderPersonalizeFromWord": {"steps": 2, "timesteps_per_step": 1}, "KSampler": {"steps": 2},
         "EmptyLatentImage": {"width": 128, "height": 128}}
WORKFLOWS = sorted(path.stem for path in (REPO / "workflows").glob("*.json"))
RUN_SECONDS = 600  # one workflow run, model loading included, on 2 busy CPU cores
TEXT_WIDGET = "$$node-text-preview"  # the editor's widget for a node's progress text


class Editor:
    """One browser tab on the editor, with the execution events it received (``events``)."""

    def __init__(self, page, server: ComfyUIServer, screenshots: Path):
        self.page, self.server, self.screenshots = page, server, screenshots
        self.shots = 0

    def open(self) -> None:
        self.page.goto(self.server.url)
        self.page.wait_for_function("window.app?.graph && window.app.vueAppReady", timeout=180_000)
        self.page.evaluate("""() => { window.datencoderEvents = [];
            for (const type of ['execution_start', 'executed', 'execution_success', 'execution_error',
                                'execution_interrupted'])
                app.api.addEventListener(type, e => window.datencoderEvents.push({type, ...e.detail})); }""")

    def shot(self, state: str) -> None:
        self.shots += 1
        self.page.screenshot(path=str(self.screenshots / f"{self.shots:02d}-{state}.png"))

    def load(self, name: str) -> None:
        """Workflow -> Open (the editor's file input) of ``workflows/<name>.json``."""
        self.page.set_input_files("#comfy-file-input", str(REPO / "workflows" / f"{name}.json"))
        self.page.wait_for_function(f"app.graph.nodes.length === {len(_workflow(name)['nodes'])}")
        self.page.wait_for_timeout(1500)  # the missing-node / missing-model checks run after the graph loads

    def overlaps(self) -> list[list[int]]:
        """The pairs of nodes whose boxes (title bar and body, as the editor draws them now) overlap."""
        return self.page.evaluate("""() => {
            const boxes = app.graph.nodes.map(n => [n.id, n.getBounding ? Array.from(n.getBounding()) : n.boundingRect]);
            const pairs = [];
            boxes.forEach(([a, [ax, ay, aw, ah]], i) => boxes.slice(i + 1).forEach(([b, [bx, by, bw, bh]]) => {
                if (ax < bx + bw && bx < ax + aw && ay < by + bh && by < ay + ah) pairs.push([a, b]); }));
            return pairs; }""")

    def dialogs(self) -> list[str]:
        return self.page.evaluate("""Array.from(document.querySelectorAll('[role=dialog], .p-dialog'))
            .filter(e => e.offsetParent !== null).map(e => e.innerText.slice(0, 500))""")

    def set_widgets(self, values: dict[str, dict]) -> None:
        """``{node type: {widget: value}}`` on every node of that type, as typing into the widgets does."""
        self.page.evaluate("""values => { for (const node of app.graph.nodes)
            for (const [name, value] of Object.entries(values[node.type] ?? {}))
                node.widgets.find(w => w.name === name).value = value; }""", values)

    def run(self) -> int:
        """Press Run; return how many events came before, so that ``events(since)`` are this run's."""
        since = len(self.events())
        self.page.get_by_role("button", name="Run", exact=True).first.click()
        return since

    def events(self, since: int = 0) -> list[dict]:
        return self.page.evaluate("window.datencoderEvents")[since:]

    def wait_for_end(self, since: int) -> dict:
        """The run's last event (execution_success, _error or _interrupted)."""
        self.page.wait_for_function(f"""window.datencoderEvents.slice({since}).some(e =>
            ['execution_success', 'execution_error', 'execution_interrupted'].includes(e.type))""",
                                    timeout=RUN_SECONDS * 1000, polling=1000)
        return next(e for e in self.events(since) if e["type"].startswith("execution_") and e["type"] != "execution_start")

    def node_text(self, node_type: str) -> str | None:
        """What the editor shows as the node's text (its progress text widget), None if nothing."""
        return self.page.evaluate(f"""app.graph.nodes.find(n => n.type === {json.dumps(node_type)})
            ?.widgets?.find(w => w.name === '{TEXT_WIDGET}')?.value ?? null""")

    def images_of(self, events: list[dict], node_type: str) -> list[dict]:
        return self.outputs_of(events, node_type, "images")

    def outputs_of(self, events: list[dict], node_type: str, key: str) -> list:
        """The ``key`` entries of the ui outputs that the editor received for the node of ``node_type``."""
        node_id = self.page.evaluate(f"String(app.graph.nodes.find(n => n.type === {json.dumps(node_type)}).id)")
        return [entry for e in events if e["type"] == "executed" and e["node"] == node_id
                for entry in (e.get("output") or {}).get(key, [])]


def _workflow(name: str) -> dict:
    return json.loads((REPO / "workflows" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def editor(demo_models_folder, tmp_path_factory, comfyui_release):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run 'make browser' (apt-get install chromium), as make test does")
    try:
        from playwright import sync_api as playwright_api
    except ImportError:
        pytest.fail("the playwright package is missing: run 'make browser' (requirements-browser.lock), as make "
                    "test does")
    base = tmp_path_factory.mktemp("editor")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-datencoder").symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    write_photo(base / "input" / PHOTO, None)
    for folder, (name, demo_file) in WORKFLOW_MODELS.items():
        (base / "models" / folder).mkdir(parents=True)
        (base / "models" / folder / name).symlink_to(demo_models_folder / folder / demo_file)
    screenshots = REPO / "output" / "test-editor" / f"comfyui-{comfyui_version(comfyui_release)}"
    shutil.rmtree(screenshots, ignore_errors=True)
    screenshots.mkdir(parents=True)
    with ComfyUIServer(base, comfyui=comfyui_release) as server, playwright_api.sync_playwright() as playwright:
        request = urllib.request.Request(server.url + "/settings/Comfy.TutorialCompleted", data=b"true",
                                         method="POST")  # a returning user: no templates browser at start
        urllib.request.urlopen(request, timeout=30).read()
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS,
                                             headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.set_default_timeout(60_000)
            editor = Editor(page, server, screenshots)
            editor.open()
            yield editor
        finally:
            browser.close()


def test_the_examples_load_and_run_twice_from_the_run_button(editor):
    editor.load("personalize_and_generate")
    editor.shot("personalize-loaded")
    assert editor.dialogs() == []  # no missing nodes, no missing models
    editor.set_widgets(QUICK)
    since = editor.run()
    end = editor.wait_for_end(since)
    editor.shot("personalize-ran")
    assert end["type"] == "execution_success", end
    assert editor.overlaps() == []  # the node texts had room
    assert len(editor.images_of(editor.events(since), "SaveImage")) == 2
    shown = editor.node_text("DATEncoderPersonalize")
    nearest, demo = shown.split("\n")  # the examples' encoder is the demo's: the node says so under the word
    assert nearest.startswith("nearest word: ") and demo == "demo encoder (random weights): not a result", shown
    saved = editor.server.base / "models" / "datencoder_concepts" / "my_concept.safetensors"
    assert editor.node_text("DATEncoderSaveConcept") == "saved my_concept.safetensors"  # short: fits the node
    assert editor.outputs_of(editor.events(since), "DATEncoderSaveConcept", "datencoder") == [
        {"files": [str(saved)], "saved": True}]  # what datencoder.js reads
    assert "</w>" not in nearest and editor.page.get_by_text(nearest).first.is_visible() and editor.page.get_by_text(demo).first.is_visible()  # drawn on the node

    since = editor.run()  # unchanged: the seed is fixed, so nothing is personalized again
    end = editor.wait_for_end(since)
    editor.shot("personalize-ran-again")
    assert end["type"] == "execution_success", end
    assert len(editor.images_of(editor.events(since), "SaveImage")) == 2
    assert editor.node_text("DATEncoderPersonalize") == shown

    editor.load("save_and_reuse_concept")  # just saved: Load Concept knows the file without a refresh
    editor.shot("reuse-loaded")
    assert editor.dialogs() == []
    assert "my_concept.safetensors" in editor.page.evaluate("""() => {
        const values = app.graph.nodes.find(n => n.type === 'DATEncoderLoadConcept').widgets[0].options.values;
        return typeof values === 'function' ? values() : values; }""")
    editor.set_widgets(QUICK)
    since = editor.run()
    end = editor.wait_for_end(since)
    editor.shot("reuse-ran")
    assert end["type"] == "execution_success", end
    assert len(editor.images_of(editor.events(since), "SaveImage")) == 2
    assert editor.node_text("DATEncoderLoadConcept").startswith(nearest + "\n")
    assert editor.node_text("DATEncoderExportConcept") == "saved my_concept.safetensors in loras/ and embeddings/"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_each_example_opens_without_dialogs_and_overlaps(editor, name):
    """As the editor sizes the nodes (two_concepts' Load Checkpoint overlapped its first Load Concept)."""
    editor.load(name)
    assert editor.dialogs() == []
    assert editor.overlaps() == []


def test_the_encoder_free_example_runs_from_the_run_button(editor):
    """Only the checkpoint and the photo; its node texts leave the layout without overlaps."""
    editor.load("personalize_without_encoder")
    assert editor.dialogs() == []
    editor.set_widgets(QUICK)
    since = editor.run()
    end = editor.wait_for_end(since)
    editor.shot("without-encoder-ran")
    assert end["type"] == "execution_success", end
    assert len(editor.images_of(editor.events(since), "SaveImage")) == 2
    assert editor.node_text("DATEncoderPersonalizeFromWord").startswith("nearest word: ")
    assert editor.overlaps() == []


def test_the_extension_refreshes_when_the_record_says_a_file_was_written(editor):
    """datencoder.js reloads the node definitions after Save Concept or Export only when the node's ui
    record says it wrote a file: it reads the record, never the text for people. The same record again (an
    unchanged re-run answered from ComfyUI's cache replays it) reloads nothing: no "Node definitions
    updated" toast for a file that was already there."""
    refreshes = {}
    for workflow, node_type in (("personalize_and_generate", "DATEncoderSaveConcept"),
                                ("save_and_reuse_concept", "DATEncoderExportConcept")):
        file = f"/models/{node_type}.safetensors"
        outputs = [{"text": [f"saved {file}"]},
                   {"text": ["..."], "datencoder": [{"files": [file], "saved": False}]},
                   {"text": ["..."], "datencoder": [{"files": [file], "saved": True}]},
                   {"text": ["..."], "datencoder": [{"files": [file], "saved": True}]}]  # the cache's replay
        editor.load(workflow)
        refreshes[node_type] = editor.page.evaluate("""([type, outputs]) => {
            const node = app.graph.nodes.find(n => n.type === type);
            const refresh = app.refreshComboInNodes;
            let calls = 0;
            app.refreshComboInNodes = () => { calls += 1; };
            try {
                return outputs.map(output => { calls = 0; node.onExecuted(output); return calls; });
            } finally {
                app.refreshComboInNodes = refresh;
            }
        }""", [node_type, outputs])
    assert refreshes == {"DATEncoderSaveConcept": [0, 0, 1, 0], "DATEncoderExportConcept": [0, 0, 1, 0]}


def test_a_prompt_without_the_placeholder_is_refused_before_personalization(editor):
    """ComfyUI's queue-time validation: Apply Concept Token is flagged with the reason at once, in a toast,
    listed once (datencoder.js; ComfyUI reports it for each input the check read). ComfyUI
    still runs the outputs that do not need it (Save Concept's branch), so Cancel ends that one, and the
    node says it was cancelled."""
    editor.load("personalize_and_generate")
    editor.set_widgets({**QUICK, "DATEncoderPersonalize": {"steps": 6, "timesteps_per_step": 1, "seed": 7},
                        "DATEncoderApplyConceptToken": {"text": "a photo in the snow"}})
    editor.run()
    reason = "the prompt does not contain the placeholder 'S*'"
    editor.page.get_by_text(reason).first.wait_for(state="visible")  # the pack's own toast, no click needed
    editor.shot("no-placeholder-refused")
    errors = editor.page.evaluate("""Object.values(app.lastNodeErrors)
        .filter(e => e.class_type === 'DATEncoderApplyConceptToken').flatMap(e => e.errors)""")
    assert [reason in e["details"] for e in errors] == [True]  # once: ComfyUI lists it for text and placeholder
    assert not (editor.node_text("DATEncoderPersonalize") or "").startswith("step ")  # nothing tuned yet

    deadline = time.monotonic() + RUN_SECONDS
    while not (editor.node_text("DATEncoderPersonalize") or "").startswith("step "):
        assert time.monotonic() < deadline, "Personalize Concept never started"
        editor.page.wait_for_timeout(500)
    editor.page.get_by_role("button", name="Cancel current run").first.click()
    editor.page.wait_for_function(f"""app.graph.nodes.find(n => n.type === 'DATEncoderPersonalize')
        .widgets.find(w => w.name === '{TEXT_WIDGET}').value.startsWith('cancelled')""", timeout=RUN_SECONDS * 1000)
    editor.shot("cancelled")
    assert editor.node_text("DATEncoderPersonalize").startswith("cancelled after step ")
