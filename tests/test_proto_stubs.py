"""The committed gRPC stubs are exactly what grpcio-tools makes from proto/.

If this fails, run `python scripts/gen_proto.py` and commit the result.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_proto(tmp_path):
    written = _gen_module().generate(tmp_path)
    assert written
    for fresh in written:
        committed = ROOT / "client" / fresh.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run scripts/gen_proto.py"
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.relative_to(ROOT)} drifted from proto/: run scripts/gen_proto.py"
        )


def test_every_proto_element_is_documented():
    """Every message, field, enum value, service and rpc has a comment above it."""
    for proto in (ROOT / "proto").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        declaration = re.compile(
            r"^\s*(message|enum|service|rpc)\s|^\s*(repeated\s+|optional\s+)?[\w.]+\s+\w+\s*=\s*\d+;"
            r"|^\s*[A-Z][A-Z0-9_]*\s*=\s*\d+;"
        )
        for i, line in enumerate(lines):
            if declaration.search(line) and not line.strip().startswith("//"):
                above = lines[i - 1].strip() if i else ""
                assert above.startswith("//"), f"{proto.name}:{i + 1} undocumented: {line.strip()}"


def test_enum_zero_values_are_unspecified():
    for proto in (ROOT / "proto").rglob("*.proto"):
        for match in re.finditer(r"enum\s+(\w+)\s*\{(.*?)\}", proto.read_text(), re.S):
            zero = re.search(r"(\w+)\s*=\s*0;", match.group(2))
            assert zero and zero.group(1).endswith("_UNSPECIFIED"), match.group(1)
