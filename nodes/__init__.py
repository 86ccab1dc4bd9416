"""The ComfyUI adapter: node schemas (``nodes.py``), patch classes (``patching.py``), folders (``paths.py``)."""
