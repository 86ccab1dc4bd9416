"""Pretraining the DATEncoder (Sec. 4.3): the loop (``train``), its settings (``config``), one step's loss
(``objective``), held-out validation (``validation``) and checkpoints (``checkpoints``)."""
