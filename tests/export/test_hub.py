"""hub: --push fails early and plainly where there is no token or no network."""

import pytest

from mlxft.export.check import ExportError
from mlxft.export.hub import check_hub_access, push_folder


def test_no_token_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ExportError, match="needs a Hugging Face token.*nothing was written"):
        check_hub_access("me/model")
    with pytest.raises(ExportError, match="owner/name"):
        check_hub_access("model")


def test_an_unreachable_hub_is_one_message(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_test")

    def offline(self, token=None):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", offline)
    with pytest.raises(ExportError, match="cannot be reached.*ConnectionError.*nothing was written"):
        check_hub_access("me/model")


def test_a_failed_upload_says_the_local_export_is_complete(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)

    def fail(self, **kwargs):
        raise TimeoutError("read timed out")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fail)
    with pytest.raises(ExportError, match="is complete, but the upload to me/model failed"):
        push_folder(tmp_path, "me/model", "msg")
