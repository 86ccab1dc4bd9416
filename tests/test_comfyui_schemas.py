"""Schema/execute drift: every node's execute() takes exactly the input ids its schema declares."""

import asyncio
import inspect

from training.headless.comfyui import pack_module


def test_execute_parameters_equal_schema_inputs():
    extension = pack_module("nodes.nodes").DATEncoderExtension()
    nodes = asyncio.run(extension.get_node_list())
    assert len(nodes) == 9
    for node in nodes:
        declared = [spec.id for spec in node.define_schema().inputs]
        assert list(inspect.signature(node.execute).parameters) == declared, node.__name__
        if "fingerprint_inputs" in vars(node):
            assert list(inspect.signature(node.fingerprint_inputs).parameters) == declared, node.__name__
        if any("validate_inputs" in vars(c) for c in node.__mro__ if c.__module__ == node.__module__):
            assert set(inspect.signature(node.validate_inputs).parameters) <= set(declared), node.__name__


def test_every_input_and_output_has_a_one_line_tooltip():
    extension = pack_module("nodes.nodes").DATEncoderExtension()
    for node in asyncio.run(extension.get_node_list()):
        schema = node.define_schema()
        for spec in [*schema.inputs, *schema.outputs]:
            assert spec.tooltip and "\n" not in spec.tooltip, (node.__name__, spec.id)
    personalize, patch = (n.define_schema().inputs for n in (extension_node("DATEncoderPersonalize"),
                                                              extension_node("DATEncoderDualPathPatch")))
    tuning, sampling = (next(i.tooltip for i in inputs if i.id == "alpha_blend") for inputs in (personalize, patch))
    assert "WHILE TUNING" in tuning and "WHILE SAMPLING" in sampling


def extension_node(node_id):
    nodes = asyncio.run(pack_module("nodes.nodes").DATEncoderExtension().get_node_list())
    return next(n for n in nodes if n.define_schema().node_id == node_id)


def test_personalize_from_word_inputs_defaults_and_output():
    """The encoder-free sibling of Personalize Concept: no CLIP vision, no encoder, a start word, and the
    encoder-free defaults (WORD_START_TUNING: 200 steps at lr 1e-3)."""
    node = extension_node("DATEncoderPersonalizeFromWord")
    schema = node.define_schema()
    assert schema.display_name == "Personalize Concept (no encoder)"
    assert [(i.id, i.get_io_type()) for i in schema.inputs] == [
        ("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("image", "IMAGE"), ("init_word", "STRING"),
        ("steps", "INT"), ("lr", "FLOAT"), ("alpha_blend", "FLOAT"), ("timesteps_per_step", "INT"), ("seed", "INT")]
    inputs = {i.id: i for i in schema.inputs}
    assert inputs["init_word"].default == "cat" and "mean of their embeddings" in inputs["init_word"].tooltip
    assert (inputs["steps"].default, inputs["steps"].min, inputs["steps"].max) == (200, 1, 2000)
    assert (inputs["lr"].default, inputs["alpha_blend"].default) == (1e-3, 0.25)
    assert inputs["timesteps_per_step"].default == 4
    assert inputs["seed"].default == 0 and inputs["seed"].control_after_generate == "fixed"
    assert [o.get_io_type() for o in schema.outputs] == ["CONCEPT"]
    assert "WHILE TUNING" in inputs["alpha_blend"].tooltip
