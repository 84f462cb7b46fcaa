"""The service config: every typo and bad value is refused with the field (and its env variable) named."""

from __future__ import annotations

import pytest

from streamguard.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in list(os.environ):
        if var.startswith("STREAMGUARD_"):
            monkeypatch.delenv(var)


@pytest.mark.parametrize(("yaml_text", "named"), [
    ("scoring:\n  windw_s: 5\n", "scoring.windw_s"),  # every section of the config forbids extras too
    ("faces:\n  min_sizee: 5\n", "faces.min_sizee"),
    ("sampling:\n  fpss: 2\n", "sampling.fpss"),
    ("streams:\n  - {id: a, url: rtsp://cam/1}\n  - {id: a, url: rtsp://cam/2}\n", "streams"),
])
def test_typos_and_duplicates_in_the_file_are_refused(tmp_path, yaml_text, named):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(config)


@pytest.mark.parametrize(("var", "message"), [
    ("STREAMGUARD_SCORNG__WINDOW_S", "the config has no setting 'scorng'; did you mean scoring?"),
    ("STREAMGUARD_SCORING__WINDW_S", "scoring has no setting 'windw_s'; did you mean scoring.window_s?"),
    ("STREAMGUARD_FOO", "the config has no setting 'foo'"),
    ("STREAMGUARD_PORT__X", "port is a value, not a section"),
])
def test_unknown_environment_variables_are_refused(monkeypatch, var, message):
    monkeypatch.setenv(var, "15")
    with pytest.raises(ConfigError) as err:
        load_config()
    assert f"{var}: {message}" in str(err.value)


def test_known_variables_and_other_streamguard_variables_are_accepted(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMGUARD_SCORING__WINDOW_S", "15")
    monkeypatch.setenv("STREAMGUARD_ENGINE_CACHE", str(tmp_path))  # read by the engine cache, not a setting
    assert load_config().scoring.window_s == 15.0
