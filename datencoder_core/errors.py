"""The one exception type users of the core see."""


class DATEncoderError(ValueError):
    """Bad input to DATEncoder: a wrong shape, a file of the wrong kind, a concept for another model.

    Messages state what was expected, what was found and how to fix it.
    """


# ComfyUI names a failed node's exception by ``__module__ + "." + __qualname__`` (``execution.py``'s
# ``full_type_name``), and loads this pack under its folder name, which made the editor's error read
# "comfyui-datencoder.datencoder_core.errors.DATEncoderError" before the message. The public name is the
# pack's: the error reads "datencoder.DATEncoderError: <message>".
DATEncoderError.__module__ = "datencoder"
