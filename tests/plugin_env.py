"""Make the example plugin in tests/plugin_example discoverable through entry points, without pip.

Writes a ``*.dist-info`` directory (METADATA + entry_points.txt, as pip would) next to a copy of the
package; putting that directory on ``sys.path``/``PYTHONPATH`` lets ``importlib.metadata`` find it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PLUGIN_SRC = Path(__file__).parent / "plugin_example" / "mbn_example_plugin"

ENTRY_POINTS = """[mbn.domains]
invert = mbn_example_plugin.domains:Invert
channel_shuffle = mbn_example_plugin.domains:ChannelShuffle
"""


def install_plugin(site: Path, entry_points: str = ENTRY_POINTS, name: str = "mbn_example_plugin") -> Path:
    """Lay out the plugin as an installed distribution under ``site``; returns ``site``."""
    shutil.copytree(PLUGIN_SRC, site / "mbn_example_plugin", dirs_exist_ok=True)
    info = site / f"{name}-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\nRequires-Dist: mbn-advprop\n")
    (info / "entry_points.txt").write_text(entry_points)
    return site
