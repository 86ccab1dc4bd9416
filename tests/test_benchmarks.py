"""``make benchmark`` prints the encoder-free path beside the encoder's, with their per-step ratio."""

import re

from benchmarks import personalize


def test_personalize_benchmark_prints_both_paths(capsys):
    personalize.main(["--shapes", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "1", "--word-steps", "3"])
    out = capsys.readouterr().out
    assert re.search(r"^encoder\s+2\s+4\s", out, re.M)
    assert re.search(r"^encoder-free\s+3\s+4\s.*per step / encoder's: \d+\.\d\d", out, re.M)
