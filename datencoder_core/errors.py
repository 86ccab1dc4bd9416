"""The one exception type users of the core see."""


class DATEncoderError(ValueError):
    """Bad input to DATEncoder: a wrong shape, a file of the wrong kind, a concept for another model.

    Messages state what was expected, what was found and how to fix it.
    """
