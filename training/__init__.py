"""Offline tooling on diffusers / transformers / open_clip: pretraining, data, evaluation, the demo.

The commands (``python -m training.<name> --help``) sit at the top; each room below is one concern, and a
room imports only the rooms above it in this list (``tests/test_layout.py`` checks that)::

    models/     loading the user's files (SD1.x checkpoint, CLIP ViT-H-14) and the diffusers reference stack
    data/       pretraining images at scale: folders and shards, decoding, streaming, cached latents
    evaluate/   the DreamBench-style evaluation (Sec. 5): concepts, prompts, sampling, metrics, report
    pretrain/   the pretraining loop (Sec. 4.3): settings, one step's loss, validation, checkpoints
    headless/   running ComfyUI without a browser: the server and library harness, random model sets
    toyworld/   a small world with ground truth that runs all of the above on a CPU

    pretrain, evaluate, toyworld      python -m training.pretrain | training.evaluate | training.toyworld
    export.py                         a pretraining checkpoint -> the encoder file the nodes load
    prepare_openimages.py, make_shards.py, cache_latents.py    data at scale (data/)
    demo.py                           the main job: a workflow run headless in ComfyUI (headless/)
"""
