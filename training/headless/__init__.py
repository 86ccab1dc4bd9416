"""Running ComfyUI headless: the server and library harness (``comfyui``), random ComfyUI models for tests
(``random_models``) and the demo's model set (``demo_models``)."""
