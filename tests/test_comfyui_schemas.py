"""Schema/execute drift: every node's execute() takes exactly the input ids its schema declares."""

import asyncio
import inspect

from training.comfyui import pack_module


def test_execute_parameters_equal_schema_inputs():
    extension = pack_module("nodes.nodes").DATEncoderExtension()
    nodes = asyncio.run(extension.get_node_list())
    assert len(nodes) == 7
    for node in nodes:
        declared = [spec.id for spec in node.define_schema().inputs]
        assert list(inspect.signature(node.execute).parameters) == declared, node.__name__
        if "fingerprint_inputs" in vars(node):
            assert list(inspect.signature(node.fingerprint_inputs).parameters) == declared, node.__name__
