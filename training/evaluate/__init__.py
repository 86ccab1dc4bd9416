"""Evaluation (Sec. 5): the run (``run``), its concepts and prompts (``concepts``, ``prompts/``), sampling
(``sampling``), the metrics (``metrics``) and the written report (``report``)."""
