"""Which ComfyUI releases the pack supports, and what it does on any other.

Supported: ComfyUI >= 0.3.59 (``REQUIRES``; ``[tool.comfy] requires-comfyui`` in pyproject.toml says the
same). The floor is the dual path's: it replaces ``CrossAttention.forward`` and reads its per-call state
from the ``transformer_options`` argument, which ComfyUI's transformer blocks pass to it only since 0.3.59
(September 2025; 0.3.52 does not). The tests run 0.30.0 and 0.3.75.

On a release outside the range, ``refuse_unsupported`` logs one error line and hands ComfyUI the nodes as
subclasses whose input validation fails with the reason: the nodes still appear (a saved workflow opens),
and queueing a prompt that uses one is refused before anything runs, with the reason beside the node,
instead of a traceback from inside sampling.
"""

from __future__ import annotations

import dataclasses
import logging
import re

REQUIRES = ">=0.3.59"
MINIMUM = (0, 3, 59)
logger = logging.getLogger("datencoder")


def parse_version(text: str) -> tuple[int, int, int]:
    """``"0.3.75"`` -> ``(0, 3, 75)``, compared as numbers (``0.3.9`` < ``0.3.59`` < ``0.30.0``). A
    pre-release or local suffix (``0.3.60-rc1``, ``0.4.0+abc``) is ignored. Raises ``ValueError`` for
    anything that is not MAJOR.MINOR.PATCH."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)(?:[-+.][0-9A-Za-z.+-]*)?", text.strip())
    if match is None:
        raise ValueError(f"ComfyUI version {text!r}: expected MAJOR.MINOR.PATCH, e.g. '0.3.75'")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def running_version() -> str | None:
    """``__version__`` from the running ComfyUI's ``comfyui_version.py``; None where it has none."""
    try:
        from comfyui_version import __version__
    except ImportError:
        return None
    return str(__version__)


def unsupported_reason(version: str | None) -> str | None:
    """None when ComfyUI ``version`` is supported; else one line: what is needed, what was found, the fix."""
    if version is None:
        found = "this ComfyUI has no comfyui_version.py, so its release is unknown"
    else:
        try:
            parsed = parse_version(version)
        except ValueError:
            found = f"this ComfyUI's version {version!r} is not MAJOR.MINOR.PATCH"
        else:
            if parsed >= MINIMUM:
                return None
            found = f"this is ComfyUI {version}"
    return (f"DATEncoder needs ComfyUI {REQUIRES} (its dual path needs CrossAttention.forward to receive "
            f"transformer_options, which ComfyUI does since 0.3.59); {found}. Update ComfyUI (git pull, or "
            f"'Update ComfyUI' in ComfyUI-Manager) and restart it.")


def refusing(node: type, reason: str) -> type:
    """A subclass of the V3 node class ``node`` (same schema and node id) whose ``validate_inputs`` fails
    with ``reason``: ComfyUI rejects a queued prompt that uses it, showing ``reason`` on the node (once
    per widget input: ComfyUI reports a failed validation for each input it passed in)."""

    def validate_inputs(cls, **inputs) -> str:
        return reason

    return type(node.__name__, (node,), {"__doc__": f"{node.__name__}, refused: {reason}",
                                        "__module__": node.__module__,
                                        "validate_inputs": classmethod(validate_inputs)})


def refuse_unsupported(nodes: list[type], version: str | None) -> list[type]:
    """``nodes`` unchanged on a supported ComfyUI ``version``; else one error logged and each node
    replaced by ``refusing(node, reason)``."""
    reason = unsupported_reason(version)
    if reason is None:
        return nodes
    logger.error("%s Its nodes are listed but refuse to run.", reason)
    return [refusing(node, reason) for node in nodes]


def schema_options(**options) -> dict:
    """Those of the ``io.Schema`` keyword arguments ``options`` that this release's ``io.Schema`` has:
    ``search_aliases`` is 0.30's (on 0.3.75 the editor finds the nodes by name and category only)."""
    from comfy_api.latest import io

    fields = {field.name for field in dataclasses.fields(io.Schema)}
    return {name: value for name, value in options.items() if name in fields}
