"""ComfyUI entry point of the DATEncoder node pack (V3). Importing this file does nothing else."""


async def comfy_entrypoint():
    from .nodes.nodes import DATEncoderExtension

    return DATEncoderExtension()
