"""Tests write only to temporary folders: the checkout is left as it was."""

from __future__ import annotations

import tempfile
from pathlib import Path

from streamguard.inference.models import ENGINES_DIR

REPO = Path(__file__).resolve().parents[1]


def test_imported_models_do_not_land_in_engines() -> None:
    # conftest imports the MesoNet models for the session into a temporary engines folder, never into engines/
    # (where they would show up in a user's `streamguard models list`).
    assert Path(tempfile.gettempdir()) in ENGINES_DIR.resolve().parents, ENGINES_DIR
    assert not list((REPO / "engines").glob("mesonet-*")), "an imported model landed in engines/"
