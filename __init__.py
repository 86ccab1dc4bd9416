"""ComfyUI entry point of the DATEncoder node pack (V3). Importing this file does nothing else."""

WEB_DIRECTORY = "./nodes/web"  # the editor extension: model lists refreshed after Save Concept / Export


async def comfy_entrypoint():
    from .nodes.nodes import DATEncoderExtension

    return DATEncoderExtension()
