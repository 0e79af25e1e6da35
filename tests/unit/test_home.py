"""Every cache and store under one home: ``$CLSVC_HOME``, default ``~/.cache/clsvc``, never the package's folder."""

from pathlib import Path

import cl_service
from cl_service._home import clsvc_home
from cl_service.models.store import base_path, store_dir


def test_home_defaults_to_the_user_cache_and_follows_the_env(tmp_path, monkeypatch):
    monkeypatch.delenv("CLSVC_MODEL_STORE", raising=False)
    monkeypatch.delenv("CLSVC_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert clsvc_home() == tmp_path / "user" / ".cache" / "clsvc"
    assert store_dir() == clsvc_home() / "models"
    assert not store_dir().is_relative_to(Path(cl_service.__file__).parents[1])  # site-packages on an install

    monkeypatch.setenv("CLSVC_HOME", str(tmp_path / "h"))
    assert base_path("tiny") == tmp_path / "h" / "models" / "tiny"
    monkeypatch.setenv("CLSVC_MODEL_STORE", str(tmp_path / "store"))  # still honoured, over the home
    assert base_path("tiny") == tmp_path / "store" / "tiny"
