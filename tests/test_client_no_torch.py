"""The client installs without the server extra: importing it must not pull in torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_client_import_does_not_load_torch_or_transformers() -> None:
    # Nor the optional extras: pyarrow, matplotlib and datasets load only when used.
    result = _run(
        "import sys\n"
        "import pairscore, pairscore.client, pairscore.cli, pairscore.convert, pairscore.aio\n"
        "import pairscore.hf, pairscore.pipeline.runner, pairscore.pipeline.commands\n"
        "from pairscore import ScoringClient, ScoringError, AsyncScoringClient, OverloadedError\n"
        "pairscore.cli._make_parser()\n"
        "heavy = ('torch', 'transformers', 'pairscore_server', 'pyarrow', 'matplotlib', 'datasets')\n"
        "print(','.join(m for m in heavy if m in sys.modules) or 'clean')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_serve_without_the_server_extra_says_what_to_install() -> None:
    # Make `import pairscore_server` fail as it does when the extra is missing.
    result = _run(
        "import sys\n"
        "sys.modules['pairscore_server'] = None\n"
        "from pairscore.cli import main\n"
        "sys.exit(main(['serve', '--port', '1']))\n"
    )
    assert result.returncode == 2
    assert "pip install 'pairscore[server]'" in result.stderr
